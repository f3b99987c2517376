"""ChatGLMTokenizer: conformance with the reference outputs, the transformers API on 4.27 and 5.x,
chat prompt, robustness and file errors.

Expected values come from /work/shared/conformance (outputs of the original tokenizer) or from the
rules of SPEC §5-§7 re-implemented here in the plainest possible way.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from conftest import CONFORMANCE, ROOT

from chatglm6b.tokenization_chatglm import ChatGLMTokenizer, IceTextModelError, encode_whitespace

# SPEC §6 ids
UNK, PAD, NEWLINE, SPACE = 0, 3, 4, 5
MASK, GMASK, SOP, EOP = 130000, 130001, 130004, 130005
TAB, BLANK2, BLANK80 = 130008, 130009, 130087
N_PIECES, N_ROWS = 130344, 130528

CODE_FILES = ("tokenization_chatglm.py", "ice_text.model", "tokenizer_config.json")
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok():
    return ChatGLMTokenizer(vocab_file=str(ROOT / "ice_text.model"))


@pytest.fixture(scope="module")
def raw_sp():
    return spm.SentencePieceProcessor(model_file=str(ROOT / "ice_text.model"))


@pytest.fixture(scope="module")
def golden_json():
    return json.loads((CONFORMANCE / "golden.json").read_text())


def entry(golden_json, text):
    return next(e for e in golden_json["tokenizer"] if e["text"] == text)


def hub_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hub"
    folder.mkdir()
    for name in CODE_FILES:
        shutil.copy(ROOT / name, folder / name)
    return folder


def load_auto(folder: Path):
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)


# ---------------------------------------------------------------------------------------------------
# Plain re-statements of the SPEC rules, used as oracles
# ---------------------------------------------------------------------------------------------------
def spec_whitespace(text: str) -> str:
    """SPEC §6 literally: \\n, \\t, then runs of spaces replaced from 80 down to 2."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(80, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def spec_mask_and_positions(ids, total):
    """SPEC §5 for one unpadded row, left-padded to ``total``: (mask[total][total], pos[2][total])."""
    pad, size = total - len(ids), len(ids)
    context = ids.index(SOP)
    mask = [[True] * total for _ in range(total)]
    for i in range(size):
        for j in range(size):
            mask[pad + i][pad + j] = not (j <= i or j < context)
    mask_position = ids.index(MASK) if MASK in ids else ids.index(GMASK)
    channel0 = [0] * pad + [k if k < context else mask_position for k in range(size)]
    channel1 = [0] * pad + [0 if k < context else k - context + 1 for k in range(size)]
    return mask, [channel0, channel1]


def spec_prompt(query, history):
    """SPEC §7."""
    if not history:
        return query
    prompt = ""
    for i, (q, r) in enumerate(history):
        prompt += "[Round {}]\n问：{}\n答：{}\n".format(i, q, r)
    return prompt + "[Round {}]\n问：{}\n答：".format(len(history), query)


# ---------------------------------------------------------------------------------------------------
# Conformance
# ---------------------------------------------------------------------------------------------------
def test_golden_tokenizer_entries(tok, golden_json):
    entries = golden_json["tokenizer"]
    assert len(entries) == 43
    for entry in entries:
        text = entry["text"]
        ids = tok(text)["input_ids"]
        assert ids == entry["input_ids"], text
        assert tok.encode(text) == entry["input_ids"], text
        assert tok.convert_ids_to_tokens(ids) == entry["tokens"], text
        assert tok.tokenize(text) + ["[gMASK]", "<sop>"] == entry["tokens"], text
        assert tok.convert_tokens_to_ids(entry["tokens"]) == entry["input_ids"], text
        assert tok.decode(entry["input_ids"]) == entry["decode"], text
        assert tok.decode(entry["input_ids"][:-2]) == entry["decode_no_special"], text


