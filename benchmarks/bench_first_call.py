"""First-call latency on a GPU: what the first `generate` / `chat` of a process costs on top of a warm one.

The first call JIT-compiles the Triton kernels it uses (cached on disk by Triton, `TRITON_CACHE_DIR`,
default ~/.triton/cache) and captures the CUDA-graph decode step; later calls of the same shape replay.
Each case runs in a fresh process (full-size INT8 model, random weights made on the GPU; building it is
not timed), eos off:

    cold   empty Triton and package caches (a new machine / a new Triton version)
    warm   the caches the cold process left (every later process on that machine)
    cold_compile_ahead_N   empty caches, CHATGLM_COMPILE_AHEAD=N (the kernels of the decode step and
           of the first prefill compiled on N threads before they run; opt-in until this measures it)

and within each process, each first and second time: a 28-token prompt + 16 new tokens (greedy), a
300-token prompt (other prefill kernels, another graph bucket), and the 28-token prompt sampled with
`chat`'s settings (temperature 0.95, top-p 0.7, its logits processor: the sampling kernels). One-time
cost = first - second. Also counts the kernels Triton compiled into the cache.

    python3 benchmarks/bench_first_call.py --json $OUT/first_call.json
    python3 benchmarks/bench_first_call.py --no-compile-ahead --profile $OUT/prof   # where a warm first call goes
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _package  # noqa: E402  (repo root as package chatglm6b; the child-process helper)

HERE = Path(__file__).resolve().parent


def child():
    import torch

    sys.path.insert(0, str(HERE))
    import bench_gpu as bg  # (registers the package, builds models)

    os.environ.setdefault("CHATGLM_CUDA_STRICT", "1")
    model = bg.build(8)
    out = {}
    profile_to = os.environ.get("CHATGLM_BENCH_PROFILE")
    chat_like = dict(do_sample=True, temperature=0.95, top_p=0.7, logits_processor=[bg.mc.InvalidScoreLogitsProcessor()])
    for name, length, kw in (("short", 28, dict(do_sample=False)), ("long", 300, dict(do_sample=False)),
                             ("chat_sampling", 28, chat_like)):
        ids = bg.prompt(1, length)
        for attempt in ("first", "second"):
            prof = None
            if profile_to and attempt == "first":
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=16, eos_token_id=None, **kw)
            torch.cuda.synchronize()
            out[f"{name}_{attempt}_s"] = round(time.perf_counter() - t0, 3)
            if prof is not None:
                prof.disable()
                _write_profile(prof, Path(f"{profile_to}.{name}.txt"))
        out[f"{name}_one_time_s"] = round(out[f"{name}_first_s"] - out[f"{name}_second_s"], 3)
        out[f"{name}_path"] = bg.fd.last_decision(model)["path"]
    print("RESULT " + json.dumps(out), flush=True)


def _write_profile(prof, path: Path) -> None:
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(30)
    path.write_text(buf.getvalue())


def run_case(triton_dir: Path, pkg_dir: Path, ahead: int = 0, profile_to: str = "") -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=str(triton_dir), CHATGLM_CACHE_DIR=str(pkg_dir),
               CHATGLM_COMPILE_AHEAD=str(ahead))
    if profile_to:
        env["CHATGLM_BENCH_PROFILE"] = profile_to
    res = _package.run_child([__file__, "--child"], env=env)
    res["cubins_in_cache"] = len(list(triton_dir.rglob("*.cubin")))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--profile", metavar="PREFIX",
                    help="also run a warm process with cProfile around each first call; the statistics go to "
                         "PREFIX.short.txt, PREFIX.long.txt, PREFIX.chat_sampling.txt")
    ap.add_argument("--no-compile-ahead", action="store_true", help="skip the compile-ahead case")
    ap.add_argument("--warm", type=int, default=1, metavar="N", help="warm processes to run (default 1)")
    args = ap.parse_args()
    if args.child:
        return child()
    import torch
    import triton

    if not torch.cuda.is_available():
        sys.exit("bench_first_call.py needs an NVIDIA GPU")
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   cpus=os.cpu_count())
    ahead = min(16, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        tdir, pdir = Path(tmp, "triton"), Path(tmp, "pkg")
        for case in ["cold"] + ["warm" if i == 0 else f"warm_{i + 1}" for i in range(args.warm)]:
            results[case] = run_case(tdir, pdir)
            print(json.dumps({case: results[case]}), flush=True)
        if args.profile:  # warm again, under cProfile (slower: the figures of this case are not comparable)
            results["warm_profiled"] = run_case(tdir, pdir, profile_to=args.profile)
            print(json.dumps({"warm_profiled": results["warm_profiled"]}), flush=True)
        if not args.no_compile_ahead:
            # cold again, compiling ahead on a thread pool (cuda_kernels.compile_ahead, opt-in)
            results[f"cold_compile_ahead_{ahead}"] = run_case(Path(tmp, "triton2"), Path(tmp, "pkg2"), ahead)
            print(json.dumps({f"cold_compile_ahead_{ahead}": results[f"cold_compile_ahead_{ahead}"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
