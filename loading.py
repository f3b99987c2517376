"""Checkpoint loading for ChatGLM-6B: one strict, streaming loader for every transformers version.

Why our own: transformers' loader differs between 4.27 and 5.x, warns (instead of failing) on
missing/unexpected keys, and materialises full copies. Here the model skeleton is built on the
meta device already in its quantized form, and every tensor of the checkpoint is checked (name,
shape, dtype) and placed as it arrives: `.bin` files are memory-mapped (zero-copy on CPU), FP16
weights meeting a quantized config are quantized layer by layer, nothing is silently dropped.
"""
from __future__ import annotations

import atexit
import ctypes
import importlib
import json
import os
import sys
import threading
import time
import weakref
import warnings
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from .configuration_chatglm import ChatGLMConfig
from .dispatch import check_device_map as _check_device_map, device_for as _device_for, dispatch as _dispatch, \
    normalize_device_map as _normalize_device_map, plan_device_map as _plan_device_map
from . import cpu_kernels
from .cpu_kernels import large_pages_mode, populate_for_writing, release_pages, release_range, to_large_pages
from .quantization import QuantizedLinear, kernels_may_run, quantize_weight

HUB_KWARGS = ("cache_dir", "force_download", "resume_download", "proxies", "local_files_only", "token",
              "use_auth_token", "revision", "subfolder", "_commit_hash", "user_agent")
IGNORED_KWARGS = ("trust_remote_code", "low_cpu_mem_usage", "empty_init", "code_revision", "offload_state_dict",
                  "mirror")