def test_golden_padded_batch(tok, golden):
    meta, tensors = golden
    batch = tok(meta["prompts"][:3], padding=True, return_tensors="pt")
    assert set(batch.keys()) == {"input_ids", "attention_mask", "position_ids"}
    for key in ("input_ids", "attention_mask", "position_ids"):
        expected = tensors[f"batch.{key}"]
        assert batch[key].dtype == expected.dtype, key
        assert torch.equal(batch[key], expected), key


def test_prompts_match_reference_generation_inputs(tok, golden):
    # TAG.promptN.greedy starts with the reference tokenizer's ids of prompt N.
    meta, tensors = golden
    for n, prompt in enumerate(meta["prompts"]):
        length = tensors[f"int8.prompt{n}.argmax"].shape[1]
        expected = tensors[f"int8.prompt{n}.greedy"][:length].tolist()
        assert tok(prompt)["input_ids"] == expected, prompt
        assert tok([prompt], return_tensors="pt")["input_ids"][0].tolist() == expected


def test_auto_tokenizer_from_hub_folder(tmp_path, golden_json):
    tok = load_auto(hub_folder(tmp_path))
    assert type(tok).__name__ == "ChatGLMTokenizer"
    assert isinstance(tok.sp_tokenizer.text_tokenizer.sp, spm.SentencePieceProcessor)
    assert tok.sp_tokenizer.text_tokenizer.sp.get_piece_size() == N_PIECES
    assert tok.padding_side == "left"
    assert tok.gmask_token == "[gMASK]" and tok.gmask_token_id == GMASK
    assert (tok.bos_token_id, tok.eos_token_id, tok.mask_token_id, tok.pad_token_id, tok.unk_token_id) == (
        SOP, EOP, MASK, PAD, UNK)
    assert "[gMASK]" not in tok.all_special_tokens  # it must stay plain text when written in input
    for entry in golden_json["tokenizer"]:
        assert tok(entry["text"])["input_ids"] == entry["input_ids"]
        assert tok.decode(entry["input_ids"]) == entry["decode"]


def test_shipped_tokenizer_config_keeps_official_keys():
    config = json.loads((ROOT / "tokenizer_config.json").read_text())
    official = {
        "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "gmask_token": "[gMASK]",
        "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>", "remove_space": False,
        "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer", "num_image_tokens": 0,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    for key, value in official.items():
        assert config[key] == value, key
    assert isinstance(config["chat_template"], str)


# ---------------------------------------------------------------------------------------------------
# Whitespace rule
# ---------------------------------------------------------------------------------------------------
def test_whitespace_mapping_matches_spec_rule():
    for n in range(0, 330):
        for text in ("a" + " " * n + "b", " " * n, "\t" + " " * n + "\n"):
            assert encode_whitespace(text) == spec_whitespace(text), n


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("ab \t\n")), max_size=300))
def test_whitespace_encoding_matches_spec_pipeline(tok, raw_sp, text):
    # For text without special-token strings: ids = sentencepiece(SPEC whitespace rule(text)).
    assert tok.encode(text, add_special_tokens=False) == raw_sp.encode(spec_whitespace(text))


@FUZZ
@given(st.from_regex(r"[a-z]{1,8}([ \t\n]{1,100}[a-z]{1,8}){0,6}", fullmatch=True))
def test_words_and_whitespace_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------------------------------------------
# transformers surface
# ---------------------------------------------------------------------------------------------------
def test_call_outputs(tok, golden_json):
    ids_a = entry(golden_json, "你好")["input_ids"]
    ids_b = entry(golden_json, "a")["input_ids"]
    assert dict(tok("你好")) == {"input_ids": ids_a}
    assert dict(tok(["你好", "a"])) == {"input_ids": [ids_a, ids_b]}  # no padding: input_ids only
    assert tok("你好", return_tensors="pt")["input_ids"].tolist() == [ids_a]
    assert tok("你好", return_tensors="np")["input_ids"].tolist() == [ids_a]
    assert tok("你好", add_special_tokens=False)["input_ids"] == ids_a[:-2]

    single = tok("你好", padding=True, return_tensors="pt")
    assert single["attention_mask"].shape == (1, 1, 4, 4) and single["attention_mask"].dtype == torch.bool
    assert single["position_ids"].shape == (1, 2, 4)
    mask, positions = spec_mask_and_positions(ids_a, 4)
    assert single["attention_mask"][0, 0].tolist() == mask
    assert single["position_ids"][0].tolist() == positions

    for return_tensors in (None, "np", "pt"):
        batch = tok(["你好", "a"], padding=True, return_tensors=return_tensors)
        assert np.asarray(batch["input_ids"]).tolist() == [ids_a, [PAD] + ids_b]
        assert np.asarray(batch["attention_mask"]).shape == (2, 1, 4, 4)
        assert np.asarray(batch["attention_mask"]).dtype == np.bool_
        for row, ids in enumerate((ids_a, ids_b)):
            mask, positions = spec_mask_and_positions(ids, 4)
            assert np.asarray(batch["attention_mask"])[row, 0].tolist() == mask
            assert np.asarray(batch["position_ids"])[row].tolist() == positions


