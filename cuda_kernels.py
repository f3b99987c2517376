"""Weight-only INT8 / INT4 linear layers on NVIDIA GPUs, as Triton kernels.

Triton compiles each kernel the first time it runs, for the GPU that is present (sm_75 and
newer; tuned and tested on sm_90), so nothing ships as a binary and no CUDA toolkit is needed
at install time. `linear` picks one of four paths from the number of activation rows M
(`_plan`; tile sizes measured on an H100, benchmarks/results/cuda_kernels.md):

* M == 1 (greedy decode): `_gemv_kernel` on the CUDA cores (or, opt-in with CHATGLM_MMA_GEMV=1 on
  sm_80+, the tensor-core GEMV of cuda_mma.py, compiled by NVRTC; slower on the H100, see there).
  Every weight byte is read once with 16-byte loads (evict-first: the weights are streamed, x stays cached). Each 32-bit word of
  four int8 (or eight int4) values becomes exact fp32 values through byte-permute / LOP3
  tricks in inline PTX (the value lands under a float exponent; one subtraction removes the
  offset), which is cheaper than the int-to-float conversion unit, then one FMA per value. On the
  ChatGLM shapes on sm_90 (`_GEMV_SHAPE_CFG`) the four fp16 activations of a word come as one
  8-byte load (`XVEC`): four 2-byte loads per word kept the L1 busier than the weight stream.
* 2 <= M <= 16 (batched decode): tensor cores with the weight as the A operand
  (yᵀ = W·xᵀ), so one read of a weight tile serves all rows: `_qmm_asm_kernel` (the same bit
  tricks, fp16 activations) or `_qmm_kernel` (plain conversion; bf16 or unaligned K). Where
  the output has few row blocks, K is split over programs and `_splitk_reduce_kernel` sums
  the fp32 partials in a fixed order.
* 17 <= M <= 64 (short prompts, batches of 17-64): the same two kernels with 32- or 64-row
  tiles (`_MID_CFG`: INT4 on `_qmm_asm_kernel` with a K split, INT8 on `_qmm_kernel`).
* 65 <= M <= 128 (batches of 65-128, short prompts): INT8 with 64- / 128-row tiles of `_qmm_kernel`
  (`_WIDE_CFG`, measured faster there); INT4 as below.
* M > 128 (and INT4 from 65): the weight is dequantized into a per-call fp16 buffer
  (`_dequant_kernel`) and multiplied by cuBLAS, which measured faster than every fused Triton
  GEMM tile tried.

Epilogue and launch options (`linear(..., act="gelu", pdl=...)`, used by the CUDA-graph decode step
in fast_decode.py): the eager-rounded tanh GELU can run in the epilogue (after rounding to x's
dtype, so bit-equal to the separate `gelu_` kernel), and on sm_90+ the decode kernels can take part
in programmatic dependent launch: they let the next kernel launch early and, launched so themselves,
wait (griddepcontrol) before touching activations; the GEMV loads its first weight tile (optionally
also an L2 prefetch of its rows, `L2_FRACTION`) before that wait. Prompts of >= DEQUANT_CHUNK_MIN_M
rows dequantize large weights in slices (peak memory).

Numerics: products x·q are exact in fp32, sums are fp32, the per-row scale and the bias are
applied in fp32 and the result is rounded once to x's dtype (the dequantize path rounds the
weight to x's dtype first, as the torch reference does).

CUDA graphs and threads: once a shape has run outside capture (the first call compiles),
`linear` can be captured. It does no host synchronisation and no .item(); it allocates its
output and, on the split-K decode configurations, a small fp32 partial buffer
[SPLIT_K, M, N] (prefill: the dequantized weight). These come from PyTorch's caching
allocator per call (the graph's private pool under capture) and are never shared between
calls, so concurrent calls from several threads or streams are safe.

Triton is imported with importlib inside functions: Hugging Face's remote-code loader refuses
a module whose plain ``import`` names a package that is not installed, and this module must
import (and `available()` answer False) on machines without Triton or a GPU.
"""
from __future__ import annotations  # kernel annotations stay strings until _build() binds `tl`

import atexit
import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import threading
import warnings
from types import SimpleNamespace
from typing import Optional

import torch

from .cuda_mma import available as _mma_available, capability as _capability, config_for as _mma_config, \
    gemv as _mma_gemv, supports as _mma_supports, weight_ok as _mma_weight_ok

__all__ = ["available", "warm_up", "linear", "gelu_", "pdl_supported", "launch_options", "jit", "jit_helper",
           "jit_helpers", "compile_ahead", "compiling_ahead", "ahead_workers",
           "COMPILE_OPTIONS"]

tl = None  # triton.language; bound by _build(). The kernels below read it as a module global.
_gdc = None  # triton.language.extra.cuda (grid dependency control), bound by _build()
_libdevice = None  # CUDA libdevice wrappers (tanhf), bound by _build()
_USE_LIBDEVICE = False
_PDL_IMPORTED = False

_LOCK = threading.Lock()
_KERNELS = None
_AVAILABLE: Optional[bool] = None
_BROKEN = set()  # (path, bits, dtype, device) whose compile or launch failed: the torch path runs
# Raise kernel errors instead of falling back to the torch path (tests and benchmarks set it).
STRICT = os.environ.get("CHATGLM_CUDA_STRICT", "0") == "1"


def strict() -> bool:
    """STRICT as it is now (for other modules: tests switch the module attribute)."""
    return STRICT


# Programmatic dependent launch (sm_90+): a kernel launched with it may start while the previous
# one finishes; it waits (griddepcontrol.wait) before touching anything the previous kernels wrote.
# Used by the CUDA-graph decode step (fast_decode.py); CHATGLM_PDL=0 turns it off.
PDL = os.environ.get("CHATGLM_PDL", "1").strip().lower() not in ("0", "false", "no", "off")
_PDL_OK = {}  # device index -> bool
_INT32_MAX = 2**31 - 1

# ---------------------------------------------------------------------------------------------
# Tile configurations, chosen by measurement on an H100 (benchmarks/results/cuda_kernels.md).
# BLOCK_N: weight rows per program; BLOCK_KW: 32-bit words of a weight row per step (4 int8 or
# 8 int4 values each); BLOCK_KQ: int8 bytes of a weight row per step; BLOCK_M: activation rows.
# "small_n" entries serve N <= _SMALL_N (few row blocks: other tiles or a K split fill the GPU).
_SMALL_N = 4096
_BIG_K = 8192
_GEMV_CFG = {  # M == 1, _gemv_kernel; key (bits, N <= _SMALL_N, K >= _BIG_K)
    (8, False, False): dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, EV="evict_first", num_warps=4),
    (8, False, True): dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, EV="evict_first", num_warps=4),
    (8, True, False): dict(BLOCK_N=4, BLOCK_KW=256, PREFETCH=True, EV="evict_first", num_warps=4),
    (8, True, True): dict(BLOCK_N=4, BLOCK_KW=256, PREFETCH=True, EV="evict_first", num_warps=4),
    (4, False, False): dict(BLOCK_N=16, BLOCK_KW=128, PREFETCH=False, EV="evict_first", num_warps=4, num_stages=4),
    (4, False, True): dict(BLOCK_N=16, BLOCK_KW=128, PREFETCH=False, EV="evict_first", num_warps=4, num_stages=4),
    (4, True, False): dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=False, EV="evict_first", num_warps=4),
    (4, True, True): dict(BLOCK_N=16, BLOCK_KW=128, PREFETCH=True, num_warps=4),
}
# Per-shape M == 1 configs, key ((major, minor) compute capability, bits, N, K); they override
# _GEMV_CFG on that architecture only (other GPUs keep the generic entries above). Chosen by timing
# the whole CUDA-graph decode step with PDL (benchmarks/bench_gpu.py --sweep-linear 8:1 / 4:1).
_GEMV_SHAPE_CFG = {
    ((9, 0), 8, 12288, 4096): dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, EV="evict_first", XVEC=2, num_warps=4),
    ((9, 0), 8, 4096, 4096): dict(BLOCK_N=4, BLOCK_KW=256, PREFETCH=True, EV="evict_first", XVEC=2, num_warps=4),
    ((9, 0), 8, 16384, 4096): dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, EV="evict_first", XVEC=2, num_warps=4),
    ((9, 0), 8, 4096, 16384): dict(BLOCK_N=4, BLOCK_KW=256, PREFETCH=True, EV="evict_first", XVEC=2, num_warps=4),
    # INT4 with 16-byte activation loads (bench_gpu.py --sweep-linear 4:1): 2.379 -> 2.175 ms/token
    ((9, 0), 4, 12288, 4096): dict(BLOCK_N=16, BLOCK_KW=64, PREFETCH=True, EV="evict_first", XVEC=2, num_warps=4),
    ((9, 0), 4, 4096, 4096): dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=False, EV="evict_first", XVEC=2, num_warps=8),
    ((9, 0), 4, 16384, 4096): dict(BLOCK_N=16, BLOCK_KW=64, PREFETCH=True, EV="evict_first", XVEC=2, num_warps=4),
    ((9, 0), 4, 4096, 16384): dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, EV="evict_first", XVEC=2, num_warps=4),
}
_DECODE_CFG = {  # 2 <= M <= 16 (and M == 1 when rows are not whole words); key (bits, N <= _SMALL_N)
    # "asm" (_qmm_asm_kernel) needs fp16 activations and whole words, else _DECODE_PLAIN_CFG runs.
    # SPLIT_K > 1 (few row blocks) adds a per-call fp32 buffer [SPLIT_K, M, N] and a reduce kernel.
    (8, False): ("plain", dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KQ=128, num_warps=4, num_stages=4)),
    (8, True): ("plain", dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KQ=256, num_warps=4, num_stages=3, SPLIT_K=4)),
    (4, False): ("asm", dict(BLOCK_N=128, BLOCK_M=16, BLOCK_KW=32, num_warps=8, num_stages=3, SPLIT_K=2)),
    (4, True): ("asm", dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KW=32, num_warps=4, num_stages=3, SPLIT_K=4)),
}
# Per-shape 2 <= M <= 16 entries (kind, config), key as _GEMV_SHAPE_CFG; they override _DECODE_CFG
# on that architecture only. Chosen by timing the whole batch-16 CUDA-graph decode step
# (benchmarks/bench_gpu.py --sweep-linear 8:16).
_DECODE_SHAPE_CFG = {
    # INT8, the two N = 4096 shapes: narrower tiles, 2 warps (3.998 -> 3.836 ms per batch-16 step)
    ((9, 0), 8, 4096, 4096): ("plain", dict(BLOCK_N=32, BLOCK_M=16, BLOCK_KQ=256, num_warps=2, num_stages=3, SPLIT_K=4)),
    ((9, 0), 8, 4096, 16384): ("plain", dict(BLOCK_N=32, BLOCK_M=16, BLOCK_KQ=256, num_warps=2, num_stages=3, SPLIT_K=4)),
    # INT4 query_key_value: 64-row tiles, 4 warps (3.824 -> 3.792 ms)
    ((9, 0), 4, 12288, 4096): ("asm", dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KW=32, num_warps=4, num_stages=3, SPLIT_K=2)),
}
_DECODE_PLAIN_CFG = {  # fallback of an "asm" entry (bf16 activations, K not whole words)
    (4, False): dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KQ=64, num_warps=4, num_stages=4, SPLIT_K=4),
    (4, True): dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KQ=128, num_warps=4, num_stages=3, SPLIT_K=4),
}
_MID_MAX_M = 64
_MID_CFG = {  # 16 < M <= _MID_MAX_M (short prompts, batches of 17-64); key (bits, M <= 32), kinds as _DECODE_CFG
    # Chosen on an H100 (Triton 3.6) by timing the whole CUDA-graph decode step at batch 32 and 64
    # (benchmarks/results/gpu.md, twelfth round): INT4 12.89 -> 6.08 and 15.39 -> 8.34 ms per step
    # against the former 64 x 64 tile of _qmm_kernel, which INT8 keeps above 32 rows (best measured).
    (8, True): ("plain", dict(BLOCK_N=64, BLOCK_M=32, BLOCK_KQ=256, num_warps=4, num_stages=4)),
    (8, False): ("plain", dict(BLOCK_N=64, BLOCK_M=64, BLOCK_KQ=128, num_warps=4, num_stages=4)),
    (4, True): ("asm", dict(BLOCK_N=64, BLOCK_M=32, BLOCK_KW=32, num_warps=4, num_stages=3, SPLIT_K=2)),
    (4, False): ("asm", dict(BLOCK_N=128, BLOCK_M=32, BLOCK_KW=32, num_warps=8, num_stages=3, SPLIT_K=2)),
}
_MID_PLAIN_CFG = {  # fallback of an "asm" entry (bf16 activations, K not whole words)
    4: dict(BLOCK_N=64, BLOCK_M=64, BLOCK_KQ=64, num_warps=4, num_stages=4),
}
# _MID_MAX_M < M <= _WIDE_MAX_M (batches of 65-128, prompts of that many tokens): INT8 runs tiles again
# (they beat dequantize + cuBLAS there), key (bits, N <= _SMALL_N), kinds as _DECODE_CFG; a missing key
# takes dequantize + cuBLAS. Chosen on an H100 (Triton 3.6) by timing the whole CUDA-graph decode step at
# batches of 80-256 and prompts of 80-144 tokens (benchmarks/results/gpu.md, thirteenth round): INT8
# decode 12.61 / 13.40 -> 11.18 / 9.44 ms per step at batch 80 / 128, prompts 13.5 / 12.4 -> 11.6 / 11.1 ms.
# From 144 rows on, every tile tried lost to dequantize + cuBLAS (INT8 won again at 256 with 128 x 128
# tiles, 16.16 -> 14.73 ms, not taken: one card's band). INT4 has no entry: its best tiles (N > 4096)
# decoded batches of 80-128 9-11 % faster on the H100 (equal on an H200) but made 80-128-token prompts
# ~15 % slower (13.4-14.2 against 11.7-11.9 ms).
_WIDE_MAX_M = 128
_WIDE_CFG = {
    (8, False): ("plain", dict(BLOCK_N=128, BLOCK_M=128, BLOCK_KQ=64, num_warps=8, num_stages=3)),
    (8, True): ("plain", dict(BLOCK_N=64, BLOCK_M=64, BLOCK_KQ=128, num_warps=4, num_stages=4)),
}
# Otherwise (long prompts): the weight dequantized into a per-call buffer, then cuBLAS. It measured
# faster than every fused Triton tile tried there (benchmarks/results/cuda_kernels.md).
_DEQUANT_CFG = dict(BLOCK_N=32, BLOCK_KQ=256, num_warps=4)


