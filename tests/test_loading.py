"""Loading, converting and saving ChatGLM-6B checkpoints (issue 3).

Oracles: the conformance checkpoints and goldens (../shared/conformance), the official layout
(SPEC §1–§3, the conformance int8 file is in it), and round trips: a random checkpoint written by
tools/make_checkpoint.py in some format must load to exactly the tensors that were written.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CONFORMANCE, ROOT, model_folder, run_child
from chatglm6b.loading import CheckpointError
from chatglm6b.modeling_chatglm import ChatGLMForConditionalGeneration
from chatglm6b.quantization import QuantizedLinear
from chatglm6b.tools import make_checkpoint as mc

ATOL = 1e-4  # conformance README: a conformant fp32 implementation agrees within 1e-4
EMBED, HEAD = "transformer.word_embeddings.weight", "lm_head.weight"
LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4b9e8f1c2a7d5e3f6a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f\nsize 6712112123\n")


def _prompt(g, tag, i):
    s = g[f"{tag}.prompt{i}.argmax"].shape[1]
    return g[f"{tag}.prompt{i}.greedy"][:s][None]


def _assert_golden_logits(model, g, tag, prompts=(0, 3)):
    for i in prompts:
        with torch.no_grad():
            logits = model(input_ids=_prompt(g, tag, i)).logits
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits[:, -1], g[f"{tag}.prompt{i}.last"], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[..., g["vocab_probe"]], g[f"{tag}.prompt{i}.slice"], atol=ATOL, rtol=0)


def _load(folder, **kwargs):
    return ChatGLMForConditionalGeneration.from_pretrained(str(folder), **kwargs)


def _auto(folder, **kwargs):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), trust_remote_code=True, **kwargs)


def _assert_same_state(a: dict, b: dict, skip=()):
    assert sorted(a) == sorted(b)
    for k in a:
        if k in skip:
            continue
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _write_bin(folder: Path, config: dict, sd: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


# ---------------------------------------------------------------------------------------------
# Auto classes

@pytest.fixture(scope="module")
def repo_auto_map():
    return json.loads((ROOT / "config.json").read_text())["auto_map"]


def test_repo_config_maps_every_auto_class_to_the_model(repo_auto_map):
    cls = "modeling_chatglm.ChatGLMForConditionalGeneration"
    assert repo_auto_map["AutoConfig"] == "configuration_chatglm.ChatGLMConfig"
    for auto in ("AutoModel", "AutoModelForSeq2SeqLM", "AutoModelForCausalLM"):
        assert repo_auto_map.get(auto) == cls, f"config.json auto_map lacks {auto} -> {cls}"


@pytest.mark.parametrize("auto", ["AutoModel", "AutoModelForSeq2SeqLM", "AutoModelForCausalLM"])
def test_auto_classes_load_the_int8_checkpoint(tmp_path, golden, repo_auto_map, auto):
    import transformers

    _, g = golden
    folder = model_folder(tmp_path, "int8", {"auto_map": repo_auto_map})
    model = getattr(transformers, auto).from_pretrained(str(folder), trust_remote_code=True)
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    assert not model.training
    _assert_golden_logits(model, g, "int8", prompts=(1,))


def test_remote_code_import_graph_suits_every_transformers_version():
    """transformers 4.27 copies, from a local folder, only the modules the entry file imports itself,
    and its save_pretrained follows relative imports with no cycle check (a cycle hangs it)."""
    from transformers.dynamic_module_utils import get_relative_imports

    graph, todo = {}, ["modeling_chatglm", "configuration_chatglm"]
    while todo:
        name = todo.pop()
        if name not in graph:
            graph[name] = set(get_relative_imports(str(ROOT / f"{name}.py")))
            todo += graph[name]
    reachable = set(graph) - {"modeling_chatglm", "configuration_chatglm"}
    assert reachable <= graph["modeling_chatglm"], "modeling_chatglm.py must import every package module itself"
    done, active = set(), []

    def visit(name):
        assert name not in active, f"relative-import cycle: {' -> '.join(active + [name])}"
        if name not in done:
            active.append(name)
            for dep in graph[name]:
                visit(dep)
            active.pop()
            done.add(name)

    visit("modeling_chatglm")


# ---------------------------------------------------------------------------------------------
# Formats: what was written is what is loaded

SEED = 7


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(folder, state dict written) per format, all from make_checkpoint with one seed."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for name, bits, fmt in [("int8-bin", 8, "bin"), ("int8-safetensors", 8, "safetensors"),
                            ("fp16-sharded", 16, "sharded-bin"), ("int4-bin", 4, "bin")]:
        cfg = mc.make_config("tiny", bits)
        mc.write_checkpoint(root / name, cfg, bits, fmt, seed=SEED)
        out[name] = (root / name, mc.random_state_dict(cfg, bits, seed=SEED))
    return out


@pytest.mark.parametrize("name", ["int8-bin", "int8-safetensors", "fp16-sharded", "int4-bin"])
def test_every_format_loads_exactly_what_was_written(written, name):
    from chatglm6b.modeling_chatglm import rotary_inv_freq

    folder, ref = written[name]
    files = sorted(os.listdir(folder))
    if name == "fp16-sharded":
        assert "pytorch_model.bin.index.json" in files and len([f for f in files if f.endswith(".bin")]) == 8
    model = _load(folder)
    sd = model.state_dict()
    inv_freq = [k for k in ref if k.endswith("inv_freq")]
    _assert_same_state(sd, ref, skip=inv_freq)
    for k in inv_freq:  # recomputed (SPEC §4.2: 1/10000^(2i/d), d = head_dim / 2, rounded to fp16)
        d = 64 // 4 // 2
        expect = (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)).half()
        assert torch.equal(sd[k].half(), expect)
        assert torch.equal(rotary_inv_freq(d), expect)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight  # tied
    qkv = model.transformer.layers[5].attention.query_key_value
    if name.startswith("fp16"):
        assert not isinstance(qkv, QuantizedLinear) and qkv.weight.dtype == torch.float16
        assert model.config.quantization_bit == 0
    else:
        assert isinstance(qkv, QuantizedLinear) and qkv.weight.dtype == torch.int8
        assert qkv.bits == int(name[3]) == model.config.quantization_bit


def test_safetensors_with_the_tied_matrix_under_the_head_name(written, tmp_path):
    folder, ref = written["int8-safetensors"]
    tensors = load_file(str(folder / "model.safetensors"))
    assert EMBED in tensors and HEAD not in tensors  # stored once
    tensors[HEAD] = tensors.pop(EMBED)
    dst = tmp_path / "head-name"
    dst.mkdir()
    shutil.copy(folder / "config.json", dst)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    model = _load(dst)
    assert torch.equal(model.transformer.word_embeddings.weight, ref[EMBED])
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_official_bin_stores_the_tied_matrix_once(written):
    folder, _ = written["int8-bin"]
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert len(sd) == 480
    assert sd[HEAD].untyped_storage().data_ptr() == sd[EMBED].untyped_storage().data_ptr()


def test_int8_load_never_materialises_float_block_weights(written, tmp_path):
    """A quantized config builds QuantizedLinear directly: no float [out, in] block matrix is ever made.

    The spy sees every tensor an ATen op returns while loading; the FP16-checkpoint-with-override
    load (which must quantize float matrices) shows that it does see them when they exist.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    h, inner = 64, 256
    shapes = {(3 * h, h), (h, h), (inner, h), (h, inner)}

    class FloatMatrixSpy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta"
                        and tuple(t.shape) in shapes):
                    self.seen.append((str(func), tuple(t.shape)))
            return out

    with FloatMatrixSpy() as spy:
        model = _load(written["int8-bin"][0])
    assert spy.seen == []
    assert isinstance(model.transformer.layers[0].mlp.dense_4h_to_h, QuantizedLinear)

    with FloatMatrixSpy() as control:
        _load(written["fp16-sharded"][0], quantization_bit=8)
    assert control.seen, "the spy must see the float matrices that the FP16 checkpoint holds"


