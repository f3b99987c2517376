"""Probe for a persistent decode kernel: is the batch-1 MLP chain faster as ONE persistent Triton
kernel, on the product GEMV's own main loop, than as one launch per GEMV?

Why: the INT4 decode step (2.04 ms/token on an H100) misses its 1.6 ms goal by the fixed cost of its
kernels, not by streaming: the Triton GEMV streams at 94 % of copy bandwidth once running, but each of
the step's 112 GEMV launches adds ~3.2 us of ramp-up and tail (benchmarks/results/gpu.md). An earlier
probe of a persistent MLP chain hid the launches but ran on the tensor-core GEMV's inner loop, which
streams ~15 % slower, and lost. This one keeps Triton's loop: `cuda_kernels._gemv_rows` is the body of
the product GEMV (`_gemv_kernel` calls it with its program id; same tile configs, so the same sums).

Chain per layer (28 layers, 56 dependent GEMVs; weights stream once each, far more than L2 holds):
    mid = gelu(W1 x + b1)    W1 16384 x 4096    (dense_h_to_4h, GELU in the epilogue)
    x   = W2 mid + b2        W2 4096 x 16384    (dense_4h_to_h)
Contenders, each captured in one CUDA graph and timed by replay:
    launches     2 x 28 `cuda_kernels.linear` calls, the product path (PDL levels 0 / 1 / 2)
    floor        the same bytes as 2 GEMVs (all layers' W1 as one [28 * 16384, 4096] weight, W2 likewise)
    persistent   one kernel, programs = resident slots (per SM: --per-sm, bounded by the compiled
                 kernel's registers); per layer the W1 phase, a grid barrier, the W2 phase, a barrier.
                 Each program loads its first weight tile of a phase before it waits at the barrier
                 (where the product GEMV waits for the previous kernel under PDL). Activation loads
                 bypass L1 (".cg"; "" is measured too): x and mid change between phases.
Checks: the persistent outputs equal the launches' bit for bit (first run: a cooperative launch, which
the driver refuses if the programs cannot all be resident; the timed graph replays a plain launch); the
barrier's watchdog flag is clear (set when a wait gives up: results then invalid).

Run (H100, 2026-12-06):

    python3 benchmarks/probe_persistent.py --bits 4 --bits 8 --json $OUT/probe.json

Reading: `saved_us_per_gemv` = (launches - persistent) / 56. Measured: -0.01 us for INT4 at its best
(4 programs per SM, bit-equal), -3.5 us for INT8 — the boundary between dependent GEMVs costs the same as
a launch under PDL or as a grid barrier, so the persistent decode step was not built (gpu.md, tenth round).
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

import _package  # noqa: E402,F401  (registers the repo root as package `chatglm6b`)
ck = importlib.import_module("chatglm6b.cuda_kernels")

HIDDEN, INNER, LAYERS = 4096, 16384, 28
_KERNEL = None


def _mlp_kernel(x_ptr, xv_ptr, m_ptr, mv_ptr, w1_ptr, s1_ptr, b1_ptr, w2_ptr, s2_ptr, b2_ptr, bar_ptr,
                LAYERS_N, N1, KW1, N2, KW2,
                BITS: "tl.constexpr", BN1: "tl.constexpr", BKW1: "tl.constexpr", PRE1: "tl.constexpr",
                EV1: "tl.constexpr", XV1: "tl.constexpr", BN2: "tl.constexpr", BKW2: "tl.constexpr",
                PRE2: "tl.constexpr", EV2: "tl.constexpr", XV2: "tl.constexpr", EVEN1: "tl.constexpr",
                EVEN2: "tl.constexpr", LIBDEVICE: "tl.constexpr", XCM: "tl.constexpr"):
    # The layers' weights are stacked: W1 [LAYERS_N * N1, KW1] words, W2 [LAYERS_N * N2, KW2];
    # scales / biases [LAYERS_N * N]. bar_ptr[0] counts arrivals (zeroed before the launch),
    # bar_ptr[1] is the watchdog flag. A program waits before its first block of a phase (inside
    # _gemv_rows, after the block's first weight tile is on its way) or, with no block in the
    # phase, explicitly: no program arrives at barrier j + 1 before all arrived at barrier j.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    phase = 0
    for layer in range(LAYERS_N):
        lw = layer.to(tl.int64)
        _mlp_phase(pid, nprog, x_ptr, xv_ptr, w1_ptr + lw * N1 * KW1, s1_ptr + layer * N1, b1_ptr + layer * N1, m_ptr,
                   N1, KW1, bar_ptr, phase * nprog, BITS, BN1, BKW1, EVEN1, PRE1, EV1, XV1, 1, LIBDEVICE, XCM)
        phase += 1
        _mlp_phase(pid, nprog, m_ptr, mv_ptr, w2_ptr + lw * N2 * KW2, s2_ptr + layer * N2, b2_ptr + layer * N2, x_ptr,
                   N2, KW2, bar_ptr, phase * nprog, BITS, BN2, BKW2, EVEN2, PRE2, EV2, XV2, 0, LIBDEVICE, XCM)
        phase += 1


def _mlp_phase(pid, nprog, x_ptr, xv_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, KW, bar_ptr, target, BITS: "tl.constexpr",
               BN: "tl.constexpr", BKW: "tl.constexpr", EVEN: "tl.constexpr", PRE: "tl.constexpr", EV: "tl.constexpr",
               XV: "tl.constexpr", ACT: "tl.constexpr", LIBDEVICE: "tl.constexpr", XCM: "tl.constexpr"):
    # y = act(W x * s + b) by this program's row blocks, once the barrier has reached target; then
    # this program arrives at the next barrier.
    nb = tl.cdiv(N, BN)
    if pid >= nb:
        ck._grid_wait(bar_ptr, target)
    for blk in range(pid, nb, nprog):
        out, rn, rn_c = ck._gemv_rows(blk, 0, tl.cdiv(KW, BKW), x_ptr, xv_ptr, w_ptr, N, KW, 1, KW, 1, BITS, BN, BKW,
                                      EVEN, PRE, EV, False, 0, "", XV, bar_ptr, target, True, XCM)
        out = out * tl.load(s_ptr + rn_c).to(tl.float32) + tl.load(b_ptr + rn_c).to(tl.float32)
        tl.store(y_ptr + rn, ck._activate(out, y_ptr, ACT, LIBDEVICE), mask=rn < N)
    ck._grid_arrive(bar_ptr)


def kernel():
    """The jitted persistent kernel (Triton imported and the product helpers bound first)."""
    global _KERNEL, tl
    if _KERNEL is None:
        triton = ck._build().triton
        tl = importlib.import_module("triton.language")
        globals()["_mlp_phase"] = ck.jit_helper(triton, _mlp_phase)  # (the kernel calls it by this name)
        # (the layer count not specialised: the no-work build resident_per_sm reads is the one that runs)
        _KERNEL = ck.jit(triton, _mlp_kernel, do_not_specialize=["LAYERS_N"])
    return _KERNEL


def gemv_cfg(bits, N, K, cap):
    """The product's batch-1 GEMV config for this shape (what cuda_kernels.linear would run)."""
    path, _, cfg = ck._plan(1, N, K, bits, torch.float16, True, cap)
    assert path == "gemv", path
    cfg = dict(cfg)
    assert cfg.get("SPLIT_K", 1) == 1 and not cfg.get("L2_FRACTION") and not cfg.get("SCALAR"), cfg
    return cfg


