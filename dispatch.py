"""Placing ChatGLM-6B on devices: single device, explicit device_map, or accelerate's "auto" plans.

GLMBlock is never split (``_no_split_modules``); multi-device maps get accelerate hooks that move
activations between devices.
"""
from __future__ import annotations

from typing import Dict

import torch


def normalize_device_map(device_map):
    """Return None (everything on one device, given separately) or a {module_prefix: device} dict."""
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, (int, torch.device)) or (isinstance(device_map, str)
                                                      and device_map not in ("auto", "balanced", "balanced_low_0",
                                                                             "sequential")):
        return {"": torch.device(device_map) if not isinstance(device_map, int) else torch.device("cuda", device_map)}
    return device_map


def device_for(key: str, device_map: Dict[str, object]):
    best, best_len = None, -1
    for prefix, dev in device_map.items():
        if prefix == "" or key == prefix or key.startswith(prefix + "."):
            if len(prefix) > best_len:
                best, best_len = dev, len(prefix)
    if best is None:
        raise ValueError(f"device_map does not place {key!r}; give every module a device (or use 'auto')")
    if isinstance(best, int):
        return torch.device("cuda", best)
    return torch.device(best) if best != "disk" else torch.device("cpu")


def plan_device_map(model, strategy, max_memory, dtype):
    try:
        import importlib
        accelerate = importlib.import_module("accelerate")
    except ImportError as e:
        raise ImportError("device_map='auto' needs accelerate: pip install accelerate") from e
    kwargs = dict(max_memory=max_memory, no_split_module_classes=["GLMBlock"], dtype=dtype)
    if strategy in ("balanced", "balanced_low_0", "auto") and max_memory is None:
        kwargs["max_memory"] = accelerate.utils.get_balanced_memory(
            model, dtype=dtype, low_zero=strategy == "balanced_low_0", no_split_module_classes=["GLMBlock"])
    return accelerate.infer_auto_device_map(model, **kwargs)


def dispatch(model, dmap, offload_folder):
    import importlib
    accelerate = importlib.import_module("accelerate")
    main = next((d for d in dmap.values() if d not in ("cpu", "disk")), "cpu")
    accelerate.dispatch_model(model, device_map=dmap, main_device=main, offload_dir=offload_folder)