# arguments asking for something this loader does not do: fine when None / False / empty, refused
# when given (a switch set to True, a value passed)
REFUSED_KWARGS = {
    "load_in_8bit": "bitsandbytes is not used: load an INT8 checkpoint, or an FP16 one with quantization_bit=8 "
                    "(per-row int8 weights, the ChatGLM-6B-INT8 layout)",
    "load_in_4bit": "bitsandbytes is not used: load an INT4 checkpoint, or an FP16 one with quantization_bit=4",
    "use_flash_attention_2": "the attention is this package's own (see attn_implementation)",
    "from_tf": "only PyTorch checkpoints (.bin / .safetensors) can be loaded",
    "from_flax": "only PyTorch checkpoints (.bin / .safetensors) can be loaded",
    "state_dict": "load the folder instead",
    "variant": "ChatGLM-6B checkpoints have no variants; point at the folder of the files you want",
    "gguf_file": "GGUF files cannot be loaded; use the PyTorch checkpoint",
    "tp_plan": "tensor parallelism is not implemented; device_map spreads whole blocks over devices",
    "key_mapping": "the checkpoint keys are fixed (SPEC); rename the keys of the file instead",
    "adapter_name": "load the base model, then the adapter with peft (PeftModel.from_pretrained)",
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
EMBED, HEAD = "transformer.word_embeddings.weight", "lm_head.weight"


class CheckpointError(ValueError):
    """The checkpoint does not match config.json (names the key and what was expected)."""


def _resolve_file(path: str, filename: str, hub_kwargs: dict) -> Optional[str]:
    sub = hub_kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        full = os.path.join(path, sub, filename)
        return full if os.path.isfile(full) else None
    from transformers.utils import cached_file
    kw = {k: v for k, v in hub_kwargs.items() if v is not None}
    try:
        return cached_file(path, filename, _raise_exceptions_for_missing_entries=False, **kw)
    except OSError:
        return None


def find_weight_files(path: str, hub_kwargs: dict, use_safetensors: Optional[bool] = None):
    names = [n for n in WEIGHT_FILES if not (use_safetensors is False and "safetensors" in n)
             and not (use_safetensors is True and "safetensors" not in n)]
    for name in names:
        found = _resolve_file(path, name, hub_kwargs)
        if found is None:
            continue
        _check_not_lfs_pointer(found)
        if not name.endswith(".index.json"):
            return [found]
        try:
            with open(found) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{found} is not a valid shard index (a JSON object with a \"weight_map\"): "
                                  f"{type(e).__name__}: {e}; re-download it") from e
        files = [_resolve_file(path, s, hub_kwargs) for s in shards]
        missing = [s for s, f in zip(shards, files) if f is None]
        if missing:
            raise CheckpointError(f"{name} lists shards that are not there: {missing}; download them")
        return files
    raise CheckpointError(f"no weights found in {path!r}: expected one of {', '.join(names)} (official "
                          "chatglm-6b-int8 ships pytorch_model.bin; did you download the weights / run git lfs pull?)")


class MappedFile:
    """The file behind the tensors of ``torch.load(mmap=True)``: reads their bytes with pread()
    (on up to 4 threads, 4 MB at a time) instead of through the mapping. Faulting a page-cache file in
    through a mapping ran at 0.5-1 GB/s here, pread() at 2-6 GB/s, and the mapping's pages then
    never count in the process's memory. Linux only: the file offset of a tensor is found from
    /proc/self/maps; where it cannot be, ``fill`` says so and the caller copies."""

    CHUNK = 4 << 20

    def __init__(self, path: str):
        self.path = os.path.realpath(path)
        self.ranges = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].rstrip("\n") == self.path:
                        lo, hi = (int(v, 16) for v in parts[0].split("-"))
                        self.ranges.append((lo, hi, int(parts[2], 16)))
        except OSError:
            pass
        self.fd = os.open(self.path, os.O_RDONLY) if self.ranges else None
        self._pool = None

    def offset(self, t: torch.Tensor) -> Optional[int]:
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        for lo, hi, file_offset in self.ranges:
            if lo <= ptr and ptr + n <= hi:
                return ptr - lo + file_offset
        return None

    def _read(self, address: int, n: int, offset: int) -> None:
        populate_for_writing(address, n)  # fault the pages in ahead (fewer, cheaper faults than pread's)
        view = memoryview((ctypes.c_char * n).from_address(address)).cast("B")
        done = 0
        while done < n:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.path} ended early (truncated download?); re-download it")
            done += got

    def filler(self, t: torch.Tensor, before_chunk=None):
        """``fill(dst)`` for ``cpu_kernels.to_large_pages``: dst <- the bytes of t, from the file, on
        several threads. With ``before_chunk`` (the background move): on this thread, calling
        ``before_chunk()`` before each chunk and dropping each chunk's mapped pages once read."""
        offset = self.offset(t)
        if offset is None or self.fd is None:
            return None

        def fill(dst: torch.Tensor) -> bool:
            n = dst.numel()
            starts = range(0, n, self.CHUNK)
            if before_chunk is not None:
                for i in starts:
                    before_chunk()
                    self._read(dst.data_ptr() + i, min(self.CHUNK, n - i), offset + i)
                    release_range(t.data_ptr() + i, min(self.CHUNK, n - i))
                return True
            if len(starts) == 1:
                self._read(dst.data_ptr(), n, offset)
                return True
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))
            list(self._pool.map(lambda i: self._read(dst.data_ptr() + i, min(self.CHUNK, n - i), offset + i), starts))
            return True
        return fill

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def iter_checkpoint(files) -> Iterator[Tuple[str, torch.Tensor, str, Optional[MappedFile]]]:
    """Yield (key, tensor, file, mapped) for every tensor, streaming file by file; ``mapped`` is a
    MappedFile when the tensor lives in a private read-only mapping of the file
    (``torch.load(mmap=True)``), else None. The caller closes the MappedFiles."""
    for path in files:
        _check_not_lfs_pointer(path)
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                handle = safe_open(path, framework="pt")  # checks the header against the file's length
            except Exception as e:  # truncated download, not a safetensors file, ...
                raise CheckpointError(f"could not read {path} as safetensors ({e}); re-download it") from e
            with handle as f:
                keys = list(f.keys())
                tensors = _map_safetensors(path, keys)
                if tensors is None:  # (a layout the mapping does not take: safetensors' own copies)
                    for key in keys:
                        yield key, f.get_tensor(key), path, None
                    continue
            mapped = MappedFile(path)
            for key, tensor in tensors:
                yield key, tensor, path, mapped
            del tensors
            continue
        mapped = None
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            mapped = MappedFile(path)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise CheckpointError(f"could not read {path}: {e}") from e
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:  # pickle with code in it, truncated file, ...
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            reason = next((ln for ln in lines if "Unpickler error" in ln or "Unsupported" in ln), lines[0] if lines else "")
            reason = reason.split(" Please use")[0]  # not torch's advice to allow-list the global
            raise CheckpointError(f"could not read {path} as a weights-only PyTorch checkpoint ({type(e).__name__}: "
                                  f"{reason}); pickles are loaded with weights_only=True, so a file that needs "
                                  "code to unpickle is refused: re-download it or convert it to safetensors") from e
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict (name -> tensor); save "
                                  "model.state_dict() instead")
        for key in list(sd.keys()):
            value = sd.pop(key)
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; a "
                                      "checkpoint must map parameter names to tensors (save model.state_dict())")
            yield key, value, path, mapped
        del sd


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
                       "I64": torch.int64, "BOOL": torch.bool}


