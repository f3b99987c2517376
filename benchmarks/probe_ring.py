"""Probe for a decode megakernel: does a weight stream that never waits for activations remove the
cost of the boundaries between dependent batch-1 GEMVs?

Why: the INT4 decode step (1.99 ms/token on an H100) misses its 1.6 ms goal by fixed costs, ~3.2 us
per dependent GEMV above streaming (112 per token). probe_persistent.py showed a persistent kernel
whose programs wait at a grid barrier pays the same cost as a launch: each program's loads stop at
the barrier, DRAM drains and ramps up again. Here the weight stream is decoupled from the data
dependencies. Each CTA (one per SM, all resident) has a producer warp whose one thread copies this
CTA's share of every phase's weight rows, in order, into a ring of NS shared-memory slots of SB
bytes with the bulk-copy engine (`cp.async.bulk`, sm_90, completion counted on a "full" mbarrier);
it waits only for a free slot ("empty" mbarrier), never for activations, so it runs up to NS slots
ahead, across phase boundaries. The C consumer warps all take every slot, in order: at a phase start
thread 0 waits until every CTA has counted the previous phase done (one global counter per phase,
release / acquire), each thread loads its activation chunks (32 halves per 16 weight bytes) from L2
into registers, then per slot multiplies its chunks of the slot's rows, reduces across the warp
and leaves a partial per (row, warp) in shared memory; at the phase end each of the CTA's rows is
summed in a fixed order, scaled, biased (GELU after W1) and stored, and the CTA counts itself done.

Chains (28 layers, INT4, batch 1). CHAIN=2, as probe_persistent.py (its weights), 56 dependent GEMVs:
    mid = gelu(W1 x + b1)    W1 16384 x 4096
    x   = W2 mid + b2        W2 4096 x 16384
CHAIN=4, a decode layer's four linears, 112 dependent GEMVs (qkv and dense drawn the same way):
    qkv = Wq x + bq          Wq 12288 x 4096
    h   = Wd qkv[:4096] + bd Wd 4096 x 4096   (in place of the attention)
    then the MLP on h as above
Contenders, each one CUDA graph, timed by replay: the product's Triton launches (PDL 0 / 1 / 2),
the same bytes as one GEMV per shape (the streaming floor), and this kernel over a few configs (consumer warps,
ring slots, slot size, L2 evict-first hint on the weight copies; NOWAIT=1 skips the wait for the
previous phase — wrong numbers, the ring's own streaming rate). Each config runs in its own process.

Math of a slot: weights become f16 pairs with LOP3 (as cuda_mma.py), products summed with f16x2
FMAs over one 16-byte chunk (16 products per half), then in fp32. The f16 partial sums round
differently from the Triton GEMV's fp32 FMAs, so the outputs are compared with a tolerance against
the launches and against float64 (layer 1), not bit for bit; this is a timing probe. F32ACC=1 turns
each f16 code into fp32 and multiplies-adds in fp32 (the product's numerics, ~3 instructions per
value instead of ~1.5): whether the consumers can afford exact sums.

History: a first version (not kept) gave each consumer warp whole slots in turn, staged the
activations in shared memory at every phase start and counted every finished slot with a global
atomic (2048 per phase), and its waits read the watchdog flag from global memory at their first miss
(an L2 round trip on the critical path of every slot that was not there yet). H100, 2026-12-06: C=4, NS=6 / 8 / 11 slots of 16 KB: 1018 / 1024 / 1019 us
against 888 / 891 / 1037 us for the launches (PDL 0 / 1 / 2) and 684 us for the 2-GEMV floor, outputs
within 1.5e-5 of the launches; C=8 faulted (with more warps than slots a warp could wait on a slot's
"full" barrier two rounds ahead, where the phase parity reads as done). This version (every warp on
every slot, in order, so a barrier is never waited on more than one round ahead; activations in
registers; one counter update per CTA per phase; the flag read only after a 1 ms wait) ran on H100s
on 2026-12-07 (20 configs; results/gpu.md, twentieth round). Best, C=4 and 12 slots of 16 KB: MLP chain
806 us waiting / 733 NOWAIT against 882 (launches) and 670 (floor); decode chain 1312 / 1161 against
1371 / 1010; more consumer warps are slower (C=16: 888 / 805 and 1555 / 1323); F32ACC slower than the
launches. The consumers stream above the floor even without waits, each phase wait costs ~1.3 us inside
the kernel, and the saving on the decode chain is 0.53 us per GEMV: the megakernel this probe was for
was not built.

Run (H100):   cd benchmarks && python3 probe_ring.py [--first N | --configs '[{"C": 8, "NOWAIT": 1}]'] --json $OUT/ring.json
"""
import argparse
import ctypes
import importlib
import json
import sys
from pathlib import Path

