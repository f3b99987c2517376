"""The Triton weight-only INT8 / INT4 kernels (cuda_kernels.py).

GPU tests carry ``@pytest.mark.cuda``; CI (CPU only) deselects them, and they run on a CUDA
machine with ``python3 -m pytest -m cuda tests/test_cuda_kernels.py``. The unmarked tests
run everywhere.

Reference: float64 ``x @ (unpack(q) * scale)ᵀ + bias`` with the INT4 unpacking written out here
from SPEC §3, never values produced by the kernels or by quantization.py.

Tolerance, per output element, with u the unit roundoff of the activation dtype (2⁻¹¹ fp16,
2⁻⁸ bf16):
    |y − ref| ≤ 2u·|ref| + 4u·sqrt(Σₖ (xₖ wₖ)²) + 2⁻²⁰·Σₖ |xₖ wₖ|
* 2u·|ref|: the single rounding of the fp32 result to the output dtype (≤ u·|ref|), twice.
* 4u·sqrt(Σ(xw)²): paths that first round the dequantized weight to the activation dtype (the
  prefill dequantize + cuBLAS path, like the torch path) add Σ xₖwₖδₖ with independent |δₖ| ≤ u,
  whose standard deviation is ≤ u/√3·sqrt(Σ(xw)²): the bound is ~7 standard deviations.
  Fused kernels multiply exact integers by the fp32 scale and do not need it.
* 2⁻²⁰·Σ|xw|: fp32 accumulation over K ≤ 16384 terms in blocked order (random-walk growth
  ~√K·2⁻²⁴ ≤ 2⁻¹⁷ relative to Σ|xw| in the worst case here, typically far less).
A single mis-decoded weight moves its output by ~|xₖwₖ| ≈ sqrt(Σ(xw)²)/√K ≥ 2⁻⁷·sqrt(Σ(xw)²)
for K ≤ 16384, ≥ 4× the middle term for fp16, so wrong nibbles or bytes cannot hide in it.
Also ‖y − ref‖/‖ref‖ ≤ 2u overall, and every element must be finite (outputs are poisoned
with NaN beforehand, so an unwritten element fails).
"""
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from chatglm6b import cuda_kernels as ck
from chatglm6b.quantization import QuantizedLinear, quantized_linear

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# helpers

def make_weight(N, K, bits, bias=True, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    if bits == 8:
        q = torch.randint(-127, 128, (N, K), generator=g, device=device, dtype=torch.int8)
    else:  # any byte is a valid pair of int4 values
        q = torch.randint(-128, 128, (N, K // 2), generator=g, device=device, dtype=torch.int8)
    qmax = 127 if bits == 8 else 7
    scale = ((torch.rand(N, generator=g, device=device) + 0.5) * (0.05 / qmax)).half()
    b = (torch.randn(N, generator=g, device=device) * 0.1).half() if bias else None
    return q, scale, b


def unpack_ref(q, bits):
    """float64 [N, K]; INT4: byte j = (q[2j] << 4) | (q[2j+1] & 0xF), both nibbles signed."""
    if bits == 8:
        return q.double()
    b = q.to(torch.int16)
    hi = torch.div(b, 16, rounding_mode="floor")
    lo = b - 16 * hi
    lo = torch.where(lo >= 8, lo - 16, lo)
    return torch.stack((hi, lo), dim=-1).flatten(-2).double()


def check_close(y, x, q, scale, bias, bits):
    assert y is not None, "linear() returned None (no kernel ran)"
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], q.shape[0])
    assert torch.isfinite(y).all(), "non-finite output (an element was not written?)"
    K = x.shape[-1]
    w = unpack_ref(q, bits) * scale.double()[:, None]
    xd = x.reshape(-1, K).double()
    ref = xd @ w.T + (0 if bias is None else bias.double())
    sq = ((xd * xd) @ (w * w).T).sqrt()
    ab = xd.abs() @ w.abs().T
    u = 2.0**-11 if x.dtype == torch.float16 else 2.0**-8
    tol = 2 * u * ref.abs() + 4 * u * sq + 2.0**-20 * ab
    err = (y.reshape(ref.shape).double() - ref).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements off; worst err/tol "
                           f"{(err / tol).max().item():.2f} at {divmod(int((err / tol).argmax()), ref.shape[1])}")
    rel = ((y.reshape(ref.shape).double() - ref).norm() / ref.norm()).item()
    assert rel <= 2 * u, rel


