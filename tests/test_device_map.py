"""device_map without GPUs: CPU + disk offload through accelerate, maps over several "cpu" placements,
and device_map="auto" with a max_memory that forces part of the model to disk.

The oracle is the original code's greedy output on the int8 conformance checkpoint
(``int8.promptN.greedy``, ``int8.batch.greedy``, the chat goldens) and our own single-device run of
the same folder. Offloading is checked on disk too: the files accelerate reads must hold exactly
the checkpoint's tensors, the offloaded parameters must not be resident, and the model must read
them from the files at every forward.
"""
import json
import re

import pytest
import torch

from conftest import CONFORMANCE, model_folder

NUM_LAYERS = 28


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("dmap"), "int8")


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def single(folder):
    """The same folder on one device: the reference for logits."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def checkpoint():
    return torch.load(CONFORMANCE / "int8" / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)


def _load(folder, **kwargs):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), trust_remote_code=True, **kwargs)


def _full_map(layer_device, embed="cpu", head="cpu", final="cpu"):
    dmap = {"transformer.word_embeddings": embed}
    dmap.update({f"transformer.layers.{i}": layer_device(i) for i in range(NUM_LAYERS)})
    dmap.update({"transformer.final_layernorm": final, "lm_head": head})
    return dmap


def _prompt(g, i):
    s = g[f"int8.prompt{i}.argmax"].shape[1]
    return g[f"int8.prompt{i}.greedy"][:s][None]


def _placement(key, dmap):
    from chatglm6b.dispatch import placement

    return placement(key, dmap)


def _assert_golden_generation(model, golden, tokenizer, prompts=range(5), batch=True):
    meta, g = golden
    for i in prompts:
        out = model.generate(_prompt(g, i), max_new_tokens=12, do_sample=False)
        assert out[0].tolist() == g[f"int8.prompt{i}.greedy"].tolist(), f"prompt {i}"
    if not batch:
        return
    batch = tokenizer(meta["prompts"][:3], padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert out.tolist() == g["int8.batch.greedy"].tolist()


def _assert_same_logits(model, single, golden, i=0):
    _, g = golden
    ids = _prompt(g, i)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = single(input_ids=ids).logits
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, -1], g[f"int8.prompt{i}.last"], atol=1e-4, rtol=0)


def _assert_offloaded(model, dmap, offload, checkpoint, single):
    """Every "disk" tensor is in offload/ with the checkpoint's exact value; none of them is resident."""
    from accelerate.utils import load_offloaded_weight

    index = json.loads((offload / "index.json").read_text())
    on_disk = {k for k in single.state_dict() if _placement(k, dmap) == "disk"}
    if _placement("lm_head.weight", dmap) == "disk":
        on_disk.add("lm_head.weight")  # the untied head gets its own file
    assert on_disk, "the map offloads nothing"
    assert set(index) == on_disk
    reference = single.state_dict()
    for key in on_disk:
        stored = load_offloaded_weight(str(offload / f"{key}.dat"), index[key])
        if key.endswith(".inv_freq"):  # its stored value is ignored by design (recomputed at load)
            want = reference[key]
        else:
            want = checkpoint["transformer.word_embeddings.weight" if key == "lm_head.weight" else key]
        assert stored.dtype == want.dtype and torch.equal(stored, want), key
    for name, p in model.named_parameters(remove_duplicate=False):
        if _placement(name, dmap) == "disk":
            assert p.is_meta, f"{name} is mapped to disk but resident on {p.device}"
        else:
            assert p.device.type == "cpu", f"{name} should be resident on the CPU, is on {p.device}"


# ---------------------------------------------------------------------------------------------
# CPU + disk


