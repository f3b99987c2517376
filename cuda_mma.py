"""Batch-1 INT8 / INT4 decode GEMV on tensor cores, written in CUDA C and compiled with NVRTC.
Opt-in (CHATGLM_MMA_GEMV=1); the default batch-1 path stays the Triton GEMV.

Why it exists: the Triton GEMV (cuda_kernels._gemv_kernel) turns every weight into an fp32 value
and multiplies it with one FMA, about three instructions per INT4 value, which looked issue-bound.
Here the weights become fp16 pairs in registers (one LOP3 + one f16x2 subtraction or FMA per two
values) and an `mma.sync` m16n8k16 multiplies a 16 x 16 weight tile by the activation vector, so
the tensor cores do the multiply-adds: about 1.3 instructions per INT4 value. Triton cannot place
values in the registers an `mma.sync` fragment needs, hence CUDA C; NVRTC compiles it at load time
for the GPU that is present (sm_80 and newer), so nothing ships as a binary and no CUDA toolkit is
needed: NVRTC comes with PyTorch's CUDA wheels (nvidia-cuda-nvrtc), the driver API with the driver.

What was measured (H100, benchmarks/results/gpu.md): in the whole INT4 decode graph it is slower,
2.169 ms/token against the Triton GEMV's 2.072 (same call; 2.080 vs 2.069 on another host), and
alone per layer shape 0.1-2 µs slower per call. The Triton GEMV was not issue-bound after all: the 112 GEMVs of a step take 1390 µs
and the same bytes in 4 GEMVs 1031 µs (94 % of the copy bandwidth), so what separates it from the floor
is a fixed cost per kernel (ramp-up and tail, 3.2 µs per launch). This kernel adds its own per-block
fixed cost (x staged in shared memory, a block barrier, the cross-warp sum). It is kept, tested, as
the base for kernels that need fragment-level control (a LayerNorm-in-prologue or persistent decode
kernel), and for GPUs where the Triton GEMV may really be issue-bound (fewer FP32 lanes per byte
of bandwidth, e.g. A100: not measured here).

The weights stay in the checkpoint layout ([N, K] int8 rows; INT4: two values per byte, even
column in the high nibble), shared with every other path. Tensor-core fragments need no
particular k order: the dot product is the same for any permutation of k, provided the weight
and the activation fragments use the same one. So each lane reads 16 contiguous bytes of two
rows (`gid` and `gid + 8` of a 16-row tile) and feeds them to the MMA in the order the bit
tricks produce, and reads the activations to match from shared memory (x is staged there once
per block, padded so those reads are free of bank conflicts):

* INT4 word (eight values; byte i = column 2i high nibble, 2i+1 low): (w & 0x000f000f) ^ 0x64086408
  is the f16 pair (1032 + q1, 1032 + q5); subtracting 1032 leaves (q1, q5). The high nibbles,
  (w & 0x00f000f0) ^ 0x64806480, read 1024 + 16 (q0 + 8): times 1/16 minus 72 gives (q0, q4);
  w >> 8 gives (q3, q7) and (q2, q6). Activations are paired to match with byte permutes.
* INT8 word (four values): byte-permute (w ^ 0x80808080) under the exponent of 1024: (1152 + q0,
  1152 + q1) and (1152 + q2, 1152 + q3) minus 1152. The activations are already in pairs.

Every value is exact in fp16, the tensor cores multiply exactly and accumulate in fp32 (their
accumulation order within a 16-wide k slice is the hardware's), so the result differs from the
Triton GEMV's (fp32 FMAs in another order) only by fp32 rounding. Each warp of a block takes an
interleaved share of K; the warps' partial sums meet in shared memory and are added in a fixed
order (deterministic), then the per-row scale and bias are applied and the row rounded once to fp16.

Programmatic dependent launch (sm_90+, as the Triton kernels): the kernel lets the next one launch
at once, then issues its first weight loads (they do not depend on any earlier kernel) before it
waits for the previous kernel and reads x.

Nothing here is imported by Hugging Face's loader unless a CUDA GPU is used: ctypes is stdlib, and
the NVRTC and driver libraries are opened lazily. `available(device)` says whether this path can
run; any failure (no NVRTC, compile error, a driver too old for the cubin) makes cuda_kernels keep
its Triton GEMV.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import hashlib
import os
import sys
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .cpu_kernels import cache_dir, prune_stale

__all__ = ["available", "supports", "weight_ok", "gemv", "config_for", "compile_cubin", "nvrtc_version", "capability"]

# Opt-in (CHATGLM_MMA_GEMV=1): on the H100 the Triton GEMV measured faster in the decode graph
# (benchmarks/results/gpu.md), so cuda_kernels uses this kernel only when asked to.
ENABLED = os.environ.get("CHATGLM_MMA_GEMV", "0").strip().lower() in ("1", "true", "yes", "on")

_LOCK = threading.Lock()
_NVRTC = None  # ctypes.CDLL or False when it cannot be found
_CUDA = None  # libcuda or False
_KERNELS: Dict[tuple, "_Kernel"] = {}  # (compile defines, device index) -> kernel
_CAPABILITY: Dict[int, Tuple[int, int]] = {}  # device index -> (major, minor)

# Configurations, key ((major, minor) compute capability, bits, N, K); other GPUs and shapes use the
# generic entry per bits.
# MT: 16-row tiles per warp; WARPS: warps per block, splitting K; U: weight steps in flight per lane.
_GENERIC = {4: dict(MT=1, WARPS=4, U=4), 8: dict(MT=1, WARPS=4, U=4)}
_SHAPE_CFG: Dict[tuple, dict] = {  # chosen in the whole decode graph (bench_gpu.py --sweep-mma), H100
    ((9, 0), 4, 12288, 4096): dict(MT=1, WARPS=2, U=4),
    ((9, 0), 4, 4096, 4096): dict(MT=1, WARPS=16, U=2),
    ((9, 0), 4, 16384, 4096): dict(MT=1, WARPS=2, U=4),
    ((9, 0), 4, 4096, 16384): dict(MT=1, WARPS=16, U=2),
    ((9, 0), 8, 12288, 4096): dict(MT=2, WARPS=4, U=4),
    ((9, 0), 8, 4096, 4096): dict(MT=1, WARPS=16, U=2),
    ((9, 0), 8, 16384, 4096): dict(MT=2, WARPS=4, U=4),
    ((9, 0), 8, 4096, 16384): dict(MT=1, WARPS=16, U=2),
}


# ------------------------------------------------------------------------------------------------
# The kernel. Macros set per compile: BITS, MT, WARPS, U, HAS_BIAS, PDL. (No GELU epilogue: CUDA C's
# tanhf is not bit-equal to the libdevice tanh the Triton kernels and the eager GELU agree on, so a
# linear with act="gelu" keeps the Triton GEMV.)

# Bit-level helpers shared with benchmarks/probe_ring.py (prepended to its kernel source).
DEVICE_HELPERS = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 lop3_and_xor(u32 a, u32 b, u32 c) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0x6a;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
/* INT4 word (byte i: column 2i in the high nibble, 2i + 1 in the low one, two's complement) as f16
   pairs: low nibbles of bytes 0 and 2 -> (q1, q5); high nibbles -> (q0, q4). On w >> 8: (q3, q7), (q2, q6). */
__device__ __forceinline__ u32 int4_lo_pair(u32 w) {
    return hsub2(lop3_and_xor(w, 0x000f000fu, 0x64086408u), 0x64086408u);
}
__device__ __forceinline__ u32 int4_hi_pair(u32 w) {
    return hfma2(lop3_and_xor(w, 0x00f000f0u, 0x64806480u), 0x2c002c00u, 0xd480d480u);
}
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

"""

