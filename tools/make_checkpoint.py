"""Random ChatGLM-6B checkpoints in the official layout (SPEC §1–§3), for tests, demos and benchmarks.

The weights are random, so a model built from them talks nonsense; what matches the published
checkpoints is everything a loader sees: config.json keys, tensor names, order, dtypes, shapes,
the tied embedding stored once, INT8/INT4 rows that satisfy the quantization definition, and
the file formats (``pytorch_model.bin``, ``model.safetensors``, 8 ``.bin`` shards + index).

Library use (also on a GPU: ``device="cuda"`` draws every tensor there)::

    from tools.make_checkpoint import make_config, random_state_dict, write_checkpoint
    cfg = make_config("full", bits=8)
    sd = random_state_dict(cfg, 8, device="cuda", int_mode="direct")

Command line::

    python tools/make_checkpoint.py OUT_DIR --preset tiny --bits 8 --format bin
    python tools/make_checkpoint.py OUT_DIR --preset full --bits 16 --format sharded-bin

Every tensor is drawn from a generator seeded by (seed, component), component being the
embedding, one layer, or the final layernorm. The same seed therefore gives the same weights
in every format and sharding, and a full-size file is produced one layer at a time with no
float copy of the whole model.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import re
import resource
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent  # the flat remote-code folder (repo root)

try:  # imported as <package>.tools.make_checkpoint (the tests' `chatglm6b` shim, cli_demo)
    from ..quantization import pack_int4, quantize_weight
except ImportError:  # run as a script or as top-level `tools`: expose the repo root as `chatglm6b`
    if "chatglm6b" not in sys.modules:
        _pkg = types.ModuleType("chatglm6b")
        _pkg.__path__ = [str(ROOT)]
        sys.modules["chatglm6b"] = _pkg
    _q = importlib.import_module("chatglm6b.quantization")
    pack_int4, quantize_weight = _q.pack_int4, _q.quantize_weight

__all__ = [
    "PRESETS",
    "package_files",
    "make_config",
    "config_bits",
    "checkpoint_layout",
    "random_state_dict",
    "write_checkpoint",
    "copy_package_files",
    "shard_layers",
    "main",
]

# config.json keys every ChatGLM-6B release shares (SPEC §1); sizes come from a preset.
_BASE_CONFIG = {
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    },
    "bos_token_id": 130004,
    "eos_token_id": 130005,
    "gmask_token_id": 130001,
    "layernorm_epsilon": 1e-05,
    "mask_token_id": 130000,
    "max_sequence_length": 2048,
    "model_type": "chatglm",
    "pad_token_id": 3,
    "position_encoding_2d": True,
    "torch_dtype": "float16",
    "transformers_version": "4.27.1",
    "use_cache": True,
}

# The remote code a Hub-style folder needs: the modules auto_map names, the tokenizer's module,
# and every module they import relatively (the rule transformers uses to copy remote code).
_ENTRY_MODULES = tuple(dict.fromkeys([v.split(".")[0] for v in _BASE_CONFIG["auto_map"].values()]
                                     + ["tokenization_chatglm"]))
TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json")
_RELATIVE_IMPORT = re.compile(r"^[ \t]*from[ \t]+\.(\w*)[ \t]+import\b[ \t]*\(?([\w ,]*)", re.MULTILINE)


def package_files(src_dir=ROOT) -> List[str]:
    """File names of the package's code and tokenizer files, found from the entry modules' imports."""
    src_dir = Path(src_dir)
    order: List[str] = []
    todo = list(_ENTRY_MODULES)
    while todo:
        module = todo.pop(0)
        if module in order:
            continue
        order.append(module)
        path = src_dir / f"{module}.py"
        if not path.is_file():
            continue  # copy_package_files reports it missing
        for m in _RELATIVE_IMPORT.finditer(path.read_text(encoding="utf-8")):
            if m.group(1):  # from .module import names
                todo.append(m.group(1))
            else:  # from . import module[, module as alias]
                todo += [name.split()[0] for name in m.group(2).split(",") if name.strip()]
    return [f"{m}.py" for m in order] + list(TOKENIZER_FILES)


SIZE_KEYS = ("hidden_size", "num_attention_heads", "inner_hidden_size", "num_layers", "vocab_size")
PRESETS = {
    # like the conformance checkpoints: real vocabulary (the tokenizer works), 28 layers, tiny width
    "tiny": dict(hidden_size=64, num_attention_heads=4, inner_hidden_size=256, num_layers=28, vocab_size=130528),
    # the published ChatGLM-6B sizes
    "full": dict(hidden_size=4096, num_attention_heads=32, inner_hidden_size=16384, num_layers=28, vocab_size=130528),
}
FORMATS = ("bin", "safetensors", "sharded-bin")
INT_MODES = ("quantize", "direct")
# `int_mode="auto"` draws integers directly above this many quantized weights, where quantizing
# float matrices on a CPU takes minutes (full size: 5.6e9).
AUTO_DIRECT_ABOVE = 10 ** 8

# Weight std = gain / sqrt(in_features). A larger query/key gain gives attention patterns that are
# far from uniform, so the random model's output depends on context (as in the conformance data).
LINEAR_GAINS = {"attention.query_key_value": 2.0, "attention.dense": 1.0, "mlp.dense_h_to_4h": 1.0,
                "mlp.dense_4h_to_h": 1.0}
FINAL_LN_GAIN = dict(mean=0.0, std=1.0)
_TIED = ("transformer.word_embeddings.weight", "lm_head.weight")
_CHECKPOINT_NAMES = ("config.json", "pytorch_model.bin", "model.safetensors", "pytorch_model.bin.index.json")

Progress = Optional[Callable[[str], None]]


# ---------------------------------------------------------------------------------------------
# config


def _check_bits(bits) -> int:
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 8 (INT8), 4 (INT4) or 16 (FP16), got {bits!r}")
    return bits


def _check_sizes(cfg: dict, bits: int) -> None:
    for key in SIZE_KEYS:
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if h % heads:
        raise ValueError(f"hidden_size {h} is not divisible by num_attention_heads {heads}; "
                         f"pick sizes with hidden_size = heads * head_dim")
    if (h // heads) % 4:
        raise ValueError(f"head_dim = hidden_size / heads = {h // heads} must be a multiple of 4: 2-D rotary "
                         f"splits each head in two halves and rotates pairs of dims within each half")
    if bits == 4 and cfg["inner_hidden_size"] % 2:
        raise ValueError(f"INT4 packs two columns per byte: inner_hidden_size must be even, "
                         f"got {cfg['inner_hidden_size']}")


def make_config(preset: str = "tiny", bits: int = 8, **overrides) -> dict:
    """config.json content with the official keys (SPEC §1), sizes from ``preset`` + ``overrides``.

    ``overrides`` may set any of SIZE_KEYS or ``max_sequence_length`` (None values are ignored).
    The two quantization keys appear only for ``bits`` 8 and 4, as in the published configs.
    """
    _check_bits(bits)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    allowed = set(SIZE_KEYS) | {"max_sequence_length"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown config override(s) {unknown}; allowed: {sorted(allowed)}")
    cfg = {**_BASE_CONFIG, **PRESETS[preset]}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if bits != 16:
        cfg["quantization_bit"] = bits
        cfg["quantization_embeddings"] = False
    _check_sizes(cfg, bits)
    return dict(sorted(cfg.items()))  # the published files list keys alphabetically


def config_bits(config: dict, bits: Optional[int] = None) -> int:
    """The checkpoint's bit width: ``bits`` if given (it must agree with the config), else the config's."""
    in_config = config.get("quantization_bit") or 16
    if bits is None:
        return _check_bits(in_config)
    _check_bits(bits)
    if "quantization_bit" in config and in_config != bits:
        raise ValueError(f"config.json says quantization_bit {in_config} but bits={bits} was asked for; "
                         f"make the config with make_config(bits={bits}) or pass bits={in_config}")
    return bits


def _sizes(config: dict) -> Tuple[int, int, int, int, int]:
    missing = [k for k in SIZE_KEYS if k not in config]
    if missing:
        raise ValueError(f"config lacks {missing}; build it with make_config()")
    return tuple(config[k] for k in SIZE_KEYS)  # type: ignore[return-value]


def _linear_shapes(h: int, inner: int) -> Dict[str, Tuple[int, int]]:
    return {  # [out, in]
        "attention.query_key_value": (3 * h, h),
        "attention.dense": (h, h),
        "mlp.dense_h_to_4h": (inner, h),
        "mlp.dense_4h_to_h": (h, inner),
    }


def checkpoint_layout(config: dict, bits: Optional[int] = None,
                      dtype: torch.dtype = torch.float16) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    """Every key of the official ``pytorch_model.bin``, in its order, as ``key -> (dtype, shape)``.

    ``dtype`` is the float dtype (fp16 in the published files); quantized weights are int8.
    """
    bits = config_bits(config, bits)
    h, heads, inner, layers, vocab = _sizes(config)
    layout: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = {key: (dtype, (vocab, h)) for key in _TIED}
    for i in range(layers):
        p = f"transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            layout[p + ln + ".weight"] = (dtype, (h,))
            layout[p + ln + ".bias"] = (dtype, (h,))
        layout[p + "attention.rotary_emb.inv_freq"] = (dtype, (h // heads // 4,))
        for name, (out, inp) in _linear_shapes(h, inner).items():
            if bits == 16:
                layout[p + name + ".weight"] = (dtype, (out, inp))
            else:
                layout[p + name + ".weight"] = (torch.int8, (out, inp // 2 if bits == 4 else inp))
                layout[p + name + ".weight_scale"] = (dtype, (out,))
            layout[p + name + ".bias"] = (dtype, (out,))
    layout["transformer.final_layernorm.weight"] = (dtype, (h,))
    layout["transformer.final_layernorm.bias"] = (dtype, (h,))
    return layout


# ---------------------------------------------------------------------------------------------
# random tensors


def _derive_seed(seed: int, component: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{component}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**63 here


class _Drawer:
    """Draws the tensors of one component (embedding, layer i, final layernorm) from its own seed.

    Scales keep activations O(1) at any width: linear weights have std gain/sqrt(in_features)
    (LINEAR_GAINS), the embedding 1/sqrt(hidden) (so tied-lm_head logits are O(1)), block
    layernorm gains ~1 (the final one: FINAL_LN_GAIN), biases small.
    """

    def __init__(self, config, bits, device, dtype, seed, int_mode):
        self.h, self.heads, self.inner, self.layers, self.vocab = _sizes(config)
        self.bits, self.device, self.dtype, self.seed, self.int_mode = bits, torch.device(device), dtype, seed, int_mode

    def _generator(self, component: str) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(_derive_seed(self.seed, component))
        return g

    def _normal(self, g, shape, std: float, mean: float = 0.0) -> torch.Tensor:
        t = torch.empty(shape, dtype=self.dtype, device=self.device)
        return t.normal_(mean, std, generator=g)

    def embedding(self) -> torch.Tensor:
        return self._normal(self._generator("word_embeddings"), (self.vocab, self.h), self.h ** -0.5)

    def _layernorm(self, g, prefix: str, mean: float = 1.0, std: float = 0.05) -> Dict[str, torch.Tensor]:
        return {prefix + ".weight": self._normal(g, (self.h,), std, mean=mean),
                prefix + ".bias": self._normal(g, (self.h,), 0.02)}

    def final_layernorm(self) -> Dict[str, torch.Tensor]:
        # Gains ~N(0, 1) here, not ~1: the residual stream carries the input token's embedding
        # (scaled by alpha) through every block, so with gains ~1 the tied lm_head scores the
        # current token highest and greedy decoding repeats it forever.
        return self._layernorm(self._generator("final_layernorm"), "transformer.final_layernorm", **FINAL_LN_GAIN)

    def inv_freq(self) -> torch.Tensor:
        # SPEC §4.2: rotary of dim d = head_dim/2 per half; inv_freq[i] = 1/10000^(2i/d), stored fp16.
        d = self.h // self.heads // 2
        exponent = torch.arange(0, d, 2, dtype=torch.float32) / d
        return (1.0 / 10000 ** exponent).to(self.dtype).to(self.device)

    def _direct_ints(self, g, out: int, inp: int, std: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Integers uniform in [-qmax, qmax] with one ±qmax per row, and fp scales.

        Every row reaches qmax, so (q, scale) is exactly what quantize_weight returns for the
        dequantized matrix q * scale: scale = max|q * scale| / qmax and round(q * scale / scale) = q.
        """
        qmax = 2 ** (self.bits - 1) - 1
        q = torch.randint(-qmax, qmax + 1, (out, inp), generator=g, device=self.device, dtype=torch.int8)
        cols = torch.randint(0, inp, (out,), generator=g, device=self.device)
        signs = torch.randint(0, 2, (out,), generator=g, device=self.device, dtype=torch.int8) * 2 - 1
        q[torch.arange(out, device=self.device), cols] = signs * qmax
        # uniform integers on [-qmax, qmax] have std ≈ qmax / sqrt(3); aim the weights at `std`
        jitter = torch.empty(out, dtype=torch.float32, device=self.device).uniform_(0.8, 1.2, generator=g)
        scale = (jitter * (std * math.sqrt(3.0) / qmax)).to(self.dtype)
        if self.bits == 4:
            q = pack_int4(q)
        return q, scale

    def _linear(self, g, prefix: str, name: str, out: int, inp: int) -> Dict[str, torch.Tensor]:
        std = LINEAR_GAINS[name] * inp ** -0.5
        tensors = {}
        if self.bits == 16:
            tensors[prefix + ".weight"] = self._normal(g, (out, inp), std)
        else:
            if self.int_mode == "quantize":
                q, scale = quantize_weight(self._normal(g, (out, inp), std), self.bits)
            else:
                q, scale = self._direct_ints(g, out, inp, std)
            tensors[prefix + ".weight"] = q
            tensors[prefix + ".weight_scale"] = scale
        tensors[prefix + ".bias"] = self._normal(g, (out,), 0.02)
        return tensors

    def layer(self, i: int) -> Dict[str, torch.Tensor]:
        g = self._generator(f"layer{i}")
        p = f"transformer.layers.{i}."
        tensors = {}
        tensors.update(self._layernorm(g, p + "input_layernorm"))
        tensors.update(self._layernorm(g, p + "post_attention_layernorm"))
        tensors[p + "attention.rotary_emb.inv_freq"] = self.inv_freq()
        for name, (out, inp) in _linear_shapes(self.h, self.inner).items():
            tensors.update(self._linear(g, p + name, name, out, inp))
        return tensors