MAPS = {
    # the second half of the blocks and the final norm on disk
    "second_half_on_disk": _full_map(lambda i: "cpu" if i < 14 else "disk", final="disk"),
    # the tied pair split: embedding offloaded, head resident (inputs can no longer follow model.device)
    "embedding_on_disk": _full_map(lambda i: "cpu", embed="disk"),
    # the tied pair split the other way
    "head_on_disk": _full_map(lambda i: "cpu", head="disk"),
    # every other block on disk, both ends of the tied pair on disk
    "alternating": _full_map(lambda i: "disk" if i % 2 else "cpu", embed="disk", head="disk"),
}
# every offloaded tensor is read back from its file at each forward: on 2 shared cores, all five
# prompts for one map, two for the others (nothing-resident is covered by the "auto" test below)
PROMPTS = {"second_half_on_disk": range(5)}


@pytest.fixture(scope="module", params=sorted(MAPS))
def offloaded(request, folder, tmp_path_factory):
    dmap = MAPS[request.param]
    offload = tmp_path_factory.mktemp(f"offload-{request.param}")
    return request.param, dmap, offload, _load(folder, device_map=dmap, offload_folder=str(offload))


def test_disk_weights_are_the_checkpoints_and_not_resident(offloaded, checkpoint, single):
    name, dmap, offload, model = offloaded
    _assert_offloaded(model, dmap, offload, checkpoint, single)


def test_disk_offload_matches_goldens_and_single_device(offloaded, golden, tokenizer, single):
    name, dmap, offload, model = offloaded
    _assert_same_logits(model, single, golden)
    _assert_golden_generation(model, golden, tokenizer, prompts=PROMPTS.get(name, (1, 4)))


def test_disk_offload_chat_and_stream_chat_match_goldens(offloaded, golden, tokenizer):
    name, dmap, offload, model = offloaded
    meta, _ = golden
    assert model.device.type == "cpu"  # where chat() puts the prompt, even with the embedding offloaded
    response, history = model.chat(tokenizer, "你好", history=[], max_length=40, do_sample=False)
    assert response == meta["chat"]["round1"]
    assert [list(t) for t in history] == meta["chat"]["history1"]
    stream = [r for r, _ in model.stream_chat(tokenizer, "Hello", history=[], do_sample=False, max_length=30)]
    assert stream == meta["chat"]["stream"]


def test_offloaded_blocks_read_their_weights_from_the_files(folder, single, golden, tmp_path):
    """Change an offloaded weight on disk: the model's output must follow the file (then recover)."""
    import numpy as np

    _, g = golden
    dmap = MAPS["second_half_on_disk"]
    model = _load(folder, device_map=dmap, offload_folder=str(tmp_path))
    key = "transformer.layers.20.mlp.dense_4h_to_h.weight_scale"
    info = json.loads((tmp_path / "index.json").read_text())[key]
    data = np.memmap(tmp_path / f"{key}.dat", dtype=info["dtype"], mode="r+", shape=tuple(info["shape"]))
    original = np.array(data)
    ids = _prompt(g, 0)
    with torch.no_grad():
        want = single(input_ids=ids).logits
        data[:] = original * 2
        data.flush()
        changed = model(input_ids=ids).logits
        data[:] = original
        data.flush()
        restored = model(input_ids=ids).logits
    assert (changed - want).abs().max() > 0.1
    torch.testing.assert_close(restored, want, atol=1e-5, rtol=0)


def test_tied_pair_split_gets_two_copies_that_stay_apart(golden, tokenizer, offloaded):
    name, dmap, offload, model = offloaded
    emb, head = model.transformer.word_embeddings.weight, model.lm_head.weight
    split = _placement("transformer.word_embeddings.weight", dmap) != _placement("lm_head.weight", dmap) or \
        _placement("lm_head.weight", dmap) == "disk"
    assert (emb is not head) == split
    model.tie_weights()  # transformers and users call it; it must not re-tie across devices
    assert (model.transformer.word_embeddings.weight is not model.lm_head.weight) == split
    _assert_golden_generation(model, golden, tokenizer, prompts=[2], batch=False)