_SOURCE = DEVICE_HELPERS + r"""
#define KSTEP (BITS == 4 ? 128 : 64)        /* k values per warp step: 16 bytes per lane per row */
#define XPAD(k) ((k) + ((k) >> 6) * 8)       /* halves: 16 bytes of padding after every 128 bytes */

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
/* y[r] = sum * scale[r] + bias[r] rounded to fp16 (rows past N are not stored). */
__device__ __forceinline__ void store_row(u16* y, const u16* scale, const u16* bias, int r, int N, float sum) {
    if (r >= N) return;
    float out = sum * h2f(scale[r]);
#if HAS_BIAS
    out += h2f(bias[r]);
#endif
    y[r] = f2h(out);
}

/* Multiply one step (16 bytes of rows gid and gid + 8 of each 16-row tile) into acc. */
__device__ __forceinline__ void step_math(float (*acc)[2][4], const uint4* w, const u16* xs, int k) {
#if BITS == 4
    const uint4* xv = (const uint4*)(xs + XPAD(k));  /* 32 halves of this lane: k .. k + 31 */
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
        uint4 xx = xv[j];  /* x[k + 8j .. k + 8j + 7] as pairs (x0 x1) (x2 x3) (x4 x5) (x6 x7) */
        u32 b15 = prmt(xx.x, xx.z, 0x7632), b04 = prmt(xx.x, xx.z, 0x5410);
        u32 b37 = prmt(xx.y, xx.w, 0x7632), b26 = prmt(xx.y, xx.w, 0x5410);
        #pragma unroll
        for (int t = 0; t < MT; ++t) {
            u32 w0 = ((const u32*)&w[2 * t])[j], w1 = ((const u32*)&w[2 * t + 1])[j];
            u32 lo0 = int4_lo_pair(w0);
            u32 lo1 = int4_lo_pair(w1);
            u32 hi0 = int4_hi_pair(w0);
            u32 hi1 = int4_hi_pair(w1);
            mma(acc[t][0], lo0, lo1, hi0, hi1, b15, b04);
            w0 >>= 8;
            w1 >>= 8;
            lo0 = int4_lo_pair(w0);
            lo1 = int4_lo_pair(w1);
            hi0 = int4_hi_pair(w0);
            hi1 = int4_hi_pair(w1);
            mma(acc[t][1], lo0, lo1, hi0, hi1, b37, b26);
        }
    }
#else
    const uint4* xv = (const uint4*)(xs + XPAD(k));  /* 16 halves of this lane: k .. k + 15 */
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        uint4 xx = xv[h];
        #pragma unroll
        for (int t = 0; t < MT; ++t) {
            #pragma unroll
            for (int j = 0; j < 2; ++j) {
                u32 u0 = ((const u32*)&w[2 * t])[2 * h + j] ^ 0x80808080u;
                u32 u1 = ((const u32*)&w[2 * t + 1])[2 * h + j] ^ 0x80808080u;
                u32 a0 = hsub2(prmt(u0, 0x64646464u, 0x4140), 0x64806480u);
                u32 a1 = hsub2(prmt(u1, 0x64646464u, 0x4140), 0x64806480u);
                u32 a2 = hsub2(prmt(u0, 0x64646464u, 0x4342), 0x64806480u);
                u32 a3 = hsub2(prmt(u1, 0x64646464u, 0x4342), 0x64806480u);
                mma(acc[t][j], a0, a1, a2, a3, j ? xx.z : xx.x, j ? xx.w : xx.y);
            }
        }
    }
#endif
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
mma_gemv(const u16* __restrict__ x, const unsigned char* __restrict__ w, const u16* __restrict__ scale,
         const u16* __restrict__ bias, u16* __restrict__ y, int N, int K, long long ldw)
{
    extern __shared__ __align__(16) u16 xs[];            /* x, padded (XPAD) */
    __shared__ float red[WARPS > 1 ? WARPS : 1][MT * 16];
#if PDL
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int row0 = blockIdx.x * (MT * 16);
    const int nsteps = K / KSTEP;
    const int mine = nsteps > warp ? (nsteps - warp + WARPS - 1) / WARPS : 0;  /* steps warp, warp + WARPS, ... */

    const unsigned char* wp[2 * MT];
    #pragma unroll
    for (int t = 0; t < MT; ++t) {
        int r = min(row0 + 16 * t + gid, N - 1), r8 = min(row0 + 16 * t + gid + 8, N - 1);
        wp[2 * t] = w + r * ldw + warp * 64 + tig * 16;
        wp[2 * t + 1] = w + r8 * ldw + warp * 64 + tig * 16;
    }
    const long long wstride = (long long)WARPS * 64;  /* bytes between this warp's steps */

    uint4 ring[U][2 * MT];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        if (u < mine) {
            #pragma unroll
            for (int i = 0; i < 2 * MT; ++i) ring[u][i] = load_stream(wp[i] + u * wstride);
        }
    }
#if PDL >= 2
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    for (int i = threadIdx.x; i < K / 8; i += WARPS * 32) {  /* stage x (16 bytes per lane per turn) */
        *(uint4*)(xs + XPAD(8 * i)) = ((const uint4*)x)[i];
    }
    __syncthreads();

    float acc[MT][2][4];  /* two accumulators per tile: consecutive MMAs alternate (shorter chains) */
    #pragma unroll
    for (int t = 0; t < MT; ++t) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][0][i] = acc[t][1][i] = 0.0f;
    }

    const int lane_k = tig * (KSTEP / 4);
    for (int s0 = 0; s0 < mine; s0 += U) {
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int s = s0 + u;
            if (s < mine) {
                uint4 cur[2 * MT];
                #pragma unroll
                for (int i = 0; i < 2 * MT; ++i) cur[i] = ring[u][i];
                if (s + U < mine) {
                    #pragma unroll
                    for (int i = 0; i < 2 * MT; ++i) ring[u][i] = load_stream(wp[i] + (s + U) * wstride);
                }
                step_math(acc, cur, xs, (warp + s * WARPS) * KSTEP + lane_k);
            }
        }
    }

    /* acc[t][c] = {y[gid][2tig], y[gid][2tig+1], y[gid+8][2tig], y[gid+8][2tig+1]} of the 16 x 8
       product (two partial sums); every column is the same vector x, so lanes with tig == 0 hold
       rows gid, gid + 8. */
#if WARPS > 1
    if (tig == 0) {
        #pragma unroll
        for (int t = 0; t < MT; ++t) {
            red[warp][16 * t + gid] = acc[t][0][0] + acc[t][1][0];
            red[warp][16 * t + gid + 8] = acc[t][0][2] + acc[t][1][2];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < MT * 16; i += WARPS * 32) {
        float sum = red[0][i];
        #pragma unroll
        for (int v = 1; v < WARPS; ++v) sum += red[v][i];  /* fixed order: deterministic */
        store_row(y, scale, bias, row0 + i, N, sum);
    }
#else
    if (tig == 0) {
        #pragma unroll
        for (int t = 0; t < MT; ++t) {
            store_row(y, scale, bias, row0 + 16 * t + gid, N, acc[t][0][0] + acc[t][1][0]);
            store_row(y, scale, bias, row0 + 16 * t + gid + 8, N, acc[t][0][2] + acc[t][1][2]);
        }
    }
#endif
}
"""


