"""CPU kernels (cpu_kernels.py) against float64 math computed here, independently of the code.

Two kinds of checks:
  * exact: integer activations, integer weights, power-of-two scales and integer biases make
    every product and partial sum exactly representable in fp32, so ANY summation order must
    reproduce the float64 result bit for bit; a wrong, missing or doubled term shows up.
  * realistic: random floats and fp16 scales, within the rigorous fp32 accumulation bound
    |err| <= (K + 4) * 2^-24 * (|x| @ |W|^T + |b|)  (K products and sums, scale, bias).
Every SIMD family the CPU has (AMX for INT8 / INT4 from a few rows, AVX-512, AVX2, portable C) and both
algorithms (GEMV for few rows, GEMM for many) are exercised on the same shapes; a family the CPU
lacks is replaced by the best it has. AMX's own error bound (activations as four base-128 int8
digits, exact integer products) is checked separately.
"""
import json
import mmap
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from chatglm6b import cpu_kernels

ROOT = Path(__file__).resolve().parent.parent
ISAS = ["amx", "avx512", "avx2", "generic"]
U = 2.0 ** -24  # fp32 unit roundoff

# (M, K, N): odd K (not a multiple of 16/32/64), N = 1, 3, 17..., a shape that spans several
# GEMM K-blocks (K > 512) and GEMM panels/tiles with remainders.
SHAPES = [(1, 64, 1), (1, 100, 3), (2, 46, 17), (3, 130, 5), (7, 258, 33), (33, 1000, 29),
          (1, 1030, 40), (17, 600, 13), (4, 64, 32), (9, 70, 47)]


@pytest.fixture(scope="module")
def lib():
    assert cpu_kernels.available(), (
        f"CPU kernels failed to build on this machine: {cpu_kernels.kernel_info()['error']}")
    return cpu_kernels


@pytest.fixture
def isa(lib, request):
    """Select a kernel family; an ISA the CPU lacks falls back to the best one it has."""
    got = lib._set_isa(request.param)
    yield got
    lib._set_isa(None)


@pytest.fixture
def path(lib, request):
    """'gemv': every M through the GEMV; 'gemm': every M through the GEMM; 'auto': default."""
    lib._set_gemv_max_m({"gemv": 1 << 30, "gemm": 0, "auto": None}[request.param])
    yield request.param
    lib._set_gemv_max_m(None)


# ---------------------------------------------------------------------------------------
# Independent helpers (SPEC §3), written here on purpose instead of imported from the package.

def pack_int4_spec(q: torch.Tensor) -> torch.Tensor:
    """byte[j] = (q[2j] << 4) | (q[2j+1] & 0xF), as int8."""
    v = q.to(torch.int64)
    byte = ((v[:, 0::2] & 0xF) << 4) | (v[:, 1::2] & 0xF)
    return torch.where(byte >= 128, byte - 256, byte).to(torch.int8)


def unpack_int4_spec(packed: torch.Tensor) -> torch.Tensor:
    u = packed.to(torch.int64) & 0xFF
    hi, lo = u >> 4, u & 0xF
    hi = torch.where(hi >= 8, hi - 16, hi)
    lo = torch.where(lo >= 8, lo - 16, lo)
    return torch.stack((hi, lo), dim=-1).reshape(packed.shape[0], -1)


def reference(x, q_values, scale, bias):
    """float64 x @ (q * scale)^T + bias and the fp32 accumulation error bound for it."""
    w = q_values.double() * (scale.double()[:, None] if scale is not None else 1.0)
    xd = x.double().reshape(-1, x.shape[-1])
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    ref = xd @ w.T + b
    bound = (x.shape[-1] + 4) * U * (xd.abs() @ w.abs().T + b.abs())
    return ref.reshape(*x.shape[:-1], -1), bound.reshape(*x.shape[:-1], -1)


