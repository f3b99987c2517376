"""Weight-only INT8 / INT4 quantization for ChatGLM-6B (SPEC §3).

Per output row: ``scale = max|W[row]| / (2**(bits-1) - 1)``, ``q = round(W / scale)``
(round half to even, no clamp, no zero point), ``W ≈ q * scale``. INT4 packs two values
per byte, the even column in the high nibble.

`QuantizedLinear` is a drop-in ``nn.Linear`` replacement whose state-dict keys equal the
official checkpoint's (``weight`` int8, ``weight_scale`` fp16, ``bias`` fp16). Its forward
goes through `quantized_linear`, the single place that picks a kernel:
CUDA kernels (cuda_kernels.py) for CUDA tensors, compiled C kernels (cpu_kernels.py) for
CPU tensors, and the dequantize-in-torch path everywhere else (and as the oracle).
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "quantize_weight",
    "pack_int4",
    "unpack_int4",
    "dequantize_weight",
    "torch_quantized_linear",
    "quantized_linear",
    "QuantizedLinear",
    "quantize_model",
    "kernel_backend",
    "kernels_may_run",
]

SUPPORTED_BITS = (4, 8)


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantization bits must be 4 or 8, got {bits!r}")
    return bits


def quantize_weight(weight: torch.Tensor, bits: int):
    """Quantize a float ``[out, in]`` weight. Returns ``(q int8 [out, in or in/2], scale)``.

    The scale keeps the dtype of ``weight`` (fp16 for the official checkpoints); the division
    is done in fp32 on the scale rounded to that dtype, as the released weights were made.
    """
    _check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    # Row blocks of ~64 MB of fp32: the same row-wise operations as on the whole matrix (so the
    # same bits), without full-size temporaries (a 16384 x 4096 fp32 copy is 268 MB, fresh pages).
    rows = max(1, (64 << 20) // max(1, 4 * weight.shape[1]))
    maxima = torch.cat([w.abs().max(dim=-1).values for w in weight.split(rows)])
    scale = maxima / float(2 ** (bits - 1) - 1)  # [out], weight dtype
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for i in range(0, weight.shape[0], rows):
        q[i:i + rows] = torch.round(weight[i:i + rows].float() / scale[i:i + rows].float()[:, None])
    if bits == 4:
        q = pack_int4(q)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` int8 values in [-8, 7] → ``[out, in/2]`` bytes, even column high nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"INT4 packing needs an even number of columns, got {q.shape[-1]}")
    hi = q[..., 0::2].to(torch.int16)
    lo = q[..., 1::2].to(torch.int16)
    packed = ((hi << 4) | (lo & 0xF)) & 0xFF
    return packed.to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``[out, in/2]`` packed bytes → ``[out, in]`` int8, both nibbles sign-extended."""
    b = packed.view(torch.int8)
    hi = b >> 4  # arithmetic shift sign-extends the high nibble
    lo = (b << 4) >> 4  # int8 shift wraps, then sign-extends the low nibble
    return torch.stack((hi, lo), dim=-1).flatten(-2)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype=None) -> torch.Tensor:
    """Full float weight ``q * scale[:, None]`` in ``dtype`` (default: the scale's dtype)."""
    dtype = dtype or scale.dtype
    if _check_bits(bits) == 4:
        q = unpack_int4(q)
    return q.to(dtype) * scale.to(dtype)[:, None]


def torch_quantized_linear(x, q, scale, bias, bits: int):
    """Reference path: dequantize in the activation dtype, then ``F.linear``. Runs anywhere."""
    w = dequantize_weight(q, scale, bits, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------------------
# Kernel dispatch. Backends are looked up lazily, so nothing is compiled (or imported) until a
# quantized layer actually runs on that kind of device.

_FORCED = os.environ.get("CHATGLM_KERNELS", "auto").lower()  # auto | torch


_BACKENDS: dict = {}


def kernel_backend(device_type: str):
    """The fast-kernel ``linear`` for ``device_type`` ('cpu' / 'cuda'), or None for the torch path.

    Decided once per device type and process (the kernel modules build lazily on first use).
    (Imports are written ``from .x import y`` so that Hugging Face's remote-code loader sees and
    copies the kernel modules; optional packages inside them are imported with importlib.)
    """
    if _FORCED == "torch":
        return None
    if device_type not in _BACKENDS:
        if device_type == "cuda":
            from .cuda_kernels import available, linear
        elif device_type == "cpu":
            from .cpu_kernels import available, linear
        else:
            return None
        _BACKENDS[device_type] = linear if available() else None
    return _BACKENDS[device_type]


def kernels_may_run(device_type: str) -> bool:
    """Whether ``kernel_backend(device_type)`` may return a kernel, decided without building or
    importing anything: False under CHATGLM_KERNELS=torch or once the kernels were found missing."""
    return _FORCED != "torch" and _BACKENDS.get(device_type, True) is not None


def quantized_linear(x, q, scale, bias, bits: int, use_kernels: bool = True):
    """``x @ dequant(q, scale).T + bias``, with the fastest kernel available for x's device."""
    if use_kernels and not (torch.is_grad_enabled() and x.requires_grad):
        kernel = kernel_backend(x.device.type)
        if kernel is not None:
            out = kernel(x, q, scale, bias, bits)
            if out is not None:
                return out
    return torch_quantized_linear(x, q, scale, bias, bits)


class QuantizedLinear(nn.Module):
    """Weight-only quantized ``nn.Linear``; built directly in quantized form (never FP16 first)."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True,
                 device=None, dtype=torch.float16):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, _check_bits(bits)
        packed_in = in_features // 2 if bits == 4 else in_features
        if bits == 4 and in_features % 2:
            raise ValueError(f"INT4 needs an even in_features, got {in_features}")
        # Integer weights cannot require grad; keep them parameters so state_dict()/to()/
        # accelerate treat them like any weight and keys match the checkpoint.
        self.weight = nn.Parameter(torch.empty(out_features, packed_in, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                         requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.use_kernels = True

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int) -> "QuantizedLinear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None,
                    device="meta", dtype=w.dtype)
        q, scale = quantize_weight(w, bits)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def _apply(self, fn, *args, **kwargs):
        # `.bfloat16()` would round the fp16 row scales to bf16 (3 bits lost on every row): keep them.
        scale = self.weight_scale.data
        super()._apply(fn, *args, **kwargs)
        if self.weight_scale.dtype == torch.bfloat16 and scale.dtype in (torch.float16, torch.float32):
            self.weight_scale.data = scale.to(self.weight_scale.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.weight_scale, self.bias, self.bits, self.use_kernels)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def quantize_model(layers: nn.ModuleList, bits: int) -> None:
    """Swap the four linears of every block for `QuantizedLinear`, one layer at a time, so the
    float weights of a layer are freed before the next is quantized (peak ≈ one layer extra)."""
    _check_bits(bits)
    for block in layers:
        for path in QUANTIZED_LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            old = getattr(parent, name)
            if isinstance(old, QuantizedLinear):
                if old.bits != bits:
                    raise ValueError(f"model is already quantized to {old.bits} bits; reload the FP16 "
                                     f"weights to quantize to {bits} bits")
                continue
            setattr(parent, name, QuantizedLinear.from_float(old, bits))
            del old
