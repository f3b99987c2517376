"""Placing ChatGLM-6B on devices: one device, an explicit device_map, or accelerate's "auto" plans.

A device map is ``{module or parameter name: device}``; devices are CUDA indices (``0``),
``"cuda:1"``, ``"cpu"`` or ``"disk"``. A ``GLMBlock`` (``transformer.layers.N``) is never split.

How a multi-device model runs: the loader puts every tensor on its mapped device (``"disk"``
tensors on the CPU first), then `dispatch` hands the model to ``accelerate.dispatch_model``,
whose hooks move hidden states from block to block and bring offloaded weights in for each
forward. The GLMCache stays where each block computed it, so layer i's keys/values live on
layer i's device. Accelerate is optional: it is imported (with importlib, as the remote-code
loader requires) only when a map needs it.

The tied LM head: ``lm_head.weight`` is ``transformer.word_embeddings.weight``. When both sit on
one device that keeps the weights (a GPU, or the CPU when the CPU computes) they stay one tensor.
Otherwise the head gets its own Parameter (same values) before dispatch — one copy on each side,
or a file of its own on disk — because a tensor cannot live on two devices, and accelerate's
tied-weight bookkeeping breaks when only one of two tied modules is offloaded.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Dict, List, Optional, Union

import torch
from torch import nn

__all__ = [
    "STRATEGIES",
    "normalize_device_map",
    "check_device_map",
    "placement",
    "device_for",
    "plan_device_map",
    "dispatch",
    "input_device",
]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DISK = "disk"
EMBED, HEAD = "transformer.word_embeddings.weight", "lm_head.weight"
BLOCKS = "transformer.layers."
# keys accelerate must not move between devices (our GLMCache stays where each layer wrote it)
SKIP_KEYS = ["past_key_values", "cache"]

Device = Union[int, str]


def _accelerate(purpose: str):
    try:
        return importlib.import_module("accelerate")
    except ImportError as e:
        raise ImportError(f"{purpose} needs the accelerate package: pip install accelerate") from e


def canonical_device(device) -> Device:
    """The form accelerate and ``hf_device_map`` use: CUDA index as int, else "cpu" / "disk" / "mps" ..."""
    if isinstance(device, bool):
        raise ValueError(f"not a device: {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"CUDA device index must be >= 0, got {device}")
        return device
    if isinstance(device, str) and device == DISK:
        return DISK
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"not a device: {device!r} (use a CUDA index like 0, 'cuda:1', 'cpu' or 'disk')") from e
    if dev.type == "meta":
        raise ValueError("device_map cannot place weights on 'meta'; use 'cpu', a GPU or 'disk'")
    if dev.type == "cuda":
        return dev.index or 0
    if dev.type == "cpu":
        return "cpu"  # one CPU device, whatever index was written
    return dev.type if dev.index is None else str(dev)


def normalize_device_map(device_map):
    """A strategy name ("auto", ...) or a ``{prefix: device}`` dict with canonical devices.

    None means everything on the CPU; a single device means ``{"": device}``.
    """
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return device_map
    if isinstance(device_map, (int, str, torch.device)):
        return {"": canonical_device(device_map)}
    if isinstance(device_map, dict):
        if not device_map:
            raise ValueError("device_map is an empty dict; map module names to devices, or use device_map='auto'")
        return {str(k): canonical_device(v) for k, v in device_map.items()}
    raise TypeError(f"device_map must be a dict, a device, or one of {STRATEGIES}; got {type(device_map).__name__}")


def placement(key: str, device_map: Dict[str, Device]) -> Device:
    """Where ``device_map`` puts ``key`` (the longest matching prefix wins), "disk" included."""
    best, best_len = None, -1
    for prefix, dev in device_map.items():
        if (prefix == "" or key == prefix or key.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = dev, len(prefix)
    if best_len < 0:
        raise ValueError(f"device_map does not place {key!r}; give every module a device (or use 'auto')")
    return best


def device_for(key: str, device_map: Dict[str, Device]) -> torch.device:
    """The device a tensor is loaded to: its mapped device, the CPU for "disk" (offloaded by `dispatch`)."""
    dev = placement(key, device_map)
    if isinstance(dev, int):
        return torch.device("cuda", dev)
    return torch.device("cpu" if dev == DISK else dev)


def check_device_map(model: nn.Module, device_map: Dict[str, Device], devices_exist: bool = True) -> Dict[str, Device]:
    """Validate a map against the model: known names, whole GLMBlocks, every tensor placed, GPUs that exist."""
    modules = dict(model.named_modules())
    tensors = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tensors |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    for key, dev in device_map.items():
        if key and key not in modules and key not in tensors:
            examples = "'transformer.word_embeddings', 'transformer.layers.0', 'transformer.final_layernorm', 'lm_head'"
            raise ValueError(f"device_map key {key!r} is not a module or weight of ChatGLM-6B (valid keys look like "
                             f"{examples})")
        if key.startswith(BLOCKS):
            index, _, rest = key[len(BLOCKS):].partition(".")
            if rest:
                raise ValueError(f"device_map key {key!r} splits GLMBlock {BLOCKS}{index}: a block is placed whole; "
                                 f"map '{BLOCKS}{index}' instead")
        if isinstance(dev, int) and devices_exist:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if dev >= count:
                raise ValueError(f"device_map puts {key or 'the model'!r} on cuda:{dev}, but {count} CUDA device(s) "
                                 "are visible; fix the map (or CUDA_VISIBLE_DEVICES)")
    for key in model.state_dict(keep_vars=True):
        placement(key, device_map)  # raises for an unplaced weight
    return device_map


def plan_device_map(model: nn.Module, strategy: str, max_memory, dtype) -> Dict[str, Device]:
    """accelerate's plan for ``strategy`` on the (meta) model; GLMBlocks kept whole.

    As transformers does, "auto"/"balanced"/"balanced_low_0" spread the blocks evenly over the GPUs
    within ``max_memory``; "sequential" fills devices in order. What fits nowhere goes to "disk".
    """
    accelerate = _accelerate(f"device_map={strategy!r}")
    utils = importlib.import_module("accelerate.utils")
    no_split = list(getattr(model, "_no_split_modules", None) or ["GLMBlock"])
    if max_memory is not None:
        max_memory = dict(max_memory)  # accelerate rewrites the dict it is given
    if strategy != "sequential":
        max_memory = utils.get_balanced_memory(model, max_memory=max_memory, dtype=dtype,
                                               low_zero=strategy == "balanced_low_0",
                                               no_split_module_classes=no_split)
    plan = accelerate.infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                            dtype=dtype)
    return check_device_map(model, {k: canonical_device(v) for k, v in plan.items()}, devices_exist=False)


def _disjoint(model: nn.Module, device_map: Dict[str, Device]) -> Dict[str, Device]:
    """The same placement with no key inside another (``{"": "cpu", "lm_head": 0}`` → one key per child).

    accelerate attaches one hook per key; nested keys would give a module two conflicting hooks.
    """
    out: Dict[str, Device] = {}

    def visit(name: str, module: nn.Module):
        inner = [k for k in device_map if k != name and (name == "" or k.startswith(name + "."))]
        if not inner:
            out[name] = placement(name, device_map) if name else device_map[""]
            return
        prefix = name + "." if name else ""
        for pname, _ in module.named_parameters(recurse=False):
            out[prefix + pname] = placement(prefix + pname, device_map)
        for bname, _ in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                out[prefix + bname] = placement(prefix + bname, device_map)
        for cname, child in module.named_children():
            if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                visit(prefix + cname, child)

    visit("", model)
    return out


def _main_device(device_map: Dict[str, Device], embed: Device) -> Device:
    """Where inputs go first: the embedding's device if it computes there, else the first GPU in the map."""
    if embed not in ("cpu", DISK):
        return embed
    return next((d for d in device_map.values() if d not in ("cpu", DISK)), "cpu")