def test_padding_options_follow_spec(tok, golden_json):
    texts = ["你好", "a [MASK] b", "Hello, world!"]
    rows = [tok(t)["input_ids"] for t in texts]
    assert rows[1] == entry(golden_json, "a [MASK] b")["input_ids"]
    batch = tok(texts, padding="max_length", max_length=11, return_tensors="pt")
    assert batch["input_ids"].shape == (3, 11)
    for row, ids in enumerate(rows):
        assert batch["input_ids"][row].tolist() == [PAD] * (11 - len(ids)) + ids
        mask, positions = spec_mask_and_positions(ids, 11)  # [MASK] wins over [gMASK] in row 1
        assert batch["attention_mask"][row, 0].tolist() == mask
        assert batch["position_ids"][row].tolist() == positions
    assert tok(texts, padding=True, pad_to_multiple_of=8, return_tensors="pt")["input_ids"].shape == (3, 8)
    assert tok(texts, padding=True, pad_to_multiple_of=5, return_tensors="pt")["position_ids"].shape == (3, 2, 10)
    no_mask = tok(texts, padding=True, return_attention_mask=False)
    assert "attention_mask" not in no_mask and "position_ids" in no_mask


def test_pad_as_collator_and_repadding(tok, golden_json):
    prompts = golden_json["prompts"][:3]
    direct = tok(prompts, padding=True, return_tensors="pt")
    collated = tok.pad([tok(p) for p in prompts], return_tensors="pt")
    for key in direct:
        assert torch.equal(direct[key], collated[key]), key
    wider = tok(prompts, padding="max_length", max_length=12, return_tensors="pt")
    repadded = tok.pad(dict(direct), padding="max_length", max_length=12, return_tensors="pt")
    for key in wider:
        assert torch.equal(wider[key], repadded[key]), key