def integer_problem(M, K, N, bits, with_bias, gen):
    lim = 127 if bits == 8 else 7
    q_values = torch.randint(-lim - (bits == 4), lim + 1, (N, K), generator=gen)
    q = q_values.to(torch.int8) if bits == 8 else pack_int4_spec(q_values)
    scale = (2.0 ** torch.randint(-3, 2, (N,), generator=gen)).half()
    bias = torch.randint(-50, 51, (N,), generator=gen).half() if with_bias else None
    x = torch.randint(-4, 5, (M, K), generator=gen).float()
    return x, q, q_values, scale, bias


# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("path", ["gemv", "gemm", "auto"], indirect=True)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_quantized_linear_is_exact_on_integer_data(lib, isa, path, bits, with_bias):
    gen = torch.Generator().manual_seed(1000 * bits + with_bias)
    for M, K, N in SHAPES:
        x, q, q_values, scale, bias = integer_problem(M, K, N, bits, with_bias, gen)
        y = lib.linear(x, q, scale, bias, bits)
        ref, _ = reference(x, q_values, scale, bias)
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert torch.equal(y.double(), ref), f"{isa}/{path} bits={bits} M={M} K={K} N={N}"


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("path", ["gemv", "gemm"], indirect=True)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_random_within_fp32_accumulation_error(lib, isa, path, bits):
    gen = torch.Generator().manual_seed(bits)
    for M, K, N in SHAPES:
        lim = 127 if bits == 8 else 7
        q_values = torch.randint(-lim, lim + 1, (N, K), generator=gen)
        q = q_values.to(torch.int8) if bits == 8 else pack_int4_spec(q_values)
        scale = (torch.rand(N, generator=gen) * 0.02 + 1e-3).half()
        bias = torch.randn(N, generator=gen).half()
        x = torch.randn(M, K, generator=gen) * 3
        x[:, ::13] *= 200  # outlier features, as in the real model's activations
        y = lib.linear(x, q, scale, bias, bits)
        ref, bound = reference(x, q_values, scale, bias)
        if isa == "amx" and M >= amx_min_m(lib, bits):
            bound = amx_bound(x, q_values, scale, ref)
        err = (y.double() - ref).abs()
        assert (err <= bound).all(), f"{isa}/{path} bits={bits} M={M} K={K} N={N}: max err {err.max()}"


def amx_min_m(lib, bits):
    """Rows of x from which the library runs these weights on AMX tiles (its policy, read from it)."""
    return lib.kernel_info().get("amx_min_m", {}).get(f"int{bits}", 1 << 30)


def amx_bound(x, q_values, scale, ref):
    """AMX path: x[m] = s_m * sum_j d_j 128^-j with s_m a power of two <= max|x[m]| / 63.75, so the
    dropped remainder is below 0.5 * 128^-3 * s_m per element; products and sums of the digits
    are exact integers, combined in double and rounded once to fp32 (plus the bias addition)."""
    s = x.double().abs().amax(dim=1, keepdim=True) / 63.75
    w = (q_values.double() * scale.double()[:, None]).abs()
    return 0.5 * 128.0 ** -3 * s * w.sum(dim=1)[None] + 4 * U * ref.abs() + 1e-300


@pytest.mark.parametrize("isa", ["amx"], indirect=True)
@pytest.mark.parametrize("bits", [8, 4])
def test_amx_digits_are_finer_than_fp32(lib, isa, bits):
    """With outliers 10^4 above the typical activation the AMX result is still within the fp32
    accumulation bound, and far inside it for ordinary data (K = 70000 spans two exact int32 chunks;
    INT4: K = 70 leaves a tail of 3 bytes per row after 32-byte blocks, N = 40 a part-filled row block)."""
    gen = torch.Generator().manual_seed(11)
    lim = 127 if bits == 8 else 7
    for M, K, N in [(4, 4096, 64), (6, 70000, 5), (200, 1000, 40), (9, 70, 40), (33, 16384, 33)]:
        q_values = torch.randint(-lim - (bits == 4), lim + 1, (N, K), generator=gen)
        q = q_values.to(torch.int8) if bits == 8 else pack_int4_spec(q_values)
        scale = (torch.rand(N, generator=gen) * 0.02 + 1e-3).half()
        x = torch.randn(M, K, generator=gen)
        x[:, 7] *= 1e4
        ref, bound = reference(x, q_values, scale, None)
        lib._set_amx_min_m(1)  # (every M on AMX here)
        try:
            err = (lib.linear(x, q, scale, None, bits).double() - ref).abs()
        finally:
            lib._set_amx_min_m(None)
        assert (err <= bound).all(), f"{isa} {M, K, N}"
        if isa == "amx":  # (a CPU without AMX runs this on its best family: the fp32 bound above)
            assert (err <= amx_bound(x, q_values, scale, ref)).all(), f"{M, K, N}"


