"""Run the CPU kernels on another architecture (aarch64 by default) under user-mode emulation and
check their results against a float64 reference computed here.

The package compiles its C kernels on the user's machine; on ARM only the portable C version is built
(the x86 paths are compiled out). This builds that same source (cpu_kernels._C_SOURCE, the package's
flags, OpenMP) with a cross compiler into a small driver program, runs it with qemu-user on INT8, INT4
and FP16 weights — the GEMV (few rows) and GEMM (many rows) paths, odd sizes, with and without bias,
fp16 / bf16 / fp32 parameters, 1 and 2 threads — and compares y with x @ dequantize(W)^T + b in float64.
It checks values, not speed (emulated).

Needs (Debian): qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross libgomp1-arm64-cross.

    python3 tools/check_cross_arch.py                 # aarch64 via qemu
    python3 tools/check_cross_arch.py --native        # the same driver built for this machine
    python3 tools/check_cross_arch.py --native --isa 0   # ... on its portable C path
"""
import argparse
import importlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if "chatglm6b" not in sys.modules:
    _pkg = types.ModuleType("chatglm6b")
    _pkg.__path__ = [str(ROOT)]
    sys.modules["chatglm6b"] = _pkg
ck = importlib.import_module("chatglm6b.cpu_kernels")
qz = importlib.import_module("chatglm6b.quantization")

ARCHS = {"aarch64": dict(cc="aarch64-linux-gnu-gcc", run=["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"])}
W_INT8, W_INT4, W_FP16 = 0, 1, 2
P_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

DRIVER = r"""
#include <stdio.h>
#include "kernels.c"
/* case file: int64 M K N wkind nthreads scale_dtype bias_dtype (-1: no bias), then x (fp32 M*K),
   w (bytes), scale (N params), bias (N params); writes y (fp32 M*N) and the ISA code. */
static void *slurp(FILE *f, size_t n) { void *p = malloc(n ? n : 1); if (n && fread(p, 1, n, f) != n) exit(3); return p; }
static size_t psize(int64_t d) { return d == 0 ? 4 : 2; }
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    if (getenv("CG_ISA")) cg_set_isa(atoi(getenv("CG_ISA")));  /* e.g. 0: the portable path on x86 */
    FILE *f = fopen(argv[1], "rb"); if (!f) return 4;
    int64_t h[8]; if (fread(h, 8, 8, f) != 8) return 3;
    int64_t M = h[0], K = h[1], N = h[2], wk = h[3], nt = h[4], sd = h[5], bd = h[6];
    size_t wbytes = (size_t)N * (wk == 1 ? K / 2 : wk == 2 ? 2 * K : K);
    float *x = slurp(f, (size_t)M * K * 4);
    void *w = slurp(f, wbytes);
    void *s = wk == 2 ? NULL : slurp(f, (size_t)N * psize(sd));
    void *b = bd < 0 ? NULL : slurp(f, (size_t)N * psize(bd));
    fclose(f);
    float *y = calloc((size_t)M * N, 4);
    int64_t ldw = wk == 1 ? K / 2 : wk == 2 ? 2 * K : K;  /* bytes per weight row */
    int rc = cg_linear(x, M, K, K, w, (int)wk, N, ldw, s, (int)sd, b, (int)(bd < 0 ? 0 : bd), y, N, (int)nt);
    FILE *o = fopen(argv[2], "wb"); if (!o) return 4;
    int64_t meta[2] = {rc, cg_isa()};
    fwrite(meta, 8, 2, o); fwrite(y, 4, (size_t)M * N, o); fclose(o);
    return 0;
}
"""


