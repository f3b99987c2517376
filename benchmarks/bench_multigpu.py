#!/usr/bin/env python3
"""Decode speed of ChatGLM-6B INT8 on one GPU vs the 28 blocks split over two GPUs (device_map).

Run on a machine with two NVIDIA GPUs, from the repository root:

    python3 benchmarks/bench_multigpu.py                        # 1 GPU vs device_map="auto" over 2
    python3 benchmarks/bench_multigpu.py --new-tokens 256 --batch 1 4 --md benchmarks/results/multigpu.md

The model is the full-size random INT8 checkpoint of tools/make_checkpoint.py (official layout,
6.7 GB), written once to checkpoints/random-int8-full (or --checkpoint) and reused. Each placement
is loaded with AutoModel.from_pretrained(..., device_map=...) and timed through `generate`
(greedy, ``min_new_tokens = max_new_tokens`` so every run makes the same number of tokens):

    prefill ms        = generate(max_new_tokens=1), median of --repeats runs
    decode ms/token   = (generate(N) - generate(1)) / (N - 1), medians
    tokens/s          = batch * 1000 / decode ms/token

Splitting a model over GPUs (pipeline placement, one request at a time) does not make a decode
step faster: the blocks still run one after another, plus a hidden-state copy between GPUs and
accelerate's per-module hooks. What it buys is memory (a model that does not fit one GPU, or room
for longer contexts / bigger batches); this prints what it costs per token. Greedy tokens of the
split run are checked against the one-GPU run.

--devices cpu,disk runs the same script on a CPU-only machine with the small "tiny" checkpoint
(the "second device" is then disk offload): a smoke test of the script, not a GPU number.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _package  # noqa: E402  (registers the repo root as package `chatglm6b`)

ROOT = _package.ROOT

import torch  # noqa: E402

NUM_LAYERS = 28
PROMPT = ("请根据以下材料写一段总结：人工智能模型在训练时需要大量的数据和计算资源，"
          "而推理时则更关心延迟与显存。Summarise the trade-offs between latency, memory and throughput "
          "when a language model is split across several GPUs.")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_device(text: str):
    return int(text) if text.isdigit() else text


def checkpoint(folder: Path, preset: str) -> Path:
    from chatglm6b.tools.make_checkpoint import copy_package_files, make_config, write_checkpoint

    done = folder / ".complete"
    if not done.exists():
        log(f"writing the {preset} random INT8 checkpoint to {folder} (once)")
        write_checkpoint(folder, make_config(preset, bits=8), int_mode="direct" if preset == "full" else "quantize",
                         fmt="bin", overwrite=True)
        done.write_text("ok\n")
    copy_package_files(folder)
    return folder


REFERENCE = "1 device, eager"


def placements(dev0, dev1, split_at: int):
    """name -> (device_map, eager). 'auto' only makes sense with two GPUs.

    A split model always runs the eager path (hooks between modules); one GPU by default takes the
    CUDA-graph decode of fast_decode.py where that is present, so both one-GPU numbers are shown.
    """
    maps = {REFERENCE: ({"": dev0}, True)}
    if isinstance(dev0, int):
        maps["1 device, default path"] = ({"": dev0}, False)
    half = {"transformer.word_embeddings": dev0,
            **{f"transformer.layers.{i}": dev0 if i < split_at else dev1 for i in range(NUM_LAYERS)},
            "transformer.final_layernorm": dev1, "lm_head": dev0}
    maps[f"2 devices, blocks 0-{split_at - 1} / {split_at}-{NUM_LAYERS - 1}"] = (half, True)
    if isinstance(dev0, int) and isinstance(dev1, int):
        maps["2 devices, device_map='auto'"] = ("auto", True)
    return maps


def sync(model):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_generate(model, inputs, n: int) -> tuple:
    sync(model)
    t0 = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    sync(model)
    return (time.perf_counter() - t0) * 1000.0, out


def bench_one(folder: Path, name: str, dmap, eager: bool, tokenizer, batch: int, new_tokens: int, repeats: int,
              offload: str):
    from transformers import AutoModel

    from chatglm6b.dispatch import placement

    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(d)
    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, device_map=dmap,
                                      offload_folder=offload).eval()
    load_s = time.perf_counter() - t0
    if eager:
        model.config.use_cuda_graph = False  # fast_decode.py's switch (ignored where it is absent)
    placed = getattr(model, "hf_device_map", {"": dmap.get("") if isinstance(dmap, dict) else dmap})
    inputs = tokenizer([PROMPT] * batch, return_tensors="pt").to(model.device)
    timed_generate(model, inputs, 4)  # warm-up: kernels compiled, allocator primed
    prefill, full, tokens = [], [], None
    for _ in range(repeats):
        prefill.append(timed_generate(model, inputs, 1)[0])
        ms, out = timed_generate(model, inputs, new_tokens)
        full.append(ms)
        tokens = out[:, inputs["input_ids"].shape[1]:].tolist() if tokens is None else tokens
    p, f = statistics.median(prefill), statistics.median(full)
    decode = (f - p) / (new_tokens - 1)
    mem = {}
    if torch.cuda.is_available():
        mem = {f"cuda:{d}": round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in range(torch.cuda.device_count())
               if torch.cuda.max_memory_allocated(d)}
    blocks = {}
    for i in range(NUM_LAYERS):
        blocks.setdefault(str(placement(f"transformer.layers.{i}", placed)), []).append(i)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"placement": name, "batch": batch, "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "new_tokens": new_tokens, "load_s": round(load_s, 1), "prefill_ms": round(p, 2),
            "decode_ms_per_token": round(decode, 3), "tokens_per_s": round(batch * 1000.0 / decode, 1),
            "peak_gib": mem, "blocks": {k: f"{v[0]}-{v[-1]}" if len(v) > 1 else str(v[0]) for k, v in blocks.items()},
            "tokens": tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="folder of the random INT8 checkpoint (default checkpoints/random-int8-<preset>)")
    ap.add_argument("--devices", default="0,1", help="the two devices (default 0,1; cpu,disk = CPU smoke run)")
    ap.add_argument("--split-at", type=int, default=14, help="first block on the second device (explicit map)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--md", type=Path, default=None, help="also write a markdown table here")
    args = ap.parse_args(argv)
    dev0, dev1 = (parse_device(d.strip()) for d in args.devices.split(","))
    gpus = isinstance(dev0, int)
    if gpus and (not torch.cuda.is_available() or torch.cuda.device_count() <= max(dev0, dev1)):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"error: --devices {args.devices} needs GPUs {dev0} and {dev1}, {n} visible "
              "(use --devices cpu,disk for a CPU smoke run)", file=sys.stderr)
        return 2
    if args.new_tokens < 2:
        print("error: --new-tokens must be at least 2", file=sys.stderr)
        return 2
    preset = "full" if gpus else "tiny"
    folder = checkpoint(args.checkpoint or ROOT / "checkpoints" / f"random-int8-{preset}", preset)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="chatglm-offload-") as offload:
        for batch in args.batch:
            for name, (dmap, eager) in placements(dev0, dev1, args.split_at).items():
                log(f"{name}, batch {batch} ...")
                rows.append(bench_one(folder, name, dmap, eager, tokenizer, batch, args.new_tokens, args.repeats,
                                      offload))
    reference = {r["batch"]: r["tokens"] for r in rows if r["placement"] == REFERENCE}
    for r in rows:
        r["tokens_equal_1_device"] = r.pop("tokens") == reference[r["batch"]]
        if r["placement"] == "1 device, default path" and not r["tokens_equal_1_device"]:
            r["tokens_equal_1_device"] = None  # CUDA-graph decode may differ at near ties: not a failure

    env = {"torch": torch.__version__, "python": platform.python_version(),
           "gpus": [torch.cuda.get_device_name(d) for d in range(torch.cuda.device_count())] if gpus else [],
           "transformers": __import__("transformers").__version__,
           "accelerate": __import__("accelerate").__version__}
    head = ("| placement | batch | prompt | prefill ms | decode ms/token | tokens/s | peak GiB | blocks | "
            "tokens = 1 device eager |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        blocks = ", ".join(f"{d}: {span}" for d, span in r["blocks"].items())
        mem = ", ".join(f"{d} {g}" for d, g in r["peak_gib"].items()) or "-"
        lines.append(f"| {r['placement']} | {r['batch']} | {r['prompt_tokens']} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | {mem} | {blocks} | "
                     f"{ {True: 'yes', False: 'NO', None: 'differs (near tie?)'}[r['tokens_equal_1_device']] } |")
    table = "\n".join(lines)
    print(f"ChatGLM-6B INT8 (random weights, {preset} size), {args.new_tokens} new tokens, "
          f"median of {args.repeats}; {json.dumps(env)}")
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    if args.md:
        args.md.write_text(f"# Multi-GPU decode (benchmarks/bench_multigpu.py)\n\n{json.dumps(env)}\n\n"
                           f"{args.new_tokens} new tokens, median of {args.repeats}.\n\n{table}\n")
    return 0 if all(r["tokens_equal_1_device"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