# ------------------------------------------------------------------------------------------------
# NVRTC and driver bindings (ctypes).

def _find_nvrtc():
    names = [f"libnvrtc.so.{torch.version.cuda.split('.')[0]}"] if torch.version.cuda else []
    names.append("libnvrtc.so")
    for base in sys.path:  # the nvidia-cuda-nvrtc wheel (what PyTorch's CUDA wheels install)
        for pattern in ("nvidia/cu*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            names.extend(sorted(p for p in glob.glob(os.path.join(base, pattern)) if "builtins" not in p
                                and ".alt." not in p))
    found = ctypes.util.find_library("nvrtc")
    if found:
        names.append(found)
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _libs():
    global _NVRTC, _CUDA
    if _NVRTC is None:
        _NVRTC = _find_nvrtc() or False
        if _NVRTC:
            _NVRTC.nvrtcGetErrorString.restype = ctypes.c_char_p
    if _CUDA is None:
        try:
            _CUDA = ctypes.CDLL("libcuda.so.1")
        except OSError:
            _CUDA = False
    return _NVRTC, _CUDA


def nvrtc_version() -> Optional[Tuple[int, int]]:
    nvrtc, _ = _libs()
    if not nvrtc:
        return None
    major, minor = ctypes.c_int(), ctypes.c_int()
    if nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) != 0:
        return None
    return major.value, minor.value


