"""Micro-benchmark of the CPU kernels (cpu_kernels.py) on ChatGLM-6B's full-size shapes.

Decode (one token, M = 1) must be memory-bound, so each decode shape is reported as GB/s of
weight streamed, next to the machine's read and copy bandwidth measured in the same run. Prefill
is compute-bound and reported in GFLOP/s for M = 200. Every row also times the torch path the
kernels replace (dequantize the weight in fp32, then F.linear), in the same process.

The weights of one shape (50-128 MB) could sit in a big last-level cache and give flattering
numbers, so each timing cycles through enough copies of the weight to cover --working-set-gb.
`--model` additionally times a whole decode step (28 layers x 4 linears + the fp16 LM head,
6.7 GB of weights, needs ~8 GB of free RAM).

    python benchmarks/bench_cpu_kernels.py [--threads 2] [--model] [--markdown out.md]

Timings are wall-clock medians; the machine's load average is printed, since on a shared
machine other work skews them.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import _package  # noqa: E402,F401  (registers the repo root as package `chatglm6b`)

from chatglm6b import cpu_kernels  # noqa: E402
from chatglm6b.quantization import torch_quantized_linear  # noqa: E402

HIDDEN, INNER, VOCAB, LAYERS = 4096, 16384, 130528, 28
LAYER_SHAPES = [("query_key_value", 3 * HIDDEN, HIDDEN), ("attention.dense", HIDDEN, HIDDEN),
                ("dense_h_to_4h", INNER, HIDDEN), ("dense_4h_to_h", HIDDEN, INNER)]
GB = 1e9


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rotating(make, bytes_each: int, working_set: float):
    """Enough copies of a tensor (or tuple) to cover the working set, and a cycling getter."""
    copies = [make() for _ in range(max(1, int(working_set // bytes_each) + (working_set % bytes_each > 0)))]
    state = {"i": 0}

    def next_copy():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return copies, next_copy


def memory_bandwidth(repeats: int):
    """GB/s of: a plain read of 1 GiB by the kernels' own threads and block order (the ceiling
    for a memory-bound decode kernel), torch's sum of 1 GiB, and torch's copy of 512 MiB
    (read + write counted)."""
    a = LARGE_PAGES(torch.ones(1 << 28))
    probe = a.numel() * 4 / timed(lambda: cpu_kernels._read_bytes(a), repeats)
    torch_sum = a.numel() * 4 / timed(lambda: a.sum(), repeats)
    src = torch.ones(1 << 27)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), repeats)
    return probe / GB, torch_sum / GB, copy / GB


def quantized_weight(n: int, k: int, bits: int):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8) if bits == 8 else \
        torch.randint(-128, 128, (n, k // 2), dtype=torch.int8)
    return LARGE_PAGES(q), (torch.rand(n) * 0.01 + 1e-3).half(), torch.randn(n).half()


def LARGE_PAGES(t):  # set in main(): weights in 2 MB pages like the loader places them, or as allocated
    return t


def bench_decode(args, rows, bits: int):
    """Per-token time of the 28 layers' linears at M=1: kernels, torch path; for INT4 on a CPU with
    VNNI (AVX512-VNNI, or AVX-VNNI with --isa avx2) also the fp32 GEMV it replaced (alternating with it, best of three medians each)."""
    x = torch.randn(1, HIDDEN)
    per_token_kernel = per_token_torch = per_token_fp32 = 0.0
    vnni = bits == 4 and cpu_kernels.kernel_info().get("int4_vnni_max_m", 0) >= 1
    for name, n, k in LAYER_SHAPES:
        xk = x if k == HIDDEN else torch.randn(1, k)
        nbytes = n * k * bits // 8
        _, nxt = rotating(lambda: quantized_weight(n, k, bits), nbytes, args.working_set_gb * GB)
        if vnni:
            got = {None: [], 0: []}
            for _ in range(3):
                for limit in got:
                    cpu_kernels._set_int4_vnni_max_m(limit)
                    got[limit].append(timed(lambda: cpu_kernels.linear(xk, *nxt(), bits), args.repeats))
            cpu_kernels._set_int4_vnni_max_m(None)
            t_kernel, t_fp32 = min(got[None]), min(got[0])
            per_token_fp32 += LAYERS * t_fp32
        else:
            t_kernel = timed(lambda: cpu_kernels.linear(xk, *nxt(), bits), args.repeats)
        t_torch = timed(lambda: torch_quantized_linear(xk, *nxt(), bits), max(3, args.repeats // 4))
        per_token_kernel += LAYERS * t_kernel
        per_token_torch += LAYERS * t_torch
        rows.append((f"decode INT{bits} {name} [{n},{k}], M=1{', VNNI GEMV' if vnni else ''}",
                     f"{t_kernel * 1e3:.3f} ms", f"{nbytes / t_kernel / GB:.1f} GB/s", f"{t_torch * 1e3:.2f} ms",
                     f"{t_torch / t_kernel:.1f}x"))
        if vnni:
            rows.append((f"decode INT{bits} {name} [{n},{k}], M=1, fp32 GEMV (before; {t_fp32 / t_kernel:.2f}x "
                         "the VNNI GEMV's time)", f"{t_fp32 * 1e3:.3f} ms", f"{nbytes / t_fp32 / GB:.1f} GB/s",
                         f"{t_torch * 1e3:.2f} ms", f"{t_torch / t_fp32:.1f}x"))
    return per_token_kernel, per_token_torch, per_token_fp32


def bench_lm_head(args, rows):
    x = torch.randn(1, HIDDEN)
    w = LARGE_PAGES(torch.randn(VOCAB, HIDDEN).half())  # 1.07 GB: larger than any cache, no rotation needed
    t_kernel = timed(lambda: cpu_kernels.fp16_linear(x, w), args.repeats)
    t_torch = timed(lambda: F.linear(x, w.float()), 3)
    rows.append((f"decode FP16 lm_head [{VOCAB},{HIDDEN}], M=1", f"{t_kernel * 1e3:.2f} ms",
                 f"{w.numel() * 2 / t_kernel / GB:.1f} GB/s", f"{t_torch * 1e3:.1f} ms", f"{t_torch / t_kernel:.1f}x"))
    del w
    return t_kernel, t_torch


def bench_prefill(args, rows, bits: int, m: int, shapes):
    total_kernel = total_torch = 0.0
    for name, n, k in shapes:
        x = torch.randn(m, k)
        q, s, b = quantized_weight(n, k, bits)
        flops = 2 * m * n * k
        t_kernel = timed(lambda: cpu_kernels.linear(x, q, s, b, bits), max(3, args.repeats // 4))
        t_torch = timed(lambda: torch_quantized_linear(x, q, s, b, bits), 3)
        total_kernel += LAYERS * t_kernel
        total_torch += LAYERS * t_torch
        rows.append((f"prefill INT{bits} {name} [{n},{k}], M={m}", f"{t_kernel * 1e3:.1f} ms",
                     f"{flops / t_kernel / GB:.0f} GFLOP/s", f"{t_torch * 1e3:.1f} ms", f"{t_torch / t_kernel:.1f}x"))
    return total_kernel, total_torch


def bench_model_decode(args, rows):
    """One decode step over distinct weights for all 28 layers and the LM head (6.7 GB)."""
    layers = [[quantized_weight(n, k, 8) for _, n, k in LAYER_SHAPES] for _ in range(LAYERS)]
    head = LARGE_PAGES(torch.randn(VOCAB, HIDDEN).half())
    x_h, x_i = torch.randn(1, HIDDEN), torch.randn(1, INNER)

    def step():
        for layer in layers:
            for (_, n, k), (q, s, b) in zip(LAYER_SHAPES, layer):
                cpu_kernels.linear(x_h if k == HIDDEN else x_i, q, s, b, 8)
        cpu_kernels.fp16_linear(x_h, head)

    t = timed(step, max(3, args.repeats // 4))
    nbytes = sum(q.numel() for layer in layers for q, _, _ in layer) + head.numel() * 2
    rows.append(("decode step, whole INT8 model (distinct weights)", f"{t * 1e3:.1f} ms",
                 f"{nbytes / t / GB:.1f} GB/s", "", ""))
    return t


def crossover(args, rows_list):
    """GEMV against GEMM at each M of rows_list, per layer shape and --bits (ms, medians): where the
    switch-over (the ISA's gemv_max_m, or the override) should sit; on a CPU with AMX (kernels "amx")
    also the AMX tiles for INT8 / INT4 (where the AMX switch-over, amx_min_m, should sit). Returns the
    table's lines."""
    amx = cpu_kernels.kernel_info()["isa"] == "amx"
    what = "GEMV / GEMM / AMX" if amx else "GEMV / GEMM"
    lines = ["| weights | shape | " + " | ".join(f"M={m} {what} ms" for m in rows_list) + " |",
             "|---|---|" + "---|" * len(rows_list)]
    for bits in args.bits:  # 16: fp16 weights (an FP16 checkpoint's linears, the LM head)
        for name, n, k in LAYER_SHAPES + ([("lm_head", VOCAB, HIDDEN)] if bits == 16 else []):
            # weights cycled through copies covering --working-set-gb, so that they come from memory as in
            # the model (one 32-64 MB weight, called again and again, partly stays in this CPU's L3)
            if bits == 16:
                _, nxt = rotating(lambda: LARGE_PAGES((torch.randn(n, k) * 0.02).half()), 2 * n * k,
                                  args.working_set_gb * GB)
                run = lambda x: cpu_kernels.fp16_linear(x, nxt())  # noqa: E731
            else:
                _, nxt = rotating(lambda: quantized_weight(n, k, bits), n * k * bits // 8, args.working_set_gb * GB)
                run = lambda x: cpu_kernels.linear(x, *nxt()[:2], None, bits)  # noqa: E731
            cells = []
            for m in rows_list:
                x = torch.randn(m, k)
                got = []
                if amx:
                    cpu_kernels._set_amx_min_m(1 << 30)  # (off AMX for the GEMV and the GEMM)
                for limit in (1 << 30, 0):  # everything on the GEMV, then everything on the GEMM
                    cpu_kernels._set_gemv_max_m(limit)
                    got.append(timed(lambda: run(x), args.repeats))
                if amx and bits != 16:
                    cpu_kernels._set_amx_min_m(1)
                    got.append(timed(lambda: run(x), args.repeats))
                cells.append(" / ".join(f"{t * 1e3:.2f}" for t in got))
            cpu_kernels._set_gemv_max_m(None)
            if amx:
                cpu_kernels._set_amx_min_m(None)
            lines.append(f"| {'FP16' if bits == 16 else f'INT{bits}'} | {name} [{n},{k}] | " + " | ".join(cells) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--working-set-gb", type=float, default=1.0,
                    help="cycle through weight copies covering this many GB (defeats big caches)")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="8, 4 (and 16 with --crossover)")
    ap.add_argument("--prefill-m", type=int, default=200)
    ap.add_argument("--model", action="store_true", help="also time a whole-model decode step (~8 GB RAM)")
    ap.add_argument("--markdown", type=Path, help="write the results table to this file")
    ap.add_argument("--isa", choices=["amx", "avx512", "avx2", "generic"],
                    help="kernel family (default: the best the CPU has; AMX is used for INT8 and INT4 weights)")
    ap.add_argument("--small-pages", action="store_true",
                    help="leave weights in ordinary 4 KB pages (the loader puts them in 2 MB pages)")
    ap.add_argument("--crossover", metavar="M[,M...]",
                    help="only time GEMV against GEMM at these row counts (the GEMV / GEMM switch-over)")
    args = ap.parse_args()
    global LARGE_PAGES
    if not args.small_pages:
        LARGE_PAGES = cpu_kernels.to_large_pages

    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        sys.exit(f"CPU kernels unavailable: {cpu_kernels.kernel_info()['error']}")
    if args.isa:
        cpu_kernels._set_isa(args.isa)
    info = cpu_kernels.kernel_info()
    if args.crossover:
        lines = [f"- kernels: {info['isa']}, threads: {args.threads}, load average {os.getloadavg()[0]:.2f}", ""]
        lines += crossover(args, [int(m) for m in args.crossover.split(",")])
        print("\n".join(lines))
        if args.markdown:
            args.markdown.write_text("\n".join(lines) + "\n")
        return
    load_before = os.getloadavg()
    read_bw, sum_bw, copy_bw = memory_bandwidth(max(5, args.repeats // 2))

    rows, summary = [], []
    head_kernel, head_torch = bench_lm_head(args, rows)
    for bits in args.bits:
        dk, dt, d32 = bench_decode(args, rows, bits)
        dk += head_kernel
        dt += head_torch
        summary.append(f"INT{bits} decode estimate (28 layers x 4 linears + FP16 LM head, from the rows "
                       f"above): kernels {dk * 1e3:.0f} ms/token, torch path {dt * 1e3:.0f} ms/token"
                       + (f", with the fp32 INT4 GEMV instead of the VNNI one {(d32 + head_kernel) * 1e3:.0f} ms/token"
                          if d32 else ""))
    for bits in args.bits:
        pk, pt = bench_prefill(args, rows, bits, args.prefill_m, LAYER_SHAPES)
        summary.append(f"INT{bits} prefill estimate, {args.prefill_m} tokens, linears of 28 layers "
                       f"(LM head for the last token only): kernels {pk + head_kernel:.2f} s, torch path {pt + head_torch:.2f} s")
    if args.model:
        t = bench_model_decode(args, rows)
        summary.append(f"whole-model INT8 decode step measured directly: {t * 1e3:.0f} ms/token")
    load_after = os.getloadavg()

    lines = [
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"kernels: {info['isa']} (OpenMP {'on' if info['openmp'] else 'off'}), threads: {args.threads}, "
        f"torch {torch.__version__}, weights in {'4 KB' if args.small_pages else '2 MB'} pages",
        f"- load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        f"- memory bandwidth, same run: plain read {read_bw:.1f} GB/s (1 GiB, the kernels' threads "
        f"and block order), torch sum {sum_bw:.1f} GB/s, torch copy {copy_bw:.1f} GB/s (read + write)",
        "",
        "| case | kernel | kernel rate | torch path | speed-up |",
        "|---|---|---|---|---|",
    ] + [f"| {' | '.join(r)} |" for r in rows] + [""] + [f"- {s}" for s in summary]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
