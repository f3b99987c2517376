"""The screened LM head (fast_decode.ScreenHead): the greedy token of a decode step picked from an
INT8 copy of the head plus a per-row error bound, with exact logits only for the rows the bound
cannot rule out. What must hold, and is checked here against float64 and the whole head:

* the bound: every row's exact logit (as the whole-head kernel computes and rounds it) lies within
  [l - E, l + E] of the INT8 estimate, so the rows it rules out (hi < T = max lo) are below the winner;
* the token is the whole head's argmax computed by the same kernel, ties to the first index;
* a step the screen cannot decide (a non-finite value, a possible fp16 overflow, too many
  candidates in one block) goes to the whole head: same token, and the InvalidScore flag as there;
* the copy is what its definition says (q = round(w / s), s = max|w| / 127, rn >= ||w - s q||_2).

The kernels run in Triton's CPU interpreter (a child process: the interpreter is chosen at import),
so CI checks the values on every commit; on a GPU the compiled kernels are checked by
tests/test_cuda_model.py (marked cuda). The screen kernel's INT8 main loop there is the batch-1
GEMV's (inline PTX, which the interpreter cannot run); here its plain-Triton twin computes the same
sums.
"""
import types

import pytest
import torch

from conftest import ROOT, run_child

CHILD = r"""
import json, os, sys, types
os.environ["TRITON_INTERPRET"] = "1"
pkg = types.ModuleType("chatglm6b"); pkg.__path__ = [sys.argv[1]]; sys.modules["chatglm6b"] = pkg
import torch
from chatglm6b import fast_decode as fd

def token(key):
    return 0x7FFFFFFF - (int(key) & 0xFFFFFFFF)

def run(w, x, check=True):
    head = fd.ScreenHead(w)
    xf = x.float()
    norms = torch.stack([(xf * xf).sum(), xf.abs().sum()]).view(1, 2)
    key = torch.full((1,), fd._KEY_EMPTY, dtype=torch.long)
    flag = torch.zeros(1, dtype=torch.int32)
    scr = torch.tensor([-(1 << 31), 0], dtype=torch.int32)
    hi = torch.full((w.shape[0],), float("nan"))
    head.pick(x, w, key, flag, scr, hi, norms, check=check)
    tk = int(scr[0]) ^ 0x7FFFFFFF if int(scr[0]) < 0 else int(scr[0])
    T = torch.tensor([tk], dtype=torch.int32).view(torch.float32).item()
    # the whole head by the same kernel: logits, and its own greedy key / flag
    wkey = torch.full((1,), fd._KEY_EMPTY, dtype=torch.long)
    wflag = torch.zeros(1, dtype=torch.int32)
    y = fd.head_logits(x, w, wkey, wflag).float().squeeze(0)
    ref = (w.double() @ x.double().T).squeeze(1)
    lo = (head.s.double() * (head.q.double() @ x.double().T).squeeze(1))  # the estimate (float64)
    top2 = ref.topk(2).values
    finite = bool(torch.isfinite(y).all())
    out = dict(token=token(key), whole=token(wkey), torch_argmax=int(y.argmax()), ref_argmax=int(ref.argmax()),
               ref_margin=float(top2[0] - top2[1]), fallback=int(scr[1]), flag=int(flag[0]), whole_flag=int(wflag[0]),
               candidates=int((hi >= T).sum()) if finite else -1, finite=finite)
    if finite and not out["fallback"]:
        out["upper_bound_holds"] = bool((hi.double() >= y.double()).all())
        out["threshold_below_winner"] = T <= float(y[out["token"]])
        out["ruled_out_below_winner"] = bool((y[hi < T] < y[out["token"]]).all())
        e = hi.double() - lo
        out["bound_holds"] = bool(((y.double() - lo).abs() <= e).all())
        out["bound_slack_min"] = float((e - (y.double() - lo).abs()).min())
    # relative error of the output rounding: half an ulp; bf16 a whole one here (Triton 3.9's CPU interpreter
    # truncates fp32 -> bf16; the GPU rounds to nearest; the screen's bound allows a whole ulp either way)
    half_ulp = 2.0 ** -(fd._MANTISSA[w.dtype] + (w.dtype != torch.bfloat16))
    summed = 2.5 * w.shape[1] * 2.0 ** -24 * (w.double().abs() @ x.double().abs().T).squeeze(1)
    out["head_err_ok"] = bool(((y.double() - ref).abs() <= half_ulp * ref.abs() * 1.0001 + 2.0 ** -25
                               + summed).all()) if finite else None
    return out

def run_topk(w, x, k, hist=False):
    head = fd.ScreenHead(w)
    xf = x.float()
    norms = torch.stack([(xf * xf).sum(), xf.abs().sum()]).view(1, 2)
    scr = torch.tensor([-(1 << 31), 0, 0], dtype=torch.int32)
    V = w.shape[0]
    hi, lo = torch.full((V,), float("nan")), torch.full((V,), float("nan"))
    y = torch.full((1, V), 7.0, dtype=w.dtype)
    # hist: the threshold from radix counts of the lower bounds (the fused sampler's work buffer)
    work = torch.zeros(1, fd._SAMPLE_WORK, dtype=torch.int32)[:, fd._SAMPLE_SCREEN:] if hist else None
    head.pick(x, w, None, None, scr, hi, norms, top_k=k, lo=lo, y=y, work=work)
    full = fd.head_logits(x, w)
    kth = full.float().topk(k).values[0, -1]
    kept = full.float() >= kth
    fill = torch.finfo(w.dtype).min
    same = (y == full) | (y == fill) | (torch.isnan(y) & torch.isnan(full))
    key = ("sample", True, k, True)
    inv, cut = torch.tensor([1 / 0.95]), torch.tensor([0.3])
    wy, wf = fd.warp(y.float(), key, inv, cut), fd.warp(full.float(), key, inv, cut)
    return dict(fallback=int(scr[1]), candidates=int((y != fill).sum()), kept=int(kept.sum()),
                all_exact_or_fill=bool(same.all()), kept_exact=bool(torch.equal(y[kept], full[kept])),
                warped_equal=bool(torch.equal(wy, wf)) if bool(torch.isfinite(full).all()) else None,
                whole=bool(torch.equal(y, full) or bool(torch.isnan(full).all())))

res = {}
g = torch.Generator().manual_seed(0)
V, K = 1200, 64
w = (torch.randn(V, K, generator=g) * 0.05).half()
x = torch.randn(1, K, generator=g).half()
res["plain"] = base = run(w, x)
tok = base["token"]
w2 = w.clone(); w2[3] = w[tok]
res["tie_earlier"] = run(w2, x)
w2 = w.clone(); w2[V - 1] = w[tok]
res["tie_later"] = run(w2, x)
w2 = w.clone(); w2[200:212] = w[tok]
res["tie_dozen"] = run(w2, x)  # 13 equal best rows in one block: two tiles of candidates
w2 = w.clone(); w2[100:140] = w[tok]
res["crowded"] = run(w2, x)  # 40 equal best rows in one candidate block: the whole head decides
res["overflow"] = run((w.float() * 20).half(), (x.float() * 3000).half())  # logits past 65504
xn = x.clone(); xn[0, 5] = float("nan")
res["nan"] = run(w, xn)
res["bf16"] = run(w.bfloat16(), x.bfloat16())
w3 = (torch.randn(600, 1100, generator=g) * 0.03).half()
res["multi_tile"] = run(w3, torch.randn(1, 1100, generator=g).half())
# sampling from the top k: exact logits where they can make the top k, the lowest finite value elsewhere
res["topk5"] = run_topk(w, x, 5)
res["topk50"] = run_topk(w, x, 50)
res["topk50_bf16"] = run_topk(w.bfloat16(), x.bfloat16(), 50)
w2 = w.clone(); w2[100:240] = w[tok]
res["topk_crowded"] = run_topk(w2, x, 5)  # 140 candidates in one block: the whole head writes every logit
res["topk_nan"] = run_topk(w, xn, 5)
for name, args in (("topk5", (w, x, 5)), ("topk50", (w, x, 50)), ("topk50_bf16", (w.bfloat16(), x.bfloat16(), 50)),
                   ("topk_crowded", (w2, x, 5))):
    res[name + "_hist"] = run_topk(*args, hist=True)
# the INT8 copy itself (a zero row included)
w4 = w.clone(); w4[7] = 0
h = fd.ScreenHead(w4)
wd = w4.double()
mx = wd.abs().amax(1)
s = (mx / 127).float()
q = torch.round(wd / torch.where(s > 0, s.double(), 1.0)[:, None]).clamp(-127, 127)
rn = torch.linalg.vector_norm(wd - q * s.double()[:, None], dim=1)
res["copy"] = dict(q_equal=bool(torch.equal(h.q, q.to(torch.int8))), s_equal=bool(torch.equal(h.s, s)),
                   mx_equal=bool(torch.equal(h.mx, mx.float())), rn_covers=bool((h.rn.double() >= rn).all()),
                   rn_tight=bool((h.rn.double() <= rn * (1 + 3e-6) + 1e-30).all()),
                   zero_row=[float(h.s[7]), int(h.q[7].abs().sum()), float(h.rn[7])])
# the bookkeeping kernel after a screened step: the token from the key, threshold and flag reset, an
# undecided step counted
from types import SimpleNamespace as NS
slot = NS(pick_key=torch.tensor([(5 << 32) | (0x7FFFFFFF - 9)], dtype=torch.long), pick_flag=torch.zeros(1, dtype=torch.int32),
          unfinished=torch.ones(1, dtype=torch.bool), eos=torch.full((fd.MAX_EOS,), -1), pad_id=torch.zeros(1, dtype=torch.long),
          ids=torch.zeros(1, 65, dtype=torch.long), tok=torch.zeros(1, dtype=torch.long), pos=torch.zeros(1, 2, dtype=torch.long),
          cache=NS(pos=torch.zeros(1, dtype=torch.int32)), alive=torch.ones(1, dtype=torch.bool),
          gen_len=torch.zeros(1, dtype=torch.long), batch=1, scr=torch.tensor([12345, 1, 4], dtype=torch.int32))
fd._bookkeep(slot, 1, screen=True)
after_undecided, first_token = slot.scr.tolist(), int(slot.tok[0])
slot.scr[0] = 777
fd._bookkeep(slot, 1, screen=True)
res["bookkeep"] = dict(token=first_token, after_undecided=after_undecided, after_decided=slot.scr.tolist())
print("RESULT " + json.dumps(res))
"""