@pytest.mark.parametrize("name", ["int8-bin", "int8-safetensors", "fp16-sharded", "int4-bin"])
def test_cpu_weights_in_large_pages_equal_what_was_written(written, name, monkeypatch):
    """CPU weights are copied to 2 MB-aligned memory advised for huge pages (cpu_kernels.to_large_pages),
    read from the file with pread for .bin checkpoints (loading.MappedFile). The threshold (2 MB) is
    lowered so that the tiny checkpoint's tensors take that path too. Without transparent huge pages
    (or off Linux) the weights stay where they were loaded, and must still equal the file."""
    from chatglm6b import cpu_kernels, loading

    monkeypatch.setattr(cpu_kernels, "LARGE_PAGE_MIN_BYTES", 1)
    read = []
    original = loading.MappedFile._read
    monkeypatch.setattr(loading.MappedFile, "_read", lambda self, a, n, o: (read.append(n), original(self, a, n, o)))
    folder, ref = written[name]
    model = _load(folder)
    model.wait_for_large_pages()  # .bin weights move after loading, on a background thread
    _assert_same_state(model.state_dict(), ref, skip=[k for k in ref if k.endswith("inv_freq")])
    weights = [m.weight for m in model.modules() if isinstance(m, QuantizedLinear)] or \
        [model.transformer.layers[0].mlp.dense_h_to_4h.weight]
    weights.append(model.transformer.word_embeddings.weight)
    if not cpu_kernels.large_pages_enabled():
        assert read == []
        return
    for w in weights:
        assert w.data_ptr() % (2 << 20) == 0, "not on a 2 MB boundary"
    # .bin files (sharded too) are mapped by torch.load, .safetensors by the loader (loading._map_safetensors);
    # the weights are read from the file instead of through the mapping
    assert sum(read) >= sum(w.numel() * w.element_size() for w in weights)


def test_safetensors_weights_stay_in_the_file_mapping(written, monkeypatch):
    """A .safetensors checkpoint loads like a .bin one: the CPU weights are views of a private mapping
    of the file (nothing copied; safetensors' get_tensor would copy every tensor, which put a full-size
    CPU model at twice its size), equal to what was written."""
    from chatglm6b import loading

    monkeypatch.setenv("CHATGLM_LARGE_PAGES", "0")  # the weights stay where loading put them
    folder, ref = written["int8-safetensors"]
    model = _load(folder)
    _assert_same_state(model.state_dict(), ref, skip=[k for k in ref if k.endswith("inv_freq")])
    mapping = loading.MappedFile(str(folder / "model.safetensors"))
    try:
        assert mapping.ranges, "the file is not mapped"
        params = dict(model.named_parameters())
        for key in (EMBED, "transformer.layers.0.attention.query_key_value.weight",
                    "transformer.layers.27.mlp.dense_4h_to_h.weight_scale", "transformer.final_layernorm.bias"):
            assert mapping.offset(params[key]) is not None, f"{key} is a copy, not a view of the file"
    finally:
        mapping.close()