@pytest.mark.parametrize("isa", ["amx"], indirect=True)
@pytest.mark.parametrize("bits", [8, 4])
def test_amx_exact_on_integer_data_at_every_row_count(lib, isa, bits):
    """AMX tiles for every M (also below the default switch-over: 1-3 rows use narrower tiles), each
    shape of SHAPES plus INT4 rows of odd byte counts and, at K = 16384, rows of x split into several
    token blocks (the last one odd): exact on integer data, as the other paths."""
    gen = torch.Generator().manual_seed(13 + bits)
    lib._set_amx_min_m(1)
    try:
        for M, K, N in SHAPES + [(5, 66, 70), (12, 2050, 31), (37, 16384, 40)]:
            x, q, q_values, scale, bias = integer_problem(M, K, N, bits, True, gen)
            ref, _ = reference(x, q_values, scale, bias)
            assert torch.equal(lib.linear(x, q, scale, bias, bits).double(), ref), f"{isa} bits={bits} {M, K, N}"
    finally:
        lib._set_amx_min_m(None)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [8, 4])
def test_non_finite_activations_propagate(lib, isa, bits):
    """A NaN or inf in x must reach the outputs of its row (AMX cannot encode them as digits and
    hands such calls to the fp32 kernels), and leave the other rows alone."""
    gen = torch.Generator().manual_seed(12)
    x, q, q_values, scale, bias = integer_problem(max(6, amx_min_m(lib, bits) if isa == "amx" else 6), 96, 10,
                                                  bits, True, gen)
    x[1, 5] = float("nan")
    x[4, 0] = float("inf")
    y = lib.linear(x, q, scale, bias, bits)
    ref, _ = reference(x, q_values, scale, bias)
    assert y[1].isnan().all()
    assert (y[4].isinf() | y[4].isnan()).all()
    keep = [0, 2, 3] + list(range(5, x.shape[0]))
    assert torch.equal(y[keep].double(), ref[keep])


@pytest.mark.parametrize("bits", [8, 4])
def test_leading_dims_batches_and_noncontiguous_input(lib, bits):
    gen = torch.Generator().manual_seed(7)
    K, N = 96, 19
    for lead in [(1,), (2,), (7,), (33,), (3, 5), (2, 3, 4)]:
        x, q, q_values, scale, bias = integer_problem(int(torch.tensor(lead).prod()), K, N, bits, True, gen)
        x = x.reshape(*lead, K)
        ref, _ = reference(x, q_values, scale, bias)
        assert torch.equal(lib.linear(x, q, scale, bias, bits).double(), ref)
    # sequence-first activations viewed batch-first, and a strided slice of the features
    x, q, q_values, scale, bias = integer_problem(12, K, N, bits, True, gen)
    xt = x.reshape(4, 3, K).transpose(0, 1)  # [3, 4, K], not contiguous
    assert not xt.is_contiguous()
    ref, _ = reference(xt.contiguous(), q_values, scale, bias)
    assert torch.equal(lib.linear(xt, q, scale, bias, bits).double(), ref)
    wide = torch.randint(-4, 5, (5, 2 * K), generator=gen).float()
    ref, _ = reference(wide[:, ::2].contiguous(), q_values, scale, bias)
    assert torch.equal(lib.linear(wide[:, ::2], q, scale, bias, bits).double(), ref)