def _map_safetensors(path: str, keys) -> Optional[list]:
    """[(key, tensor)] of a safetensors file (already checked by safe_open), in file order, as views of a
    private read-only mapping of the file, as ``torch.load(mmap=True)`` gives for a .bin: nothing is
    copied until a weight is placed (safetensors' ``get_tensor`` copies every tensor into fresh memory,
    which put a CPU model at twice its size: the copies plus the file's pages). None where the file
    holds a dtype this does not know, or on a big-endian machine (the file is little-endian)."""
    if sys.byteorder != "little":
        return None
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    entries = []
    for key in keys:
        info = header[key]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            return None
        begin, end = info["data_offsets"]
        entries.append((8 + n + begin, 8 + n + end, key, dtype, info["shape"]))
    whole = torch.empty(0, dtype=torch.uint8)
    whole.set_(torch.UntypedStorage.from_file(path, False, size))  # MAP_PRIVATE, like torch.load(mmap=True)
    out = []
    for begin, end, key, dtype, shape in sorted(entries):
        raw = whole[begin:end]
        if begin % torch.empty((), dtype=dtype).element_size():  # not aligned for a view of that dtype: copied
            raw = raw.clone()
        out.append((key, raw.view(dtype).view(shape)))
    return out


def _check_not_lfs_pointer(path: str):
    if os.path.getsize(path) < 1024:
        with open(path, "rb") as f:
            head = f.read(64)
        if head.startswith(b"version https://git-lfs"):
            raise CheckpointError(f"{path} is a Git LFS pointer, not the weights: run `git lfs pull` in that folder "
                                  "(or download the file itself)")


def _resolve_dtype(torch_dtype, config: ChatGLMConfig):
    if torch_dtype is None or torch_dtype == "auto":
        return None  # keep what the checkpoint stores
    given = torch_dtype
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype.replace("torch.", ""), None)
    if torch_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"torch_dtype must be torch.float16, torch.bfloat16, torch.float32 or 'auto', got {given!r}")
    return torch_dtype


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor, requires_grad: bool):
    mod_name, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    if name in mod._buffers:
        mod._buffers[name] = value
    else:
        setattr(mod, name, nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point()))