def test_truncation_keeps_gmask_sop(tok, golden_json):
    long_entry = next(e for e in golden_json["tokenizer"] if e["text"].startswith("xxxx"))
    full = long_entry["input_ids"]
    assert len(full) == 41
    for max_length in (3, 10, 40, 41, 50):
        ids = tok(long_entry["text"], max_length=max_length, truncation=True)["input_ids"]
        assert ids == (full if max_length >= len(full) else full[: max_length - 2] + [GMASK, SOP])
    left = ChatGLMTokenizer(vocab_file=str(ROOT / "ice_text.model"), truncation_side="left")
    assert left(long_entry["text"], max_length=10, truncation=True)["input_ids"] == full[-10:]
    batch = tok([long_entry["text"], "你好"], max_length=6, truncation=True, padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [full[:4] + [GMASK, SOP], [PAD, PAD, 5, 74874, GMASK, SOP]]


def test_pairs(tok, golden_json):
    a = entry(golden_json, "你好")["input_ids"][:-2]
    b = entry(golden_json, "Hello, world!")["input_ids"][:-2]
    expected = a + [GMASK, SOP] + b + [EOP]
    assert tok("你好", "Hello, world!")["input_ids"] == expected
    assert tok(["你好"], ["Hello, world!"])["input_ids"] == [expected]
    assert tok.encode("你好", "Hello, world!") == expected
    assert tok.get_special_tokens_mask(a, b) == [0] * len(a) + [1, 1] + [0] * len(b) + [1]
    assert tok.get_special_tokens_mask(expected, already_has_special_tokens=True) == (
        [0] * len(a) + [1, 1] + [0] * len(b) + [1])
    assert tok.num_special_tokens_to_add() == 2 and tok.num_special_tokens_to_add(pair=True) == 3


def test_vocabulary_and_conversions(tok):
    assert tok.vocab_size == N_PIECES and len(tok) == N_PIECES
    vocab = tok.get_vocab()
    assert len(vocab) == N_PIECES
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<n>": 4, "▁": 5, "[MASK]": 130000,
                "[gMASK]": 130001, "[sMASK]": 130002, "<unused_0>": 130003, "<sop>": 130004, "<eop>": 130005,
                "<ENC>": 130006, "<dBLOCK>": 130007, "<|tab|>": 130008, "<|blank_2|>": 130009,
                "<|blank_80|>": 130087, "<0x00>": 130088, "<0xFF>": 130343}
    for piece, index in expected.items():
        assert vocab[piece] == index
        assert tok.convert_tokens_to_ids(piece) == index
        assert tok.convert_ids_to_tokens(index) == piece
    assert tok.convert_tokens_to_ids("definitely-not-a-piece") == UNK
    assert tok.convert_ids_to_tokens([130004, 130400]) == ["<sop>", ""]  # unused embedding row


def test_decode_variants(tok, golden_json):
    entries = golden_json["tokenizer"]
    ids = [e["input_ids"] for e in entries[:6]]
    texts = [e["decode"] for e in entries[:6]]
    assert tok.batch_decode(ids) == texts
    assert tok.decode(torch.tensor(ids[0])) == texts[0]
    assert tok.decode(np.array(ids[0])) == texts[0]
    assert tok.decode([PAD, PAD] + ids[0]) == texts[0]  # left padding is dropped
    # spaces before punctuation are cleaned up by default on every version, and on request not
    spaced = entry(golden_json, "Hello , world !")
    assert tok.decode(spaced["input_ids"]) == "Hello, world!"
    assert tok.decode(spaced["input_ids"], clean_up_tokenization_spaces=False) == "Hello , world !"
    unk = entry(golden_json, "<unk>")["input_ids"]
    assert tok.decode(unk) == " ⁇ " and tok.decode(unk, skip_special_tokens=True) == ""