def test_mapped_safetensors_read_what_safetensors_reads(tmp_path):
    """loading._map_safetensors against safetensors' own reader, on a file whose tensors sit at offsets
    that are not multiples of their element size (those are copied; the aligned ones are views)."""
    from safetensors import safe_open

    from chatglm6b import loading

    values = {"a": torch.tensor([1, 2, 255], dtype=torch.uint8), "b": torch.randn(2, 3).half(),
              "c": torch.tensor(3.5), "d": torch.tensor([True, False]), "e": torch.zeros(0, 4, dtype=torch.bfloat16),
              "f": torch.tensor([[-128, 5], [127, 0]], dtype=torch.int8), "g": torch.arange(3, dtype=torch.int64)}
    names = {torch.uint8: "U8", torch.float16: "F16", torch.float32: "F32", torch.bool: "BOOL",
             torch.bfloat16: "BF16", torch.int8: "I8", torch.int64: "I64"}
    header, blobs, at = {}, [], 0
    for key, t in values.items():  # packed in this order: "b" starts at byte 3, "c" at 15, ...
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    text = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        theirs = {k: f.get_tensor(k) for k in keys}
    ours = dict(loading._map_safetensors(str(path), keys))
    assert sorted(ours) == sorted(values)
    for key, t in values.items():
        assert ours[key].dtype == theirs[key].dtype == t.dtype, key
        assert ours[key].shape == theirs[key].shape == t.shape, key
        assert torch.equal(ours[key], theirs[key]), key
    mapping = loading.MappedFile(str(path))
    try:
        assert mapping.offset(ours["a"]) is not None and mapping.offset(ours["f"]) is not None  # views
        assert mapping.offset(ours["b"]) is None  # byte 3: not an fp16 boundary, copied
    finally:
        mapping.close()


def _quantized_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, QuantizedLinear)]


@pytest.fixture
def small_large_pages(monkeypatch):
    """Every CPU tensor counts as large (the real threshold, 2 MB, exceeds the tiny checkpoints')."""
    from chatglm6b import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "LARGE_PAGE_MIN_BYTES", 1)
    # the copying and swapping run even where THP is set to "never" (madvise still succeeds there)
    monkeypatch.setattr(cpu_kernels, "_thp_available", lambda: True)
    return cpu_kernels


def test_weights_move_in_the_background_only_while_idle(written, small_large_pages, monkeypatch):
    """Loading returns with the weights still in the file's mapping; they move to 2 MB pages only
    while no CPU kernel runs (busy simulated here), and end up equal to the file."""
    from chatglm6b import loading

    monkeypatch.setattr(small_large_pages, "_ACTIVITY", [1, 0.0])  # a kernel call is "running"
    folder, ref = written["int8-bin"]
    model = _load(folder)
    status = model.wait_for_large_pages(timeout=0.5)
    assert not status["done"] and status["moved"] == 0 and status["total"] > 0
    assert all(w.data_ptr() % (2 << 20) for w in _quantized_weights(model))  # still mapped
    with torch.no_grad():  # usable meanwhile
        model(input_ids=torch.tensor([[5, 6, 130001, 130004]]))
    small_large_pages._ACTIVITY[0] = 0  # idle from now on
    status = model.wait_for_large_pages(timeout=60)
    assert status["done"] and status["moved"] == status["total"]
    assert all(w.data_ptr() % (2 << 20) == 0 for w in _quantized_weights(model))
    _assert_same_state(model.state_dict(), ref, skip=[k for k in ref if k.endswith("inv_freq")])
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert loading._MIGRATIONS.get(model) is not None


def test_conversion_during_the_move_stops_it(written, small_large_pages, monkeypatch):
    """.bfloat16() (any model._apply) while weights are moving: the move stops first, the
    conversion sees consistent tensors, and no later swap brings a CPU copy back."""
    import copy

    monkeypatch.setattr(small_large_pages, "_ACTIVITY", [1, 0.0])
    folder, ref = written["int8-bin"]
    model = _load(folder)
    clone = copy.deepcopy(model)  # the background job is not part of the model's state
    model.bfloat16()
    small_large_pages._ACTIVITY[0] = 0
    assert model.wait_for_large_pages(timeout=60)["done"]
    assert model.transformer.word_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(model.transformer.word_embeddings.weight, ref[EMBED].bfloat16())
    for k, v in model.state_dict().items():
        if k.endswith(".weight") and v.dtype == torch.int8:
            assert torch.equal(v, ref[k]), k
    _assert_same_state(clone.state_dict(), ref, skip=[k for k in ref if k.endswith("inv_freq")])


def test_a_script_may_end_while_weights_are_moving(tmp_path):
    """A script that ends while weights are still moving to 2 MB pages exits cleanly: the move is
    stopped and joined at interpreter exit. Before, the daemon thread was torn down wherever it was;
    inside a torch call that aborts the process ("terminate called without an active exception",
    status 134; seen in 1-3 of 4 runs of a script loading a few models). The child keeps the move
    waiting (a CPU kernel call "running") so it is certainly alive at exit, and an exit hook that
    runs after the package's reports whether the thread was still alive."""
    import subprocess
    import sys

    from chatglm6b import cpu_kernels

    folder = model_folder(tmp_path, "int8")
    code = ("import atexit, sys\n"
            "state = {}\n"
            "def report():\n"
            "    job = state.get('job')\n"
            "    print('alive at exit' if job is not None and job.is_alive() else 'stopped at exit', flush=True)\n"
            "atexit.register(report)  # registered first: runs after the package's own exit hook\n"
            "from transformers import AutoModel\n"
            "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
            "pkg = type(m).__module__.rsplit('.', 1)[0]\n"
            "sys.modules[pkg + '.cpu_kernels']._ACTIVITY[:] = [1, 0.0]  # busy: the move waits\n"
            "state['job'] = sys.modules[pkg + '.loading']._MIGRATIONS.get(m)\n"
            "print('moving' if state['job'] is not None and state['job'].is_alive() else 'done', flush=True)\n")
    env = dict(os.environ, CHATGLM_LARGE_PAGES="1")
    thp = cpu_kernels._thp_available()
    for _ in range(3):  # (the move may finish before the child marks it busy: then again)
        out = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0 and "terminate called" not in out.stderr, (out.returncode, out.stderr[-2000:])
        if "moving" in out.stdout.split() or not thp:
            break
    if not thp:  # no transparent huge pages here: no background move at all
        assert out.stdout.split()[:1] == ["done"]
        return
    assert out.stdout.strip().splitlines() == ["moving", "stopped at exit"], out.stdout


