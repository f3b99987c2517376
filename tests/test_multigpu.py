"""ChatGLM-6B INT8 (full size, random weights) split over two GPUs equals the one-GPU run.

Run on a machine with two or more NVIDIA GPUs, from the repository root:

    python3 -m pytest -m multigpu tests/test_multigpu.py -v

CI (CPU only) deselects the marker (pytest.ini). The checkpoint is the full-size INT8 layout of
tools/make_checkpoint.py (random weights, 6.7 GB ``pytorch_model.bin``), written once to
``checkpoints/random-int8-full`` (or ``$CHATGLM_FULL_INT8``) and reused. The oracle is the same
folder loaded on GPU 0 alone: greedy tokens of single prompts, of a left-padded batch, of chat and
stream_chat, and the logits, must come out the same when the 28 GLMBlocks are spread over GPUs
(accelerate hooks), with the tied embedding/LM head on one GPU or split across two, and with some
blocks offloaded to CPU RAM or disk and streamed to the GPU at every forward.
"""
import gc
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.multigpu

ROOT = Path(__file__).resolve().parent.parent
FULL = Path(os.environ.get("CHATGLM_FULL_INT8", ROOT / "checkpoints" / "random-int8-full"))
NUM_LAYERS = 28
PROMPTS = ["你好", "晚上睡不着应该怎么办", "Write a short poem about the sea.", "1+1=?"]
NEW_TOKENS = 16


def _require_two_gpus():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        pytest.fail(f"the multigpu tests need two NVIDIA GPUs, {n} visible (run them on a 2-GPU machine)")


def _write_full_checkpoint(folder: Path) -> Path:
    """The full-size random INT8 checkpoint (official layout) with our code and tokenizer files."""
    from chatglm6b.tools.make_checkpoint import copy_package_files, make_config, write_checkpoint

    done = folder / ".complete"
    if not done.exists():  # an interrupted write leaves no marker: start again
        write_checkpoint(folder, make_config("full", bits=8), int_mode="direct", fmt="bin", overwrite=True)
        done.write_text("ok\n")
    copy_package_files(folder)  # always this checkout's code
    return folder


@pytest.fixture(scope="module")
def full_folder():
    _require_two_gpus()
    return _write_full_checkpoint(FULL)


@pytest.fixture(scope="module")
def tokenizer(full_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(full_folder), trust_remote_code=True)


def _load(folder, **kwargs):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), trust_remote_code=True, **kwargs).eval()


def _free(model):
    del model
    gc.collect()
    torch.cuda.empty_cache()


def _cache_of(out):
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)


def _run_all(model, tokenizer):
    """Everything compared between placements, with outputs on the CPU."""
    dev = model.device
    result = {"single": [], "logits": None}
    for p in PROMPTS:
        ids = tokenizer([p], return_tensors="pt")["input_ids"].to(dev)
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        result["single"].append(out[0].tolist())
    ids = tokenizer([PROMPTS[1]], return_tensors="pt")["input_ids"].to(dev)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    result["logits"] = out.logits.float().cpu()
    result["cache_devices"] = [k.device for k in _cache_of(out).keys]
    batch = tokenizer(PROMPTS[:3], padding=True, return_tensors="pt").to(dev)
    result["batch"] = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
    result["chat"], _ = model.chat(tokenizer, PROMPTS[0], history=[], max_length=48, do_sample=False)
    result["stream"] = [r for r, _ in model.stream_chat(tokenizer, PROMPTS[2], history=[], max_length=40,
                                                        do_sample=False)]
    return result


@pytest.fixture(scope="module")
def one_gpu(full_folder, tokenizer):
    model = _load(full_folder, device_map={"": 0})
    # the eager path, which a split model runs too (a one-GPU CUDA-graph decode, where present, may
    # differ at near ties: fast_decode.py); same kernels and dtype on every GPU, so equal ids expected
    model.config.use_cuda_graph = False
    assert not hasattr(model, "_hf_hook")
    assert {p.device for p in model.parameters()} == {torch.device("cuda", 0)}
    result = _run_all(model, tokenizer)
    _free(model)
    return result


def _blocks(split_at, first, second):
    return {f"transformer.layers.{i}": first if i < split_at else second for i in range(NUM_LAYERS)}


