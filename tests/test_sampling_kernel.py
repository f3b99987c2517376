"""The fused sampler (fast_decode.sample_tokens) in Triton's CPU interpreter, against transformers'
own warpers: TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper followed by softmax give the
distribution a token must be drawn from; the kernel turns a uniform number u into a token by walking the
kept tokens in a fixed order (those above the k-th value by index, then the tied ones at the k-th value
by index). So for every kept token (24 per case where more are kept: the first, the last and a random
rest; the interpreter runs one program per u), u at the middle of its interval in that order (float64
cumulative of transformers' probabilities), and just inside both ends of every interval wider than 1e-3,
must give that token: the intervals are the probabilities, and no token outside the kept set can come out.

Ties: transformers' top-p sorts ascending and drops, among equal values, whichever its sort puts first;
the kernel keeps the order of a stable sort (CUDA's), dropping the lowest indices first. So the number
of kept tokens of each value must equal transformers', and which of the tied ones are kept follows the
stable order (the CPU sort is not stable, so the indices themselves are compared only without ties).

Also: NaN / inf rows set the flag (1 with InvalidScoreLogitsProcessor, which the bookkeeping kernel
turns into token 5 for every row; 2 without, which the generation raises on), -inf alone without the
processor samples normally, bf16 logits, -0.0 tied with +0.0, a whole row of equal values, k = 1, k = 256,
and the full vocabulary size with the chat defaults.
"""
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, run_child

from chatglm6b import fast_decode as fd