def test_sync_mode_moves_while_loading(written, small_large_pages, monkeypatch):
    monkeypatch.setenv("CHATGLM_LARGE_PAGES", "sync")
    folder, ref = written["int8-bin"]
    model = _load(folder)
    assert model.wait_for_large_pages(timeout=0) == {"moved": 0, "total": 0, "seconds": 0.0, "done": True}
    assert all(w.data_ptr() % (2 << 20) == 0 for w in _quantized_weights(model))
    _assert_same_state(model.state_dict(), ref, skip=[k for k in ref if k.endswith("inv_freq")])


# A child process: the kernel build is process-wide state (this process has built them already).
_FIRST_LOAD_CHILD = """
import json, os, sys, time, types, warnings
root, folder, mode, pidfile, out = sys.argv[1:6]
pkg = types.ModuleType('chatglm6b'); pkg.__path__ = [root]; sys.modules['chatglm6b'] = pkg
import torch
from chatglm6b import cpu_kernels, loading
from chatglm6b.modeling_chatglm import ChatGLMForConditionalGeneration
cpu_kernels.LARGE_PAGE_MIN_BYTES = 1  # the tiny checkpoint's weights count as large
cpu_kernels._thp_available = lambda: True
res = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    t0 = time.perf_counter()
    model = ChatGLMForConditionalGeneration.from_pretrained(folder)
    res['load_s'] = time.perf_counter() - t0
    res['built_during_load'] = cpu_kernels._KERNELS._tried
    job = loading._MIGRATIONS.get(model)
    res['job_alive'] = job is not None and job.is_alive()
    if mode == 'convert':
        deadline = time.time() + 60
        while not os.path.exists(pidfile) and time.time() < deadline:
            time.sleep(0.02)
        res['compiler_started'] = os.path.exists(pidfile)
        t0 = time.perf_counter()
        model.half()  # (any model._apply: .cuda() does the same)
        res['convert_s'] = time.perf_counter() - t0
        res['job_alive_after'] = job.is_alive()
        res['remembered'] = cpu_kernels._KERNELS._tried
        os.environ['CC'] = 'gcc' if os.system('gcc --version >/dev/null 2>&1') == 0 else 'cc'
        res['available_later'] = cpu_kernels.available()  # builds now: the cancel was not a failure
    else:
        with torch.no_grad():  # right away: waits for the background build, then runs the kernels
            logits = model(input_ids=torch.tensor([[int(a) for a in sys.argv[6:]]])).logits
        torch.save(logits, out)
        res['kernel_info'] = cpu_kernels.kernel_info()
        res['moved'] = model.wait_for_large_pages(timeout=120)
res['warnings'] = [str(w.message) for w in caught]
print('RESULT ' + json.dumps(res), flush=True)
"""


def _first_load_child(folder, cache, mode, env_extra=(), args=(), pidfile="", out=""):
    env = dict(os.environ, CHATGLM_CACHE_DIR=str(cache), CHATGLM_LARGE_PAGES="1", **dict(env_extra))
    env.pop("CHATGLM_KERNELS", None)
    return run_child(_FIRST_LOAD_CHILD, ROOT, folder, mode, pidfile, out, *args, env=env)


def test_a_first_load_does_not_wait_for_the_kernel_build_and_a_conversion_cancels_it(tmp_path):
    """On a machine whose kernel cache is empty, loading returns without running the C compiler (the
    background weight move builds the CPU kernels first), and a model converted or sent to a GPU right
    after loading (``.half()``, ``.cuda()``) cancels that build: the compiler is killed at once, nothing
    is left in the cache, no warning, and the cancel is not remembered as a failure (a later use builds).
    The compiler is a stand-in that would take 120 s (in a child process, as gcc's cc1) and records
    the pids."""
    fake, pidfile, cache = tmp_path / "slowcc", tmp_path / "cc.pid", tmp_path / "cache"
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "slowcc 1.0"; exit 0; fi\n'
                    f'sleep 120 &\necho $$ $! > "{pidfile}"\nwait\n')  # (a child holding the pipes, like cc1)
    fake.chmod(0o755)
    res = _first_load_child(model_folder(tmp_path, "int8"), cache, "convert", {"CC": str(fake)}, pidfile=pidfile)
    assert not res["built_during_load"] and res["job_alive"] and res["load_s"] < 60, res
    assert res["compiler_started"], res
    assert res["convert_s"] < 10 and not res["job_alive_after"], res
    for pid in pidfile.read_text().split():  # the compiler and its child were killed (gone, or a zombie)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        assert state == "Z", (pid, state)
    assert not res["remembered"] and res["available_later"], res
    assert res["warnings"] == [], res["warnings"]
    left = os.listdir(cache)  # the later build's library only: no temporary file of the cancelled one
    assert len(left) == 1 and left[0].startswith("cpu_kernels-") and left[0].endswith(".so"), left