def test_weight_rows_with_a_stride_are_read_in_place(lib):
    gen = torch.Generator().manual_seed(3)
    x, q, q_values, scale, bias = integer_problem(5, 70, 9, 8, True, gen)
    big = torch.zeros(9, 128, dtype=torch.int8)
    big[:, :70] = q
    view = big[:, :70]  # rows 128 bytes apart
    assert not view.is_contiguous()
    ref, _ = reference(x, q_values, scale, bias)
    assert torch.equal(lib.linear(x, view, scale, bias, 8).double(), ref)


def test_weights_in_a_read_only_mapping(lib, tmp_path):
    gen = torch.Generator().manual_seed(4)
    for bits in (8, 4):
        x, q, q_values, scale, bias = integer_problem(40, 200, 30, bits, True, gen)
        f = tmp_path / f"w{bits}.bin"
        f.write_bytes(q.numpy().tobytes())
        with open(f, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the buffer is not writable
            q_ro = torch.frombuffer(mm, dtype=torch.int8).view(q.shape)
        ref, _ = reference(x, q_values, scale, bias)
        for m in (1, 40):  # GEMV and GEMM read the mapping; a write would crash the process
            assert torch.equal(lib.linear(x[:m], q_ro, scale, bias, bits).double(), ref[:m])
        del q_ro


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations_are_computed_in_fp32(lib, dtype):
    gen = torch.Generator().manual_seed(5)
    x, q, q_values, scale, bias = integer_problem(6, 80, 11, 8, True, gen)
    y = lib.linear(x.to(dtype), q, scale, bias, 8)
    ref, _ = reference(x, q_values, scale, bias)
    assert y.dtype == dtype
    assert torch.equal(y, ref.to(dtype))  # exact in fp32, so one rounding to `dtype`


def test_fp32_and_bf16_scales_and_bias(lib):
    gen = torch.Generator().manual_seed(6)
    x, q, q_values, scale, bias = integer_problem(9, 64, 7, 8, True, gen)
    ref, _ = reference(x, q_values, scale, bias)
    for dt in (torch.float32, torch.bfloat16):
        assert torch.equal(lib.linear(x, q, scale.to(dt), bias.to(dt), 8).double(), ref)


def test_results_do_not_depend_on_thread_count(lib):
    gen = torch.Generator().manual_seed(8)
    q = torch.randint(-127, 128, (300, 700), generator=gen).to(torch.int8)
    scale = torch.rand(300, generator=gen).half()
    old = torch.get_num_threads()
    try:
        for M in (1, 50):
            x = torch.randn(M, 700, generator=gen)
            torch.set_num_threads(1)
            one = lib.linear(x, q, scale, None, 8)
            torch.set_num_threads(2)
            two = lib.linear(x, q, scale, None, 8)
            assert torch.equal(one, two)
    finally:
        torch.set_num_threads(old)


def test_autograd_inputs_are_left_to_torch(lib):
    q = torch.ones(4, 8, dtype=torch.int8)
    x = torch.ones(2, 8, requires_grad=True)
    assert lib.linear(x, q, torch.ones(4).half(), None, 8) is None
    assert lib.fp16_linear(x, torch.ones(4, 8).half()) is None
    with torch.no_grad():
        assert lib.fp16_linear(x, torch.ones(4, 8).half()) is not None


def test_empty_batch(lib):
    q = torch.ones(4, 8, dtype=torch.int8)
    y = lib.linear(torch.empty(0, 8), q, torch.ones(4).half(), None, 8)
    assert y.shape == (0, 4)


def test_wrong_input_width_says_what_is_expected(lib):
    q = torch.ones(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="3 features but the weight expects 8"):
        lib.linear(torch.ones(2, 3), q, torch.ones(4).half(), None, 8)
    with pytest.raises(ValueError, match="16"):  # INT4: 8 packed bytes hold 16 columns
        lib.linear(torch.ones(2, 8), q, torch.ones(4).half(), None, 4)


def test_inputs_the_kernels_do_not_handle_return_none(lib):
    q = torch.ones(4, 8, dtype=torch.int8)
    s = torch.ones(4).half()
    assert lib.linear(torch.ones(2, 8, dtype=torch.float64), q, s, None, 8) is None
    assert lib.linear(torch.ones(2, 8), q.t().contiguous().t(), s, None, 8) is None  # column-major weight
    assert lib.fp16_linear(torch.ones(2, 8), torch.ones(4, 8)) is None  # fp32 weight
    assert lib.linear(torch.ones(2, 8), q.view(torch.uint8), s, None, 8) is None  # unsigned INT8


def test_int4_bytes_stored_as_uint8(lib):
    gen = torch.Generator().manual_seed(12)
    x, q, q_values, scale, bias = integer_problem(3, 64, 5, 4, True, gen)
    ref, _ = reference(x, q_values, scale, bias)
    assert torch.equal(lib.linear(x, q.view(torch.uint8), scale, bias, 4).double(), ref)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("path", ["gemv", "gemm"], indirect=True)
def test_fp16_linear(lib, isa, path):
    gen = torch.Generator().manual_seed(9)
    for M, K, N in SHAPES:
        w_int = torch.randint(-1000, 1001, (N, K), generator=gen)
        x = torch.randint(-4, 5, (M, K), generator=gen).float()
        ref, _ = reference(x, w_int, None, None)
        assert torch.equal(lib.fp16_linear(x, w_int.half()).double(), ref), f"{isa}/{path} {M, K, N}"
        # realistic values, including fp16 subnormals, against the accumulation bound
        w = torch.randn(N, K, generator=gen).half()
        w[:, ::7] *= 1e-4
        x = torch.randn(M, K, generator=gen)
        b = torch.randn(N, generator=gen)
        ref, bound = reference(x, w, None, b)
        err = (lib.fp16_linear(x, w, b).double() - ref).abs()
        assert (err <= bound).all(), f"{isa}/{path} {M, K, N}: max err {err.max()}"


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("path", ["gemv", "gemm"], indirect=True)
def test_fp16_linear_infinities(lib, isa, path):
    w = torch.ones(5, 40).half()
    w[1, 3] = float("inf")
    w[2, 39] = float("-inf")
    w[3, 0], w[3, 1] = float("inf"), float("-inf")
    x = torch.ones(3, 40)
    ref = x.double() @ w.double().T  # inf, -inf, and inf + -inf = nan in float64 too
    torch.testing.assert_close(lib.fp16_linear(x, w).double(), ref, rtol=0, atol=0, equal_nan=True)


def test_quantized_linear_dispatch_uses_the_kernels(lib):
    from chatglm6b.quantization import QuantizedLinear

    gen = torch.Generator().manual_seed(10)
    x, q, q_values, scale, bias = integer_problem(3, 48, 6, 8, True, gen)
    layer = QuantizedLinear(48, 6, 8)
    layer.weight.data, layer.weight_scale.data, layer.bias.data = q, scale, bias
    ref, _ = reference(x, q_values, scale, bias)
    with torch.no_grad():
        assert torch.equal(layer(x).double(), ref)


def _cpuinfo_fields():
    """The first CPU's fields in Linux's /proc/cpuinfo: independent of the kernels' CPUID reading."""
    first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in fields.items()}


