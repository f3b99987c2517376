"""Whole-model GPU benchmark: decode ms/token, 1024-token prefill, batch-16 tokens/s, peak memory.

Full-size ChatGLM-6B with random weights drawn on the GPU (tools/make_checkpoint.random_state_dict;
no files): INT8, INT4 and FP16, each through

* ``graph``  — the default path: SDPA prefill + CUDA-graph decode loop (fast_decode.py) with the
  Triton linear kernels (cuda_kernels.py);
* ``eager``  — the model's eager Hugging Face path with the same kernels, no graph;
* ``torch``  — the eager path with the dequantize-in-torch linears (``QuantizedLinear.use_kernels =
  False``), the naive baseline (quantized models only).

Also measures the card's device-to-device copy and read-only bandwidth, the weight-streaming floor
per token, and the peak memory of an INT8 generation filling a 2048-token context.

    python3 benchmarks/bench_gpu.py --json out.json --md gpu_table.md
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn import functional as F

import _package  # noqa: E402,F401  (registers the repo root as package `chatglm6b`)
mc = importlib.import_module("chatglm6b.modeling_chatglm")
fd = importlib.import_module("chatglm6b.fast_decode")
ck = importlib.import_module("chatglm6b.cuda_kernels")
mm = importlib.import_module("chatglm6b.cuda_mma")
quant = importlib.import_module("chatglm6b.quantization")
mk = importlib.import_module("chatglm6b.tools.make_checkpoint")
GiB = 1024 ** 3
LOG = []


def log(**kw):
    LOG.append(kw)
    print(json.dumps(kw), flush=True)


def sync():
    torch.cuda.synchronize()


def time_gpu(fn, reps=5, warmup=1):
    """Median seconds of fn() between CUDA events (fn may launch many kernels)."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def bandwidth():
    n = GiB // 4
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    t_copy = time_gpu(lambda: y.copy_(x), reps=10)
    t_read = time_gpu(lambda: x.sum(), reps=10)
    del x, y
    torch.cuda.empty_cache()
    return 2 * GiB / t_copy / 1e9, GiB / t_read / 1e9


def build(bits: int):
    """Full-size model with random weights made on the GPU."""
    cfg = mk.make_config("full", bits=bits)
    t0 = time.time()
    sd = mk.random_state_dict(cfg, bits, device="cuda", int_mode="direct" if bits != 16 else "auto")
    config = mc.ChatGLMConfig(**cfg)
    model = mc.ChatGLMForConditionalGeneration(config, empty_init=True, device="meta")
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    del sd
    head_dim = config.hidden_size // config.num_attention_heads
    model.transformer._rotary_inv_freq = mc.rotary_inv_freq(head_dim // 2).cuda()
    model.tie_weights()
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if meta or unexpected:
        raise RuntimeError(f"model not fully built: meta {meta[:4]}, unexpected {unexpected[:4]}")
    sync()
    log(event="built", bits=bits, seconds=round(time.time() - t0, 2),
        weights_gib=round(torch.cuda.memory_allocated() / GiB, 3))
    return model.eval()


def release(model):
    fd.release(model)
    gc.collect()
    torch.cuda.empty_cache()


def prompt(batch: int, length: int, seed: int = 0):
    """Random prompt rows ending in [gMASK] <sop>, as the tokenizer makes them."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(5, 130000, (batch, length - 2), generator=g, device="cuda")
    tail = torch.tensor([130001, 130004], device="cuda").expand(batch, 2)
    return torch.cat([ids, tail], dim=1)


def use_kernels(model, on: bool):
    for m in model.modules():
        if type(m).__name__ == "QuantizedLinear":  # (transformers 5 models have a use_kernels property)
            m.use_kernels = on


class Path_:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        self.model.config.use_cuda_graph = self.name == "graph"
        use_kernels(self.model, self.name != "torch")
        return self

    def __exit__(self, *exc):
        self.model.config.use_cuda_graph = True
        use_kernels(self.model, True)


def graph_decode(model, batch, prompt_len=32, steps=128):
    """Seconds per decode step (graph replays, greedy, eos off) at contexts prompt_len..+steps."""
    ids = prompt(batch, prompt_len)
    st = fd._state(model)
    plan = fd._Plan(prompt_len + steps + 8, [], 3, False, 1.0, 0, 1.0, [])
    mask = torch.ones_like(ids)
    pos = mc.build_position_ids(ids, 130004, 130000, 130001, mask)
    with torch.inference_mode():
        times = []
        for rep in range(3):
            run = fd._Run(model, st, plan, ids, pos, mask, fd._left_pad(mask))
            times.append(_seconds_per_step(run, steps))
    return statistics.median(times), run


def _seconds_per_step(run, steps: int) -> float:
    """CUDA-event seconds per decode step over ``steps`` graph replays, after one untimed replay
    (the first after the prefill)."""
    run.step()

    def replays():
        for _ in range(steps):
            run.step()
    return time_gpu(replays, reps=1, warmup=0) / steps


def graph_sampling_decode(model, prompt_len=32, steps=128, keep=False):
    """Per step with the chat defaults (temperature 0.95, top-k 50, top-p 0.7) sampled in the graph
    (keep: also the run)."""
    ids = prompt(1, prompt_len)
    st = fd._state(model)
    plan = fd._Plan(prompt_len + steps + 8, [], 3, True, 0.95, 50, 0.7, [mc.InvalidScoreLogitsProcessor()])
    mask = torch.ones_like(ids)
    pos = mc.build_position_ids(ids, 130004, 130000, 130001, mask)
    with torch.inference_mode():
        run = fd._Run(model, st, plan, ids, pos, mask, fd._left_pad(mask))
        t = _seconds_per_step(run, steps)
    return (t, run) if keep else t


def sampling_profile(bits: int, rounds=2):
    """Greedy against sampled (chat defaults) batch-1 decode steps, alternating, and the critical-path
    timeline of each with the head / sampling kernels by name: where sampling's extra time goes."""
    model = build(bits)
    out = dict(bits=bits, greedy_ms=[], sample_ms=[])
    try:
        for _ in range(rounds):
            t, run = graph_decode(model, 1)
            out["greedy_ms"].append(round(t * 1e3, 4))
            del run
            t, run = graph_sampling_decode(model, keep=True)
            out["sample_ms"].append(round(t * 1e3, 4))
            log(event="sampling_profile", bits=bits, greedy=out["greedy_ms"][-1], sample=out["sample_ms"][-1])
        with torch.inference_mode():
            out["timeline_sample"] = kernel_timeline(model, run, by_name=True)
        del run
        t, run = graph_decode(model, 1)
        with torch.inference_mode():
            out["timeline_greedy"] = kernel_timeline(model, run, by_name=True)
        del run
    finally:
        release(model)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


def end_to_end(model, batch, prompt_len, new_tokens):
    """Wall seconds of model.generate (greedy, eos off) and the path it took."""
    ids = prompt(batch, prompt_len, seed=1)
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    sync()
    dt = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + new_tokens, out.shape
    return dt, fd.last_decision(model)["path"]


def eager_decode(model, batch, prompt_len=32, new_tokens=16):
    """Seconds per token of the eager path: generate(n) - generate(1), divided by n - 1."""
    end_to_end(model, batch, prompt_len, 2)  # warm-up
    t1 = statistics.median(end_to_end(model, batch, prompt_len, 1)[0] for _ in range(2))
    tn = statistics.median(end_to_end(model, batch, prompt_len, new_tokens)[0] for _ in range(2))
    return (tn - t1) / (new_tokens - 1)


def _graph_prefill(model, length: int):
    """A no-argument callable running the graph path's prefill of a random `length`-token prompt."""
    ids = prompt(1, length, seed=2)
    st = fd._state(model)
    mask = torch.ones_like(ids)
    pos = mc.build_position_ids(ids, 130004, 130000, 130001, mask)
    slot = st.slot(1, fd._bucket(length + 1))
    st.rotary_tables(model, slot.length + 2)
    return lambda: fd.prefill(model, st, slot, ids, pos, mask)


def prefill_time(model, path, length=1024):
    if path == "graph":
        run = _graph_prefill(model, length)
        with torch.inference_mode():
            return time_gpu(run, reps=5)
    ids = prompt(1, length, seed=2)
    with torch.inference_mode():
        return time_gpu(lambda: model(input_ids=ids, logits_to_keep=1), reps=3)


def prefill_host_ms(model, length=1024, reps=7):
    """Median host milliseconds to issue the graph path's prefill (from the call until it returns,
    no synchronisation): well below the event time = the GPU is the limit; close to it = the host is
    (Python and launch overhead; the figure then moves with the machine's CPU)."""
    run = _graph_prefill(model, length)
    out = []
    with torch.inference_mode():
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            run()
            out.append(time.perf_counter() - t0)
    sync()
    return statistics.median(out) * 1e3


_FAMILIES = (("gemv", "gemv"), ("qmm", "qmm"), ("splitk", "splitk_reduce"), ("decode_attn", "attention"),
             ("combine", "attention"), ("ln_kernel", "layernorm"), ("gelu", "gelu"), ("screen_kernel", "screen"),
             ("cand_kernel", "candidates"), ("head_kernel", "whole_head"), ("bookkeep", "bookkeep"),
             ("pick_kernel", "pick"))


def _kernel_family(name: str) -> str:
    """A decode-step kernel's family from its name (kernel_breakdown, kernel_timeline)."""
    for key, family in _FAMILIES:
        if key in name:
            return family
    low = name.lower()
    return "lm_head/cublas" if any(k in low for k in ("gemm", "gemv", "cutlass", "sm90")) else "other"


def kernel_breakdown(model, run, steps=20):
    """Device time per kernel family over `steps` graph replays (torch profiler)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                run.step()
            sync()
        fam = {}
        for ev in prof.key_averages():
            name = ev.key
            t = getattr(ev, "device_time_total", None)
            if t is None:
                t = getattr(ev, "cuda_time_total", 0)
            key = _kernel_family(name)
            fam.setdefault(key, [0.0, 0])
            fam[key][0] += t / steps
            fam[key][1] += ev.count // steps
        return {k: (round(v[0], 1), v[1]) for k, v in sorted(fam.items(), key=lambda kv: -kv[1][0])}
    except Exception as exc:  # diagnostics only
        return {"error": f"{type(exc).__name__}: {exc}"}


def _role(name: str, prev: str, lns: int) -> str:
    """A decode-step kernel's role (kernel_timeline): its family, the linears told apart by the role
    before them and the number of LayerNorms so far in the step (lns)."""
    family = _kernel_family(name)
    if family not in ("gemv", "qmm"):
        return family
    if prev == "attention":
        return "dense"
    if prev in ("h_to_4h", "gelu"):
        return "4h_to_h"
    return "qkv" if lns % 2 == 1 else "h_to_4h"


def kernel_timeline(model, run, steps=10, by_name=False):
    """Where a decode step's time goes on its critical path: the kernels of each step in the order they
    end; each one's end minus the previous one's end, summed per role (qkv / dense / h_to_4h / 4h_to_h,
    attention, layernorm, ...), µs per step. Unlike kernel_breakdown's durations these add up to the
    step even under programmatic dependent launch (a kernel's time waiting for the previous one is not
    counted). "step start": from the previous step's last kernel to this step's first one's end."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                run.step()
            sync()
        evs = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                     key=lambda e: e.time_range.end)
        per_step, cur, prev_end, prev_role, lns, first = [], {}, None, "", 0, True
        durations = {}
        for e in evs:
            role = _role(e.name, prev_role, lns)
            if role == "layernorm":
                lns += 1
            end = e.time_range.end
            key = "step start" if first else role
            if by_name and role not in ("qkv", "dense", "h_to_4h", "4h_to_h", "attention", "layernorm", "gelu",
                                        "splitk_reduce"):  # (a block's kernels keep their roles)
                key = e.name[:90]
            if prev_end is not None:
                cur[key] = cur.get(key, 0.0) + (end - prev_end)
                durations[role] = durations.get(role, 0.0) + e.time_range.elapsed_us()
            first = False
            prev_end, prev_role = end, role
            if role == "bookkeep":  # a step's last kernel
                per_step.append(cur)
                cur, lns, first, prev_role = {}, 0, True, ""
        full = per_step[1:] or per_step  # the first step's start is the profiler's
        keys = sorted({k for st in full for k in st}, key=lambda k: -sum(st.get(k, 0) for st in full))
        out = {k: round(sum(st.get(k, 0.0) for st in full) / len(full), 1) for k in keys}
        out["total"] = round(sum(v for k, v in out.items()), 1)
        out["durations"] = {k: round(v / max(1, len(per_step)), 1) for k, v in durations.items()}
        return out
    except Exception as exc:  # diagnostics only
        return {"error": f"{type(exc).__name__}: {exc}"}