def test_a_first_load_then_a_forward_waits_for_the_build_and_runs_the_kernels(tmp_path, golden):
    """The CPU user's side of the above: a forward right after a first load (empty kernel cache) waits
    for the background build, runs on the kernels it built, matches the golden logits, and the
    weights then move to 2 MB pages."""
    _, g = golden
    ids = _prompt(g, "int8", 1)[0].tolist()
    out = tmp_path / "logits.pt"
    res = _first_load_child(model_folder(tmp_path, "int8"), tmp_path / "cache", "forward", args=ids, out=out)
    assert not res["built_during_load"] and res["warnings"] == [], res
    info = res["kernel_info"]
    assert info["available"] and info["compiled_in_this_process"], info
    assert res["moved"]["done"] and res["moved"]["moved"] == res["moved"]["total"] > 0, res["moved"]
    logits = torch.load(out)
    torch.testing.assert_close(logits[:, -1], g["int8.prompt1.last"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[..., g["vocab_probe"]], g["int8.prompt1.slice"], atol=ATOL, rtol=0)


def test_large_pages_can_be_switched_off(written, monkeypatch):
    from chatglm6b import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "LARGE_PAGE_MIN_BYTES", 1)
    monkeypatch.setenv("CHATGLM_LARGE_PAGES", "0")
    assert not cpu_kernels.large_pages_enabled()
    t = torch.arange(5000, dtype=torch.int32)
    assert cpu_kernels.to_large_pages(t) is t
    folder, ref = written["int8-bin"]
    _assert_same_state(_load(folder).state_dict(), ref, skip=[k for k in ref if k.endswith("inv_freq")])


# ---------------------------------------------------------------------------------------------
# FP16 checkpoint + quantization_bit override

@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_on_load_equals_load_then_quantize(tmp_path, golden, bits):
    _, g = golden
    folder = model_folder(tmp_path, "fp16")
    on_load = _auto(folder, quantization_bit=bits)
    after = _auto(folder).quantize(bits)
    assert on_load.config.quantization_bit == bits
    assert type(on_load.transformer.layers[27].attention.dense).__name__ == "QuantizedLinear"
    _assert_same_state(on_load.state_dict(), after.state_dict())
    qkv = on_load.transformer.layers[0].attention.query_key_value
    assert torch.equal(qkv.weight, g[f"quantize{bits}.layer0.qkv.weight"])
    assert torch.equal(qkv.weight_scale.float(), g[f"quantize{bits}.layer0.qkv.weight_scale"])
    _assert_golden_logits(on_load, g, f"quantize{bits}", prompts=(2,))


def test_bad_quantization_bit_override_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"quantization_bit must be 0 \(FP16\), 4 or 8"):
        _auto(model_folder(tmp_path, "fp16"), quantization_bit=5)


# ---------------------------------------------------------------------------------------------
# Refusals: every error names the key and what was expected

@pytest.fixture(scope="module")
def int8_state():
    cfg = mc.make_config("tiny", 8)
    return cfg, mc.random_state_dict(cfg, 8, seed=SEED)


def _broken(tmp_path, int8_state, edit, config_edit=None):
    cfg, sd = int8_state
    sd, cfg = dict(sd), dict(cfg)
    edit(sd)
    if config_edit:
        config_edit(cfg)
    return _write_bin(tmp_path / "broken", cfg, sd)


def test_missing_key(tmp_path, int8_state):
    folder = _broken(tmp_path, int8_state, lambda sd: sd.pop("transformer.layers.3.mlp.dense_4h_to_h.bias"))
    with pytest.raises(CheckpointError, match=r"lacks transformer\.layers\.3\.mlp\.dense_4h_to_h\.bias"):
        _load(folder)


def test_missing_weight_scale(tmp_path, int8_state):
    folder = _broken(tmp_path, int8_state, lambda sd: sd.pop("transformer.layers.0.attention.dense.weight_scale"))
    with pytest.raises(CheckpointError, match=r"lacks transformer\.layers\.0\.attention\.dense\.weight_scale"):
        _load(folder)


def test_unexpected_key(tmp_path, int8_state):
    def edit(sd):
        sd["transformer.layers.3.attention.extra.weight"] = torch.zeros(4, dtype=torch.float16)

    with pytest.raises(CheckpointError, match=r"unexpected key 'transformer\.layers\.3\.attention\.extra\.weight'"):
        _load(_broken(tmp_path, int8_state, edit))


def test_prefix_encoder_without_pre_seq_len(tmp_path, int8_state):
    def edit(sd):
        sd["transformer.prefix_encoder.embedding.weight"] = torch.zeros(4, 28 * 2 * 64, dtype=torch.float16)

    with pytest.raises(CheckpointError, match=r"prefix_encoder\.embedding\.weight.*set pre_seq_len"):
        _load(_broken(tmp_path, int8_state, edit))


def test_wrong_shape_names_key_and_expected_shape(tmp_path, int8_state):
    def edit(sd):
        sd["transformer.layers.2.post_attention_layernorm.bias"] = torch.zeros(65, dtype=torch.float16)

    with pytest.raises(CheckpointError, match=r"layers\.2\.post_attention_layernorm\.bias: shape \(65,\).*expects \(64,\)"):
        _load(_broken(tmp_path, int8_state, edit))