def _cpuinfo_amd_family():
    """(vendor is AMD, CPU family, has avx512f) (an ARM CPU has no vendor_id)."""
    fields = _cpuinfo_fields()
    return (fields.get("vendor_id") == "AuthenticAMD", int(fields.get("cpu family", "-1")),
            "avx512f" in fields.get("flags", "").split())


def test_gemv_switch_over_follows_the_fma_width(lib):
    """Zen 4 (AMD family 25 with AVX-512: 512-bit FMAs on 256-bit units) keeps INT8 / FP16 on the GEMV
    to 200 / 96 rows (bench_cpu_kernels.py --crossover there); other AVX-512 CPUs switch at 28."""
    amd, family, avx512 = _cpuinfo_amd_family()
    halves = amd and family == 25
    assert bool(lib._built().cg_avx512_halves()) == halves
    if lib._set_isa("avx512") == "avx512":  # (a CPU without AVX-512 falls back to its best family)
        try:
            info = lib.kernel_info()
            assert info["avx512_halves"] == halves
            assert info["gemv_max_m"] == ({"int8": 200, "int4": 28, "fp16": 96} if halves else
                                          {"int8": 28, "int4": 28, "fp16": 28})
        finally:
            lib._set_isa(None)
    else:
        assert not avx512


@pytest.fixture(params=["vnni", "fp32"])
def int4_gemv(lib, request):
    """Batch-1 INT4 rows through the VNNI GEMV (where the CPU has it) or the fp32 GEMV."""
    lib._set_int4_vnni_max_m(None if request.param == "vnni" else 0)
    yield request.param
    lib._set_int4_vnni_max_m(None)