def make_weights(bits, layers, device, seed=0, shapes=((INNER, HIDDEN), (HIDDEN, INNER))):
    """The chain's stacked weights (q, s, b per (N, K) of `shapes`), drawn on `device` (1.9 GB for 28
    INT4 layers of the MLP: far quicker on a GPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    per = 8 // bits

    def one(N, K):
        q = torch.randint(-128, 128, (layers * N, K // per), dtype=torch.int8, generator=g, device=device)
        # scale ~ 1 / qmax (x 1 for INT4, 1/16 for INT8): INT8 codes are 16x the INT4 ones, and with
        # INT4's scales the 28-layer chain (no residual, no LayerNorm) grew 2-3x per layer, past fp16's
        # range at layer 10 -> NaN (H100, 2026-12-06)
        s = (torch.rand(layers * N, generator=g, device=device) * 0.02 / (HIDDEN ** 0.5) + 1e-4) * (8 / 2 ** (bits - 1))
        s = s.half()
        b = (torch.randn(layers * N, generator=g, device=device) * 0.01).half()
        return q, s, b
    return sum((one(n, k) for n, k in shapes), ())


def run_persistent(x, m, weights, bar, bits, cfg1, cfg2, nprog, xcm=".cg", layers=LAYERS, cooperative=False):
    """x [1, HIDDEN] fp16 (in / out), m [1, INNER] fp16 (scratch, out); one launch of nprog programs.
    cooperative: a cooperative launch, which the driver refuses when the programs cannot all be
    resident at once (a check of resident_per_sm's arithmetic)."""
    q1, s1, b1, q2, s2, b2 = weights
    assert cfg1.get("num_warps", 4) == cfg2.get("num_warps", 4)
    w1, w2 = q1.view(torch.int32), q2.view(torch.int32)
    xv = x.view(-1).view(torch.int64)
    mv = m.view(-1).view(torch.int64)
    kernel()[(nprog,)](
        x, xv, m, mv, w1, s1, b1, w2, s2, b2, bar, layers, INNER, w1.shape[1], HIDDEN, w2.shape[1],
        BITS=bits, BN1=cfg1["BLOCK_N"], BKW1=cfg1["BLOCK_KW"], PRE1=cfg1.get("PREFETCH", False),
        EV1=cfg1.get("EV", ""), XV1=cfg1.get("XVEC", 0), BN2=cfg2["BLOCK_N"], BKW2=cfg2["BLOCK_KW"],
        PRE2=cfg2.get("PREFETCH", False), EV2=cfg2.get("EV", ""), XV2=cfg2.get("XVEC", 0),
        EVEN1=w1.shape[1] % cfg1["BLOCK_KW"] == 0, EVEN2=w2.shape[1] % cfg2["BLOCK_KW"] == 0,
        LIBDEVICE=ck._USE_LIBDEVICE, XCM=xcm, num_warps=cfg1.get("num_warps", 4), num_stages=cfg1.get("num_stages", 3),
        **(dict(launch_cooperative_grid=True) if cooperative else {}))


MLP_SHAPES = ((INNER, HIDDEN, True), (HIDDEN, INNER, False))  # (N, K, GELU) per phase of a layer


def run_chain(x, phases, shapes, bits, pdl=0, layers=LAYERS):
    """The product's GEMV launches (`cuda_kernels.linear`), layer by layer and phase by phase: phase p
    multiplies the first K values of the previous output by its (q, s, b) rows of this layer (stacked
    over layers), GELU where shapes says so. Returns (final x, first phase's output of the last layer)."""
    first = None
    for layer in range(layers):
        for p, ((q, s, b), (n, k, gelu)) in enumerate(zip(phases, shapes)):
            r = slice(layer * n, (layer + 1) * n)
            x = ck.linear(x[:, :k], q[r], s[r], b[r], bits, act="gelu" if gelu else None, pdl=pdl)
            if p == 0:
                first = x
    return x, first


def run_launches(x, weights, bits, pdl=0, layers=LAYERS):
    """The MLP chain by launches: (x, mid of the last layer)."""
    return run_chain(x, (weights[:3], weights[3:]), MLP_SHAPES, bits, pdl, layers)


def resident_per_sm(bits, cfg1, cfg2, x, m, weights, bar):
    """Programs of the persistent kernel that fit on one SM at once (registers, warps, shared memory)."""
    props = torch.cuda.get_device_properties(x.device)
    run_persistent(x, m, weights, bar, bits, cfg1, cfg2, 1, layers=0)  # compile (no layers: no work)
    torch.cuda.synchronize()
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    compiled = list(kernel().device_caches[dev][0].values())[-1]
    compiled._init_handles()
    warps = cfg1.get("num_warps", 4)
    regs_per_warp = -(-compiled.n_regs * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps)
    by_warps = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    shared = compiled.metadata.shared
    by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // shared if shared else 32
    info = dict(n_regs=compiled.n_regs, n_spills=compiled.n_spills, shared=shared, by_regs=by_regs,
                by_warps=by_warps, by_smem=by_smem)
    return max(0, min(by_regs, by_warps, by_smem, 32)), info


def graph_us(fn, reps=20):
    """Median µs of one replay of a CUDA graph of fn() (bench_gpu's timer)."""
    return importlib.import_module("bench_gpu")._graph_time(fn, reps=reps) * 1e6


def probe(bits, per_sm_list, log):
    dev = torch.device("cuda")
    cap = ck._capability(dev)
    cfg1, cfg2 = gemv_cfg(bits, INNER, HIDDEN, cap), gemv_cfg(bits, HIDDEN, INNER, cap)
    weights = make_weights(bits, LAYERS, dev)
    x0 = (torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(1)) * 0.5).half().to(dev)
    res = dict(bits=bits, cfg_h_to_4h=cfg1, cfg_4h_to_h=cfg2, weight_bytes=sum(t.numel() * t.element_size()
                                                                               for t in weights))
    # launches (the product path): reference output and times per PDL level
    ref_x, ref_m = run_launches(x0.clone(), weights, bits)
    torch.cuda.synchronize()
    pdl_levels = (0, 1, 2) if ck.pdl_supported(dev) else (0,)
    res["launches_us"] = {p: round(graph_us(lambda p=p: run_launches(x0.clone(), weights, bits, pdl=p)), 1)
                          for p in pdl_levels}
    log(event="launches", bits=bits, us=res["launches_us"])
    # floor: the same bytes in two GEMVs
    q1, s1, b1, q2, s2, b2 = weights
    xm = torch.randn(1, INNER, device=dev).half()
    res["floor_us"] = round(graph_us(lambda: (ck.linear(x0, q1, s1, b1, bits), ck.linear(xm, q2, s2, b2, bits))), 1)
    log(event="floor", bits=bits, us=res["floor_us"])
    # persistent
    x, m = x0.clone(), torch.empty(1, INNER, dtype=torch.float16, device=dev)
    bar = torch.zeros(2, dtype=torch.int32, device=dev)
    fit, info = resident_per_sm(bits, cfg1, cfg2, x, m, weights, bar)
    res["resident"] = dict(info, per_sm=fit)
    log(event="resident", bits=bits, per_sm=fit, **info)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    res["persistent"] = []
    for per_sm in [p for p in per_sm_list if p <= fit]:
        for xcm in (".cg", ""):
            nprog = sms * per_sm
            x.copy_(x0)
            bar.zero_()
            try:
                run_persistent(x, m, weights, bar, bits, cfg1, cfg2, nprog, xcm, cooperative=True)
                torch.cuda.synchronize()
            except Exception as exc:  # (too many programs to be resident: the driver says so)
                res["persistent"].append(dict(per_sm=per_sm, nprog=nprog, xcm=xcm, refused=f"{type(exc).__name__}: {exc}"))
                log(event="persistent", bits=bits, **res["persistent"][-1])
                continue
            flag = int(bar[1].item())
            arrivals = int(bar[0].item())
            equal = bool(torch.equal(x, ref_x) and torch.equal(m, ref_m))
            row = dict(per_sm=per_sm, nprog=nprog, xcm=xcm, watchdog=flag, arrivals_ok=arrivals == 2 * LAYERS * nprog,
                       bit_equal=equal, max_diff=float((x.float() - ref_x.float()).abs().max()),
                       ref_finite=bool(torch.isfinite(ref_x).all() and torch.isfinite(ref_m).all()))
            if flag == 0:
                def fn():
                    bar.zero_()
                    x.copy_(x0)
                    run_persistent(x, m, weights, bar, bits, cfg1, cfg2, nprog, xcm)
                row["us"] = round(graph_us(fn), 1)
                best_launch = min(res["launches_us"].values())
                row["saved_us_per_gemv"] = round((best_launch - row["us"]) / (2 * LAYERS), 2)
            res["persistent"].append(row)
            log(event="persistent", bits=bits, **row)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, action="append", choices=(4, 8))
    ap.add_argument("--per-sm", type=int, action="append", help="programs per SM to try (default 1 2 3 4 6 8)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_persistent.py needs an NVIDIA GPU")
    ck.STRICT = True
    out = dict(device=torch.cuda.get_device_name(), results=[])

    def log(**kw):
        print(json.dumps(kw), flush=True)
    for bits in args.bits or [4]:
        out["results"].append(probe(bits, sorted(set(args.per_sm or [1, 2, 3, 4, 6, 8])), log))
        torch.cuda.empty_cache()  # (that variant's weights are gone)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