def load_pretrained(cls, pretrained_model_name_or_path, config=None, torch_dtype=None, dtype=None,
                    device_map=None, max_memory=None, offload_folder=None, use_safetensors=None,
                    output_loading_info=False, attn_implementation=None, **kwargs):
    path = str(pretrained_model_name_or_path)
    hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
    for k, why in REFUSED_KWARGS.items():
        value = kwargs.pop(k, None)
        if value not in (None, False, {}, ""):
            raise ValueError(f"from_pretrained({k}={'True' if value is True else '...'}) is not supported: {why}")
    if attn_implementation not in (None, "eager"):
        # (transformers 5.x refuses these for this model class itself; 4.x leaves it to us)
        raise ValueError(f"attn_implementation={attn_implementation!r} cannot be chosen for ChatGLM-6B: its attention "
                         "is computed by this package (the original's math on the CPU and in eager mode; on CUDA a "
                         "prompt already goes through torch's scaled_dot_product_attention). Leave it unset or pass "
                         "'eager'.")
    adapter = (kwargs.pop("adapter_kwargs", None) or {}).get("_adapter_model_path")
    if adapter:  # AutoModel found an adapter (adapter_config.json) there and loads its base model through us
        raise ValueError(f"{adapter} holds a peft adapter: load the base model, then the adapter with "
                         "peft (PeftModel.from_pretrained(model, adapter_path))")
    generation_config = kwargs.pop("generation_config", None)
    for k in list(kwargs):
        if k in IGNORED_KWARGS or k.startswith("_"):  # (transformers' internal "_..." flags)
            kwargs.pop(k)
    if config is None:
        config, kwargs = ChatGLMConfig.from_pretrained(path, return_unused_kwargs=True, **hub_kwargs, **kwargs)
    elif kwargs:
        # config given (the Auto* path) but config attributes passed too: apply them like transformers does
        for k in list(kwargs):
            if hasattr(config, k):
                setattr(config, k, kwargs.pop(k))
    # overrides such as quantization_bit=8 are set as plain attributes: check them like config.json
    config.quantization_bit = config.quantization_bit or 0
    config.validate_chatglm()
    if kwargs:
        raise TypeError(f"from_pretrained got unexpected arguments {sorted(kwargs)}")

    target_dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, config)
    dmap = _normalize_device_map(device_map)
    float_dtype = target_dtype or torch.float16
    with torch.device("meta"):
        model = cls(config, dtype=float_dtype)
    if not isinstance(dmap, dict):  # "auto" & co: plan with accelerate on the meta model
        dmap = _plan_device_map(model, dmap, max_memory, float_dtype)
    _check_device_map(model, dmap)  # unknown names, split GLMBlocks, missing GPUs: fail before reading weights

    files = find_weight_files(path, hub_kwargs, use_safetensors)
    expected = dict(model.state_dict(keep_vars=True))
    bits = config.quantization_bit
    placement = _Placement(dmap)
    try:
        loaded = _load_tensors(model, config, files, expected, dmap, bits, target_dtype, placement)
        _finish(model, config, loaded, expected, dmap)
        model.tie_weights()
        _attach_generation_config(model, path, hub_kwargs, generation_config)
        if isinstance(model.config, ChatGLMConfig):
            model.config._name_or_path = path
        model.eval()
        _dispatch(model, dmap, offload_folder)  # accelerate hooks for several devices or "disk"; no-op for one device
    except BaseException:
        placement.close()
        raise
    placement.finish(model)
    if output_loading_info:
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model


def _all_on_cpu(dmap) -> bool:
    places = list((dmap or {"": "cpu"}).values())
    return all(isinstance(p, (str, torch.device)) and str(p) == "cpu" for p in places)