def test_int4_vnni_gemv_follows_the_cpu(lib):
    """Batch-1 INT4 takes the VNNI GEMV exactly where /proc/cpuinfo lists avx512_vnni and the AVX-512
    kernels are in use (also with AMX: batch 1 never runs on tiles), or avx_vnni with the AVX2 ones."""
    flags = _cpuinfo_fields().get("flags", "").split()
    vnni512, vnni256 = "avx512_vnni" in flags, "avx_vnni" in flags
    isa = lib.kernel_info()["isa"]
    assert lib.kernel_info()["int4_vnni_max_m"] == (
        1 if vnni512 and isa in ("avx512", "amx") else 3 if vnni256 and isa == "avx2" else 0)
    try:
        if lib._set_isa("avx512") == "avx512":
            assert lib.kernel_info()["int4_vnni_max_m"] == (1 if vnni512 else 0)
        if lib._set_isa("avx2") == "avx2":  # (1-3 rows: the 256-bit multiply-adds have two ports)
            assert lib.kernel_info()["int4_vnni_max_m"] == (3 if vnni256 else 0)
        lib._set_isa("generic")
        assert lib.kernel_info()["int4_vnni_max_m"] == 0
        lib._set_isa(None)
        lib._set_int4_vnni_max_m(0)
        assert lib.kernel_info()["int4_vnni_max_m"] == 0
    finally:
        lib._set_isa(None)
        lib._set_int4_vnni_max_m(None)


# one row of x (and 2-3, which the AVX-VNNI GEMV takes too): K past one 128-column step, ragged in its
# last 64 bytes, a single byte, long rows in several 4096-column slices (the last ragged), more rows than
# a 64-row group
INT4_ROWS = [(1, 64, 5), (1, 2, 3), (1, 126, 7), (1, 130, 9), (1, 4096, 70), (1, 8192 + 130, 33),
             (1, 16384, 131), (1, 1000, 1), (2, 130, 9), (3, 4096 + 64, 66)]


@pytest.mark.parametrize("isa", ["avx512", "avx2"], indirect=True)
@pytest.mark.parametrize("with_bias", [True, False])
def test_int4_batch1_exact_on_integer_data(lib, isa, int4_gemv, with_bias):
    gen = torch.Generator().manual_seed(31 + with_bias)
    for M, K, N in INT4_ROWS:
        x, q, q_values, scale, bias = integer_problem(M, K, N, 4, with_bias, gen)
        ref, _ = reference(x, q_values, scale, bias)
        assert torch.equal(lib.linear(x, q, scale, bias, 4).double(), ref), f"{isa} {int4_gemv} {M, K, N}"


