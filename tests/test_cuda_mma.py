"""The tensor-core batch-1 GEMV compiled with NVRTC (cuda_mma.py).

GPU tests carry ``@pytest.mark.cuda`` (run on a CUDA machine with
``python3 -m pytest -m cuda tests/test_cuda_mma.py``); the unmarked ones run everywhere.
Reference and tolerance: float64 ``x @ (unpack(q) * scale)ᵀ + bias`` with the INT4 unpacking
written out from SPEC §3 and the bound explained in test_cuda_kernels.py (the weights are exact
in fp16 and the tensor cores multiply exactly; only the fp32 accumulation order differs from the
other paths).
"""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from chatglm6b import cuda_kernels as ck
from chatglm6b import cuda_mma as mma
from test_cuda_kernels import check_close, make_weight

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gpu(monkeypatch):
    if not torch.cuda.is_available():
        pytest.fail("the cuda tests need an NVIDIA GPU (run them on the device machine)")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.fail("the tensor-core GEMV needs sm_80 or newer")
    monkeypatch.setattr(mma, "ENABLED", True)  # (opt-in in production: tested here either way)
    if not mma.available(torch.device("cuda")):
        pytest.fail(f"cuda_mma.available() is False on this GPU (NVRTC found: {mma.nvrtc_version()})")
    monkeypatch.setattr(ck, "STRICT", True)
    return torch.device("cuda")


def run(x, q, scale, bias, bits, cfg, pdl=0):
    junk = torch.full((1, q.shape[0]), float("nan"), dtype=torch.float16, device=x.device)
    del junk  # the output very likely reuses this NaN block: an unwritten row fails check_close
    return mma.gemv(x, q, scale, bias, bits, cfg, pdl=pdl)


# ---------------------------------------------------------------------------------------------
# CPU (CI)