def poisoned_call(x, q, scale, bias, bits):
    """Run linear() right after freeing a NaN-filled block of the output's size, so the caching
    allocator very likely hands that block to the output: unwritten elements stay NaN."""
    N = q.shape[0]
    junk = torch.full((*x.shape[:-1], N), float("nan"), dtype=x.dtype, device=x.device)
    del junk
    return ck.linear(x, q, scale, bias, bits)


@pytest.fixture
def gpu(monkeypatch):
    if not torch.cuda.is_available():
        pytest.fail("the cuda tests need an NVIDIA GPU (run them on the device machine)")
    if not ck.available():
        pytest.fail("cuda_kernels.available() is False on a CUDA machine (is triton installed?)")
    monkeypatch.setattr(ck, "STRICT", True)  # kernel errors raise instead of falling back
    return torch.device("cuda")


# ---------------------------------------------------------------------------------------------
# CPU (CI)

_NO_TRITON = r"""
import importlib.abc, sys, types
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, _Block())
import torch
torch.cuda.is_available = lambda: CUDA
pkg = types.ModuleType("chatglm6b"); pkg.__path__ = [ROOT]; sys.modules["chatglm6b"] = pkg
import chatglm6b.cuda_kernels as ck
assert ck.available() is False, "available() must be False without triton"
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules)
q = torch.zeros(4, 8, dtype=torch.int8); s = torch.ones(4, dtype=torch.float16)
assert ck.linear(torch.randn(2, 8), q, s, None, 8) is None
from chatglm6b.quantization import quantized_linear
y = quantized_linear(torch.randn(2, 8), q, s, None, 8)
assert y.shape == (2, 4)
print("OK")
"""