def test_reused_offload_folder_gets_this_models_weights(folder, tmp_path, golden):
    """A folder already holding another model's offload must not feed its weights to the next load."""
    from chatglm6b.tools.make_checkpoint import copy_package_files, make_config, write_checkpoint

    _, g = golden
    other = tmp_path / "other"
    write_checkpoint(other, make_config("tiny", bits=8), seed=1)
    copy_package_files(other)
    offload = tmp_path / "offload"
    dmap = MAPS["second_half_on_disk"]
    _load(folder, device_map=dmap, offload_folder=str(offload))  # fills the folder with int8/'s weights
    reused = _load(other, device_map=dmap, offload_folder=str(offload))
    reference = _load(other)
    ids = _prompt(g, 2)
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = reused(input_ids=ids).logits
    assert (want[:, -1] - g["int8.prompt2.last"]).abs().max() > 1e-2  # the two checkpoints really differ
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_ptuning_prefix_with_blocks_on_disk_matches_golden(tmp_path, golden):
    """The P-tuning prefix is built at the embedding and joins each block's cache on that block's device."""
    _, g = golden
    cfg = json.loads((CONFORMANCE / "ptuning_proj1" / "config.json").read_text())
    extra = {"pre_seq_len": cfg["pre_seq_len"], "prefix_projection": cfg["prefix_projection"]}
    folder = model_folder(tmp_path, "int8", extra)
    dmap = _full_map(lambda i: "disk" if i >= 20 else "cpu")
    dmap["transformer.prefix_encoder"] = "cpu"
    with pytest.warns(UserWarning, match="prefix encoder"):
        model = _load(folder, device_map=dmap, offload_folder=str(tmp_path / "offload"))
    state = torch.load(CONFORMANCE / "ptuning_proj1" / "prefix_encoder.bin", weights_only=True)
    prefix = "transformer.prefix_encoder."
    model.transformer.prefix_encoder.load_state_dict({k[len(prefix):]: v for k, v in state.items()})
    model.eval()
    for i in (0, 3):
        s = g[f"ptuning1.prompt{i}.argmax"].shape[1]
        out = model.generate(g[f"ptuning1.prompt{i}.greedy"][:s][None], max_new_tokens=12, do_sample=False)
        assert out[0].tolist() == g[f"ptuning1.prompt{i}.greedy"].tolist()


# ---------------------------------------------------------------------------------------------
# several "cpu" placements


def test_map_over_several_cpu_placements_matches_goldens(folder, golden, tokenizer, single):
    spellings = ["cpu", torch.device("cpu"), "cpu:0"]
    dmap = _full_map(lambda i: spellings[i % 3], embed=torch.device("cpu"), head="cpu:0")
    model = _load(folder, device_map=dmap)
    assert not hasattr(model, "_hf_hook")  # one device: no hooks, no per-forward cost
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.transformer.word_embeddings.weight  # still tied
    _assert_same_logits(model, single, golden, i=4)
    _assert_golden_generation(model, golden, tokenizer)


# ---------------------------------------------------------------------------------------------
# device_map="auto"


def _sizes(model):
    emb = model.transformer.word_embeddings.weight
    layer = sum(t.numel() * t.element_size() for t in model.transformer.layers[0].state_dict().values())
    return emb.numel() * emb.element_size(), layer


def test_auto_with_small_max_memory_spills_blocks_to_disk(folder, single, golden, tokenizer, checkpoint, tmp_path):
    emb_bytes, layer_bytes = _sizes(single)
    max_memory = {"cpu": emb_bytes + 10 * layer_bytes}  # the embedding and about ten blocks
    asked = dict(max_memory)
    model = _load(folder, device_map="auto", max_memory=max_memory, offload_folder=str(tmp_path))
    assert max_memory == asked  # the caller's dict is left alone
    dmap = model.hf_device_map
    assert set(dmap.values()) == {"cpu", "disk"}
    block_keys = [k for k in dmap if k.startswith("transformer.layers.")]
    assert sorted(block_keys) == sorted(f"transformer.layers.{i}" for i in range(NUM_LAYERS))  # whole blocks
    on_disk = [k for k in block_keys if dmap[k] == "disk"]
    assert 5 <= len(on_disk) < NUM_LAYERS
    _assert_offloaded(model, dmap, tmp_path, checkpoint, single)
    _assert_same_logits(model, single, golden, i=3)
    _assert_golden_generation(model, golden, tokenizer)


