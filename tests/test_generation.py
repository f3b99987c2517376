"""Hugging Face `generate` on ChatGLM-6B (issue 3): greedy, sampling, beam search, streaming,
scores, stopping criteria, input validation and thread safety.

Oracles: the conformance goldens (greedy ids and fp32 logits of the original code), math on
those logits (which tokens top-k / top-p may sample; a beam's score is its sequence log-prob),
and equivalences (num_beams=1 is greedy, top_k=1 sampling is greedy, threads equal serial runs).
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import model_folder

ATOL = 1e-4
EOS, PAD, GMASK, MASK, SOP = 130005, 3, 130001, 130000, 130004


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("gen"), "int8")


@pytest.fixture(scope="module")
def model(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)


def _prompt(g, i, tag="int8"):
    s = g[f"{tag}.prompt{i}.argmax"].shape[1]
    return g[f"{tag}.prompt{i}.greedy"][:s][None]


def _greedy(g, i, new, tag="int8"):
    """The golden greedy ids: prompt + the first `new` generated tokens (no golden row hits EOS)."""
    s = g[f"{tag}.prompt{i}.argmax"].shape[1]
    return g[f"{tag}.prompt{i}.greedy"][: s + new].tolist()


def _logprob(model, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Sum of log p(token | prefix) over the generated part of each row (up to and with EOS)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq).logits.float(), dim=-1)
    out = []
    for row, lp in zip(seq, logp):
        total = 0.0
        for t in range(prompt_len, seq.shape[1]):
            total += lp[t - 1, row[t]].item()
            if row[t] == EOS:
                assert (row[t + 1:] == PAD).all()
                break
        out.append(total)
    return torch.tensor(out)


# ---------------------------------------------------------------------------------------------
# greedy and lengths

@pytest.mark.parametrize("i", [0, 3])
def test_greedy_with_max_new_tokens_and_max_length(model, golden, i):
    _, g = golden
    ids = _prompt(g, i)
    s = ids.shape[1]
    assert model.generate(ids, max_new_tokens=5, do_sample=False)[0].tolist() == _greedy(g, i, 5)
    assert model.generate(ids, max_length=s + 3, do_sample=False)[0].tolist() == _greedy(g, i, 3)
    assert model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)[0].tolist() == _greedy(g, i, 1)


def test_num_beams_1_is_greedy(model, golden):
    _, g = golden
    out = model.generate(_prompt(g, 2), max_new_tokens=8, num_beams=1, do_sample=False)
    assert out[0].tolist() == _greedy(g, 2, 8)


# ---------------------------------------------------------------------------------------------
# sampling

SAMPLE = dict(do_sample=True, top_p=0.7, top_k=50, temperature=0.95)


def _allowed_first_tokens(last_logits: torch.Tensor, top_k: int, top_p: float, temperature: float, slack=0.01):
    """Tokens that temperature -> top-k -> top-p sampling may pick from these logits (plus a little
    slack at the nucleus edge, since our logits equal the golden ones only within 1e-4)."""
    scaled = last_logits.double() / temperature
    top = scaled.topk(top_k)
    probs = torch.softmax(top.values, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the better tokens
    return set(top.indices[before < top_p + slack].tolist())


def test_sampling_is_seeded_and_draws_from_the_nucleus(model, golden):
    _, g = golden
    for i in (0, 1, 4):
        ids = _prompt(g, i)
        torch.manual_seed(1234)
        a = model.generate(ids, max_new_tokens=6, num_return_sequences=3, **SAMPLE)
        torch.manual_seed(1234)
        b = model.generate(ids, max_new_tokens=6, num_return_sequences=3, **SAMPLE)
        assert torch.equal(a, b)
        assert a.shape == (3, ids.shape[1] + 6)
        assert (a[:, : ids.shape[1]] == ids).all()
        assert ((a >= 0) & (a < model.config.vocab_size)).all()
        allowed = _allowed_first_tokens(g[f"int8.prompt{i}.last"][0], 50, 0.7, 0.95)
        assert set(a[:, ids.shape[1]].tolist()) <= allowed


def test_sampled_tokens_survive_the_warpers(model, golden):
    """With output_scores the scores are the warped ones: every sampled token must have a finite
    score, and top_k=5 leaves at most 5 finite scores per step."""
    _, g = golden
    ids = _prompt(g, 3)
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9, temperature=0.7,
                         return_dict_in_generate=True, output_scores=True)
    new = out.sequences[0, ids.shape[1]:]
    assert len(out.scores) == len(new) == 6
    for step, token in zip(out.scores, new):
        finite = torch.isfinite(step[0])
        assert finite[token]
        assert 1 <= int(finite.sum()) <= 5


def test_top_k_1_sampling_is_greedy(model, golden):
    _, g = golden
    torch.manual_seed(7)
    out = model.generate(_prompt(g, 4), max_new_tokens=6, do_sample=True, top_k=1, temperature=0.8)
    assert out[0].tolist() == _greedy(g, 4, 6)


# ---------------------------------------------------------------------------------------------
# beam search

@pytest.mark.parametrize("i", [0, 1, 4])
def test_beam_search_scores_are_sequence_log_probs(model, golden, i):
    """length_penalty=0: a beam's score is the sum of its tokens' log-probs, which a plain forward
    pass recomputes; the best beam is at least as likely as the greedy sequence."""
    _, g = golden
    ids = _prompt(g, i)
    s = ids.shape[1]
    out = model.generate(ids, max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False,
                         length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    seqs, scores = out.sequences, out.sequences_scores
    assert seqs.shape[0] == 3 and len({tuple(r.tolist()) for r in seqs}) == 3
    assert (seqs[:, :s] == ids).all()
    torch.testing.assert_close(scores, _logprob(model, seqs, s), atol=1e-3, rtol=0)
    assert (scores[:-1] >= scores[1:]).all()  # best first
    greedy = torch.tensor([_greedy(g, i, 6)])
    assert scores[0].item() >= _logprob(model, greedy, s).item() - 1e-4


def test_batched_beam_search_equals_row_by_row(model, golden, tokenizer):
    meta, _ = golden
    batch = tokenizer(meta["prompts"][:2], padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=False)
    for row, prompt in enumerate(meta["prompts"][:2]):
        single = tokenizer([prompt], return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=5, num_beams=3, do_sample=False)
        assert out[row, -5:].tolist() == alone[0, -5:].tolist()


# ---------------------------------------------------------------------------------------------
# scores, streaming, stopping

def test_return_dict_with_scores(model, golden):
    _, g = golden
    ids = _prompt(g, 1)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
    assert out.sequences[0].tolist() == _greedy(g, 1, 4)
    assert len(out.scores) == 4
    assert all(s.shape == (1, model.config.vocab_size) and s.dtype == torch.float32 for s in out.scores)
    torch.testing.assert_close(out.scores[0], g["int8.prompt1.last"], atol=ATOL, rtol=0)  # raw logits
    assert [s.argmax(-1).item() for s in out.scores] == out.sequences[0, ids.shape[1]:].tolist()


class _IteratorStreamer:
    """transformers' streamer protocol (put / end), for versions without TextIteratorStreamer
    (4.27): the first put is the prompt, then one put per new token; iterate for decoded text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.texts, self.prompt_seen, self.done = tokenizer, [], [], False, threading.Event()
        self.shown = ""

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.ids)
        self.texts.append(text[len(self.shown):])
        self.shown = text

    def end(self):
        self.done.set()

    def __iter__(self):
        self.done.wait(120)
        return iter(self.texts)