@pytest.mark.parametrize("cuda_visible", [False, True])
def test_imports_and_reports_unavailable_without_triton(cuda_visible):
    code = _NO_TRITON.replace("CUDA", repr(cuda_visible)).replace("ROOT", repr(str(ROOT)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]


_WARM_UP = r"""
import json, os, sys, types
pkg = types.ModuleType("chatglm6b"); pkg.__path__ = [ROOT]; sys.modules["chatglm6b"] = pkg
import torch
torch.cuda.is_available = lambda: CUDA
import chatglm6b.cuda_kernels as ck
from chatglm6b.configuration_chatglm import ChatGLMConfig
from chatglm6b.modeling_chatglm import ChatGLMForConditionalGeneration
imported_before = "triton" in sys.modules
ChatGLMForConditionalGeneration(ChatGLMConfig.from_json_file(CONFIG))
res = {"imported_before": imported_before, "thread": ck._WARM_UP is not None}
if ck._WARM_UP is not None:
    ck._WARM_UP.join(120)
    from triton.runtime.cache import triton_key
    before = triton_key.cache_info()
    triton_key()
    after = triton_key.cache_info()
    res.update(alive=ck._WARM_UP.is_alive(), size=before.currsize, misses=after.misses - before.misses,
               hits=after.hits - before.hits)
res["triton_imported"] = "triton" in sys.modules
print("RESULT " + json.dumps(res), flush=True)
"""


@pytest.mark.parametrize("cuda_visible,kernels", [(True, "auto"), (False, "auto"), (True, "torch")])
def test_building_a_model_on_a_cuda_machine_warms_triton_up(cuda_visible, kernels):
    """Building the model where a CUDA GPU is visible starts one thread that imports Triton and computes
    its installation hash (Triton's lru_cache'd ``triton_key``, 0.43 s of the first call on an H100
    machine), so that the first kernel lookup finds it computed; without a GPU, or with
    CHATGLM_KERNELS=torch, the model does not even import Triton."""
    import os

    pytest.importorskip("triton")  # CI installs it in both virtualenvs
    from conftest import CONFORMANCE, run_child

    code = (_WARM_UP.replace("CUDA", repr(cuda_visible)).replace("ROOT", repr(str(ROOT)))
            .replace("CONFIG", repr(str(CONFORMANCE / "int8" / "config.json"))))
    res = run_child(code, env=dict(os.environ, CHATGLM_KERNELS=kernels))
    if cuda_visible and kernels == "auto":
        assert res["thread"] and not res["alive"], res
        assert res["size"] == 1 and res["misses"] == 0 and res["hits"] == 1, res  # computed by the thread
    else:  # (transformers 5 imports Triton by itself; 4.27 does not)
        assert not res["thread"] and res["triton_imported"] == res["imported_before"], res


def test_no_plain_import_of_optional_packages():
    """Hugging Face's remote-code loader imports every name a plain import line mentions."""
    path = ROOT / "cuda_kernels.py"
    try:
        from transformers.dynamic_module_utils import get_imports
        names = set(get_imports(str(path)))
    except ImportError:  # same rule, written out
        text = path.read_text()
        names = set(re.findall(r"^\s*import\s+(\S+)\s*$", text, flags=re.M))
        names |= set(re.findall(r"^\s*from\s+(\S+)\s+import", text, flags=re.M))
        names = {n.split(".")[0] for n in names if not n.startswith(".")}
    assert "torch" in names and names - {"torch"} <= set(sys.stdlib_module_names), names  # triton: never


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_on_cpu_is_unaffected(bits, dtype, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the CUDA backend must not be consulted for CPU tensors")

    q, scale, bias = make_weight(24, 64, bits, device="cpu")
    x = torch.randn(3, 5, 64, dtype=dtype)
    assert ck.linear(x, q, scale, bias, bits) is None  # CPU tensors are never ours
    monkeypatch.setattr(ck, "linear", boom)
    monkeypatch.setattr(ck, "available", boom)
    y = quantized_linear(x, q, scale, bias, bits)  # CPU kernels or the torch path, never ours
    assert y.dtype == dtype and y.shape == (3, 5, 24)
    ref = x.double() @ (unpack_ref(q, bits) * scale.double()[:, None]).T + bias.double()
    u = 2.0**-24 if dtype == torch.float32 else 2.0**-8
    assert ((y.double() - ref).norm() / ref.norm()).item() < 8 * u + 1e-6


# ---------------------------------------------------------------------------------------------
# GPU

@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 300, 1024])
def test_matches_reference(gpu, bits, M):
    q, scale, bias = make_weight(384, 512, bits, seed=M)
    x = torch.randn(M, 512, device=gpu, dtype=torch.float16)
    check_close(poisoned_call(x, q, scale, bias, bits), x, q, scale, bias, bits)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 5, 16, 33, 300])
@pytest.mark.parametrize("N,K,with_bias", [(77, 70, False), (100, 200, True)])
def test_odd_shapes(gpu, bits, M, N, K, with_bias):
    # K=70: rows are not whole 32-bit words (plain-conversion kernels); K=200: words, but K is
    # not a multiple of any tile; N is not a multiple of any row block.
    q, scale, bias = make_weight(N, K, bits, bias=with_bias, seed=N + M)
    x = torch.randn(M, K, device=gpu, dtype=torch.float16)
    check_close(poisoned_call(x, q, scale, bias, bits), x, q, scale, bias, bits)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("N,M", [(384, 1), (384, 16), (384, 40), (384, 100), (384, 300), (5000, 100)])
def test_bf16_activations(gpu, bits, N, M):
    q, scale, bias = make_weight(N, 512, bits, seed=7)
    x = torch.randn(M, 512, device=gpu, dtype=torch.bfloat16)
    check_close(poisoned_call(x, q, scale, bias, bits), x, q, scale, bias, bits)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("layout,M", [("strided", 1), ("strided", 16), ("transposed", 16),
                                      ("transposed", 300), ("batched-3d", 7)])