def _resolve_int_mode(int_mode: str, config: dict, bits: int) -> str:
    if int_mode == "auto":
        h, _, inner, layers, _ = _sizes(config)
        n_quantized = layers * sum(o * i for o, i in _linear_shapes(h, inner).values())
        return "direct" if bits != 16 and n_quantized > AUTO_DIRECT_ABOVE else "quantize"
    if int_mode not in INT_MODES:
        raise ValueError(f"int_mode must be 'auto', 'quantize' or 'direct', got {int_mode!r}")
    return int_mode


def _drawer(config, bits, device, dtype, seed, int_mode) -> Tuple[_Drawer, int]:
    bits = config_bits(config, bits)
    _check_sizes(dict(zip(SIZE_KEYS, _sizes(config))), bits)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype is the float dtype of the non-integer tensors (e.g. torch.float16), got {dtype}")
    return _Drawer(config, bits, device, dtype, seed, _resolve_int_mode(int_mode, config, bits)), bits


def random_state_dict(config: dict, bits: Optional[int] = None, device="cpu", dtype: torch.dtype = torch.float16,
                      seed: int = 0, int_mode: str = "quantize", progress: Progress = None) -> Dict[str, torch.Tensor]:
    """A random state dict in the official layout (checkpoint_layout order), built on ``device``.

    ``lm_head.weight`` is the same tensor as ``transformer.word_embeddings.weight`` (tied).
    ``int_mode``: "quantize" draws float matrices and quantizes them with quantize_weight;
    "direct" draws the integers and scales (much faster; see _Drawer._direct_ints);
    "auto" picks "direct" for big models. ``bits`` defaults to the config's.
    """
    draw, bits = _drawer(config, bits, device, dtype, seed, int_mode)
    emb = draw.embedding()
    sd = {_TIED[0]: emb, _TIED[1]: emb}
    for i in range(draw.layers):
        sd.update(draw.layer(i))
        if progress:
            progress(f"layer {i + 1}/{draw.layers} drawn")
    sd.update(draw.final_layernorm())
    return sd