def test_auto_with_max_memory_below_any_block_offloads_everything(folder, golden, tokenizer, tmp_path):
    meta, g = golden
    model = _load(folder, device_map="auto", max_memory={"cpu": "1MB"}, offload_folder=str(tmp_path))
    assert set(model.hf_device_map.values()) == {"disk"}
    assert all(p.is_meta for p in model.parameters())
    assert (tmp_path / "index.json").is_file()
    out = model.generate(_prompt(g, 2), max_new_tokens=12, do_sample=False)
    assert out[0].tolist() == g["int8.prompt2.greedy"].tolist()
    response, _ = model.chat(tokenizer, "你好", history=[], max_length=40, do_sample=False)
    assert response == meta["chat"]["round1"]


def test_auto_without_max_memory_fitting_one_device_adds_no_hooks(folder, golden):
    _, g = golden
    model = _load(folder, device_map="auto")
    assert not hasattr(model, "_hf_hook")
    devices = {p.device for p in model.parameters()}
    assert len(devices) == 1
    if devices == {torch.device("cpu")}:  # CI; on a GPU host the model computes in fp16 (see test_multigpu)
        out = model.generate(_prompt(g, 0), max_new_tokens=12, do_sample=False)
        assert out[0].tolist() == g["int8.prompt0.greedy"].tolist()


def test_plan_for_two_gpus_keeps_blocks_whole_and_the_tied_pair_together():
    """The full-size model on the meta device, planned for two 'GPUs' (sizes only; no GPU needed)."""
    from chatglm6b.configuration_chatglm import ChatGLMConfig
    from chatglm6b.dispatch import plan_device_map
    from chatglm6b.modeling_chatglm import ChatGLMForConditionalGeneration
    from chatglm6b.tools.make_checkpoint import make_config

    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(ChatGLMConfig(**make_config("full", bits=8)), dtype=torch.float16)
    plan = plan_device_map(model, "sequential", {0: "5GiB", 1: "10GiB"}, torch.float16)
    blocks = [plan[f"transformer.layers.{i}"] for i in range(NUM_LAYERS)]  # KeyError if a block were split
    assert not any(k.startswith("transformer.layers.") and k.count(".") > 2 for k in plan)
    assert set(blocks) == {0, 1} and blocks == sorted(blocks)  # device 0 first, then device 1
    assert plan["transformer.word_embeddings"] == plan["lm_head"] == 0
    assert "disk" not in plan.values() and "cpu" not in plan.values()


# ---------------------------------------------------------------------------------------------
# errors


@pytest.fixture(scope="module")
def meta_model():
    from chatglm6b.configuration_chatglm import ChatGLMConfig
    from chatglm6b.modeling_chatglm import ChatGLMForConditionalGeneration

    with torch.device("meta"):
        return ChatGLMForConditionalGeneration(ChatGLMConfig.from_pretrained(str(CONFORMANCE / "int8")),
                                               dtype=torch.float16)


@pytest.mark.parametrize("dmap, message", [
    ({"": "cpu", "transformer.layers.3.mlp": "disk"}, "splits GLMBlock transformer.layers.3"),
    ({"": "cpu", "transformer.blocks.0": "cpu"}, "not a module or weight"),
    ({"transformer.word_embeddings": "cpu", "lm_head": "cpu"}, "does not place 'transformer.layers.0"),
    ({"": "cpu", "transformer.layers.0": 99}, "cuda:99"),
    ({"": "meta"}, "'meta'"),
])
def test_bad_maps_are_refused_with_a_reason(meta_model, dmap, message):
    from chatglm6b.dispatch import check_device_map, normalize_device_map

    with pytest.raises(ValueError, match=re.escape(message)):
        check_device_map(meta_model, normalize_device_map(dmap))


def test_disk_without_offload_folder_says_what_to_pass(folder):
    with pytest.raises(ValueError, match="offload_folder="):
        _load(folder, device_map=MAPS["second_half_on_disk"])