def _check_nvrtc(nvrtc, status: int, what: str):
    if status != 0:
        raise RuntimeError(f"NVRTC {what} failed: {nvrtc.nvrtcGetErrorString(status).decode()}")


def _check_cu(cuda, status: int, what: str):
    if status != 0:
        msg = ctypes.c_char_p()
        cuda.cuGetErrorString(status, ctypes.byref(msg))
        raise RuntimeError(f"CUDA driver {what} failed ({status}: {(msg.value or b'?').decode()})")


def compile_cubin(source: str, arch: str, defines: Dict[str, int]) -> bytes:
    """CUDA C source -> a cubin for `arch` (e.g. "sm_90"), with -D defines. Raises RuntimeError
    with NVRTC's log on a compile error."""
    nvrtc, _ = _libs()
    if not nvrtc:
        raise RuntimeError("NVRTC (libnvrtc) was not found: install nvidia-cuda-nvrtc")
    prog = ctypes.c_void_p()
    _check_nvrtc(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"chatglm_mma.cu",
                                                 0, None, None), "create")
    try:
        opts = [f"--gpu-architecture={arch}", "--std=c++17", "-default-device"]
        opts += [f"-D{k}={int(v)}" for k, v in sorted(defines.items())]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
        if status != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile the MMA GEMV ({arch}, {defines}):\n"
                               f"{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "get cubin size")
        buf = ctypes.create_string_buffer(size.value)
        _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBIN(prog, buf), "get cubin")
        return buf.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: id, padding to 8 bytes, a 64-byte union
    # (the union's first int is the flag used here; an integer field, so it is set in place: a
    # c_char array field would read back as a bytes copy)
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttr)), ("numAttrs", ctypes.c_uint)]