def _untie_head(model: nn.Module, embed: Device, head: Device, offloaded) -> bool:
    """Give lm_head its own Parameter when the tied pair cannot be one resident tensor."""
    emb_w = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings()
    if lm_head is None or lm_head.weight is not emb_w:
        return False
    if embed == head and embed not in offloaded:
        return False
    lm_head.weight = nn.Parameter(emb_w.detach(), requires_grad=emb_w.requires_grad)  # shares storage for now
    model._glm_head_untied = True  # tie_weights() must not re-tie across devices
    return True


def _offload_to_disk(model: nn.Module, device_map: Dict[str, Device], folder: str) -> List[str]:
    """Write every "disk" tensor to ``folder`` in accelerate's layout (``NAME.dat`` + ``index.json``).

    Always written afresh: accelerate reuses a folder that already has an index.json without
    looking at what is in it, so a folder left by another model would silently feed its weights.
    """
    utils = importlib.import_module("accelerate.utils")
    os.makedirs(folder, exist_ok=True)
    index: dict = {}
    written = []
    for key, tensor in model.state_dict().items():
        if placement(key, device_map) == DISK:
            if tensor.is_meta:
                raise RuntimeError(f"internal error: {key} was not loaded before offloading it to disk")
            utils.offload_weight(tensor.detach(), key, folder, index=index)
            written.append(key)
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return written


def dispatch(model: nn.Module, device_map: Dict[str, Device], offload_folder: Optional[str] = None) -> nn.Module:
    """Attach accelerate hooks for a map over several devices or with "disk" (no-op for one device)."""
    devices = set(device_map.values())
    if len(devices) == 1 and DISK not in devices:
        return model  # the loader already put every tensor there
    accelerate = _accelerate("a device_map over several devices (or with 'disk')")
    check_device_map(model, device_map)
    flat = _disjoint(model, device_map)  # param-less modules (dropout) drop out here
    disk = [k for k, d in flat.items() if d == DISK]
    if disk and offload_folder is None:
        shown = ", ".join(disk[:4]) + (f" … ({len(disk)} in all)" if len(disk) > 4 else "")
        raise ValueError(f"device_map offloads {shown} to 'disk': pass offload_folder='<folder for this model's "
                         "offloaded weights>' to from_pretrained (or give it more max_memory)")
    embed, head = placement(EMBED, device_map), placement(HEAD, device_map)
    main = _main_device(device_map, embed)
    _untie_head(model, embed, head, offloaded={DISK} if main == "cpu" else {"cpu", DISK})
    if disk:
        _offload_to_disk(model, flat, str(offload_folder))
    accelerate.dispatch_model(model, device_map=flat, main_device=main,
                              offload_dir=str(offload_folder) if disk else None, skip_keys=SKIP_KEYS,
                              force_hooks=True)
    return model  # accelerate records the (flat) map as model.hf_device_map


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: a dispatched model's main device, else the embedding's device.

    (``PreTrainedModel.device`` reads the first parameter, which is 'meta' once a device_map offloads
    the embedding.)
    """
    hook = getattr(model, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return model.get_input_embeddings().weight.device