class _Placement:
    """Where loaded CPU weights go (``place``), and the checkpoint files mapped on the way.

    mode "sync": large CPU weights are copied into 2 MB pages as they are loaded (a mapped .bin
    is read with pread, see MappedFile); "background": mapped ones stay in the mapping and are
    queued for ``start_large_pages`` (``finish``), the rest are copied as in "sync"; "off": weights
    stay where they were loaded. Background needs the whole model on the CPU (no thread beside
    accelerate's hooks: "sync" then) and the CPU kernels (it waits for them to be idle; the torch
    path gives no such signal: "off" then). The background job builds those kernels first, so that
    loading does not wait for the compiler (~4 s on a first load on a machine), nor does a model
    that goes to a GPU right after loading (``.half().cuda()``: the build is cancelled)."""

    def __init__(self, dmap):
        self.mode = large_pages_mode()
        if self.mode == "background" and not _all_on_cpu(dmap):
            self.mode = "sync"
        if self.mode == "background" and not kernels_may_run("cpu"):
            self.mode = "off"  # (the kernels themselves are built by the background job, first)
        self.queue = []  # (key, mapped tensor, MappedFile) for the background move
        self.files = []  # MappedFiles to close

    def place(self, tensor: torch.Tensor, dev, mapped: Optional[MappedFile], key: str) -> torch.Tensor:
        """``tensor`` on ``dev``; a large CPU weight in 2 MB pages (decode streams the weights once
        per token, and 4 KB pages cost it a fifth of the bandwidth, see ``cpu_kernels.to_large_pages``),
        read straight from the file of a mapped checkpoint so that the mapping and the copy are never
        resident together, or queued for the background move."""
        if torch.device(dev).type != "cpu" or tensor.device.type != "cpu":
            return tensor.to(dev)
        if self.mode == "off":
            return tensor
        if self.mode == "background" and mapped is not None and mapped.offset(tensor) is not None \
                and tensor.numel() * tensor.element_size() >= cpu_kernels.LARGE_PAGE_MIN_BYTES:
            self.queue.append((key, tensor, mapped))
            return tensor
        placed = to_large_pages(tensor, mapped.filler(tensor) if mapped is not None else None)
        if placed is not tensor and mapped is not None:
            release_pages(tensor)  # in case fill fell back to copying through the mapping
        return placed

    def finish(self, model) -> None:
        """Start the background move (it closes the files when done), or close the files now."""
        if self.queue:
            start_large_pages(model, self.queue, self.files)
        else:
            self.close()

    def close(self) -> None:
        for f in self.files:
            f.close()


def _load_tensors(model, config, files, expected, dmap, bits, target_dtype, placement: _Placement) -> set:
    """Read every tensor of the checkpoint into ``model``; returns the keys loaded."""
    loaded, quantized_on_load, source, embed_source_ptr = set(), False, {}, None
    for key, tensor, src, mapped in iter_checkpoint(files):
        if mapped is not None and mapped not in placement.files:
            placement.files.append(mapped)  # (closed by the caller, also when loading fails)
        if key in source:
            raise CheckpointError(f"{key} is stored twice ({source[key]} and {src}); the checkpoint is inconsistent: "
                                  "re-download it (or fix the shard index)")
        source[key] = src
        if key in (HEAD, EMBED) and EMBED in expected:
            if EMBED in loaded:  # the tied matrix again (the official .bin stores one storage under both names)
                if tensor.data_ptr() != embed_source_ptr:
                    _check_tied_copy(key, tensor, expected[EMBED], model, config)
                continue
            key = EMBED  # whichever name comes first (safetensors may keep only the head's name)
            embed_source_ptr = tensor.data_ptr()
        if key not in expected:
            raise CheckpointError(_unexpected_message(key, tensor, config))
        want = expected[key]
        dev = _device_for(key, dmap)
        if key.endswith(".weight") and key.rsplit(".", 1)[0] in _quantized_modules(model):
            if tensor.dtype == torch.int8:
                _check_shape(key, tensor, want, "int8", config)
            elif tensor.is_floating_point():
                lin = model.get_submodule(key.rsplit(".", 1)[0])
                full = (lin.out_features, lin.in_features)
                if tuple(tensor.shape) != full:
                    raise CheckpointError(f"{key}: shape {tuple(tensor.shape)} but config.json expects {full}")
                q, scale = quantize_weight(tensor.to(dev), bits)
                if mapped is not None:
                    release_pages(tensor)  # read once: don't keep the FP16 file resident while quantizing
                _set_tensor(model, key, placement.place(q, dev, None, key), False)
                _set_tensor(model, key[:-len("weight")] + "weight_scale", scale.to(torch.float16), False)
                loaded.update({key, key[:-len("weight")] + "weight_scale"})
                quantized_on_load = True
                continue
            else:
                raise CheckpointError(f"{key}: dtype {tensor.dtype}, expected int8 for quantization_bit {bits}")
            _set_tensor(model, key, placement.place(tensor, dev, mapped, key), False)
        elif key.endswith(".inv_freq"):
            _check_shape(key, tensor, want, "float", config)
            _set_tensor(model, key, want.new_empty(0, device="cpu"), False)  # recomputed below
        else:
            _check_shape(key, tensor, want, "float", config)
            if not tensor.is_floating_point():
                if tensor.dtype == torch.int8 and not bits and key.endswith(".weight") and ".layers." in key:
                    raise CheckpointError(f"{key}: dtype torch.int8 — the checkpoint is quantized but config.json "
                                          "has no quantization_bit; add \"quantization_bit\": 8 (or 4) to config.json")
                raise CheckpointError(f"{key}: dtype {tensor.dtype}, expected a floating-point tensor "
                                      f"(float16 in the official checkpoints)")
            new_dtype = _float_target(key, tensor.dtype, target_dtype)
            value = tensor.to(device=dev, dtype=new_dtype)
            if value.data_ptr() == tensor.data_ptr():
                placed = placement.place(value, dev, mapped, key)
                if quantized_on_load and placed is value:
                    placed = value.clone()  # don't keep the whole FP16 file mapped for a few small tensors
                value = placed
            _set_tensor(model, key, value, not key.endswith("weight_scale") and not _is_quant_bias(model, key))
        loaded.add(key)
    return loaded