_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class _Kernel:
    """One compiled kernel, loaded into one device's primary context (PyTorch's context)."""

    def __init__(self, cubin: bytes, name: str, device: torch.device, pdl: bool):
        _, cuda = _libs()
        if not cuda:
            raise RuntimeError("the CUDA driver library (libcuda.so.1) was not found")
        self.cuda = cuda
        self.device = device
        self.pdl = pdl  # compiled with griddepcontrol: launched with programmatic serialization
        dev = ctypes.c_int()
        _check_cu(cuda, cuda.cuInit(0), "cuInit")
        _check_cu(cuda, cuda.cuDeviceGet(ctypes.byref(dev), device.index), "cuDeviceGet")
        self.ctx = ctypes.c_void_p()
        _check_cu(cuda, cuda.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev), "cuDevicePrimaryCtxRetain")
        self.module = ctypes.c_void_p()
        self.func = ctypes.c_void_p()
        with self._current():
            _check_cu(cuda, cuda.cuModuleLoadData(ctypes.byref(self.module), cubin), "cuModuleLoadData")
            _check_cu(cuda, cuda.cuModuleGetFunction(ctypes.byref(self.func), self.module, name.encode()),
                      "cuModuleGetFunction")
        self._smem_max = 48 << 10
        self._attr = _LaunchAttr()
        self._attr.id = _CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        self._attr.value = 1  # programmaticStreamSerializationAllowed

    @contextlib.contextmanager
    def _current(self):
        """Make this kernel's context current for the block (it already is on a thread where PyTorch
        has used the device)."""
        cur = ctypes.c_void_p()
        self.cuda.cuCtxGetCurrent(ctypes.byref(cur))
        pushed = cur.value != self.ctx.value
        if pushed:
            _check_cu(self.cuda, self.cuda.cuCtxPushCurrent(self.ctx), "cuCtxPushCurrent")
        try:
            yield
        finally:
            if pushed:
                self.cuda.cuCtxPopCurrent(ctypes.byref(ctypes.c_void_p()))

    def launch(self, grid: int, block: int, smem: int, args):
        """Launch on PyTorch's current stream of the device (captured when that stream captures)."""
        if smem > self._smem_max:
            _check_cu(self.cuda, self.cuda.cuFuncSetAttribute(
                self.func, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, ctypes.c_int(smem)), "cuFuncSetAttribute")
            self._smem_max = smem
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        cfg = _LaunchConfig(grid, 1, 1, block, 1, 1, smem,
                            ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream),
                            ctypes.pointer(self._attr) if self.pdl else None, 1 if self.pdl else 0)
        with self._current():
            _check_cu(self.cuda, self.cuda.cuLaunchKernelEx(ctypes.byref(cfg), self.func, params, None),
                      "cuLaunchKernelEx")


# ------------------------------------------------------------------------------------------------
# Host side.