def _streamer(tokenizer):
    try:
        from transformers import TextIteratorStreamer
    except ImportError:  # transformers 4.27 has no streamers; generate must still honour the protocol
        return _IteratorStreamer(tokenizer)
    return TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=120)


def test_streamer_text_equals_decoded_new_tokens(model, tokenizer):
    inputs = tokenizer(["你好"], return_tensors="pt")
    streamer = _streamer(tokenizer)
    result = {}

    def run():
        try:
            result["out"] = model.generate(**inputs, max_new_tokens=10, do_sample=False, streamer=streamer)
        except BaseException as e:  # surface it in the test, and unblock the iterator
            result["error"] = e
            streamer.end()

    worker = threading.Thread(target=run)
    worker.start()
    pieces = list(streamer)
    worker.join(120)
    if "error" in result:
        raise result["error"]
    new = result["out"][0, inputs["input_ids"].shape[1]:]
    assert len(new) == 10
    assert "".join(pieces) == tokenizer.decode(new)
    assert len([p for p in pieces if p]) >= 2  # streamed, not one block at the end


def test_custom_stopping_criteria(model, golden):
    from transformers import StoppingCriteria, StoppingCriteriaList

    _, g = golden
    ids = _prompt(g, 2)
    stop_token = _greedy(g, 2, 4)[-1]  # the 4th generated token

    class StopOn(StoppingCriteria):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            return input_ids[:, -1] == stop_token  # one flag per row (5.x); truthy for batch 1 (4.27)

    criteria = StopOn()
    out = model.generate(ids, max_new_tokens=12, do_sample=False, stopping_criteria=StoppingCriteriaList([criteria]))
    assert out[0].tolist() == _greedy(g, 2, 4)
    assert criteria.calls == 4


# ---------------------------------------------------------------------------------------------
# bad input

def test_prompt_longer_than_2048_is_refused(model):
    ids = torch.cat([torch.full((1, 2047), 5), torch.tensor([[GMASK, SOP]])], dim=1)  # 2049 tokens
    with pytest.raises(ValueError, match=r"2049.*2048"):
        model.generate(ids, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"2049.*2048"):
        model(input_ids=ids)


@pytest.mark.parametrize("ids,missing", [
    ([5, 6, 7, SOP], r"\[gMASK\].*\[MASK\]"),
    ([5, 6, 7, GMASK], r"<sop>"),
    ([5, 6, 7, 8], r"<sop>|\[gMASK\]"),
])
def test_prompt_without_mask_or_sop_is_refused(model, ids, missing):
    ids = torch.tensor([ids])
    with pytest.raises(ValueError, match=missing):
        model.generate(ids, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match=missing):
        model(input_ids=ids)