def _check_tied_copy(key, tensor, want, model, config):
    """A second copy of the tied embedding / lm_head matrix must equal the first."""
    _check_shape(key, tensor, want, "float", config)
    if not tensor.is_floating_point():
        raise CheckpointError(f"{key}: dtype {tensor.dtype}, expected a floating-point tensor")
    have = model.transformer.word_embeddings.weight
    if tensor.data_ptr() == have.data_ptr():
        return
    if not torch.equal(tensor.to(device=have.device, dtype=have.dtype), have.detach()):
        raise CheckpointError(f"{key} differs from the {EMBED if key == HEAD else HEAD} stored earlier: ChatGLM-6B "
                              "ties the word embeddings to lm_head (one matrix); this checkpoint is corrupted or "
                              "is not ChatGLM-6B")


def _quantized_modules(model) -> set:
    cache = getattr(model, "_glm_qnames", None)
    if cache is None:
        cache = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        model._glm_qnames = cache
    return cache


def _is_quant_bias(model, key: str) -> bool:
    return key.endswith(".bias") and key.rsplit(".", 1)[0] in _quantized_modules(model)


def _float_target(key: str, stored: torch.dtype, target: Optional[torch.dtype]) -> torch.dtype:
    if target is None:
        return stored
    if key.endswith("weight_scale") and target == torch.bfloat16:
        return stored  # bf16 would drop 3 bits of every row scale
    return target


def _check_shape(key, tensor, want, kind, config):
    if tuple(tensor.shape) != tuple(want.shape):
        hint = ""
        if kind == "int8" and config.quantization_bit == 8 and tensor.shape[-1] * 2 == want.shape[-1]:
            hint = " — this looks like an INT4 checkpoint: set quantization_bit 4 in config.json"
        elif kind == "int8" and config.quantization_bit == 4 and tensor.shape[-1] == want.shape[-1] * 2:
            hint = " — this looks like an INT8 checkpoint: set quantization_bit 8 in config.json"
        raise CheckpointError(f"{key}: shape {tuple(tensor.shape)} in the checkpoint, but config.json "
                              f"(hidden_size {config.hidden_size}, quantization_bit {config.quantization_bit}) "
                              f"expects {tuple(want.shape)}{hint}")


def _unexpected_message(key, tensor, config) -> str:
    if key.endswith("weight_scale") and not config.quantization_bit:
        return (f"unexpected key {key!r}: the checkpoint is quantized but config.json has no quantization_bit; "
                "add \"quantization_bit\": 8 (or 4) to config.json")
    if key.startswith("transformer.prefix_encoder.") and not config.pre_seq_len:
        return (f"unexpected key {key!r}: a P-tuning prefix encoder is in the checkpoint but config.json has no "
                "pre_seq_len; set pre_seq_len (and prefix_projection) to use it")
    return (f"unexpected key {key!r} (shape {tuple(tensor.shape)}, {tensor.dtype}) in the checkpoint: it does not "
            "belong to ChatGLM-6B with this config.json")


