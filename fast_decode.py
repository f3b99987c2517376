"""Fast generation on one CUDA GPU: static KV cache, CUDA-graph decode step, on-GPU sampling.

`ChatGLMForConditionalGeneration.generate` / `stream_generate` (and so `chat` / `stream_chat`) call
`fast_generate` / `fast_stream_generate` first. They return None (with the reason kept in
`last_decision(model)`) for anything this path does not handle, and the caller then runs the eager
Hugging Face path: beam search, scores / dict outputs, logits processors other than the model's
`InvalidScoreLogitsProcessor`, stopping criteria, streamers, P-tuning, CPU or multi-device models,
a model in training mode, non-left padding, and generation settings beyond max_length /
max_new_tokens / do_sample / temperature / top_k / top_p / eos / pad.

Switch it off with ``model.config.use_cuda_graph = False`` or ``CHATGLM_CUDA_GRAPH=0``.

How it runs
* Prefill (one eager call): the model's weights, Triton kernels for the embedding lookup + first
  LayerNorm, the fused residual + LayerNorm, GELU and the rotary embedding (which writes keys/values
  straight into the static cache), and `F.scaled_dot_product_attention` with an additive float mask
  (a bool mask would turn fully padded rows into NaN that leaks through 0 * NaN). Quantized
  linears: each layer's four weights are dequantized by one launch and multiplied with cuBLAS when
  memory allows (`_group_dequant_positions`), else one `cuda_kernels.linear` per weight — bit-equal.
  It is host-bound (~200 launches from Python), so these fusions are about launches as much as
  GPU time.
* Decode: one step — embedding (inside the first LayerNorm kernel), 28 blocks, final LayerNorm, LM
  head, InvalidScore fix-up, greedy (one argmax kernel) or temperature / top-k / top-p sampling, eos
  bookkeeping — captured once per
  (batch, cache bucket, sampling mode) in a `torch.cuda.CUDAGraph` and replayed. Per block it
  launches 4 linear kernels (cuda_kernels.py; the GELU runs in dense_h_to_4h's epilogue), a fused
  rotary + cache write + attention kernel (split over the sequence, the splits merged in-kernel) and
  two residual + LayerNorm kernels. Batch-1 steps of INT4 models (SCREEN_HEAD), greedy or sampling from
  the top k, use the screened LM head (ScreenHead): an INT8 copy of the head and a per-row error bound
  rule out almost every row, only the rest get exact fp16 logits — the same token (greedy) or the same
  top-k logits (sampling) as the whole head. On sm_90+ the Triton kernels use programmatic dependent launch
  where it measured faster (PDL_MODE; CHATGLM_PDL=0 turns it off): a kernel's programs start while
  the previous kernel finishes and wait for it before reading activations.
  Attention reads only the filled part of the cache: the current length lives on the GPU.
* The cache holds prompt + max new tokens rounded up to `BUCKET` slots; graphs and caches are
  kept per (batch, bucket) for reuse (at most `max_slots`, least recently used dropped first).
* No host synchronisation per step: `generate` looks at "is any row unfinished" every
  `CHECK_EVERY` steps (one step behind, so it never waits for the GPU), `stream_generate` queues
  the next step before it hands out the current token.

Numerics follow the eager path: the fused kernels round to the activation dtype wherever the
eager torch code does (x*alpha, + residual, rotary products and sum, q scaling, the fp16 scores,
every step of the tanh GELU) and the rotary tables come from the model's own `rotary_cos_sin`
(bit-identical to the eager ops under Triton's CPU interpreter; compiled for an H100, the rotary and
GELU outputs differ from torch's now and then within their rounding error: benchmarks/results/gpu.md).
What differs: softmax probabilities are not rounded to fp16 before the product with v, sums run
in another order, and prefill attention is fused (SDPA). Greedy ids equal the eager ones except
at near ties (see tests/test_cuda_model.py).
"""
from __future__ import annotations  # kernel annotations stay strings until _build() binds `tl`

import copy
import functools
import importlib
import importlib.util
import math
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch.nn import functional as F

from .cuda_kernels import DEQUANT_CHUNK_MIN_M, ahead_workers, compile_ahead, compiling_ahead, dequantize_group, \
    dequantizes, gelu_ as _ck_gelu, gemv_partials, interpreting, jit as ck_jit, jit_helper as ck_jit_helper, \
    jit_helpers, launch_options as _launch, on_device, pdl_supported, strict as _strict
from .quantization import QuantizedLinear, kernel_backend

__all__ = [
    "StaticCache",
    "fast_generate",
    "fast_stream_generate",
    "last_decision",
    "release",
    "graph_enabled",
    "BUCKET",
]

tl = None  # triton.language, bound by _build()
_pdl_start = _pdl_wait = None  # cuda_kernels' jitted PDL helpers, bound by _build()
_gemv_rows = None  # cuda_kernels' jitted batch-1 GEMV main loop, bound by _build()
_sum_splits = None  # cuda_kernels' jitted split-K sum, bound by _build()
_KERNELS = None
_BUILD_LOCK = threading.Lock()

BUCKET = 256  # cache lengths are multiples of this
CHECK_EVERY = 16  # generate(): steps between looks at the "any row unfinished" flag
MAX_SLOTS = int(os.environ.get("CHATGLM_GRAPH_SLOTS", "2"))  # (batch, bucket) caches kept per model
# Decode attention: cache positions per tile, launch options, programs wanted per layer (the
# current context of each (row, head) is split into SPLITS chunks when b*heads alone is too few; at
# most one split per 128 slots of the cache bucket), and whether the last split of a (row, head)
# merges the partial results itself (an atomic ticket) instead of a second kernel. Chosen by
# measurement (benchmarks/results/gpu.md). In the INT8 decode graph with PDL (H100, ms/token at
# contexts 33-160 / 1501-1628): 128-position tiles, 8 splits, atomic-ticket merge 2.892 / 3.232;
# merged by a second kernel 2.920 / 3.267; 2 splits 2.858 / 3.897; 64-position tiles with the ticket
# 2.885 / 3.301. b=16, context 100: one split, 128-position tiles, 3 stages (4045 tokens/s; 64: 4022,
# 8 warps: 3915, 8 splits: 3781). "large" re-swept with batch 4 added (bench_gpu.py --sweep-attention,
# 2026-12-05): TARGET 128 -> 256 splits a batch of 3-7 rows in two (b=16 still one split), in-kernel
# merge, 1 stage: µs per layer at b=4, context 1800: 97.0 -> 63.1 (context 120: 9.4 -> 10.4); whole INT8
# decode step at b=4, contexts 1501-1628: 6.08 -> 5.28 ms (33-160: 3.92-3.95 both; b=16 unchanged).
# PRE (first tile of cached keys / values loaded before the PDL wait) and CHUNK (at least this many
# positions per split taking part; a short context runs unsplit), batch 1 (bench_gpu.py --attention-ab,
# H100, 2026-12-07, two calls, ms/token at contexts 33-160 / 1501-1628): INT4 1.829-1.857 / 2.218 ->
# PRE 1.805 / 2.093 -> PRE + CHUNK 128 1.768 / 2.091 (256: 1.768 / 2.102; 512: 1.768 / 2.179); INT8
# 2.770 / 3.094 -> 2.705 / 2.957 -> 2.665 / 2.961. Batch 16 (one split), PRE: INT4 4188-4195 -> 4247-4249
# tokens/s, INT8 4140-4148 -> 4251-4253 (bench_gpu.py --pdl-ab).
ATTN_CFG = {  # by batch: "small" (b <= 2) and "large"
    "small": dict(BLOCK_S=128, num_warps=4, num_stages=1, INLINE=True, TARGET=256, PRE=True, CHUNK=128),
    "large": dict(BLOCK_S=128, num_warps=4, num_stages=1, INLINE=True, TARGET=256, PRE=True),
}
# residual + LayerNorm over 4096: 2.15 / 2.21 / 2.55 / 2.73 µs with 16 / 8 / 4 / 2 warps (H100)
LN_WARPS = {"small": 16, "large": 16}
_MAX_SPLITS = 16
# Programmatic dependent launch in the decode step (sm_90+), by (weight bits or 16, batch class):
# "all": every Triton kernel may start while the previous one finishes (the GEMVs prefetch weights
# meanwhile); "small": only LayerNorm / attention / GELU kernels start early, the linears start on an
# idle GPU (letting the next kernel launch early); "off". Chosen by measurement (benchmarks/results/gpu.md):
# starting the linear kernels early helps the bandwidth-bound INT8 GEMV at batch 1 but spreads the
# programs of the heavier INT4 / tensor-core kernels unevenly over the SMs.
# H100, ms/token at batch 1 (off / small / all) — INT8 3.071 / 3.200 / 2.926, INT4 2.385 / 2.564 / 2.575,
# FP16 5.180 / 5.233 / 5.248; batch 16 — INT8 3.976 / 3.970 / 5.723, INT4 3.784 / 3.777 / 3.819,
# FP16 5.441 / 5.389 / 5.402. INT4 batch 1 re-measured after the 16-byte-activation GEMV (2026-11-25,
# two H100 calls): 2.136 / 2.069 / 2.253, so "small" there now.
PDL_MODE = {(8, "small"): "all", (4, "small"): "small", (16, "small"): "off",
            (8, "large"): "small", (4, "large"): "small", (16, "large"): "small"}
# Linears launched early (PDL level 2) where the mode launches linears normally, by (weight bits, batch
# class): names among "qkv", "dense", "h_to_4h", "4h_to_h". Chosen in the whole INT4 decode graph at batch 1
# (bench_gpu.py --sweep-preload 4, H100, 2026-12-06): dense_h_to_4h early (its first weight tile loads while
# the post-attention LayerNorm runs) 2.045 -> 2.000 ms/token (three alternating pairs); qkv early +0.055,
# dense early +0.010; whole-row tiles loaded before the wait (cuda_kernels ONE_TILE) +0.015..+0.19 for each.
# With the MLP's two linears letting the next kernel launch only after their main loop (LATE_TRIGGER,
# below), 4h_to_h and qkv early help too (bench_gpu.py --pdl-ab 4, H100, 2026-12-07, alternating pairs,
# ms/token): h_to_4h early 1.742 / 1.770 -> qkv, h_to_4h, 4h_to_h early with h_to_4h, 4h_to_h late
# 1.724 / 1.723. The late trigger keeps a kernel launched early from taking SM slots while the linear
# before it still has programs to run; the critical-path timeline: qkv 355 -> 304 µs per step, 4h_to_h
# 469 -> 448, the LayerNorm after 4h_to_h (now launched later) 83 -> 109 (57 LayerNorms).
# Class "b1" (batch 1 only; otherwise the batch's class applies): batch 2 keeps h_to_4h alone, as
# measured there (3.406 -> 3.390 ms/step); its linears are not GEMVs and have no late trigger.
EARLY_LINEARS: Dict[tuple, Tuple[str, ...]] = {(4, "small"): ("h_to_4h",), (4, "b1"): ("qkv", "h_to_4h", "4h_to_h")}
# Batch-1 GEMVs that let the next kernel launch only after their main loop instead of from their start
# (cuda_kernels.late_trigger), by (weight bits, "b1"); where PDL is on. INT8 (mode "all"): every
# late-trigger set measured was slower (2.674 -> 2.708..2.757 ms/token).
LATE_TRIGGER: Dict[tuple, Tuple[str, ...]] = {(4, "b1"): ("h_to_4h", "4h_to_h")}
_LINEAR_NAMES = ("qkv", "dense", "h_to_4h", "4h_to_h")  # a block's linears, in decode-step order
MAX_EOS = 8  # eos ids a call may give (more: eager path)


# ---------------------------------------------------------------------------------------------
# Triton kernels (plain functions here; _build() jits them once Triton is imported).