@pytest.mark.parametrize("key,dtype,expected", [
    ("transformer.layers.1.attention.dense.weight", torch.int32, "expected int8 for quantization_bit 8"),
    ("transformer.layers.1.attention.dense.weight_scale", torch.int16, "expected a floating-point tensor"),
    ("transformer.layers.1.input_layernorm.weight", torch.int8, "expected a floating-point tensor"),
    (EMBED, torch.int64, "expected a floating-point tensor"),
])
def test_wrong_dtype_names_key_and_expected_dtype(tmp_path, int8_state, key, dtype, expected):
    def edit(sd):
        sd[key] = sd[key].to(dtype)
        if key == EMBED:
            sd[HEAD] = sd[key]

    with pytest.raises(CheckpointError, match=rf"{key.replace('.', r'[.]')}: dtype {dtype}, {expected}"):
        _load(_broken(tmp_path, int8_state, edit))


def test_int4_file_under_int8_config_is_refused(tmp_path):
    folder = model_folder(tmp_path, "int4", {"quantization_bit": 8})
    with pytest.raises(ValueError, match=r"query_key_value\.weight: shape \(192, 32\).*expects \(192, 64\)"
                                              r".*INT4 checkpoint: set quantization_bit 4"):
        _auto(folder)


def test_int8_file_under_int4_config_is_refused(tmp_path):
    folder = model_folder(tmp_path, "int8", {"quantization_bit": 4})
    with pytest.raises(ValueError, match=r"shape \(192, 64\).*expects \(192, 32\).*INT8 checkpoint"):
        _auto(folder)


def test_int8_file_under_fp16_config_is_refused(tmp_path, int8_state):
    def no_quant(cfg):
        del cfg["quantization_bit"], cfg["quantization_embeddings"]

    folder = _broken(tmp_path, int8_state, lambda sd: None, no_quant)
    with pytest.raises(CheckpointError, match=r"query_key_value\.weight: dtype torch\.int8.*add \"quantization_bit\""):
        _load(folder)


def test_tied_copies_that_differ_are_refused(tmp_path, int8_state):
    def edit(sd):
        sd[HEAD] = sd[EMBED].clone()
        sd[HEAD][17, 3] += 1

    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs from the transformer\.word_embeddings\.weight"):
        _load(_broken(tmp_path, int8_state, edit))


def test_tied_copy_with_wrong_shape_is_refused(tmp_path, int8_state):
    def edit(sd):
        sd[HEAD] = torch.zeros(130528, 65, dtype=torch.float16)

    with pytest.raises(CheckpointError, match=r"lm_head\.weight: shape \(130528, 65\).*expects \(130528, 64\)"):
        _load(_broken(tmp_path, int8_state, edit))


def test_key_stored_in_two_shards_is_refused(tmp_path, written):
    src, _ = written["fp16-sharded"]
    dst = tmp_path / "dup"
    shutil.copytree(src, dst)
    first = dst / "pytorch_model-00001-of-00008.bin"
    second = dst / "pytorch_model-00002-of-00008.bin"
    a, b = torch.load(first, weights_only=True), torch.load(second, weights_only=True)
    b["transformer.final_layernorm.bias"] = torch.zeros(64, dtype=torch.float16)
    torch.save(b, second)
    a["transformer.final_layernorm.bias"] = torch.zeros(64, dtype=torch.float16)
    torch.save(a, first)
    with pytest.raises(CheckpointError, match=r"transformer\.final_layernorm\.bias is stored twice"):
        _load(dst)


def test_non_tensor_entries_are_refused(tmp_path, int8_state):
    with pytest.raises(CheckpointError, match=r"entry 'epoch' is a int, not a tensor"):
        _load(_broken(tmp_path, int8_state, lambda sd: sd.update(epoch=3)))


def test_pickle_that_runs_code_is_refused_not_executed(tmp_path, int8_state):
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = _broken(tmp_path, int8_state, lambda sd: sd.update({"transformer.evil": RunsCode()}))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"weights-only PyTorch checkpoint.*weights_only=True"):
        _load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["pytorch_model.bin", "model.safetensors", "shard", "index"])
def test_lfs_pointer_instead_of_weights(tmp_path, written, victim):
    name = {"pytorch_model.bin": "int8-bin", "model.safetensors": "int8-safetensors"}.get(victim, "fp16-sharded")
    dst = tmp_path / "lfs"
    shutil.copytree(written[name][0], dst)
    target = {"shard": "pytorch_model-00004-of-00008.bin", "index": "pytorch_model.bin.index.json"}.get(victim, victim)
    (dst / target).write_text(LFS_POINTER)
    with pytest.raises(CheckpointError, match=rf"{target.replace('.', '[.]')} is a Git LFS pointer.*git lfs pull"):
        _load(dst)


def test_missing_shard(tmp_path, written):
    dst = tmp_path / "noshard"
    shutil.copytree(written["fp16-sharded"][0], dst)
    (dst / "pytorch_model-00008-of-00008.bin").unlink()
    with pytest.raises(CheckpointError, match=r"lists shards that are not there: \['pytorch_model-00008-of-00008\.bin'\]"):
        _load(dst)


def test_no_weights_at_all(tmp_path):
    dst = tmp_path / "empty"
    dst.mkdir()
    shutil.copy(CONFORMANCE / "int8" / "config.json", dst)
    with pytest.raises(CheckpointError, match=r"no weights found.*pytorch_model\.bin.*git lfs pull"):
        _load(dst)


def test_unknown_from_pretrained_argument(written):
    with pytest.raises(TypeError, match=r"unexpected arguments \['load_in_3bit'\]"):
        _load(written["int8-bin"][0], load_in_3bit=True)


