"""A split-K GEMV's reduction folded into the LayerNorm after it (fast_decode.layer_norm(partials=...),
used by the batch-1 decode step where a linear's config splits K; FOLD_REDUCE).

What must hold, checked here in Triton's CPU interpreter (a child process: the interpreter is chosen
at import) against torch arithmetic, not against the kernel itself:

* the residual the LayerNorm adds is the split-K reduce kernel's output, bit for bit: the fp32 splits
  summed in order, times the linear's scale, plus its bias, rounded to the activation dtype (what torch
  computes from the same partials in fp32, in the same order; for bf16 within one ulp, as the
  interpreter's fp32 -> bf16 cast truncates where the GPU's rounds);
* the LayerNorm's output (and its norms for the screened head) is then bit-equal to the unfolded pair
  — cuda_kernels' reduce kernel followed by the LayerNorm kernel with that residual — and within fp16
  rounding of a float64 LayerNorm of the same residual.

On a GPU the compiled pair is checked in the whole decode graph (tests/test_cuda_model.py,
test_folded_split_k_reduce_gives_identical_steps).
"""
import pytest

from conftest import ROOT, run_child

CHILD = r"""
import json, os, sys, types
os.environ["TRITON_INTERPRET"] = "1"
pkg = types.ModuleType("chatglm6b"); pkg.__path__ = [sys.argv[1]]; sys.modules["chatglm6b"] = pkg
import torch
from chatglm6b import cuda_kernels as ck
from chatglm6b import fast_decode as fd

out = []
g = torch.Generator().manual_seed(5)
for N, S, has_bias, dt, norms in [(64, 2, True, torch.float16, False), (4096, 4, False, torch.float16, True),
                                   (100, 3, True, torch.bfloat16, False), (4096, 2, True, torch.float16, True)]:
    ws = torch.randn(S, N, generator=g) * 30
    scale = (torch.rand(N, generator=g) * 0.02 + 0.001).half()
    bias = torch.randn(N, generator=g).to(dt) if has_bias else None
    a = torch.randn(1, N, generator=g).to(dt)
    w = (torch.rand(N, generator=g) + 0.5).to(dt)
    b = (torch.randn(N, generator=g) * 0.1).to(dt)
    alpha = 7.483314773547883
    # the residual by torch: splits in order, * scale, + bias, rounded once
    acc = ws[0].clone()
    for i in range(1, S):
        acc = acc + ws[i]
    acc = acc * scale.float()
    if bias is not None:
        acc = acc + bias.float()
    r_torch = acc.to(dt).view(1, N)
    # unfolded: the reduce kernel, then the LayerNorm with that residual
    y = torch.empty(1, N, dtype=dt)
    ck._reduce(ws, scale, bias, y, S)
    n1 = torch.zeros(1, 2) if norms else None
    ln_ref = fd.layer_norm(a, w, b, 1e-5, residual=y, alpha=alpha, norms=n1)
    # folded
    n2 = torch.zeros(1, 2) if norms else None
    ln_fold = fd.layer_norm(a, w, b, 1e-5, alpha=alpha, norms=n2, partials=(ws, scale, bias))
    # float64 LayerNorm of the same residual, with the eager rounding points
    h = ((a.double() * alpha).to(dt).double() + r_torch.double()).to(dt).double()
    mu = h.mean(-1, keepdim=True)
    ref = (h - mu) / torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * w.double() + b.double()
    eps_dt = torch.finfo(dt).eps
    ulp = eps_dt * ref.abs().clamp_min(torch.finfo(dt).tiny)
    if dt == torch.bfloat16:  # the interpreter truncates h's two roundings: up to 2 ulp of |h|, normalised
        rstd = 1 / torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
        ulp = ulp + 2 * eps_dt * h.abs() * rstd * w.double().abs()
    # (bf16: the interpreter's fp32 -> bf16 cast truncates where the GPU's rounds: one ulp apart at most)
    one_ulp = torch.finfo(dt).eps * r_torch.float().abs()
    out.append(dict(N=N, S=S, bias=has_bias, dtype=str(dt), reduce_equals_torch=bool(torch.equal(y, r_torch)),
                    reduce_within_ulp=bool(((y.float() - r_torch.float()).abs() <= one_ulp).all()),
                    fold_equals_unfolded=bool(torch.equal(ln_fold, ln_ref)),
                    norms_equal=bool(torch.equal(n1, n2)) if norms else None,
                    within_rounding=bool(((ln_fold.double() - ref).abs() <= 2 * ulp + 1e-6).all()),
                    changed=bool(not torch.equal(ln_fold, fd.layer_norm(a, w, b, 1e-5, residual=torch.zeros_like(a),
                                                                        alpha=alpha)))))
print("RESULT " + json.dumps(out))
"""


def test_folded_reduce_is_the_reduce_kernel_then_the_layernorm():
    got = run_child(CHILD, ROOT, timeout=900)
    assert len(got) == 4
    for case in got:
        # (the oracle: the reduce kernel is torch's arithmetic; bf16 casts differ in the interpreter)
        assert case["reduce_equals_torch"] or (case["dtype"] == "torch.bfloat16" and case["reduce_within_ulp"]), case
        assert case["fold_equals_unfolded"], case
        assert case["norms_equal"] in (None, True), case
        assert case["within_rounding"], case
        assert case["changed"], case  # (the residual is really added)


def test_partials_need_one_row_and_no_residual():
    import torch

    from chatglm6b import fast_decode as fd

    a = torch.zeros(2, 8, dtype=torch.float16)
    ws = torch.zeros(2, 8)
    s = torch.ones(8, dtype=torch.float16)
    with pytest.raises(AssertionError, match="one row"):
        fd.layer_norm(a, s, s, 1e-5, partials=(ws, s, None))
    with pytest.raises(AssertionError, match="one row"):
        fd.layer_norm(a[:1], s, s, 1e-5, residual=a[:1], partials=(ws, s, None))