MAPS = {
    # what users write: accelerate's balanced plan over both GPUs (tied pair kept on one GPU)
    "auto": "auto",
    # the tied embedding (GPU 0) and LM head (GPU 1) on different GPUs: one copy on each
    "head_on_other_gpu": {"transformer.word_embeddings": 0, **_blocks(14, 0, 1),
                          "transformer.final_layernorm": 1, "lm_head": 1},
    # GPU 0 computes everything it holds plus blocks streamed in from CPU RAM and from disk
    "with_cpu_and_disk": {"transformer.word_embeddings": 0, **_blocks(10, 0, 1),
                          **{f"transformer.layers.{i}": "cpu" for i in range(14, 18)},
                          **{f"transformer.layers.{i}": "disk" for i in range(24, 28)},
                          "transformer.final_layernorm": 1, "lm_head": 0},
}


def _execution_device(dmap, key, main):
    from chatglm6b.dispatch import placement

    dev = placement(key, dmap)
    return torch.device("cuda", dev) if isinstance(dev, int) else main  # cpu/disk blocks run on main


@pytest.fixture(scope="module", params=sorted(MAPS))
def split(request, full_folder, tokenizer, tmp_path_factory):
    dmap = MAPS[request.param]
    offload = tmp_path_factory.mktemp("offload")
    model = _load(full_folder, device_map=dmap, offload_folder=str(offload))
    placed = dict(getattr(model, "hf_device_map", None) or {"": str(model.device)})  # unsplit: fails below
    main = model.device
    result = _run_all(model, tokenizer)
    emb_is_head = model.lm_head.weight is model.transformer.word_embeddings.weight
    _free(model)
    shutil.rmtree(offload, ignore_errors=True)
    return request.param, placed, main, emb_is_head, result


def test_blocks_are_spread_whole_over_both_gpus(split):
    name, placed, main, _, _ = split
    blocks = [k for k in placed if k.startswith("transformer.layers.")]
    assert sorted(blocks) == sorted(f"transformer.layers.{i}" for i in range(NUM_LAYERS))  # none split
    assert {0, 1} <= set(placed.values())
    assert main == torch.device("cuda", 0)


def test_greedy_tokens_equal_the_one_gpu_run(split, one_gpu):
    _, _, _, _, result = split
    assert result["single"] == one_gpu["single"]
    assert result["batch"] == one_gpu["batch"]
    torch.testing.assert_close(result["logits"], one_gpu["logits"], atol=1e-3, rtol=0)


def test_chat_and_stream_chat_equal_the_one_gpu_run(split, one_gpu):
    _, _, _, _, result = split
    assert result["chat"] == one_gpu["chat"]
    assert result["stream"] == one_gpu["stream"]


def test_cache_lives_on_each_blocks_device(split):
    _, placed, main, _, result = split
    want = [_execution_device(placed, f"transformer.layers.{i}", main) for i in range(NUM_LAYERS)]
    assert result["cache_devices"] == want


def test_tied_pair_is_one_tensor_only_when_on_one_gpu(split):
    name, placed, main, emb_is_head, _ = split
    from chatglm6b.dispatch import placement

    emb, head = placement("transformer.word_embeddings.weight", placed), placement("lm_head.weight", placed)
    streamed = {"disk"} | ({"cpu"} if main.type != "cpu" else set())  # weights brought in at each forward
    assert emb_is_head == (emb == head and head not in streamed)


def test_ptuning_prefix_over_two_gpus_equals_one_gpu(full_folder, tokenizer, tmp_path):
    """The prefix is built where the prefix encoder sits and joins each block's cache on its GPU."""
    folder = tmp_path / "ptuning"
    folder.mkdir()
    for f in full_folder.iterdir():
        if f.is_file() and f.name != "config.json":
            os.symlink(f, folder / f.name)
    cfg = json.loads((full_folder / "config.json").read_text())
    cfg.update(pre_seq_len=8, prefix_projection=False)
    (folder / "config.json").write_text(json.dumps(cfg))
    ids = tokenizer([PROMPTS[1]], return_tensors="pt")["input_ids"]
    with pytest.warns(UserWarning, match="prefix encoder"):
        one = _load(folder, device_map={"": 0})
    one.config.use_cuda_graph = False
    state = {k: v.detach().cpu() for k, v in one.transformer.prefix_encoder.state_dict().items()}
    want = one.generate(ids.to(one.device), max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
    _free(one)
    dmap = {"transformer.word_embeddings": 0, "transformer.prefix_encoder": 0, **_blocks(14, 0, 1),
            "transformer.final_layernorm": 1, "lm_head": 1}
    with pytest.warns(UserWarning, match="prefix encoder"):
        two = _load(folder, device_map=dmap)
    two.transformer.prefix_encoder.load_state_dict(state)
    got = two.generate(ids.to(two.device), max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
    _free(two)
    assert got == want