@pytest.mark.parametrize("flag, says", [("load_in_8bit", "quantization_bit=8"), ("load_in_4bit", "quantization_bit=4"),
                                        ("use_flash_attention_2", "attn_implementation"), ("from_tf", "PyTorch"),
                                        ("from_flax", "PyTorch")])
def test_switches_it_cannot_honour_are_refused_when_set(written, flag, says):
    """Asked for (True): a ValueError saying what to do instead, not a model loaded some other way
    (load_in_8bit on an FP16 checkpoint used to load 12 GB of fp16 weights). False: fine."""
    folder = written["int8-bin"][0]
    with pytest.raises(ValueError, match=rf"{flag}=True.*{says}"):
        _load(folder, **{flag: True})
    assert _load(folder, **{flag: False}) is not None


@pytest.mark.parametrize("name, value, says", [
    ("variant", "fp16", "no variants"), ("gguf_file", "model.gguf", "GGUF"), ("tp_plan", "auto", "tensor parallel"),
    ("key_mapping", {"a": "b"}, "keys"), ("state_dict", {}, None), ("adapter_name", "lora", "peft")])
def test_arguments_it_cannot_honour_are_refused_when_given(written, name, value, says):
    folder = written["int8-bin"][0]
    if value == {}:  # an empty state_dict is still a state_dict given
        value = {"x": torch.zeros(1)}
    with pytest.raises(ValueError, match=rf"{name}=\.\.\..*{says or ''}"):
        _load(folder, **{name: value})
    assert _load(folder, **{name: None}) is not None


def test_auto_model_on_an_adapter_folder_is_refused(tmp_path):
    """AutoModel on a folder holding only a peft adapter (transformers >= 4.35 with peft: it loads the
    base model named there through us and expects us to attach the adapter): refused with what to do,
    not a base model without its adapter. transformers 4.27 has no such path (no config.json there)."""
    import transformers

    base = model_folder(tmp_path, "int8")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": str(base), "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4,
        "lora_alpha": 8, "target_modules": ["query_key_value"]}))
    if int(transformers.__version__.split(".")[0]) >= 5:
        with pytest.raises(ValueError, match=r"holds a peft adapter.*PeftModel\.from_pretrained"):
            _auto(adapter)
    else:
        with pytest.raises((OSError, ValueError)):
            _auto(adapter)


