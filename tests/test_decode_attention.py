"""The decode step's attention kernel (fast_decode._decode_attn_kernel) in Triton's CPU interpreter:
rotary on the new query / key, the new key / value written at the cache slot `cur`, softmax over the
row's context [pad, cur) plus the new token, against the model's own eager attention
(modeling_chatglm.apply_rotary_2d + glm_attention) on the same fp16 inputs. Every way the kernel can
be launched is checked: one program or several splits of the context (merged in the kernel), the
splits that follow the context length (CHUNK: a short context runs unsplit), the cached keys /
values loaded before the kernel's programmatic-dependent-launch wait (PRE) — which must not change a
bit of the result — and contexts from a single position to several tiles, with left padding.

The interpreter is chosen at import, so the kernels run in a child process; on a GPU the compiled
kernel is checked the same way by tests/test_cuda_model.py (marked cuda).
"""
from conftest import ROOT, run_child

CHILD = r"""
import json, os, sys, types
os.environ["TRITON_INTERPRET"] = "1"
pkg = types.ModuleType("chatglm6b"); pkg.__path__ = [sys.argv[1]]; sys.modules["chatglm6b"] = pkg
import torch
from chatglm6b import fast_decode as fd, modeling_chatglm as mc

torch.manual_seed(0)
B, H, D, L = 2, 2, 32, 640
dt = torch.float16
eps = torch.finfo(dt).eps
layer = 5
denom, coeff = fd._scale_for(layer, D)
inv_freq = mc.rotary_inv_freq(D // 2)
n = 64
cos, sin = mc.rotary_cos_sin(torch.arange(n).view(1, 1, n), inv_freq, dt)
cs_table = torch.cat((cos.reshape(n, -1), sin.reshape(n, -1)), dim=-1)
configs = [dict(BLOCK_S=64, PRE=False, CHUNK=0), dict(BLOCK_S=64, PRE=True, CHUNK=0),
           dict(BLOCK_S=32, PRE=True, CHUNK=128), dict(BLOCK_S=128, PRE=False, CHUNK=256),
           dict(BLOCK_S=128, PRE=True, CHUNK=256)]
worst, failures, checked = 0.0, [], 0
for cur in (1, 2, 100, 300, 600):
    for splits in (1, 2, 4, 8):
        kc, vc = torch.randn(B, H, L, D).to(dt), torch.randn(B, H, L, D).to(dt)
        qkv = torch.randn(B, 3 * H * D).to(dt)
        p1 = torch.randint(0, 40, (B, 2))
        pad = torch.tensor([0, min(37, cur)], dtype=torch.int32)  # row 1: left padding (all of it at cur <= 37)
        q0, k0, v0 = qkv.view(B, 1, H, 3 * D).transpose(1, 2).split(D, dim=-1)
        c, s = mc.rotary_cos_sin(p1[:, :, None], inv_freq, dt)
        qr, kr = mc.apply_rotary_2d(q0, c, s), mc.apply_rotary_2d(k0, c, s)
        K, V = torch.cat([kc[:, :, :cur], kr], 2), torch.cat([vc[:, :, :cur], v0], 2)
        mask = torch.zeros(B, 1, 1, cur + 1, dtype=torch.bool)
        mask[1, ..., :int(pad[1])] = True
        ref = mc.glm_attention(qr.double(), K.double(), V.double(), mask, layer).transpose(1, 2).reshape(B, H * D)
        outs = {}
        for cfg in configs:
            kc2, vc2 = kc.clone(), vc.clone()
            out = torch.full((B, H * D), float("nan"), dtype=dt)
            scratch = fd.attention_scratch(B, H, D, splits, "cpu") if splits > 1 else None
            fd.decode_attention(qkv, kc2, vc2, fd.step_cos_sin(cs_table, p1), torch.tensor([cur], dtype=torch.int32),
                                pad, out, denom, coeff, splits, scratch, dict(cfg, num_warps=4, num_stages=1,
                                                                                INLINE=True))
            tag = (cur, splits, cfg["BLOCK_S"], cfg["PRE"], cfg["CHUNK"])
            err = float((out.double() - ref).norm() / ref.norm())
            worst = max(worst, err)
            checked += 1
            if not err < 16 * eps:
                failures.append(("output", tag, err))
            if scratch is not None and int(scratch[3].abs().sum()) != 0:
                failures.append(("tickets not reset", tag))
            # the new key (rotary within the fp16 roundings of its three operations) / value at slot cur only
            if not bool(((kc2[:, :, cur].double() - kr[:, :, 0].double()).abs()
                         <= 2 * eps * kr[:, :, 0].double().abs() + 1e-7).all()):
                failures.append(("new key", tag))
            if not torch.equal(vc2[:, :, cur], v0[:, :, 0]):
                failures.append(("new value", tag))
            if not (torch.equal(kc2[:, :, :cur], kc[:, :, :cur]) and torch.equal(kc2[:, :, cur + 1:], kc[:, :, cur + 1:])
                    and torch.equal(vc2[:, :, :cur], vc[:, :, :cur]) and torch.equal(vc2[:, :, cur + 1:], vc[:, :, cur + 1:])):
                failures.append(("other cache slots written", tag))
            outs[(cfg["BLOCK_S"], cfg["PRE"], cfg["CHUNK"])] = (out, kc2, vc2)
        for bs, chunk in ((64, 0), (128, 256)):  # PRE changes when the loads are issued, nothing else
            a, b = outs[(bs, False, chunk)], outs[(bs, True, chunk)]
            if not all(torch.equal(x, y) for x, y in zip(a, b)):
                failures.append(("PRE not bit-equal", cur, splits, bs, chunk))
try:
    fd.decode_attention(qkv, kc, vc, fd.step_cos_sin(cs_table, p1), torch.tensor([cur], dtype=torch.int32), pad, out,
                        denom, coeff, 2, fd.attention_scratch(B, H, D, 2, "cpu"),
                        dict(BLOCK_S=64, num_warps=4, num_stages=1, INLINE=False, CHUNK=128))
    refused = ""
except ValueError as exc:
    refused = str(exc)
print("RESULT " + json.dumps(dict(worst=worst, failures=failures[:20], checked=checked, refused=refused)))
"""


def test_decode_attention_against_eager_attention():
    got = run_child(CHILD, ROOT, timeout=900)
    assert got["checked"] == 5 * 4 * 5
    assert got["failures"] == [], got["failures"]
    assert got["worst"] > 0  # (the comparison ran on real outputs)
    assert "CHUNK" in got["refused"] and "INLINE" in got["refused"]
