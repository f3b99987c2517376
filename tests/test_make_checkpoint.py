"""tools/make_checkpoint.py writes checkpoints a loader cannot tell from the published layout.

The oracle for names, order, dtypes and shapes is the conformance checkpoints (made in the
official layout by the original code's tooling) and SPEC §1–§3; the quantization checks follow
the definition in SPEC §3, not our own generator.
"""
import json
import math
import zipfile

import pytest
import torch

from chatglm6b.quantization import dequantize_weight, quantize_weight, unpack_int4
from chatglm6b.tools import make_checkpoint as mc

BITS_DIR = {8: "int8", 4: "int4", 16: "fp16"}
EMB, LM_HEAD = "transformer.word_embeddings.weight", "lm_head.weight"


def load(path):
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


@pytest.fixture(scope="module")
def official(conformance_dir):
    """Key -> (dtype, shape) of each conformance checkpoint, in file order."""
    out = {}
    for bits, name in BITS_DIR.items():
        sd = load(conformance_dir / name / "pytorch_model.bin")
        out[bits] = [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny checkpoints (seed 7) in every bit width, written once for the module: bits -> folder."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for bits in (8, 4, 16):
        out[bits] = root / f"b{bits}"
        mc.write_checkpoint(out[bits], mc.make_config("tiny", bits), bits, "bin", seed=7)
    return out


def quantized_weights(sd):
    return {k: v for k, v in sd.items() if v.dtype == torch.int8}


# --- layout -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 16])
def test_tiny_bin_has_exactly_the_official_keys_order_dtypes_shapes(tiny, official, bits):
    sd = load(tiny[bits] / "pytorch_model.bin")
    ours = [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    assert ours == official[bits]
    assert len(ours) == {8: 480, 4: 480, 16: 368}[bits]  # SPEC §2


@pytest.mark.parametrize("bits", [8, 4, 16])
def test_config_json_is_byte_identical_to_the_official_one(tiny, conformance_dir, bits):
    assert (tiny[bits] / "config.json").read_bytes() == (conformance_dir / BITS_DIR[bits] / "config.json").read_bytes()


def test_config_quantization_keys_only_for_quantized():
    assert mc.make_config("full", 8)["quantization_bit"] == 8
    assert mc.make_config("full", 4)["quantization_bit"] == 4
    assert mc.make_config("full", 8)["quantization_embeddings"] is False
    fp16 = mc.make_config("full", 16)
    assert "quantization_bit" not in fp16 and "quantization_embeddings" not in fp16
    assert fp16["torch_dtype"] == "float16" and fp16["transformers_version"] == "4.27.1"


def test_full_preset_matches_spec_sizes_and_layout():
    cfg = mc.make_config("full", 8)
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["inner_hidden_size"], cfg["num_layers"],
            cfg["vocab_size"]) == (4096, 32, 16384, 28, 130528)
    layout = mc.checkpoint_layout(cfg)
    assert len(layout) == 480
    p = "transformer.layers.27."
    # SPEC §2 table
    assert layout[p + "attention.query_key_value.weight"] == (torch.int8, (12288, 4096))
    assert layout[p + "attention.query_key_value.weight_scale"] == (torch.float16, (12288,))
    assert layout[p + "attention.dense.weight"] == (torch.int8, (4096, 4096))
    assert layout[p + "mlp.dense_h_to_4h.weight"] == (torch.int8, (16384, 4096))
    assert layout[p + "mlp.dense_4h_to_h.weight"] == (torch.int8, (4096, 16384))
    assert layout[p + "mlp.dense_4h_to_h.bias"] == (torch.float16, (4096,))
    assert layout[p + "attention.rotary_emb.inv_freq"] == (torch.float16, (32,))
    assert layout[EMB] == layout[LM_HEAD] == (torch.float16, (130528, 4096))
    int4 = mc.checkpoint_layout(mc.make_config("full", 4))
    assert int4[p + "mlp.dense_4h_to_h.weight"] == (torch.int8, (4096, 8192))  # packed [out, in/2]
    fp16 = mc.checkpoint_layout(mc.make_config("full", 16))
    assert len(fp16) == 368 and fp16[p + "mlp.dense_h_to_4h.weight"] == (torch.float16, (16384, 4096))
    # 6.71 GB INT8 file (SPEC §2): every tensor once, the tied matrix once
    nbytes = sum(math.prod(s) * (1 if d == torch.int8 else 2) for k, (d, s) in layout.items() if k != LM_HEAD)
    assert round(nbytes / 1e9, 2) == 6.71


def test_size_overrides_change_shapes():
    cfg = mc.make_config("tiny", 8, hidden_size=32, num_attention_heads=2, inner_hidden_size=96, num_layers=2,
                         vocab_size=1000)
    sd = mc.random_state_dict(cfg, 8)
    assert sd["transformer.layers.1.attention.query_key_value.weight"].shape == (96, 32)
    assert sd["transformer.layers.1.mlp.dense_4h_to_h.weight"].shape == (32, 96)
    assert sd[EMB].shape == (1000, 32)
    assert sd["transformer.layers.1.attention.rotary_emb.inv_freq"].shape == (4,)  # head_dim 16 / 4
    assert not any(k.startswith("transformer.layers.2.") for k in sd)


@pytest.mark.parametrize("bad, fix_hint", [
    (dict(hidden_size=62), "divisible"),
    (dict(hidden_size=72, num_attention_heads=4), "multiple of 4"),  # head_dim 18
    (dict(num_layers=0), "positive"),
])
def test_bad_sizes_raise_errors_that_say_what_to_change(bad, fix_hint):
    with pytest.raises(ValueError, match=fix_hint):
        mc.make_config("tiny", 8, **bad)


def test_int4_needs_even_inner_size():
    with pytest.raises(ValueError, match="even"):
        mc.make_config("tiny", 4, inner_hidden_size=255)
    mc.make_config("tiny", 8, inner_hidden_size=255)  # fine unpacked


def test_bits_must_agree_with_the_config():
    with pytest.raises(ValueError, match="quantization_bit 8"):
        mc.random_state_dict(mc.make_config("tiny", 8), 4)
    with pytest.raises(ValueError, match="bits must be"):
        mc.make_config("tiny", 2)


def test_inv_freq_equals_the_official_values(tiny, conformance_dir):
    ours = load(tiny[8] / "pytorch_model.bin")["transformer.layers.3.attention.rotary_emb.inv_freq"]
    theirs = load(conformance_dir / "int8" / "pytorch_model.bin")["transformer.layers.3.attention.rotary_emb.inv_freq"]
    assert torch.equal(ours, theirs)
    full = mc.random_state_dict(mc.make_config("tiny", 8, hidden_size=256, num_attention_heads=2, num_layers=1), 8)
    inv = full["transformer.layers.0.attention.rotary_emb.inv_freq"]  # head_dim 128 like the real model
    assert inv.shape == (32,) and inv.dtype == torch.float16
    assert inv[1].item() == 0.75  # SPEC §4.2: 1/10000^(2/64) rounded to fp16
    expected = torch.tensor([10000.0 ** (-2 * i / 64) for i in range(32)]).half()
    assert torch.equal(inv, expected)


# --- the tied matrix ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 16])
def test_bin_stores_the_tied_matrix_once(tiny, bits):
    path = tiny[bits] / "pytorch_model.bin"
    sd = load(path)
    assert sd[EMB].untyped_storage().data_ptr() == sd[LM_HEAD].untyped_storage().data_ptr()
    with zipfile.ZipFile(path) as z:  # torch zip format: one data/N record per storage
        records = [n for n in z.namelist() if "/data/" in n]
    assert len(records) == len(sd) - 1
    unique = sum(v.numel() * v.element_size() for k, v in sd.items() if k != LM_HEAD)
    emb = sd[EMB].numel() * sd[EMB].element_size()
    size = path.stat().st_size
    assert unique <= size < unique + emb // 2  # a second copy would add the whole matrix


def test_in_memory_state_dict_ties_lm_head_to_the_embedding():
    sd = mc.random_state_dict(mc.make_config("tiny", 8), 8)
    assert sd[LM_HEAD] is sd[EMB]
    assert list(sd) == list(mc.checkpoint_layout(mc.make_config("tiny", 8)))


# --- quantization definition (SPEC §3) ----------------------------------------------------


@pytest.mark.parametrize("int_mode", ["quantize", "direct"])
def test_int8_rows_satisfy_the_quantization_definition(int_mode):
    cfg = mc.make_config("tiny", 8, num_layers=2)
    sd = mc.random_state_dict(cfg, 8, seed=3, int_mode=int_mode)
    for key, q in quantized_weights(sd).items():
        scale = sd[key + "_scale"]
        assert scale.dtype == torch.float16 and bool((scale > 0).all()) and bool(scale.isfinite().all())
        assert bool((q.abs().amax(dim=1) == 127).all()), key  # scale = max|W_row| / 127
        assert int(q.min()) >= -127  # -128 cannot come out of round(W / scale)
        # the dequantized matrix quantizes back to exactly (q, scale)
        w = dequantize_weight(q, scale, 8, dtype=torch.float32)
        q2, s2 = quantize_weight(w, 8)
        assert torch.equal(q2, q) and torch.equal(s2, scale.float()), key


@pytest.mark.parametrize("int_mode", ["quantize", "direct"])
def test_int4_rows_are_packed_and_satisfy_the_definition(int_mode):
    cfg = mc.make_config("tiny", 4, num_layers=2)
    sd = mc.random_state_dict(cfg, 4, seed=3, int_mode=int_mode)
    for key, packed in quantized_weights(sd).items():
        scale = sd[key + "_scale"]
        # manual unpack per SPEC §3: even column in the high nibble, both nibbles sign-extended
        b = packed.to(torch.int16) & 0xFF
        hi, lo = b >> 4, b & 0xF
        hi, lo = torch.where(hi > 7, hi - 16, hi), torch.where(lo > 7, lo - 16, lo)
        q = torch.stack((hi, lo), dim=-1).flatten(1)
        assert torch.equal(q.to(torch.int8), unpack_int4(packed))
        assert bool((q.abs().amax(dim=1) == 7).all()), key
        assert int(q.min()) >= -7
        q2, s2 = quantize_weight(q.float() * scale.float()[:, None], 4)
        assert torch.equal(q2, packed) and torch.equal(s2, scale.float()), key


def test_int_mode_auto_draws_directly_only_for_big_models():
    assert mc._resolve_int_mode("auto", mc.make_config("tiny", 8), 8) == "quantize"
    assert mc._resolve_int_mode("auto", mc.make_config("full", 8), 8) == "direct"
    with pytest.raises(ValueError, match="int_mode"):
        mc._resolve_int_mode("fast", mc.make_config("tiny", 8), 8)


# --- numerics -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits, int_mode", [(8, "quantize"), (8, "direct"), (4, "direct"), (16, "quantize")])
def test_weights_are_sane_for_an_fp16_forward(bits, int_mode):
    cfg = mc.make_config("tiny", bits, hidden_size=256, num_attention_heads=2, inner_hidden_size=1024,
                         num_layers=2)
    sd = mc.random_state_dict(cfg, bits, seed=1, int_mode=int_mode)
    for k, v in sd.items():
        if v.is_floating_point():
            assert bool(v.isfinite().all()), k
    p = "transformer.layers.1."
    ln_w = sd[p + "input_layernorm.weight"].float()
    assert abs(ln_w.mean().item() - 1) < 0.05 and ln_w.min().item() > 0.5
    assert sd[p + "attention.dense.bias"].float().abs().max().item() < 0.2

    def weight(name):
        if bits == 16:
            return sd[p + name + ".weight"]
        return dequantize_weight(sd[p + name + ".weight"], sd[p + name + ".weight_scale"], bits)

    # one pre-LN MLP in fp16 keeps O(1) activations: no overflow, no vanishing
    x = torch.nn.functional.layer_norm(torch.randn(8, 256), (256,)).half()
    h = torch.nn.functional.gelu(x @ weight("mlp.dense_h_to_4h").T, approximate="tanh")
    y = h @ weight("mlp.dense_4h_to_h").T
    assert bool(y.isfinite().all())
    assert 0.1 < y.float().std().item() < 3
    logits = x @ sd[EMB].T
    assert bool(logits.isfinite().all()) and 0.3 < logits.float().std().item() < 3


def test_same_seed_same_weights_other_seed_different():
    cfg = mc.make_config("tiny", 8, num_layers=2)
    a, b, c = (mc.random_state_dict(cfg, 8, seed=s) for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[EMB], c[EMB])
    assert not torch.equal(a["transformer.layers.0.attention.dense.weight"],
                           c["transformer.layers.0.attention.dense.weight"])
    # layers draw from their own streams: layer 0 and layer 1 differ
    assert not torch.equal(a["transformer.layers.0.mlp.dense_h_to_4h.weight"],
                           a["transformer.layers.1.mlp.dense_h_to_4h.weight"])


def test_other_float_dtype_in_memory():
    cfg = mc.make_config("tiny", 8, num_layers=1)
    sd = mc.random_state_dict(cfg, 8, dtype=torch.bfloat16)
    assert sd[EMB].dtype == torch.bfloat16 and sd["transformer.layers.0.attention.dense.weight_scale"].dtype == torch.bfloat16
    assert sd["transformer.layers.0.attention.dense.weight"].dtype == torch.int8


# --- safetensors and shards ---------------------------------------------------------------


def test_safetensors_single_copy_of_the_tied_matrix(tmp_path, tiny):
    from safetensors import safe_open

    mc.write_checkpoint(tmp_path, mc.make_config("tiny", 8), 8, "safetensors", seed=7)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors without it
        tensors = {k: f.get_tensor(k) for k in keys}
    official = list(load(tiny[8] / "pytorch_model.bin"))
    assert keys == set(official) - {LM_HEAD}
    unique = sum(v.numel() * v.element_size() for v in tensors.values())
    assert unique < path.stat().st_size < unique + 100_000  # header only on top of one copy of each
    # same seed, same values as the .bin
    ref = load(tiny[8] / "pytorch_model.bin")
    assert all(torch.equal(tensors[k], ref[k]) for k in keys)


@pytest.mark.parametrize("bits", [16, 8])
def test_sharded_index_covers_every_key_exactly_once(tmp_path, tiny, official, bits):
    mc.write_checkpoint(tmp_path, mc.make_config("tiny", bits), bits, "sharded-bin", seed=7)
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    names = [f"pytorch_model-{i:05d}-of-00008.bin" for i in range(1, 9)]
    assert sorted(p.name for p in tmp_path.glob("pytorch_model-*.bin")) == names
    weight_map = index["weight_map"]
    assert set(weight_map) == {k for k, _, _ in official[bits]}
    assert set(weight_map.values()) == set(names)
    seen, total = [], 0
    ref = load(tiny[bits] / "pytorch_model.bin")
    for name in names:
        shard = load(tmp_path / name)
        assert all(weight_map[k] == name for k in shard)
        seen += list(shard)
        for k, v in shard.items():
            assert torch.equal(v, ref[k]), k  # same seed: same weights as the single file
            total += v.numel() * v.element_size()
    assert sorted(seen) == sorted(weight_map)  # every key in exactly one shard
    assert index["metadata"]["total_size"] == total
    assert weight_map[EMB] == names[0] and weight_map[LM_HEAD] == names[-1]


def test_shard_split_is_contiguous_and_even():
    ranges = mc.shard_layers(28, 8)
    assert [len(r) for r in ranges] == [4, 4, 4, 4, 3, 3, 3, 3]
    assert [i for r in ranges for i in r] == list(range(28))
    with pytest.raises(ValueError, match="shards"):
        mc.shard_layers(2, 8)


# --- files and CLI ------------------------------------------------------------------------


def test_refuses_to_mix_into_an_existing_checkpoint(tmp_path):
    cfg = mc.make_config("tiny", 8, num_layers=1)
    mc.write_checkpoint(tmp_path, cfg, 8, "bin")
    with pytest.raises(FileExistsError, match="overwrite"):
        mc.write_checkpoint(tmp_path, cfg, 8, "safetensors")
    mc.write_checkpoint(tmp_path, cfg, 8, "safetensors", overwrite=True)
    assert not (tmp_path / "pytorch_model.bin").exists() and (tmp_path / "model.safetensors").exists()


def test_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    assert mc.main([str(out), "--bits", "4", "--num-layers", "2", "--seed", "3", "--quiet"]) == 0
    assert "peak RSS" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_bit"] == 4 and cfg["num_layers"] == 2
    sd = load(out / "pytorch_model.bin")
    expected = mc.random_state_dict(cfg, 4, seed=3)
    assert list(sd) == list(expected) and all(torch.equal(sd[k], expected[k]) for k in sd)
    # a second run into the same folder is refused with a clear message, not silently mixed
    assert mc.main([str(out), "--bits", "8", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_rejects_bad_sizes_with_exit_code_2(tmp_path, capsys):
    assert mc.main([str(tmp_path / "x"), "--hidden-size", "65"]) == 2
    assert "divisible" in capsys.readouterr().err


def fake_package(src):
    """A package whose modules import each other relatively, in every form the rule must follow."""
    src.mkdir()
    (src / "configuration_chatglm.py").write_text("import torch\n")
    (src / "modeling_chatglm.py").write_text(
        "from .configuration_chatglm import ChatGLMConfig\nfrom .quantization import (\n    quantize_weight,\n)\n"
        "def f():\n    from . import helpers_a, helpers_b as hb  # noqa\n")
    (src / "quantization.py").write_text("def g():\n    from .kernels import linear\n")
    (src / "tokenization_chatglm.py").write_text("import sentencepiece\n")
    for name in ("helpers_a.py", "helpers_b.py", "kernels.py", "unrelated.py", "ice_text.model",
                 "tokenizer_config.json"):
        (src / name).write_text(f"# {name}\n")
    return src


def test_package_files_follow_relative_imports(tmp_path):
    src = fake_package(tmp_path / "src")
    assert sorted(mc.package_files(src)) == sorted([
        "configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py",
        "helpers_a.py", "helpers_b.py", "kernels.py", "ice_text.model", "tokenizer_config.json"])


def test_copy_code_makes_a_self_contained_folder(tmp_path):
    src = fake_package(tmp_path / "src")
    dst = tmp_path / "dst"
    copied = mc.copy_package_files(dst, src)
    assert sorted(p.name for p in copied) == sorted(mc.package_files(src))
    assert not (dst / "unrelated.py").exists()
    assert all((dst / p.name).read_bytes() == (src / p.name).read_bytes() for p in copied)
    (src / "kernels.py").unlink()
    with pytest.raises(FileNotFoundError, match="kernels.py"):
        mc.copy_package_files(tmp_path / "dst2", src)


def test_package_files_of_this_repo_match_the_test_harness():
    from conftest import CODE_FILES, ROOT

    assert sorted(mc.package_files(ROOT)) == sorted(CODE_FILES)


@pytest.mark.cuda
def test_random_state_dict_on_cuda_full_size():
    cfg = mc.make_config("full", 8)
    sd = mc.random_state_dict(cfg, 8, device="cuda", int_mode="direct")
    layout = mc.checkpoint_layout(cfg)
    assert list(sd) == list(layout)
    for k, (dtype, shape) in layout.items():
        assert sd[k].device.type == "cuda" and sd[k].dtype == dtype and tuple(sd[k].shape) == shape, k
    q = sd["transformer.layers.0.mlp.dense_4h_to_h.weight"]
    assert bool((q.abs().amax(dim=1) == 127).all())
    assert sd[LM_HEAD] is sd[EMB]