def test_non_contiguous_x(gpu, bits, layout, M):
    K = 256
    q, scale, bias = make_weight(192, K, bits, seed=3)
    if layout == "strided":  # every other column of a wider tensor: stride along K is 2
        x = torch.randn(M, 2 * K, device=gpu, dtype=torch.float16)[:, ::2]
    elif layout == "transposed":  # column-major [M, K]: stride along K is M
        x = torch.randn(K, M, device=gpu, dtype=torch.float16).t()
    else:  # [2, M, K] seen through a transpose: leading dims do not merge into a view
        x = torch.randn(M, 2, K, device=gpu, dtype=torch.float16).transpose(0, 1)
    assert not x.is_contiguous()
    check_close(poisoned_call(x, q, scale, bias, bits), x, q, scale, bias, bits)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("N,K,M", [(4096, 4096, 1), (4096, 4096, 16), (4096, 4096, 64), (4096, 4096, 1024),
                                   (4096, 16384, 1), (4096, 16384, 16), (12288, 4096, 1), (12288, 4096, 2),
                                   (16384, 4096, 16), (4096, 16384, 24), (12288, 4096, 48), (16384, 4096, 33),
                                   (12288, 4096, 96), (16384, 4096, 256), (4096, 4096, 128), (4096, 16384, 100),
                                   (16384, 4096, 257)])