@pytest.mark.parametrize("isa", ["avx512", "avx2"], indirect=True)
def test_int4_batch1_digits_are_finer_than_fp32(lib, isa, int4_gemv):
    """Random data with outliers 10^4 above the typical activation: within the fp32 accumulation bound
    on either GEMV, and the VNNI one (x as four base-128 digits, exact integer sums, one rounding)
    within the digit bound of the AMX kernels, far inside it."""
    gen = torch.Generator().manual_seed(37)
    for M, K, N in INT4_ROWS:
        q_values = torch.randint(-8, 8, (N, K), generator=gen)
        scale = (torch.rand(N, generator=gen) * 0.02 + 1e-3).half()
        bias = torch.randn(N, generator=gen).half()
        x = torch.randn(M, K, generator=gen)
        x[:, 1] *= 1e4
        ref, bound = reference(x, q_values, scale, bias)
        err = (lib.linear(x, pack_int4_spec(q_values), scale, bias, 4).double() - ref).abs()
        assert (err <= bound).all(), f"{isa} {int4_gemv} {M, K, N}: max err {err.max()}"
        if int4_gemv == "vnni" and lib.kernel_info()["int4_vnni_max_m"]:
            assert (err <= amx_bound(x, q_values, scale, ref) + 4 * U * bias.double().abs()).all(), f"{M, K, N}"


@pytest.mark.parametrize("isa", ["avx512", "avx2"], indirect=True)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e-38])
def test_int4_batch1_non_finite_or_tiny_rows(lib, isa, int4_gemv, bad):
    """A row the digits cannot encode (NaN, inf; all elements tiny, 1/s would overflow) goes to the
    fp32 GEMV: NaN / inf reach every output as in fp32, tiny values give fp32's products."""
    gen = torch.Generator().manual_seed(41)
    q_values = torch.randint(-8, 8, (6, 256), generator=gen)
    scale = torch.full((6,), 0.5).half()
    x = torch.zeros(1, 256)
    x[0, 3] = bad
    x[0, 200] = 1e-38 if bad == 1e-38 else 1.0
    y = lib.linear(x, pack_int4_spec(q_values), scale, None, 4).double()
    ref = x.double() @ (q_values.double() * 0.5).T
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert torch.allclose(y[finite], ref[finite], rtol=1e-6, atol=0), f"{int4_gemv} {bad}"


# ---------------------------------------------------------------------------------------
# Building, caching and failure handling, each in a fresh process.

PROBE = textwrap.dedent("""
    import json, sys, types, warnings
    pkg = types.ModuleType("chatglm6b"); pkg.__path__ = [sys.argv[1]]; sys.modules["chatglm6b"] = pkg
    import time
    if len(sys.argv) > 2:
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # start together with a sibling
    import torch
    from chatglm6b import cpu_kernels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = cpu_kernels.available()
        ok_again = cpu_kernels.available()
    from chatglm6b.quantization import quantized_linear
    x = torch.arange(12.0).reshape(2, 6)
    q = torch.arange(-9, 9, dtype=torch.int8).reshape(3, 6)
    y = quantized_linear(x, q, torch.tensor([1.0, 0.5, 2.0]).half(), None, 8)
    expected = [[sum(x[m, k].item() * q[n, k].item() * s for k in range(6)) for n, s in enumerate([1.0, 0.5, 2.0])] for m in range(2)]
    info = cpu_kernels.kernel_info()
    print(json.dumps({"ok": ok, "ok_again": ok_again, "warnings": [str(w.message) for w in caught],
                      "correct": y.tolist() == expected, "compiled": info["compiled_in_this_process"],
                      "library": info["library"], "error": info["error"]}))
""")