def test_save_pretrained_round_trip(tok, tmp_path, golden_json):
    texts = [e["text"] for e in golden_json["tokenizer"]] + golden_json["prompts"]
    saved = tmp_path / "saved"
    tok.save_pretrained(str(saved))
    assert (saved / "ice_text.model").read_bytes() == (ROOT / "ice_text.model").read_bytes()
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["gmask_token"] == "[gMASK]" and config["end_token"] == "</s>"
    assert config["num_image_tokens"] == 0 and config["padding_side"] == "left"
    reloaded = ChatGLMTokenizer.from_pretrained(str(saved))
    assert [reloaded(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]

    auto = load_auto(hub_folder(tmp_path))
    auto_saved = tmp_path / "auto_saved"
    auto.save_pretrained(str(auto_saved))
    shutil.copy(ROOT / "tokenization_chatglm.py", auto_saved / "tokenization_chatglm.py")
    again = load_auto(auto_saved)
    assert type(again).__name__ == "ChatGLMTokenizer"
    assert [again(t)["input_ids"] for t in texts] == [e["input_ids"] for e in golden_json["tokenizer"]] + [
        tok(t)["input_ids"] for t in golden_json["prompts"]]
    assert "[gMASK]" not in again.all_special_tokens
    batch = again(golden_json["prompts"][:3], padding=True, return_tensors="pt")
    assert batch["position_ids"].shape == (3, 2, 8)


def test_right_padding_is_refused(tok):
    with pytest.raises(ValueError, match="left"):
        ChatGLMTokenizer(vocab_file=str(ROOT / "ice_text.model"), padding_side="right")
    with pytest.raises(ValueError, match="left"):
        tok.padding_side = "right"
    assert tok.padding_side == "left"
    with pytest.raises(ValueError, match="left"):
        tok(["a", "你好"], padding=True, padding_side="right")
    with pytest.raises(ValueError, match="left"):
        tok.pad([tok("a"), tok("你好")], padding_side="right")
    tok.padding_side = "left"  # allowed


def test_lowercase_and_remove_space_options():
    tok = ChatGLMTokenizer(vocab_file=str(ROOT / "ice_text.model"), do_lower_case=True, remove_space=True)
    plain = ChatGLMTokenizer(vocab_file=str(ROOT / "ice_text.model"))
    assert tok("  Hello   WORLD \n ")["input_ids"] == plain("hello world")["input_ids"]


# ---------------------------------------------------------------------------------------------------
# Chat prompt
# ---------------------------------------------------------------------------------------------------
def to_messages(query, history):
    messages = []
    for q, r in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    return messages + [{"role": "user", "content": query}]


CHATS = [
    ("你好", []),
    ("再加3呢？", [("1+1=?", "2")]),
    ("第三个问题", [("问题一", "回答一\n第二行"), ("q2", "  r2  ")]),
]


def render_with_jinja(template, messages):
    """Render like transformers does (sandboxed, trim_blocks, lstrip_blocks, raise_exception)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def test_build_prompt(golden_json):
    assert ChatGLMTokenizer.build_prompt("再加3呢？", [("1+1=?", "2")]) == golden_json["prompts"][3]
    assert ChatGLMTokenizer.build_prompt("你好", [["1+1=?", "2"]]) == spec_prompt("你好", [("1+1=?", "2")])
    for query, history in CHATS:
        assert ChatGLMTokenizer.build_prompt(query, history) == spec_prompt(query, history)
    assert ChatGLMTokenizer.build_prompt("q") == "q"
    with pytest.raises(TypeError, match="pair"):
        ChatGLMTokenizer.build_prompt("q", [("only one",)])
    with pytest.raises(TypeError, match="str"):
        ChatGLMTokenizer.build_prompt(None)


def test_chat_template(tok, tmp_path, golden, golden_json):
    template = json.loads((ROOT / "tokenizer_config.json").read_text())["chat_template"]
    for query, history in CHATS:
        assert render_with_jinja(template, to_messages(query, history)) == spec_prompt(query, history)
    assert render_with_jinja(template, to_messages(*CHATS[1])) == golden_json["prompts"][3]
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="role"):
        render_with_jinja(template, [{"role": "system", "content": "x"}, {"role": "user", "content": "q"}])
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        render_with_jinja(template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])

    auto = load_auto(hub_folder(tmp_path))
    if not hasattr(transformers.PreTrainedTokenizerBase, "apply_chat_template"):  # transformers < 4.34
        with pytest.raises(NotImplementedError, match="build_prompt"):
            auto.apply_chat_template(to_messages("q", []), add_generation_prompt=True)
        return
    for query, history in CHATS:
        messages = to_messages(query, history)
        text = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == spec_prompt(query, history)
        ids = auto.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert ids == auto(spec_prompt(query, history))["input_ids"] and ids[-2:] == [GMASK, SOP]
    # The tokenized template is exactly what the reference model was fed for prompt 3.
    meta, tensors = golden
    length = tensors["int8.prompt3.argmax"].shape[1]
    out = auto.apply_chat_template(to_messages(*CHATS[1]), add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)
    assert out["input_ids"][0].tolist() == tensors["int8.prompt3.greedy"][:length].tolist()


# ---------------------------------------------------------------------------------------------------
# Robustness
# ---------------------------------------------------------------------------------------------------
def test_every_model_id_decodes(tok, golden):
    everything = list(range(N_ROWS))
    assert isinstance(tok.decode(everything), str)
    for start in range(0, N_ROWS, 4096):
        assert all(isinstance(t, str) for t in tok.batch_decode([[i] for i in everything[start:start + 4096]]))
    assert len(tok.convert_ids_to_tokens(everything)) == N_ROWS
    for unused in range(N_PIECES, N_ROWS):
        assert tok.decode([unused]) == ""
        assert tok.decode(unused) == ""
    hello = tok.encode("Hello, world!")
    assert tok.decode(hello + [130414, 130527]) == tok.decode(hello) == "Hello, world!"
    # reference generations contain unused rows (e.g. 130414 in int8.prompt1.greedy)
    greedy = golden[1]["int8.prompt1.greedy"].tolist()
    assert 130414 in greedy
    assert isinstance(tok.decode(greedy), str)


def test_out_of_range_ids_are_clear_errors(tok):
    for bad in (-1, N_ROWS, 10**9):
        with pytest.raises(ValueError, match="outside the ChatGLM vocabulary"):
            tok.decode([5, bad])
    with pytest.raises(TypeError, match="integers"):
        tok.decode([1.5])


@FUZZ
@given(st.integers(0, N_ROWS - 1), st.integers(0, N_ROWS - 1))
def test_random_id_pairs_decode(tok, first, second):
    assert isinstance(tok.decode([first, second]), str)


FRAGMENTS = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=()), max_size=20),  # everything, incl. surrogates
    st.integers(0, 200).map(lambda n: " " * n),
    st.sampled_from(["\ud800", "\udfff", "\ud83d\ude00", "\t", "\n", "\r\n", "\r", "\x00", "\x1b", "\u200b", "\ufeff", "😀", "👍🏽", "\U00020000",
                     "\U0002a6d6", "\U00030000", "\U000e0001", "\U0010ffff", "中文", "ｆｕｌｌ", "<sop>",
                     "[MASK]", "[gMASK]", "<pad>", "<unk>", "<eop>", "<n>", "<|blank_3|>", "<|tab|>", "</s>"]),
)


@FUZZ
@given(st.lists(FRAGMENTS, max_size=12).map("".join))
def test_any_string_encodes(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[-2:] == [GMASK, SOP]
    assert all(isinstance(i, int) and 0 <= i < N_PIECES for i in ids)
    assert tok.convert_tokens_to_ids(tok.tokenize(text)) == ids[:-2]
    assert isinstance(tok.decode(ids), str)
    batch = tok([text, "a"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].shape[-1] == batch["input_ids"].shape[1]


def test_long_inputs(tok):
    text = ("中文 English\t\n" + " " * 500 + "code()\r\n") * 300
    ids = tok.encode(text)
    assert ids[-2:] == [GMASK, SOP] and ids.count(BLANK80) == 6 * 300


# ---------------------------------------------------------------------------------------------------
# Broken vocabulary files
# ---------------------------------------------------------------------------------------------------
BROKEN = {
    "empty": b"",
    "lfs-pointer": b"version https://git-lfs.github.com/spec/v1\n"
                   b"oid sha256:5e974d9a69c242ce014c88c2b26089270f6198f3c0b700a887666cd3e816f17e\nsize 2706249\n",
    "truncated": (ROOT / "ice_text.model").read_bytes()[:100_000],
    "garbage": b"\x00\x01not a model" * 100,
}


@pytest.mark.parametrize("kind", ["missing"] + sorted(BROKEN))
def test_broken_vocabulary_file(tmp_path, kind):
    folder = hub_folder(tmp_path)
    (folder / "ice_text.model").unlink()
    if kind != "missing":
        (folder / "ice_text.model").write_bytes(BROKEN[kind])
    with pytest.raises(IceTextModelError) as direct:
        ChatGLMTokenizer(vocab_file=str(folder / "ice_text.model"))
    with pytest.raises(ValueError) as auto:
        load_auto(folder)
    for error in (direct.value, auto.value):
        message = str(error)
        assert "ice_text.model" in message and "git lfs pull" in message, message
    if kind == "lfs-pointer":
        assert "LFS pointer" in str(direct.value)