@pytest.fixture(scope="module")
def res():
    return run_child(CHILD, ROOT, timeout=900)


def _decided_by_screen(r):
    assert r["fallback"] == 0, r
    assert r["upper_bound_holds"] and r["bound_holds"] and r["threshold_below_winner"] and r["ruled_out_below_winner"], r
    assert r["bound_slack_min"] > 0, r


@pytest.mark.parametrize("case", ["plain", "bf16", "multi_tile"])
def test_screen_decides_with_a_bound_that_holds(res, case):
    r = res[case]
    _decided_by_screen(r)
    assert r["token"] == r["whole"] == r["torch_argmax"], r  # the same token as the whole head
    if r["ref_margin"] > 1e-2:  # far from a tie: also float64's argmax
        assert r["token"] == r["ref_argmax"], r
    assert 1 <= r["candidates"] <= 32, r  # only a few rows needed their exact logit
    assert r["flag"] == 0 and r["whole_flag"] == 0, r


@pytest.mark.parametrize("case", ["plain", "bf16", "multi_tile"])
def test_whole_head_kernel_matches_float64(res, case):
    """Logits of the kernel the screen falls back to: float64 within the fp16 / bf16 output rounding
    plus the fp32 summation bound (K u sum |w x|)."""
    assert res[case]["head_err_ok"], res[case]


