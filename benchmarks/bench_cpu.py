"""Full-size ChatGLM-6B-INT8 (or INT4: --bits 4) on the CPU: our compiled kernels vs. the torch-dequant path vs. chatglm.cpp.

Every contender runs in its own fresh process on the same random full-size checkpoint in the
official layout (tools/make_checkpoint.py) and the same prompt ids, and reports: load time, peak
RSS, prefill of 20 and 200 tokens, decode ms/token. The machine's read bandwidth is measured in
the same run and gives the floor (bytes streamed per token / bandwidth).

    python benchmarks/bench_cpu.py                      # ours + torch path (+ chatglm.cpp if importable)
    python benchmarks/bench_cpu.py --cpp-python /path/to/venv/bin/python   # chatglm.cpp from another venv

chatglm.cpp: `pip install chatglm-cpp==0.4.2` builds it from source; with CMake >= 4 set
CMAKE_POLICY_VERSION_MINIMUM=3.5, and on an AVX-512 machine pass
CMAKE_ARGS="-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON" (its ggml defaults to AVX2 only: 611 vs 470
ms/token here). Its q8_0 file is converted from the same checkpoint with its own converter, which
loads the checkpoint through *our* remote code.
Each contender's weight file is read once before it is timed, so "load" is from the page cache.
"first forward" is the 8-token warm-up right after loading: a loader that only maps the file pays
for reading it there, so load + first forward is the honest time to the first token.
Run with nothing else on the machine: two cores are easily disturbed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT_LENGTHS = (20, 200)


def prompt_ids(n: int):
    """Deterministic ids of ordinary vocabulary pieces, ending in [gMASK] <sop> like a real prompt."""
    import random

    rng = random.Random(n)
    return [rng.randrange(20000, 120000) for _ in range(n - 2)] + [130001, 130004]


def median_step_ms(steps) -> tuple:
    """Median ms between consecutive items of a token iterator (the first item, which includes the
    prefill, is not counted) and the number of steps timed."""
    times, t_prev = [], time.perf_counter()
    for step, _ in enumerate(steps):
        now = time.perf_counter()
        if step > 0:
            times.append(now - t_prev)
        t_prev = now
    return 1000 * statistics.median(times), len(times)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


# ----------------------------------------------------------------------------------------- children
def child_ours(ckpt: str, decode_tokens: int) -> dict:
    import torch
    from transformers import AutoModel

    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(ckpt, trust_remote_code=True)
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_gb()
    res = {"load_s": load_s, "rss_after_load_gb": rss_after_load, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        # one short warm-up (first touch of weights that are only mapped, kernel library load)
        t0 = time.perf_counter()
        model(input_ids=torch.tensor([prompt_ids(8)]))
        res["first_forward_s"] = time.perf_counter() - t0
        for n in PROMPT_LENGTHS:
            ids = torch.tensor([prompt_ids(n)])
            t0 = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)  # (its KV cache is dropped right away)
            res[f"prefill{n}_s"] = time.perf_counter() - t0
        ids = torch.tensor([prompt_ids(20)])
        gen = model.stream_generate(ids, max_new_tokens=decode_tokens + 1, do_sample=False)
        res["decode_ms"], res["decode_tokens"] = median_step_ms(gen)
        # the default load leaves the weights mapped and moves them to 2 MB pages while idle
        wait = getattr(model, "wait_for_large_pages", None)
        if wait is not None:
            t0 = time.perf_counter()
            status = wait()
            res["idle_move_s"] = time.perf_counter() - t0
            if status["total"]:
                gen = model.stream_generate(ids, max_new_tokens=decode_tokens + 1, do_sample=False)
                res["decode_after_move_ms"] = median_step_ms(gen)[0]
    res["peak_rss_gb"] = peak_rss_gb()
    return res


def child_cpp(model_path: str, decode_tokens: int) -> dict:
    import chatglm_cpp

    t0 = time.perf_counter()
    pipe = chatglm_cpp.Pipeline(model_path)
    res = {"load_s": time.perf_counter() - t0, "rss_after_load_gb": peak_rss_gb()}
    cfg = chatglm_cpp._C.GenerationConfig(max_length=4096, max_new_tokens=1, max_context_length=4096,
                                          do_sample=False)
    t0 = time.perf_counter()
    list(pipe._stream_generate_ids(prompt_ids(8), None, cfg))  # warm-up
    res["first_forward_s"] = time.perf_counter() - t0
    for n in PROMPT_LENGTHS:
        t0 = time.perf_counter()
        list(pipe._stream_generate_ids(prompt_ids(n), None, cfg))  # prefill + the first token
        res[f"prefill{n}_s"] = time.perf_counter() - t0
    cfg = chatglm_cpp._C.GenerationConfig(max_length=4096, max_new_tokens=decode_tokens + 1,
                                          max_context_length=4096, do_sample=False)
    res["decode_ms"], res["decode_tokens"] = median_step_ms(pipe._stream_generate_ids(prompt_ids(20), None, cfg))
    res["peak_rss_gb"] = peak_rss_gb()
    return res


def child_bandwidth() -> dict:
    import torch

    import _package  # noqa: F401  (registers the repo root as package `chatglm6b`)
    from chatglm6b import cpu_kernels

    res = {}
    for name, place in (("read_gb_s", cpu_kernels.to_large_pages), ("read_small_pages_gb_s", lambda t: t)):
        buf = place(torch.ones(1 << 30, dtype=torch.uint8))  # 1 GiB, far beyond the caches
        cpu_kernels._read_bytes(buf)
        best = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            cpu_kernels._read_bytes(buf)
            best = max(best, buf.numel() / (time.perf_counter() - t0) / 1e9)
        res[name] = best
        del buf
    return res


# ----------------------------------------------------------------------------------------- parent
def read_once(path: Path) -> None:
    """Bring a weight file into the page cache (the load times are then from memory, not disk)."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def run_child(python: str, mode: str, args, env_extra=None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    cmd = [python, str(Path(__file__).resolve()), "--child", mode, "--ckpt", str(args.ckpt),
           "--decode-tokens", str(args.decode_tokens if mode != "torch" else args.torch_decode_tokens),
           "--cpp-model", str(args.cpp_model)]
    if mode in ("ours", "ours-sync", "torch", "cpp"):
        read_once(args.cpp_model if mode == "cpp" else args.ckpt / "pytorch_model.bin")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_checkpoint(ckpt: Path, bits: int = 8):
    if (ckpt / "pytorch_model.bin").exists():
        import shutil  # refresh the code next to the weights: measure this checkout, not an old copy
        for f in ROOT.glob("*.py"):
            if f.name != "cli_demo.py":
                shutil.copy(f, ckpt / f.name)
        for name in ("ice_text.model", "tokenizer_config.json"):
            shutil.copy(ROOT / name, ckpt / name)
        return
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), "--preset", "full", "--bits", str(bits),
                    "--format", "bin", "--copy-code", str(ckpt)], check=True)