import torch

import _package  # noqa: F401  (registers the repo root as package `chatglm6b`)
import probe_persistent as pp

mma = importlib.import_module("chatglm6b.cuda_mma")
ck = importlib.import_module("chatglm6b.cuda_kernels")
quant = importlib.import_module("chatglm6b.quantization")

HIDDEN, INNER, LAYERS = pp.HIDDEN, pp.INNER, pp.LAYERS

SOURCE = mma.DEVICE_HELPERS + r"""
typedef unsigned long long u64;

/* The phases of one layer: CHAIN 2 = the MLP (W1 16384 x 4096 + GELU, W2 4096 x 16384); CHAIN 4 = a
   decode layer's four linears (qkv 12288 x 4096, dense 4096 x 4096 reading qkv's first 4096 values in
   place of the attention, then the MLP). Bytes per row (INT4): K / 2. */
#if CHAIN == 4
#define NPH 4
__device__ __forceinline__ int ph_n(int p) { return p == 0 ? 12288 : p == 2 ? 16384 : 4096; }
__device__ __forceinline__ int ph_rb(int p) { return p == 3 ? 8192 : 2048; }
#else
#define NPH 2
__device__ __forceinline__ int ph_n(int p) { return p == 0 ? 16384 : 4096; }
__device__ __forceinline__ int ph_rb(int p) { return p == 1 ? 8192 : 2048; }
#endif
#define NT (C * 32)               /* consumer threads */
#define PS 16                     /* partial sums per row (max warps sharing a row) */

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ u64 now_ns() { u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
/* Watchdog for a wait that started at t0 (ns): after 1 ms it reads the global flag (another wait gave
   up: stop too), after 0.5 s it sets it (results then invalid). Nothing global is read before 1 ms:
   a flag read on every wait would put an L2 round trip on the critical path (the first version did). */
__device__ __forceinline__ bool give_up(u64 t0, u32* flag) {
    const u64 waited = now_ns() - t0;
    if (waited < 1000000ull) return false;
    if (*(volatile u32*)flag || waited > 500000000ull) { atomicExch(flag, 1u); return true; }
    return false;
}
/* Wait for an mbarrier phase (watchdog: give_up). */
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity, u32* flag) {
    u32 ok = 0;
    u64 t0 = 0;
    while (true) {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
        if (ok) return;
        if (t0 == 0) t0 = now_ns();
        else if (give_up(t0, flag)) return;
    }
}
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar, u64 policy) {
#if EVICT_FIRST
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar), "l"(policy) : "memory");
#else
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#endif
}
__device__ __forceinline__ u32 ld_acquire(const u32* p) {
    u32 v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ void red_release(u32* p, u32 v) {
    asm volatile("red.release.gpu.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_cg(const void* p) {
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" :: "r"(NT) : "memory"); }

/* Wait until *p >= target (watchdog: give_up). */
__device__ void wait_count(const u32* p, u32 target, u32* flag) {
    if (ld_acquire(p) >= target) return;
    const u64 t0 = now_ns();
    while (ld_acquire(p) < target) {
        if (give_up(t0, flag)) return;
    }
}

/* One phase, y = act(W xin * scale + bias), this CTA's slots a .. e - 1 (R rows of RB bytes each).
   Every consumer thread takes the same chunks of every slot: chunk c0 (+ k NT) of rows rg + j TG.
   Its activations (32 halves per chunk) sit in registers for the whole phase, loaded from L2
   right after the phase's barrier. Per-warp partial sums go to shared memory (part), then each
   row is summed in a fixed order and stored. */
template <int RB, int R, int GELU>
__device__ __forceinline__ void phase_run(const unsigned char* ring, u32 full0, u32 empty0, u32& s, int a, int e,
                                          const u16* xin, u16* y, const u16* scale, const u16* bias, float* part,
                                          u32* flag) {
    constexpr int CH = RB / 16;
    constexpr bool WIDE = NT >= CH;
    constexpr int TG = WIDE ? NT / CH : 1;
    constexpr int RPT = WIDE ? R / TG : R;
    constexpr int CPT = WIDE ? 1 : CH / NT;
    constexpr int WSUB = WIDE ? CH / 32 : C;
    static_assert(!WIDE || R % TG == 0, "rows per slot must split over the thread groups");
    static_assert(WSUB <= PS, "partial stride");
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int c0 = WIDE ? t % CH : t;
    const int rg = WIDE ? t / CH : 0;
    const int wsub = WIDE ? (t % CH) >> 5 : warp;
#if F32ACC
    float xf[CPT][32];  /* fp32 activations, natural order */
#else
    u32 xb[CPT][16];    /* f16 pairs in the order the bit tricks produce: (x1 x5) (x0 x4) (x3 x7) (x2 x6) */
#endif
    #pragma unroll
    for (int k = 0; k < CPT; ++k) {
        const u16* xp = xin + (c0 + k * NT) * 32;
        #pragma unroll
        for (int q = 0; q < 4; ++q) {
            uint4 xx = ld_cg(xp + 8 * q);
#if F32ACC
            const u32 xw[4] = {xx.x, xx.y, xx.z, xx.w};
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                xf[k][8 * q + 2 * i] = h2f((u16)(xw[i] & 0xffffu));
                xf[k][8 * q + 2 * i + 1] = h2f((u16)(xw[i] >> 16));
            }
#else
            xb[k][4 * q + 0] = prmt(xx.x, xx.z, 0x7632); xb[k][4 * q + 1] = prmt(xx.x, xx.z, 0x5410);
            xb[k][4 * q + 2] = prmt(xx.y, xx.w, 0x7632); xb[k][4 * q + 3] = prmt(xx.y, xx.w, 0x5410);
#endif
        }
    }
    for (int u = a; u < e; ++u, ++s) {
        const u32 idx = s % NS, round = s / NS;
        mbar_wait(full0 + 8 * idx, round & 1, flag);
        const unsigned char* slot = ring + idx * SB;
        float sum[RPT];
        #pragma unroll
        for (int j = 0; j < RPT; ++j) {
            const int r = rg + j * TG;
            sum[j] = 0.f;
            #pragma unroll
            for (int k = 0; k < CPT; ++k) {
                uint4 w = *(const uint4*)(slot + r * RB + (c0 + k * NT) * 16);
                u32 ws[4] = {w.x, w.y, w.z, w.w};
#if F32ACC
                float acc = 0.f;  /* each code exact in f16 and in f32: fp32 products and sums */
                #pragma unroll
                for (int q = 0; q < 4; ++q) {
                    u32 v = ws[q];
                    #pragma unroll
                    for (int h = 0; h < 2; ++h) {  /* bytes 0, 2 then 1, 3: columns 2b (high nibble), 2b + 1 */
                        u32 lo = int4_lo_pair(v);
                        u32 hi = int4_hi_pair(v);
                        const float* xq = &xf[k][8 * q + 2 * h];
                        acc = fmaf(h2f((u16)(hi & 0xffffu)), xq[0], acc);
                        acc = fmaf(h2f((u16)(lo & 0xffffu)), xq[1], acc);
                        acc = fmaf(h2f((u16)(hi >> 16)), xq[4], acc);
                        acc = fmaf(h2f((u16)(lo >> 16)), xq[5], acc);
                        v >>= 8;
                    }
                }
                sum[j] += acc;
#else
                u32 acc = 0u;
                #pragma unroll
                for (int q = 0; q < 4; ++q) {
                    u32 v = ws[q];
                    u32 lo = int4_lo_pair(v);
                    u32 hi = int4_hi_pair(v);
                    acc = hfma2(lo, xb[k][4 * q + 0], acc);
                    acc = hfma2(hi, xb[k][4 * q + 1], acc);
                    v >>= 8;
                    lo = int4_lo_pair(v);
                    hi = int4_hi_pair(v);
                    acc = hfma2(lo, xb[k][4 * q + 2], acc);
                    acc = hfma2(hi, xb[k][4 * q + 3], acc);
                }
                sum[j] += h2f((u16)(acc & 0xffffu)) + h2f((u16)(acc >> 16));
#endif
            }
        }
        #pragma unroll
        for (int j = 0; j < RPT; ++j) {
            #pragma unroll
            for (int off = 16; off > 0; off >>= 1) sum[j] += __shfl_xor_sync(0xffffffffu, sum[j], off);
        }
        __syncwarp();  /* every lane's reads of the slot are done (the sums depend on them) */
        if (lane == 0) {
            mbar_arrive(empty0 + 8 * idx);
            #pragma unroll
            for (int j = 0; j < RPT; ++j) part[((u - a) * R + rg + j * TG) * PS + wsub] = sum[j];
        }
    }
    consumers_sync();
    const int nrows = (e - a) * R;
    for (int i = t; i < nrows; i += NT) {
        float v = 0.f;
        #pragma unroll
        for (int w = 0; w < WSUB; ++w) v += part[i * PS + w];
        const int row = a * R + i;
        float out = v * h2f(scale[row]) + h2f(bias[row]);
        if (GELU) out = 0.5f * out * (1.f + tanhf(0.7978845608028654f * out * (1.f + 0.044715f * out * out)));
        y[row] = f2h(out);
    }
    consumers_sync();
}

/* One phase's table entry (int64 words): weight bytes, scales, biases, input, output; layer 0's, the
   layers follow each other (weight + layer N K / 2 bytes, scales / biases + layer N). */
struct Phase { const unsigned char* w; const u16* s; const u16* b; const u16* in; u16* out; };

template <int RB, int GELU>
__device__ __forceinline__ void phase_at(const Phase& P, int N, int layer, const unsigned char* ring, u32 full0,
                                         u32 empty0, u32& s, float* part, u32* flag) {
    constexpr int R = SB / RB;
    const int U = N / R, G = gridDim.x, cta = blockIdx.x;
    phase_run<RB, R, GELU>(ring, full0, empty0, s, cta * U / G, (cta + 1) * U / G, P.in, P.out,
                           P.s + (u64)layer * N, P.b + (u64)layer * N, part, flag);
}

extern "C" __global__ void __launch_bounds__(NT + 32, 1)
ring_chain(const Phase* tab, u32* done, u32* flag, int layers) {
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* ring = smem;                                  /* NS slots of SB bytes */
    float* part = (float*)(smem + NS * SB);                      /* MAXROWS x PS partial sums */
    unsigned long long* bars = (unsigned long long*)(part + MAXROWS * PS);  /* full[NS], empty[NS] */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int G = gridDim.x, cta = blockIdx.x;
    const u32 full0 = smem_u32(bars), empty0 = smem_u32(bars + NS);
    if (threadIdx.x == 0) {
        for (int i = 0; i < NS; ++i) { mbar_init(full0 + 8 * i, 1); mbar_init(empty0 + 8 * i, C); }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (warp == C) {  /* producer: all of this CTA's weight slots, in order, into the ring */
        if (lane == 0) {
            u64 policy = 0;
#if EVICT_FIRST
            asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
#endif
            u32 s = 0;
            for (int layer = 0; layer < layers; ++layer) {
                for (int ph = 0; ph < NPH; ++ph) {
                    const int N = ph_n(ph), RB = ph_rb(ph), U = N / (SB / RB);
                    const unsigned char* base = tab[ph].w + (u64)layer * N * RB;
                    for (int u = cta * U / G; u < (cta + 1) * U / G; ++u, ++s) {
                        const u32 idx = s % NS, round = s / NS;
                        if (round > 0) mbar_wait(empty0 + 8 * idx, (round - 1) & 1, flag);
                        mbar_expect(full0 + 8 * idx, SB);
                        bulk_copy(smem_u32(ring + idx * SB), base + (u64)u * SB, SB, full0 + 8 * idx, policy);
                    }
                }
            }
        }
        return;
    }

    /* consumers: every slot, in order; a phase starts once every CTA finished the previous one */
    u32 s = 0;
    int phase = 0;
    for (int layer = 0; layer < layers; ++layer) {
        for (int ph = 0; ph < NPH; ++ph, ++phase) {
            if (phase > 0) {
                if (threadIdx.x == 0 && !NOWAIT) wait_count(done + phase - 1, G, flag);
                consumers_sync();
            }
            const Phase P = tab[ph];
            const int N = ph_n(ph);  /* row bytes and GELU are template arguments: one branch per kind */
#if CHAIN == 4
            if (ph < 2) phase_at<2048, 0>(P, N, layer, ring, full0, empty0, s, part, flag);
            else if (ph == 2) phase_at<2048, 1>(P, N, layer, ring, full0, empty0, s, part, flag);
            else phase_at<8192, 0>(P, N, layer, ring, full0, empty0, s, part, flag);
#else
            if (ph == 0) phase_at<2048, 1>(P, N, layer, ring, full0, empty0, s, part, flag);
            else phase_at<8192, 0>(P, N, layer, ring, full0, empty0, s, part, flag);
#endif
            if (threadIdx.x == 0) { __threadfence(); red_release(done + phase, 1); }
        }
    }
}
"""


