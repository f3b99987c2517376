#!/usr/bin/env python3
"""Micro-benchmark of the weight-only INT8/INT4 CUDA kernels (cuda_kernels.py).

Run on a CUDA machine from the repository root:

    python3 benchmarks/bench_cuda_kernels.py --md benchmarks/results/cuda_kernels.md
    python3 benchmarks/bench_cuda_kernels.py --explore     # also time every kernel/tile variant

For each ChatGLM-6B linear shape and M (activation rows) it times our `linear` ("ours", the
path `_plan` picks), the torch dequantize path (`torch_quantized_linear`, what runs without
kernels) and cuBLAS fp16 `F.linear` on an fp16 weight of the same shape (the ceiling a fused
kernel is measured against). Every number is the per-call time of a CUDA graph holding R
back-to-back calls, each on a different weight set so that the weights streamed exceed the
50 MB L2 several times (a decode step runs the same way: graph-captured, weights cold).
Bandwidth counts the bytes a call must move once (weight + scale + bias + x + y) and is
compared with a measured device-to-device copy (bytes read + written). Every timed variant is
first checked against a float64 reference on fresh random data.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import time
from pathlib import Path

import _package  # noqa: E402,F401  (registers the repo root as package `chatglm6b`)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from chatglm6b import cuda_kernels as ck  # noqa: E402
from chatglm6b.quantization import torch_quantized_linear  # noqa: E402

SHAPES = [  # (N = out, K = in, name) of the four quantized linears of a ChatGLM-6B block
    (12288, 4096, "query_key_value"),
    (4096, 4096, "attention.dense"),
    (16384, 4096, "dense_h_to_4h"),
    (4096, 16384, "dense_4h_to_h"),
]
LAYERS = 28
LM_HEAD = (130528, 4096)
ROTATE_BYTES = 400e6  # weights streamed per graph replay: 8x the L2
T0 = time.time()


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
def make_weights(N, K, bits, count, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    sets = []
    for _ in range(count):
        if bits == 8:
            q = torch.randint(-127, 128, (N, K), generator=g, device=dev, dtype=torch.int8)
        else:
            q = torch.randint(-128, 128, (N, K // 2), generator=g, device=dev, dtype=torch.int8)
        scale = ((torch.rand(N, generator=g, device=dev) + 0.5) * (0.05 / (127 if bits == 8 else 7))).half()
        bias = (torch.randn(N, generator=g, device=dev) * 0.1).half()
        sets.append((q, scale, bias))
    return sets


def unpack_ref(q, bits):
    """Independent float64 unpack (SPEC §3): even column in the high nibble, sign-extended."""
    if bits == 8:
        return q.double()
    b = q.to(torch.int16)
    hi = torch.div(b, 16, rounding_mode="floor")  # arithmetic >> 4
    lo = b - hi * 16
    lo = torch.where(lo >= 8, lo - 16, lo)
    return torch.stack((hi, lo), -1).flatten(-2).double()


def rel_err(y, x, q, scale, bias, bits):
    w = unpack_ref(q, bits) * scale.double()[:, None]
    ref = x.double() @ w.T + bias.double()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.double() - ref).norm() / ref.norm()).item()


def time_graph(calls, min_ms=25.0, samples=5):
    """Median per-call µs of a CUDA graph holding all `calls` back to back."""
    for c in calls:  # compile / warm up outside the capture
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    g.replay()
    e.record()
    e.synchronize()
    reps = max(1, int(min_ms / max(s.elapsed_time(e), 1e-3)))
    out = []
    for _ in range(samples):
        s.record()
        for _ in range(reps):
            g.replay()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) * 1e3 / (reps * len(calls)))
    del g
    return statistics.median(out)


def copy_bandwidth(dev):
    n = 1 << 28  # 1 GiB of fp32 each way
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    us = time_graph([lambda: b.copy_(a)], min_ms=100)
    del a, b
    return 2 * 4 * n / (us * 1e-6) / 1e9  # GB/s, bytes read + written


def read_bandwidth(dev):
    """GB/s of a large fp32 sum (reads only): the ceiling a weight stream can approach."""
    a = torch.randn(1 << 28, device=dev)
    us = time_graph([lambda: a.sum()], min_ms=100)
    del a
    return 4 * (1 << 28) / (us * 1e-6) / 1e9


def gemm_tflops(dev):
    a = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    us = time_graph([lambda: a @ b], min_ms=100)
    return 2 * 8192**3 / (us * 1e-6) / 1e12


# ---------------------------------------------------------------------------------------------
class Case:
    """One (bits, shape, M): rotating weight sets, an fp16 activation, fp16 weights for cuBLAS."""

    def __init__(self, N, K, bits, M, dev, dtype=torch.float16):
        self.N, self.K, self.bits, self.M = N, K, bits, M
        wbytes = N * K * (1 if bits == 8 else 0.5)
        self.R = max(2, min(48, math.ceil(ROTATE_BYTES / wbytes)))
        self.sets = make_weights(N, K, bits, self.R, dev, seed=N + K + bits)
        self.x = torch.randn(M, K, device=dev, dtype=dtype)
        self.bytes = wbytes + 4 * N + 2 * M * K + 2 * M * N  # weight, scale+bias, x, y
        self.flops = 2 * M * N * K

    def fp16_calls(self):
        R = max(2, min(48, math.ceil(ROTATE_BYTES / (self.N * self.K * 2))))
        ws = [torch.randn(self.N, self.K, device=self.x.device, dtype=torch.float16) for _ in range(R)]
        b = self.sets[0][2]
        return [(lambda w=w: F.linear(self.x, w, b)) for w in ws], ws

    def check(self, fn):
        q, s, b = self.sets[-1]
        x = torch.randn_like(self.x)
        return rel_err(fn(x, q, s, b), x, q, s, b, self.bits)

    def time(self, fn):
        return time_graph([(lambda q=q, s=s, b=b: fn(self.x, q, s, b)) for q, s, b in self.sets])

    def row(self, label, us, err=None):
        gbs = self.bytes / (us * 1e-6) / 1e9
        return dict(bits=self.bits, N=self.N, K=self.K, M=self.M, variant=label, us=us, GBps=gbs,
                    TFLOPs=self.flops / (us * 1e-6) / 1e12, err=err)


def ours(x, q, s, b, bits):
    y = ck.linear(x, q, s, b, bits)
    if y is None:
        raise RuntimeError("cuda_kernels.linear returned None")
    return y


def variants(bits, M):
    """(label, fn(x, q, s, b)) of every kernel/tile variant worth timing at this M."""
    v = []
    if M == 1:
        # (BLOCK_N, BLOCK_KW, prefetch, warps, stages, eviction, scalar-K layout)
        common = [(32, 32, 1, 4, 3, "", 1), (16, 64, 1, 4, 3, "", 1), (32, 64, 1, 4, 3, "", 1),
                  (64, 32, 1, 4, 3, "", 1), (16, 32, 1, 2, 3, "", 1), (32, 32, 0, 4, 3, "", 1),
                  (16, 32, 1, 4, 3, "evict_first", 1), (8, 64, 1, 2, 3, "", 1)]
        gemv = ([(8, 128, 1, 4, 3, "evict_first", 0), (4, 256, 1, 4, 3, "evict_first", 0),
                 (8, 256, 0, 8, 3, "", 0), (8, 128, 1, 4, 3, "", 0)] if bits == 8 else
                [(16, 128, 0, 4, 4, "evict_first", 0), (8, 128, 0, 4, 3, "evict_first", 0),
                 (16, 128, 1, 4, 3, "", 0), (8, 128, 0, 4, 3, "", 0)]) + common
        for bn, bkw, pf, nw, ns, ev, sc in gemv:
            cfg = dict(BLOCK_N=bn, BLOCK_KW=bkw, PREFETCH=bool(pf), num_warps=nw, num_stages=ns, EV=ev,
                       SCALAR=bool(sc))
            v.append((f"gemv{'_sc' if sc else ''} n{bn} kw{bkw} pf{pf} w{nw} s{ns}{' ef' if ev else ''}",
                      lambda x, q, s, b, cfg=cfg: ck._run_gemv(x, q, s, b, bits, cfg)))
    if M <= 16:
        asm = ([(32, 64, 4, 4, 1), (64, 32, 4, 4, 4), (64, 64, 4, 3, 2), (64, 64, 4, 3, 4), (128, 32, 4, 4, 4),
                (128, 64, 8, 3, 4)] if bits == 8 else
               [(64, 32, 4, 3, 1), (32, 64, 4, 3, 1), (64, 32, 4, 3, 2), (64, 32, 4, 3, 4), (128, 32, 4, 3, 4),
                (64, 64, 4, 3, 4), (128, 32, 8, 3, 2)])
        for (bn, bkw, nw, ns, sk), xt in [(a, xt) for a in asm for xt in (0, 1)]:
            cfg = dict(BLOCK_N=bn, BLOCK_M=16, BLOCK_KW=bkw, num_warps=nw, num_stages=ns, SPLIT_K=sk, XT=xt)
            v.append((f"qmm_asm n{bn} m16 kw{bkw} w{nw} s{ns} k{sk} xt{xt}",
                      lambda x, q, s, b, cfg=cfg: ck._run_qmm_asm(x, q, s, b, bits, cfg)))
        plain = ([(64, 128, 4, 4, 1), (32, 512, 4, 3, 1), (64, 128, 4, 4, 2), (64, 128, 4, 4, 4),
                  (128, 128, 4, 4, 4), (128, 128, 8, 3, 4), (64, 256, 4, 3, 4), (128, 64, 4, 4, 2)] if bits == 8 else
                 [(64, 64, 4, 4, 1), (64, 64, 4, 4, 4), (128, 64, 4, 4, 4), (64, 128, 4, 3, 4)])
        for (bn, bk, nw, ns, sk), xt in [(p, xt) for p in plain for xt in ((0, 1) if bits == 4 else (0,))]:
            cfg = dict(BLOCK_N=bn, BLOCK_M=16, BLOCK_KQ=bk, num_warps=nw, num_stages=ns, SPLIT_K=sk, XT=xt)
            v.append((f"qmm n{bn} m16 kq{bk} w{nw} s{ns} k{sk}{f' xt{xt}' if bits == 4 else ''}",
                      lambda x, q, s, b, cfg=cfg: ck._run_qmm(x, q, s, b, bits, cfg)))
    elif M <= 64:
        mid = ([(64, 64, 128, 4, 4), (128, 64, 128, 8, 3), (32, 64, 256, 4, 4), (64, 32, 256, 4, 4)] if bits == 8
               else [(64, 64, 64, 4, 4), (128, 64, 64, 8, 3), (32, 64, 128, 4, 4), (64, 32, 128, 4, 4)])
        for (bn, bm, bk, nw, ns), xt in [(m, xt) for m in mid for xt in ((0, 1) if bits == 4 else (0,))]:
            cfg = dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_KQ=bk, num_warps=nw, num_stages=ns, XT=xt)
            v.append((f"qmm n{bn} m{bm} kq{bk} w{nw} s{ns}{f' xt{xt}' if bits == 4 else ''}",
                      lambda x, q, s, b, cfg=cfg: ck._run_qmm(x, q, s, b, bits, cfg)))
        # the fp16 bit-trick kernel with 32- / 64-row activation tiles (XT: Triton's rule)
        asm = ([(64, 32, 32, 4, 3, 1), (64, 32, 64, 4, 3, 2), (64, 64, 32, 4, 3, 1), (64, 64, 32, 4, 3, 2),
                (128, 32, 32, 8, 3, 1), (128, 64, 32, 8, 3, 2), (32, 64, 64, 4, 3, 2), (64, 64, 64, 8, 3, 4)]
               if bits == 8 else
               [(64, 32, 32, 4, 3, 1), (64, 32, 32, 4, 3, 2), (64, 64, 32, 4, 3, 1), (64, 64, 32, 4, 3, 2),
                (128, 32, 32, 8, 3, 2), (128, 64, 32, 8, 3, 2), (32, 64, 32, 4, 3, 2), (64, 64, 16, 4, 4, 4)])
        for bn, bm, bkw, nw, ns, sk in asm:
            if bm < M / 2:
                continue  # (more than two row tiles: each reads the whole weight again)
            cfg = dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_KW=bkw, num_warps=nw, num_stages=ns, SPLIT_K=sk)
            v.append((f"qmm_asm n{bn} m{bm} kw{bkw} w{nw} s{ns} k{sk}",
                      lambda x, q, s, b, cfg=cfg: ck._run_qmm_asm(x, q, s, b, bits, cfg)))
        v.append(("dequant+cublas", lambda x, q, s, b: ck._run_dequant_mm(x, q, s, b, bits)))
    if 64 < M <= 256:
        # batches of 65-256 rows (thirteenth round): 64- / 128-row tiles against dequantize + cuBLAS
        wide = [(64, 64, 128, 4, 4), (64, 128, 128, 8, 3), (128, 128, 64, 8, 3), (128, 64, 128, 8, 3)]
        for bn, bm, bk, nw, ns in wide:
            bk = bk if bits == 8 else bk // 2
            cfg = dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_KQ=bk, num_warps=nw, num_stages=ns)
            v.append((f"qmm n{bn} m{bm} kq{bk} w{nw} s{ns}",
                      lambda x, q, s, b, cfg=cfg: ck._run_qmm(x, q, s, b, bits, cfg)))
        for bn, bm, bkw, nw, ns, sk in [(128, 64, 32, 8, 3, 1), (64, 128, 32, 8, 3, 1), (128, 128, 32, 8, 3, 1),
                                        (128, 128, 16, 8, 4, 1), (128, 32, 32, 8, 3, 2), (256, 64, 32, 8, 3, 1)]:
            cfg = dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_KW=bkw, num_warps=nw, num_stages=ns, SPLIT_K=sk)
            v.append((f"qmm_asm n{bn} m{bm} kw{bkw} w{nw} s{ns} k{sk}",
                      lambda x, q, s, b, cfg=cfg: ck._run_qmm_asm(x, q, s, b, bits, cfg)))
    if M > 64:
        for bn, bk in [(32, 256), (16, 512), (64, 128)]:
            cfg = dict(BLOCK_N=bn, BLOCK_KQ=bk, num_warps=4)
            v.append((f"dequant n{bn} kq{bk} + cublas",
                      lambda x, q, s, b, cfg=cfg: ck._run_dequant_mm(x, q, s, b, bits, cfg)))
        cfg = dict(BLOCK_N=128, BLOCK_M=256, BLOCK_KQ=64 if bits == 8 else 32, num_warps=8, num_stages=3)
        v.append((f"qmm n128 m256 kq{cfg['BLOCK_KQ']} w8 s3",
                  lambda x, q, s, b, cfg=cfg: ck._run_qmm(x, q, s, b, bits, cfg)))
    return v


def run_case(case, explore, results, budget_s):
    bits, M = case.bits, case.M
    rows = []
    fns = [("ours", lambda x, q, s, b: ours(x, q, s, b, bits)),
           ("torch-dequant", lambda x, q, s, b: torch_quantized_linear(x, q, s, b, bits))]
    if explore:
        fns += variants(bits, M)
    for label, fn in fns:
        if label not in ("ours", "torch-dequant") and time.time() - T0 > budget_s:
            log(f"  (time budget reached: skipping {label})")
            continue
        try:
            err = case.check(fn)
            us = case.time(fn)
            r = case.row(label, us, err)
        except Exception as exc:  # a variant that does not compile must not stop the sweep
            msg = f"{type(exc).__name__}: {str(exc)[:400]}"
            r = dict(bits=bits, N=case.N, K=case.K, M=M, variant=label, error=msg)
            log(f"  {label:<34} FAILED {msg}")
        else:
            tol = 2e-3
            r["ok"] = err <= tol
            log(f"  {label:<34} {us:9.2f} us {r['GBps']:7.0f} GB/s {r['TFLOPs']:7.1f} TF/s "
                f"err {err:.1e}{'' if r['ok'] else '  <-- WRONG'}")
        rows.append(r)
        results.append(r)
        torch.cuda.empty_cache()
    calls, ws = case.fp16_calls()
    us = time_graph(calls)
    r = case.row("cublas-fp16", us)
    r["GBps"] = (case.N * case.K * 2 + 2 * case.N + 2 * M * case.K + 2 * M * case.N) / (us * 1e-6) / 1e9
    log(f"  {'cublas-fp16':<34} {us:9.2f} us {r['GBps']:7.0f} GB/s {r['TFLOPs']:7.1f} TF/s")
    rows.append(r)
    results.append(r)
    del calls, ws
    return rows


def launch_overhead(dev):
    """Host µs per eager call of `linear` (M=1, 4096x4096 INT8): what CUDA graphs remove."""
    (q, s, b), = make_weights(4096, 4096, 8, 1, dev, 0)
    x = torch.randn(1, 4096, device=dev, dtype=torch.float16)
    for _ in range(10):
        ck.linear(x, q, s, b, 8)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200):
        ck.linear(x, q, s, b, 8)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 200 * 1e6


def lm_head_us(M, dev):
    w = torch.randn(*LM_HEAD, device=dev, dtype=torch.float16)
    x = torch.randn(M, LM_HEAD[1], device=dev, dtype=torch.float16)
    us = time_graph([lambda: F.linear(x, w)])
    del w, x
    return us


# ---------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--explore", action="store_true", help="also time every kernel/tile variant")
    ap.add_argument("--md", help="write the results table (markdown) here")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for results.json")
    ap.add_argument("--ms", default="1,16,1024", help="activation rows to time (comma separated)")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which variants are skipped")
    ap.add_argument("--from-json", help="re-render the summary / --md from a results.json (no GPU needed)")
    args = ap.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        env, results = data["env"], data["results"]
        env["lm_head_us"] = {int(k): v for k, v in env["lm_head_us"].items()}
        summary = summarize(env, results, ms)
        print(summary)
        if args.md:
            Path(args.md).write_text(markdown(env, results, ms, summary))
        return

    ck.STRICT = True  # a kernel failure is an error here, not a silent torch fallback
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    triton = importlib.import_module("triton")
    env = dict(device=props.name, sms=props.multi_processor_count, cc=f"{props.major}.{props.minor}",
               torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
    log("env:", json.dumps(env))
    env["copy_GBps"] = copy_bandwidth(dev)
    env["read_GBps"] = read_bandwidth(dev)
    env["gemm_fp16_TFLOPs_8192"] = gemm_tflops(dev)
    log(f"device-to-device copy: {env['copy_GBps']:.0f} GB/s (read + write); read-only (sum): "
        f"{env['read_GBps']:.0f} GB/s; "
        f"cuBLAS fp16 8192^3: {env['gemm_fp16_TFLOPs_8192']:.0f} TFLOP/s")
    results = []
    for bits in [int(b) for b in args.bits.split(",")]:
        for M in ms:
            for N, K, name in SHAPES:
                log(f"== INT{bits} {name} [{N},{K}] M={M}  ({time.time() - T0:.0f}s)")
                try:
                    case = Case(N, K, bits, M, dev)
                    run_case(case, args.explore, results, args.budget)
                    del case
                except Exception as exc:  # keep going: the table shows what is missing
                    log(f"  case FAILED: {type(exc).__name__}: {str(exc)[:400]}")
                torch.cuda.empty_cache()
    env["lm_head_us"] = {M: lm_head_us(M, dev) for M in ms}
    env["eager_linear_host_us"] = launch_overhead(dev)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(dict(env=env, results=results), indent=1))
    summary = summarize(env, results, ms)
    print(summary)
    if args.md:
        Path(args.md).write_text(markdown(env, results, ms, summary))


def _pick(results, bits, N, K, M, variant=None, best=False):
    rows = [r for r in results if (r["bits"], r["N"], r["K"], r["M"]) == (bits, N, K, M) and "us" in r]
    if best:
        rows = [r for r in rows if r.get("ok") and r["variant"] not in ("torch-dequant", "cublas-fp16")]
        return min(rows, key=lambda r: r["us"]) if rows else None
    rows = [r for r in rows if r["variant"] == variant]
    return rows[0] if rows else None


def best_label(r):
    return f"{r['variant']} ({r['us']:.1f})" if r else "-"


def summarize(env, results, ms):
    bw = env["copy_GBps"]
    lines = [f"{env['device']} | copy {bw:.0f} GB/s | read {env['read_GBps']:.0f} GB/s | cuBLAS fp16 {env['gemm_fp16_TFLOPs_8192']:.0f} TFLOP/s | "
             f"torch {env['torch']} triton {env['triton']}",
             f"{'b':>1} {'shape':>12} {'M':>4} | {'ours us':>8} {'GB/s':>5} {'%rd':>4} {'TF/s':>5} | "
             f"{'torch us':>8} | {'cublas us':>9} | best variant (us)"]
    for bits in sorted({r["bits"] for r in results}, reverse=True):
        for M in ms:
            for N, K, _ in SHAPES:
                o = _pick(results, bits, N, K, M, "ours")
                t = _pick(results, bits, N, K, M, "torch-dequant")
                c = _pick(results, bits, N, K, M, "cublas-fp16")
                b = _pick(results, bits, N, K, M, best=True)
                if o is None:
                    continue
                lines.append(
                    f"{bits:>1} {f'{N}x{K}':>12} {M:>4} | {o['us']:8.1f} {o['GBps']:5.0f} "
                    f"{100 * o['GBps'] / env['read_GBps']:4.0f}"
                    f" {o['TFLOPs']:5.0f} | {t['us'] if t else float('nan'):8.1f} | "
                    f"{c['us'] if c else float('nan'):9.1f} | "
                    f"{best_label(b)}")
    for bits in sorted({r["bits"] for r in results}, reverse=True):
        for M in ms:
            rows = [_pick(results, bits, N, K, M, "ours") for N, K, _ in SHAPES]
            if all(rows):
                per_layer = sum(r["us"] for r in rows)
                total = LAYERS * per_layer + env["lm_head_us"][M]
                lines.append(f"INT{bits} M={M}: 28 blocks x {per_layer:.1f} us + fp16 lm_head "
                             f"{env['lm_head_us'][M]:.1f} us = {total / 1e3:.2f} ms of linear layers "
                             f"({M / (total * 1e-6):.0f} tokens/s)")
    lines.append(f"eager linear() host overhead: {env['eager_linear_host_us']:.1f} us/call")
    return "\n".join(lines)


def markdown(env, results, ms, summary):
    bw = env["copy_GBps"]
    out = [
        "# CUDA kernels: weight-only INT8 / INT4 linear (benchmarks/bench_cuda_kernels.py)",
        "",
        f"Device: **{env['device']}** ({env['sms']} SMs, sm_{env['cc'].replace('.', '')}), torch {env['torch']}, "
        f"Triton {env['triton']}, CUDA {env['cuda']}.",
        f"Measured ceilings: device-to-device copy **{bw:.0f} GB/s** (bytes read + written, 1 GiB fp32 each way); "
        f"read-only stream (torch sum of 1 GiB fp32) **{env['read_GBps']:.0f} GB/s**; "
        f"cuBLAS fp16 8192³ **{env['gemm_fp16_TFLOPs_8192']:.0f} TFLOP/s**.",
        "",
        "Times are per call, µs, median of 5, from CUDA-graph replays of R back-to-back calls on R different "
        "weight sets (≥ 400 MB streamed per replay, 8× the L2), fp16 activations. GB/s counts weight + "
        "scale + bias + x + y once. A weight stream is almost all reads, and on this card reads alone run "
        "faster than a copy (reads + writes), so both percentages are given. `torch` = `torch_quantized_linear` "
        "(dequantize in torch, then F.linear); `cuBLAS fp16` = F.linear on an fp16 weight of the same shape.",
        "",
        "| bits | N×K | M | ours µs | GB/s | % read BW | % copy BW | TFLOP/s | torch µs | cuBLAS fp16 µs | "
        "speed-up vs cuBLAS fp16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for bits in sorted({r["bits"] for r in results}, reverse=True):
        for M in ms:
            for N, K, name in SHAPES:
                o = _pick(results, bits, N, K, M, "ours")
                t = _pick(results, bits, N, K, M, "torch-dequant")
                c = _pick(results, bits, N, K, M, "cublas-fp16")
                if not (o and t and c):
                    continue
                out.append(f"| INT{bits} | {N}×{K} ({name}) | {M} | {o['us']:.1f} | {o['GBps']:.0f} | "
                           f"{100 * o['GBps'] / env['read_GBps']:.0f}% | {100 * o['GBps'] / bw:.0f}% | "
                           f"{o['TFLOPs']:.1f} | {t['us']:.1f} | {c['us']:.1f} | {c['us'] / o['us']:.2f}× |")
    out += ["", "Summary as printed by the script:", "", "```", summary, "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