# ---------------------------------------------------------------------------------------------
# Kernels. Plain functions here; _build() wraps them with triton.jit once Triton is imported
# (the helpers below are jitted too and rebound under their own names, so kernels can call them).

def _pdl_start(PDL: tl.constexpr):
    # Let the next kernel (launched with programmatic dependent launch) be scheduled now: its
    # programs take free SM slots and wait in _pdl_wait, so its launch and its weight prefetch
    # overlap this kernel. No-op without PDL.
    if PDL:
        _gdc.gdc_launch_dependents()


def _pdl_wait(PDL: tl.constexpr):
    # Wait until the previous kernel has finished and its writes are visible. Under PDL every
    # kernel calls this before it reads an activation or writes anything.
    if PDL:
        _gdc.gdc_wait()


def _grid_arrive(bar_ptr):
    # This program has finished a phase of a persistent kernel: its writes are released to the GPU
    # and the counter at bar_ptr counts it (CTA barrier first, so every thread's stores are in).
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")


def _grid_wait(bar_ptr, target):
    # Spin until the counter at bar_ptr has reached target (all programs arrived), then read what
    # they wrote. Gives up after 2^20 polls (about a second; a barrier takes microseconds) and sets
    # bar_ptr[1] for the host to see: a grid whose programs are not all resident at once would
    # otherwise hang the GPU.
    cnt = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    polls = 0
    while (cnt < target) & (polls < 1048576):
        cnt = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        polls += 1
    if cnt < target:
        tl.atomic_xchg(bar_ptr + 1, 1)
    tl.debug_barrier()


def _l2_prefetch(ptr, nbytes):
    # One thread of the program asks the copy engine to bring nbytes at ptr (16-byte aligned, a
    # multiple of 16) into L2: no registers, no wait. `ptr` and `nbytes` are 1-element tensors.
    tl.inline_asm_elementwise(
        "{\n"
        ".reg .pred %gp;\n"
        ".reg .b32 %gt;\n"
        "mov.u32 %gt, %tid.x;\n"
        "setp.eq.u32 %gp, %gt, 0;\n"
        "@%gp cp.async.bulk.prefetch.L2.global [$1], $2;\n"
        "mov.u32 $0, 0;\n"
        "}",
        "=r,l,r", [ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


def _f16x4_to_f32(xv):
    # An int64 holding four fp16 values (lowest half first) -> their fp32 bit patterns (int32).
    return tl.inline_asm_elementwise(
        "{\n"
        ".reg .b16 %gh0, %gh1, %gh2, %gh3;\n"
        "mov.b64 {%gh0, %gh1, %gh2, %gh3}, $4;\n"
        "cvt.f32.f16 $0, %gh0;\n"
        "cvt.f32.f16 $1, %gh1;\n"
        "cvt.f32.f16 $2, %gh2;\n"
        "cvt.f32.f16 $3, %gh3;\n"
        "}",
        "=r,=r,=r,=r,l", [xv], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


def _gelu_f32(x, ref_ptr, LIBDEVICE: tl.constexpr):
    # 0.5x(1 + tanh(0.79788456 x (1 + 0.044715 x^2))) on fp32 values that are exact in ref_ptr's
    # dtype, rounding to that dtype after every operation exactly where the eager fp16 expression
    # in modeling_chatglm.gelu_tanh does. Returns fp32 values (exact in that dtype).
    dt = ref_ptr.dtype.element_ty
    a = (0.5 * x).to(dt).to(tl.float32)
    c = (0.044715 * x).to(dt).to(tl.float32)
    c = (c * x).to(dt).to(tl.float32)
    c = (1.0 + c).to(dt).to(tl.float32)
    g = (0.7978845608028654 * x).to(dt).to(tl.float32)
    g = (g * c).to(dt).to(tl.float32)
    if LIBDEVICE:  # CUDA's tanhf, the function torch's tanh calls
        t = _libdevice.tanh(g)
    else:  # (Triton's CPU interpreter) odd Taylor series near 0, else (1 - e^-2|g|) / (1 + e^-2|g|)
        ag = tl.abs(g)
        e = tl.exp(-2.0 * ag)
        big = (1.0 - e) / (1.0 + e)
        g2 = g * g
        small = ag * (1.0 + g2 * (-1.0 / 3.0 + g2 * (2.0 / 15.0 + g2 * (-17.0 / 315.0 + g2 * (62.0 / 2835.0)))))
        t = tl.where(ag < 0.0625, small, big)
        t = tl.where(g < 0.0, -t, t)
    t = t.to(dt).to(tl.float32)
    t = (1.0 + t).to(dt).to(tl.float32)
    return (a * t).to(dt).to(tl.float32)


def _activate(out, y_ptr, ACT: tl.constexpr, LIBDEVICE: tl.constexpr):
    # Linear output (fp32) -> y's dtype; ACT == 1: then the eager-rounded tanh GELU.
    dt = y_ptr.dtype.element_ty
    if ACT == 1:
        out = _gelu_f32(out.to(dt).to(tl.float32), y_ptr, LIBDEVICE)
    return out.to(dt)


def _tile_index(M, N, num_kt, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr):
    # The [BLOCK_N, BLOCK_M] output tile of this program and its range of K tiles [kt0, kt1).
    # program_id(0) runs over the M tiles first, so the programs that share a weight tile run
    # together and the weight comes from DRAM once; with SPLIT_K > 1, program_id(1) picks a
    # slice of K. rn_c / rm_c are clamped copies: loads stay in bounds without row masks.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    rn = (pid // num_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    kt0 = 0
    kt1 = num_kt
    if SPLIT_K > 1:
        kt_per = tl.cdiv(num_kt, SPLIT_K)
        kt0 = tl.program_id(1) * kt_per
        kt1 = tl.minimum(kt0 + kt_per, num_kt)
    return rn, rm, tl.minimum(rn, N - 1), tl.minimum(rm, M - 1), kt0, kt1


def _tile_store(acc, rn, rm, rn_c, M, N, s_ptr, b_ptr, y_ptr, ws_ptr, stride_ym, HAS_BIAS: tl.constexpr,
                SPLIT_K: tl.constexpr, ACT: tl.constexpr, LIBDEVICE: tl.constexpr):
    # acc [BLOCK_N, BLOCK_M] fp32 = y^T tile. Split-K: the partial goes to ws[split, m, n] for
    # _splitk_reduce_kernel; else y = act(acc * s + b) in y's dtype.
    mask = (rn < N)[:, None] & (rm < M)[None, :]
    if SPLIT_K > 1:
        tl.store(ws_ptr + (tl.program_id(1) * M + rm[None, :]) * N + rn[:, None], acc, mask=mask)
    else:
        out = acc * tl.load(s_ptr + rn_c).to(tl.float32)[:, None]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn_c).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], _activate(out, y_ptr, ACT, LIBDEVICE), mask=mask)