def _ln_kernel(a_ptr, r_ptr, w_ptr, b_ptr, y_ptr, ids_ptr, nrm_ptr, N, stride_a, stride_r, stride_y, alpha, eps,
               HAS_RES: tl.constexpr, BLOCK: tl.constexpr, GATHER: tl.constexpr = False, PDL: tl.constexpr = False,
               NORMS: tl.constexpr = False, rs_ptr=None, rb_ptr=None, RSPLIT: tl.constexpr = 0,
               RBIAS: tl.constexpr = False):
    # y = LayerNorm(a) or LayerNorm(round(round(a * alpha) + r)) for one row, like the eager
    # `x * alpha + sublayer(x)` followed by F.layer_norm (fp32 statistics, one rounding at the end).
    # GATHER: row i of a is a[ids[i]] (the embedding lookup, rounded to y's dtype as `.to(dtype)`).
    # NORMS: also nrm[2 row] = sum y^2, nrm[2 row + 1] = sum |y| of the rounded outputs (fp32; the
    # screened LM head's error bound, below).
    # RSPLIT > 0 (one row): r is a split-K GEMV's unreduced fp32 partials [RSPLIT, N] (split i at
    # r_ptr + i * stride_r), reduced here as cuda_kernels' _splitk_reduce_kernel does it: its _sum_splits,
    # times the linear's scale rs, plus its bias rb (RBIAS), rounded to y's dtype.
    _pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    dt = y_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)  # parameters: before the PDL wait
    b = tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
    if RSPLIT > 0:
        rs = tl.load(rs_ptr + cols, mask=m, other=0.0).to(tl.float32)
        if RBIAS:
            rb = tl.load(rb_ptr + cols, mask=m, other=0.0).to(tl.float32)
    _pdl_wait(PDL)
    if GATHER:
        x = tl.load(a_ptr + tl.load(ids_ptr + row).to(tl.int64) * stride_a + cols, mask=m, other=0.0)
        # (via fp32: exact, then one rounding, as the direct cast; Triton 3.9 lowers a direct
        # fp16 -> bf16 cast to cvt.bf16.f32, which sm_75 lacks, and the build failed there)
        x = x.to(tl.float32).to(dt).to(tl.float32)
    else:
        x = tl.load(a_ptr + row * stride_a + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES and RSPLIT > 0:
        acc = _sum_splits(r_ptr, cols, stride_r, m, RSPLIT) * rs
        if RBIAS:
            acc += rb
        r = acc.to(dt).to(tl.float32)
    elif HAS_RES:
        r = tl.load(r_ptr + row * stride_r + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x = (x * alpha).to(dt).to(tl.float32)
        x = (x + r).to(dt).to(tl.float32)
    mean = tl.sum(x, 0) / N
    xc = tl.where(m, x - mean, 0.0)
    var = tl.sum(xc * xc, 0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd * w + b
    tl.store(y_ptr + row * stride_y + cols, y.to(dt), mask=m)
    if NORMS:
        yr = tl.where(m, y.to(dt).to(tl.float32), 0.0)
        tl.store(nrm_ptr + row * 2, tl.sum(yr * yr, 0))
        tl.store(nrm_ptr + row * 2 + 1, tl.sum(tl.abs(yr), 0))


def _prefill_rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
                           S, H, stride_qkv, stride_pb, stride_pc, stride_tab, stride_kb, stride_kh, denom,
                           D: tl.constexpr, BLOCK_H: tl.constexpr):
    # One token (all heads): q, k rotated with 2-D rotary (eager rounding points), q scaled by
    # 1/(sqrt(d)*coeff) and rounded, v copied. q [b, S, H, D] contiguous; k and v [b, H, >= S, D]
    # with batch / head strides stride_kb / stride_kh (the KV cache itself), positions contiguous.
    row = tl.program_id(0).to(tl.int64)  # b * S + t
    b = row // S
    t = row % S
    dt = q_ptr.dtype.element_ty
    hh = tl.arange(0, BLOCK_H)
    d = tl.arange(0, D)
    hm = hh[:, None] < H
    j = d % (D // 2)
    neg = j < (D // 4)
    partner = tl.where(neg, d + D // 4, d - D // 4)
    chan = d // (D // 2)
    p = tl.load(pos_ptr + b * stride_pb + chan * stride_pc + t)
    c = tl.load(cos_ptr + p * stride_tab + j).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + p * stride_tab + j).to(tl.float32)[None, :]
    base = qkv_ptr + row * stride_qkv + hh[:, None] * (3 * D)
    out = ((b * S + t) * H + hh[:, None]) * D + d[None, :]  # q: [b, S, H, D]
    q = tl.load(base + d[None, :], mask=hm, other=0.0).to(tl.float32)
    qp = tl.load(base + partner[None, :], mask=hm, other=0.0).to(tl.float32)
    qp = tl.where(neg[None, :], -qp, qp)
    q = ((q * c).to(dt).to(tl.float32) + (qp * s).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    tl.store(q_ptr + out, tl.math.div_rn(q, denom).to(dt), mask=hm)
    k = tl.load(base + D + d[None, :], mask=hm, other=0.0).to(tl.float32)
    kp = tl.load(base + D + partner[None, :], mask=hm, other=0.0).to(tl.float32)
    kp = tl.where(neg[None, :], -kp, kp)
    k = (k * c).to(dt).to(tl.float32) + (kp * s).to(dt).to(tl.float32)
    kv = b * stride_kb + hh[:, None] * stride_kh + t * D + d[None, :]
    tl.store(k_ptr + kv, k.to(dt), mask=hm)
    v = tl.load(base + 2 * D + d[None, :], mask=hm, other=0.0)
    tl.store(v_ptr + kv, v, mask=hm)


def _decode_attn_kernel(qkv_ptr, kc_ptr, vc_ptr, cs_ptr, cur_ptr, pad_ptr,
                        out_ptr, pm_ptr, pl_ptr, pacc_ptr, cnt_ptr,
                        H, stride_qkv, stride_cb, stride_ch, stride_cs, stride_out,
                        denom, coeff,
                        D: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, INLINE: tl.constexpr,
                        PDL: tl.constexpr = False, PRE: tl.constexpr = False, CHUNK: tl.constexpr = 0):
    # One (row, head, split): rotary on the new q/k (cos/sin of this step's positions in cs_ptr,
    # [b, 2 channels, cos half | sin half]), the new k/v written at cache slot `cur` (split 0), then
    # softmax(q k^T) v over this split's share of the row's context [pad, cur) plus the new token
    # (last split), online softmax in fp32. With SPLITS > 1 the partials (max, sum, acc) are merged
    # by the last split to finish (INLINE: atomic ticket per (row, head)) or by _attn_combine_kernel.
    # CHUNK > 0 (INLINE only): only ceil(context / CHUNK) of the SPLITS programs take part (at least
    # one), so a short context is not split at all (its output is stored directly, no merge).
    # PRE: the split's first tile of cached keys / values is loaded before the PDL wait (then each
    # next tile while the current one is used). Safe: cur, pad and the slots below cur were written
    # by earlier steps, which ended before this step's first kernel (a plain launch) began; only
    # slot cur (this kernel's own write) and qkv / cs come from this step.
    _pdl_start(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    dt = out_ptr.dtype.element_ty
    d = tl.arange(0, D)
    j = d % (D // 2)
    neg = j < (D // 4)
    partner = tl.where(neg, d + D // 4, d - D // 4)
    chan = d // (D // 2)
    kc = kc_ptr + b * stride_cb + h * stride_ch
    vc = vc_ptr + b * stride_cb + h * stride_ch
    if PRE:
        cur = tl.load(cur_ptr)  # int32: slot of the new token = number of cached slots
        pad = tl.load(pad_ptr + b)  # int32: left-pad slots of this row
        eff, lo, hi = _attn_share(cur, pad, split, SPLITS, CHUNK)
        kt, vt = _kv_tile(kc, vc, lo + tl.arange(0, BLOCK_S), hi, d, stride_cs)
    _pdl_wait(PDL)
    if not PRE:
        cur = tl.load(cur_ptr)
        pad = tl.load(pad_ptr + b)
        eff, lo, hi = _attn_share(cur, pad, split, SPLITS, CHUNK)
    if split < eff:
        cs_row = cs_ptr + b * (2 * D) + chan * D + j
        c = tl.load(cs_row).to(tl.float32)
        s = tl.load(cs_row + D // 2).to(tl.float32)
        base = qkv_ptr + b * stride_qkv + h * (3 * D)
        q = tl.load(base + d).to(tl.float32)
        qp = tl.load(base + partner).to(tl.float32)
        k = tl.load(base + D + d).to(tl.float32)
        kp = tl.load(base + D + partner).to(tl.float32)
        v_new = tl.load(base + 2 * D + d)
        qp = tl.where(neg, -qp, qp)
        q = ((q * c).to(dt).to(tl.float32) + (qp * s).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        qs = tl.math.div_rn(q, denom).to(dt).to(tl.float32)
        kp = tl.where(neg, -kp, kp)
        k_new = ((k * c).to(dt).to(tl.float32) + (kp * s).to(dt).to(tl.float32)).to(dt)
        if split == 0:
            tl.store(kc + cur * stride_cs + d, k_new)
            tl.store(vc + cur * stride_cs + d, v_new)

        m_i = tl.zeros([1], tl.float32) - 1.0e30
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([D], tl.float32)
        if PRE:
            for start in range(lo, hi, BLOCK_S):
                offs = start + tl.arange(0, BLOCK_S)
                kn, vn = _kv_tile(kc, vc, offs + BLOCK_S, hi, d, stride_cs)  # the next tile (none after the last)
                m_i, l_i, acc = _attn_tile(kt, vt, offs < hi, qs, coeff, m_i, l_i, acc, dt)
                kt = kn
                vt = vn
        else:
            for start in range(lo, hi, BLOCK_S):
                offs = start + tl.arange(0, BLOCK_S)
                kt, vt = _kv_tile(kc, vc, offs, hi, d, stride_cs)
                m_i, l_i, acc = _attn_tile(kt, vt, offs < hi, qs, coeff, m_i, l_i, acc, dt)
        if split == eff - 1:
            sn = tl.sum(qs * k_new.to(tl.float32), 0)
            sn = sn.to(dt).to(tl.float32) * coeff
            m_new = tl.maximum(m_i, sn)
            corr = tl.exp(m_i - m_new)
            pn = tl.exp(sn - m_new)
            l_i = l_i * corr + pn
            acc = acc * corr + pn * v_new.to(tl.float32)
            m_i = m_new
        if SPLITS == 1:
            tl.store(out_ptr + b * stride_out + h * D + d, (acc / l_i).to(dt))
        elif eff == 1:  # (CHUNK: a short context, one split)
            tl.store(out_ptr + b * stride_out + h * D + d, (acc / l_i).to(dt))
        else:
            idx = bh.to(tl.int64) * SPLITS + split
            one = tl.arange(0, 1)
            tl.store(pm_ptr + idx + one, m_i)
            tl.store(pl_ptr + idx + one, l_i)
            tl.store(pacc_ptr + idx * D + d, acc)
            if INLINE:
                tl.debug_barrier()  # every thread's partial stores precede the (release) ticket
                ticket = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel", scope="gpu")
                if ticket == eff - 1:  # the last split of this (row, head): merge
                    sp = tl.arange(0, SPLITS)
                    first = bh.to(tl.int64) * SPLITS
                    part = sp < eff
                    ms = tl.load(pm_ptr + first + sp, mask=part, other=float("-inf"), cache_modifier=".cg")
                    ls = tl.load(pl_ptr + first + sp, mask=part, other=0.0, cache_modifier=".cg")
                    accs = tl.load(pacc_ptr + (first + sp)[:, None] * D + d[None, :], mask=part[:, None], other=0.0,
                                   cache_modifier=".cg")
                    mx = tl.max(ms, 0)
                    w = tl.exp(ms - mx)
                    o = tl.sum(accs * w[:, None], 0) / tl.sum(ls * w, 0)
                    tl.store(out_ptr + b * stride_out + h * D + d, o.to(dt))
                    tl.atomic_xchg(cnt_ptr + bh, 0)  # ready for the next layer / step


def _attn_share(cur, pad, split, SPLITS: tl.constexpr, CHUNK: tl.constexpr):
    # (programs taking part, first and end slot of this split's share of [pad, cur))
    n = cur - pad
    if CHUNK > 0:
        eff = tl.minimum(tl.maximum((n + CHUNK - 1) // CHUNK, 1), SPLITS)
    else:
        eff = n * 0 + SPLITS
    chunk = (n + eff - 1) // eff
    lo = pad + split * chunk
    hi = tl.minimum(lo + chunk, cur)
    return eff, lo, hi


def _kv_tile(kc, vc, offs, hi, d, stride_cs):
    # cached keys / values at slots offs (those below hi; zeros elsewhere)
    ptrs = offs[:, None] * stride_cs + d[None, :]
    valid = (offs < hi)[:, None]
    return tl.load(kc + ptrs, mask=valid, other=0.0), tl.load(vc + ptrs, mask=valid, other=0.0)


def _attn_tile(kt, vt, valid, qs, coeff, m_i, l_i, acc, dt: tl.constexpr):
    # online softmax over one tile of cached positions (rows of kt / vt where valid)
    sc = tl.sum(kt.to(tl.float32) * qs[None, :], 1)
    sc = sc.to(dt).to(tl.float32) * coeff
    sc = tl.where(valid, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 0))
    corr = tl.exp(m_i - m_new)
    pr = tl.exp(sc - m_new)
    l_i = l_i * corr + tl.sum(pr, 0)
    acc = acc * corr + tl.sum(pr[:, None] * vt.to(tl.float32), 0)
    return m_new, l_i, acc


def _attn_combine_kernel(pm_ptr, pl_ptr, pacc_ptr, out_ptr, H, stride_out,
                         D: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_start(PDL)
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    _pdl_wait(PDL)
    m = tl.load(pm_ptr + bh * SPLITS + sp)
    l = tl.load(pl_ptr + bh * SPLITS + sp)
    mx = tl.max(m, 0)
    w = tl.exp(m - mx)
    total = tl.sum(l * w, 0)
    acc = tl.load(pacc_ptr + (bh * SPLITS + sp)[:, None] * D + d[None, :])
    o = tl.sum(acc * w[:, None], 0) / total
    tl.store(out_ptr + b * stride_out + h * D + d, o.to(out_ptr.dtype.element_ty))


_KEY_EMPTY = -(1 << 63)  # a greedy key below every value's (see _pick_kernel)


def _pick_kernel(l_ptr, key_ptr, flag_ptr, V, stride_l, BLOCK: tl.constexpr, CHECK: tl.constexpr):
    # Greedy choice, part one (grid: rows x blocks of the vocabulary), what torch.argmax picks: the
    # largest value, NaN above everything, -0.0 equal to +0.0, the first index among equals. Each
    # value becomes an int64 key, ordered as the values are (fp32 bits, negative ones with the
    # magnitude bits flipped) in the high half and 2^31 - 1 - index in the low half; the program's
    # largest key goes to key[row] by atomic max (reset to _KEY_EMPTY by the bookkeeping kernel).
    # CHECK: flag[0] = 1 if any value is NaN or infinite (InvalidScoreLogitsProcessor's condition).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < V
    x = tl.load(l_ptr + row * stride_l + cols, mask=m, other=0.0).to(tl.float32)
    key = tl.where(m, _argmax_key(x, cols), _no_key(BLOCK))
    tl.atomic_max(key_ptr + row, tl.max(key, 0), sem="relaxed")
    if CHECK:
        bad = tl.max(_non_finite(x).to(tl.int32), 0)
        if bad != 0:
            tl.atomic_max(flag_ptr, bad, sem="relaxed")


def _f32_order(x):
    # fp32 values -> int32 keys in the same order (negative values: magnitude bits flipped); the map
    # is its own inverse on the bit patterns.
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _non_finite(x):
    return (x.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000  # exponent all ones: inf or NaN


def _no_key(N: tl.constexpr):
    # [N] keys below every _argmax_key (_KEY_EMPTY): what key slots are reset to
    return tl.full([N], -2147483648, tl.int32).to(tl.int64) << 32


def _argmax_key(x, cols):
    # int64 keys of fp32 values x at indices cols whose maximum is torch.argmax's choice: the value's
    # order in the high half (NaN above everything, -0.0 equal to +0.0), 2^31 - 1 - index in the low
    # half (the first index among equals).
    k32 = _f32_order(x)
    k32 = tl.where(x == 0.0, 0, k32)  # -0.0 like +0.0
    k32 = tl.where((x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) > 0x7F800000, 0x7FFFFFFF, k32)  # NaN
    return (k32.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)


# ---------------------------------------------------------------------------------------------
# The screened LM head (batch-1 decode steps). The fp16 head is 1.07 GB of the 3.9 GB an INT4 token
# reads. A copy quantized to INT8 per row (q, fp32 scale s) is read instead, with a bound per row:
# |fl16(w.x) - s q.x| <= E = ||w - s q||_2 ||x||_2 (Cauchy-Schwarz) + the fp32 summation error of
# both dot products (<= 2.5 K u max|w| ||x||_1, u = 2^-24) + the output rounding (2^-10 of the value
# for fp16, 2^-7 bf16), inflated. With lo = s q.x - E and hi = s q.x + E per row and T = max lo, every
# row with hi < T has a logit below another row's: only rows with hi >= T (a median 132 of 130528 on
# random weights) have their exact logits computed, from the fp16 rows, by the same code that computes
# the whole head when the screen cannot decide (a non-finite value, a possible fp16 overflow, too many
# candidates in one block). The token is the argmax of those exact logits: the same token as the
# whole head's argmax computed by that code, tie-breaking by the first index included. Sampling from
# the top k: T is the k-th largest lower bound instead, so every row that can make the top k gets its
# exact logit (in a buffer holding the lowest finite value elsewhere) and the warpers see the top k of
# the whole head.

def _head_rows(w_ptr, x_ptr, rows, K, stride_w, R: tl.constexpr, BLOCK_K: tl.constexpr, LOG_K: tl.constexpr):
    # fp32 dot products of the fp16/bf16 weight rows `rows` ([R], in range) with x [K], in an order that
    # depends on neither R nor the layout: lane j of a BLOCK_K-wide accumulator takes columns j,
    # j + BLOCK_K, ... by FMA in that order, then lanes are added pairwise (j + half onto j, halving).
    # (the next tile's weights are loaded before this tile's FMAs: two tiles in flight)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((R, BLOCK_K), dtype=tl.float32)
    base = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    w_next = tl.load(base + cols[None, :], mask=(cols < K)[None, :], other=0.0)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        w = w_next.to(tl.float32)
        x = tl.load(x_ptr + c, mask=c < K, other=0.0).to(tl.float32)
        w_next = tl.load(base + (c + BLOCK_K)[None, :], mask=(c + BLOCK_K < K)[None, :], other=0.0)
        acc = tl.fma(w, x[None, :], acc)
    for i in tl.static_range(LOG_K):
        acc = tl.sum(tl.reshape(acc, (R, 2, BLOCK_K >> (i + 1))), axis=1)
    return tl.reshape(acc, (R,))


def _screen_kernel(x_ptr, xv_ptr, q_ptr, q8_ptr, s_ptr, rn_ptr, mx_ptr, nrm_ptr, hi_ptr, lo_ptr, scr_ptr, V, KW,
                   coef, fac, rel, big, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, EVEN_K: tl.constexpr,
                   PREFETCH: tl.constexpr, EV: tl.constexpr, XVEC: tl.constexpr, ASM: tl.constexpr,
                   STORE_LO: tl.constexpr = False, PDL: tl.constexpr = False):
    # Rows [pid * BLOCK_N, +BLOCK_N) of the INT8 copy: l = s * (q . x) by the batch-1 GEMV's main loop
    # (ASM; else plain loads, for Triton's CPU interpreter), the bound E from the row's residual norm
    # rn, its max |w| (mx) and x's norms (nrm: sum x^2, sum |x|, from the final LayerNorm); hi = l + E
    # to hi_ptr (STORE_LO: l - E to lo_ptr), max(l - E) into scr[0] (atomic max of _f32_order keys),
    # scr[1] = 1 when a row's l or E is not finite or |l| + E reaches `big` (the whole head must run).
    _pdl_start(PDL)
    blk = tl.program_id(0)
    if ASM:
        acc, rows, rows_c = _gemv_rows(blk, 0, tl.cdiv(KW, BLOCK_KW), x_ptr, xv_ptr, q_ptr, V, KW, 1, KW, 1, 8,
                                       BLOCK_N, BLOCK_KW, EVEN_K, PREFETCH, EV, PDL, 0, "", XVEC, None, 0, False,
                                       "", False)
    else:
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_c = tl.minimum(rows, V - 1)
        _pdl_wait(PDL)
        K = KW * 4
        cols = tl.arange(0, 4 * BLOCK_KW)
        a = tl.zeros((BLOCK_N, 4 * BLOCK_KW), dtype=tl.float32)
        for k0 in range(0, K, 4 * BLOCK_KW):
            c = k0 + cols
            m = c < K
            w = tl.load(q8_ptr + rows_c.to(tl.int64)[:, None] * K + c[None, :], mask=m[None, :], other=0)
            a += w.to(tl.float32) * tl.load(x_ptr + c, mask=m, other=0.0).to(tl.float32)[None, :]
        acc = tl.sum(a, 1)
    valid = rows < V
    l = acc * tl.load(s_ptr + rows_c)
    n2 = tl.sqrt(tl.load(nrm_ptr)) * fac
    n1 = tl.load(nrm_ptr + 1) * fac
    base = tl.load(rn_ptr + rows_c) * n2 + coef * tl.load(mx_ptr + rows_c) * n1
    e = (base + rel * (tl.abs(l) + base)) * 1.000001 + 1e-7
    tl.store(hi_ptr + rows, l + e, mask=valid)
    if STORE_LO:
        tl.store(lo_ptr + rows, l - e, mask=valid)
    lo = tl.where(valid, _f32_order(l - e), -2147483648)
    tl.atomic_max(scr_ptr, tl.max(lo, 0), sem="relaxed")
    bad = tl.max((valid & ((tl.abs(l) + e < big) == 0)).to(tl.int32), 0)  # (NaN compares false: bad)
    if bad != 0:
        tl.atomic_max(scr_ptr + 1, bad, sem="relaxed")


def _cand_kernel(hi_ptr, scr_ptr, x_ptr, w_ptr, key_ptr, y_ptr, hist_ptr, V, K, stride_w, TOP_K,
                 SPAN: tl.constexpr, MAX_LOCAL: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr,
                 LOG_K: tl.constexpr, STORE: tl.constexpr = False, HIST: tl.constexpr = False,
                 PDL: tl.constexpr = False):
    # Vocabulary entries [pid * SPAN, +SPAN): those with hi >= T (scr[0]) are candidates; their exact
    # logits (_head_rows on HEAD_BLOCK_N candidates at a time, rounded to x's dtype) compete for key[0]
    # (_argmax_key, atomic max), or (STORE) are written to y at their rows. More than MAX_LOCAL candidates
    # here: scr[1] = 1 and the whole head decides (_head_kernel, COND). HIST: T is instead the TOP_K-th
    # largest lower bound rounded down to its high 16 bits, from the counts _sample_pass_kernel (KEY32)
    # left at hist[0:512] (a lower T only adds candidates).
    _pdl_start(PDL)
    cols = tl.program_id(0) * SPAN + tl.arange(0, SPAN)
    valid = cols < V
    _pdl_wait(PDL)
    if HIST:
        bins = tl.arange(0, 256)
        hb, above_hi, _n = _kth_bin(tl.load(hist_ptr + bins), TOP_K)
        lb, _a, _b = _kth_bin(tl.load(hist_ptr + 256 + bins), TOP_K - above_hi)
        tkey = (hb * 256 + lb - 32768) << 16
    else:
        tkey = tl.load(scr_ptr)
    t = _f32_order(tkey.to(tl.float32, bitcast=True)).to(tl.float32, bitcast=True)
    h = tl.load(hi_ptr + cols, mask=valid, other=0.0)
    cand = valid & (h >= t)
    n = tl.sum(cand.to(tl.int32), 0)
    if n > MAX_LOCAL:
        tl.atomic_max(scr_ptr + 1, 1, sem="relaxed")
    n = tl.where((n > MAX_LOCAL) | (tl.load(scr_ptr + 1) != 0), 0, n)
    pos = tl.cumsum(cand.to(tl.int32), 0) - 1  # each candidate's rank here
    best = _no_key(1)
    for t0 in range(0, n, R):
        j = t0 + tl.arange(0, R)
        rows = tl.min(tl.where(cand[None, :] & (pos[None, :] == j[:, None]), cols[None, :], V), 1)  # V: none
        v = _head_rows(w_ptr, x_ptr, tl.minimum(rows, V - 1), K, stride_w, R, BLOCK_K, LOG_K)
        v = v.to(x_ptr.dtype.element_ty)
        if STORE:
            tl.store(y_ptr + rows, v, mask=rows < V)
        key = _argmax_key(v.to(tl.float32), rows)
        key = tl.where(rows < V, key, _no_key(R))
        best = tl.maximum(best, tl.max(key, 0))
    if (n > 0) & (STORE == 0):
        tl.atomic_max(key_ptr + tl.arange(0, 1), best, sem="relaxed")


def _head_kernel(x_ptr, w_ptr, y_ptr, key_ptr, bad_ptr, scr_ptr, V, K, stride_w, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, LOG_K: tl.constexpr, STORE: tl.constexpr, PICK: tl.constexpr,
                 CHECK: tl.constexpr, COND: tl.constexpr, PDL: tl.constexpr = False):
    # The whole head for one row x, blocks of BLOCK_N rows taken grid-stride: logits (_head_rows,
    # rounded to x's dtype) to y (STORE) and/or their argmax into key[0] (PICK; CHECK: bad[0] = 1 if a
    # logit is not finite, InvalidScoreLogitsProcessor's condition). COND: only when scr[1] != 0 (the
    # screen could not decide); else every program finds no block to do.
    _pdl_start(PDL)
    _pdl_wait(PDL)
    nblk = tl.cdiv(V, BLOCK_N)
    if COND:
        nblk = tl.where(tl.load(scr_ptr + 1) != 0, nblk, 0)
    best = _no_key(1)
    bad = tl.zeros([1], dtype=tl.int32)
    for blk in range(tl.program_id(0), nblk, tl.num_programs(0)):
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        m = rows < V
        v = _head_rows(w_ptr, x_ptr, tl.minimum(rows, V - 1), K, stride_w, BLOCK_N, BLOCK_K, LOG_K)
        v = v.to(x_ptr.dtype.element_ty)
        if STORE:
            tl.store(y_ptr + rows, v, mask=m)
        if PICK:
            f = v.to(tl.float32)
            key = tl.where(m, _argmax_key(f, rows), _no_key(BLOCK_N))
            best = tl.maximum(best, tl.max(key, 0))
            if CHECK:
                bad = tl.maximum(bad, tl.max((m & _non_finite(f)).to(tl.int32), 0))
    if PICK:
        tl.atomic_max(key_ptr + tl.arange(0, 1), best, sem="relaxed")
        if CHECK:
            tl.atomic_max(bad_ptr + tl.arange(0, 1), bad, sem="relaxed")


def _bookkeep_kernel(nxt_ptr, unf_ptr, eos_ptr, padid_ptr, ids_ptr, tok_ptr, pos_ptr, cur_ptr, alive_ptr,
                     genlen_ptr, key_ptr, flag_ptr, scr_ptr, B, stride_ids, NEOS: tl.constexpr,
                     BLOCK_B: tl.constexpr, KEYS: tl.constexpr = 0, SCREEN: tl.constexpr = False,
                     FLAG5: tl.constexpr = False):
    # After choosing `nxt` for every row (one program): finished rows get pad; the token goes to
    # ids[:, cur + 1]; rows that produced an eos id finish; gen_len counts the step if any row was
    # still running; the next step's input token, position (block position + 1) and cache slot.
    # KEYS 1: nxt comes from _pick_kernel's keys (which are reset here); 2: also token 5 for every
    # row when flag[0] is 1 (InvalidScoreLogitsProcessor), and the flag is reset. SCREEN: the screened
    # head's threshold and fallback flag (scr[0], scr[1]) are reset, scr[2] counts the steps it sent to
    # the whole head. FLAG5 (tokens from sample_tokens with InvalidScoreLogitsProcessor): token 5 for
    # every row when flag[0] is 1, and the flag is reset (its 2, sampling's NaN without a processor, stays).
    r = tl.arange(0, BLOCK_B)
    if SCREEN:  # count a step sent to the whole head, reset threshold and flag
        i = tl.arange(0, 4)
        s = tl.load(scr_ptr + i, mask=i < 3, other=0)
        undecided = tl.sum(tl.where(i == 1, (s != 0).to(tl.int32), 0), 0)
        s = tl.where(i == 0, -2147483648, tl.where(i == 1, 0, s + undecided))
        tl.store(scr_ptr + i, s, mask=i < 3)
    m = r < B
    unf = tl.load(unf_ptr + r, mask=m, other=0) != 0
    if KEYS:
        key = tl.load(key_ptr + r, mask=m, other=0)
        nxt = 0x7FFFFFFF - (key & 0xFFFFFFFF)
        tl.store(key_ptr + r, _no_key(BLOCK_B), mask=m)
    else:
        nxt = tl.load(nxt_ptr + r, mask=m, other=0)
    if (KEYS == 2) or FLAG5:  # the processor's condition was met: token 5 for every row, flag reset
        one1 = tl.arange(0, 1)
        flag = tl.max(tl.load(flag_ptr + one1), 0)
        nxt = tl.where(flag == 1, 5, nxt)
        tl.store(flag_ptr + one1, tl.where(flag == 1, 0, flag) + tl.zeros([1], tl.int32))
    any_before = tl.max(unf.to(tl.int64), 0)
    nxt = tl.where(unf, nxt, tl.load(padid_ptr))
    cur = tl.load(cur_ptr)
    tl.store(ids_ptr + r.to(tl.int64) * stride_ids + (cur + 1), nxt, mask=m)
    e = tl.arange(0, NEOS)
    eos = tl.load(eos_ptr + e)
    hit = tl.max((nxt[:, None] == eos[None, :]).to(tl.int32), 1) > 0
    unf = unf & (hit == 0)
    tl.store(unf_ptr + r, unf, mask=m)
    tl.store(tok_ptr + r, nxt, mask=m)
    p1 = tl.load(pos_ptr + r * 2 + 1, mask=m, other=0)
    tl.store(pos_ptr + r * 2 + 1, p1 + 1, mask=m)
    one = tl.arange(0, 1)
    tl.store(genlen_ptr + one, tl.load(genlen_ptr + one) + any_before)
    alive = tl.max(unf.to(tl.int32), 0)
    tl.store(alive_ptr + one, (tl.zeros([1], tl.int32) + alive) != 0)
    tl.store(cur_ptr + one, tl.load(cur_ptr + one) + 1)


# ---------------------------------------------------------------------------------------------
# Sampling with the chat defaults (temperature, top-k, top-p; InvalidScoreLogitsProcessor) in four kernels.
# transformers' warpers sort all V scores for top-p and run two row softmaxes over them; at batch 1 each
# of those is one thread block (H100, INT4 chat step: softmax 113 µs, topk / sort / scan ~150 µs of the
# 0.51 ms that sampling added to greedy decoding). Here three passes over the logits (many programs per
# row) find the k-th largest score by radix selection on the 16-bit keys of the logits (two 256-bin
# histograms) and collect the indices above it, so that the top k is A (values above the k-th, fewer than
# k) and B (the values equal to it, any number, all of one probability). The warpers' result follows in
# closed form (one program per row): with scores s = x / T, Z the sum of exp(s - max) over A and B, and
# the stable ascending order (value, index) of transformers' sort (CUDA's), an element's cumulative
# probability is |B| p_B + (the A elements up to it) for A and j p_B for the j-th element of B (by index);
# top-p drops those with cumulative <= 1 - top_p, keeping the largest. One uniform number per row then
# picks a token with probability proportional to exp(s - max) over what is kept.

def _order16(x):
    # 16-bit floats (fp16 / bf16) -> int32 keys in [0, 65535] ordered as the values, -0.0 like +0.0
    u = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    u = tl.where((u & 0x7FFF) == 0, 0, u)
    return tl.where(u >= 0x8000, 0xFFFF - u, u + 0x8000)


def _kth_bin(hist, k):
    # hist [256] counts, 1 <= k <= their sum: (the bin holding the k-th largest key, the number of keys
    # in bins above it, that bin's count)
    bins = tl.arange(0, 256)
    above = tl.sum(hist, 0) - tl.cumsum(hist, 0)
    b = tl.max(tl.where((above < k) & (above + hist >= k), bins, -1), 0)
    return b, tl.sum(tl.where(bins == b, above, 0), 0), tl.sum(tl.where(bins == b, hist, 0), 0)


# A row's sampling work buffer (int32, _SAMPLE_WORK entries): [0, 256) high-byte counts, [256, 512) low-byte
# counts, 512 / 513: A / B counts, 514: bad mark, [520, 776): A's indices, [776, 1032): B's first indices,
# [1032, 1544): the screened head's high / low-byte counts of its lower bounds (ScreenHead.pick, work=).


def _sample_pass_kernel(l_ptr, w_ptr, flag_ptr, V, stride_l, K, WS, BMAX: tl.constexpr, BLOCK: tl.constexpr,
                        PASS: tl.constexpr, PROC: tl.constexpr, KEY32: tl.constexpr = False):
    # One block of one row of logits (grid: rows x blocks of V), into the row's work buffer w [WS] (int32,
    # zero on entry to pass 1; _sample_pick_kernel zeroes it again). PASS 1: the high bytes of the keys
    # (_order16) counted into w[0:256]; a NaN / +inf (PROC: also -inf) sets w[514] and flag[0] (1 with
    # the processor, 2 without). PASS 2: the low bytes of the keys in the bin holding the K-th largest,
    # into w[256:512]. PASS 3: the indices of keys above the K-th largest (A, < K <= SAMPLE_MAX_K of
    # them) and of the first BMAX keys equal to it (B) appended at w[520:] / w[776:] (in no particular
    # order; counts in w[512], w[513]). KEY32 (passes 1 and 2 only, no bad mark): l holds fp32 values
    # and the keys are the high 16 bits of their _f32_order (the screened head's lower bounds).
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < V
    x = tl.load(l_ptr + row * stride_l + c, mask=m, other=0.0)
    if KEY32:
        key = (_f32_order(x) >> 16) + 32768
    else:
        key = _order16(x)
    w = w_ptr + row * WS
    bins = tl.arange(0, 256)
    if PASS == 1:
        h = tl.histogram(key >> 8, 256, mask=m)
        tl.atomic_add(w + bins, h, mask=h != 0, sem="relaxed")
        if not KEY32:
            xf = x.to(tl.float32)
            if PROC:
                bad = tl.max((m & _non_finite(xf)).to(tl.int32), 0)
            else:
                bad = tl.max((m & ((xf != xf) | (xf == float("inf")))).to(tl.int32), 0)
            if bad != 0:
                tl.atomic_max(w + 514, 1, sem="relaxed")
                tl.atomic_max(flag_ptr, 1 if PROC else 2, sem="relaxed")
    else:
        hb, above_hi, _n = _kth_bin(tl.load(w + bins), K)
        if PASS == 2:
            h = tl.histogram(key & 255, 256, mask=m & ((key >> 8) == hb))
            tl.atomic_add(w + 256 + bins, h, mask=h != 0, sem="relaxed")
        else:
            lb, _a, _b = _kth_bin(tl.load(w + 256 + bins), K - above_hi)
            kth = hb * 256 + lb
            sel = m & (key > kth)
            n = tl.sum(sel.to(tl.int32), 0)
            if n > 0:
                start = tl.atomic_add(w + 512, n, sem="relaxed")
                tl.store(w + 520 + start + tl.cumsum(sel.to(tl.int32), 0) - 1, c, mask=sel)
            sel = m & (key == kth)
            n = tl.sum(sel.to(tl.int32), 0)
            if n > 0:
                start = tl.atomic_add(w + 513, n, sem="relaxed")
                pos = start + tl.cumsum(sel.to(tl.int32), 0) - 1
                tl.store(w + 776 + pos, c, mask=sel & (pos < BMAX))


def _sample_pick_kernel(l_ptr, w_ptr, u_ptr, invt_ptr, cut_ptr, tok_ptr, V, stride_l, K, WS,
                        KMAX: tl.constexpr, BMAX: tl.constexpr, BLOCK: tl.constexpr, TEMP: tl.constexpr,
                        TOPP: tl.constexpr):
    # One row (after the three _sample_pass_kernel passes): the token drawn with u[row], to tok[row]; the
    # row's work buffer is zeroed for the next step. A row marked bad gets token 0 (its flag decides).
    row = tl.program_id(0).to(tl.int64)
    base = l_ptr + row * stride_l
    w = w_ptr + row * WS
    bins = tl.arange(0, 256)
    bad = tl.load(w + 514)
    if bad != 0:
        tl.store(tok_ptr + row, tl.zeros([], tl.int64))
    else:
        hb, above_hi, _n = _kth_bin(tl.load(w + bins), K)
        lb, _a, nb = _kth_bin(tl.load(w + 256 + bins), K - above_hi)
        kth = hb * 256 + lb
        na = tl.load(w + 512)  # A: keys above the k-th (< K of them); B: nb keys equal to it
        j = tl.arange(0, KMAX)
        am = j < na
        ia = tl.load(w + 520 + j, mask=am, other=0)
        xa = tl.load(base + ia, mask=am, other=0.0).to(tl.float32)
        kb = tl.where(kth >= 0x8000, kth - 0x8000, 0xFFFF - kth)  # the k-th value's bits
        xb = kb.to(tl.int16).to(l_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
        if TEMP:
            invt = tl.load(invt_ptr)
            sa = xa * invt
            sb = xb * invt
        else:
            sa = xa
            sb = xb
        smax = tl.where(na > 0, tl.max(tl.where(am, sa, float("-inf")), 0), sb)
        ea = tl.where(am, tl.exp(sa - smax), 0.0)
        eb = tl.exp(sb - smax)
        z = tl.sum(ea, 0) + nb.to(tl.float32) * eb
        drop_b = nb * 0
        keep_a = am
        if TOPP:
            cut = tl.load(cut_ptr)
            pa = ea / z
            pb = eb / z
            # B's j-th element (by index) has cumulative j pb: the first d with d pb <= cut are dropped
            nbf = nb.to(tl.float32)
            d = tl.where(pb > 0, tl.minimum(tl.floor(cut / tl.maximum(pb, 1e-38)), nbf), nbf).to(tl.int32)
            d = tl.where((d < nb) & ((d + 1).to(tl.float32) * pb <= cut), d + 1, d)
            d = tl.where((d > 0) & (d.to(tl.float32) * pb > cut), d - 1, d)
            drop_b = tl.where(na > 0, d, tl.minimum(d, nb - 1))  # (B holds the largest when A is empty)
            before = (xa[None, :] < xa[:, None]) | ((xa[None, :] == xa[:, None]) & (ia[None, :] <= ia[:, None]))
            cum = nbf * pb + tl.sum(tl.where(before & am[None, :], pa[None, :], 0.0), 1)
            # the largest element (the last of A in (value, index) order) is kept in any case
            later = (xa[None, :] > xa[:, None]) | ((xa[None, :] == xa[:, None]) & (ia[None, :] > ia[:, None]))
            is_top = am & (tl.sum((later & am[None, :]).to(tl.int32), 1) == 0)
            keep_a = am & ((cum > cut) | is_top)
        wa = tl.where(keep_a, ea, 0.0)
        wsum = tl.sum(wa, 0)
        kept_b = nb - drop_b
        t = tl.load(u_ptr + row) * (wsum + kept_b.to(tl.float32) * eb)
        # A in index order: the first whose running weight passes t
        upto = tl.sum(tl.where((ia[None, :] <= ia[:, None]) & keep_a[None, :], wa[None, :], 0.0), 1)
        first = tl.min(tl.where(keep_a & (upto > t), ia, 2147483647), 0)
        if first < 2147483647:
            tl.store(tok_ptr + row, first.to(tl.int64))
        elif kept_b > 0:  # the (drop_b + r)-th element of B in index order
            r = ((t - wsum) / eb).to(tl.int32)
            want = drop_b + tl.minimum(tl.maximum(r, 0), kept_b - 1)
            if nb <= BMAX:  # all of B's indices were kept: rank them
                jb = tl.arange(0, BMAX)
                bm = jb < nb
                ib = tl.load(w + 776 + jb, mask=bm, other=2147483647)
                rank = tl.sum(((ib[None, :] < ib[:, None]) & bm[None, :]).to(tl.int32), 1)
                found = tl.min(tl.where(bm & (rank == want), ib, 2147483647), 0)
            else:  # many ties at the k-th value: find it in the row
                cols = tl.arange(0, BLOCK)
                seen = 0
                found = 2147483647
                for c0 in range(0, V, BLOCK):
                    c = c0 + cols
                    m = c < V
                    eq = m & (_order16(tl.load(base + c, mask=m, other=0.0)) == kth)
                    rk = seen + tl.cumsum(eq.to(tl.int32), 0) - 1
                    found = tl.minimum(found, tl.min(tl.where(eq & (rk == want), c, 2147483647), 0))
                    seen += tl.sum(eq.to(tl.int32), 0)
            tl.store(tok_ptr + row, found.to(tl.int64))
        else:  # (t rounded up to the whole weight) the last kept element of A in index order
            tl.store(tok_ptr + row, tl.max(tl.where(keep_a, ia, -1), 0).to(tl.int64))
    tl.debug_barrier()  # (every read of the work buffer is done) zero it for the next step
    tl.store(w + bins, tl.zeros([256], tl.int32))
    tl.store(w + 256 + bins, tl.zeros([256], tl.int32))
    z4 = tl.arange(0, 4)
    tl.store(w + 512 + z4, tl.zeros([4], tl.int32), mask=z4 < 3)  # counts and the bad mark
    tl.store(w + 1032 + bins, tl.zeros([256], tl.int32))  # the screened head's counts (ScreenHead.pick)
    tl.store(w + 1288 + bins, tl.zeros([256], tl.int32))


_KERNEL_FUNCS = (_ln_kernel, _prefill_rotary_kernel, _decode_attn_kernel, _attn_combine_kernel, _pick_kernel,
                 _bookkeep_kernel, _screen_kernel, _cand_kernel, _head_kernel, _sample_pass_kernel,
                 _sample_pick_kernel)
_HELPER_FUNCS = (_f32_order, _non_finite, _no_key, _argmax_key, _head_rows, _kv_tile, _attn_tile,
                 _attn_share, _order16, _kth_bin)  # jitted, rebound by name


def available() -> bool:
    """A CUDA GPU is visible and Triton imports (the same test as cuda_kernels)."""
    from .cuda_kernels import available as kernels_available
    return kernels_available()


def _build():
    global tl, _KERNELS, _pdl_start, _pdl_wait
    if _KERNELS is not None:
        return _KERNELS
    with _BUILD_LOCK:
        if _KERNELS is None:
            triton = importlib.import_module("triton")
            tl = importlib.import_module("triton.language")
            helpers = jit_helpers()
            _pdl_start, _pdl_wait = helpers.pdl_start, helpers.pdl_wait
            g = globals()
            g["_gemv_rows"] = helpers.gemv_rows  # (the screened head's INT8 main loop)
            g["_sum_splits"] = helpers.sum_splits  # (the LayerNorm that folds in a split-K reduction)
            for fn in _HELPER_FUNCS:
                if not isinstance(g[fn.__name__], triton.runtime.JITFunction):
                    g[fn.__name__] = ck_jit_helper(triton, fn)
            jitted = {}
            for fn in _KERNEL_FUNCS:
                jitted[fn.__name__.strip("_")] = ck_jit(triton, fn)
            _KERNELS = jitted
    return _KERNELS


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# Launch helpers (also used by the tests against torch references).

def layer_norm(a: torch.Tensor, weight, bias, eps: float, residual: Optional[torch.Tensor] = None,
               alpha: float = 1.0, out: Optional[torch.Tensor] = None, pdl=0,
               ids: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
               norms: Optional[torch.Tensor] = None, partials: Optional[tuple] = None) -> torch.Tensor:
    """Rows of ``a`` [rows, N]: LN(a), or LN(round(round(a*alpha) + residual)) when residual is given.
    ids (contiguous integer tensor): the rows are ``a[ids.flatten()].to(dtype)`` instead (a = the
    embedding table; no residual), output [ids.numel(), N] in dtype (default a's).
    norms (fp32 [rows, 2]): also receives each output row's sum of squares and sum of magnitudes.
    partials (one row, instead of residual): (ws, scale, bias) of a split-K GEMV
    (cuda_kernels.gemv_partials: fp32 [splits, N], the linear's scale and bias or None); the residual
    is their reduction, rounded as cuda_kernels' split-K reduce kernel rounds it.
    pdl: programmatic dependent launch level (cuda_kernels.launch_options; decode step only)."""
    fold = dict(rs_ptr=weight, rb_ptr=weight)  # (unused without partials)
    if partials is not None:
        ws, rs, rb = partials
        assert residual is None and ids is None and a.shape[0] == 1, "partials: one row, no residual"
        assert ws.dtype == torch.float32 and ws.dim() == 2 and ws.shape[1] == a.shape[1] and ws.stride(1) == 1
        residual = ws  # (r_ptr / stride_r: the splits)
        fold = dict(rs_ptr=rs, rb_ptr=rb if rb is not None else rs, RSPLIT=ws.shape[0], RBIAS=rb is not None)
    k = _build()
    n = a.shape[1]
    if ids is not None:
        assert residual is None and ids.is_contiguous()
        rows = ids.numel()
        if out is None:
            out = torch.empty((rows, n), dtype=dtype or a.dtype, device=a.device)
    else:
        rows = a.shape[0]
        out = torch.empty_like(a) if out is None else out
    r = residual if residual is not None else a
    block = _pow2(n)
    k["ln_kernel"][(rows,)](a, r, weight, bias, out, ids if ids is not None else a,
                            norms if norms is not None else out, n, a.stride(0), r.stride(0),
                            out.stride(0), float(alpha), float(eps), HAS_RES=residual is not None, BLOCK=block,
                            GATHER=ids is not None, NORMS=norms is not None, **fold,
                            num_warps=(LN_WARPS["small" if rows <= 2 else "large"] if block >= 2048 else 4),
                            **_launch(pdl))
    return out


def gelu_(x: torch.Tensor, pdl=0) -> torch.Tensor:
    """In-place tanh GELU with the eager rounding (x contiguous); cuda_kernels.gelu_."""
    return _ck_gelu(x, pdl=pdl)


# The screened LM head (kernels above): "auto" runs it for INT4 models (batch-1 decode steps, greedy or top-k),
# "1" for every model, "0" never; model.config.screen_lm_head (True / False / "auto") overrides. Not
# by default for INT8: its copy adds 0.5 GB (the head's rows at one byte each) to the INT8 model's
# footprint, against the 7.5 GiB goal at a 2048-token context.
SCREEN_HEAD = os.environ.get("CHATGLM_SCREEN_HEAD", "auto")
SCREEN_CFG = dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, EV="evict_first", num_warps=4)  # the INT8 GEMV's
SCREEN_SPAN = 1024  # vocabulary entries per candidate program
SCREEN_MAX_LOCAL = 32  # candidates one program computes (greedy); more: the whole head runs instead
SCREEN_MAX_K = 256  # sampling steps are screened when they keep the top k <= this (top_k set)
SCREEN_MAX_LOCAL_TOPK = 128  # the same for those
HEAD_BLOCK_N = 8  # rows per block of the whole head (fallback)
_SCREEN_CHUNK = 2048  # rows per step when building the copy (float64 temporaries)


def _head_block_k(K: int) -> int:
    return min(512, _pow2(K))


def _head_programs(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


class ScreenHead:
    """The LM head's INT8 copy and per-row bounds for the screened head (kernels above): q [V, K]
    int8 with a per-row fp32 scale s = max|w| / 127, the residual norm rn = ||w - s q||_2 (float64,
    rounded up) and mx = max|w|. Built on the head's device from its fp16/bf16 weight w [V, K]."""

    def __init__(self, w: torch.Tensor):
        V, K = w.shape
        dev = w.device
        self.shape = (V, K)
        self.ptr = w.data_ptr()
        self.q = torch.empty(V, K, dtype=torch.int8, device=dev)
        self.s = torch.empty(V, dtype=torch.float32, device=dev)
        self.rn = torch.empty(V, dtype=torch.float32, device=dev)
        self.mx = torch.empty(V, dtype=torch.float32, device=dev)
        self.fill(w)

    @torch.no_grad()
    def fill(self, w: torch.Tensor):
        """(Re)compute the copy from w in place (captured graphs keep reading these buffers)."""
        for i in range(0, self.shape[0], _SCREEN_CHUNK):
            wc = w[i:i + _SCREEN_CHUNK].double()
            mx = wc.abs().amax(dim=1)
            s = (mx / 127).float()
            sd = s.double()
            q = torch.round(wc / torch.where(sd > 0, sd, 1.0)[:, None]).clamp_(-127, 127)
            rn = torch.linalg.vector_norm(wc - q * sd[:, None], dim=1)
            self.q[i:i + _SCREEN_CHUNK] = q.to(torch.int8)
            self.s[i:i + _SCREEN_CHUNK] = s
            self.rn[i:i + _SCREEN_CHUNK] = (rn * (1 + 1e-6)).float()
            self.mx[i:i + _SCREEN_CHUNK] = mx.float()
        self.version = w._version

    def pick(self, x: torch.Tensor, w: torch.Tensor, key, flag, scr, hi, norms, check: bool = False,
             pdl_screen=0, pdl=0, top_k: int = 0, lo=None, y=None, work=None):
        """Greedy pick for one row x [1, K] (contiguous; norms [1, 2] = its sum x^2, sum |x|, e.g. from
        layer_norm(norms=)): key[0] gets the _argmax_key of the token (atomic max; reset by the caller),
        flag[0] = 1 when check and a logit is not finite (only the whole head can see one: the screen
        sends every such step there); scr = [INT32_MIN, 0, n] on entry, hi: fp32 [V] scratch.
        top_k > 0 (sampling; key, flag unused): y [1, V] gets the exact logits of every row that may be
        among the top_k (every row when undecided) and the dtype's lowest finite value elsewhere, which
        top-k, and whatever follows it, treats as the whole head's logits; lo: fp32 [V] scratch; work: int32
        [>= 512] zeros (a row's sample_tokens work buffer from _SAMPLE_SCREEN, which the pick zeroes again): the
        threshold comes from a radix count of the lower bounds instead of torch.topk (sampling only)."""
        k = _build()
        V, K = self.shape
        cfg = dict(SCREEN_CFG)
        block_n, block_kw = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_KW")
        KW = K // 4
        xvec = 2 if x.dtype == torch.float16 else 1
        xv = torch.as_strided(x, (K,), (1,)).view(torch.int64)
        dt = x.dtype
        u = 2.0 ** -24
        rel = 2.0 ** -_MANTISSA[dt]  # twice the output rounding's relative half-ulp
        if top_k:
            y.fill_(torch.finfo(dt).min)
        k["screen_kernel"][(triton_cdiv(V, block_n),)](
            x, xv, self.q.view(torch.int32), self.q, self.s, self.rn, self.mx, norms, hi, lo if top_k else hi, scr,
            V, KW, 2.5 * K * u, 1.0 + 4.0 * K * u + 1e-6, rel, float(torch.finfo(dt).max), BLOCK_N=block_n,
            BLOCK_KW=block_kw, EVEN_K=KW % block_kw == 0, XVEC=xvec, ASM=not interpreting(), STORE_LO=bool(top_k),
            **cfg, **_launch(pdl_screen))
        hist = top_k and work is not None
        if hist:  # the threshold's counts (two passes over the lower bounds; the candidates kernel finishes it)
            for step in (1, 2):
                k["sample_pass_kernel"][(1, triton_cdiv(V, _SAMPLE_BLOCK))](
                    lo, work, scr, V, V, top_k, work.stride(0), BMAX=16, BLOCK=_SAMPLE_BLOCK, PASS=step, PROC=False,
                    KEY32=True, num_warps=4)
        elif top_k:  # the threshold: the k-th largest lower bound (its order key, as the greedy atomic max leaves)
            bits = torch.topk(lo, top_k).values[-1:].view(torch.int32)
            scr[:1].copy_(torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits))
        bk = _head_block_k(K)
        k["cand_kernel"][(triton_cdiv(V, SCREEN_SPAN),)](
            hi, scr, x, w, key if not top_k else scr, y if top_k else x, work if hist else scr, V, K, w.stride(0),
            top_k, SPAN=SCREEN_SPAN, MAX_LOCAL=SCREEN_MAX_LOCAL_TOPK if top_k else SCREEN_MAX_LOCAL, R=HEAD_BLOCK_N,
            BLOCK_K=bk, LOG_K=bk.bit_length() - 1, STORE=bool(top_k), HIST=bool(hist), num_warps=4, **_launch(pdl))
        if top_k:
            _run_head(x, w, y, None, None, scr, cond=True, pdl=pdl)
        else:
            _run_head(x, w, None, key, flag, scr, check=check, cond=True, pdl=pdl)


_MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}
_SCR_START = [-(1 << 31), 0, 0]  # a slot's screen state: threshold key, "undecided" flag, undecided steps
# "auto" switches the screen off for a model whose steps go to the whole head this often (then the screen
# costs more than it saves): checked after each generation once SCREEN_MIN_STEPS steps were screened.
SCREEN_MAX_FALLBACK = 0.25
SCREEN_MIN_STEPS = 64


def _run_head(x, w, y, key, flag, scr, check=False, cond=False, pdl=0):
    k = _build()
    V, K = w.shape
    bk = _head_block_k(K)
    grid = (max(1, min(triton_cdiv(V, HEAD_BLOCK_N), _head_programs(x.device))),)
    k["head_kernel"][grid](x, w, y if y is not None else x, key if key is not None else x,
                           flag if flag is not None else x, scr if scr is not None else x, V, K, w.stride(0),
                           BLOCK_N=HEAD_BLOCK_N, BLOCK_K=bk, LOG_K=bk.bit_length() - 1, STORE=y is not None,
                           PICK=key is not None, CHECK=check, COND=cond, num_warps=4, **_launch(pdl))


def head_logits(x: torch.Tensor, w: torch.Tensor, key: Optional[torch.Tensor] = None,
                flag: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The whole head for one row x [1, K] by the kernel the screen falls back to (and whose per-row
    arithmetic computes its candidates): logits [1, V] in x's dtype; with key / flag, also its greedy
    key (atomic max into key[0]) and non-finite flag."""
    y = torch.empty(1, w.shape[0], dtype=x.dtype, device=x.device)
    _run_head(x, w, y, key, flag, None, check=flag is not None)
    return y


def _screen_setting(model):
    value = getattr(model.config, "screen_lm_head", None)
    if value is None:
        value = SCREEN_HEAD
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    if text == "auto":
        return "auto"
    raise ValueError(f"screen_lm_head / CHATGLM_SCREEN_HEAD must be auto, 1 or 0 (got {value!r})")


def _screen_wanted(model, state: "_State") -> bool:
    setting = _screen_setting(model)
    if setting == "auto":
        setting = state.weight_kind == 4 and not state.screen_off
    w = model.lm_head.weight
    return bool(setting) and w.dim() == 2 and w.shape[1] % 4 == 0 and w.stride(1) == 1 and \
        w.dtype in (torch.float16, torch.bfloat16) and w.dtype == state.dtype and w.device == state.device


def _refresh_screen(model, state: "_State"):
    """Build, refresh (the head's weight changed in place) or drop the model's screened head."""
    want = _screen_wanted(model, state)
    w = model.lm_head.weight
    scr = state.screen
    if scr is not None and (not want or scr.ptr != w.data_ptr() or scr.shape != tuple(w.shape)):
        state.drop_screen()
        scr = None
    if want:
        if scr is None:
            state.screen = ScreenHead(w.detach())
        elif scr.version != w._version:
            scr.fill(w.detach())


def _screen_account(model, state: "_State", run: "_Run") -> None:
    """After a generation: add its screened steps and those sent to the whole head to the model's
    counts (shown by last_decision); "auto" stops screening a model where the whole head ran too often."""
    if not run.screened:
        return
    steps = run.produced - 1  # (the first token comes from the prompt's logits)
    if steps <= 0:
        return
    undecided = int(run.slot.scr[2])
    state.screen_steps += steps
    state.screen_undecided += undecided
    decision = getattr(model, "_fast_decode_decision", None)
    if isinstance(decision, dict):
        decision["screen"] = f"{state.screen_undecided} of {state.screen_steps} screened steps ran the whole head"
    if _screen_setting(model) == "auto" and state.screen_steps >= SCREEN_MIN_STEPS and \
            state.screen_undecided > SCREEN_MAX_FALLBACK * state.screen_steps:
        state.screen_off = True
        state.drop_screen()
        warnings.warn(f"chatglm6b: the screened LM head could not decide {state.screen_undecided} of "
                      f"{state.screen_steps} screened steps (each then also ran the whole head); it is off for this "
                      f"model from now on (CHATGLM_SCREEN_HEAD=1 keeps it on)", RuntimeWarning)


def _screens(state: "_State", slot, plan_key) -> bool:
    """This step uses the screened head: batch 1, greedy or sampling from the top k <= SCREEN_MAX_K, no
    logits kept for debugging."""
    if state.screen is None or slot.batch != 1 or state.debug_logits:
        return False
    return plan_key[0] == "greedy" or 0 < plan_key[2] <= SCREEN_MAX_K


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _scale_for(layer_index: int, head_dim: int) -> Tuple[float, float]:
    """(sqrt(d) * coeff, coeff). The eager `q / python_float` is an IEEE fp32 division by the
    float-rounded scalar on CUDA; the kernels divide the same way (div_rn)."""
    coeff = float(layer_index + 1)
    denom = torch.tensor(math.sqrt(head_dim) * coeff, dtype=torch.float32).item()
    return denom, coeff


def prefill_rotary(qkv: torch.Tensor, cos_t, sin_t, position_ids: torch.Tensor, b: int, s: int, heads: int,
                   head_dim: int, denom: float, k_out=None, v_out=None):
    """qkv [b*s, 3*heads*head_dim] -> (q scaled, k, v), each [b, heads, s, head_dim]: q a view of a
    contiguous [b, s, heads, head_dim]; k / v into k_out / v_out when given (views [b, heads, s,
    head_dim] whose positions are contiguous rows of head_dim, with equal strides: the KV cache's
    first s slots), else fresh contiguous."""
    k = _build()
    # q is stored [b, s, heads, head_dim] (returned as the transposed view): SDPA then writes its
    # output in that layout too, and the output's transpose back to [b*s, hidden] is free
    q_out = torch.empty((b, s, heads, head_dim), dtype=qkv.dtype, device=qkv.device).transpose(1, 2)
    if k_out is None:
        k_out = torch.empty((b, heads, s, head_dim), dtype=qkv.dtype, device=qkv.device)
        v_out = torch.empty_like(k_out)
    assert k_out.shape == v_out.shape == q_out.shape and k_out.stride() == v_out.stride()
    assert k_out.stride(3) == 1 and k_out.stride(2) == head_dim
    k["prefill_rotary_kernel"][(b * s,)](
        qkv, cos_t, sin_t, position_ids, q_out, k_out, v_out, s, heads, qkv.stride(0),
        position_ids.stride(0), position_ids.stride(1), cos_t.stride(0), k_out.stride(0), k_out.stride(1), denom,
        D=head_dim, BLOCK_H=_pow2(heads), num_warps=4)
    return q_out, k_out, v_out


def step_cos_sin(cs_table, pos) -> torch.Tensor:
    """[b, 2 channels, cos half | sin half] for positions pos [b, 2] (once per step, for all layers);
    cs_table [positions, head_dim] = cat(cos, sin) rows (see _State.rotary_tables)."""
    return cs_table[pos]


def decode_attention(qkv, k_cache, v_cache, cs, cur, pad, out, denom, coeff, splits, scratch=None, cfg=None,
                     pdl=0):
    """One decode step of attention for every row and head (see _decode_attn_kernel).

    qkv [b, 3*H*D]; k_cache/v_cache [b, H, S, D]; cs [b, 2, D] from step_cos_sin; cur [1] int32 (slot
    of the new token); pad [b] int32 (left-pad slots per row); out [b, H*D]; scratch: (max, sum,
    acc, ticket counters) for splits > 1, from attention_scratch."""
    k = _build()
    b, heads, length, head_dim = k_cache.shape
    cfg = dict(_attn_cfg(b) if cfg is None else cfg)
    inline = bool(cfg.pop("INLINE"))
    block_s = cfg.pop("BLOCK_S")
    cfg.pop("TARGET", None)
    if cfg.get("CHUNK") and not inline:
        raise ValueError("decode attention: CHUNK (splits that follow the context) needs INLINE (the in-kernel merge)")
    if splits > 1:
        pm, pl, pacc, cnt = scratch
    else:
        pm = pl = pacc = out
        cnt = cur
    k["decode_attn_kernel"][(b * heads, splits)](
        qkv, k_cache, v_cache, cs, cur, pad, out, pm, pl, pacc, cnt,
        heads, qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0),
        denom, coeff, D=head_dim, BLOCK_S=block_s, SPLITS=splits, INLINE=inline, **cfg, **_launch(pdl))
    if splits > 1 and not inline:
        k["attn_combine_kernel"][(b * heads,)](pm, pl, pacc, out, heads, out.stride(0), D=head_dim, SPLITS=splits,
                                               num_warps=4, **_launch(pdl))
    return out


def _attn_cfg(batch: int) -> dict:
    return ATTN_CFG["small" if batch <= 2 else "large"]


def attention_scratch(batch: int, heads: int, head_dim: int, splits: int, device):
    n = batch * heads * splits
    return (torch.empty(n, dtype=torch.float32, device=device), torch.empty(n, dtype=torch.float32, device=device),
            torch.empty(n, head_dim, dtype=torch.float32, device=device),
            torch.zeros(batch * heads, dtype=torch.int32, device=device))


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def attention_splits(batch: int, heads: int, length: int, target: Optional[int] = None) -> int:
    """Splits of each (row, head)'s context so that a layer's attention has about `target` programs
    (the chunks follow the current length on the GPU, so short contexts split finely too)."""
    target = _attn_cfg(batch)["TARGET"] if target is None else target
    want = _pow2_floor(max(1, target // max(1, batch * heads)))
    return max(1, min(want, _MAX_SPLITS, _pow2_floor(max(1, length // 128))))


class StaticCache:
    """Preallocated keys/values ``[layers][b, heads, length, head_dim]`` (keys after rotary).

    Duck-types GLMCache: ``update(layer, k, v)`` writes ``k``/``v`` ([b, heads, n, head_dim]) in place
    at the slots ``pos, pos + 1, …`` where ``pos`` is a device tensor (no host sync, capturable)
    and returns the full buffers; callers mask slots past the filled length. ``get_seq_length()``
    is the host-side count of filled slots (kept by whoever advances the cache).
    """

    is_compileable = False

    def __init__(self, num_layers: int, batch: int, heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.kv = torch.zeros((num_layers, 2, batch, heads, length, head_dim), dtype=dtype, device=device)
        self.keys = [self.kv[i, 0] for i in range(num_layers)]
        self.values = [self.kv[i, 1] for i in range(num_layers)]
        self.pos = torch.zeros(1, dtype=torch.int32, device=device)  # next slot to write
        self.length = length
        self.prefix_len = 0
        self.seen = 0  # host mirror of pos (for get_seq_length)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        n = k.shape[2]
        idx = self.pos.long() + torch.arange(n, device=self.pos.device)
        self.keys[layer].index_copy_(2, idx, k.to(self.kv.dtype))
        self.values[layer].index_copy_(2, idx, v.to(self.kv.dtype))
        return self.keys[layer], self.values[layer]

    def advance(self, n: int):
        self.pos += n
        self.seen += n

    def reset(self, n: int = 0):
        self.pos.fill_(n)
        self.seen = n

    def get_seq_length(self, layer: int = 0) -> int:
        return self.seen

    def reorder(self, beam_idx):
        raise NotImplementedError("the static cache serves the CUDA-graph decode loop only (no beam search)")

    def __len__(self):
        return len(self.keys)


# ---------------------------------------------------------------------------------------------
# Decisions.

def _modeling(model):
    return importlib.import_module(type(model).__module__)


def graph_enabled(model) -> bool:
    """The user-facing switch: env CHATGLM_CUDA_GRAPH=0 or model.config.use_cuda_graph=False turn it off."""
    if os.environ.get("CHATGLM_CUDA_GRAPH", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return bool(getattr(model.config, "use_cuda_graph", True))


def _set_decision(model, path: str, reason: str = ""):
    try:
        object.__setattr__(model, "_fast_decode_decision", {"path": path, "reason": reason})
    except Exception:
        pass


def last_decision(model) -> Dict[str, str]:
    """{'path': 'graph' | 'eager', 'reason': why eager} for the model's last generate/stream call."""
    return dict(getattr(model, "_fast_decode_decision", {"path": "none", "reason": "no call yet"}))


def _model_reason(model) -> Optional[str]:
    """Why this model cannot use the fast path (None: it can)."""
    if not graph_enabled(model):
        return "disabled (config.use_cuda_graph / CHATGLM_CUDA_GRAPH)"
    cfg = model.config
    if getattr(cfg, "pre_seq_len", None):
        return "P-tuning prefix (pre_seq_len)"
    if model.training:
        return "model in training mode"
    tr = getattr(model, "transformer", None)
    if tr is None or getattr(model, "lm_head", None) is None:
        return "unexpected model structure"
    emb = tr.word_embeddings.weight
    if emb.device.type != "cuda":
        return f"model on {emb.device.type}, not CUDA"
    hf_map = getattr(model, "hf_device_map", None)
    if hf_map and len({str(v) for v in hf_map.values()}) > 1:
        return "model spread over several devices (device_map)"
    if emb.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {emb.dtype}"
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    if head_dim * heads != cfg.hidden_size or head_dim < 4 or head_dim & (head_dim - 1):
        return "head_dim must be a power of two"
    modeling = _modeling(model)
    linear_types = (modeling.CastLinear, QuantizedLinear)
    for block in tr.layers:
        mods = (block.attention.query_key_value, block.attention.dense, block.mlp.dense_h_to_4h,
                block.mlp.dense_4h_to_h)
        if any(type(m) not in linear_types for m in mods):
            return "linear layers replaced (adapters or hooks)"
        if any(getattr(m, "_forward_hooks", None) or getattr(m, "_forward_pre_hooks", None)
               for m in (block,) + mods):
            return "forward hooks on the blocks"
        if type(block.input_layernorm) is not modeling.CastLayerNorm:
            return "layer norms replaced"
    dev = emb.device
    for p in model.parameters():
        if p.device != dev:
            return "parameters on several devices"
    if not available():
        return "Triton / CUDA kernels unavailable"
    return None


def _processors_ok(model, processors) -> Tuple[bool, list]:
    cls = _modeling(model).InvalidScoreLogitsProcessor
    procs = list(processors or [])
    return all(isinstance(p, cls) for p in procs), procs


class _Plan:
    """What one call asks for, resolved: limit (total length), eos ids, pad id, sampling."""

    def __init__(self, limit, eos, pad_id, do_sample, temperature, top_k, top_p, processors):
        self.limit = int(limit)
        self.eos = [int(e) for e in eos]
        self.pad_id = int(pad_id)
        self.do_sample = bool(do_sample)
        self.temperature = float(temperature) if temperature is not None else 1.0
        self.top_k = int(top_k or 0)
        self.top_p = float(top_p) if top_p is not None else 1.0
        self.processors = processors

    def sample_key(self, vocab: int):
        if not self.do_sample:
            return ("greedy",)
        top_k = min(self.top_k, vocab) if self.top_k > 0 else 0
        return ("sample", self.temperature != 1.0, top_k, self.top_p < 1.0,
                fused_sampling(top_k, self.temperature))


# transformers' GenerationConfig fields: those we interpret, those that do not change greedy /
# sampling output, and neutral values for the rest (anything else non-neutral -> eager path).
_INTERPRETED = {"max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams",
                "num_return_sequences", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
                "decoder_start_token_id"}
_IGNORED = {"transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash",
            "generation_kwargs", "compile_config", "disable_compile", "num_assistant_tokens",
            "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
            "target_lookbehind", "assistant_early_exit", "is_assistant", "max_matching_ngram_size",
            "low_memory", "early_stopping", "length_penalty", "return_legacy_cache", "cache_config",
            "output_attentions", "output_hidden_states", "continuous_batching_config", "prefill_chunk_size",
            "_pad_token_tensor", "_eos_token_tensor", "_bos_token_tensor", "_decoder_start_token_tensor"}
_NEUTRAL = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0,
            "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0, "num_beam_groups": 1,
            "guidance_scale": 1.0, "renormalize_logits": False}
_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
             "num_beams": 1, "num_return_sequences": 1, "use_cache": True}
_GENERATE_ARGS_NONE = ("stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
                       "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate",
                       "tokenizer", "inputs_embeds", "past_key_values", "cache")


def _neutral(name, value) -> bool:
    if value is None or value is False:
        return True
    if isinstance(value, (list, tuple, dict, set)) and not value:
        return True
    if name in _NEUTRAL and value == _NEUTRAL[name]:
        return True
    return False


def _generate_plan(model, input_len: int, kwargs: dict) -> Tuple[Optional[_Plan], str]:
    """Resolve generate() arguments like transformers does, or say why we cannot."""
    extra = dict(kwargs)
    for name in _GENERATE_ARGS_NONE:
        value = extra.pop(name, None)
        if value is not None and value is not False and not (isinstance(value, (list, tuple)) and not value):
            return None, f"generate argument {name!r}"
    if extra.pop("use_model_defaults", None) is False:
        return None, "use_model_defaults=False"
    ok, procs = _processors_ok(model, extra.pop("logits_processor", None))
    if not ok:
        return None, "custom logits processors"
    user_gc = extra.pop("generation_config", None)
    gc = copy.deepcopy(user_gc if user_gc is not None else model.generation_config)
    if user_gc is not None and model.generation_config is not None and int(
            importlib.import_module("transformers").__version__.split(".")[0]) >= 5:
        for key, value in model.generation_config.to_dict().items():  # 5.x fills unset fields from the model's
            if getattr(gc, key, None) is None and not key.startswith("_"):
                setattr(gc, key, value)
    for key, value in _DEFAULTS.items():
        if getattr(gc, key, None) is None:
            setattr(gc, key, value)
    unused = gc.update(**extra)
    if unused:
        return None, f"unsupported generate arguments {sorted(unused)}"
    for key, value in gc.to_dict().items():
        if key in _INTERPRETED or key in _IGNORED or key.startswith("_"):
            continue
        if not _neutral(key, value):
            return None, f"generation setting {key}={value!r}"
    if (gc.num_beams or 1) != 1 or (gc.num_return_sequences or 1) != 1:
        return None, "beam search / several return sequences"
    if gc.use_cache is False:
        return None, "use_cache=False"
    if gc.output_attentions or gc.output_hidden_states:
        return None, "output_attentions / output_hidden_states"
    limit = gc.max_new_tokens + input_len if gc.max_new_tokens is not None else gc.max_length
    if limit is None or limit <= input_len:
        return None, "nothing to generate (max_length <= prompt length)"
    eos = gc.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad_id = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
    if gc.do_sample:
        if gc.temperature is not None and gc.temperature <= 0:
            return None, "temperature <= 0"
        if gc.top_p is not None and not 0 < gc.top_p <= 1:
            return None, "top_p outside (0, 1]"
        if gc.top_k is not None and gc.top_k < 0:
            return None, "top_k < 0"
    return _Plan(limit, eos, pad_id, gc.do_sample, gc.temperature, gc.top_k, gc.top_p, procs), ""


# ---------------------------------------------------------------------------------------------
# Per-model state: rotary tables, slots (cache + static buffers + graphs).

class _Slot:
    """Static buffers, one KV cache and the captured graphs for one (batch, bucket)."""

    def __init__(self, state: "_State", batch: int, length: int):
        cfg, dev, dt = state.cfg, state.device, state.dtype
        self.batch, self.length = batch, length
        self.cache = StaticCache(cfg.num_layers, batch, state.heads, length, state.head_dim, dt, dev)
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 2, dtype=torch.long, device=dev)
        self.pad = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.ids = torch.zeros(batch, length + 1, dtype=torch.long, device=dev)
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=dev)
        self.alive = torch.ones(1, dtype=torch.bool, device=dev)  # any row unfinished after the step
        self.gen_len = torch.zeros(1, dtype=torch.long, device=dev)
        self.eos = torch.full((MAX_EOS,), -1, dtype=torch.long, device=dev)  # -1 never matches a token
        self.pad_id = torch.zeros(1, dtype=torch.long, device=dev)
        self.inv_temperature = torch.ones(1, dtype=torch.float32, device=dev)
        self.top_p_cut = torch.zeros(1, dtype=torch.float32, device=dev)
        self.pick_key = torch.full((batch,), _KEY_EMPTY, dtype=torch.long, device=dev)  # greedy (_pick_kernel)
        self.pick_flag = torch.zeros(1, dtype=torch.int32, device=dev)
        self.sample_work = torch.zeros(batch, _SAMPLE_WORK, dtype=torch.int32, device=dev)  # (sample_tokens)
        if batch == 1:  # the screened LM head's: x's norms, hi per row, [threshold key, fallback flag, fallbacks]
            self.norms = torch.zeros(1, 2, dtype=torch.float32, device=dev)
            self.hi = torch.empty(cfg.vocab_size, dtype=torch.float32, device=dev)
            self.scr = torch.tensor(_SCR_START, dtype=torch.int32, device=dev)
            self.lo = torch.empty(cfg.vocab_size, dtype=torch.float32, device=dev)  # (top-k sampling)
            self.ylogits = torch.empty(1, cfg.vocab_size, dtype=dt, device=dev)
        self.logits = None  # [b, V] copy of each step's logits (debug graphs only)
        self.splits = attention_splits(batch, state.heads, length)
        self.scratch = attention_scratch(batch, state.heads, state.head_dim, self.splits, dev) \
            if self.splits > 1 else None
        self.attn_out = torch.empty(batch, cfg.hidden_size, dtype=dt, device=dev)
        self.graphs: Dict[tuple, Any] = {}
        self.broken: Dict[tuple, str] = {}

    def free(self):
        for g in self.graphs.values():
            try:
                g.reset()
            except Exception:
                pass
        self.graphs.clear()


class _State:
    def __init__(self, model):
        cfg = model.config
        tr = model.transformer
        self.cfg = cfg
        self.device = tr.word_embeddings.weight.device
        self.dtype = tr.word_embeddings.weight.dtype
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.lock = threading.Lock()
        self.slots: "OrderedDict[Tuple[int, int], _Slot]" = OrderedDict()
        self.pool = None
        self.tables: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self.signature = _signature(model)
        # strong references: captured graphs hold raw pointers to these tensors
        self.params = [p for p in model.parameters()] + [b for b in model.buffers()]
        self.debug_logits = False
        # programmatic dependent launch of the decode step's Triton kernels (sm_90+; CHATGLM_PDL=0: off)
        self.pdl = pdl_supported(self.device)
        q = [m for m in model.modules() if type(m) is QuantizedLinear]
        self.weight_kind = q[0].bits if q else 16
        self.screen: Optional[ScreenHead] = None  # the INT8 copy of the LM head (batch-1 steps, _screens)
        self.screen_steps = self.screen_undecided = 0  # steps screened, and of them sent to the whole head
        self.screen_off = False  # "auto" gave up on the screen for this model (_screen_account)
        self.kernel_error = ""  # set when a kernel failed to build: the eager path runs from then on
        self.prefill_compiled_ahead = False  # (cuda_kernels.compile_ahead, opt-in)

    def rotary_tables(self, model, length: int):
        """(cos, sin) [positions, head_dim/2] from the model's own rotary_cos_sin (identical values)
        and their concatenation per position (decode). Captured graphs read these tables: growing
        them drops the graphs."""
        if self.tables is None or self.tables[0].shape[0] < length:
            if self.tables is not None:
                for slot in self.slots.values():
                    slot.free()
            n = max(length, 2 * self.cfg.max_sequence_length)
            modeling = _modeling(model)
            pos = torch.arange(n, device=self.device).view(1, 1, n)
            cos, sin = modeling.rotary_cos_sin(pos, model.transformer._rotary_inv_freq, self.dtype)
            cos, sin = cos.reshape(n, -1).contiguous(), sin.reshape(n, -1).contiguous()
            self.tables = (cos, sin, torch.cat((cos, sin), dim=-1).contiguous())
        return self.tables

    def slot(self, batch: int, length: int) -> _Slot:
        key = (batch, length)
        slot = self.slots.pop(key, None)
        if slot is None:
            while len(self.slots) >= max(1, MAX_SLOTS):
                _, old = self.slots.popitem(last=False)
                old.free()
                del old
            slot = _Slot(self, batch, length)
        self.slots[key] = slot
        return slot

    def free(self):
        for slot in self.slots.values():
            slot.free()
        self.slots.clear()
        self.screen = None

    def drop_screen(self):
        """Forget the screened head and the graphs that read it."""
        for slot in self.slots.values():
            for key in [k for k in slot.graphs if k[-1]]:
                slot.graphs.pop(key).reset()
        self.screen = None


def _signature(model):
    return tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in model.parameters())


_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _state(model) -> _State:
    with _STATES_LOCK:
        st = _STATES.get(model)
        if st is not None and (st.signature != _signature(model) or st.device != model.transformer.word_embeddings.weight.device):
            st.free()  # weights were replaced or moved: captured pointers are stale
            st = None
        if st is None:
            st = _State(model)
            _STATES[model] = st
        return st


def release(model) -> None:
    """Free the model's static caches and CUDA graphs."""
    with _STATES_LOCK:
        st = _STATES.pop(model, None)
    if st is not None:
        st.free()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The forward pieces.

_ALPHA = math.sqrt(2 * 28)


def _alpha(model) -> float:
    return float(getattr(model.transformer.layers[0], "alpha", _ALPHA))


def _additive_mask(bool_mask: torch.Tensor, dtype) -> torch.Tensor:
    """Bool [b, 1, s, s] (True = masked) -> additive float mask, last dim stored 16-aligned for SDPA."""
    b, _, s, _ = bool_mask.shape
    padded = triton_cdiv(s, 16) * 16
    out = torch.zeros((b, 1, s, padded), dtype=dtype, device=bool_mask.device)[..., :s]
    out.masked_fill_(bool_mask, torch.finfo(dtype).min)  # finite: fully padded rows stay finite
    return out


def prefill(model, state: _State, slot: _Slot, input_ids, position_ids, pad_mask) -> torch.Tensor:
    """Run the prompt through the model, filling slot.cache[:, :, :s]; return last-position logits [b, V]."""
    modeling = _modeling(model)
    cfg, tr = state.cfg, model.transformer
    b, s = input_ids.shape
    heads, hd = state.heads, state.head_dim
    alpha = _alpha(model)
    cos_t, sin_t, _ = state.rotary_tables(model, slot.length + 2)
    bool_mask = modeling.build_attention_mask(input_ids, cfg.bos_token_id, pad_mask)
    mask = _additive_mask(bool_mask, state.dtype)
    del bool_mask
    pos = position_ids.to(device=state.device, dtype=torch.long).contiguous()
    layers = tr.layers
    ln0 = layers[0].input_layernorm
    x1 = layer_norm(tr.word_embeddings.weight, ln0.weight, ln0.bias, ln0.eps, ids=input_ids.contiguous(),
                    dtype=state.dtype)  # the embedding lookup fused in
    slot.cache.reset(0)
    which = _group_dequant_positions(model, slot, b * s)
    for i, block in enumerate(layers):
        att = block.attention
        lin = _prefill_linears(block, x1.dtype, which) if which else _linear
        denom, coeff = _scale_for(att.layer_index, hd)
        qkv = lin(att.query_key_value, x1)
        q, k, v = prefill_rotary(qkv, cos_t, sin_t, pos, b, s, heads, hd, denom,
                                 slot.cache.keys[i][:, :, :s], slot.cache.values[i][:, :, :s])
        del qkv
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=coeff)
        del q, k, v
        ctx = ctx.transpose(1, 2).reshape(b * s, heads * hd)
        dense = lin(att.dense, ctx)
        del ctx
        ln = block.post_attention_layernorm
        x2 = layer_norm(x1, ln.weight, ln.bias, ln.eps, residual=dense, alpha=alpha)
        del dense, x1
        h = lin(block.mlp.dense_h_to_4h, x2, act="gelu")
        m = lin(block.mlp.dense_4h_to_h, h)
        del h
        ln = layers[i + 1].input_layernorm if i + 1 < len(layers) else tr.final_layernorm
        x1 = layer_norm(x2, ln.weight, ln.bias, ln.eps, residual=m, alpha=alpha)
        del x2, m
        lin = None  # this layer's weight buffer goes before the next layer's is made
    slot.cache.advance(s)
    last = x1.view(b, s, -1)[:, -1]
    return F.linear(last, model.lm_head.weight.to(last.dtype))


def _block_linears(block) -> tuple:
    """A block's four linears in the order of their use."""
    return (block.attention.query_key_value, block.attention.dense, block.mlp.dense_h_to_4h,
            block.mlp.dense_4h_to_h)


def _dequantized_positions(block, rows: int, dtype) -> Tuple[int, ...]:
    """Positions in `_block_linears` of the linears that a prompt of `rows` tokens runs through
    dequantize + cuBLAS (cuda_kernels._plan; the others run a kernel on the quantized weight at that many
    rows). The blocks are alike, so a prompt asks once, for its first block."""
    mods = _block_linears(block)
    if not all(_kernel_linear(m) is not None for m in mods):
        return ()
    return tuple(i for i, m in enumerate(mods) if dequantizes(rows, m.weight, m.bits, dtype))


def _group_dequant_positions(model, slot: _Slot, rows: int) -> Tuple[int, ...]:
    """The positions in `_block_linears` of the weights that a prompt of `rows` tokens dequantizes at
    once for each layer, or () when it may not: the weights its linears dequantize anyway
    (`_dequantized_positions`), at once (cuda_kernels.dequantize_group: one launch and one
    buffer per layer, 5 ms less host time for 1024 tokens on an H100 host). Only for prompts that the
    linears would not slice (cuda_kernels.DEQUANT_CHUNK_MIN_M), and only when it costs no memory that
    matters: buffer + this slot's KV cache stay within what a full-context generation of the same batch
    holds with one weight's buffer (peak memory at the longest context unchanged), or the GPU has at
    least twice the buffer plus 1 GiB free (a large card; small cards keep the lean path)."""
    if rows >= DEQUANT_CHUNK_MIN_M:
        return ()
    block = model.transformer.layers[0]
    which = _dequantized_positions(block, rows, slot.cache.kv.dtype)
    mods = [_block_linears(block)[i] for i in which]
    if not mods:
        return ()
    per = 2 if mods[0].bits == 4 else 1
    sizes = [m.weight.numel() * per * 2 for m in mods]  # fp16 / bf16 bytes
    kv = slot.cache.kv
    per_position = kv.numel() * kv.element_size() // slot.length
    full = per_position * int(getattr(model.config, "max_sequence_length", 2048) or 2048)
    if sum(sizes) + kv.numel() * kv.element_size() <= max(sizes) + full:
        return which
    free, _ = torch.cuda.mem_get_info(kv.device)
    return which if free >= 2 * sum(sizes) + (1 << 30) else ()


def _prefill_linears(block, dtype, which: Tuple[int, ...]):
    """A `_linear` stand-in for one layer of a prompt: the weights at positions `which` of
    `_block_linears` (those its linears dequantize at the prompt's length: `_dequantized_positions`) are
    dequantized by one kernel launch; each such call is then F.linear on its weight (+ the GELU kernel),
    what cuda_kernels.linear computes for a prompt, bit for bit; the other linears are `_linear`. Falls
    back to `_linear` if the grouped dequantization cannot run."""
    linears = _block_linears(block)
    mods = [linears[i] for i in which]
    bits = mods[0].bits if mods else 0
    ws = None
    if mods and all(m.bits == bits for m in mods):
        ws = dequantize_group([(m.weight, m.weight_scale) for m in mods], bits, dtype)
    if ws is None:
        return _linear
    table = {id(m): w for m, w in zip(mods, ws)}

    def lin(m, x, act: Optional[str] = None, pdl=0):
        w = table.get(id(m))
        if w is None or x.dim() != 2 or x.dtype != dtype:
            return _linear(m, x, act=act, pdl=pdl)
        y = F.linear(x, w, None if m.bias is None else m.bias.to(dtype))
        if act == "gelu":
            gelu_(y)
        return y
    return lin


def _kernel_linear(m):
    """cuda_kernels.linear for a QuantizedLinear that uses the kernels, else None (any other module, the
    torch-dequant linears, CHATGLM_KERNELS=torch)."""
    return kernel_backend("cuda") if type(m) is QuantizedLinear and m.use_kernels else None


def _linear(m, x, act: Optional[str] = None, pdl=0):
    """One of a block's linears (prefill or decode step). A QuantizedLinear that uses the kernels goes
    straight to cuda_kernels.linear (no module call; it can fuse the GELU into its epilogue and launch
    with PDL); anything else (FP16 CastLinear, torch-dequant linears) runs the module, then the GELU
    kernel."""
    kernel = _kernel_linear(m)
    if kernel is not None:
        y = kernel(x, m.weight, m.weight_scale, m.bias, m.bits, act=act, pdl=pdl)
        if y is not None:
            return y
    y = m(x)
    if act == "gelu":
        gelu_(y, pdl=pdl)
    return y


# Batch-1 decode: where a linear's GEMV config splits K (cuda_kernels._GEMV_SHAPE_CFG, SPLIT_K), the LayerNorm
# after it reduces the fp32 partials itself (layer_norm(partials=...)) instead of a reduce kernel between the
# two — one launch less per linear, the same values (the reduction's order and rounding are the reduce
# kernel's). No batch-1 config splits K today; CHATGLM_FOLD_REDUCE=0 keeps the reduce kernel.
FOLD_REDUCE = os.environ.get("CHATGLM_FOLD_REDUCE", "1").strip().lower() not in ("0", "false", "no", "off")


def _linear_residual_ln(m, x, pdl_linear, a, ln, alpha: float, pdl, norms=None):
    """layer_norm(a, ln, residual=_linear(m, x)) — a block's dense / dense_4h_to_h and the LayerNorm after
    it — with a split-K GEMV's reduction folded into the LayerNorm (FOLD_REDUCE, one row)."""
    if FOLD_REDUCE and x.shape[0] == 1 and _kernel_linear(m) is not None:
        ws = gemv_partials(x, m.weight, m.weight_scale, m.bits, pdl=pdl_linear)
        if ws is not None:
            return layer_norm(a, ln.weight, ln.bias, ln.eps, alpha=alpha, pdl=pdl, norms=norms,
                              partials=(ws, m.weight_scale, m.bias))
    return layer_norm(a, ln.weight, ln.bias, ln.eps, residual=_linear(m, x, pdl=pdl_linear), alpha=alpha, pdl=pdl,
                      norms=norms)


def _pdl_levels(state: _State, slot: _Slot) -> Tuple[Dict[str, int], int]:
    """({linear name: level}, small kernels' level): programmatic-dependent-launch levels of this decode
    step (cuda_kernels.launch_options), from PDL_MODE, EARLY_LINEARS and LATE_TRIGGER by weight kind and
    batch."""
    if not state.pdl:
        return dict.fromkeys(_LINEAR_NAMES, 0), 0
    key = (state.weight_kind, "small" if slot.batch <= 2 else "large")
    lin, small = {"off": (0, 0), "small": (1, 2), "all": (2, 2)}[PDL_MODE.get(key, "off")]
    one = (state.weight_kind, "b1")
    early = EARLY_LINEARS.get(one, EARLY_LINEARS.get(key, ())) if slot.batch == 1 else EARLY_LINEARS.get(key, ())
    late = LATE_TRIGGER.get(one, ()) if slot.batch == 1 else ()
    levels = {n: (2 if n in early and small else lin) for n in _LINEAR_NAMES}
    return {n: (v + 2 if v and n in late else v) for n, v in levels.items()}, small


def _decode_body(model, state: _State, slot: _Slot, plan_key, processors):
    """One decode step on the slot's static buffers (what the CUDA graph captures)."""
    tr = model.transformer
    layers = tr.layers
    alpha = _alpha(model)
    pdl_lin, pdl = _pdl_levels(state, slot)
    cs = step_cos_sin(state.tables[2], slot.pos)  # [b, 2, D]: this step's rotary, shared by all layers
    ln = layers[0].input_layernorm
    x1 = layer_norm(tr.word_embeddings.weight, ln.weight, ln.bias, ln.eps, pdl=pdl, ids=slot.tok, dtype=state.dtype)
    cache = slot.cache
    screen = state.screen if _screens(state, slot, plan_key) else None
    for i, block in enumerate(layers):
        att = block.attention
        denom, coeff = _scale_for(att.layer_index, state.head_dim)
        qkv = _linear(att.query_key_value, x1, pdl=pdl_lin["qkv"])
        ctx = decode_attention(qkv, cache.keys[i], cache.values[i], cs, cache.pos, slot.pad, slot.attn_out, denom,
                               coeff, slot.splits, slot.scratch, pdl=pdl)
        x2 = _linear_residual_ln(att.dense, ctx, pdl_lin["dense"], x1, block.post_attention_layernorm, alpha, pdl)
        h = _linear(block.mlp.dense_h_to_4h, x2, act="gelu", pdl=pdl_lin["h_to_4h"])  # GELU in the epilogue
        last = i + 1 == len(layers)
        ln = tr.final_layernorm if last else layers[i + 1].input_layernorm
        x1 = _linear_residual_ln(block.mlp.dense_4h_to_h, h, pdl_lin["4h_to_h"], x2, ln, alpha, pdl,
                                 norms=slot.norms if screen is not None and last else None)
    if screen is not None and plan_key[0] == "greedy":  # the screened head picks the token (into pick_key)
        screen.pick(x1, model.lm_head.weight, slot.pick_key, slot.pick_flag, slot.scr, slot.hi, slot.norms,
                    check=bool(processors), pdl_screen=pdl_lin["qkv"], pdl=pdl)
        _bookkeep(slot, 2 if processors else 1, screen=True)
        return
    if screen is not None:  # top-k sampling: exact logits where they can make the top k
        screen.pick(x1, model.lm_head.weight, None, None, slot.scr, slot.hi, slot.norms, pdl_screen=pdl_lin["qkv"],
                    pdl=pdl, top_k=plan_key[2], lo=slot.lo, y=slot.ylogits,
                    work=slot.sample_work[:1, _SAMPLE_SCREEN:] if _fused(plan_key) else None)
        _bookkeep(slot, _choose(slot.ylogits, slot, plan_key, processors), screen=True)
        return
    logits = F.linear(x1, model.lm_head.weight.to(x1.dtype))
    if state.debug_logits:
        slot.logits.copy_(logits)
    nxt = _choose(logits, slot, plan_key, processors)
    _bookkeep(slot, nxt)


def _choose(logits, slot: _Slot, plan_key, processors):
    """Next token per row: InvalidScore fix-up, then argmax or HF-equivalent sampling (no host sync).
    Returns the tokens [b] (sampling) or, greedy, the bookkeeping kernel's KEYS mode (an int)."""
    if plan_key[0] == "greedy":
        # argmax of the fp16 logits (that of their fp32 copy), in _pick_kernel; the bookkeeping kernel
        # reads the result. InvalidScoreLogitsProcessor (the only processor allowed here) turns every
        # row to "token 5" if any score is NaN/inf. Returns the bookkeeping kernel's KEYS mode.
        k = _build()
        b, V = logits.shape
        block = 4096
        k["pick_kernel"][(b, triton_cdiv(V, block))](logits, slot.pick_key, slot.pick_flag, V, logits.stride(0),
                                                     BLOCK=block, CHECK=bool(processors), num_warps=4)
        return 2 if processors else 1
    if _fused(plan_key) and logits.dtype in (torch.float16, torch.bfloat16):
        return sample_tokens(logits, plan_key, bool(processors), slot.inv_temperature, slot.top_p_cut,
                             slot.pick_flag, work=slot.sample_work)
    scores = logits.float()
    for proc in processors:
        scores = proc(slot.ids, scores)
    probs = warp(scores, plan_key, slot.inv_temperature, slot.top_p_cut).softmax(dim=-1)
    if compiling_ahead():  # (the logits are garbage then: multinomial could trip a device assert on NaN)
        return torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


def warp(scores, plan_key, inv_temperature, top_p_cut):
    """Temperature, top-k, top-p on fp32 scores [b, V], as transformers' warpers do (ties at the k-th
    value are kept; top-p keeps at least one token); removed entries become -inf."""
    temp_on, top_k, top_p_on = plan_key[1:4]
    if temp_on:
        scores = scores * inv_temperature  # transformers: scores / T, computed by torch as scores * (1/T)
    if top_k:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p_on:
        ordered, order = torch.sort(scores, dim=-1)  # ascending
        cum = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= top_p_cut
        drop[:, -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


SAMPLE_KERNEL = os.environ.get("CHATGLM_SAMPLE_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")
SAMPLE_MAX_K = 256  # top_k served by sample_tokens (larger or none: transformers' warpers in torch ops)
# InvalidScoreLogitsProcessor's 5e4 makes token 5 certain (every other probability exp(-5e4 / T) is 0 in
# fp32) for T up to ~400; above this the torch ops run
SAMPLE_MAX_TEMPERATURE = 100.0
_SAMPLE_BLOCK = 4096  # vocabulary entries per program of a pass
_SAMPLE_BMAX = 256  # indices of ties at the k-th value kept (more: the pick kernel scans the row for one)
_SAMPLE_WORK = 1544  # int32 per row (layout above _sample_pass_kernel)
_SAMPLE_SCREEN = 1032  # where in it the screened head's counts start (ScreenHead.pick's work)


def _fused(plan_key) -> bool:
    """The plan key samples with sample_tokens (its fifth entry, fused_sampling's answer)."""
    return plan_key[0] == "sample" and len(plan_key) > 4 and bool(plan_key[4])


def fused_sampling(top_k: int, temperature: float) -> bool:
    """Whether sampling with these settings runs sample_tokens (part of a plan's graph key)."""
    return SAMPLE_KERNEL and 0 < top_k <= SAMPLE_MAX_K and 0.0 < temperature <= SAMPLE_MAX_TEMPERATURE


def sample_tokens(logits: torch.Tensor, plan_key, processors: bool, inv_temperature: torch.Tensor,
                  top_p_cut: torch.Tensor, flag: torch.Tensor, u: Optional[torch.Tensor] = None,
                  work: Optional[torch.Tensor] = None):
    """Draw one token per row of fp16 / bf16 logits [b, V] as transformers' temperature / top-k / top-p
    warpers, softmax and multinomial would (_sample_pass_kernel x 3, _sample_pick_kernel; no host sync).
    u: uniform numbers [b] (default torch.rand); work: int32 [>= b, _SAMPLE_WORK], zero (left zero;
    default a new one). Returns the tokens [b] (int64), or (tokens, True) with processors (what _bookkeep
    takes: it turns every row to token 5 when flag[0] is 1). flag[0] becomes 2 when a row has NaN or
    +inf and there is no processor (the generation then raises)."""
    k = _build()
    b, V = logits.shape
    top_k = plan_key[2]
    dev = logits.device
    if u is None:
        u = torch.rand(b, device=dev, dtype=torch.float32)
    if work is None:
        work = torch.zeros(b, _SAMPLE_WORK, dtype=torch.int32, device=dev)
    kmax = max(16, _pow2(top_k))
    tok = torch.empty(b, dtype=torch.long, device=dev)
    grid = (b, triton_cdiv(V, _SAMPLE_BLOCK))
    for step in (1, 2, 3):
        k["sample_pass_kernel"][grid](logits, work, flag, V, logits.stride(0), top_k, work.stride(0),
                                      BMAX=_SAMPLE_BMAX, BLOCK=_SAMPLE_BLOCK, PASS=step, PROC=processors, num_warps=4)
    k["sample_pick_kernel"][(b,)](logits, work, u, inv_temperature, top_p_cut, tok, V, logits.stride(0), top_k,
                                  work.stride(0), KMAX=kmax, BMAX=_SAMPLE_BMAX, BLOCK=_SAMPLE_BLOCK,
                                  TEMP=bool(plan_key[1]), TOPP=bool(plan_key[3]), num_warps=4)
    return (tok, True) if processors else tok


def _bookkeep(slot: _Slot, nxt, screen: bool = False):
    """Record the step's tokens (pad for finished rows), update eos state, advance one position.
    nxt: the tokens [b], or _choose's KEYS mode (greedy: the tokens are in slot.pick_key), or
    (tokens, True) from sample_tokens with the InvalidScore processor (token 5 when the flag is set).
    screen: the step ran the screened head (its threshold / flag in slot.scr are reset)."""
    k = _build()
    flag5 = isinstance(nxt, tuple)
    if flag5:
        nxt = nxt[0]
    keys = nxt if isinstance(nxt, int) else 0
    k["bookkeep_kernel"][(1,)](slot.pick_key if keys else nxt, slot.unfinished, slot.eos, slot.pad_id, slot.ids,
                               slot.tok, slot.pos, slot.cache.pos, slot.alive, slot.gen_len, slot.pick_key,
                               slot.pick_flag, slot.scr if screen else slot.pick_flag, slot.batch,
                               slot.ids.stride(0), NEOS=MAX_EOS, BLOCK_B=_pow2(slot.batch), KEYS=keys,
                               SCREEN=screen, FLAG5=flag5, num_warps=1)


def _bookkeep_torch(slot: _Slot, nxt: torch.Tensor):
    """The same bookkeeping in torch ops (the reference for the kernel in the tests)."""
    slot.gen_len += slot.unfinished.any().long()
    nxt = torch.where(slot.unfinished, nxt, slot.pad_id)
    where = (slot.cache.pos.long() + 1).expand(slot.batch).unsqueeze(1)
    slot.ids.scatter_(1, where, nxt.unsqueeze(1))
    slot.unfinished &= ~(nxt[:, None] == slot.eos[None, :]).any(dim=1)
    slot.alive.copy_(slot.unfinished.any().view(1))
    slot.tok.copy_(nxt)
    slot.pos[:, 1] += 1
    slot.cache.pos += 1


def _graph_key(plan_key, processors, debug: bool, screen: bool = False):
    # every allowed processor is the (idempotent) InvalidScore fix-up: only whether there is one matters;
    # last: whether the step runs the screened head (State.drop_screen looks for it there)
    return plan_key + (bool(processors), bool(debug), bool(screen))


def _graph_for(model, state: _State, slot: _Slot, plan_key, processors):
    """The slot's CUDA graph for this sampling mode, captured on first use (None if capture fails)."""
    key = _graph_key(plan_key, processors, state.debug_logits, _screens(state, slot, plan_key))
    g = slot.graphs.get(key)
    if g is not None or key in slot.broken:
        return g
    if state.debug_logits and slot.logits is None:  # kept once made: debug graphs hold its address
        slot.logits = torch.empty(slot.batch, model.lm_head.weight.shape[0], dtype=state.dtype, device=state.device)
    saved = [t.clone() for t in (slot.tok, slot.pos, slot.ids, slot.unfinished, slot.alive, slot.gen_len,
                                 slot.cache.pos)]
    rng = torch.cuda.get_rng_state(state.device)
    try:
        side = torch.cuda.Stream(device=state.device)
        side.wait_stream(torch.cuda.current_stream(state.device))
        with torch.cuda.stream(side):
            if ahead_workers() > 1:  # compile this step's kernels in parallel first (opt-in)
                with compile_ahead(state.device):
                    slot.cache.pos.fill_(0)
                    _decode_body(model, state, slot, plan_key, processors)
            for _ in range(2):  # compiles every kernel for these shapes (capture cannot compile)
                slot.cache.pos.fill_(0)
                _decode_body(model, state, slot, plan_key, processors)
        torch.cuda.current_stream(state.device).wait_stream(side)
        torch.cuda.set_rng_state(rng, state.device)
        slot.cache.pos.fill_(0)
        if state.pool is None:
            state.pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=state.pool):
            _decode_body(model, state, slot, plan_key, processors)
    except Exception as exc:  # a capture failure must not break generation: eager path
        slot.broken[key] = f"{type(exc).__name__}: {exc}"
        g = None
        torch.cuda.synchronize(state.device)
    finally:
        for t, v in zip((slot.tok, slot.pos, slot.ids, slot.unfinished, slot.alive, slot.gen_len, slot.cache.pos),
                        saved):
            t.copy_(v)
        torch.cuda.set_rng_state(rng, state.device)
    if g is not None:
        slot.graphs[key] = g
    return g


# ---------------------------------------------------------------------------------------------
# Drivers.

def _bucket(limit: int) -> int:
    return triton_cdiv(limit, BUCKET) * BUCKET


def _left_pad(pad_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Pad counts [b] if the 2-D mask is left padding (0…0 1…1 per row, ≥ 1 token), else None."""
    b, s = pad_mask.shape
    real = pad_mask.bool()
    pads = s - real.sum(dim=1)
    expect = torch.arange(s, device=real.device)[None, :] >= pads[:, None]
    if not bool(torch.equal(expect, real)) or bool((pads >= s).any()):
        return None
    return pads


def _check_scores(run: "_Run", flag: Optional[int] = None) -> None:
    """Sampling without a processor (sample_tokens) met NaN or +inf scores: raise as transformers'
    multinomial does (flag: slot.pick_flag[0] as read already, else it is read here)."""
    if not _fused(run.key) or run.plan.processors:
        return
    if (int(run.slot.pick_flag[0]) if flag is None else flag) == 2:
        raise RuntimeError("chatglm6b: the logits held NaN or inf while sampling (transformers' multinomial "
                           "fails on them too); pass logits_processor=[InvalidScoreLogitsProcessor()] as "
                           "model.chat does to turn such steps into token 5, or find where the model's "
                           "activations overflow (an fp16 model in bf16 / fp32 may help)")


class _Run:
    """One generation on a slot: prefill, first token, then graph replays."""

    def __init__(self, model, state, plan: _Plan, input_ids, position_ids, pad_mask, pads, use_graph: bool = True):
        self.model, self.state, self.plan = model, state, plan
        self.use_graph = use_graph
        b, s = input_ids.shape
        self.b, self.s = b, s
        vocab = model.lm_head.weight.shape[0]
        self.key = plan.sample_key(vocab)
        self.slot = state.slot(b, _bucket(plan.limit))
        slot = self.slot
        slot.eos.fill_(-1)
        if plan.eos:
            slot.eos[:len(plan.eos)].copy_(torch.tensor(plan.eos, dtype=torch.long))
        slot.pad_id.fill_(plan.pad_id)
        if plan.do_sample:
            slot.inv_temperature.fill_((torch.tensor(1.0) / torch.tensor(plan.temperature, dtype=torch.float32)).item())
            slot.top_p_cut.fill_(1.0 - plan.top_p)
        slot.pad.copy_(pads.to(torch.int32))
        slot.pick_key.fill_(_KEY_EMPTY)  # (the bookkeeping kernel resets them after every step)
        slot.pick_flag.zero_()
        if slot.batch == 1:
            slot.scr.copy_(torch.tensor(_SCR_START, dtype=torch.int32))
        state.rotary_tables(model, slot.length + 2)
        _refresh_screen(model, state)
        steps = plan.limit - s - 1
        self.screened = _screens(state, slot, self.key)
        self.graph = _graph_for(model, state, slot, self.key, plan.processors) if steps > 0 and use_graph else None
        # prefill + first token (eager)
        if ahead_workers() > 1 and not state.prefill_compiled_ahead:  # (opt-in; once per model state)
            with compile_ahead(state.device):
                prefill(model, state, slot, input_ids, position_ids, pad_mask)
            state.prefill_compiled_ahead = True
        logits = prefill(model, state, slot, input_ids, position_ids, pad_mask)
        self.first_logits = logits.clone() if state.debug_logits else None
        slot.ids[:, :s].copy_(input_ids)
        slot.unfinished.fill_(True)
        slot.gen_len.fill_(0)
        slot.pos.copy_(position_ids[:, :, -1])
        slot.cache.pos.fill_(s - 1)  # _bookkeep writes at pos + 1 and then advances
        nxt = _choose(logits, slot, self.key, plan.processors)
        _bookkeep(slot, nxt)  # ids[:, s] = first token; cache.pos = s; pos[:, 1] += 1
        slot.cache.seen = s
        self.produced = 1  # tokens generated so far (host count of steps run)

    def step(self):
        if self.use_graph:
            self.graph.replay()
        else:  # the same step, launched op by op (debugging, and the CPU interpreter tests)
            _decode_body(self.model, self.state, self.slot, self.key, self.plan.processors)
        self.produced += 1
        self.slot.cache.seen += 1

    @property
    def remaining(self) -> int:
        return self.plan.limit - self.s - self.produced


def _eligible(model, input_ids) -> bool:
    """The model can take the fast path (_model_reason) and input_ids is a 2-D tensor on its device;
    else False, with the reason in last_decision."""
    reason = _model_reason(model)
    if reason is None and not (torch.is_tensor(input_ids) and input_ids.dim() == 2
                               and input_ids.device == model.transformer.word_embeddings.weight.device):
        reason = "input_ids not a 2-D tensor on the model's device"
    if reason:
        _set_decision(model, "eager", reason)
        return False
    return True


def fast_generate(model, inputs, args, kwargs) -> Optional[torch.Tensor]:
    """`generate` on the CUDA-graph path, or None when it does not apply (see module docstring)."""
    if args:
        _set_decision(model, "eager", "positional generate arguments")
        return None
    kw = dict(kwargs)
    input_ids = inputs if inputs is not None else kw.pop("input_ids", None)
    if not _eligible(model, input_ids):
        return None
    if inputs is not None and "input_ids" in kw:
        _set_decision(model, "eager", "inputs and input_ids both given")
        return None
    mask = kw.pop("attention_mask", None)
    position_ids = kw.pop("position_ids", None)
    plan, why = _generate_plan(model, input_ids.shape[1], kw)
    if plan is None:
        _set_decision(model, "eager", why)
        return None
    return _run_generate(model, input_ids, mask, position_ids, plan)


def _prepare(model, input_ids, mask, position_ids):
    """(pad_mask, pads, position_ids) or a reason string."""
    cfg = model.config
    b, s = input_ids.shape
    if mask is None:
        mask = torch.ones_like(input_ids)
    mask = mask.to(input_ids.device)
    if mask.dim() != 2 or mask.shape != input_ids.shape:
        return "attention_mask is not a [batch, seq] padding mask"
    pads = _left_pad(mask)
    if pads is None:
        return "attention_mask is not left padding"
    modeling = _modeling(model)
    try:
        if position_ids is None:
            position_ids = modeling.build_position_ids(input_ids, cfg.bos_token_id, cfg.mask_token_id,
                                                       cfg.gmask_token_id, mask)
        modeling.context_lengths(input_ids, cfg.bos_token_id)
    except ValueError as exc:
        return f"prompt rejected ({exc})"
    if not torch.is_tensor(position_ids) or tuple(position_ids.shape) != (b, 2, s):
        return "position_ids are not [batch, 2, seq]"
    return mask, pads, position_ids.to(device=input_ids.device, dtype=torch.long)


def _start(model, input_ids, mask, position_ids, plan: _Plan) -> Optional[Tuple["_State", "_Run"]]:
    """The checks shared by generate and stream_generate that need the model's state, then the
    model's lock, prefill and the first token. Returns (state, run) with the lock held (the caller
    releases it), or None with the lock free and the reason in last_decision."""
    if len(plan.eos) > MAX_EOS:
        _set_decision(model, "eager", f"more than {MAX_EOS} eos ids")
        return None
    state = _state(model)
    if not state.lock.acquire(blocking=False):
        _set_decision(model, "eager", "fast path busy (another generation on this model)")
        return None
    try:
        with torch.inference_mode(), on_device(state.device):
            prep = state.kernel_error or _prepare(model, input_ids, mask, position_ids)
            if isinstance(prep, str):
                reason = prep
            else:
                pad_mask, pads, position_ids = prep
                try:
                    run = _Run(model, state, plan, input_ids, position_ids, pad_mask, pads)
                except Exception as exc:
                    if _strict() or not _is_build_error(exc):
                        raise
                    # A kernel that does not build here (a Triton release that cannot compile it
                    # for this GPU): generation goes on, on the eager path, from now on, said once.
                    state.kernel_error = f"a kernel failed to build ({type(exc).__name__}: {str(exc)[:500]})"
                    state.free()  # (its static caches and graphs: not used again)
                    warnings.warn(f"chatglm6b fast decode: {state.kernel_error}; this model generates on the "
                                  f"eager path from now on", RuntimeWarning)
                    reason = state.kernel_error
                else:
                    if run.graph is not None or run.remaining <= 0:
                        _set_decision(model, "graph")
                        return state, run
                    reason = "graph capture failed: " + run.slot.broken.get(
                        _graph_key(run.key, plan.processors, state.debug_logits, run.screened), "")
    except BaseException:
        state.lock.release()
        raise
    _set_decision(model, "eager", reason)
    state.lock.release()
    return None


def _is_build_error(exc: BaseException) -> bool:
    """exc comes from compiling a Triton kernel, not from running one or from the inputs: a Triton
    error (front end, ptxas, resources), or any exception raised inside triton.compiler.compile (an
    MLIR pass fails with a plain RuntimeError('PassManager::run failed'))."""
    try:
        errors = importlib.import_module("triton.errors")
        if isinstance(exc, errors.TritonError):
            return True
    except (ImportError, AttributeError):
        pass
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "compile" and code.co_filename.replace(os.sep, "/").endswith("triton/compiler/compiler.py"):
            return True
        tb = tb.tb_next
    return False


def _run_generate(model, input_ids, mask, position_ids, plan: _Plan):
    started = _start(model, input_ids, mask, position_ids, plan)
    if started is None:
        return None
    state, run = started
    try:
        with torch.inference_mode(), on_device(state.device):
            slot = run.slot
            stream = torch.cuda.current_stream(state.device)
            flags = torch.zeros(2, dtype=torch.bool, pin_memory=True)
            pending = None  # (index, event) of the flag copied one check ago
            n = 0
            logs = [run.first_logits] if state.debug_logits else None
            while run.remaining > 0:
                run.step()
                n += 1
                if logs is not None:
                    logs.append(slot.logits.clone())
                if n % CHECK_EVERY == 0:
                    if pending is not None:
                        idx, ev = pending
                        ev.synchronize()
                        if not bool(flags[idx]):
                            break
                    idx = (n // CHECK_EVERY) % 2
                    flags[idx].copy_(slot.alive[0], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    pending = (idx, ev)
            total = run.s + int(slot.gen_len.item())
            _check_scores(run)
            out = slot.ids[:, :total]
            if logs is not None:
                state.last_logits = torch.stack(logs[:total - run.s], dim=1)
            result = out.clone()
            _screen_account(model, state, run)
        return result.clone() if result.is_inference() and not torch.is_inference_mode_enabled() else result
    finally:
        state.lock.release()


def fast_stream_generate(model, input_ids, attention_mask, position_ids, max_length, max_new_tokens, do_sample,
                         top_p, temperature, top_k, logits_processor, eos_token_id) -> Optional[Iterator[torch.Tensor]]:
    """`stream_generate` on the CUDA-graph path (same yields), or None when it does not apply."""
    if not _eligible(model, input_ids):
        return None
    ok, procs = _processors_ok(model, logits_processor)
    if not ok:
        _set_decision(model, "eager", "custom logits processors")
        return None
    cfg = model.config
    s = input_ids.shape[1]
    limit = s + max_new_tokens if max_new_tokens is not None else max_length
    if limit <= s:
        _set_decision(model, "eager", "nothing to generate")
        return None
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or (top_k or 0) < 0):
        _set_decision(model, "eager", "sampling settings out of range")
        return None
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    plan = _Plan(limit, eos, pad_id, do_sample, temperature, top_k, top_p, procs)
    mask2d = None
    modeling = _modeling(model)
    if attention_mask is not None:  # only the mask the model itself would build, with left padding
        if attention_mask.dim() != 4:
            _set_decision(model, "eager", "attention_mask is not the 4-D model mask")
            return None
        mask2d = (~attention_mask[:, 0, -1, :].bool()).long()
        try:
            want = modeling.build_attention_mask(input_ids, cfg.bos_token_id, mask2d)
        except ValueError as exc:
            _set_decision(model, "eager", f"prompt rejected ({exc})")
            return None
        if not torch.equal(want, attention_mask.bool()):
            _set_decision(model, "eager", "custom 4-D attention mask")
            return None
    if position_ids is None:
        try:  # stream_generate's own default: positions without a padding mask
            position_ids = modeling.build_position_ids(input_ids, cfg.bos_token_id, cfg.mask_token_id,
                                                       cfg.gmask_token_id)
        except ValueError as exc:
            _set_decision(model, "eager", f"prompt rejected ({exc})")
            return None
    return _stream(model, input_ids, mask2d, position_ids, plan)


def _stream(model, input_ids, mask2d, position_ids, plan: _Plan) -> Optional[Iterator[torch.Tensor]]:
    started = _start(model, input_ids, mask2d, position_ids, plan)
    if started is None:
        return None
    state, run = started
    return _stream_iter(run, state)  # releases the lock when it ends


def _stream_iter(run: _Run, state: _State) -> Iterator[torch.Tensor]:
    """Yield ids after each token; the next step is queued before the current one is handed out.
    (Contexts are entered per step, never across a yield, so none leaks into the caller's loop.)"""
    slot = run.slot

    def snapshot():
        stream = torch.cuda.current_stream(state.device)
        ids = slot.ids[:, :run.s + run.produced].clone()
        flag = torch.zeros(2, dtype=torch.int32, pin_memory=True)
        flag[:1].copy_(slot.alive, non_blocking=True)
        flag[1:].copy_(slot.pick_flag, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(stream)
        return ids, flag, ev

    try:
        with torch.inference_mode(), on_device(state.device):
            current = snapshot()
        while True:
            with torch.inference_mode(), on_device(state.device):
                nxt = None
                if run.remaining > 0:  # queue the next step while the host handles this one
                    run.step()
                    nxt = snapshot()
                ids, flag, ev = current
                ev.synchronize()
            _check_scores(run, int(flag[1]))
            yield ids
            if not bool(flag[0]) or nxt is None:
                break
            current = nxt
        with torch.inference_mode(), on_device(state.device):
            _screen_account(run.model, state, run)
    finally:
        state.lock.release()