def capability(device: torch.device) -> Tuple[int, int]:
    """(major, minor) compute capability of a CUDA device, cached per device index (also cuda_kernels')."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(idx)
    if cap is None:
        cap = _CAPABILITY[idx] = tuple(torch.cuda.get_device_capability(idx))
    return cap


def available(device: torch.device) -> bool:
    """This path can run on `device` (a CUDA device of capability 8.0+, NVRTC and the driver found)."""
    if not ENABLED or device.type != "cuda" or capability(device) < (8, 0):
        return False
    nvrtc, cuda = _libs()
    return bool(nvrtc) and bool(cuda)


def config_for(bits: int, N: int, K: int, cap: Tuple[int, int]) -> dict:
    cfg = _SHAPE_CFG.get((tuple(cap), bits, N, K))
    return dict(cfg if cfg is not None else _GENERIC[bits])


def supports(bits: int, N: int, K: int, dtype: torch.dtype) -> bool:
    """Shapes and dtypes this kernel handles: fp16 activations, K a multiple of one warp step."""
    kstep = 128 if bits == 4 else 64
    return dtype == torch.float16 and K % kstep == 0 and N >= 1 and K * 2 <= 96 << 10


def weight_ok(q: torch.Tensor) -> bool:
    """The weight's rows are contiguous and 16-byte aligned (each lane loads 16 bytes of a row)."""
    return q.stride(1) == 1 and q.stride(0) % 16 == 0 and q.data_ptr() % 16 == 0


def _kernel(device: torch.device, bits: int, cfg: dict, has_bias: bool, pdl: int) -> _Kernel:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = capability(torch.device("cuda", idx))
    defines = dict(BITS=bits, MT=cfg["MT"], WARPS=cfg["WARPS"], U=cfg["U"], HAS_BIAS=int(has_bias),
                   PDL=min(int(pdl), 2) if cap >= (9, 0) else 0)
    key = (tuple(sorted(defines.items())), idx)
    k = _KERNELS.get(key)
    if k is None:
        with _LOCK:
            k = _KERNELS.get(key)
            if k is None:
                arch = f"sm_{cap[0]}{cap[1]}"
                cubin = _cached_cubin(arch, defines)
                k = _Kernel(cubin, "mma_gemv", torch.device("cuda", idx), defines["PDL"] >= 2)
                _KERNELS[key] = k
    return k


def _cached_cubin(arch: str, defines: Dict[str, int]) -> bytes:
    """compile_cubin, with the result kept on disk keyed by source, options and NVRTC version."""
    tag = hashlib.sha256(repr((_SOURCE, arch, sorted(defines.items()), nvrtc_version())).encode()).hexdigest()[:24]
    root = cache_dir()  # where cpu_kernels keeps its compiled library ($CHATGLM_CACHE_DIR, ...)
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = str(root / f"mma_gemv-{tag}.cubin")
    except OSError:
        path = None
    if path and os.path.exists(path):
        with open(path, "rb") as fh:
            cubin = fh.read()
        try:
            os.utime(path)  # in use: its age counts from now (prune_stale keeps it)
        except OSError:
            pass
        return cubin
    cubin = compile_cubin(_SOURCE, arch, defines)
    if path:
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(cubin)
            os.replace(tmp, path)
        except OSError:
            return cubin
        prune_stale(Path(path), "mma_gemv-*.cubin")
    return cubin


def gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
         cfg: dict, pdl: int = 0) -> torch.Tensor:
    """y [1, N] fp16 = x [1, K] @ (q * scale)^T + bias for one fp16 activation row.
    The caller (cuda_kernels.linear) has checked devices, dtypes, `supports` and `weight_ok`. pdl as
    cuda_kernels.launch_options: 1 lets the next kernel launch early, 2 also launches this one so
    (it then waits for the previous kernel before reading x); ignored below sm_90."""
    N = q.shape[0]
    K = x.shape[-1]
    x = x.reshape(K)
    if x.stride(0) != 1 or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh allocation is 16-byte aligned
    if not weight_ok(q):
        raise ValueError("mma_gemv: weight rows must be contiguous and 16-byte aligned")
    y = torch.empty((1, N), dtype=torch.float16, device=x.device)
    kern = _kernel(x.device, bits, cfg, bias is not None, pdl)
    smem = (K + (K // 64) * 8) * 2  # x staged with XPAD's padding
    args = [ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(scale.data_ptr()),
            ctypes.c_void_p(bias.data_ptr() if bias is not None else scale.data_ptr()),
            ctypes.c_void_p(y.data_ptr()), ctypes.c_int(N), ctypes.c_int(K), ctypes.c_longlong(q.stride(0))]
    kern.launch(-(-N // (16 * cfg["MT"])), 32 * cfg["WARPS"], smem, args)
    return y