def test_ties_go_to_the_first_index(res):
    base = res["plain"]["token"]
    assert base > 3
    early, late = res["tie_earlier"], res["tie_later"]
    _decided_by_screen(early)
    _decided_by_screen(late)
    assert early["token"] == early["whole"] == early["torch_argmax"] == 3
    assert late["token"] == late["whole"] == late["torch_argmax"] == base
    dozen = res["tie_dozen"]
    _decided_by_screen(dozen)
    assert 13 <= dozen["candidates"] <= 32
    assert dozen["token"] == dozen["whole"] == dozen["torch_argmax"] == min(200, base)


@pytest.mark.parametrize("case,want_flag", [("crowded", 0), ("overflow", 1), ("nan", 1)])
def test_undecided_steps_run_the_whole_head(res, case, want_flag):
    """Too many candidates in a block, a logit that may overflow fp16, a NaN: the whole head runs and
    gives its token (torch.argmax's: inf wins, the first NaN wins) and the InvalidScore flag."""
    r = res[case]
    assert r["fallback"] == 1, r
    assert r["token"] == r["whole"] == r["torch_argmax"], r
    assert r["flag"] == r["whole_flag"] == want_flag, r
    if case == "crowded":
        assert r["token"] == 100, r
    if case == "nan":
        assert r["token"] == 0, r
    if case == "overflow":
        assert not r["finite"], r