def test_chatglm_shapes(gpu, bits, N, K, M):
    # The shapes the model runs, so the production tile configurations (whole tiles) are covered.
    q, scale, bias = make_weight(N, K, bits, seed=11)
    x = torch.randn(M, K, device=gpu, dtype=torch.float16)
    check_close(poisoned_call(x, q, scale, bias, bits), x, q, scale, bias, bits)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kernel,M,N,K,cfg", [
    ("gemv", 1, 77, 1000, dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, num_warps=4)),
    ("gemv", 1, 77, 1024, dict(BLOCK_N=16, BLOCK_KW=64, PREFETCH=False, num_warps=2, EV="evict_first")),
    ("gemv", 1, 77, 1000, dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, num_warps=4, XVEC=1)),
    ("gemv", 1, 77, 1000, dict(BLOCK_N=4, BLOCK_KW=256, PREFETCH=True, num_warps=4, XVEC=2, EV="evict_first")),
    ("gemv", 1, 77, 4096, dict(BLOCK_N=4, BLOCK_KW=128, PREFETCH=True, num_warps=4, SPLIT_K=4, XVEC=2)),
    ("gemv", 1, 77, 1024, dict(BLOCK_N=4, BLOCK_KW=64, PREFETCH=False, num_warps=2, SPLIT_K=2, CM=".cg")),
    # a program's whole K range as one tile (ONE_TILE; the ragged K = 1000 entry above is one too):
    # whole rows, and one tile per K slice
    ("gemv", 1, 77, 2048, dict(BLOCK_N=2, BLOCK_KW=512, PREFETCH=True, num_warps=4, XVEC=2)),
    ("gemv", 1, 77, 4096, dict(BLOCK_N=4, BLOCK_KW=256, PREFETCH=True, num_warps=4, SPLIT_K=4, XVEC=2)),
    # two tiles in flight (PREFETCH=2): ragged K, whole tiles, fewer tiles than the depth, a K split
    ("gemv", 1, 77, 1000, dict(BLOCK_N=8, BLOCK_KW=32, PREFETCH=2, num_warps=4, XVEC=2, EV="evict_first")),
    ("gemv", 1, 77, 4096, dict(BLOCK_N=8, BLOCK_KW=64, PREFETCH=2, num_warps=4, XVEC=2)),
    ("gemv", 1, 77, 1024, dict(BLOCK_N=16, BLOCK_KW=64, PREFETCH=2, num_warps=8)),
    ("gemv", 1, 77, 4096, dict(BLOCK_N=4, BLOCK_KW=64, PREFETCH=2, num_warps=4, SPLIT_K=2, XVEC=2)),
    ("qmm", 5, 77, 1000, dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KQ=64, num_warps=4, num_stages=3, SPLIT_K=3)),
    ("qmm", 16, 130, 4096, dict(BLOCK_N=128, BLOCK_M=16, BLOCK_KQ=128, num_warps=4, num_stages=4, SPLIT_K=4)),
    ("qmm", 5, 77, 1000, dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KQ=64, num_warps=4, num_stages=3, SPLIT_K=3, XT=1)),
    ("qmm", 40, 130, 4096, dict(BLOCK_N=64, BLOCK_M=64, BLOCK_KQ=64, num_warps=4, num_stages=4, XT=1)),
    ("qmm_asm", 16, 100, 1024, dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KW=32, num_warps=4, num_stages=3, SPLIT_K=4)),
    ("qmm_asm", 3, 100, 1000, dict(BLOCK_N=32, BLOCK_M=16, BLOCK_KW=16, num_warps=4, num_stages=3, SPLIT_K=5)),
    # both activation-tile orientations (XT), whatever this Triton's default is
    ("qmm_asm", 16, 100, 1024, dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KW=32, num_warps=4, num_stages=3, SPLIT_K=4, XT=1)),
    ("qmm_asm", 3, 100, 1000, dict(BLOCK_N=32, BLOCK_M=16, BLOCK_KW=16, num_warps=4, num_stages=3, SPLIT_K=5, XT=1)),
    ("qmm_asm", 11, 130, 1000, dict(BLOCK_N=128, BLOCK_M=16, BLOCK_KW=32, num_warps=8, num_stages=3, SPLIT_K=1, XT=0)),
    # 32- and 64-row tiles (17..64 rows), both orientations
    ("qmm_asm", 21, 100, 1000, dict(BLOCK_N=64, BLOCK_M=32, BLOCK_KW=32, num_warps=4, num_stages=3, SPLIT_K=2, XT=0)),
    ("qmm_asm", 45, 130, 1024, dict(BLOCK_N=128, BLOCK_M=32, BLOCK_KW=32, num_warps=8, num_stages=3, SPLIT_K=2, XT=1)),
    ("qmm_asm", 50, 77, 1000, dict(BLOCK_N=64, BLOCK_M=64, BLOCK_KW=16, num_warps=4, num_stages=4, SPLIT_K=3, XT=1)),
    ("qmm", 29, 77, 1000, dict(BLOCK_N=64, BLOCK_M=32, BLOCK_KQ=256, num_warps=4, num_stages=4, XT=0)),
    # 64- / 128-row tiles (65..256 rows), more than one row tile, both orientations
    ("qmm", 200, 300, 1000, dict(BLOCK_N=128, BLOCK_M=128, BLOCK_KQ=64, num_warps=8, num_stages=3, XT=0)),
    ("qmm", 150, 77, 1000, dict(BLOCK_N=128, BLOCK_M=64, BLOCK_KQ=64, num_warps=8, num_stages=4, XT=1)),
    ("qmm", 100, 130, 4096, dict(BLOCK_N=128, BLOCK_M=128, BLOCK_KQ=128, num_warps=8, num_stages=3, XT=1)),
    ("qmm_asm", 130, 300, 1024, dict(BLOCK_N=256, BLOCK_M=64, BLOCK_KW=32, num_warps=8, num_stages=3, XT=0)),
    ("qmm_asm", 200, 130, 1000, dict(BLOCK_N=128, BLOCK_M=128, BLOCK_KW=32, num_warps=8, num_stages=3, XT=1)),
])
def test_kernel_variants(gpu, bits, kernel, M, N, K, cfg):
    # Tile variants the planner may not pick today (prefetch on/off, eviction hints, K split into
    # slices, some empty): each must be right on its own, with ragged K and N.
    q, scale, bias = make_weight(N, K, bits, seed=K + M)
    x = torch.randn(M, K, device=gpu, dtype=torch.float16)
    run = {"gemv": ck._run_gemv, "qmm": ck._run_qmm, "qmm_asm": ck._run_qmm_asm}[kernel]
    check_close(run(x, q, scale, bias, bits, cfg), x, q, scale, bias, bits)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 16, 300])