# ---------------------------------------------------------------------------------------------
# files


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def shard_layers(num_layers: int, shards: int) -> List[range]:
    """Contiguous layer ranges for ``shards`` files, as even as possible (earlier shards get extras).

    The first shard also holds the word embeddings, the last the final layernorm and lm_head,
    like the published chatglm-6b shards.
    """
    if shards < 1 or shards > num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {shards} shards; use 1 <= shards <= num_layers")
    base, extra = divmod(num_layers, shards)
    ranges, start = [], 0
    for s in range(shards):
        stop = start + base + (1 if s < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def _existing_checkpoint_files(out: Path) -> List[Path]:
    found = [out / n for n in _CHECKPOINT_NAMES if (out / n).exists()]
    return found + sorted(out.glob("pytorch_model-*-of-*.bin"))


def copy_package_files(dst, src_dir=ROOT) -> List[Path]:
    """Copy the package's code and tokenizer files (package_files()) from ``src_dir`` into ``dst``."""
    src_dir, dst = Path(src_dir), Path(dst)
    names = package_files(src_dir)
    missing = [n for n in names if not (src_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{src_dir} lacks {missing}: the package is incomplete in this checkout, so the "
                                f"folder would not load with trust_remote_code; write them first or drop --copy-code")
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        shutil.copyfile(src_dir / name, dst / name)
        copied.append(dst / name)
    return copied


def write_checkpoint(out_dir, config: dict, bits: Optional[int] = None, fmt: str = "bin", seed: int = 0,
                     int_mode: str = "quantize", shards: int = 8, overwrite: bool = False,
                     progress: Progress = None) -> List[Path]:
    """Write config.json and random weights in ``fmt`` into ``out_dir``; returns the files written.

    - "bin": one ``pytorch_model.bin`` (torch.save zip format, mmap-loadable); the tied matrix is
      one storage, so it is written once.
    - "safetensors": one ``model.safetensors``; the tied matrix is stored once, under
      ``transformer.word_embeddings.weight`` (safetensors cannot alias two names).
    - "sharded-bin": ``pytorch_model-0000N-of-0000S.bin`` + ``pytorch_model.bin.index.json``;
      only one shard is in memory at a time. lm_head sits in the last shard, the embedding in the
      first, so (as with any per-file save) each file holds its own copy.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    bits = config_bits(config, bits)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = _existing_checkpoint_files(out)
    if existing:
        if not overwrite:
            raise FileExistsError(f"{out} already holds a checkpoint ({', '.join(p.name for p in existing)}); "
                                  f"choose an empty folder or pass overwrite=True / --overwrite")
        for p in existing:
            p.unlink()
    say = progress or (lambda msg: None)

    (out / "config.json").write_text(json.dumps(config, indent=2))  # byte-identical to the published files
    written = [out / "config.json"]
    if fmt == "sharded-bin":
        written += _write_shards(out, config, bits, seed, int_mode, shards, say)
        return written

    sd = random_state_dict(config, bits, seed=seed, int_mode=int_mode, progress=say)
    if fmt == "bin":
        path = out / "pytorch_model.bin"
        say(f"saving {path.name}")
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        del sd["lm_head.weight"]
        path = out / "model.safetensors"
        say(f"saving {path.name}")
        save_file(sd, str(path), metadata={"format": "pt"})
    return written + [path]


def _write_shards(out: Path, config, bits, seed, int_mode, shards, say) -> List[Path]:
    draw, _ = _drawer(config, bits, "cpu", torch.float16, seed, int_mode)
    plan = shard_layers(draw.layers, shards)
    weight_map, total, files = {}, 0, []
    for s, layer_range in enumerate(plan):
        part: Dict[str, torch.Tensor] = {}
        if s == 0:
            part[_TIED[0]] = draw.embedding()
        for i in layer_range:
            part.update(draw.layer(i))
        if s == len(plan) - 1:
            part.update(draw.final_layernorm())
            # one file: keep the tie (stored once); else this file gets its own copy, same values
            part[_TIED[1]] = part[_TIED[0]] if _TIED[0] in part else draw.embedding()
        name = f"pytorch_model-{s + 1:05d}-of-{len(plan):05d}.bin"
        say(f"saving {name} (layers {layer_range.start}..{layer_range.stop - 1})")
        torch.save(part, out / name)
        files.append(out / name)
        for key, t in part.items():
            weight_map[key] = name
            total += _nbytes(t)
        del part
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files + [out / "pytorch_model.bin.index.json"]


# ---------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="make_checkpoint",
        description="Write a random ChatGLM-6B checkpoint in the official layout (weights are noise).")
    ap.add_argument("out_dir", help="output folder (created if missing)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                    help="sizes: tiny = hidden 64, 4 heads, inner 256, 28 layers, vocab 130528 (default); "
                         "full = the real 6B sizes")
    ap.add_argument("--bits", type=int, choices=(8, 4, 16), default=8, help="8 = INT8 (default), 4 = INT4, 16 = FP16")
    ap.add_argument("--format", dest="fmt", choices=FORMATS, default="bin",
                    help="bin = one pytorch_model.bin (default); safetensors = model.safetensors; "
                         "sharded-bin = .bin shards + pytorch_model.bin.index.json (like chatglm-6b)")
    ap.add_argument("--shards", type=int, default=8, help="number of shards for sharded-bin (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--int-mode", choices=("auto",) + INT_MODES, default="auto",
                    help="how INT8/INT4 weights are drawn: quantize float matrices, or draw integers directly "
                         f"(fast); auto = direct above {AUTO_DIRECT_ABOVE:.0e} quantized weights (default)")
    for key in SIZE_KEYS + ("max_sequence_length",):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"override {key}")
    ap.add_argument("--copy-code", action="store_true",
                    help="also copy the package's code and tokenizer files, making a self-contained Hub-style folder")
    ap.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in out_dir")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = _parser().parse_args(None if argv is None else list(argv))
    overrides = {k: getattr(args, k) for k in SIZE_KEYS + ("max_sequence_length",)}
    try:
        config = make_config(args.preset, args.bits, **overrides)
        int_mode = _resolve_int_mode(args.int_mode, config, args.bits)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        files = write_checkpoint(args.out_dir, config, args.bits, args.fmt, args.seed, int_mode,
                                 args.shards, args.overwrite, say)
        if args.copy_code:
            files += copy_package_files(args.out_dir)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files, {size / 1e9:.3f} GB, to {args.out_dir} in {seconds:.1f} s "
          f"(bits {args.bits}, {args.fmt}, int_mode {int_mode if args.bits != 16 else '-'}, seed {args.seed}); "
          f"peak RSS {_peak_rss_bytes() / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