def _gemv_kernel(x_ptr, xv_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, N, KW, stride_xk, stride_wn, stride_wk,
                 BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_KW: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, EV: tl.constexpr,
                 ACT: tl.constexpr = 0, PDL: tl.constexpr = False, LIBDEVICE: tl.constexpr = False,
                 L2_BYTES: tl.constexpr = 0, SPLIT_K: tl.constexpr = 1, CM: tl.constexpr = "",
                 XVEC: tl.constexpr = 0, ONE_TILE: tl.constexpr = False, LATE: tl.constexpr = 0):
    # y[n] = act(s[n] * sum_k x[k] q[n, k] + b[n]) for one activation row.
    # L2_BYTES > 0 (with PDL): before waiting for the previous kernel, have the first L2_BYTES of
    # each of this program's weight rows brought into L2, so that DRAM streams weights while the
    # small kernels before this one (LayerNorm, attention) run.
    # w_ptr: the weight as int32 words [N, KW]; word t holds columns 4t..4t+3 (INT8: byte i is
    # column 4t+i) or 8t..8t+7 (INT4: byte i holds column 8t+2i high nibble, 8t+2i+1 low).
    # SPLIT_K > 1: program_id(1) takes an equal share of the K tiles (the launcher makes the tile
    # count divisible) and writes its fp32 partial sums to ws[split, n] for _splitk_reduce_kernel.
    # CM: cache modifier of the weight loads. XVEC (x contiguous, viewed as int64 at xv_ptr; unused
    # otherwise): INT8 (x 8-byte aligned) takes the four activations of a word as one 8-byte load
    # instead of four 2-byte loads; INT4 (XVEC 2, fp16 x, 16-byte aligned) takes the eight of a word
    # as one 16-byte load instead of eight. LATE: the next kernel may launch (PDL) once every program
    # has finished its main loop (1) or begun the (LATE - 1)-th last step of it (> 1), instead of from
    # this kernel's start (0).
    if LATE == 0:
        _pdl_start(PDL)
    num_kt = tl.cdiv(KW, BLOCK_KW)
    kt0 = 0
    kt1 = num_kt
    if SPLIT_K > 1:
        kt0 = tl.program_id(1) * (num_kt // SPLIT_K)
        kt1 = kt0 + num_kt // SPLIT_K
    out, rn, rn_c = _gemv_rows(tl.program_id(0), kt0, kt1, x_ptr, xv_ptr, w_ptr, N, KW, stride_xk, stride_wn,
                               stride_wk, BITS, BLOCK_N, BLOCK_KW, EVEN_K, PREFETCH, EV, PDL, L2_BYTES, CM, XVEC,
                               None, 0, False, "", ONE_TILE, LATE - 1 if LATE > 1 else 0)
    if LATE == 1:
        _pdl_start(PDL)
    if SPLIT_K > 1:
        tl.store(ws_ptr + tl.program_id(1) * N + rn, out, mask=rn < N)
    else:
        out = out * tl.load(s_ptr + rn_c).to(tl.float32)
        if HAS_BIAS:
            out += tl.load(b_ptr + rn_c).to(tl.float32)
        tl.store(y_ptr + rn, _activate(out, y_ptr, ACT, LIBDEVICE), mask=rn < N)


def _w_tile(w_ptrs, kt, rw, KW, stride_wk, BLOCK_KW: tl.constexpr, EVEN_K: tl.constexpr, CM: tl.constexpr,
            EV: tl.constexpr, live=None):
    # K tile kt of the weight rows at w_ptrs (_gemv_rows), columns past KW read as 0 unless EVEN_K;
    # live (a scalar condition): when false the load is predicated off (no memory access; zeros)
    ptrs = w_ptrs + kt * BLOCK_KW * stride_wk
    if EVEN_K and live is None:
        w = tl.load(ptrs, cache_modifier=CM, eviction_policy=EV)
    else:
        if EVEN_K:
            keep = rw >= 0
        else:
            keep = kt * BLOCK_KW + rw < KW
        if live is not None:
            keep = keep & live
        w = tl.load(ptrs, mask=keep[None, :], other=0, cache_modifier=CM, eviction_policy=EV)
    return w


def _sum_splits(ws_ptr, offs, stride, mask, SPLIT_K: tl.constexpr):
    # The split-K partial sums ws[i * stride + offs] added in split order (fp32): _splitk_reduce_kernel's
    # reduction, and the LayerNorm's that folds it in (fast_decode); both then scale, add the bias, round.
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for i in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + i * stride + offs, mask=mask, other=0.0)
    return acc


