"""The model against outputs of the original code (../shared/conformance, see its README).

Every TAG of golden.safetensors: fp32 logits within 1e-4 (last position and the probe slice),
argmax, greedy ids, batch greedy ids exactly, loss within 1e-4; quantize() reproduces the golden
int8/int4 weights of layer 0 exactly; chat / stream_chat goldens exactly.
"""
import json

import pytest
import torch

from conftest import CONFORMANCE, model_folder

TAGS = ["int8", "int4", "fp16", "quantize8", "quantize4", "ptuning0", "ptuning1"]
ATOL = 1e-4


def _load(tmp_path_factory, tag):
    from transformers import AutoModel

    tmp = tmp_path_factory.mktemp(tag)
    if tag in ("int8", "int4", "fp16"):
        return AutoModel.from_pretrained(str(model_folder(tmp, tag)), trust_remote_code=True)
    if tag.startswith("quantize"):
        model = AutoModel.from_pretrained(str(model_folder(tmp, "fp16")), trust_remote_code=True)
        return model.half().quantize(int(tag[-1]))
    proj = tag[-1]
    cfg = json.loads((CONFORMANCE / f"ptuning_proj{proj}" / "config.json").read_text())
    extra = {"pre_seq_len": cfg["pre_seq_len"], "prefix_projection": cfg["prefix_projection"]}
    with pytest.warns(UserWarning, match="prefix encoder"):
        model = AutoModel.from_pretrained(str(model_folder(tmp, "int8", extra)), trust_remote_code=True)
    state = torch.load(CONFORMANCE / f"ptuning_proj{proj}" / "prefix_encoder.bin", weights_only=True)
    prefix = "transformer.prefix_encoder."
    model.transformer.prefix_encoder.load_state_dict({k[len(prefix):]: v for k, v in state.items()})
    return model.eval()


@pytest.fixture(scope="module", params=TAGS)
def tagged_model(request, tmp_path_factory):
    return request.param, _load(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    return _load(tmp_path_factory, "int8")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_folder(tmp_path_factory.mktemp("tok"), "int8")),
                                         trust_remote_code=True)


def _prompt_ids(g, tag, i):
    s = g[f"{tag}.prompt{i}.argmax"].shape[1]
    return g[f"{tag}.prompt{i}.greedy"][:s][None]


@pytest.mark.parametrize("i", range(5))
def test_logits_argmax_loss_and_greedy_match_golden(tagged_model, golden, i):
    tag, model = tagged_model
    _, g = golden
    ids = _prompt_ids(g, tag, i)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[:, -1], g[f"{tag}.prompt{i}.last"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[..., g["vocab_probe"]], g[f"{tag}.prompt{i}.slice"], atol=ATOL, rtol=0)
    assert torch.equal(logits.argmax(-1), g[f"{tag}.prompt{i}.argmax"])
    greedy = g[f"{tag}.prompt{i}.greedy"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert out[0].tolist() == greedy.tolist()
    with torch.no_grad():
        loss = model(input_ids=greedy[None], labels=greedy[None]).loss
    assert abs(loss.item() - g[f"{tag}.prompt{i}.loss"].item()) < ATOL


def test_uncached_greedy_equals_cached(tagged_model, golden):
    tag, model = tagged_model
    _, g = golden
    ids = _prompt_ids(g, tag, 1)
    cached = model.generate(ids, max_new_tokens=6, do_sample=False)
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached[0].tolist() == g[f"{tag}.prompt1.greedy"][: ids.shape[1] + 6].tolist()


def test_batch_greedy_matches_golden(tagged_model, golden, tokenizer):
    tag, model = tagged_model
    meta, g = golden
    batch = tokenizer(meta["prompts"][:3], padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert out.tolist() == g[f"{tag}.batch.greedy"].tolist()


def test_left_padded_rows_get_their_single_row_tokens(int8_model, golden, tokenizer):
    meta, g = golden
    batch = tokenizer(meta["prompts"][:3], padding=True, return_tensors="pt")
    out = int8_model.generate(**batch, max_new_tokens=8, do_sample=False)
    for row, prompt in enumerate(meta["prompts"][:3]):
        single = tokenizer([prompt], return_tensors="pt")
        alone = int8_model.generate(**single, max_new_tokens=8, do_sample=False)
        assert out[row, -8:].tolist() == alone[0, -8:].tolist()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_reproduces_golden_layer0(tmp_path, golden, bits):
    from transformers import AutoModel

    _, g = golden
    model = AutoModel.from_pretrained(str(model_folder(tmp_path, "fp16")), trust_remote_code=True)
    model.half().quantize(bits)
    qkv = model.transformer.layers[0].attention.query_key_value
    assert torch.equal(qkv.weight, g[f"quantize{bits}.layer0.qkv.weight"])
    assert torch.equal(qkv.weight_scale.float(), g[f"quantize{bits}.layer0.qkv.weight_scale"])
    assert model.config.quantization_bit == bits


def test_chat_goldens(int8_model, tokenizer, golden):
    meta, _ = golden
    chat = meta["chat"]
    response, history = int8_model.chat(tokenizer, "你好", history=[], max_length=40, do_sample=False)
    assert response == chat["round1"]
    assert [list(t) for t in history] == chat["history1"]
    response2, history2 = int8_model.chat(tokenizer, "晚上睡不着应该怎么办", history=history, max_length=120,
                                          do_sample=False)
    assert response2 == chat["round2"]
    assert [list(t) for t in history2] == chat["history2"]


def test_stream_chat_golden(int8_model, tokenizer, golden):
    meta, _ = golden
    yielded = [r for r, _ in int8_model.stream_chat(tokenizer, "Hello", history=[], do_sample=False, max_length=30)]
    assert yielded == meta["chat"]["stream"]


def test_process_response_golden(golden):
    from chatglm6b.modeling_chatglm import process_response

    meta, _ = golden
    for case in meta["process_response"]:
        assert process_response(case["text"]) == case["out"], case


def test_chat_prompt_matches_golden_prompt_and_tokenizer(tokenizer, golden):
    from chatglm6b.modeling_chatglm import build_chat_prompt

    meta, _ = golden
    history = [("1+1=?", "2")]
    assert build_chat_prompt("再加3呢？", history) == meta["prompts"][3]
    assert build_chat_prompt("再加3呢？", history) == tokenizer.build_prompt("再加3呢？", history)
    assert build_chat_prompt("你好", []) == "你好"


def test_inference_gelu_is_the_formula_bit_for_bit():
    """gelu_tanh without autograd works in place (two buffers instead of nine) but must give exactly
    the bits of the SPEC formula 0.5 * x * (1 + tanh(0.7978845608028654 * x * (1 + 0.044715 * x * x)))."""
    from chatglm6b.modeling_chatglm import gelu_tanh

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 301, generator=gen) * 4
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        expect = 0.5 * xd * (1.0 + torch.tanh(0.7978845608028654 * xd * (1.0 + 0.044715 * xd * xd)))
        with torch.no_grad():
            got = gelu_tanh(xd)
        assert got.dtype == dtype and torch.equal(got, expect), dtype
        assert torch.equal(xd, x.to(dtype))  # the input is left alone
    xg = x.clone().requires_grad_()
    gelu_tanh(xg).sum().backward()
    assert xg.grad is not None