@pytest.mark.parametrize("case", ["topk5", "topk50", "topk50_bf16", "topk5_hist", "topk50_hist", "topk50_bf16_hist"])
def test_top_k_sampling_sees_the_whole_heads_top_k(res, case):
    """Sampling steps: every logit that can make the top k (ties at the k-th included) is the whole head's,
    the rest hold the lowest finite value, so temperature / top-k / top-p give the same distribution. (_hist:
    the threshold from the radix counts, rounded down to 16 bits of its order key, instead of torch.topk.)"""
    r = res[case]
    assert r["fallback"] == 0, r
    assert r["all_exact_or_fill"] and r["kept_exact"] and r["warped_equal"], r
    assert r["kept"] <= r["candidates"] < 1200, r


@pytest.mark.parametrize("case", ["topk_crowded", "topk_nan", "topk_crowded_hist"])
def test_top_k_sampling_undecided_writes_the_whole_head(res, case):
    r = res[case]
    assert r["fallback"] == 1 and r["whole"], r


def test_the_int8_copy_is_what_it_says(res):
    c = res["copy"]
    assert c["q_equal"] and c["s_equal"] and c["mx_equal"], c
    assert c["rn_covers"] and c["rn_tight"], c
    assert c["zero_row"] == [0.0, 0, 0.0], c


def test_bookkeeping_resets_the_screen_and_counts_undecided_steps(res):
    b = res["bookkeep"]
    assert b["token"] == 9
    assert b["after_undecided"] == [-(1 << 31), 0, 5] and b["after_decided"] == [-(1 << 31), 0, 5], b


# ------------------------------------------------------------------------------------------------
# When the screen runs, and keeping its copy current (no kernels: plain torch on the CPU)

def _fd():
    from chatglm6b import fast_decode as fd
    return fd


@pytest.mark.parametrize("value,want", [(None, "auto"), ("auto", "auto"), ("1", True), (True, True), ("off", False),
                                        (False, False), ("0", False)])
def test_screen_setting(value, want, monkeypatch):
    fd = _fd()
    monkeypatch.setattr(fd, "SCREEN_HEAD", "auto")
    model = types.SimpleNamespace(config=types.SimpleNamespace(screen_lm_head=value))
    assert fd._screen_setting(model) == want