CHILD = r"""
import json, os, sys, types
os.environ["TRITON_INTERPRET"] = "1"
pkg = types.ModuleType("chatglm6b"); pkg.__path__ = [sys.argv[1]]; sys.modules["chatglm6b"] = pkg
import torch
from chatglm6b import fast_decode as fd
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)


def reference(x, T, k, p):
    procs = LogitsProcessorList()
    if T != 1.0:
        procs.append(TemperatureLogitsWarper(T))
    procs.append(TopKLogitsWarper(k))
    if p < 1.0:
        procs.append(TopPLogitsWarper(p))
    return procs(None, x.float()[None].clone()).softmax(-1)[0].double()


def params(T, k, p):
    key = ("sample", T != 1.0, k, p < 1.0, True)
    inv = torch.tensor([(torch.tensor(1.0) / torch.tensor(T, dtype=torch.float32)).item()])
    return key, inv, torch.tensor([1.0 - p])


failures, checked, kept_total, tied_cases = [], 0, 0, 0


def check(name, x, T, k, p, limit=24):
    global checked, kept_total, tied_cases
    V = x.numel()
    probs = reference(x, T, k, p)
    kth = torch.topk(x.float(), k).values[-1]
    kept = [int(i) for i in torch.nonzero(probs > 0).flatten()]
    above = [i for i in kept if float(x[i]) > float(kth)]
    tied = sorted(int(i) for i in torch.nonzero(x.float() == kth).flatten())
    kept_tied = [i for i in kept if float(x[i]) == float(kth)]
    # transformers' kept count per value; the kernel's tied ones are the highest indices
    order = sorted(above) + tied[len(tied) - len(kept_tied):]
    q = probs[sorted(above) + kept_tied]
    hi = torch.cumsum(q, 0)
    lo = torch.cat([torch.zeros(1, dtype=torch.float64), hi[:-1]])
    us, want = [], []
    picks = range(len(order))
    if len(order) > limit:  # (the interpreter runs one program per u) the first, the last, a random rest
        g = torch.Generator().manual_seed(len(order))
        picks = sorted({0, len(order) - 1} | set(torch.randperm(len(order), generator=g)[:limit - 2].tolist()))
    for i in picks:
        tok = order[i]
        us.append(float((lo[i] + hi[i]) / 2)); want.append(tok)
        if float(q[i]) > 1e-3:
            us += [float(lo[i]) + 1e-5, float(hi[i]) - 1e-5]; want += [tok, tok]
    us += [0.0, 1.0 - 2 ** -24]; want += [order[0], order[-1]]
    key, inv, cut = params(T, k, p)
    flag = torch.zeros(1, dtype=torch.int32)
    u = torch.tensor(us, dtype=torch.float32)
    work = torch.zeros(len(us), fd._SAMPLE_WORK, dtype=torch.int32)
    got = fd.sample_tokens(x[None].expand(len(us), V), key, False, inv, cut, flag, u=u, work=work).tolist()
    if int(work[:, :515].abs().sum()) + int(work[:, fd._SAMPLE_SCREEN:].abs().sum()) != 0:  # (counts; indices
        # are rewritten)
        failures.append((name, "work buffer counts not left zero"))
    checked += 1
    kept_total += len(order)
    tied_cases += len(kept_tied) > 1
    wrong = [(a, b, uu) for a, b, uu in zip(got, want, us) if a != b]
    if wrong or int(flag) != 0:
        failures.append((name, T, k, p, len(order), int(flag), wrong[:5]))


torch.manual_seed(0)
V = 3000
for trial in range(3):
    x = (torch.randn(V) * 3).half()
    for T, k, p in [(0.95, 50, 0.7), (1.0, 7, 1.0), (0.5, 20, 0.9), (1.3, 1, 0.5), (1.0, 256, 0.95)]:
        check("randn", x, T, k, p)
for trial in range(2):  # a few hundred values: ties everywhere, also at the top-p boundary
    x = (torch.randint(-6, 6, (V,)).float() * 0.5).half()
    for T, k, p in [(0.95, 50, 0.7), (1.0, 7, 1.0), (0.5, 20, 0.9), (1.0, 200, 0.3), (2.0, 256, 0.99)]:
        check("ties", x, T, k, p)
check("all equal", torch.zeros(V).half(), 0.95, 50, 0.7)
check("all equal, no top-p", torch.zeros(V).half(), 1.0, 50, 1.0)
x = torch.randn(V) * 3
x[::7] = float("-inf")
check("-inf, bf16", x.bfloat16(), 0.95, 50, 0.7)
x = torch.full((V,), float("-inf"))
x[:30] = torch.randn(30)
check("fewer finite than k", x.half(), 1.0, 50, 0.9)
x = torch.randn(V) * 3
x[7:2000] = 0.0
x[5] = -0.0
check("+-0 ties, bf16", x.bfloat16(), 1.0, 50, 0.9)
big = (torch.randn(130528) * 2.5).half()
check("full vocabulary", big, 0.95, 50, 0.7, limit=6)

# non-finite rows: the flag (and with the processor, token 5 for every row via the bookkeeping kernel)
flags = {}
for name, val in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
    for proc in (False, True):
        x = (torch.randn(2, V) * 3).half()
        x[1, 17] = val
        key, inv, cut = params(0.95, 50, 0.7)
        flag = torch.zeros(1, dtype=torch.int32)
        out = fd.sample_tokens(x, key, proc, inv, cut, flag, u=torch.tensor([0.5, 0.5]))
        flags[f"{name} proc={proc}"] = int(flag)
        tok = out[0] if proc else out
        if int(flag) == 0 and not 0 <= int(tok[1]) < V:
            failures.append(("token out of range", name, proc, tok.tolist()))

# the bookkeeping kernel with FLAG5 (sample_tokens' (tokens, True)): token 5 for every row when flag is 1
from types import SimpleNamespace
def slot_for(b):
    return SimpleNamespace(batch=b, pick_key=torch.full((b,), fd._KEY_EMPTY, dtype=torch.long),
                           unfinished=torch.ones(b, dtype=torch.bool), eos=torch.full((fd.MAX_EOS,), -1),
                           pad_id=torch.zeros(1, dtype=torch.long), ids=torch.zeros(b, 8, dtype=torch.long),
                           tok=torch.zeros(b, dtype=torch.long), pos=torch.zeros(b, 2, dtype=torch.long),
                           cache=SimpleNamespace(pos=torch.zeros(1, dtype=torch.int32)),
                           alive=torch.ones(1, dtype=torch.bool), gen_len=torch.zeros(1, dtype=torch.long),
                           pick_flag=torch.zeros(1, dtype=torch.int32), scr=None)
book = {}
for f in (0, 1):
    slot = slot_for(3)
    slot.pick_flag.fill_(f)
    fd._bookkeep(slot, (torch.tensor([11, 12, 13]), True))
    book[f] = (slot.ids[:, 1].tolist(), int(slot.pick_flag))
for f in (0, 1):  # greedy keys with the processor (KEYS 2): the same flag, the same token 5
    slot = slot_for(2)
    slot.pick_key.copy_(torch.tensor([(3 << 32) | (0x7FFFFFFF - 21), (3 << 32) | (0x7FFFFFFF - 22)]))
    slot.pick_flag.fill_(f)
    fd._bookkeep(slot, 2)
    book[f"keys{f}"] = (slot.ids[:, 1].tolist(), int(slot.pick_flag))
slot = slot_for(2)
slot.pick_flag.fill_(2)
fd._bookkeep(slot, torch.tensor([11, 12]))
book[2] = (slot.ids[:, 1].tolist(), int(slot.pick_flag))
print("RESULT " + json.dumps(dict(failures=failures[:10], checked=checked, kept=kept_total, tied=tied_cases,
                                  flags=flags, book={str(k): v for k, v in book.items()})))
"""