def test_cuda_graph_capture_and_replay(gpu, bits, M):
    # Capture in the default ("global") mode, which errors on host synchronisation; replay on
    # new inputs must give exactly what an eager call gives (and what the reference says).
    q, scale, bias = make_weight(512, 1024, bits, seed=5)
    x = torch.randn(M, 1024, device=gpu, dtype=torch.float16)
    ck.linear(x, q, scale, bias, bits)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ck.linear(x, q, scale, bias, bits)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, ck.linear(x, q, scale, bias, bits))
    check_close(y, x, q, scale, bias, bits)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_deterministic_and_thread_safe(gpu, bits):
    shapes = [(1, 256, 512), (16, 512, 256), (200, 128, 512)]
    jobs = []
    for i, (M, N, K) in enumerate(shapes):
        q, scale, bias = make_weight(N, K, bits, seed=20 + i)
        x = torch.randn(M, K, device=gpu, dtype=torch.float16)
        jobs.append((x, q, scale, bias, ck.linear(x, q, scale, bias, bits)))
    torch.cuda.synchronize()
    failures = []

    def worker(t):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for it in range(30):
                    x, q, scale, bias, expect = jobs[(t + it) % len(jobs)]
                    y = ck.linear(x, q, scale, bias, bits)
                    stream.synchronize()
                    if not torch.equal(y, expect):
                        failures.append((t, it))
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    for x, q, scale, bias, expect in jobs:
        check_close(expect, x, q, scale, bias, bits)


@pytest.mark.cuda
def test_declines_what_it_does_not_handle(gpu):
    q, scale, bias = make_weight(64, 128, 8)
    x = torch.randn(2, 128, device=gpu, dtype=torch.float16)
    assert ck.linear(x.float(), q, scale, bias, 8) is None  # fp32 activations: torch path
    assert ck.linear(x, q.cpu(), scale, bias, 8) is None  # mixed devices
    assert ck.linear(x, q, scale, bias, 3) is None  # unknown bit width
    assert ck.linear(x[:, :64], q, scale, bias, 8) is None  # K does not match the weight
    assert ck.linear(x[:0], q, scale, bias, 8) is None  # no rows: torch handles the empty case


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_module_uses_the_kernel(gpu, bits):
    layer = QuantizedLinear(256, 96, bits, device=gpu)
    q, scale, bias = make_weight(96, 256, bits, seed=9)
    layer.weight.data.copy_(q)
    layer.weight_scale.data.copy_(scale)
    layer.bias.data.copy_(bias)
    x = torch.randn(2, 3, 256, device=gpu, dtype=torch.float16)
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y, ck.linear(x, q, scale, bias, bits))
    check_close(y, x, q, scale, bias, bits)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 5, 16, 300])