def test_imports_and_declines_without_a_gpu():
    code = (f"import sys, types, torch; pkg = types.ModuleType('chatglm6b'); pkg.__path__ = [{str(ROOT)!r}]; "
            "sys.modules['chatglm6b'] = pkg; import chatglm6b.cuda_mma as m; "
            "assert m.available(torch.device('cpu')) is False; print('OK')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]


@pytest.mark.parametrize("bits,N,K,dtype,ok", [
    (4, 4096, 4096, torch.float16, True), (8, 4096, 16384, torch.float16, True),
    (4, 100, 200, torch.float16, False),  # K not a multiple of the 128-value INT4 step
    (8, 100, 96, torch.float16, False),  # nor of the 64-value INT8 step
    (8, 64, 128, torch.bfloat16, False),  # bf16 activations: the Triton GEMV
])
def test_supported_shapes(bits, N, K, dtype, ok):
    assert mma.supports(bits, N, K, dtype) is ok


@pytest.mark.cuda
def test_compile_error_is_reported_with_the_log(gpu):
    with pytest.raises(RuntimeError, match="could not compile"):
        mma.compile_cubin("this is not CUDA", "sm_80", {})


# ---------------------------------------------------------------------------------------------
# GPU

CONFIGS = [dict(MT=1, WARPS=1, U=1), dict(MT=1, WARPS=4, U=4), dict(MT=2, WARPS=4, U=2),
           dict(MT=1, WARPS=8, U=8), dict(MT=2, WARPS=2, U=3)]


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "mt{MT}w{WARPS}u{U}".format(**c))
@pytest.mark.parametrize("N,K", [(384, 512), (77, 1024), (50, 128), (4096, 2048)])
def test_matches_reference(gpu, bits, cfg, N, K):
    # N = 77 / 50: row tiles past N are loaded clamped and not stored; K = 128: fewer K steps than
    # warps (idle warps contribute zeros); U larger than a warp's share of K.
    q, scale, bias = make_weight(N, K, bits, seed=N + K)
    x = torch.randn(1, K, device=gpu, dtype=torch.float16)
    check_close(run(x, q, scale, bias, bits, cfg), x, q, scale, bias, bits)
    check_close(run(x, q, scale, None, bits, cfg), x, q, scale, None, bits)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_every_int4_nibble_and_int8_byte_value(gpu, bits):
    # One weight row per value pattern: each row holds a single nonzero position, so a swapped
    # nibble, a wrong sign extension or a mismatched activation pairing gives a wrong row exactly.
    K = 256
    KQ = K // 2 if bits == 4 else K
    values = torch.arange(-8, 8) if bits == 4 else torch.arange(-128, 128)
    values = values[values != 0] if bits == 8 else values
    rows = []
    for pos in range(0, K, 7):
        v = int(values[pos % len(values)])
        w = torch.zeros(K, dtype=torch.int32)
        w[pos] = v
        rows.append(w)
    w = torch.stack(rows)
    if bits == 4:
        q = ((w[:, 0::2] << 4) | (w[:, 1::2] & 15)).to(torch.int8)
    else:
        q = w.to(torch.int8)
    q = q.to(gpu)
    assert q.shape[1] == KQ
    N = q.shape[0]
    scale = torch.ones(N, dtype=torch.float16, device=gpu)
    x = (torch.arange(K, device=gpu, dtype=torch.float32) / 64 + 1).half()[None]  # distinct, exact values
    y = run(x, q, scale, None, bits, dict(MT=1, WARPS=2, U=2))
    want = (w.double().to(gpu) * x.double()).sum(1)
    assert torch.equal(y[0].double(), want.half().double()), (y[0] - want.half()).abs().max()


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("N,K", [(12288, 4096), (4096, 4096), (16384, 4096), (4096, 16384)])
def test_chatglm_shapes_through_linear(gpu, bits, N, K, monkeypatch):
    # cuda_kernels.linear takes this path for batch 1 on sm_80+, with the production configuration.
    calls = []
    real = ck._mma_gemv
    monkeypatch.setattr(ck, "_mma_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, scale, bias = make_weight(N, K, bits, seed=N // 7 + K)
    x = torch.randn(1, K, device=gpu, dtype=torch.float16)
    check_close(ck.linear(x, q, scale, bias, bits), x, q, scale, bias, bits)
    assert calls, "linear() did not use the tensor-core GEMV"


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("N", [384, 4160])
def test_pdl_is_bit_equal_and_gelu_stays_on_triton(gpu, bits, N, monkeypatch):
    # PDL levels change no bit. A linear with the fused GELU keeps the Triton GEMV (CUDA C's tanhf
    # is not the libdevice tanh the eager GELU matches), so its result is the Triton kernel's.
    q, scale, bias = make_weight(N, 1024, bits, seed=N)
    x = torch.randn(1, 1024, device=gpu, dtype=torch.float16) * 2
    cfg = mma.config_for(bits, N, 1024, torch.cuda.get_device_capability())
    plain = run(x, q, scale, bias, bits, cfg)
    check_close(plain, x, q, scale, bias, bits)
    for level in ([0, 1, 2] if ck.pdl_supported(gpu) else [0]):
        assert torch.equal(run(x, q, scale, bias, bits, cfg, pdl=level), plain), level
    calls = []
    real = ck._mma_gemv
    monkeypatch.setattr(ck, "_mma_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = ck.linear(x, q, scale, bias, bits, act="gelu")
    assert not calls
    tri = ck._plan(1, N, 1024, bits, x.dtype, True, ck._capability(gpu))[2]
    assert torch.equal(got, ck._run_gemv(x, q, scale, bias, bits, tri, act=1))


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_graph_capture_determinism_and_strided_x(gpu, bits):
    q, scale, bias = make_weight(1000, 2048, bits, seed=3)
    cfg = dict(MT=1, WARPS=4, U=4)
    x = torch.randn(1, 2048, device=gpu, dtype=torch.float16)
    first = run(x, q, scale, bias, bits, cfg)
    assert torch.equal(run(x, q, scale, bias, bits, cfg), first)  # fixed reduction order
    wide = torch.zeros(1, 4096, device=gpu, dtype=torch.float16)
    wide[:, ::2] = x
    assert torch.equal(mma.gemv(wide[:, ::2], q, scale, bias, bits, cfg), first)  # strided x is copied
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mma.gemv(x, q, scale, bias, bits, cfg)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, mma.gemv(x, q, scale, bias, bits, cfg))
    check_close(y, x, q, scale, bias, bits)


@pytest.mark.cuda
def test_agrees_with_the_triton_gemv(gpu, monkeypatch):
    # Both against float64 (check_close) and against each other: they differ only in fp32
    # accumulation order, so at most a few fp16 ulps on a few rows.
    for bits in (8, 4):
        q, scale, bias = make_weight(4096, 4096, bits, seed=bits)
        x = torch.randn(1, 4096, device=gpu, dtype=torch.float16)
        a = ck.linear(x, q, scale, bias, bits)
        monkeypatch.setattr(mma, "ENABLED", False)
        b = ck.linear(x, q, scale, bias, bits)
        monkeypatch.setattr(mma, "ENABLED", True)
        check_close(a, x, q, scale, bias, bits)
        check_close(b, x, q, scale, bias, bits)
        ulp = (a.float() - b.float()).abs() / torch.finfo(torch.float16).eps / a.float().abs().clamp_min(1e-3)
        assert (a != b).float().mean() < 0.05 and ulp.max() <= 4, ((a != b).float().mean(), ulp.max())


@pytest.mark.cuda
def test_compile_failure_falls_back_to_triton_once(gpu, monkeypatch):
    monkeypatch.setattr(ck, "STRICT", False)
    monkeypatch.setattr(ck, "_BROKEN", set())
    monkeypatch.setattr(mma, "_KERNELS", {})

    def broken(*a, **k):
        raise RuntimeError("planted NVRTC failure")
    monkeypatch.setattr(mma, "_cached_cubin", broken)
    q, scale, bias = make_weight(256, 512, 8, seed=1)
    x = torch.randn(1, 512, device=gpu, dtype=torch.float16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y = ck.linear(x, q, scale, bias, 8)
        y2 = ck.linear(x, q, scale, bias, 8)
    msgs = [str(w.message) for w in seen if "tensor-core GEMV failed" in str(w.message)]
    assert len(msgs) == 1 and "planted NVRTC failure" in msgs[0], msgs
    cfg = ck._plan(1, 256, 512, 8, x.dtype, True, ck._capability(gpu))[2]
    want = ck._run_gemv(x, q, scale, bias, 8, cfg)
    assert torch.equal(y, want) and torch.equal(y2, want)