def build(workdir: Path, cc: str) -> Path:
    (workdir / "kernels.c").write_text(ck._C_SOURCE)
    (workdir / "driver.c").write_text(DRIVER)
    exe = workdir / "driver"
    flags = [f for f in ck._BASE_FLAGS if f not in ("-shared", "-fPIC", "-fvisibility=hidden")] + ["-fopenmp"]
    res = subprocess.run([cc, *flags, "-o", str(exe), str(workdir / "driver.c"), "-lm"], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{cc} failed:\n{res.stderr[-3000:]}")
    return exe


def make_case(wkind, M, K, N, sdt, bdt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2
    x[0, 0] = 40.0  # an outlier activation, like ChatGLM's
    if wkind == W_FP16:
        w = (torch.randn(N, K, generator=g) * 0.05).half()
        raw, scale, dense = w.view(torch.uint8).reshape(-1), None, w.double()
    else:
        bits = 8 if wkind == W_INT8 else 4
        w = torch.randn(N, K, generator=g) * 0.05
        q, scale = qz.quantize_weight(w.to(torch.float16 if sdt != torch.bfloat16 else torch.bfloat16), bits)
        scale = scale.to(sdt)
        qi = q.to(torch.int8) if bits == 8 else qz.unpack_int4(q)
        dense = qi.double() * scale.double()[:, None]
        raw = q.contiguous().view(torch.uint8).reshape(-1)
    bias = None if bdt is None else (torch.randn(N, generator=g) * 0.1).to(bdt)
    ref = x.double() @ dense.T + (0 if bias is None else bias.double())
    return x, raw, scale, bias, ref


def to_bytes(t):
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.contiguous().view(torch.int16).numpy().tobytes()
    return t.contiguous().numpy().tobytes()


def run_case(exe, runner, workdir, wkind, M, K, N, threads, sdt, bdt, seed, env=None):
    x, raw, scale, bias, ref = make_case(wkind, M, K, N, sdt, bdt, seed)
    head = struct.pack("<8q", M, K, N, wkind, threads, P_CODES[sdt] if scale is not None else 0,
                       P_CODES[bdt] if bias is not None else -1, 0)
    body = x.float().numpy().tobytes() + raw.numpy().tobytes()
    if scale is not None:
        body += to_bytes(scale)
    if bias is not None:
        body += to_bytes(bias)
    case, out = workdir / "case.bin", workdir / "out.bin"
    case.write_bytes(head + body)
    res = subprocess.run(runner + [str(exe), str(case), str(out)], capture_output=True, text=True, timeout=600, env=env)
    if res.returncode:
        raise RuntimeError(f"driver exited with {res.returncode}: {res.stderr[-2000:]}")
    data = out.read_bytes()
    rc, isa = struct.unpack("<2q", data[:16])
    y = torch.frombuffer(bytearray(data[16:]), dtype=torch.float32).reshape(M, N).double()
    err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return rc, isa, err


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="aarch64", choices=sorted(ARCHS))
    ap.add_argument("--native", action="store_true", help="build for this machine and run directly instead")
    ap.add_argument("--tol", type=float, default=2e-6, help="largest error / largest |y| allowed")
    ap.add_argument("--isa", type=int, default=None, help="force this ISA level (0 generic, 1 AVX2, 2 AVX-512, 3 AMX)")
    args = ap.parse_args()
    if args.native:
        cc, runner, label = shutil.which("cc") or "gcc", [], "native"
    else:
        spec = ARCHS[args.arch]
        missing = [t for t in (spec["cc"], spec["run"][0]) if shutil.which(t) is None]
        if missing:
            sys.exit(f"not found: {', '.join(missing)} (Debian: apt-get install qemu-user gcc-aarch64-linux-gnu "
                     f"libc6-dev-arm64-cross libgomp1-arm64-cross)")
        cc, runner, label = spec["cc"], spec["run"], args.arch
    env = dict(os.environ, **({"CG_ISA": str(args.isa)} if args.isa is not None else {}))
    failures, rows = 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        exe = build(workdir, cc)
        seed = 0
        for wkind, name in ((W_INT8, "int8"), (W_INT4, "int4"), (W_FP16, "fp16")):
            for M in (1, 3, 40):  # GEMV rows, a few rows, the GEMM path
                for (K, N) in ((96, 37), (1030, 19)):
                    for sdt, bdt, threads in ((torch.float16, torch.float16, 1), (torch.float16, None, 2),
                                              (torch.bfloat16, torch.float32, 2)):
                        seed += 1
                        rc, isa, err = run_case(exe, runner, workdir, wkind, M, K, N, threads, sdt, bdt, seed, env)
                        ok = rc == 0 and err <= args.tol
                        failures += not ok
                        rows += 1
                        print(f"{label} {name} M={M} K={K} N={N} scale={str(sdt)[6:]} bias={str(bdt)[6:]} "
                              f"threads={threads}: rc={rc} isa={ck._ISA_NAMES.get(isa, isa)} rel.err={err:.2e} "
                              f"{'ok' if ok else 'FAIL'}", flush=True)
    print(f"{label}: {rows - failures} of {rows} cases within {args.tol:g} of the float64 reference")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