def run_probe(cache, extra_env=None, start_at=None):
    env = dict(os.environ, CHATGLM_CACHE_DIR=str(cache), **(extra_env or {}))
    env.pop("CHATGLM_KERNELS", None)
    args = [sys.executable, "-c", PROBE, str(ROOT)] + ([str(start_at)] if start_at else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def probe_result(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_second_load_uses_the_cache(tmp_path):
    first = probe_result(run_probe(tmp_path))
    assert first["ok"] and first["correct"] and first["compiled"] and not first["warnings"]
    lib_path = Path(first["library"])
    assert lib_path.parent == tmp_path
    stamp = lib_path.stat()
    second = probe_result(run_probe(tmp_path))
    assert second["ok"] and second["correct"] and not second["compiled"]
    assert second["library"] == first["library"]
    after = lib_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == [lib_path.name]  # no temporary files left


def test_a_build_prunes_libraries_older_than_30_days(tmp_path):
    old, recent, other = (tmp_path / "cpu_kernels-0000000000000000dead.so",
                          tmp_path / "cpu_kernels-0000000000000000beef.so", tmp_path / "notes.txt")
    for f in (old, recent, other):
        f.write_bytes(b"x")
    month = time.time() - 31 * 86400
    os.utime(old, (month, month))
    os.utime(other, (month, month))
    res = probe_result(run_probe(tmp_path))
    assert res["ok"] and res["compiled"]
    assert not old.exists()  # stale library of another version: removed
    assert recent.exists() and other.exists()  # recent libraries and foreign files are left alone
    assert Path(res["library"]).exists()


def test_missing_compiler_warns_once_and_falls_back(tmp_path):
    cache = tmp_path / "empty-cache"
    res = probe_result(run_probe(cache, {"CC": str(tmp_path / "no-such-compiler")}))
    assert res["ok"] is False and res["ok_again"] is False
    assert len(res["warnings"]) == 1, res["warnings"]
    assert "no-such-compiler" in res["warnings"][0] and "torch path" in res["warnings"][0]
    assert res["correct"]  # the torch path still computes the layer
    assert not cache.exists() or not any(cache.iterdir())


def test_failing_compiler_warns_once_and_falls_back(tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "fakecc 1.0"; exit 0; fi\n'
                    'echo "fakecc: internal error" >&2\nexit 3\n')
    fake.chmod(0o755)
    res = probe_result(run_probe(tmp_path / "cache", {"CC": str(fake)}))
    assert res["ok"] is False and len(res["warnings"]) == 1
    assert "fakecc: internal error" in res["warnings"][0]
    assert res["correct"]
    assert not any((tmp_path / "cache").iterdir())  # temporary files were removed


def test_two_processes_compiling_at_once_get_one_working_library(tmp_path):
    start = time.time() + 3.0  # both interpreters are up by then
    procs = [run_probe(tmp_path, start_at=start) for _ in range(2)]
    results = [probe_result(p) for p in procs]
    assert all(r["ok"] and r["correct"] and not r["warnings"] for r in results)
    assert results[0]["library"] == results[1]["library"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [Path(results[0]["library"]).name]
    third = probe_result(run_probe(tmp_path))
    assert third["ok"] and third["correct"] and not third["compiled"]


def test_import_compiles_nothing(tmp_path):
    env = dict(os.environ, CHATGLM_CACHE_DIR=str(tmp_path / "cache"))
    code = ("import sys, types; pkg = types.ModuleType('chatglm6b'); pkg.__path__ = [sys.argv[1]]; "
            "sys.modules['chatglm6b'] = pkg; from chatglm6b import cpu_kernels, quantization")
    subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, check=True, timeout=300)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_read_bandwidth_probe_reads_every_word(lib, isa):
    gen = torch.Generator().manual_seed(11)
    data = torch.randint(-2**62, 2**62, ((3 * 262144 + 320) // 8,), generator=gen, dtype=torch.int64)
    expected = sum(v % 2**64 for v in data.tolist()) % 2**64
    assert lib._read_bytes(data) == expected


def test_cross_arch_driver_on_the_portable_path():
    """tools/check_cross_arch.py (which runs the kernels built for aarch64 under qemu-user) builds the
    same standalone driver for this machine and runs it on the portable C path (what ARM builds):
    every case within 2e-6 of the float64 reference. Keeps the tool honest between ARM runs."""
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "check_cross_arch.py"), "--native", "--isa", "0"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "54 of 54 cases within 2e-06" in res.stdout and "isa=generic" in res.stdout