def attention_ab(bits: int, steps=128, rounds=2):
    """Decode-attention variants in the whole batch-1 decode graph, alternating: today's settings, the
    first tile of cached keys / values loaded before the PDL wait (PRE), and PRE with the splits following
    the context (CHUNK positions per split at least); short contexts (33-160), then long ones (1501-1628)
    and the critical-path timeline (kernel_timeline) of each; "best" by the sum of the short and long
    medians."""
    model = build(bits)
    base = dict(fd.ATTN_CFG["small"])

    def use(cfg):
        fd.ATTN_CFG["small"] = cfg
        release(model)
    variants = {"today": base, "pre": dict(base, PRE=True)}
    for chunk in (128, 256, 512):
        variants[f"pre_chunk{chunk}"] = dict(base, PRE=True, CHUNK=chunk)
    out = dict(bits=bits, ms={k: [] for k in variants}, long_ms={k: [] for k in variants})
    try:
        tokens = {}
        for _ in range(rounds):
            for name, cfg in variants.items():
                use(cfg)
                t, run = graph_decode(model, 1, steps=steps)
                out["ms"][name].append(round(t * 1e3, 4))
                tokens[name] = run.slot.ids[0, :run.s + run.produced].tolist()
                log(event="attention_ab", bits=bits, variant=name, ms=out["ms"][name][-1])
                del run
        out["tokens_equal_today"] = {k: sum(a == b for a, b in zip(tokens["today"], v)) for k, v in tokens.items()}
        for name, cfg in variants.items():
            use(cfg)
            t, run = graph_decode(model, 1, steps=steps)
            out[f"timeline_{name}"] = kernel_timeline(model, run)
            log(event="timeline", bits=bits, variant=name, ms=round(t * 1e3, 4), timeline=out[f"timeline_{name}"])
            del run
            release(model)
            t, run = graph_decode(model, 1, prompt_len=1500, steps=steps)
            out["long_ms"][name].append(round(t * 1e3, 4))
            log(event="attention_ab", bits=bits, variant=name, context="1501-1628", ms=out["long_ms"][name][-1])
            del run
        best = min(variants, key=lambda k: statistics.median(out["ms"][k]) + statistics.median(out["long_ms"][k]))
        out["best"] = best
    finally:
        use(base)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


_PDL_COMBOS = {  # (linears launched early, linears whose trigger comes late, cuda_kernels.LATE_STEPS: 0 after
    # the main loop, n at the start of its n-th last step); first: today's
    4: [(("qkv", "h_to_4h", "4h_to_h"), ("h_to_4h", "4h_to_h"), 0),
        (("qkv", "h_to_4h", "4h_to_h"), ("h_to_4h", "4h_to_h"), 2),
        (("qkv", "h_to_4h", "4h_to_h"), ("h_to_4h", "4h_to_h"), 4),
        # qkv triggering a few steps before its end: the attention launches in qkv's last steps (time for
        # its cached keys / values), and dense, launched from the attention's start, no longer lands on
        # slots qkv still needs (with the trigger after qkv's loop the attention was exposed: 1.83)
        (("qkv", "dense", "h_to_4h", "4h_to_h"), ("qkv", "h_to_4h", "4h_to_h"), 2),
        (("qkv", "dense", "h_to_4h", "4h_to_h"), ("qkv", "h_to_4h", "4h_to_h"), 4)],
    8: [((), (), 0), ((), ("h_to_4h", "4h_to_h"), 2), ((), ("qkv", "dense", "h_to_4h", "4h_to_h"), 2)],
}


def pdl_ab(bits: int, steps=128, rounds=2, quick=False):
    """Which linears launch early (fast_decode.EARLY_LINEARS) and which let the next kernel launch only
    after their main loop or late in it (fast_decode.LATE_TRIGGER, cuda_kernels.LATE_STEPS), in the whole
    batch-1 decode graph, alternating; then, unless quick, the critical-path timeline (kernel_timeline)
    of each and batch 16 with the attention's keys / values loaded before the wait (PRE) or after it."""
    model = build(bits)
    key = (bits, "b1")  # (the batch-1 entries of the tables)
    saved = (fd.EARLY_LINEARS.get(key), fd.LATE_TRIGGER.get(key), dict(fd.ATTN_CFG["large"]))
    names = [f"early={','.join(e) or '-'} late={','.join(l) or '-'} steps={n}" for e, l, n in _PDL_COMBOS[bits]]
    out = dict(bits=bits, mode=fd.PDL_MODE.get((bits, "small")), ms={n: [] for n in names})

    def use(early, late, steps):
        if bits == 4:  # (INT8 runs in mode "all": every linear launches early already)
            fd.EARLY_LINEARS[key] = tuple(early)
        fd.LATE_TRIGGER[key] = tuple(late)
        ck.LATE_STEPS = steps
        release(model)
    try:
        for _ in range(rounds):
            for name, combo in zip(names, _PDL_COMBOS[bits]):
                use(*combo)
                t, run = graph_decode(model, 1, steps=steps)
                out["ms"][name].append(round(t * 1e3, 4))
                log(event="pdl_ab", bits=bits, variant=name, ms=out["ms"][name][-1])
                del run
        for name, combo in zip(names, () if quick else _PDL_COMBOS[bits]):
            use(*combo)
            t, run = graph_decode(model, 1, steps=steps)
            out[f"timeline {name}"] = kernel_timeline(model, run)
            log(event="timeline", bits=bits, variant=name, timeline=out[f"timeline {name}"])
            del run
        use(*_PDL_COMBOS[bits][0])
        large = dict(fd.ATTN_CFG["large"])
        for _ in range(0 if quick else rounds):
            for pre in (False, True):
                fd.ATTN_CFG["large"] = dict(large, PRE=pre)
                release(model)
                t, run = graph_decode(model, 16, steps=64)
                out.setdefault("b16_tok_s", {}).setdefault(f"pre={pre}", []).append(round(16 / t, 1))
                log(event="pdl_ab", bits=bits, batch=16, pre=pre, tok_s=round(16 / t, 1))
                del run
    finally:
        for table, value in ((fd.EARLY_LINEARS, saved[0]), (fd.LATE_TRIGGER, saved[1])):
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        fd.ATTN_CFG["large"] = saved[2]
        ck.LATE_STEPS = 0
        release(model)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