@pytest.mark.parametrize("N", [384, 4160])  # N <= 4096 takes the split-K decode configs, N > 4096 not
def test_gelu_epilogue_and_pdl_levels(gpu, bits, M, N):
    # act="gelu" rounds the linear output to fp16 and applies the eager-rounded GELU: bit-equal to the
    # GELU kernel on the stored output, on every path (GEMV, tensor-core with and without split-K,
    # dequantize + cuBLAS). Programmatic dependent launch (levels 1 and 2, and 3 / 4: the GEMV's late
    # trigger) changes no bit.
    q, scale, bias = make_weight(N, 512, bits, seed=N + M)
    x = torch.randn(M, 512, device=gpu, dtype=torch.float16)
    plain = ck.linear(x, q, scale, bias, bits)
    check_close(plain, x, q, scale, bias, bits)
    want = ck.gelu_(plain.clone())
    levels = [0, 1, 2, 3, 4] if ck.pdl_supported(gpu) else [0]
    for level in levels:
        got = ck.linear(x, q, scale, bias, bits, act="gelu", pdl=level)
        assert torch.equal(got, want), (level, int((got != want).sum()))
        assert torch.equal(ck.linear(x, q, scale, bias, bits, pdl=level), plain), level


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_gemv_l2_prefetch_under_pdl(gpu, bits):
    # The L2 prefetch before the PDL wait (whole rows, part of them, ragged N) only moves data early.
    if not ck.pdl_supported(gpu):
        pytest.skip("programmatic dependent launch needs sm_90+")
    q, scale, bias = make_weight(77, 1024, bits, seed=3)
    x = torch.randn(1, 1024, device=gpu, dtype=torch.float16)
    base = dict(BLOCK_N=8, BLOCK_KW=64, PREFETCH=True, EV="evict_first", num_warps=4)
    want = ck._run_gemv(x, q, scale, bias, bits, base)
    check_close(want, x, q, scale, bias, bits)
    for frac in (0.1, 0.5, 1.0):
        for act in (0, 1):
            got = ck._run_gemv(x, q, scale, bias, bits, dict(base, L2_FRACTION=frac), act=act, pdl=2)
            assert torch.equal(got, ck.gelu_(want.clone()) if act else want), (frac, act)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_gemv_whole_rows_before_the_pdl_wait(gpu, bits):
    # A program's whole K range as its first tile (ONE_TILE, loaded before the PDL wait): right against
    # float64, and the same bits whichever way it is launched, with and without the GELU epilogue.
    N, K = 300, 4096
    q, scale, bias = make_weight(N, K, bits, seed=5)
    x = torch.randn(1, K, device=gpu, dtype=torch.float16)
    kw = K // (4 if bits == 8 else 8)
    cfg = dict(BLOCK_N=4 if bits == 4 else 2, BLOCK_KW=kw, PREFETCH=True, num_warps=4, XVEC=2, EV="evict_first")
    want = ck._run_gemv(x, q, scale, bias, bits, cfg)
    check_close(want, x, q, scale, bias, bits)
    for level in ([0, 1, 2] if ck.pdl_supported(gpu) else [0]):
        assert torch.equal(ck._run_gemv(x, q, scale, bias, bits, cfg, pdl=level), want), level
        got = ck._run_gemv(x, q, scale, bias, bits, cfg, act=1, pdl=level)
        assert torch.equal(got, ck.gelu_(want.clone())), level


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("pdl", [0, 2])
def test_gemv_vector_x_loads_are_bit_equal(gpu, bits, act, pdl):
    # XVEC (x as one 8-byte load per INT8 weight word, one 16-byte load per INT4 word) and the
    # split-K GEMV against the plain GEMV.
    if pdl and not ck.pdl_supported(gpu):
        pytest.skip("no PDL here")
    N, K = 300, 4096
    q, scale, bias = make_weight(N, K, bits, seed=3)
    x = torch.randn(1, K, device=gpu, dtype=torch.float16)
    base = dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, num_warps=4, EV="evict_first")
    a = 1 if act else 0
    want = ck._run_gemv(x, q, scale, bias, bits, base, act=a, pdl=pdl)
    if not a:
        check_close(want, x, q, scale, bias, bits)
    for xvec in ((1, 2) if bits == 8 else (2,)):
        got = ck._run_gemv(x, q, scale, bias, bits, dict(base, XVEC=xvec), act=a, pdl=pdl)
        assert torch.equal(got, want), xvec
    got = ck._run_gemv(x, q, scale, bias, bits, dict(base, XVEC=2, SPLIT_K=2), act=a, pdl=pdl)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_group_equals_one_weight_at_a_time(gpu, bits, dtype):
    # One launch for up to four weights (ragged shapes, tiles not whole) == _dequantize of each, and
    # == q * scale in float64 rounded once to the dtype.
    shapes = [(300, 1000), (77, 4096), (128, 264), (4096, 16)]
    weights = [make_weight(N, K, bits, seed=N + K)[:2] for N, K in shapes]
    for n in (1, 2, 4):
        got = ck.dequantize_group(weights[:n], bits, dtype)
        assert got is not None and len(got) == n
        for (q, scale), w in zip(weights[:n], got):
            want = ck._dequantize(q, scale, bits, dtype)
            assert w.shape == want.shape and w.dtype == dtype and torch.equal(w, want)
            ref = (unpack_ref(q, bits) * scale.double()[:, None]).to(dtype)
            assert torch.equal(w, ref)
    # not for us: a non-contiguous weight, a float dtype we do not write
    q, scale = weights[0]
    assert ck.dequantize_group([(q[:, :q.shape[1] // 2], scale)], bits, dtype) is None
    assert ck.dequantize_group(weights[:1], bits, torch.float32) is None