def test_screen_setting_rejects_nonsense(monkeypatch):
    fd = _fd()
    monkeypatch.setattr(fd, "SCREEN_HEAD", "maybe")
    with pytest.raises(ValueError, match="must be auto, 1 or 0"):
        fd._screen_setting(types.SimpleNamespace(config=types.SimpleNamespace()))


class _FakeState:
    def __init__(self, kind, w):
        self.weight_kind, self.dtype, self.device = kind, w.dtype, w.device
        self.screen = None
        self.dropped = 0
        self.screen_steps = self.screen_undecided = 0
        self.screen_off = False

    def drop_screen(self):
        self.dropped += 1
        self.screen = None


@pytest.mark.parametrize("kind,setting,want", [(4, None, True), (8, None, False), (16, None, False), (8, True, True),
                                               (4, False, False)])
def test_auto_screens_int4_only(kind, setting, want, monkeypatch):
    fd = _fd()
    monkeypatch.setattr(fd, "SCREEN_HEAD", "auto")
    w = torch.nn.Parameter(torch.randn(40, 8).half(), requires_grad=False)
    model = types.SimpleNamespace(config=types.SimpleNamespace(screen_lm_head=setting),
                                  lm_head=types.SimpleNamespace(weight=w))
    st = _FakeState(kind, w)
    fd._refresh_screen(model, st)
    assert (st.screen is not None) is want


def test_copy_follows_in_place_changes_and_is_dropped_when_switched_off(monkeypatch):
    fd = _fd()
    w = torch.nn.Parameter(torch.randn(40, 8).half(), requires_grad=False)
    cfg = types.SimpleNamespace(screen_lm_head=True)
    model = types.SimpleNamespace(config=cfg, lm_head=types.SimpleNamespace(weight=w))
    st = _FakeState(8, w)
    fd._refresh_screen(model, st)
    head = st.screen
    ptr, q0 = head.q.data_ptr(), head.q.clone()
    fd._refresh_screen(model, st)
    assert st.screen is head and torch.equal(head.q, q0)  # nothing changed: nothing recomputed
    with torch.no_grad():
        w.mul_(-1)  # in place (the version counter moves): the copy is refilled in its own buffers
    fd._refresh_screen(model, st)
    assert st.screen is head and head.q.data_ptr() == ptr and torch.equal(head.q, -q0)
    cfg.screen_lm_head = False
    fd._refresh_screen(model, st)
    assert st.screen is None and st.dropped == 1


@pytest.mark.parametrize("setting,undecided,off", [(None, 10, False), (None, 40, True), (True, 40, False)])
def test_auto_gives_up_where_the_screen_rarely_decides(setting, undecided, off, monkeypatch):
    """"auto" stops screening a model once more than a quarter of >= 64 screened steps ran the whole head
    (those steps cost the screen and the whole head): with a warning, and for that model only; "1" keeps it."""
    import warnings

    fd = _fd()
    monkeypatch.setattr(fd, "SCREEN_HEAD", "auto")
    w = torch.nn.Parameter(torch.randn(40, 8).half(), requires_grad=False)
    model = types.SimpleNamespace(config=types.SimpleNamespace(screen_lm_head=setting),
                                  lm_head=types.SimpleNamespace(weight=w), _fast_decode_decision={"path": "graph"})
    st = _FakeState(4, w)
    fd._refresh_screen(model, st)
    run = types.SimpleNamespace(screened=True, produced=101, slot=types.SimpleNamespace(scr=torch.tensor([0, 0, undecided])))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fd._screen_account(model, st, run)
    assert model._fast_decode_decision["screen"] == f"{undecided} of 100 screened steps ran the whole head"
    assert st.screen_off is off and (st.screen is None) is off
    assert any("screened LM head could not decide" in str(c.message) for c in caught) is off
    fd._refresh_screen(model, st)
    assert (st.screen is None) is off  # not rebuilt once given up