def _graph_time(fn, reps=20):
    """Median seconds of one replay of a CUDA graph of fn() (fn compiled/warmed by the caller)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    t = time_gpu(g.replay, reps=reps, warmup=2)
    del g
    return t


def sweep_attention():
    """Decode-attention tile / split / merge options, 28 launches (one per layer, own caches) per graph."""
    H, D, L = 32, 128, 28
    dt = torch.float16
    cases = [("b1-ctx120", 1, 2048, 120), ("b1-ctx1800", 1, 2048, 1800), ("b16-ctx100", 16, 256, 100),
             ("b4-ctx120", 4, 2048, 120), ("b4-ctx1800", 4, 2048, 1800), ("b16-ctx1800", 16, 2048, 1800)]
    tiles = [dict(BLOCK_S=bs, num_warps=w, num_stages=st) for bs in (32, 64, 128) for w in (4, 8) for st in (1, 3)]
    denom, coeff = fd._scale_for(13, D)
    rows = []
    data = {}
    for name, b, bucket, ctx in cases:
        kc = torch.randn(L, b, H, bucket, D, device="cuda", dtype=dt)
        vc = torch.randn_like(kc)
        qkv = torch.randn(b, 3 * H * D, device="cuda", dtype=dt)
        cs = torch.rand(b, 2, D, device="cuda", dtype=dt)
        cur = torch.tensor([ctx], dtype=torch.int32, device="cuda")
        pad = torch.zeros(b, dtype=torch.int32, device="cuda")
        out = torch.empty(b, H * D, device="cuda", dtype=dt)
        data[name] = (b, bucket, kc, vc, qkv, cs, cur, pad, out)

    def measure(name, cfg, target):
        b, bucket, kc, vc, qkv, cs, cur, pad, out = data[name]
        splits = fd.attention_splits(b, H, bucket, target)
        scratch = fd.attention_scratch(b, H, D, splits, "cuda") if splits > 1 else None

        def run():
            for layer in range(L):
                fd.decode_attention(qkv, kc[layer], vc[layer], cs, cur, pad, out, denom, coeff, splits, scratch, cfg)
        run()
        return _graph_time(run) / L * 1e6, splits

    def pick(scored):
        # each case's time relative to its own best candidate, summed: a long context's larger
        # microseconds do not outvote the short one (the decode step at both matters)
        lows = [min(us[i] for us, _ in scored) for i in range(len(scored[0][0]))]
        return min(scored, key=lambda c: sum(u / low for u, low in zip(c[0], lows)))[1]

    best = {}
    for cls, names in (("small", ["b1-ctx120", "b1-ctx1800"]),
                       ("large", ["b16-ctx100", "b16-ctx1800", "b4-ctx120", "b4-ctx1800"])):
        # (PRE and CHUNK, chosen in the whole decode graph with PDL, stay as they are: PRE only matters
        # under PDL, and CHUNK needs the in-kernel merge)
        keep = {k: v for k, v in fd.ATTN_CFG[cls].items() if k in ("PRE", "CHUNK")}
        scored = []
        for tile in tiles:
            cfg = dict(tile, INLINE=True, **keep)
            us = [measure(n, cfg, 256)[0] for n in names]
            rows.append(dict(cls=cls, **cfg, target=256, us=[round(u, 2) for u in us]))
            scored.append((us, tile))
        tile = pick(scored)
        scored = []
        for target in (64, 128, 256, 512, 1024):
            for inline in (True, False):
                cfg = dict(tile, INLINE=inline, **{k: v for k, v in keep.items() if inline or k != "CHUNK"})
                res = [measure(n, cfg, target) for n in names]
                rows.append(dict(cls=cls, **cfg, target=target, splits=[r[1] for r in res],
                                 us=[round(r[0], 2) for r in res]))
                scored.append(([r[0] for r in res], dict(cfg, TARGET=target)))
        best[cls] = pick(scored)
    for r in rows:
        log(event="sweep_attention", **r)
    del data
    torch.cuda.empty_cache()
    return best


def confirm_attention(best, bits=8):
    """Whole decode graph (INT8) with fast_decode.ATTN_CFG as it is vs the sweep's choice, alternating
    twice, at batch 1 / 4 / 16 and contexts 33-160 / 1501-1628: ms per step."""
    model = build(bits)
    current = {k: dict(v) for k, v in fd.ATTN_CFG.items()}
    out = []
    for rep in range(2):
        for tag, cfgs in (("current", current), ("sweep", best)):
            fd.ATTN_CFG.update({k: dict(v) for k, v in cfgs.items()})
            for batch in (1, 4, 16):
                for plen in (32, 1500):
                    fd.release(model)  # slots keep the split count they were made with
                    ms = graph_decode(model, batch, prompt_len=plen)[0] * 1e3
                    out.append(dict(tag=tag, rep=rep, batch=batch, context=f"{plen + 1}-{plen + 128}", ms=round(ms, 3)))
                    log(event="confirm_attention", **out[-1])
    fd.ATTN_CFG.update(current)
    release(model)
    return out


def sweep_layernorm():
    """num_warps of the residual + LayerNorm kernel, 57 launches per graph (as per decode step)."""
    best = {}
    for cls, rows in (("small", 1), ("large", 16)):
        xs = [torch.randn(rows, 4096, device="cuda", dtype=torch.float16) for _ in range(2)]
        w, b = torch.randn(4096, device="cuda", dtype=torch.float16), torch.randn(4096, device="cuda", dtype=torch.float16)
        out = torch.empty_like(xs[0])
        scored = []
        for warps in (2, 4, 8, 16):
            fd.LN_WARPS[cls] = warps

            def run():
                for _ in range(57):
                    fd.layer_norm(xs[0], w, b, 1e-5, residual=xs[1], alpha=7.48, out=out)
            run()
            us = _graph_time(run) / 57 * 1e6
            log(event="sweep_layernorm", cls=cls, num_warps=warps, us=round(us, 2))
            scored.append((us, warps))
        best[cls] = min(scored)[1]
        fd.LN_WARPS[cls] = best[cls]
    return best


# The (N, K) shapes of one layer's linears: query_key_value, attention.dense, dense_h_to_4h (GELU),
# dense_4h_to_h.
GEMV_SHAPES = {"qkv": (12288, 4096), "dense": (4096, 4096), "h_to_4h": (16384, 4096), "4h_to_h": (4096, 16384)}


def _require_linear_ok(what, kind, cfg, N, K, bits=8, M=1):
    """Check one kernel config against a float64 reference (fresh random data): raises unless the
    relative error is below 2e-3 (a sweep stops rather than time a wrong kernel)."""
    g = torch.Generator(device="cuda").manual_seed(N + K + M)
    KQ = K if bits == 8 else K // 2
    q = torch.randint(-127, 128, (N, KQ), dtype=torch.int8, device="cuda", generator=g)
    scale = (torch.rand(N, device="cuda", generator=g) * 0.01 + 0.001).half()
    bias = torch.randn(N, device="cuda", generator=g).half()
    x = torch.randn(M, K, device="cuda", generator=g).half()
    ref = x.double() @ quant.dequantize_weight(q, scale, bits, torch.float64).t() + bias.double()
    run = {"gemv": ck._run_gemv, "plain": ck._run_qmm, "asm": ck._run_qmm_asm, "mma": mm.gemv}[kind]
    y = run(x, q, scale, bias, bits, dict(cfg))
    err = ((y.double() - ref).norm() / ref.norm()).item()
    if not err < 2e-3:
        raise RuntimeError(f"{what} {cfg}: rel err {err}")


def _gemv_cfg(cap, bits, N, K) -> dict:
    """The batch-1 GEMV config cuda_kernels uses for this shape now (per-shape entry, else the generic one)."""
    return dict(ck._GEMV_SHAPE_CFG.get((cap, bits, N, K)) or ck._GEMV_CFG[(bits, N <= ck._SMALL_N, K >= ck._BIG_K)])


def _sweep_candidates(bits: int, batch: int):
    """(knobs tried on every shape at once, tiles for N > 4096, tiles for N <= 4096) of one sweep.
    Batch 1 entries are GEMV configs; batch 16 entries are (kernel kind, config) pairs."""
    if batch == 1:
        knobs = [dict(XVEC=2), dict(CM=".cg"), dict(EV="")] if bits == 8 else [dict(XVEC=2), dict(XVEC=2, num_warps=8)]
        big = [dict(BLOCK_N=4, BLOCK_KW=256, PREFETCH=True, num_warps=4),
               dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, num_warps=4),
               dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, num_warps=8),
               dict(BLOCK_N=16, BLOCK_KW=128, PREFETCH=True, num_warps=8),
               dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=False, num_warps=4, num_stages=3),
               dict(BLOCK_N=8, BLOCK_KW=256, PREFETCH=True, num_warps=8),
               dict(BLOCK_N=16, BLOCK_KW=128, PREFETCH=False, num_warps=8, num_stages=4),
               dict(BLOCK_N=16, BLOCK_KW=64, PREFETCH=True, num_warps=4)]
        small = [dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, num_warps=4),
                 dict(BLOCK_N=4, BLOCK_KW=128, PREFETCH=True, num_warps=4),
                 dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=False, num_warps=8),
                 dict(BLOCK_N=4, BLOCK_KW=256, PREFETCH=True, num_warps=8),
                 dict(BLOCK_N=4, BLOCK_KW=256, PREFETCH=False, num_warps=4, num_stages=3),
                 dict(BLOCK_N=4, BLOCK_KW=256, PREFETCH=True, num_warps=4, SPLIT_K=2),
                 dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=True, num_warps=4, SPLIT_K=2),
                 dict(BLOCK_N=8, BLOCK_KW=256, PREFETCH=True, num_warps=4, SPLIT_K=4)]
        return knobs, big, small
    kq = "BLOCK_KQ"
    big = [("plain", {"BLOCK_N": 32, "BLOCK_M": 16, kq: 256, "num_warps": 4, "num_stages": 4}),
           ("plain", {"BLOCK_N": 64, "BLOCK_M": 16, kq: 128, "num_warps": 2, "num_stages": 4}),
           ("plain", {"BLOCK_N": 64, "BLOCK_M": 16, kq: 128, "num_warps": 4, "num_stages": 4, "SPLIT_K": 2}),
           ("plain", {"BLOCK_N": 64, "BLOCK_M": 16, kq: 256, "num_warps": 4, "num_stages": 3}),
           ("plain", {"BLOCK_N": 32, "BLOCK_M": 16, kq: 128, "num_warps": 4, "num_stages": 5}),
           ("plain", {"BLOCK_N": 128, "BLOCK_M": 16, kq: 128, "num_warps": 8, "num_stages": 4, "SPLIT_K": 2}),
           ("asm", dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KW=32, num_warps=4, num_stages=4)),
           ("asm", dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KW=32, num_warps=4, num_stages=3, SPLIT_K=2)),
           ("asm", dict(BLOCK_N=128, BLOCK_M=16, BLOCK_KW=32, num_warps=8, num_stages=3, SPLIT_K=2))]
    small = [("plain", {"BLOCK_N": 32, "BLOCK_M": 16, kq: 256, "num_warps": 4, "num_stages": 3, "SPLIT_K": 4}),
             ("plain", {"BLOCK_N": 32, "BLOCK_M": 16, kq: 256, "num_warps": 2, "num_stages": 3, "SPLIT_K": 4}),
             ("plain", {"BLOCK_N": 64, "BLOCK_M": 16, kq: 128, "num_warps": 2, "num_stages": 4, "SPLIT_K": 4}),
             ("plain", {"BLOCK_N": 64, "BLOCK_M": 16, kq: 128, "num_warps": 4, "num_stages": 4, "SPLIT_K": 4}),
             ("plain", {"BLOCK_N": 64, "BLOCK_M": 16, kq: 256, "num_warps": 4, "num_stages": 3, "SPLIT_K": 8}),
             ("plain", {"BLOCK_N": 32, "BLOCK_M": 16, kq: 128, "num_warps": 4, "num_stages": 4, "SPLIT_K": 4}),
             ("plain", {"BLOCK_N": 64, "BLOCK_M": 16, kq: 256, "num_warps": 4, "num_stages": 3, "SPLIT_K": 2}),
             ("asm", dict(BLOCK_N=64, BLOCK_M=16, BLOCK_KW=32, num_warps=4, num_stages=3, SPLIT_K=4)),
             ("asm", dict(BLOCK_N=32, BLOCK_M=16, BLOCK_KW=64, num_warps=4, num_stages=3, SPLIT_K=4))]
    if bits == 4:  # an INT4 byte holds two columns: halve the byte tiles of the plain kernel
        big = [(k, dict(c, BLOCK_KQ=c["BLOCK_KQ"] // 2) if k == "plain" else c) for k, c in big]
        small = [(k, dict(c, BLOCK_KQ=c["BLOCK_KQ"] // 2) if k == "plain" else c) for k, c in small]
    return [], big, small


def sweep_linear(bits=8, batch=1, steps=128, budget_s=float(os.environ.get("SWEEP_BUDGET_S", "400"))):
    """Choose the linear-kernel config of each layer shape for (weights, batch) by timing the whole
    CUDA-graph decode step (PDL as in fast_decode.PDL_MODE), greedily: knobs for all shapes first
    (batch 1), then tiles per shape. Every candidate is also checked in isolation against float64.
    Batch 1 fills cuda_kernels._GEMV_SHAPE_CFG, batch 2-16 _DECODE_SHAPE_CFG. Returns {shape: cfg}.
    SWEEP_TILES (JSON {"knobs": [...], "qkv": [...], ...}, or the path of a .json file holding it) replaces the
    built-in candidates with these (benchmarks/sweep_int4_b1.json, sweep_int8_b1.json: the triple-buffered and
    split-K tiles)."""
    cap = ck._capability(torch.device("cuda"))
    t_start = time.time()
    model = build(bits)
    shapes = dict(GEMV_SHAPES)
    table = ck._GEMV_SHAPE_CFG if batch == 1 else ck._DECODE_SHAPE_CFG

    def current(N, K):
        if batch == 1:
            return _gemv_cfg(cap, bits, N, K)
        kind, cfg = ck._DECODE_SHAPE_CFG.get((cap, bits, N, K)) or ck._DECODE_CFG[(bits, N <= ck._SMALL_N)]
        return kind, dict(cfg)

    base = {name: current(N, K) for name, (N, K) in shapes.items()}
    cur = dict(base)

    def apply(cfgs):
        for name, (N, K) in shapes.items():
            table[(cap, bits, N, K)] = cfgs[name]

    def measure(cfgs, tag):
        apply(cfgs)
        for name, (N, K) in shapes.items():
            kind, cfg = ("gemv", cfgs[name]) if batch == 1 else cfgs[name]
            _require_linear_ok(name, kind, cfg, N, K, bits, batch)
        release(model)
        t, _ = graph_decode(model, batch, steps=steps)
        ms = round(t * 1e3, 4)
        log(event="sweep_linear", bits=bits, batch=batch, tag=tag, ms=ms, cfgs=cfgs)
        return ms

    best_ms = measure(cur, "start")
    knobs, tiles_big, tiles_small = _sweep_candidates(bits, batch)
    given = os.environ.get("SWEEP_TILES", "{}")  # {"knobs": [...], shape name: [...]} or a .json file: these only
    given = json.loads(Path(given).read_text() if given.endswith(".json") else given)
    if given:
        knobs = given.get("knobs", [])
    per_shape = {name: given.get(name, []) if given else (tiles_small if N <= ck._SMALL_N else tiles_big)
                 for name, (N, K) in shapes.items()}
    for extra in knobs:  # knobs applied to every shape at once (batch 1: GEMV dicts)
        cand = {n: dict(c, **extra) for n, c in cur.items()}
        try:
            ms = measure(cand, f"knob {extra}")
        except Exception as exc:
            log(event="sweep_linear_error", tag=str(extra), error=f"{type(exc).__name__}: {str(exc)[:300]}")
            continue
        if ms < best_ms:
            best_ms, cur = ms, cand
    kept = {k: v for k, v in cur["qkv"].items() if k in ("XVEC", "CM", "EV")} if batch == 1 else {}
    order = [n for n in given if n in shapes] if given else list(shapes)  # (SWEEP_TILES: in its key order)
    for name in order:
        for tile in per_shape[name]:
            if time.time() - t_start > budget_s:
                log(event="sweep_linear_budget", skipped=name, cfg=tile)
                continue
            cand = dict(cur)
            cand[name] = dict(tile, **kept) if batch == 1 else tile
            try:
                ms = measure(cand, f"{name} tile")
            except Exception as exc:
                log(event="sweep_linear_error", tag=name, cfg=cand[name], error=f"{type(exc).__name__}: {str(exc)[:300]}")
                continue
            if ms < best_ms:
                best_ms, cur = ms, cand
    # same-call confirmation: start vs chosen, alternating
    pairs = []
    for _ in range(2):
        pairs.append((measure(base, "confirm start"), measure(cur, "confirm chosen")))
    log(event="sweep_linear_choice", bits=bits, batch=batch, cfgs=cur, start_ms=[a for a, _ in pairs],
        chosen_ms=[b for _, b in pairs])
    if batch == 1 and cur != base:  # where the change lands on the step's critical path
        for tag, cfgs in (("start", base), ("chosen", cur)):
            apply(cfgs)
            release(model)
            t, run = graph_decode(model, 1, steps=steps)
            log(event="sweep_linear_timeline", bits=bits, tag=tag, ms=round(t * 1e3, 4),
                timeline=kernel_timeline(model, run))
            del run
    apply(cur)
    release(model)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return cur


# The 17-64-row linears before the twelfth round (2026-12-06): _qmm_kernel with 64 x 64 tiles for both
# weight types; the baseline of --mid-batches.
FORMER_MID_CFG = {8: dict(BLOCK_N=64, BLOCK_M=64, BLOCK_KQ=128, num_warps=4, num_stages=4),
                  4: dict(BLOCK_N=64, BLOCK_M=64, BLOCK_KQ=64, num_warps=4, num_stages=4)}


def compare_plans(bits_list, batches, steps, choices, event, prefill_for=(), strict=False):
    # (logged as events "<event>_batch", "<event>_prefill" and "<event>_batch_error")
    """Decode step (CUDA graph) at each batch under each linear plan of choices(bits): name -> None (the
    current cuda_kernels._plan) or an override (M, N, K, bits, dtype, aligned) -> a _plan result, or None
    to keep _plan's, alternating in one process: {bits: {batch: {name: ms}}}. For the names in prefill_for
    also a prompt of `batch` tokens at batch 1 (the graph path's prefill, "<name> prefill": ms). strict: a
    choice that fails to build or run is logged and skipped instead of timing the torch fallback."""
    plan, was_strict = ck._plan, ck.STRICT
    chosen = {"fn": None}

    def planned(M, N, K, bits, dtype, aligned, cap=()):
        got = chosen["fn"](M, N, K, bits, dtype, aligned) if chosen["fn"] is not None else None
        return got if got is not None else plan(M, N, K, bits, dtype, aligned, cap)

    out = {}
    ck._plan = planned
    ck.STRICT = strict or was_strict
    try:
        for bits in bits_list:
            model = build(bits)
            options = choices(bits)
            for batch in batches:
                for name, fn in options.items():
                    chosen["fn"] = fn
                    release(model)  # a fresh capture with this plan
                    try:
                        t, _ = graph_decode(model, batch, steps=steps)
                    except Exception as exc:
                        if not strict:
                            raise
                        log(event=f"{event}_batch_error", bits=bits, batch=batch, linears=name,
                            error=f"{type(exc).__name__}: {str(exc)[:300]}")
                        continue
                    out.setdefault(bits, {}).setdefault(batch, {})[name] = round(t * 1e3, 3)
                    log(event=f"{event}_batch", bits=bits, batch=batch, linears=name, ms=round(t * 1e3, 3),
                        tok_s=round(batch / t))
                    if name in prefill_for:  # a prompt of `batch` tokens: the same row counts
                        release(model)
                        pre = prefill_time(model, "graph", length=batch)
                        out[bits][batch][f"{name} prefill"] = round(pre * 1e3, 3)
                        log(event=f"{event}_prefill", bits=bits, tokens=batch, linears=name, ms=round(pre * 1e3, 3))
            release(model)
            del model
            gc.collect()
            torch.cuda.empty_cache()
    finally:
        ck._plan, ck.STRICT = plan, was_strict
    return out


def mid_batches(bits_list, batches, steps=64):
    """Decode step (CUDA graph, context 33-96) at batches of 17-64 rows, where every linear runs the
    17..64-row configs (cuda_kernels._MID_CFG), against the former 64 x 64 tile of _qmm_kernel
    (FORMER_MID_CFG), alternating in one process: {bits: {batch: {"current"|"former": ms}}}."""
    def former(M, N, K, bits, dtype, aligned):
        return ("qmm", ck._run_qmm, FORMER_MID_CFG[bits]) if 16 < M <= ck._MID_MAX_M else None

    return compare_plans(bits_list, batches, steps, lambda bits: {"current": None, "former": former}, "mid")


# Batches of 65-256 rows (thirteenth round): before it, every linear dequantized its weight for cuBLAS
# there ("former"); cuda_kernels._WIDE_CFG ("current") runs tiles where they measured faster. Other
# tile choices to time against it: name -> {N <= 4096: (kind, config) or None for dequantize + cuBLAS}.
_P = "plain"
WIDE_CANDIDATES = {  # (the second set timed; the first is in benchmarks/results/gpu.md, thirteenth round)
    8: {"big n128 m64 kq128, small n64 m64": {
            False: (_P, dict(BLOCK_N=128, BLOCK_M=64, BLOCK_KQ=128, num_warps=8, num_stages=3)),
            True: (_P, dict(BLOCK_N=64, BLOCK_M=64, BLOCK_KQ=128, num_warps=4, num_stages=4))},
        "all n64 m64 kq128": {False: (_P, dict(BLOCK_N=64, BLOCK_M=64, BLOCK_KQ=128, num_warps=4, num_stages=4)),
                              True: (_P, dict(BLOCK_N=64, BLOCK_M=64, BLOCK_KQ=128, num_warps=4, num_stages=4))}},
    4: {"big asm n256 m64": {False: ("asm", dict(BLOCK_N=256, BLOCK_M=64, BLOCK_KW=32, num_warps=8, num_stages=3)),
                             True: None}},
}


def wide_batches(bits_list, batches, steps=32, candidates=None):
    """Decode step (CUDA graph, context 33-64) at batches of 65-256 rows: the current plan
    (cuda_kernels._WIDE_CFG), the former one (dequantize + cuBLAS for every linear) and each tile choice
    of WIDE_CANDIDATES, in one process: {bits: {batch: {"current"|"former"|name: ms}}}; for the first
    two also a prompt of `batch` tokens at batch 1 ("current prefill", "former prefill": ms, the
    graph path's prefill). A choice that fails to build or run is logged and skipped (STRICT: no silent
    torch fallback)."""
    def override(picks):  # {N <= 4096: (kind, config) or None for dequantize + cuBLAS}
        def fn(M, N, K, bits, dtype, aligned):
            if not ck._MID_MAX_M < M <= 256:
                return None
            pick = picks.get(N <= ck._SMALL_N)
            if pick is None:
                return "dequant_mm", ck._run_dequant_mm, ck._DEQUANT_CFG
            kind, cfg = pick
            if kind == "asm" and aligned and dtype == torch.float16:
                return "qmm_asm", ck._run_qmm_asm, cfg
            return "qmm", ck._run_qmm, cfg
        return fn

    def choices(bits):
        cands = WIDE_CANDIDATES[bits] if candidates is None else candidates
        return {"current": None, "former": override({}), **{name: override(c) for name, c in cands.items()}}

    return compare_plans(bits_list, batches, steps, choices, "wide", prefill_for=("current", "former"),
                         strict=True)


MMA_CANDIDATES = [dict(MT=1, WARPS=4, U=4), dict(MT=1, WARPS=8, U=4), dict(MT=1, WARPS=2, U=4),
                  dict(MT=2, WARPS=4, U=4), dict(MT=1, WARPS=4, U=8), dict(MT=2, WARPS=8, U=2),
                  dict(MT=1, WARPS=16, U=2), dict(MT=1, WARPS=8, U=8), dict(MT=2, WARPS=2, U=8),
                  dict(MT=1, WARPS=16, U=4), dict(MT=1, WARPS=32, U=2), dict(MT=2, WARPS=16, U=2)]


def gemv_microbench(bits, cfgs, copies=24, reps=20):
    """Each layer shape alone: one graph of `copies` launches on distinct weights (more bytes than
    L2 holds), Triton GEMV vs the tensor-core GEMV with cfgs[name]; µs per call and GB/s read."""
    out, enabled = {}, mm.ENABLED
    for name, (N, K) in GEMV_SHAPES.items():
        KQ = K if bits == 8 else K // 2
        ws = [torch.randint(-127, 128, (N, KQ), dtype=torch.int8, device="cuda") for _ in range(copies)]
        scale = torch.rand(N, device="cuda").half() * 0.01
        bias = torch.randn(N, device="cuda").half()
        x = torch.randn(1, K, device="cuda").half()
        res = {}
        for tag, on in (("triton", False), ("mma", True)):
            mm.ENABLED = on
            mm._SHAPE_CFG[(ck._capability(torch.device("cuda")), bits, N, K)] = cfgs[name]

            def fn():
                for q in ws:
                    ck.linear(x, q, scale, bias, bits)
            fn()
            t = _graph_time(fn, reps=reps) / copies
            res[tag] = dict(us=round(t * 1e6, 2), gbs=round(N * KQ / t / 1e9, 1))
        mm.ENABLED = enabled
        out[name] = res
        log(event="gemv_microbench", bits=bits, shape=name, **res)
        del ws
        torch.cuda.empty_cache()
    return out


def sweep_mma(bits=4, steps=128, budget_s=float(os.environ.get("SWEEP_BUDGET_S", "300"))):
    """Batch-1 tensor-core GEMV (cuda_mma.py) in the whole CUDA-graph decode step: the Triton GEMV
    and each PDL mode for reference, then a (MT, WARPS, U) config per layer shape, greedily, each
    checked against float64 first. Fills cuda_mma._SHAPE_CFG; returns (cfgs, best PDL mode)."""
    cap = ck._capability(torch.device("cuda"))
    t_start = time.time()
    model = build(bits)
    shapes = dict(GEMV_SHAPES)
    key = (bits, "small")
    mode0, enabled = fd.PDL_MODE[key], mm.ENABLED

    def measure(tag, on=True, mode=None, cfgs=None):
        mm.ENABLED = on
        fd.PDL_MODE[key] = mode or mode0
        for name, (N, K) in shapes.items():
            if cfgs is not None:
                mm._SHAPE_CFG[(cap, bits, N, K)] = dict(cfgs[name])
                _require_linear_ok(name, "mma", cfgs[name], N, K, bits)
        release(model)
        t, _ = graph_decode(model, 1, steps=steps)
        ms = round(t * 1e3, 4)
        log(event="sweep_mma", bits=bits, tag=tag, ms=ms, on=on, pdl=fd.PDL_MODE[key], cfgs=cfgs)
        return ms

    cur = {name: mm.config_for(bits, N, K, cap) for name, (N, K) in shapes.items()}
    triton = {m: measure(f"triton pdl={m}", on=False, mode=m) for m in ("off", "small", "all")}
    modes = {m: measure(f"mma pdl={m}", mode=m, cfgs=cur) for m in ("off", "small", "all")}
    mode = min(modes, key=modes.get)
    best = modes[mode]
    for name in shapes:
        for cand in MMA_CANDIDATES:
            if cand == cur[name]:
                continue
            if time.time() - t_start > budget_s:
                log(event="sweep_mma_budget", skipped=name, cfg=cand)
                continue
            trial = dict(cur, **{name: cand})
            try:
                ms = measure(f"{name} {cand}", mode=mode, cfgs=trial)
            except Exception as exc:
                log(event="sweep_mma_error", tag=name, cfg=cand, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                continue
            if ms < best:
                best, cur = ms, trial
    tmode = min(triton, key=triton.get)
    pairs = [(measure("confirm triton", on=False, mode=tmode), measure("confirm mma", mode=mode, cfgs=cur))
             for _ in range(2)]
    mm.ENABLED = True
    fd.PDL_MODE[key] = mode
    _, run = graph_decode(model, 1, steps=steps)
    log(event="sweep_mma_choice", bits=bits, cfgs=cur, pdl=mode, triton_ms=[a for a, _ in pairs],
        mma_ms=[b for _, b in pairs], breakdown=kernel_breakdown(model, run))
    mm.ENABLED, fd.PDL_MODE[key] = enabled, mode0  # the choice is reported, not adopted
    release(model)
    del model, run
    gc.collect()
    torch.cuda.empty_cache()
    gemv_microbench(bits, cur)
    return cur, mode


def preload_candidates(bits: int, K: int):
    """Batch-1 GEMV configs whose programs take a whole weight row range as one tile (ONE_TILE)."""
    kw = K // (4 if bits == 8 else 8)
    shapes = ((2, 4), (4, 4), (8, 4), (8, 8)) if bits == 4 else ((1, 4), (2, 4), (4, 4), (4, 8))
    return [dict(BLOCK_N=bn, BLOCK_KW=kw, PREFETCH=True, EV="evict_first", XVEC=2, num_warps=w) for bn, w in shapes]


def sweep_preload(bits=4, steps=128):
    """The linears that follow a small kernel (qkv after a LayerNorm, dense after the attention,
    h_to_4h after a LayerNorm) launched early under PDL with their whole K range as one tile loaded
    before the wait (fast_decode.EARLY_LINEARS, cuda_kernels ONE_TILE), batch 1, in the whole CUDA-graph
    decode step: greedily per linear, early with today's config and early / not early with each
    preload config (checked against float64 first); then the choice against today's, alternating.
    Reported, not adopted. Returns the chosen {name: (early, cfg)}."""
    cap = ck._capability(torch.device("cuda"))
    model = build(bits)
    key = (bits, "b1")  # (the batch-1 entry)
    early0 = fd.EARLY_LINEARS.get(key, fd.EARLY_LINEARS.get((bits, "small"), ()))
    names = ("dense", "qkv", "h_to_4h")
    base = {name: (name in early0, _gemv_cfg(cap, bits, *GEMV_SHAPES[name])) for name in names}
    saved = {name: ck._GEMV_SHAPE_CFG.get((cap, bits, *GEMV_SHAPES[name])) for name in names}

    def measure(choice, tag):
        for name, (early, cfg) in choice.items():
            N, K = GEMV_SHAPES[name]
            ck._GEMV_SHAPE_CFG[(cap, bits, N, K)] = dict(cfg)
        fd.EARLY_LINEARS[key] = tuple(n for n, (e, _) in choice.items() if e)
        release(model)
        t, run = graph_decode(model, 1, steps=steps)
        ms = round(t * 1e3, 4)
        log(event="sweep_preload", bits=bits, tag=tag, ms=ms, early=fd.EARLY_LINEARS[key],
            cfgs={n: c for n, (_, c) in choice.items()})
        return ms, run

    try:
        best, _ = measure(base, "start")
        cur = dict(base)
        for name in names:
            N, K = GEMV_SHAPES[name]
            trials = [(True, base[name][1])]
            for cfg in preload_candidates(bits, K):
                _require_linear_ok(name, "gemv", cfg, N, K, bits)
                trials += [(True, cfg), (False, cfg)]
            for trial in trials:
                cand = dict(cur, **{name: trial})
                ms, _ = measure(cand, f"{name} early={trial[0]} {trial[1]}")
                if ms < best:
                    best, cur = ms, cand
        pairs = []
        for _ in range(3):
            pairs.append((measure(base, "confirm start")[0], measure(cur, "confirm chosen")[0]))
        _, run = measure(cur, "breakdown chosen")
        log(event="sweep_preload_choice", bits=bits, choice=cur, start_ms=[a for a, _ in pairs],
            chosen_ms=[b for _, b in pairs], breakdown=kernel_breakdown(model, run))
    finally:
        for name, cfg in saved.items():
            shape = (cap, bits, *GEMV_SHAPES[name])
            if cfg is None:
                ck._GEMV_SHAPE_CFG.pop(shape, None)
            else:
                ck._GEMV_SHAPE_CFG[shape] = cfg
        fd.EARLY_LINEARS[key] = early0
        release(model)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return cur


def screen_ab(bits: int, steps=128, pairs=3, trials=200):
    """The screened LM head (fast_decode.ScreenHead) against the fp16 head in the batch-1 greedy decode
    graph, alternating, and with chat sampling; then, on the model's head with random activations shaped like the final
    LayerNorm's, the screen alone: candidates per step, steps sent to the whole head, tokens equal to
    the whole head's argmax (same kernel) and to cuBLAS's, and each head's time in a CUDA graph."""
    model = build(bits)
    out = dict(bits=bits)
    try:
        times = {True: [], False: []}
        tokens = {}
        for _ in range(pairs):
            for on in (False, True):
                model.config.screen_lm_head = on
                release(model)
                t, run = graph_decode(model, 1, steps=steps)
                times[on].append(round(t * 1e3, 4))
                tokens[on] = run.slot.ids[0, :run.s + run.produced].tolist()
                log(event="screen_ab", bits=bits, screen=on, ms=times[on][-1])
        out["ms_off"], out["ms_on"] = times[False], times[True]
        for on in (False, True, False, True):  # chat sampling (T 0.95, top-k 50, top-p 0.7)
            model.config.screen_lm_head = on
            release(model)
            out.setdefault(f"sample_ms_{'on' if on else 'off'}", []).append(
                round(graph_sampling_decode(model, steps=steps) * 1e3, 4))
        same = sum(a == b for a, b in zip(tokens[False], tokens[True]))
        out["tokens_equal"] = f"{same}/{len(tokens[False])}"
        model.config.screen_lm_head = True
        release(model)
        t, run = graph_decode(model, 1, steps=steps)
        out["breakdown_on_us"] = kernel_breakdown(model, run)
        del run
        ck.PDL = False  # kernel times without programmatic dependent launch add up to the step
        release(model)
        try:
            t, run = graph_decode(model, 1, steps=steps)
            out["nopdl_ms_on"] = round(t * 1e3, 4)
            out["breakdown_nopdl_on_us"] = kernel_breakdown(model, run)
            del run
        finally:
            ck.PDL = True
            release(model)
        w = model.lm_head.weight
        V, K = w.shape
        t0 = time.time()
        head = fd.ScreenHead(w)
        sync()
        out["build_s"] = round(time.time() - t0, 3)
        ln = model.transformer.final_layernorm
        g = torch.Generator(device="cuda").manual_seed(1)
        counts, fallbacks, eq_kernel, eq_cublas = [], 0, 0, 0
        key = torch.empty(1, dtype=torch.long, device="cuda")
        flag = torch.zeros(1, dtype=torch.int32, device="cuda")
        scr = torch.empty(2, dtype=torch.int32, device="cuda")
        scr0 = torch.tensor([-(1 << 31), 0], dtype=torch.int32, device="cuda")
        hi = torch.empty(V, dtype=torch.float32, device="cuda")
        norms = torch.empty(1, 2, dtype=torch.float32, device="cuda")
        for i in range(trials):
            a = torch.randn(1, K, generator=g, device="cuda", dtype=w.dtype) * (1 + 3 * (i % 4))
            key.fill_(fd._KEY_EMPTY)
            scr.copy_(scr0)
            x = fd.layer_norm(a, ln.weight, ln.bias, ln.eps, norms=norms)
            head.pick(x, w, key, flag, scr, hi, norms)
            tok = 0x7FFFFFFF - (int(key) & 0xFFFFFFFF)
            tk = scr[:1].clone()
            if int(tk) < 0:
                tk ^= 0x7FFFFFFF  # (the order key of a negative float: magnitude bits flipped)
            T = tk.view(torch.float32).item()
            counts.append(int((hi >= T).sum()))
            fallbacks += int(scr[1]) != 0
            eq_kernel += tok == int(fd.head_logits(x, w).float().argmax())
            eq_cublas += tok == int(F.linear(x, w).float().argmax())
        counts.sort()
        out.update(trials=trials, candidates_median=counts[len(counts) // 2], candidates_max=counts[-1],
                   fallbacks=fallbacks, equal_whole_head_kernel=eq_kernel, equal_cublas=eq_cublas)

        def screened():
            key.fill_(fd._KEY_EMPTY)
            scr.copy_(scr0)
            head.pick(x, w, key, flag, scr, hi, norms)

        slot = SimpleNamespace(pick_key=key, pick_flag=flag)

        def cublas():
            key.fill_(fd._KEY_EMPTY)
            fd._choose(F.linear(x, w), slot, ("greedy",), [])

        def whole():
            key.fill_(fd._KEY_EMPTY)
            fd._run_head(x, w, None, key, flag, scr, check=True)

        for name, fn in (("screened", screened), ("cublas_and_pick", cublas), ("whole_head_kernel", whole)):
            out[f"{name}_us"] = round(_graph_time(fn) * 1e6, 1)
        log(event="screen_head", **out)
    finally:
        model.config.screen_lm_head = None
        release(model)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


def memory_2048(model):
    """Peak memory of one generation that fills a 2048-token context (prompt 1536, greedy to 2048)."""
    out = {}
    for path in ("graph", "eager"):
        release(model)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ids = prompt(1, 1536, seed=3)
        with Path_(model, path):
            t0 = time.perf_counter()
            res = model.generate(ids, max_length=2048, do_sample=False, eos_token_id=None)
            sync()
            dt = time.perf_counter() - t0
        assert res.shape[1] == 2048
        out[path] = dict(peak_alloc_gib=round(torch.cuda.max_memory_allocated() / GiB, 3),
                         peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 3),
                         weights_gib=round(base / GiB, 3), seconds=round(dt, 2),
                         path=fd.last_decision(model)["path"])
        log(event="memory_2048", bits=8, variant=path, **out[path])
    return out


def weight_bytes(model):
    """Bytes one decode step must read: every block weight/scale/bias, final LN, and the LM head."""
    n = 0
    for name, p in model.named_parameters():
        if name.startswith("transformer.layers.") or name.startswith("transformer.final_layernorm"):
            n += p.numel() * p.element_size()
    w = model.lm_head.weight
    return n + w.numel() * w.element_size()


def bench_variant(bits, results, bw):
    model = build(bits)
    label = {8: "INT8", 4: "INT4", 16: "FP16"}[bits]
    r = results.setdefault(label, {})
    r["weight_read_gb"] = round(weight_bytes(model) / 1e9, 3)
    r["floor_ms_copy"] = round(weight_bytes(model) / (bw["copy_gbs"] * 1e9) * 1e3, 3)
    r["floor_ms_read"] = round(weight_bytes(model) / (bw["read_gbs"] * 1e9) * 1e3, 3)
    if bits == 8:
        r["memory_2048"] = memory_2048(model)
        release(model)
    # graph path
    t1, run = graph_decode(model, 1)
    r["graph_decode_ms"] = round(t1 * 1e3, 3)
    r["graph_breakdown_us"] = kernel_breakdown(model, run)
    log(event="graph_decode", bits=bits, batch=1, ms=r["graph_decode_ms"], breakdown=r["graph_breakdown_us"])
    st = fd._state(model)
    if st.pdl and fd.PDL_MODE.get((st.weight_kind, "small"), "off") != "off":
        # the same step without programmatic dependent launch (kernel times then add up to the step)
        ck.PDL = False
        release(model)
        try:
            t0, run0 = graph_decode(model, 1)
            r["graph_decode_nopdl_ms"] = round(t0 * 1e3, 3)
            r["graph_nopdl_breakdown_us"] = kernel_breakdown(model, run0)
            log(event="graph_decode", bits=bits, batch=1, pdl=False, ms=r["graph_decode_nopdl_ms"],
                breakdown=r["graph_nopdl_breakdown_us"])
            del run0
        finally:
            ck.PDL = True
            release(model)
    if bits == 8:
        tl_, run_l = graph_decode(model, 1, prompt_len=1500, steps=128)
        r["graph_decode_long_ms"] = round(tl_ * 1e3, 3)
        r["graph_long_breakdown_us"] = kernel_breakdown(model, run_l)
        log(event="graph_decode", bits=bits, batch=1, context="1501-1628", ms=r["graph_decode_long_ms"],
            breakdown=r["graph_long_breakdown_us"])
        del run_l
        release(model)
    r["graph_sample_ms"] = round(graph_sampling_decode(model) * 1e3, 3)
    log(event="graph_sample", bits=bits, ms=r["graph_sample_ms"])
    t16, run16 = graph_decode(model, 16)
    r["graph_b16_ms"] = round(t16 * 1e3, 3)
    r["graph_b16_tok_s"] = round(16 / t16, 1)
    r["graph_b16_breakdown_us"] = kernel_breakdown(model, run16)
    log(event="graph_decode", bits=bits, batch=16, ms=r["graph_b16_ms"], tok_s=r["graph_b16_tok_s"],
        breakdown=r["graph_b16_breakdown_us"])
    del run, run16
    end_to_end(model, 1, 32, 256)  # capture this bucket's graph outside the timing
    dt, path = end_to_end(model, 1, 32, 256)
    r["graph_e2e_tok_s"] = round(256 / dt, 1)
    log(event="graph_e2e", bits=bits, tok_s=r["graph_e2e_tok_s"], path=path)
    r["graph_prefill_ms"] = round(prefill_time(model, "graph") * 1e3, 2)
    r["graph_prefill_host_ms"] = round(prefill_host_ms(model), 2)
    log(event="prefill", bits=bits, variant="graph", ms=r["graph_prefill_ms"], host_ms=r["graph_prefill_host_ms"])
    release(model)
    # eager paths (no graph)
    variants = ["eager", "torch"] if bits != 16 else ["eager"]
    for v in variants:
        with Path_(model, v):
            r[f"{v}_decode_ms"] = round(eager_decode(model, 1) * 1e3, 3)
            log(event="eager_decode", bits=bits, variant=v, batch=1, ms=r[f"{v}_decode_ms"])
            r[f"{v}_b16_tok_s"] = round(16 / eager_decode(model, 16, new_tokens=8), 1)
            log(event="eager_decode", bits=bits, variant=v, batch=16, tok_s=r[f"{v}_b16_tok_s"])
            r[f"{v}_prefill_ms"] = round(prefill_time(model, v) * 1e3, 2)
            log(event="prefill", bits=bits, variant=v, ms=r[f"{v}_prefill_ms"])
            torch.cuda.empty_cache()
    release(model)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def table(results, bw, env):
    i8, i4, f16 = results.get("INT8", {}), results.get("INT4", {}), results.get("FP16", {})

    def g(d, k, fmt="{:.2f}"):
        v = d.get(k)
        return "—" if v is None else fmt.format(v)

    def ratio(a, b):
        return "—" if not a or not b else f"{a / b:.2f}×"

    lines = [
        f"Device: **{env['device']}**, {env['date']}; torch {env['torch']}, Triton {env['triton']}, "
        f"transformers {env['transformers']}.",
        f"Measured bandwidth: device-to-device copy **{bw['copy_gbs']:.0f} GB/s** (bytes read + written), "
        f"read-only stream **{bw['read_gbs']:.0f} GB/s**.",
        "",
        "| figure | goal | INT8 (graph) | INT4 (graph) | FP16 (graph) | INT8 eager, Triton kernels | INT8 eager, torch dequant | INT4 eager, torch dequant | FP16 eager |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| batch-1 decode, ms/token (context 33–160) | INT8 ≤ 2.8, INT4 ≤ 1.6 | **{g(i8, 'graph_decode_ms', '{:.3f}')}** | "
        f"**{g(i4, 'graph_decode_ms', '{:.3f}')}** | {g(f16, 'graph_decode_ms', '{:.3f}')} | {g(i8, 'eager_decode_ms')} | "
        f"{g(i8, 'torch_decode_ms')} | {g(i4, 'torch_decode_ms')} | {g(f16, 'eager_decode_ms')} |",
        f"| weight-read floor, ms/token (copy BW / read BW) | | {g(i8, 'floor_ms_copy', '{:.2f}')} / "
        f"{g(i8, 'floor_ms_read', '{:.2f}')} | {g(i4, 'floor_ms_copy', '{:.2f}')} / {g(i4, 'floor_ms_read', '{:.2f}')} | "
        f"{g(f16, 'floor_ms_copy', '{:.2f}')} / {g(f16, 'floor_ms_read', '{:.2f}')} | | | | |",
        f"| decode ÷ floor (copy BW) | ≤ 1.25 | {ratio(i8.get('graph_decode_ms'), i8.get('floor_ms_copy'))} | "
        f"{ratio(i4.get('graph_decode_ms'), i4.get('floor_ms_copy'))} | {ratio(f16.get('graph_decode_ms'), f16.get('floor_ms_copy'))} | | | | |",
        f"| batch-1 decode without programmatic dependent launch, ms/token | | {g(i8, 'graph_decode_nopdl_ms', '{:.3f}')} | "
        f"{g(i4, 'graph_decode_nopdl_ms', '{:.3f}')} | {g(f16, 'graph_decode_nopdl_ms', '{:.3f}')} | | | | |",
        f"| batch-1 decode at context 1501–1628, ms/token | | {g(i8, 'graph_decode_long_ms', '{:.3f}')} | | | | | | |",
        f"| batch-1 decode with chat sampling (T 0.95, top-k 50, top-p 0.7), ms/token | | "
        f"{g(i8, 'graph_sample_ms', '{:.3f}')} | {g(i4, 'graph_sample_ms', '{:.3f}')} | {g(f16, 'graph_sample_ms', '{:.3f}')} | | | | |",
        f"| batch-1 generate() end to end, 32 + 256 tokens, tokens/s | | {g(i8, 'graph_e2e_tok_s', '{:.0f}')} | "
        f"{g(i4, 'graph_e2e_tok_s', '{:.0f}')} | {g(f16, 'graph_e2e_tok_s', '{:.0f}')} | | | | |",
        f"| prefill 1024 tokens, ms | ≤ 30 | **{g(i8, 'graph_prefill_ms')}** | **{g(i4, 'graph_prefill_ms')}** | "
        f"{g(f16, 'graph_prefill_ms')} | {g(i8, 'eager_prefill_ms')} | {g(i8, 'torch_prefill_ms')} | "
        f"{g(i4, 'torch_prefill_ms')} | {g(f16, 'eager_prefill_ms')} |",
        f"| host time to issue that prefill (no sync), ms | | {g(i8, 'graph_prefill_host_ms')} | "
        f"{g(i4, 'graph_prefill_host_ms')} | {g(f16, 'graph_prefill_host_ms')} | | | | |",
        f"| batch-16 decode, tokens/s (context 33–160) | ≥ 4000 | **{g(i8, 'graph_b16_tok_s', '{:.0f}')}** | "
        f"**{g(i4, 'graph_b16_tok_s', '{:.0f}')}** | {g(f16, 'graph_b16_tok_s', '{:.0f}')} | "
        f"{g(i8, 'eager_b16_tok_s', '{:.0f}')} | {g(i8, 'torch_b16_tok_s', '{:.0f}')} | "
        f"{g(i4, 'torch_b16_tok_s', '{:.0f}')} | {g(f16, 'eager_b16_tok_s', '{:.0f}')} |",
    ]
    mem = i8.get("memory_2048", {})
    if mem:
        gm, em = mem.get("graph", {}), mem.get("eager", {})
        lines.append(f"| INT8 peak GPU memory, 2048-token context, GiB (allocated / reserved) | ≤ 7.5 | "
                     f"**{gm.get('peak_alloc_gib')} / {gm.get('peak_reserved_gib')}** | | | "
                     f"{em.get('peak_alloc_gib')} / {em.get('peak_reserved_gib')} | | | |")
    lines += [
        "",
        "Speed-ups of the graph path: " + "; ".join(
            f"{k} decode {ratio(d.get('torch_decode_ms') or d.get('eager_decode_ms'), d.get('graph_decode_ms'))} "
            f"vs {'torch dequant' if d.get('torch_decode_ms') else 'eager'}, "
            f"{ratio(d.get('eager_decode_ms'), d.get('graph_decode_ms'))} vs eager with the same kernels"
            for k, d in (("INT8", i8), ("INT4", i4), ("FP16", f16)) if d) + ".",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--bits", default="8,4,16")
    ap.add_argument("--no-sweep", action="store_true",
                    help="keep fast_decode's attention / LayerNorm settings (chosen in the decode graph, with PDL)")
    ap.add_argument("--sweep-linear", default=None, metavar="BITS:BATCH[,...]",
                    help="only choose the linear-kernel configs per layer shape in the decode graph for these "
                         "(weights, batch) pairs, e.g. 8:1,4:1,8:16 (no table)")
    ap.add_argument("--sweep-attention", action="store_true",
                    help="only sweep the decode-attention settings and time the choice against the current "
                         "ones in the INT8 decode graph (no table)")
    ap.add_argument("--sweep-mma", default=None, metavar="BITS[,...]",
                    help="only choose the tensor-core GEMV configs (cuda_mma.py) and PDL mode at batch 1 in the "
                         "decode graph for these weights, e.g. 4,8; with a per-shape micro-benchmark (no table)")
    ap.add_argument("--sweep-preload", default=None, metavar="BITS[,...]",
                    help="only time, at batch 1 in the decode graph, the linears after small kernels launched early "
                         "with their whole K range loaded before the PDL wait, against today's (no table)")
    ap.add_argument("--mid-batches", default=None, metavar="BATCH[,...]",
                    help="only time the decode step at these batches of 17-64 rows for --bits (8 and 4), "
                         "current 17..64-row linear configs against the former ones (no table)")
    ap.add_argument("--wide-batches", default=None, metavar="BATCH[,...]",
                    help="only time the decode step at these batches of 65-256 rows for --bits (8 and 4), the "
                         "current plan against dequantize + cuBLAS everywhere and WIDE_CANDIDATES (no table)")
    ap.add_argument("--screen-ab", default=None, metavar="BITS[,...]",
                    help="only time the batch-1 greedy decode graph with the screened LM head against the fp16 "
                         "head (alternating), and the screen alone on the model's head (no table)")
    ap.add_argument("--attention-ab", default=None, metavar="BITS[,...]",
                    help="batch-1 decode-attention variants (keys / values loaded before the PDL wait, splits that "
                         "follow the context) in the whole decode graph, alternating, short and long contexts, with "
                         "the critical-path timeline (no table)")
    ap.add_argument("--pdl-ab", default=None, metavar="BITS[,...]",
                    help="batch-1 decode: which linears launch early and which trigger the next kernel late, "
                         "alternating, with the critical-path timeline; batch 16 with / without PRE (no table)")
    ap.add_argument("--quick", action="store_true", help="with --pdl-ab: the step times only")
    ap.add_argument("--sampling-profile", default=None, metavar="BITS[,...]",
                    help="greedy vs chat-default sampling per step, and where sampling's time goes")
    ap.add_argument("--no-candidates", action="store_true",
                    help="with --wide-batches: only the current plan and the former one")
    args = ap.parse_args()
    os.environ.setdefault("CHATGLM_CUDA_STRICT", "1")
    triton = importlib.import_module("triton")
    import transformers
    env = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
               triton=triton.__version__, transformers=transformers.__version__)
    log(event="env", **env)
    copy_gbs, read_gbs = bandwidth()
    bw = dict(copy_gbs=copy_gbs, read_gbs=read_gbs)
    log(event="bandwidth", **bw)
    results = {}
    if args.sweep_attention:
        best = sweep_attention()
        log(event="sweep_choice", attention=best)
        confirm = confirm_attention(best)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(env=env, bandwidth=bw, choice=best, confirm=confirm, log=LOG),
                                                  indent=1))
        return
    per_bits = (("attention_ab", args.attention_ab, attention_ab), ("pdl_ab", args.pdl_ab,
                lambda b: pdl_ab(b, quick=args.quick)), ("sampling", args.sampling_profile, sampling_profile))
    for name, value, fn in per_bits:  # one study per weight type, the JSON rewritten after each
        if value:
            got = []
            for b in value.split(","):
                got.append(fn(int(b)))
                if args.json:
                    Path(args.json).write_text(json.dumps({"env": env, "bandwidth": bw, name: got, "log": LOG}, indent=1))
            return
    if args.screen_ab:
        got = [screen_ab(int(b)) for b in args.screen_ab.split(",")]
        if args.json:
            Path(args.json).write_text(json.dumps(dict(env=env, bandwidth=bw, screen_ab=got, log=LOG), indent=1))
        return
    if args.mid_batches:
        bits = [int(b) for b in args.bits.split(",") if int(b) in (4, 8)]
        got = mid_batches(bits, [int(b) for b in args.mid_batches.split(",")])
        if args.json:
            Path(args.json).write_text(json.dumps(dict(env=env, bandwidth=bw, mid_batches=got, log=LOG), indent=1))
        return
    if args.wide_batches:
        bits = [int(b) for b in args.bits.split(",") if int(b) in (4, 8)]
        got = wide_batches(bits, [int(b) for b in args.wide_batches.split(",")],
                           candidates={} if args.no_candidates else None)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(env=env, bandwidth=bw, wide_batches=got, log=LOG), indent=1))
        return
    if args.sweep_mma or args.sweep_linear or args.sweep_preload:
        if args.sweep_preload:
            choice = {b: sweep_preload(int(b)) for b in args.sweep_preload.split(",")}
        elif args.sweep_mma:
            choice = {b: sweep_mma(int(b)) for b in args.sweep_mma.split(",")}
        else:
            choice = {pair: sweep_linear(*(int(v) for v in pair.split(":"))) for pair in args.sweep_linear.split(",")}
        if args.json:
            Path(args.json).write_text(json.dumps(dict(env=env, bandwidth=bw, choice=choice, log=LOG), indent=1))
        return
    if not args.no_sweep:
        try:
            best = sweep_attention()
            fd.ATTN_CFG.update(best)
            ln = sweep_layernorm()
            log(event="sweep_choice", attention=best, layernorm_warps=ln)
            results["sweep_choice"] = dict(attention=best, layernorm_warps=ln)
        except Exception as exc:
            import traceback
            traceback.print_exc()
            log(event="error", where="sweep", error=f"{type(exc).__name__}: {exc}")
    for bits in [int(b) for b in args.bits.split(",")]:
        try:
            bench_variant(bits, results, bw)
        except Exception as exc:  # report and go on with the next variant
            import traceback
            traceback.print_exc()
            log(event="error", bits=bits, error=f"{type(exc).__name__}: {exc}")
            gc.collect()
            torch.cuda.empty_cache()
    md = table(results, bw, env)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(env=env, bandwidth=bw, results=results, log=LOG), indent=1))
    if args.md:
        Path(args.md).write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