def test_mask_token_alone_is_accepted(model):
    out = model.generate(torch.tensor([[5, MASK, 6, SOP]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 6)


# ---------------------------------------------------------------------------------------------
# threads

def test_concurrent_generate_equals_serial(model, golden):
    _, g = golden
    prompts = [_prompt(g, i) for i in (0, 1, 2, 4)]
    serial = [model.generate(p, max_new_tokens=8, do_sample=False)[0].tolist() for p in prompts]
    assert serial == [_greedy(g, i, 8) for i in (0, 1, 2, 4)]
    for _ in range(2):
        with ThreadPoolExecutor(max_workers=4) as pool:
            threaded = list(pool.map(lambda p: model.generate(p, max_new_tokens=8, do_sample=False)[0].tolist(),
                                     prompts))
        assert threaded == serial


def test_output_attentions_follow_the_mask_and_change_nothing(model, golden):
    """output_attentions (as the original returns them): per layer [b, heads, queries, keys]
    softmax weights. The logits are bit-identical to a forward without them; every row sums to 1;
    the weights are zero exactly where SPEC §5 masks (prefix rows do not see `<sop>` onward, later
    rows are causal) and sum to 1 over what the row may see; a cached step's weights are the last
    row of the full forward's."""
    _, g = golden
    s = g["int8.prompt0.argmax"].shape[1]
    ids = torch.tensor(_greedy(g, 0, 3))[None]  # prompt (ends [gMASK] <sop>) + 3 generated tokens
    ctx = s - 1  # index of <sop>
    n = ids.shape[1]
    with torch.no_grad():
        ref = model(input_ids=ids)
        out = model(input_ids=ids, output_attentions=True)
    assert torch.equal(out.logits, ref.logits)
    cfg = model.config
    assert len(out.attentions) == cfg.num_layers
    for att in out.attentions:
        assert att.shape == (1, cfg.num_attention_heads, n, n)
        assert torch.allclose(att.sum(-1), torch.ones(()), atol=1e-5)
        for i in range(n):
            visible = list(range(ctx)) if i < ctx else list(range(i + 1))
            hidden = [j for j in range(n) if j not in visible]
            assert torch.all(att[0, :, i, hidden] == 0), i
            assert torch.allclose(att[0, :, i, visible].sum(-1), torch.ones(()), atol=1e-5)
    # the same weights from the cache, one token at a time
    with torch.no_grad():
        first = model(input_ids=ids[:, :-1], use_cache=True)
        pos = model.transformer._masks_and_positions(ids, None, None, 1, n, 0, ids.device)[1]
        step = model(input_ids=ids[:, -1:], position_ids=pos[..., -1:], past_key_values=_cache(first),
                     output_attentions=True)
    for full, one in zip(out.attentions, step.attentions):
        assert one.shape == (1, cfg.num_attention_heads, 1, n)
        assert torch.allclose(one[0, :, 0], full[0, :, -1], atol=1e-5)


def _cache(output):
    return output.get("cache", output.get("past_key_values"))  # (the field's name on 5.x / 4.x)


def _generate_golden(model, g, new, **flag):
    """Greedy generate of golden prompt 1 with return_dict_in_generate and `flag`; checks the golden
    tokens; returns (output, prompt length)."""
    ids = _prompt(g, 1)
    out = model.generate(ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True, **flag)
    assert out.sequences[0].tolist() == _greedy(g, 1, new)
    return out, ids.shape[1]


def test_generate_returns_attentions(model, golden):
    """generate(output_attentions=True, return_dict_in_generate=True): the golden greedy tokens, and
    per step one weight tensor per layer over the keys seen so far."""
    out, s = _generate_golden(model, golden[1], 3, output_attentions=True)
    assert len(out.attentions) == 3
    heads, layers = model.config.num_attention_heads, model.config.num_layers
    for t, step in enumerate(out.attentions):
        assert len(step) == layers
        q = s if t == 0 else 1
        assert all(a.shape == (1, heads, q, s + t) for a in step), [a.shape for a in step]
        assert all(torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5) for a in step)


def test_generate_returns_hidden_states(model, golden):
    """generate(output_hidden_states=True, return_dict_in_generate=True): per step the embedding
    output and every block's output (layers + 1 tensors), the last one the final-LayerNorm state."""
    out, s = _generate_golden(model, golden[1], 2, output_hidden_states=True)
    assert len(out.hidden_states) == 2
    with torch.no_grad():
        ref = model(input_ids=out.sequences[:, :s], output_hidden_states=True).hidden_states
    assert len(out.hidden_states[0]) == model.config.num_layers + 1
    for got, want in zip(out.hidden_states[0], ref):
        assert got.shape == (1, s, model.config.hidden_size) and torch.allclose(got, want, atol=1e-5)
    assert all(h.shape[1] == 1 for h in out.hidden_states[1])