QKV = 3 * HIDDEN


def shapes(chain):
    """(N, K, GELU) of each phase of one layer (as the kernel's ph_n / ph_rb)."""
    mlp = list(pp.MLP_SHAPES)
    return mlp if chain == 2 else [(QKV, HIDDEN, False), (HIDDEN, HIDDEN, False)] + mlp


def full_cfg(cfg, grid):
    """The kernel's -D defines: cfg plus MAXROWS (rows of one CTA in one phase, at most)."""
    sb = cfg["SB"]
    most = 0
    for n, k, _ in shapes(cfg["CHAIN"]):
        rows = sb // (k // 2)
        slots = n // rows
        most = max(most, -(-slots // grid) * rows)
    return dict(cfg, MAXROWS=most)


def smem_bytes(cfg):
    return cfg["NS"] * cfg["SB"] + cfg["MAXROWS"] * 16 * 4 + 16 * cfg["NS"]


_KERNELS = {}


def kernel(cfg, dev):
    key = tuple(sorted(cfg.items()))
    if key not in _KERNELS:
        cap = torch.cuda.get_device_capability(dev)
        cubin = mma.compile_cubin(SOURCE, f"sm_{cap[0]}{cap[1]}", cfg)
        _KERNELS[key] = mma._Kernel(cubin, "ring_chain", dev, pdl=False)
    return _KERNELS[key]


def buffers(chain, x):
    """Activation buffers: x (in / out) and each phase's output; phase p reads buffer p's first K values."""
    dev = x.device
    outs = [torch.empty(1, n, dtype=torch.float16, device=dev) for n, _, _ in shapes(chain)[:-1]]
    return [x] + outs + [x]


def table(phases, bufs):
    """The kernel's Phase table: per phase (weights, scales, biases, input, output) as int64 words."""
    rows = [[t.data_ptr() for t in (q, s, b, bufs[p], bufs[p + 1])] for p, (q, s, b) in enumerate(phases)]
    return torch.tensor(rows, dtype=torch.int64, device=bufs[0].device)


def run_ring(tab, done, flag, cfg, grid, layers=LAYERS):
    k = kernel(cfg, tab.device)
    args = [ctypes.c_void_p(t.data_ptr()) for t in (tab, done, flag)] + [ctypes.c_int(layers)]
    k.launch(grid, 32 * (cfg["C"] + 1), smem_bytes(cfg), args)


def run_launches(x, phases, chain, pdl=0, layers=LAYERS):
    """The product's Triton GEMVs, phase by phase: (final x, first phase's output of the last layer)."""
    return pp.run_chain(x, phases, shapes(chain), 4, pdl, layers)


def configs():
    """Most telling first (results are written as they come; a call cut short keeps them)."""
    base = dict(C=16, NS=12, SB=16384, EVICT_FIRST=0, NOWAIT=0)
    out = [dict(base),
           # no wait for the previous phase (wrong numbers): the ring's own streaming rate
           dict(base, NOWAIT=1),
           # a decode layer's four linears (qkv, dense, h_to_4h, 4h_to_h): 112 dependent GEMVs
           dict(base, CHAIN=4),
           dict(base, CHAIN=4, NOWAIT=1),
           # fp32 products and sums (exact codes; ~3 instructions per value instead of ~1.5)
           dict(base, F32ACC=1),
           dict(base, CHAIN=4, F32ACC=1),
           dict(base, C=8),
           dict(base, CHAIN=4, C=8),
           dict(base, C=4),
           dict(base, NS=6, SB=32768),
           dict(base, NS=8),
           dict(base, EVICT_FIRST=1)]
    for cfg in out:
        cfg.setdefault("F32ACC", 0)
        cfg.setdefault("CHAIN", 2)
    return out


def setup(dev, chain):
    """The chain's INT4 weights (probe_persistent's MLP; for CHAIN 4 qkv and dense drawn the same way,
    another seed) as [(q, s, b)] per phase, and a first activation row."""
    x0 = (torch.randn(1, HIDDEN, generator=torch.Generator(device=dev).manual_seed(1), device=dev) * 0.5).half()
    w = pp.make_weights(4, LAYERS, dev)
    if chain == 4:
        w = pp.make_weights(4, LAYERS, dev, seed=1, shapes=((QKV, HIDDEN), (HIDDEN, HIDDEN))) + w
    return [w[i:i + 3] for i in range(0, len(w), 3)], x0


def one(cfg):
    """Correctness and time of one ring config (own process: a faulting config cannot poison the next)."""
    dev = torch.device("cuda")
    chain = cfg.get("CHAIN", 2)
    phases, x0 = setup(dev, chain)
    ref_x, _ = run_launches(x0.clone(), phases, chain)
    one_x, one_first = run_launches(x0.clone(), phases, chain, layers=1)
    (q, s, b), (n, _, gelu) = phases[0], shapes(chain)[0]
    r64 = x0.double() @ quant.dequantize_weight(q[:n], s[:n], 4, torch.float64).T + b[:n].double()
    if gelu:
        r64 = torch.nn.functional.gelu(r64, approximate="tanh")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    cfg = full_cfg(cfg, sms)
    row = dict(event="ring", **cfg, grid=sms, smem=smem_bytes(cfg))
    x = x0.clone()
    bufs = buffers(chain, x)
    tab = table(phases, bufs)
    done = torch.zeros(len(phases) * LAYERS, dtype=torch.int32, device=dev)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    run_ring(tab, done, flag, cfg, sms, layers=1)
    torch.cuda.synchronize()
    row["l1_first_err_ring"] = float((bufs[1].double() - r64).abs().max())
    row["l1_first_err_launch"] = float((one_first.double() - r64).abs().max())
    row["l1_first_ref_max"] = float(r64.abs().max())
    row["l1_x_diff"] = float((x.float() - one_x.float()).abs().max())
    x.copy_(x0); done.zero_(); flag.zero_()
    run_ring(tab, done, flag, cfg, sms)
    torch.cuda.synchronize()
    row["watchdog"] = int(flag.item())
    row["counts_ok"] = bool((done == sms).all())
    row["max_diff_x"] = float((x.float() - ref_x.float()).abs().max())
    row["ref_max_x"] = float(ref_x.float().abs().max())
    if row["watchdog"] == 0:
        def fn():
            done.zero_()
            x.copy_(x0)
            run_ring(tab, done, flag, cfg, sms)
        row["us"] = round(pp.graph_us(fn), 1)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--one", help="(internal) run one config, given as JSON")
    ap.add_argument("--first", type=int, default=0, help="run only the first N configs (0: all)")
    ap.add_argument("--configs", help="run these configs instead (JSON list of dicts; keys as configs())")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_ring.py needs an NVIDIA GPU (sm_90: bulk copies)")
    ck.STRICT = True
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one))), flush=True)
        return
    dev = torch.device("cuda")
    out = dict(device=torch.cuda.get_device_name(), rows=[])

    def log(**kw):
        print(json.dumps(kw), flush=True)
        out["rows"].append(kw)
    todo = json.loads(args.configs) if args.configs else configs()
    base_cfg = configs()[0]
    todo = [dict(base_cfg, **cfg) for cfg in todo][:args.first or None]
    base = {}
    for chain in sorted({cfg["CHAIN"] for cfg in todo}):
        phases, x0 = setup(dev, chain)
        launches = {p: round(pp.graph_us(lambda p=p: run_launches(x0.clone(), phases, chain, pdl=p)), 1)
                    for p in (0, 1, 2)}
        log(event="launches", chain=chain, us=launches)
        xs = [torch.randn(1, k, device=dev).half() for _, k, _ in shapes(chain)]
        floor = round(pp.graph_us(lambda: [ck.linear(xi, q, s, b, 4) for xi, (q, s, b) in zip(xs, phases)]), 1)
        log(event="floor", chain=chain, us=floor)
        base[chain] = min(launches.values())
        del phases
        torch.cuda.empty_cache()
    for cfg in todo:
        try:
            row = _package.run_child([__file__, "--one", json.dumps(cfg)], what=f"ring {cfg}")
            if "us" in row:
                row["saved_us_per_gemv"] = round((base[cfg["CHAIN"]] - row["us"]) / (cfg["CHAIN"] * LAYERS), 2)
        except Exception as exc:
            row = dict(event="ring", **cfg, error=str(exc)[-1500:])
        log(**row)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

if __name__ == "__main__":
    main()