def _gemv_rows(blk, kt0, kt1, x_ptr, xv_ptr, w_ptr, N, KW, stride_xk, stride_wn, stride_wk, BITS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr,
               EV: tl.constexpr, PDL: tl.constexpr, L2_BYTES: tl.constexpr, CM: tl.constexpr, XVEC: tl.constexpr,
               bar_ptr, bar_target, BAR: tl.constexpr, XCM: tl.constexpr, ONE_TILE: tl.constexpr = False,
               TRIG_AT: tl.constexpr = 0):
    # The GEMV's main loop for weight rows [blk * BLOCK_N, +BLOCK_N) over K tiles [kt0, kt1):
    # returns (fp32 sums [BLOCK_N], rows, rows clamped to N - 1); arguments as _gemv_kernel's.
    # Between the first weight tile's load and the loop (which reads x) it waits for the previous
    # kernel (PDL) or, BAR, for the grid barrier at bar_ptr to reach bar_target (_grid_wait; a
    # persistent kernel's phases, benchmarks/probe_persistent.py); XCM: cache modifier of the
    # activation loads (".cg" where x changes between phases of one kernel: not from L1).
    # ONE_TILE (with PREFETCH; kt1 == kt0 + 1): the program's whole share of its weight rows is the
    # first tile, all in flight before the wait (a kernel launched early under PDL streams it while
    # the small kernel before it runs); no tile is re-read.
    rn = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_c = tl.minimum(rn, N - 1)  # clamped rows: loads stay in bounds without a row mask
    rw = tl.arange(0, BLOCK_KW)
    w_ptrs = w_ptr + rn_c[:, None] * stride_wn + rw[None, :] * stride_wk
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.int32)  # fp32 bit patterns (asm in/out is .b32)
    if PREFETCH:  # register double buffer: the next tile's loads are in flight during the math
        w_nxt = _w_tile(w_ptrs, kt0, rw, KW, stride_wk, BLOCK_KW, EVEN_K, CM, EV)
        if PREFETCH == 2 and not ONE_TILE:  # triple buffer: the two next tiles in flight (twice the bytes)
            w_nx2 = _w_tile(w_ptrs, tl.minimum(kt0 + 1, kt1 - 1), rw, KW, stride_wk, BLOCK_KW, EVEN_K, CM, EV,
                            kt0 + 1 < kt1)
    if L2_BYTES > 0:
        one = tl.zeros([1], dtype=tl.int32)
        for r in tl.static_range(BLOCK_N):
            row = tl.minimum(blk * BLOCK_N + r, N - 1)
            _l2_prefetch(w_ptr + row.to(tl.int64) * stride_wn + one, one + L2_BYTES)
    # the first weight tile (weights are never written by a kernel) is already on its way
    if BAR:
        _grid_wait(bar_ptr, bar_target)
    else:
        _pdl_wait(PDL)
    for kt in range(kt0, kt1):
        if TRIG_AT > 0:  # PDL: the next kernel may launch from the start of the TRIG_AT-th last step on
            if kt == tl.maximum(kt1 - TRIG_AT, kt0):
                _pdl_start(PDL)
        ww = kt * BLOCK_KW + rw
        kmask = ww < KW
        if PREFETCH and ONE_TILE:
            w = w_nxt  # the whole K range was the first tile, loaded before the wait
        elif PREFETCH == 2:
            w = w_nxt
            w_nxt = w_nx2
            # (the last two iterations' loads are predicated off: tiles past kt1 are never used)
            w_nx2 = _w_tile(w_ptrs, tl.minimum(kt + 2, kt1 - 1), rw, KW, stride_wk, BLOCK_KW, EVEN_K, CM, EV,
                            kt + 2 < kt1)
        elif PREFETCH:
            w = w_nxt
            # (the last iteration re-reads its own tile: an L2 hit)
            w_nxt = _w_tile(w_ptrs, tl.minimum(kt + 1, kt1 - 1), rw, KW, stride_wk, BLOCK_KW, EVEN_K, CM, EV)
        else:
            w = _w_tile(w_ptrs, kt, rw, KW, stride_wk, BLOCK_KW, EVEN_K, CM, EV)
        if BITS == 8:
            if XVEC == 2:  # fp16 x: unpack the four halves of the int64 in PTX
                # x[4t..4t+3]
                x0, x1, x2, x3 = _f16x4_to_f32(tl.load(xv_ptr + ww, mask=kmask, other=0, cache_modifier=XCM))
            elif XVEC == 1:
                xv = tl.load(xv_ptr + ww, mask=kmask, other=0, cache_modifier=XCM)  # x[4t..4t+3] as one int64
                xdt = x_ptr.dtype.element_ty
                x0 = (xv & 0xFFFF).to(tl.int16).to(xdt, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
                x1 = ((xv >> 16) & 0xFFFF).to(tl.int16).to(xdt, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
                x2 = ((xv >> 32) & 0xFFFF).to(tl.int16).to(xdt, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
                x3 = ((xv >> 48) & 0xFFFF).to(tl.int16).to(xdt, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
            else:
                xb = x_ptr + (ww * 4) * stride_xk
                x0 = (tl.load(xb, mask=kmask, other=0.0, cache_modifier=XCM)
                      .to(tl.float32).to(tl.int32, bitcast=True))
                x1 = (tl.load(xb + stride_xk, mask=kmask, other=0.0, cache_modifier=XCM)
                      .to(tl.float32).to(tl.int32, bitcast=True))
                x2 = (tl.load(xb + 2 * stride_xk, mask=kmask, other=0.0, cache_modifier=XCM)
                      .to(tl.float32).to(tl.int32, bitcast=True))
                x3 = (tl.load(xb + 3 * stride_xk, mask=kmask, other=0.0, cache_modifier=XCM)
                      .to(tl.float32).to(tl.int32, bitcast=True))
            # byte i of (w ^ 0x80808080) is q+128; prmt puts it under the exponent of 2^23, so the
            # float is 2^23 + 128 + q exactly; subtracting 2^23 + 128 leaves q.
            acc = tl.inline_asm_elementwise(
                "{\n"
                ".reg .b32 %gu, %gc, %gt, %ga;\n"
                "xor.b32 %gu, $1, 0x80808080;\n"
                "mov.b32 %gc, 0x4B000000;\n"
                "prmt.b32 %gt, %gu, %gc, 0x7440;\n"
                "sub.f32 %gt, %gt, 0f4B000080;\n"
                "fma.rn.f32 %ga, %gt, $2, $6;\n"
                "prmt.b32 %gt, %gu, %gc, 0x7441;\n"
                "sub.f32 %gt, %gt, 0f4B000080;\n"
                "fma.rn.f32 %ga, %gt, $3, %ga;\n"
                "prmt.b32 %gt, %gu, %gc, 0x7442;\n"
                "sub.f32 %gt, %gt, 0f4B000080;\n"
                "fma.rn.f32 %ga, %gt, $4, %ga;\n"
                "prmt.b32 %gt, %gu, %gc, 0x7443;\n"
                "sub.f32 %gt, %gt, 0f4B000080;\n"
                "fma.rn.f32 $0, %gt, $5, %ga;\n"
                "}",
                "=r,r,r,r,r,r,r",
                [w, tl.broadcast_to(x0[None, :], (BLOCK_N, BLOCK_KW)), tl.broadcast_to(x1[None, :], (BLOCK_N, BLOCK_KW)),
                 tl.broadcast_to(x2[None, :], (BLOCK_N, BLOCK_KW)), tl.broadcast_to(x3[None, :], (BLOCK_N, BLOCK_KW)), acc],
                dtype=tl.int32, is_pure=True, pack=1)
        else:
            # Nibble q at bit p of w (p' = p mod 16; the upper half-word is shifted down first):
            # lop3 (w & 0xF<<p') ^ C, with C = the fp32 bits of 2^(23-p') + 8 (exponent field plus
            # bit 3 of the nibble), reads 2^(23-p') + (q ^ 8) = 2^(23-p') + q + 8 exactly as a float;
            # subtracting C as a float leaves q. One LOP3, one FADD, one FFMA per value.
            if XVEC == 2:  # fp16 x: the eight activations of a word as one 16-byte load (two int64)
                xp = tl.load(xv_ptr + (2 * ww)[:, None] + tl.arange(0, 2)[None, :], mask=kmask[:, None], other=0,
                             cache_modifier=XCM)
                xa, xb = tl.split(xp)
                c1, c0, c3, c2 = _f16x4_to_f32(xa)  # columns 8t..8t+3, as fp32 bit patterns
                c5, c4, c7, c6 = _f16x4_to_f32(xb)  # columns 8t+4..8t+7
                x0 = c0.to(tl.float32, bitcast=True)  # col 1 (p' = 0)
                x1 = c1.to(tl.float32, bitcast=True)  # col 0 (p' = 4)
                x2 = c2.to(tl.float32, bitcast=True)  # col 3 (p' = 8)
                x3 = c3.to(tl.float32, bitcast=True)  # col 2 (p' = 12)
                x4 = c4.to(tl.float32, bitcast=True)  # col 5
                x5 = c5.to(tl.float32, bitcast=True)  # col 4
                x6 = c6.to(tl.float32, bitcast=True)  # col 7
                x7 = c7.to(tl.float32, bitcast=True)  # col 6
            else:
                xb = x_ptr + (ww * 8) * stride_xk
                x0 = tl.load(xb + stride_xk, mask=kmask, other=0.0, cache_modifier=XCM).to(tl.float32)  # col 1 (p' = 0)
                x1 = tl.load(xb, mask=kmask, other=0.0, cache_modifier=XCM).to(tl.float32)  # col 0 (p' = 4)
                # col 3 (p' = 8)
                x2 = tl.load(xb + 3 * stride_xk, mask=kmask, other=0.0, cache_modifier=XCM).to(tl.float32)
                # col 2 (p' = 12)
                x3 = tl.load(xb + 2 * stride_xk, mask=kmask, other=0.0, cache_modifier=XCM).to(tl.float32)
                x4 = tl.load(xb + 5 * stride_xk, mask=kmask, other=0.0, cache_modifier=XCM).to(tl.float32)  # col 5
                x5 = tl.load(xb + 4 * stride_xk, mask=kmask, other=0.0, cache_modifier=XCM).to(tl.float32)  # col 4
                x6 = tl.load(xb + 7 * stride_xk, mask=kmask, other=0.0, cache_modifier=XCM).to(tl.float32)  # col 7
                x7 = tl.load(xb + 6 * stride_xk, mask=kmask, other=0.0, cache_modifier=XCM).to(tl.float32)  # col 6
            acc = tl.inline_asm_elementwise(
                "{\n"
                ".reg .b32 %gh, %gt, %ga, %gc0, %gc1, %gc2, %gc3, %gk0, %gk1, %gk2, %gk3;\n"
                "mov.b32 %gc0, 0x4B000008;\n"
                "mov.b32 %gc1, 0x49000080;\n"
                "mov.b32 %gc2, 0x47000800;\n"
                "mov.b32 %gc3, 0x45008000;\n"
                "mov.b32 %gk0, 0x0000000F;\n"
                "mov.b32 %gk1, 0x000000F0;\n"
                "mov.b32 %gk2, 0x00000F00;\n"
                "mov.b32 %gk3, 0x0000F000;\n"
                "shr.u32 %gh, $1, 16;\n"
                "lop3.b32 %gt, $1, %gk0, %gc0, 0x6a;\n"
                "sub.f32 %gt, %gt, %gc0;\n"
                "fma.rn.f32 %ga, %gt, $2, $10;\n"
                "lop3.b32 %gt, $1, %gk1, %gc1, 0x6a;\n"
                "sub.f32 %gt, %gt, %gc1;\n"
                "fma.rn.f32 %ga, %gt, $3, %ga;\n"
                "lop3.b32 %gt, $1, %gk2, %gc2, 0x6a;\n"
                "sub.f32 %gt, %gt, %gc2;\n"
                "fma.rn.f32 %ga, %gt, $4, %ga;\n"
                "lop3.b32 %gt, $1, %gk3, %gc3, 0x6a;\n"
                "sub.f32 %gt, %gt, %gc3;\n"
                "fma.rn.f32 %ga, %gt, $5, %ga;\n"
                "lop3.b32 %gt, %gh, %gk0, %gc0, 0x6a;\n"
                "sub.f32 %gt, %gt, %gc0;\n"
                "fma.rn.f32 %ga, %gt, $6, %ga;\n"
                "lop3.b32 %gt, %gh, %gk1, %gc1, 0x6a;\n"
                "sub.f32 %gt, %gt, %gc1;\n"
                "fma.rn.f32 %ga, %gt, $7, %ga;\n"
                "lop3.b32 %gt, %gh, %gk2, %gc2, 0x6a;\n"
                "sub.f32 %gt, %gt, %gc2;\n"
                "fma.rn.f32 %ga, %gt, $8, %ga;\n"
                "lop3.b32 %gt, %gh, %gk3, %gc3, 0x6a;\n"
                "sub.f32 %gt, %gt, %gc3;\n"
                "fma.rn.f32 $0, %gt, $9, %ga;\n"
                "}",
                "=r,r,r,r,r,r,r,r,r,r,r",
                [w,
                 tl.broadcast_to(x0.to(tl.int32, bitcast=True)[None, :], (BLOCK_N, BLOCK_KW)),
                 tl.broadcast_to(x1.to(tl.int32, bitcast=True)[None, :], (BLOCK_N, BLOCK_KW)),
                 tl.broadcast_to(x2.to(tl.int32, bitcast=True)[None, :], (BLOCK_N, BLOCK_KW)),
                 tl.broadcast_to(x3.to(tl.int32, bitcast=True)[None, :], (BLOCK_N, BLOCK_KW)),
                 tl.broadcast_to(x4.to(tl.int32, bitcast=True)[None, :], (BLOCK_N, BLOCK_KW)),
                 tl.broadcast_to(x5.to(tl.int32, bitcast=True)[None, :], (BLOCK_N, BLOCK_KW)),
                 tl.broadcast_to(x6.to(tl.int32, bitcast=True)[None, :], (BLOCK_N, BLOCK_KW)),
                 tl.broadcast_to(x7.to(tl.int32, bitcast=True)[None, :], (BLOCK_N, BLOCK_KW)),
                 acc],
                dtype=tl.int32, is_pure=True, pack=1)
    return tl.sum(acc.to(tl.float32, bitcast=True), axis=1), rn, rn_c  # [BLOCK_N]


def _qmm_kernel(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, KQ, stride_xm, stride_xk, stride_qn, stride_ym,
                BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_KQ: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
                ACT: tl.constexpr = 0, PDL: tl.constexpr = False, LIBDEVICE: tl.constexpr = False,
                XT: tl.constexpr = 0):
    # Tensor-core y = x W^T computed as y^T = W x^T, one [BLOCK_N, BLOCK_M] tile per program
    # (_tile_index). KQ / BLOCK_KQ count int8 bytes of a weight row (K for INT8, K/2 for INT4).
    _pdl_start(PDL)
    rn, rm, rn_c, rm_c, kt0, kt1 = _tile_index(M, N, tl.cdiv(KQ, BLOCK_KQ), BLOCK_N, BLOCK_M, SPLIT_K)
    rk = tl.arange(0, BLOCK_KQ)
    k0 = kt0 * BLOCK_KQ + rk  # this program's first weight bytes
    q_ptrs = q_ptr + rn_c[:, None] * stride_qn + k0[None, :]
    if BITS == 8:
        x_ptrs = x_ptr + rm_c[None, :] * stride_xm + k0[:, None] * stride_xk  # [BLOCK_KQ, BLOCK_M]
    elif XT:  # even columns, addressed [BLOCK_M, BLOCK_KQ] (see _x_tiles_transposed)
        x_ptrs = x_ptr + rm_c[:, None] * stride_xm + (2 * k0)[None, :] * stride_xk
    else:  # even columns
        x_ptrs = x_ptr + rm_c[None, :] * stride_xm + (2 * k0)[:, None] * stride_xk
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    _pdl_wait(PDL)
    for kt in range(kt0, kt1):
        if EVEN_K:
            w = tl.load(q_ptrs)
        else:
            kmask = kt * BLOCK_KQ + rk < KQ
            w = tl.load(q_ptrs, mask=kmask[None, :], other=0)
        if BITS == 8:
            if EVEN_K:
                xt = tl.load(x_ptrs)
            else:
                xt = tl.load(x_ptrs, mask=kmask[:, None], other=0.0)
            acc = tl.dot(w.to(xt.dtype), xt, acc)
            x_ptrs += BLOCK_KQ * stride_xk
        else:
            if EVEN_K:
                xe = _x_tile(x_ptrs, None, None, XT)
                xo = _x_tile(x_ptrs + stride_xk, None, None, XT)
            else:
                xmask = kmask[None, :] if XT else kmask[:, None]
                xe = _x_tile(x_ptrs, xmask, 0.0, XT)
                xo = _x_tile(x_ptrs + stride_xk, xmask, 0.0, XT)
            v = w.to(tl.int32)
            hi = v >> 4  # arithmetic shift: the sign-extended high nibble (even column)
            lo = ((v & 15) ^ 8) - 8  # sign-extended low nibble (odd column)
            acc = tl.dot(hi.to(xe.dtype), xe, acc)
            acc = tl.dot(lo.to(xo.dtype), xo, acc)
            x_ptrs += 2 * BLOCK_KQ * stride_xk
        q_ptrs += BLOCK_KQ
    _tile_store(acc, rn, rm, rn_c, M, N, s_ptr, b_ptr, y_ptr, ws_ptr, stride_ym, HAS_BIAS, SPLIT_K, ACT, LIBDEVICE)


def _x_tile(ptrs, mask, other, XT: tl.constexpr):
    # One [BLOCK_K, BLOCK_M] activation operand of the tiled kernels (XT: addressed transposed).
    t = tl.load(ptrs, mask=mask, other=other)
    if XT:
        t = tl.trans(t)
    return t


def _qmm_asm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, KW, stride_xm, stride_xk, stride_wn,
                    stride_ym, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_KW: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
                    ACT: tl.constexpr = 0, PDL: tl.constexpr = False, LIBDEVICE: tl.constexpr = False,
                    XT: tl.constexpr = 0):
    # As _qmm_kernel for fp16 activations, but the weight is read as int32 words and turned into
    # fp16 with bit tricks in inline PTX (two LOP3 + one packed subtract per 4 int8 values)
    # instead of the int->float conversion unit. Each word's columns are split over 4 (INT8) or
    # 8 (INT4) fp16 operands, each multiplied with the matching strided columns of x: the sum
    # over k does not care about order.
    _pdl_start(PDL)
    rn, rm, rn_c, rm_c, kt0, kt1 = _tile_index(M, N, tl.cdiv(KW, BLOCK_KW), BLOCK_N, BLOCK_M, SPLIT_K)
    rw = tl.arange(0, BLOCK_KW)
    w0 = kt0 * BLOCK_KW + rw  # this program's first weight words
    w_ptrs = w_ptr + rn_c[:, None] * stride_wn + w0[None, :]
    if XT:  # the activation tiles addressed [BLOCK_M, BLOCK_KW] and transposed after the load
        x_ptrs = x_ptr + rm_c[:, None] * stride_xm + ((32 // BITS) * w0)[None, :] * stride_xk
    else:  # [BLOCK_KW, BLOCK_M]
        x_ptrs = x_ptr + rm_c[None, :] * stride_xm + ((32 // BITS) * w0)[:, None] * stride_xk
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    _pdl_wait(PDL)
    for kt in range(kt0, kt1):
        if EVEN_K:
            w = tl.load(w_ptrs)
            xmask = None
            xother = None
        else:
            kmask = kt * BLOCK_KW + rw < KW
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0)
            xmask = kmask[None, :] if XT else kmask[:, None]
            xother = 0.0
        if BITS == 8:
            # (w & 0x00FF00FF) ^ 0x64806480 puts bytes 0 and 2 under the fp16 exponent of 1024
            # with their sign bit flipped: 1152 + q exactly; subtracting 1152 (0x6480) gives q.
            e0, e1, e2, e3 = tl.inline_asm_elementwise(
                "{\n"
                ".reg .b32 %glo, %ghi, %gk, %gm;\n"
                "mov.b32 %gk, 0x00FF00FF;\n"
                "mov.b32 %gm, 0x64806480;\n"
                "lop3.b32 %glo, $4, %gk, %gm, 0x6a;\n"
                "shr.u32 %ghi, $4, 8;\n"
                "lop3.b32 %ghi, %ghi, %gk, %gm, 0x6a;\n"
                "sub.f16x2 %glo, %glo, %gm;\n"
                "sub.f16x2 %ghi, %ghi, %gm;\n"
                "mov.b32 {$0, $2}, %glo;\n"
                "mov.b32 {$1, $3}, %ghi;\n"
                "}",
                "=h,=h,=h,=h,r", [w],
                dtype=(tl.int16, tl.int16, tl.int16, tl.int16), is_pure=True, pack=1)
            acc = tl.dot(e0.to(tl.float16, bitcast=True), _x_tile(x_ptrs, xmask, xother, XT), acc)
            acc = tl.dot(e1.to(tl.float16, bitcast=True), _x_tile(x_ptrs + stride_xk, xmask, xother, XT), acc)
            acc = tl.dot(e2.to(tl.float16, bitcast=True), _x_tile(x_ptrs + 2 * stride_xk, xmask, xother, XT), acc)
            acc = tl.dot(e3.to(tl.float16, bitcast=True), _x_tile(x_ptrs + 3 * stride_xk, xmask, xother, XT), acc)
            x_ptrs += 4 * BLOCK_KW * stride_xk
        else:
            # Low nibbles: (w & 0x000F000F) ^ 0x64086408 = fp16 1032 + q, minus 1032.
            # High nibbles: (w & 0x00F000F0) ^ 0x64806480 = fp16 1152 + 16q; * 1/16 - 72 = q.
            e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
                "{\n"
                ".reg .b32 %ga, %gb, %gc, %gd, %gh, %gk1, %gk2, %gm1, %gm2, %gs, %go;\n"
                "mov.b32 %gk1, 0x000F000F;\n"
                "mov.b32 %gk2, 0x00F000F0;\n"
                "mov.b32 %gm1, 0x64086408;\n"
                "mov.b32 %gm2, 0x64806480;\n"
                "mov.b32 %gs, 0x2C002C00;\n"
                "mov.b32 %go, 0xD480D480;\n"
                "lop3.b32 %ga, $8, %gk1, %gm1, 0x6a;\n"
                "lop3.b32 %gb, $8, %gk2, %gm2, 0x6a;\n"
                "shr.u32 %gh, $8, 8;\n"
                "lop3.b32 %gc, %gh, %gk1, %gm1, 0x6a;\n"
                "lop3.b32 %gd, %gh, %gk2, %gm2, 0x6a;\n"
                "sub.f16x2 %ga, %ga, %gm1;\n"
                "sub.f16x2 %gc, %gc, %gm1;\n"
                "fma.rn.f16x2 %gb, %gb, %gs, %go;\n"
                "fma.rn.f16x2 %gd, %gd, %gs, %go;\n"
                "mov.b32 {$0, $4}, %gb;\n"
                "mov.b32 {$1, $5}, %ga;\n"
                "mov.b32 {$2, $6}, %gd;\n"
                "mov.b32 {$3, $7}, %gc;\n"
                "}",
                "=h,=h,=h,=h,=h,=h,=h,=h,r", [w],
                dtype=(tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16),
                is_pure=True, pack=1)
            acc = tl.dot(e0.to(tl.float16, bitcast=True), _x_tile(x_ptrs, xmask, xother, XT), acc)
            acc = tl.dot(e1.to(tl.float16, bitcast=True), _x_tile(x_ptrs + stride_xk, xmask, xother, XT), acc)
            acc = tl.dot(e2.to(tl.float16, bitcast=True), _x_tile(x_ptrs + 2 * stride_xk, xmask, xother, XT), acc)
            acc = tl.dot(e3.to(tl.float16, bitcast=True), _x_tile(x_ptrs + 3 * stride_xk, xmask, xother, XT), acc)
            acc = tl.dot(e4.to(tl.float16, bitcast=True), _x_tile(x_ptrs + 4 * stride_xk, xmask, xother, XT), acc)
            acc = tl.dot(e5.to(tl.float16, bitcast=True), _x_tile(x_ptrs + 5 * stride_xk, xmask, xother, XT), acc)
            acc = tl.dot(e6.to(tl.float16, bitcast=True), _x_tile(x_ptrs + 6 * stride_xk, xmask, xother, XT), acc)
            acc = tl.dot(e7.to(tl.float16, bitcast=True), _x_tile(x_ptrs + 7 * stride_xk, xmask, xother, XT), acc)
            x_ptrs += 8 * BLOCK_KW * stride_xk
        w_ptrs += BLOCK_KW
    _tile_store(acc, rn, rm, rn_c, M, N, s_ptr, b_ptr, y_ptr, ws_ptr, stride_ym, HAS_BIAS, SPLIT_K, ACT, LIBDEVICE)


def _splitk_reduce_kernel(ws_ptr, s_ptr, b_ptr, y_ptr, MN, N,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                          ACT: tl.constexpr = 0, PDL: tl.constexpr = False, LIBDEVICE: tl.constexpr = False):
    # y[m, n] = act(s[n] * sum_split ws[split, m, n] + b[n]); the splits are summed in a fixed order.
    _pdl_start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    _pdl_wait(PDL)
    acc = _sum_splits(ws_ptr, offs, MN, mask, SPLIT_K)
    n = offs % N
    acc = acc * tl.load(s_ptr + n, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _activate(acc, y_ptr, ACT, LIBDEVICE), mask=mask)


def _gelu_kernel(x_ptr, n, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr, PDL: tl.constexpr = False):
    # In place: the eager-rounded tanh GELU (_gelu_f32) of n contiguous elements.
    _pdl_start(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    _pdl_wait(PDL)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, _gelu_f32(x, x_ptr, LIBDEVICE).to(x_ptr.dtype.element_ty), mask=m)


def _dequant_tile(q_ptr, s_ptr, w_ptr, N, KQ, stride_qn, pid_n, pid_k, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_KQ: tl.constexpr):
    # w[n, k] = q[n, k] * s[n] rounded once to w's dtype (what the torch path computes for fp16),
    # for one [BLOCK_N, BLOCK_KQ] tile of q (w [N, K] contiguous).
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_KQ + tl.arange(0, BLOCK_KQ)
    nmask = rn < N
    mask = nmask[:, None] & (rk < KQ)[None, :]
    v = tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :], mask=mask, other=0).to(tl.int32)
    s = tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    if BITS == 8:
        w = (v.to(tl.float32) * s).to(w_ptr.dtype.element_ty)
        tl.store(w_ptr + rn[:, None] * KQ + rk[None, :], w, mask=mask)
    else:
        hi = ((v >> 4).to(tl.float32) * s).to(w_ptr.dtype.element_ty)
        lo = ((((v & 15) ^ 8) - 8).to(tl.float32) * s).to(w_ptr.dtype.element_ty)
        w = tl.interleave(hi, lo)  # [BLOCK_N, 2*BLOCK_KQ]: even column = high nibble
        rk2 = pid_k * (2 * BLOCK_KQ) + tl.arange(0, 2 * BLOCK_KQ)
        tl.store(w_ptr + rn[:, None] * (2 * KQ) + rk2[None, :], w,
                 mask=nmask[:, None] & (rk2 < 2 * KQ)[None, :])


def _dequant_kernel(q_ptr, s_ptr, w_ptr, N, KQ, stride_qn,
                    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr):
    _dequant_tile(q_ptr, s_ptr, w_ptr, N, KQ, stride_qn, tl.program_id(0), tl.program_id(1), BITS, BLOCK_N, BLOCK_KQ)


def _dequant4_kernel(q0, q1, q2, q3, s0, s1, s2, s3, w0, w1, w2, w3, N0, N1, N2, N3, KQ0, KQ1, KQ2, KQ3,
                     T1, T2, T3, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr):
    # _dequant_kernel for four weights (rows contiguous) in one launch: programs [0, T1) take the
    # tiles of weight 0, [T1, T2) weight 1, [T2, T3) weight 2, the rest weight 3.
    pid = tl.program_id(0)
    if pid < T1:
        t = pid
        tk = tl.cdiv(KQ0, BLOCK_KQ)
        _dequant_tile(q0, s0, w0, N0, KQ0, KQ0, t // tk, t % tk, BITS, BLOCK_N, BLOCK_KQ)
    elif pid < T2:
        t = pid - T1
        tk = tl.cdiv(KQ1, BLOCK_KQ)
        _dequant_tile(q1, s1, w1, N1, KQ1, KQ1, t // tk, t % tk, BITS, BLOCK_N, BLOCK_KQ)
    elif pid < T3:
        t = pid - T2
        tk = tl.cdiv(KQ2, BLOCK_KQ)
        _dequant_tile(q2, s2, w2, N2, KQ2, KQ2, t // tk, t % tk, BITS, BLOCK_N, BLOCK_KQ)
    else:
        t = pid - T3
        tk = tl.cdiv(KQ3, BLOCK_KQ)
        _dequant_tile(q3, s3, w3, N3, KQ3, KQ3, t // tk, t % tk, BITS, BLOCK_N, BLOCK_KQ)


_KERNEL_FUNCS = (_gemv_kernel, _qmm_kernel, _qmm_asm_kernel, _splitk_reduce_kernel, _dequant_kernel, _dequant4_kernel,
                 _gelu_kernel)
_HELPER_NAMES = ("_pdl_start", "_pdl_wait", "_grid_arrive", "_grid_wait", "_w_tile", "_sum_splits", "_gemv_rows",
                 "_l2_prefetch", "_f16x4_to_f32", "_gelu_f32", "_activate", "_tile_index", "_tile_store", "_dequant_tile",
                 "_x_tile")


# ---------------------------------------------------------------------------------------------
# Availability and building.

# Triton's one-time cost in a process before its first kernel launch (H100 machine, warm caches:
# importing it 0.15-0.27 s, its installation hash `triton_key()` 0.43 s, importing its gluon modules
# 0.12 s, of a 0.92 s first call). warm_up() pays it on a thread while the model loads (the hash reads
# libtriton in 1 MB chunks, hashlib releases the GIL); the first available() / _build() waits for it.
_WARM_UP: Optional[threading.Thread] = None
_WARM_UP_LOCK = threading.Lock()
WARM_UP_MODULES = ("triton", "triton.language", "triton.runtime.cache", "triton.experimental.gluon")


def _warm_up_body() -> None:
    try:
        for name in WARM_UP_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue  # (gluon is not in every Triton version)
            if name == "triton.runtime.cache" and callable(getattr(module, "triton_key", None)):
                module.triton_key()  # lru_cache'd by Triton: its first kernel lookup finds it computed
    except Exception:  # best effort: the same work then happens on the first launch, as without it
        pass


def _triton_key_known() -> bool:
    cache = sys.modules.get("triton.runtime.cache")  # (transformers 5 imports Triton itself)
    info = getattr(getattr(cache, "triton_key", None), "cache_info", None)
    try:
        return info is not None and info().currsize > 0
    except Exception:
        return False


def warm_up() -> Optional[threading.Thread]:
    """Start (once per process) a thread importing Triton and computing its installation hash,
    so that the first CUDA call of the model does not (called when a model is built on a machine
    with a CUDA GPU whose kernels may run, ``quantization.kernels_may_run``; no Triton: nothing).
    Returns the thread."""
    global _WARM_UP
    with _WARM_UP_LOCK:
        if _WARM_UP is None and not _triton_key_known():
            try:
                present = importlib.util.find_spec("triton") is not None
            except Exception:  # a broken install (or a blocking import hook): leave it to available()
                present = False
            if present:
                _WARM_UP = threading.Thread(target=_warm_up_body, name="chatglm6b-triton-warm-up", daemon=True)
                _WARM_UP.start()
        return _WARM_UP


def _warm_up_done(timeout: float = 30.0) -> None:
    """Wait for warm_up()'s thread, if one runs (no two threads import Triton at once)."""
    thread = _WARM_UP
    if thread is not None and thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout)


@atexit.register
def _join_warm_up_at_exit() -> None:
    _warm_up_done(10.0)  # (not torn down mid-import by the interpreter's exit)


def interpreting() -> bool:
    """Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1): no inline PTX, no libdevice."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when a CUDA GPU is visible and Triton imports. Cached; no compile happens here."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _warm_up_done()
        ok = False
        try:
            if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
                importlib.import_module("triton")
                ok = True
        except Exception:  # a broken Triton install must not break the model: torch path
            ok = False
        _AVAILABLE = ok
    return _AVAILABLE


def _build():
    """Import Triton and wrap the kernel functions with triton.jit (once, thread-safe)."""
    global tl, _KERNELS, _gdc, _libdevice, _USE_LIBDEVICE, _PDL_IMPORTED
    if _KERNELS is not None:
        return _KERNELS
    _warm_up_done()
    with _LOCK:
        if _KERNELS is None:
            triton = importlib.import_module("triton")
            language = importlib.import_module("triton.language")
            tl = language
            _USE_LIBDEVICE = False
            if not interpreting():
                for name in ("triton.language.extra.libdevice", "triton.language.extra.cuda.libdevice"):
                    try:
                        _libdevice = importlib.import_module(name)
                        _USE_LIBDEVICE = hasattr(_libdevice, "tanh")
                        break
                    except ImportError:
                        continue
            try:
                _gdc = importlib.import_module("triton.language.extra.cuda")
                _PDL_IMPORTED = hasattr(_gdc, "gdc_wait") and hasattr(_gdc, "gdc_launch_dependents")
            except ImportError:
                _PDL_IMPORTED = False
            if not _PDL_IMPORTED:
                _gdc = SimpleNamespace(gdc_wait=None, gdc_launch_dependents=None)

            g = globals()
            for name in _HELPER_NAMES:  # kernels find their helpers, jitted, under the same names
                if not isinstance(g[name], triton.runtime.JITFunction):
                    g[name] = jit_helper(triton, g[name])
            jitted = {}
            for fn in _KERNEL_FUNCS:
                jitted[fn.__name__.strip("_")] = jit(triton, fn)
            # Same GEMV, but the K stride is a run-time value, so Triton cannot prove that a
            # thread's words are contiguous: 4-byte loads, one word per thread per row.
            jitted["gemv_scalar_kernel"] = jit(triton, _gemv_kernel, do_not_specialize=["stride_wk"])
            _KERNELS = SimpleNamespace(triton=triton, **jitted)
    return _KERNELS


# Compile options that every launch of this package's kernels passes. FP contraction (a * b + c as
# one FMA) is what the kernels were written, tuned and checked bit for bit against on the GPU
# (Triton's default through 3.9); Triton 3.9 warns on every first launch that its default turns to
# "off" in 3.10. Fixed here, per launch, rather than through the process-wide
# TRITON_DEFAULT_FP_FUSION, which would also change the user's other Triton kernels.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


class _Jitted:
    """A triton.jit kernel whose launches carry COMPILE_OPTIONS; other attributes pass through
    (device_caches, arg_names, ...). Inside compile_ahead (this thread) a launch only compiles."""
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        ahead = getattr(_AHEAD, "state", None)
        if ahead is not None:
            return lambda *args, **kwargs: ahead.submit(self.fn, grid, args, {**COMPILE_OPTIONS, **kwargs})
        # (what triton's own kernel[grid] returns, with the options bound: one call, no extra frame)
        return functools.partial(self.fn.run, grid=grid, warmup=False, **COMPILE_OPTIONS)

    def __getattr__(self, name):
        return getattr(self.fn, name)


# Compiling ahead, in parallel (off by default; CHATGLM_COMPILE_AHEAD=N uses N threads). A cold first
# call compiles its ~20 kernels one after another as they are first launched; Triton releases the GIL
# for most of a compile (here, 24 sm_90 builds: 5.07 s in one thread, 3.08 s in two). fast_decode runs
# the decode step (and the first prefill) once in compile-only mode first: every launch becomes a
# Triton `warmup` (compile and cache, no launch) on a thread pool, with the launch's own arguments, so
# the specialisations are the ones the real launches look up. Off by default: on an H100
# (benchmarks/bench_first_call.py, 16 threads, three runs) the first call took 6.8 / 5.8 / 5.4 s instead
# of 9.0 / 11.7 / 8.5; the next two first calls were 0.65 s slower in the first run, faster in the others;
# what it costs a process with warm caches (it still walks the step once) was not measured.
def _ahead_from_env() -> int:
    value = os.environ.get("CHATGLM_COMPILE_AHEAD", "").strip()
    try:
        return max(0, int(value or 0))
    except ValueError:
        warnings.warn(f"chatglm6b: CHATGLM_COMPILE_AHEAD={value!r} is not a number of threads; compiling "
                      f"ahead stays off (set e.g. CHATGLM_COMPILE_AHEAD=8)", RuntimeWarning)
        return 0


COMPILE_AHEAD = _ahead_from_env()
_AHEAD = threading.local()


class _Ahead:
    def __init__(self, device: torch.device, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        init = (lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=workers, initializer=init, thread_name_prefix="chatglm6b-compile")
        self.futures = []
        self.seen = set()

    def submit(self, fn, grid, args, kwargs):
        # One compile per specialisation: a decode step launches each kernel once per layer, and
        # concurrent compiles of the same build would each do the whole work. The key holds what
        # Triton specialises on (tensor dtype and 16-byte alignment; int 1, multiple of 16, 64-bit;
        # the keyword values), so equal keys are equal builds.
        key = (id(fn), tuple(_spec(a) for a in args), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in self.seen:
            self.seen.add(key)
            self.futures.append(self.pool.submit(fn.warmup, *args, grid=grid, **kwargs))


def _spec(arg):
    if isinstance(arg, torch.Tensor):
        return ("t", arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool) or arg is None:
        return ("v", arg)
    if isinstance(arg, int):
        return ("i", arg == 1, arg % 16 == 0, -2**31 <= arg < 2**31)
    if isinstance(arg, float):
        return ("f",)
    return ("o", repr(arg))


def compiling_ahead() -> bool:
    """This thread is inside compile_ahead: kernel launches only compile, their outputs are garbage."""
    return getattr(_AHEAD, "state", None) is not None


def ahead_workers() -> int:
    """Threads of compile_ahead (CHATGLM_COMPILE_AHEAD; 0 or 1: off)."""
    return COMPILE_AHEAD


@contextlib.contextmanager
def compile_ahead(device: torch.device, workers: int = 0):
    """Inside, this thread's launches of the package's Triton kernels only compile them, on `workers`
    threads (default COMPILE_AHEAD; 0 or 1: launches run as usual); leaving waits for every compile.
    The context's value, a list, then holds the kernels compiled ahead. A failed compile is dropped
    here: the real launch meets the error again and handles it as always."""
    workers = COMPILE_AHEAD if not workers else workers
    done = []
    if workers <= 1 or getattr(_AHEAD, "state", None) is not None:
        yield done
        return
    _build()
    ahead = _AHEAD.state = _Ahead(device, workers)
    try:
        yield done
    finally:
        _AHEAD.state = None
        for f in ahead.futures:
            if f.exception() is None:
                done.append(f.result())
        ahead.pool.shutdown(wait=True)


def _constexpr_annotations(fn):
    # `from __future__ import annotations` (or a quoted annotation) leaves "tl.constexpr" as a string:
    # make it the object triton.jit looks for.
    language = importlib.import_module("triton.language")
    fn.__annotations__ = {k: (language.constexpr if v == "tl.constexpr" else v) for k, v in fn.__annotations__.items()}
    return fn


def jit(triton, fn, **kwargs) -> _Jitted:
    """triton.jit(fn, **kwargs) for a kernel of this package (or fast_decode, or a benchmark): its
    "tl.constexpr" annotations may be strings; launches carry COMPILE_OPTIONS."""
    return _Jitted(triton.jit(_constexpr_annotations(fn), **kwargs))


def jit_helper(triton, fn):
    """triton.jit(fn) for a function that kernels call (not launched itself); annotations as jit's."""
    return triton.jit(_constexpr_annotations(fn))


def jit_helpers() -> SimpleNamespace:
    """The jitted helpers (PDL start / wait, the eager-rounded GELU, the batch-1 GEMV's main loop, the split-K
    partials' sum) for kernels of other modules."""
    _build()
    return SimpleNamespace(pdl_start=_pdl_start, pdl_wait=_pdl_wait, gelu_f32=_gelu_f32, gemv_rows=_gemv_rows,
                           sum_splits=_sum_splits, use_libdevice=_USE_LIBDEVICE)


def pdl_supported(device) -> bool:
    """Programmatic dependent launch can be used on this device (sm_90+, Triton with gdc, switch on)."""
    if not PDL:
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return False
    _build()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ok = _PDL_OK.get(idx)
    if ok is None:
        ok = _PDL_IMPORTED and torch.cuda.get_device_capability(idx) >= (9, 0)
        _PDL_OK[idx] = ok
    return ok


def _pdl_level(pdl) -> int:
    return 2 if pdl is True else int(pdl or 0)


def _launch_level(pdl) -> int:
    """The level without the late-trigger variants (3, 4 -> 1, 2)."""
    level = _pdl_level(pdl)
    return level - 2 if level >= 3 else level


LATE_STEPS = 0  # late trigger: 0 after the GEMV's main loop, n > 0 at the start of its n-th last step


def late_trigger(pdl) -> bool:
    """Levels 3 / 4 (= 1 / 2): a batch-1 GEMV lets the next kernel launch only after its own main loop,
    or from its LATE_STEPS-th last step (the dependents' programs then take SM slots as this kernel's
    programs finish, not while later programs of this kernel still need them); other kernels trigger
    at their start as at 1 / 2."""
    return _pdl_level(pdl) >= 3


def launch_options(pdl) -> dict:
    """Launch keyword arguments of a kernel that takes PDL. pdl: 0/False nothing; 1 the kernel lets
    the next kernel launch early (and waits, a no-op here) but is itself launched normally, so it
    starts on an idle GPU; 2/True it is also launched with programmatic dependent launch; 3 / 4 as
    1 / 2 (late_trigger)."""
    level = _launch_level(pdl)
    if level <= 0:
        return {}
    return dict(PDL=True, launch_pdl=True) if level >= 2 else dict(PDL=True)


def on_device(device: torch.device):
    """Context that makes `device` current for Triton's launches (which go to the current device):
    nothing to do when it already is (entering torch.cuda.device costs ~6 µs of host time)."""
    idx = device.index
    if idx is None or idx == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


# Volta (sm_70, V100): not among the GPUs Triton supports officially, but every kernel here builds for
# it (tests/test_gpu_builds.py, Triton 3.6 and 3.9) and fast_decode's kernels run there anyway; the
# quantized linears take the torch path unless CHATGLM_TRITON_SM70=1 (their values were never checked
# on a V100).
SM70 = os.environ.get("CHATGLM_TRITON_SM70", "0").strip().lower() in ("1", "true", "yes", "on")


def _device_ok(device: torch.device) -> bool:
    cap = _capability(device)
    return cap >= (7, 5) or (SM70 and cap >= (7, 0))  # Triton's tensor-core floor; Volta opt-in


# ---------------------------------------------------------------------------------------------
# Launchers. Each takes a 2-D x [M, K] and returns y [M, N] in x's dtype.

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _words(q: torch.Tensor, bits: int, K: int) -> Optional[torch.Tensor]:
    """q as int32 words [N, KW] when its rows are whole, 4-byte aligned words; else None."""
    per_word = 4 if bits == 8 else 8
    if K % per_word or q.stride(-1) != 1 or q.stride(0) % 4 or q.data_ptr() % 16:
        return None
    return q.view(torch.int32)


def _epilogue_options(act: int, pdl: bool) -> dict:
    opts = launch_options(pdl)
    if act:
        opts.update(ACT=act, LIBDEVICE=_USE_LIBDEVICE)
    return opts


def _run_gemv(x2, q, scale, bias, bits, cfg, words=None, act=0, pdl=False, reduce=True):
    # reduce=False: a split-K config returns its fp32 partials [SPLIT_K, N] unreduced (gemv_partials)
    k = _build()
    cfg = dict(cfg)
    M, K = x2.shape
    N = q.shape[0]
    words = _words(q, bits, K) if words is None else words
    KW = words.shape[1]
    y = torch.empty((1, N), dtype=x2.dtype, device=x2.device)
    block_n, block_kw = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_KW")
    l2 = cfg.pop("L2_FRACTION", 0.0)
    if l2 and launch_options(pdl).get("launch_pdl") and words.stride(0) * 4 % 16 == 0:
        cfg["L2_BYTES"] = max(16, int(KW * 4 * min(1.0, l2)) // 16 * 16)
    cfg.setdefault("PREFETCH", False)
    cfg.setdefault("EV", "")
    split_k = cfg.pop("SPLIT_K", 1)
    if split_k > 1 and _cdiv(KW, block_kw) % split_k:
        split_k = 1  # splits take whole, equal shares of the K tiles
    xv = x2
    xvec = int(cfg.pop("XVEC", 0))
    # XVEC 2 unpacks fp16 in PTX (INT8 and INT4); XVEC 1 unpacks with shifts (INT8 only, any dtype)
    vec_ok = (xvec == 2 and x2.dtype == torch.float16) or (xvec == 1 and bits == 8)
    if vec_ok and x2.stride(1) == 1 and x2.data_ptr() % (8 if bits == 8 else 16) == 0:
        cfg["XVEC"] = xvec
        xv = torch.as_strided(x2, (K,), (1,)).view(torch.int64)
    ws = torch.empty((split_k, N), dtype=torch.float32, device=x2.device) if split_k > 1 else y
    if cfg["PREFETCH"] and _cdiv(KW, block_kw) == split_k:
        cfg["ONE_TILE"] = True  # each program's K range is one tile, loaded before the PDL wait
    if late_trigger(pdl):
        cfg["LATE"] = 1 + LATE_STEPS
    kernel = k.gemv_scalar_kernel if cfg.pop("SCALAR", False) else k.gemv_kernel
    kernel[(_cdiv(N, block_n), split_k)](
        x2, xv, words, scale, bias if bias is not None else scale, y, ws, N, KW, x2.stride(1), words.stride(0), 1,
        BITS=bits, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_KW=block_kw, EVEN_K=KW % block_kw == 0,
        SPLIT_K=split_k, **cfg, **_epilogue_options(act if split_k == 1 else 0, pdl))
    if split_k > 1 and not reduce:
        return ws
    if split_k > 1:
        _reduce(ws, scale, bias, y, split_k, act, pdl)
    return y


def gemv_partials(x, q, scale, bits, pdl=0) -> Optional[torch.Tensor]:
    """The batch-1 GEMV's fp32 partial sums [SPLIT_K, N] (before scale and bias) where this shape's
    config splits K, for a kernel after it to reduce (fast_decode's LayerNorm folds the reduction into
    its own, saving the reduce kernel's launch); None where the config does not split K or these
    tensors are not for the GEMV (the caller then runs `linear`). The splits sum in
    `_splitk_reduce_kernel`'s order there. x: [1, K] fp16 / bf16 on the GPU."""
    x2 = _operands(x, q, scale, None, bits)
    if x2 is None or x2.shape[0] != 1 or x.dim() != 2:
        return None
    N, K = q.shape[0], x2.shape[1]
    words = _words(q, bits, K)
    if words is None or _mma_available(x.device):  # (the opt-in tensor-core GEMV takes batch 1 then)
        return None
    name, run, cfg = _plan(1, N, K, bits, x.dtype, True, _capability(x.device))
    split_k = cfg.get("SPLIT_K", 1)
    if name != "gemv" or split_k <= 1 or _cdiv(words.shape[1], cfg["BLOCK_KW"]) % split_k:
        return None
    pdl = _pdl_level(pdl)
    return _guarded(("gemv_partials", bits, x.dtype, x.device, 0, pdl), x.device, "split-K GEMV",
                    "using the reducing kernels for this case",
                    lambda: _run_gemv(x2, q, scale, None, bits, cfg, words=words, pdl=pdl, reduce=False))


def _split_k_out(M, N, split_k, x2):
    """(y, fp32 partials or None): split-K programs write partial tiles to a per-call buffer."""
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    ws = torch.empty((split_k, M, N), dtype=torch.float32, device=x2.device) if split_k > 1 else y
    return y, ws


def _reduce(ws, scale, bias, y, split_k, act=0, pdl=False):
    k = _build()
    MN = y.numel()
    k.splitk_reduce_kernel[(_cdiv(MN, 1024),)](ws, scale, bias if bias is not None else scale, y, MN, y.shape[1],
                                               SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=1024,
                                               num_warps=4, **_epilogue_options(act, pdl))


def _run_qmm(x2, q, scale, bias, bits, cfg, act=0, pdl=False):
    return _run_tiles(_build().qmm_kernel, x2, q, scale, bias, bits, cfg, "BLOCK_KQ", act, pdl)


def _run_qmm_asm(x2, q, scale, bias, bits, cfg, words=None, act=0, pdl=False):
    words = _words(q, bits, x2.shape[1]) if words is None else words
    return _run_tiles(_build().qmm_asm_kernel, x2, words, scale, bias, bits, cfg, "BLOCK_KW", act, pdl)


def _run_tiles(kernel, x2, w, scale, bias, bits, cfg, k_block, act, pdl):
    """Launch a tiled kernel (_qmm_kernel on the int8 bytes [N, KQ], _qmm_asm_kernel on the int32
    words [N, KW]; k_block names its K tile): y [M, N], with a K split also the partial sums and
    their reduction."""
    cfg = dict(cfg)
    if bits == 4 or k_block == "BLOCK_KW":  # strided activation columns: see _x_tiles_transposed
        cfg.setdefault("XT", int(_x_tiles_transposed()))
    M = x2.shape[0]
    N, KW = w.shape
    bn, bm, bk = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_M", 16), cfg.pop(k_block)
    split_k = cfg.pop("SPLIT_K", 1)
    y, ws = _split_k_out(M, N, split_k, x2)
    grid = (_cdiv(N, bn) * _cdiv(M, bm), split_k)
    kernel[grid](x2, w, scale, bias if bias is not None else scale, y, ws, M, N, KW,
                 x2.stride(0), x2.stride(1), w.stride(0), y.stride(0),
                 BITS=bits, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_M=bm, **{k_block: bk},
                 EVEN_K=KW % bk == 0, SPLIT_K=split_k, **cfg, **_epilogue_options(act if split_k == 1 else 0, pdl))
    if split_k > 1:
        _reduce(ws, scale, bias, y, split_k, act, pdl)
    return y


def _dequantize(q, scale, bits, dtype, cfg=None, out=None):
    """fp16/bf16 weight [N, K] = q * scale, into `out` (rows [:N]) or a fresh (per-call) buffer."""
    k = _build()
    cfg = dict(cfg or _DEQUANT_CFG)
    N, KQ = q.shape
    K = KQ * (2 if bits == 4 else 1)
    w = torch.empty((N, K), dtype=dtype, device=q.device) if out is None else out[:N]
    bn, bk = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_KQ")
    k.dequant_kernel[(_cdiv(N, bn), _cdiv(KQ, bk))](q, scale, w, N, KQ, q.stride(0),
                                                    BITS=bits, BLOCK_N=bn, BLOCK_KQ=bk, **cfg)
    return w


def dequantize_group(weights, bits: int, dtype: torch.dtype) -> Optional[list]:
    """Up to four (q, scale) pairs of `bits`-bit weights (q rows contiguous, on one CUDA device) ->
    their dequantized [N, K] weights in `dtype` (fp16 / bf16), views of one fresh buffer, written by
    one kernel launch (bit-equal to `_dequantize` of each). None when the kernels cannot run here.
    For a prompt's linears: one launch per layer instead of four (less host time per layer)."""
    if not (1 <= len(weights) <= 4) or dtype not in (torch.float16, torch.bfloat16) or bits not in (4, 8):
        return None
    dev = weights[0][0].device
    for q, sc in weights:
        if not (q.is_cuda and q.device == dev and sc.device == dev and q.dtype == torch.int8 and q.dim() == 2
                and q.is_contiguous() and sc.dim() == 1 and sc.shape[0] == q.shape[0] and sc.stride(0) == 1):
            return None
        if q.numel() > _INT32_MAX:
            return None
    if not _device_ok(dev):
        return None
    return _guarded(("dequant4", bits, dtype, dev), dev, "dequant4 kernel", "dequantizing one weight per launch",
                    lambda: _run_dequant_group(weights, bits, dtype),
                    reraise=(torch.cuda.OutOfMemoryError,))  # (the buffer: not the kernel's fault)


def _run_dequant_group(weights, bits: int, dtype: torch.dtype) -> list:
    """The launch of dequantize_group (its checks done): one buffer, one _dequant4_kernel launch."""
    k = _build()
    dev = weights[0][0].device
    per = 2 if bits == 4 else 1
    sizes = [q.shape[0] * q.shape[1] * per for q, _ in weights]
    buf = torch.empty(sum(sizes), dtype=dtype, device=dev)
    outs, at = [], 0
    for (q, _), n in zip(weights, sizes):
        outs.append(buf[at:at + n].view(q.shape[0], q.shape[1] * per))
        at += n
    bn, bk, warps = _DEQUANT_CFG["BLOCK_N"], _DEQUANT_CFG["BLOCK_KQ"], _DEQUANT_CFG["num_warps"]
    items = list(zip(weights, outs)) + [((weights[0][0][:0], weights[0][1][:0]), outs[0][:0])] * (4 - len(weights))
    tiles = [_cdiv(q.shape[0], bn) * _cdiv(q.shape[1], bk) for (q, _), _ in items]
    bounds = [sum(tiles[:i]) for i in (1, 2, 3)]
    qs = [q for (q, _), _ in items]
    ss = [sc for (_, sc), _ in items]
    ws = [w for _, w in items]
    k.dequant4_kernel[(max(1, sum(tiles)),)](
        *qs, *ss, *ws, *[q.shape[0] for q in qs], *[q.shape[1] for q in qs], *bounds,
        BITS=bits, BLOCK_N=bn, BLOCK_KQ=bk, num_warps=warps)
    return outs


# Long prompts (M >= DEQUANT_CHUNK_MIN_M rows) dequantize into a buffer of at most
# DEQUANT_CHUNK_BYTES: a larger weight goes through cuBLAS in slices of output columns, each written in
# place into y, so the transient buffer of a 16384 x 4096 layer is 64 MiB instead of 128 MiB (peak
# memory of a 1536-token prompt: 7.36 / 7.44 GiB allocated / reserved instead of 7.42 / 7.53, H100).
# Shorter prompts do not slice: at M = 1024 the slices (down to [1024, 2048] products for
# dense_4h_to_h, too few tiles for 132 SMs) made the 1024-token prefill 2.4 ms slower (30.9 ms).
DEQUANT_CHUNK_BYTES = 64 << 20
DEQUANT_CHUNK_MIN_M = 1280


def _run_dequant_mm(x2, q, scale, bias, bits, cfg=None, act=0, pdl=False):
    N = q.shape[0]
    M, K = x2.shape
    bias = None if bias is None else bias.to(x2.dtype)
    rows = max(256, (DEQUANT_CHUNK_BYTES // (K * x2.element_size())) // 256 * 256)
    if N <= rows or M < DEQUANT_CHUNK_MIN_M:
        y = torch.nn.functional.linear(x2, _dequantize(q, scale, bits, x2.dtype, cfg), bias)
    else:
        y = torch.empty((x2.shape[0], N), dtype=x2.dtype, device=x2.device)
        buf = torch.empty((rows, K), dtype=x2.dtype, device=x2.device)
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            w = _dequantize(q[n0:n1], scale[n0:n1], bits, x2.dtype, cfg, out=buf)
            if bias is None:
                torch.mm(x2, w.t(), out=y[:, n0:n1])
            else:
                torch.addmm(bias[n0:n1], x2, w.t(), out=y[:, n0:n1])
        del buf
    if act:
        gelu_(y, pdl=False)
    return y


def gelu_(x: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """In-place tanh GELU with the eager fp16/bf16 rounding (x contiguous)."""
    k = _build()
    n = x.numel()
    block = 2048
    k.gelu_kernel[(_cdiv(n, block),)](x, n, BLOCK=block, LIBDEVICE=_USE_LIBDEVICE, num_warps=4,
                                      **launch_options(pdl))
    return x


_XT_FROM = (3, 7)  # the first Triton whose default load order puts a warp's threads along M (below)


@functools.lru_cache(maxsize=None)
def _x_tiles_transposed() -> bool:
    """Whether _run_tiles addresses the strided activation tiles (_qmm_asm_kernel's, and _qmm_kernel's
    for INT4) transposed (XT) where a config does not say. Neither orientation is contiguous (a weight
    word's columns are 8 / 4 apart, a byte's 2), so Triton lays the loads out by its default order,
    and that default flipped in 3.7: for the [BLOCK_K, BLOCK_M] form 3.6 puts a warp's threads along
    K, 3.7 to 3.9 along M (sm_90 builds of each; on an H100 with Triton 3.9 the INT4 batch-16 decode
    fell from 4282 to 2935 tokens/s). XT keeps the threads along K on the newer compilers;
    tests/test_gpu_builds.py checks that on whichever Triton is installed."""
    version = tuple(int(p) for p in _build().triton.__version__.split(".")[:2] if p.isdigit())
    return version >= _XT_FROM


def _plan(M: int, N: int, K: int, bits: int, dtype: torch.dtype, aligned: bool, cap: tuple = ()):
    """(path name, launcher, config) for an [M, K] x [N, K]^T product on a GPU of capability cap."""
    small_n = N <= _SMALL_N
    if M == 1 and aligned:
        cfg = _GEMV_SHAPE_CFG.get((tuple(cap), bits, N, K))
        return "gemv", _run_gemv, cfg if cfg is not None else _GEMV_CFG[(bits, small_n, K >= _BIG_K)]
    if M <= 16:
        kind, cfg = _DECODE_SHAPE_CFG.get((tuple(cap), bits, N, K)) or _DECODE_CFG[(bits, small_n)]
        # fallback of an "asm" entry (INT8's generic entries are plain already)
        plain = _DECODE_PLAIN_CFG.get((bits, small_n)) or _DECODE_CFG[(bits, small_n)][1]
    elif M <= _MID_MAX_M:
        kind, cfg = _MID_CFG[(bits, M <= 32)]
        plain = _MID_PLAIN_CFG.get(bits)
    else:
        kind, cfg = _WIDE_CFG.get((bits, small_n), (None, None))
        if M > _WIDE_MAX_M or cfg is None:
            return "dequant_mm", _run_dequant_mm, _DEQUANT_CFG
        plain = None  # (no "asm" entries)
    if kind != "asm":
        return "qmm", _run_qmm, cfg
    if aligned and dtype == torch.float16:
        return "qmm_asm", _run_qmm_asm, cfg
    return "qmm", _run_qmm, plain  # (the bit-trick kernel needs fp16 activations and whole words)


def dequantizes(M: int, q: torch.Tensor, bits: int, dtype: torch.dtype) -> bool:
    """Whether `linear` on M rows of `dtype` activations dequantizes this weight (q, on its GPU) for
    cuBLAS rather than running a kernel on the quantized weight (`_plan`)."""
    N, KQ = q.shape
    K = KQ * 2 if bits == 4 else KQ
    aligned = _words(q, bits, K) is not None
    return _plan(M, N, K, bits, dtype, aligned, _capability(q.device))[0] == "dequant_mm"


_ACTS = {None: 0, "gelu": 1}


def _try_mma_gemv(x2, q, scale, bias, bits, act_id, pdl):
    """Batch 1 on sm_80+ when enabled (CHATGLM_MMA_GEMV=1): the tensor-core GEMV of cuda_mma.py
    (NVRTC), or None (then the Triton GEMV runs: switched off, other GPUs, bf16, a fused GELU, shapes
    it does not take, or after it failed once here)."""
    N, K = q.shape[0], x2.shape[1]
    dev = x2.device
    if not (_mma_available(dev) and act_id == 0 and _mma_supports(bits, N, K, x2.dtype) and _mma_weight_ok(q)
            and scale.dtype == torch.float16 and (bias is None or bias.dtype == torch.float16)):
        return None  # (available() first: switched off, the default, it answers at once)
    return _guarded(("mma_gemv", bits, x2.dtype, dev, act_id, pdl), dev, "tensor-core GEMV",
                    "using the Triton GEMV for this case",
                    lambda: _mma_gemv(x2, q, scale, bias, bits, _mma_config(bits, N, K, _capability(dev)), pdl))


def _operands(x, q, scale, bias, bits) -> Optional[torch.Tensor]:
    """x as [M, K] (a view where x's leading dims merge) when these tensors are for the kernels (CUDA, one
    device, fp16 / bf16 activations, an int8 weight [N, K or K / 2] with contiguous rows, [N] scale and bias,
    32-bit offsets), else None."""
    if not (x.is_cuda and q.is_cuda and scale.is_cuda and (bias is None or bias.is_cuda)):
        return None
    if x.dtype not in (torch.float16, torch.bfloat16) or q.dtype != torch.int8 or bits not in (4, 8):
        return None
    if q.dim() != 2 or q.stride(-1) != 1 or x.dim() < 1 or scale.dim() != 1:
        return None
    N, KQ = q.shape
    K = x.shape[-1]
    if K != (KQ * 2 if bits == 4 else KQ) or scale.shape[0] != N or (bias is not None and bias.shape != (N,)):
        return None
    if not (x.device == q.device == scale.device and (bias is None or bias.device == x.device)):
        return None
    if scale.stride(0) != 1 or (bias is not None and bias.stride(0) != 1) or not _device_ok(x.device):
        return None
    x2 = x.reshape(-1, K)  # a view when x's leading dims can be merged (no copy in decode)
    M = x2.shape[0]
    if M == 0 or K == 0:
        return None
    max_x = (M - 1) * x2.stride(0) + (K - 1) * x2.stride(1)
    if max_x > _INT32_MAX or N * KQ > _INT32_MAX or M * N > _INT32_MAX or q.stride(0) * N > _INT32_MAX:
        return None  # kernels index with 32-bit offsets
    return x2


def _guarded(key, device, what: str, instead: str, launch, reraise=()):
    """launch() on `device`, or None: after it raised once for `key` (a warning then: `what` failed, `instead`
    from now on) and every later time; CHATGLM_CUDA_STRICT=1 and the `reraise` types raise instead."""
    if key in _BROKEN:
        return None
    try:
        with on_device(device):
            return launch()
    except reraise:
        raise
    except Exception as exc:
        if STRICT:
            raise
        _BROKEN.add(key)
        warnings.warn(f"chatglm6b cuda_kernels: {what} failed ({type(exc).__name__}: {exc}); {instead} from now on",
                      RuntimeWarning)
        return None


def linear(x, q, scale, bias, bits, act: Optional[str] = None, pdl: bool = False):
    """``x @ (q * scale)^T + bias`` in x's dtype, or None when these tensors are not for us
    (the caller then runs the torch path). See the module docstring for the layout.

    act="gelu" applies the eager-rounded tanh GELU to the result (in the kernel's epilogue: the
    output is rounded to x's dtype first, as the eager `gelu_tanh(linear(x))` does). pdl (the
    caller must have checked `pdl_supported`): 1 lets the next kernel launch early (programmatic
    dependent launch), 2 or True also launches these kernels so (they may start before the
    previous kernel ends, and wait for it before reading activations); see `launch_options`."""
    x2 = _operands(x, q, scale, bias, bits)
    if x2 is None:
        return None
    (M, K), N = x2.shape, q.shape[0]
    aligned = _words(q, bits, K) is not None
    act_id = _ACTS[act]
    pdl = _pdl_level(pdl)
    if M == 1 and aligned:
        y = _try_mma_gemv(x2, q, scale, bias, bits, act_id, _launch_level(pdl))
        if y is not None:
            return y.view(*x.shape[:-1], N)
    name, run, cfg = _plan(M, N, K, bits, x.dtype, aligned, _capability(x.device))
    # (x may be on another GPU than the current one; a failure is e.g. a Triton too old for this GPU)
    y = _guarded((name, bits, x.dtype, x.device, act_id, pdl), x.device, f"{name} kernel",
                 "using the torch path for this case", lambda: run(x2, q, scale, bias, bits, cfg, act=act_id, pdl=pdl))
    return None if y is None else y.view(*x.shape[:-1], N)