def _modeling():
    # Not a `from .modeling_chatglm import` line: modeling_chatglm imports this module, and
    # transformers 4.27's save_pretrained follows relative imports without cycle detection, so a
    # cycle makes it loop forever. importlib keeps the import out of its regex.
    return importlib.import_module(".modeling_chatglm", __package__)


def _finish(model, config, loaded, expected, dmap):
    rotary_inv_freq = _modeling().rotary_inv_freq
    missing = [k for k in expected if k not in loaded and not k.endswith(".inv_freq")]
    if HEAD in missing and EMBED in loaded:
        missing.remove(HEAD)
    prefix_missing = [k for k in missing if k.startswith("transformer.prefix_encoder.")]
    missing = [k for k in missing if k not in prefix_missing]
    if missing:
        shown = ", ".join(missing[:6]) + (f" … ({len(missing)} in all)" if len(missing) > 6 else "")
        raise CheckpointError(f"the checkpoint lacks {shown}; is it complete, and does config.json match it?")
    if prefix_missing:
        warnings.warn("the checkpoint has no P-tuning prefix encoder (pre_seq_len is set): it is initialised "
                      "randomly; load your trained one with model.transformer.prefix_encoder.load_state_dict(...)")
        enc_dev = _device_for("transformer.prefix_encoder", dmap)
        enc = model.transformer.prefix_encoder.to_empty(device=enc_dev)
        for m in enc.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
        for p in enc.parameters():
            p.requires_grad = True
    head_dim = config.hidden_size // config.num_attention_heads
    for name, mod in model.named_modules():
        if "inv_freq" in mod._buffers:
            mod._buffers["inv_freq"] = rotary_inv_freq(head_dim // 2).to(_device_for(name, dmap))
    emb_dev = model.transformer.word_embeddings.weight.device
    model.transformer._rotary_inv_freq = rotary_inv_freq(head_dim // 2).to(emb_dev)
    if config.pre_seq_len:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("transformer.prefix_encoder.")
    model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise CheckpointError(f"internal error: not loaded: {still_meta[:5]}")


def _attach_generation_config(model, path, hub_kwargs, given=None):
    from transformers import GenerationConfig
    if given is not None:  # from_pretrained(generation_config=...)
        if not isinstance(given, GenerationConfig):
            raise TypeError(f"generation_config must be a transformers.GenerationConfig, got {type(given).__name__}")
        model.generation_config = given
        return
    try:
        model.generation_config = GenerationConfig.from_pretrained(path, **{k: v for k, v in hub_kwargs.items()
                                                                           if v is not None})
    except Exception:  # no generation_config.json (the official repos have none)
        model.generation_config = GenerationConfig.from_model_config(model.config)


# ---------------------------------------------------------------------------------------------
# Moving mapped CPU weights to 2 MB pages after loading

_MIGRATIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> _LargePages


class _Halted(Exception):
    pass


class _LargePages(threading.Thread):
    """Copies the weights of a freshly loaded model from the checkpoint's mapping into 2 MB pages
    on one background thread, swapping each parameter's data when its copy is complete.

    Loading then takes as long as mapping the file, and generation can start at once, reading the
    mapping (4 KB pages); the copying runs only while no CPU kernel has run for 0.1 s (between
    requests), and decoding gets faster as weights move (see ``cpu_kernels.to_large_pages``).
    Each weight is resident once, in the mapping or in its copy: the mapping's pages of a moved
    weight are dropped (MADV_DONTNEED; they stay readable from the file), so memory does not grow.
    The mapped tensors stay referenced by ``_items`` for the model's lifetime (address space only)
    so that a kernel call already running on one never reads unmapped memory. A parameter that was
    replaced or converted meanwhile (``.to()``, ``.half()``, ``load_state_dict``) is left alone;
    ``model._apply`` (behind ``.to()`` & co.) stops the thread first (``stop_large_pages``).
    """

    IDLE = 0.1  # seconds without a CPU kernel call before a chunk is copied

    def __init__(self, model, items, files):
        super().__init__(name="chatglm6b-large-pages", daemon=True)
        self._model = weakref.ref(model)
        self._items = [(weakref.ref(model.get_parameter(key)), tensor, mapped) for key, tensor, mapped in items]
        self._files = files
        self._halt = threading.Event()
        self.total, self.moved, self.seconds, self.error = len(items), 0, None, None

    def run(self):
        t0 = time.perf_counter()
        try:
            # The CPU kernels first: their idle signal paces the copy (a forward meanwhile waits for
            # the same build). Without them the weights stay in the mapping, as with
            # CHATGLM_KERNELS=torch; .to() & co. cancel the build (halt sets the event).
            if not cpu_kernels.available(cancel=self._halt):
                return
            for param_ref, old, mapped in self._items:
                param = param_ref()
                if self._halt.is_set() or self._model() is None:
                    break
                if param is None or param.device.type != "cpu" or param.data_ptr() != old.data_ptr():
                    continue  # replaced (quantize(), load_state_dict, ...) or converted meanwhile
                new = to_large_pages(old, mapped.filler(old, before_chunk=self._wait_idle))
                if new is old or param.data_ptr() != old.data_ptr():
                    continue
                param.data = new
                release_pages(old)  # again: a forward may have touched chunks dropped during the copy
                self.moved += 1
        except (_Halted, cpu_kernels.BuildCancelled):
            pass
        except Exception as exc:  # e.g. out of memory: the model keeps working from the mapping
            self.error = exc
            warnings.warn(f"chatglm6b: moving the weights to 2 MB pages stopped ({exc}); the model keeps "
                          "reading them from the checkpoint's mapping (slower decoding)", RuntimeWarning)
        finally:
            for f in self._files:
                f.close()
            self.seconds = time.perf_counter() - t0

    def _wait_idle(self):
        """Copy only while the model is idle (e.g. between chat turns): the copy competes with
        inference for memory bandwidth and, on 2 cores, for a core (measured here: decode steps
        500-1200 ms instead of 320 while copying). Raises to stop when halted."""
        while not cpu_kernels.idle_for(self.IDLE):
            if self._halt.wait(0.02):
                break
        if self._halt.is_set():
            raise _Halted()

    def halt(self):
        """Stop before the next chunk or weight (the weight being swapped, if any, completes)."""
        self._halt.set()


@atexit.register
def _halt_all_at_exit() -> None:
    """Stop the background moves before the interpreter finalizes: a daemon thread caught inside a
    torch call then is torn down through C++ frames, which aborts the process ("terminate called
    without an active exception", exit status 134) after a script that ended while weights were
    still moving. Each stops before its next 4 MB chunk."""
    jobs = [job for job in list(_MIGRATIONS.values()) if job.is_alive()]
    for job in jobs:
        job.halt()
    for job in jobs:
        job.join(timeout=30)


def start_large_pages(model, items, files) -> None:
    job = _LargePages(model, items, files)
    _MIGRATIONS[model] = job
    job.start()


def wait_for_large_pages(model, timeout: Optional[float] = None) -> dict:
    """Wait until the weights of ``model`` are in 2 MB pages (no-op when nothing is being moved);
    returns ``{"moved": n, "total": n, "seconds": s or None, "done": bool}``."""
    job = _MIGRATIONS.get(model)
    if job is None:
        return {"moved": 0, "total": 0, "seconds": 0.0, "done": True}
    job.join(timeout)
    return {"moved": job.moved, "total": job.total, "seconds": job.seconds, "done": not job.is_alive()}


def stop_large_pages(model) -> None:
    """Stop moving weights (the ones already moved stay moved) and wait for the thread."""
    job = _MIGRATIONS.get(model)
    if job is not None and job.is_alive():
        job.halt()
        job.join()