def ensure_cpp_model(python: str, ckpt: Path, out: Path):
    if out.exists():
        return
    subprocess.run([python, "-m", "chatglm_cpp.convert", "-i", str(ckpt), "-t", "q8_0", "-o", str(out)],
                   check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, choices=(8, 4), default=8,
                    help="weights of the checkpoint made when --ckpt holds none (default folder: random-int<bits>-full)")
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--cpp-model", type=Path, default=ROOT / "checkpoints" / "random-int8-full-q8_0.ggml")
    ap.add_argument("--cpp-python", default=None, help="python that has chatglm_cpp (default: this one, if it does)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--torch-decode-tokens", type=int, default=4)
    ap.add_argument("--skip", nargs="*", default=[], choices=["ours", "ours-sync", "torch", "cpp"])
    ap.add_argument("--md", type=Path, default=None, help="write the results table here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ckpt is None:
        args.ckpt = ROOT / "checkpoints" / f"random-int{args.bits}-full"

    if args.child:
        fn = {"ours": lambda: child_ours(str(args.ckpt), args.decode_tokens),
              "ours-sync": lambda: child_ours(str(args.ckpt), args.decode_tokens),
              "torch": lambda: child_ours(str(args.ckpt), args.decode_tokens),
              "cpp": lambda: child_cpp(str(args.cpp_model), args.decode_tokens),
              "bw": child_bandwidth}[args.child]
        print(json.dumps(fn()))
        return

    ensure_checkpoint(args.ckpt, args.bits)
    load_before = os.getloadavg()[0]
    file_gb = (args.ckpt / "pytorch_model.bin").stat().st_size / 1e9
    rows = {}
    bw_all = run_child(sys.executable, "bw", args)
    bw = bw_all["read_gb_s"]
    if "ours" not in args.skip:
        rows["ours (compiled kernels)"] = run_child(sys.executable, "ours", args)
    if "ours-sync" not in args.skip:  # weights copied to 2 MB pages while loading
        rows["ours, CHATGLM_LARGE_PAGES=sync"] = run_child(sys.executable, "ours-sync", args,
                                                           {"CHATGLM_LARGE_PAGES": "sync"})
    if "torch" not in args.skip:
        rows["torch dequant path"] = run_child(sys.executable, "torch", args, {"CHATGLM_KERNELS": "torch"})
    if "cpp" not in args.skip:
        cpp_python = args.cpp_python or sys.executable
        try:
            ensure_cpp_model(cpp_python, args.ckpt, args.cpp_model)
            rows["chatglm.cpp 0.4.2 q8_0"] = run_child(cpp_python, "cpp", args)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"chatglm.cpp not measured: {e}", file=sys.stderr)

    floor_ms = 1000 * file_gb / bw
    lines = [f"Machine: {os.cpu_count()} cores; read bandwidth {bw:.1f} GB/s from 2 MB pages "
             f"({bw_all['read_small_pages_gb_s']:.1f} GB/s from 4 KB pages); weights streamed per token "
             f"≈ {file_gb:.2f} GB → floor ≈ {floor_ms:.0f} ms/token. Load average before / after: "
             f"{load_before:.2f} / {os.getloadavg()[0]:.2f}.", "",
             "| contender | load s | first forward s | RSS after load GB | peak RSS GB | prefill 20 s | "
             "prefill 200 s | decode ms/token | vs floor | idle move s | decode after move ms/token |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        after = r.get("decode_after_move_ms")
        moved = f"{r['idle_move_s']:.1f} | {after:.0f}" if after else " | "
        lines.append(f"| {name} | {r['load_s']:.1f} | {r['first_forward_s']:.2f} | {r['rss_after_load_gb']:.2f} | "
                     f"{r['peak_rss_gb']:.2f} | {r['prefill20_s']:.2f} | {r['prefill200_s']:.2f} | "
                     f"{r['decode_ms']:.0f} | {r['decode_ms'] / floor_ms:.2f}× | {moved} |")
    ours = rows.get("ours (compiled kernels)")
    if ours:
        for name, r in rows.items():
            if r is not ours:
                lines.append(f"\nours vs {name}: decode {r['decode_ms'] / ours['decode_ms']:.2f}× faster, prefill 200 "
                             f"{r['prefill200_s'] / ours['prefill200_s']:.2f}× faster")
    text = "\n".join(lines)
    print(text)
    print(json.dumps(rows, indent=1))
    if args.md:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