def test_sampler_draws_from_the_transformers_warpers_distribution():
    got = run_child(CHILD, ROOT, timeout=1200)
    assert got["checked"] == 15 + 10 + 6
    assert got["failures"] == [], got["failures"]
    assert got["kept"] > 1000 and got["tied"] >= 8  # (real intervals, ties at the k-th value and at top-p)
    assert got["flags"] == {"nan proc=False": 2, "nan proc=True": 1, "inf proc=False": 2, "inf proc=True": 1,
                            "-inf proc=False": 0, "-inf proc=True": 1}
    assert got["book"] == {"0": [[11, 12, 13], 0], "1": [[5, 5, 5], 0], "2": [[11, 12], 2],
                           "keys0": [[21, 22], 0], "keys1": [[5, 5], 0]}


def test_nan_scores_without_a_processor_raise_and_the_switches():
    """What the host does with the kernel's flag: without a processor, 2 (NaN / +inf scores) raises with a
    hint (transformers' multinomial fails there too); with the processor, or greedy, or the torch warpers,
    nothing is raised. fused_sampling: top_k 1..SAMPLE_MAX_K and temperature <= SAMPLE_MAX_TEMPERATURE only
    (InvalidScoreLogitsProcessor's 5e4 makes token 5 certain there), and CHATGLM_SAMPLE_KERNEL=0 turns it off."""
    def run(key, processors, flag):
        return SimpleNamespace(key=key, plan=SimpleNamespace(processors=processors),
                               slot=SimpleNamespace(pick_flag=torch.tensor([flag], dtype=torch.int32)))

    fused = ("sample", True, 50, True, True)
    with pytest.raises(RuntimeError, match="InvalidScoreLogitsProcessor"):
        fd._check_scores(run(fused, [], 2))
    with pytest.raises(RuntimeError, match="NaN"):
        fd._check_scores(run(fused, [], 0), flag=2)
    for key, processors, flag in ((fused, [], 0), (fused, [object()], 2), (("greedy",), [], 2),
                                  (("sample", True, 50, True, False), [], 2), (("sample", True, 50, True), [], 2)):
        fd._check_scores(run(key, processors, flag))
    assert fd.fused_sampling(50, 0.95) and fd.fused_sampling(1, 1.0) and fd.fused_sampling(fd.SAMPLE_MAX_K, 100.0)
    assert not fd.fused_sampling(0, 0.95) and not fd.fused_sampling(fd.SAMPLE_MAX_K + 1, 0.95)
    assert not fd.fused_sampling(50, 101.0)
    saved = fd.SAMPLE_KERNEL
    try:
        fd.SAMPLE_KERNEL = False
        assert not fd.fused_sampling(50, 0.95)
    finally:
        fd.SAMPLE_KERNEL = saved