def test_auto_model_for_causal_lm_with_the_official_config(tmp_path):
    """AutoModelForCausalLM (what lm-eval / TRL load) works next to the official config.json, whose
    auto_map names AutoModel and AutoModelForSeq2SeqLM only: the same class, the same logits."""
    from transformers import AutoModelForCausalLM

    folder = model_folder(tmp_path, "int8")
    assert "AutoModelForCausalLM" not in json.loads((folder / "config.json").read_text())["auto_map"]
    causal = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
    plain = _auto(folder)
    assert type(causal).__name__ == type(plain).__name__ == "ChatGLMForConditionalGeneration"
    ids = torch.tensor([[5, 6, 7, 130001, 130004]])
    with torch.no_grad():
        assert torch.equal(causal(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_generation_config_argument_is_applied(written):
    from transformers import GenerationConfig

    folder = written["int8-bin"][0]
    given = GenerationConfig(max_length=77, top_p=0.5, do_sample=True)
    model = _load(folder, generation_config=given)
    assert model.generation_config.max_length == 77 and model.generation_config.top_p == 0.5
    with pytest.raises(TypeError, match="GenerationConfig"):
        _load(folder, generation_config={"max_length": 77})


@pytest.mark.parametrize("impl", ["sdpa", "flash_attention_2", "flex_attention"])
def test_attention_implementation_cannot_be_chosen(tmp_path, impl):
    """The same answer on every transformers version (5.x refuses these for the class itself; 4.x
    accepted "sdpa" and then ignored it): a ValueError; "eager" (what runs) loads."""
    folder = model_folder(tmp_path, "int8")
    with pytest.raises(ValueError, match=r"attn|attention"):
        _auto(folder, attn_implementation=impl)
    with pytest.raises(ValueError, match=r"attn|attention"):
        _load(folder, attn_implementation=impl)
    assert _auto(folder, attn_implementation="eager") is not None


@pytest.mark.parametrize("bad", [torch.int8, "float8"])
def test_unsupported_torch_dtype(written, bad):
    with pytest.raises(ValueError, match=r"torch_dtype must be torch\.float16, torch\.bfloat16, torch\.float32 or 'auto'"):
        _load(written["int8-bin"][0], torch_dtype=bad)


def test_output_loading_info_reports_nothing_missing(written):
    model, info = _load(written["int8-bin"][0], output_loading_info=True)
    assert isinstance(model, ChatGLMForConditionalGeneration)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}


def test_ptuning_prefix_inside_the_checkpoint_loads_without_warning(tmp_path, golden, recwarn):
    """int8 weights + a trained prefix encoder in one file (how a P-tuned model is shipped)."""
    _, g = golden
    sd = torch.load(CONFORMANCE / "int8" / "pytorch_model.bin", weights_only=True)
    sd.update(torch.load(CONFORMANCE / "ptuning_proj1" / "prefix_encoder.bin", weights_only=True))
    cfg = json.loads((CONFORMANCE / "ptuning_proj1" / "config.json").read_text())
    model = _load(_write_bin(tmp_path / "pt", cfg, sd))
    assert not [w for w in recwarn if "prefix" in str(w.message)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    _assert_golden_logits(model, g, "ptuning1", prompts=(0,))


# ---------------------------------------------------------------------------------------------
# Devices and dtypes

def test_no_split_modules():
    assert ChatGLMForConditionalGeneration._no_split_modules == ["GLMBlock"]


@pytest.mark.parametrize("tag", ["int8", "fp16"])
def test_cpu_out_of_the_box_and_lossless_conversions(tmp_path, golden, tag):
    """No .float() needed; .float() / .half() / .to(...) on CPU keep the golden logits (fp16
    weights compute in fp32 on CPU, and fp16 -> fp32 -> fp16 is exact)."""
    _, g = golden
    model = _auto(model_folder(tmp_path, tag))
    assert set(model._no_split_modules) == {"GLMBlock"}  # 5.x turns the list into a set on instances
    assert model.device.type == "cpu" and model.dtype == torch.float16
    _assert_golden_logits(model, g, tag, prompts=(0,))
    steps = [(lambda m: m.float(), torch.float32), (lambda m: m.half(), torch.float16),
             (lambda m: m.to(torch.float32), torch.float32), (lambda m: m.to("cpu", torch.float16), torch.float16),
             (lambda m: m.to(torch.device("cpu")), torch.float16)]
    for convert, dtype in steps:
        model = convert(model)
        floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
        assert floats == {dtype}
        _assert_golden_logits(model, g, tag, prompts=(4,))
    if tag == "int8":
        assert model.transformer.layers[0].attention.query_key_value.weight.dtype == torch.int8


@pytest.mark.parametrize("torch_dtype,expect", [("auto", torch.float16), (torch.float32, torch.float32),
                                                 ("float32", torch.float32), (None, torch.float16)])
def test_torch_dtype_argument(tmp_path, golden, torch_dtype, expect):
    _, g = golden
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    model = _auto(model_folder(tmp_path, "int8"), **kwargs)
    assert model.dtype == expect
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {expect}
    _assert_golden_logits(model, g, "int8", prompts=(1,))


# bf16 keeps 8 significant bits: unit roundoff u = 2^-8. Each of the 28 blocks rounds ~12
# intermediate results (LN, q/k/v, rotary, scores, probs, context, dense, residual, MLP x2, ...),
# ~340 roundings; independent rounding errors grow like sqrt(n)·u ≈ 18 · 0.0039 ≈ 7 %. The
# logits' relative L2 error against the fp32 goldens must stay within 10 % (fp32 gives ~1e-6).
BF16_REL_TOL = 0.10


def _bf16_rel_error(model, g, tag, i):
    with torch.no_grad():
        logits = model(input_ids=_prompt(g, tag, i)).logits
    assert logits.dtype == torch.bfloat16  # computed in bf16, not silently upcast
    gold = g[f"{tag}.prompt{i}.slice"]
    got = logits.float()[..., g["vocab_probe"]]
    last = logits.float()[:, -1]
    return max(((got - gold).norm() / gold.norm()).item(),
               ((last - g[f"{tag}.prompt{i}.last"]).norm() / g[f"{tag}.prompt{i}.last"].norm()).item())


@pytest.mark.parametrize("how", ["torch_dtype", ".bfloat16()"])
@pytest.mark.parametrize("tag", ["int8", "fp16"])
def test_bfloat16_on_cpu(tmp_path, golden, tag, how):
    _, g = golden
    folder = model_folder(tmp_path, tag)
    model = _auto(folder, torch_dtype=torch.bfloat16) if how == "torch_dtype" else _auto(folder).bfloat16()
    assert model.dtype == torch.bfloat16
    if tag == "int8" and how == "torch_dtype":
        # the loader keeps the per-row scales in fp16 (bf16 would drop 3 of their bits)
        assert model.transformer.layers[0].mlp.dense_h_to_4h.weight_scale.dtype == torch.float16
    for i in range(5):
        assert _bf16_rel_error(model, g, tag, i) < BF16_REL_TOL


# ---------------------------------------------------------------------------------------------
# Saving: FP16 -> quantize(8) -> save_pretrained writes the official INT8 layout

@pytest.fixture(scope="module")
def saved_int8(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("save")
    model = _auto(model_folder(tmp, "fp16")).quantize(8)
    out = tmp / "saved-int8"
    model.save_pretrained(str(out))
    return model, out


def test_save_writes_the_official_int8_layout(saved_int8):
    import transformers

    _, out = saved_int8
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_bit"] == 8 and cfg["model_type"] == "chatglm"
    official = torch.load(CONFORMANCE / "int8" / "pytorch_model.bin", weights_only=True)
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in official.items()}
    assert len(layout) == 480
    if int(transformers.__version__.split(".")[0]) < 5:
        assert (out / "pytorch_model.bin").is_file()
        sd = torch.load(out / "pytorch_model.bin", weights_only=True)
        assert sd[HEAD].untyped_storage().data_ptr() == sd[EMBED].untyped_storage().data_ptr()  # stored once
    else:
        assert (out / "model.safetensors").is_file()
        sd = load_file(str(out / "model.safetensors"))
        assert (EMBED in sd) != (HEAD in sd)  # the tied matrix under one name only
        layout.pop(HEAD if EMBED in sd else EMBED)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == layout


def test_saved_int8_reloads_to_identical_logits(saved_int8, golden):
    _, g = golden
    model, out = saved_int8
    for name in mc.package_files(ROOT):  # code next to the weights, as on the Hub
        if not (out / name).exists():
            shutil.copy(ROOT / name, out / name)
    reloaded = _auto(out)
    assert reloaded.config.quantization_bit == 8
    _assert_same_state(reloaded.state_dict(), model.state_dict())
    for i in (0, 2):
        ids = _prompt(g, "quantize8", i)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    _assert_golden_logits(reloaded, g, "quantize8", prompts=(3,))
