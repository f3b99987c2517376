"""ChatGLM-6B (FP16 / INT8 / INT4) for Hugging Face transformers 4.27.1 … 5.x.

Behaviour follows SPEC.md: the block math, 2-D rotary positions, the prefix-bidirectional
mask and the odd-but-released numerics (alpha = sqrt(56), the per-layer attention scaling,
fp16-rounded rotary frequencies). Tensors are batch-first inside: ``[b, s, h]`` for hidden
states and ``[b, heads, s, head_dim]`` for attention.

On CPU the model keeps fp16 weights in storage and computes in fp32, so nobody needs to call
``.float()``; on CUDA it computes in the weights' dtype.
"""
from __future__ import annotations

import functools
import inspect
import math
import re
from dataclasses import field, make_dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn import functional as F
import transformers
from transformers import PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

from .configuration_chatglm import ChatGLMConfig
from .quantization import QuantizedLinear, kernels_may_run, quantize_model
# transformers 4.27 copies, from a local folder, only the modules that this file itself imports
# (not what those import in turn): name every module of the package here so none is left behind.
from .dispatch import input_device
from .cuda_kernels import available as _cuda_kernels_available  # noqa: F401  (used by quantization.py)
from .cuda_kernels import warm_up as _cuda_warm_up
from .cuda_mma import available as _cuda_mma_available  # noqa: F401  (used by cuda_kernels.py)
from .fast_decode import fast_generate as _fast_generate, fast_stream_generate as _fast_stream_generate

__all__ = [
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "ChatGLMPreTrainedModel",
    "GLMBlock",
    "GLMCache",
    "build_attention_mask",
    "build_position_ids",
    "build_chat_prompt",
    "process_response",
]

_TF_MAJOR = int(transformers.__version__.split(".")[0])


def _cache_kwarg_name() -> str:
    """Where `generate` keeps the cache in model_kwargs: 'cache' on recent 5.x, else 'past_key_values'."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES
        return ALL_CACHE_NAMES[0]
    except ImportError:
        return "past_key_values"


_CACHE_KW = _cache_kwarg_name()
# transformers < 4.28 has no `streamer` argument in generate(); we feed streamers ourselves there.
_HF_STREAMER = "streamer" in inspect.signature(GenerationMixin.generate).parameters
ALPHA_LAYERS = 28  # the released model scales residuals by sqrt(2 * 28) whatever num_layers is


# ----------------------------------------------------------------------------------------
# Masks and positions (SPEC §5) — pure functions.

def _first_index(row: torch.Tensor, token_id: int) -> int:
    hits = (row == token_id).nonzero()
    return int(hits[0, 0]) if hits.numel() else -1


def context_lengths(input_ids: torch.Tensor, bos_token_id: int) -> List[int]:
    """Index of the first ``<sop>`` in every row (the start of the causal part)."""
    out = []
    for i, row in enumerate(input_ids):
        idx = _first_index(row, bos_token_id)
        if idx < 0:
            raise ValueError(f"row {i} of input_ids has no <sop> (id {bos_token_id}): encode prompts with the "
                             "ChatGLM tokenizer, which appends [gMASK] <sop>")
        out.append(idx)
    return out


def mask_positions(input_ids: torch.Tensor, mask_token_id: int, gmask_token_id: int) -> List[int]:
    """Index of ``[gMASK]`` in every row, else of ``[MASK]`` (the model's preference)."""
    out = []
    for i, row in enumerate(input_ids):
        idx = _first_index(row, gmask_token_id)
        if idx < 0:
            idx = _first_index(row, mask_token_id)
        if idx < 0:
            raise ValueError(f"row {i} of input_ids has neither [gMASK] ({gmask_token_id}) nor [MASK] "
                             f"({mask_token_id}): encode prompts with the ChatGLM tokenizer")
        out.append(idx)
    return out


def build_attention_mask(input_ids: torch.Tensor, bos_token_id: int, pad_mask: Optional[torch.Tensor] = None):
    """Bool ``[b, 1, s, s]``, True = masked: prefix bidirectional, causal from ``<sop>`` on.

    ``pad_mask`` (``[b, s]``, 1 = real token, left padding) additionally masks padded rows/columns.
    """
    b, s = input_ids.shape
    visible = torch.ones(b, s, s, device=input_ids.device).tril_()
    for i, ctx in enumerate(context_lengths(input_ids, bos_token_id)):
        visible[i, :, :ctx] = 1
    if pad_mask is not None:
        keep = pad_mask.to(visible.dtype)
        visible = visible * keep[:, None, :] * keep[:, :, None]
    return (visible < 0.5).unsqueeze(1)


def build_position_ids(input_ids: torch.Tensor, bos_token_id: int, mask_token_id: int, gmask_token_id: int,
                       pad_mask: Optional[torch.Tensor] = None):
    """``[b, 2, s]``: channel 0 the position (frozen at the mask position from ``<sop>`` on),
    channel 1 the block position (0 in the context, 1, 2, … from ``<sop>``)."""
    b, s = input_ids.shape
    ctxs = context_lengths(input_ids, bos_token_id)
    mpos = mask_positions(input_ids, mask_token_id, gmask_token_id)
    pos = torch.zeros(b, 2, s, dtype=torch.long, device=input_ids.device)
    for i in range(b):
        start = 0 if pad_mask is None else int(s - pad_mask[i].sum())  # left padding
        n = s - start
        ctx, mp = ctxs[i] - start, mpos[i] - start
        if ctx < 0 or mp < 0:
            raise ValueError(f"row {i}: padding must be on the left, before the prompt")
        pos[i, 0, start:] = torch.arange(n)
        pos[i, 0, start + ctx:] = mp
        pos[i, 1, start + ctx:] = torch.arange(1, n - ctx + 1)
    return pos


def check_prompt_length(n_tokens: int, config) -> None:
    """Prompts longer than the model's trained context are refused (the error names both numbers)."""
    if n_tokens > config.max_sequence_length:
        raise ValueError(f"the prompt has {n_tokens} tokens but ChatGLM-6B supports at most max_sequence_length="
                         f"{config.max_sequence_length}; shorten the prompt or the chat history")


# ----------------------------------------------------------------------------------------
# Rotary embedding (SPEC §4.2).

def rotary_inv_freq(rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    """fp16-rounded frequencies, as the released model uses them (even in fp32)."""
    return (1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))).half()


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin for both position channels: each ``[b, 2, s, rot_dim]`` in ``dtype``.

    In fp16 the angle ``t * inv_freq`` is itself rounded to fp16 before cos/sin (released numerics).
    """
    angle_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    angles = position_ids.to(angle_dtype)[..., None] * inv_freq.to(device=position_ids.device, dtype=angle_dtype)
    angles = torch.cat((angles, angles), dim=-1).float()  # [b, 2, s, rot_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[b, heads, s, d]`` (or ``[b, heads, s, n, d]``: n vectors per position rotated alike);
    the first half of d rotates with channel 0, the second half with channel 1."""
    x_pos, x_block = x.chunk(2, dim=-1)
    c0, c1 = cos[:, 0, None], cos[:, 1, None]  # [b, 1, s, d/2]
    s0, s1 = sin[:, 0, None], sin[:, 1, None]
    if x.dim() == 5:
        c0, c1, s0, s1 = c0.unsqueeze(-2), c1.unsqueeze(-2), s0.unsqueeze(-2), s1.unsqueeze(-2)
    x_pos = x_pos * c0 + rotate_half(x_pos) * s0
    x_block = x_block * c1 + rotate_half(x_block) * s1
    return torch.cat((x_pos, x_block), dim=-1)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))
    # Inference: the same operations in the same order (so the same bits), in two fresh buffers
    # instead of nine; at prefill each is [tokens, 16384] and fresh ones cost page faults.
    t = x * 0.044715
    t.mul_(x).add_(1.0)
    u = x * 0.7978845608028654
    t.mul_(u).tanh_().add_(1.0)  # (0.797.. * x) * (1 + 0.044715 * x * x), then 1 + tanh(.)
    torch.mul(x, 0.5, out=u)
    return t.mul_(u)


def glm_attention(q, k, v, mask: Optional[torch.Tensor], layer_index: int, return_probs: bool = False):
    """Scaled dot-product attention with the released per-layer scaling (SPEC §4.4).

    q ``[b, h, sq, d]``, k/v ``[b, h, sk, d]``, mask bool ``[b, 1, sq, sk]`` (True = masked).
    Returns the context ``[b, h, sq, d]``, and with return_probs also the attention weights
    ``[b, h, sq, sk]`` (softmax output in v's dtype, as the original's output_attentions).
    """
    coeff = float(layer_index + 1)
    q = q / (math.sqrt(q.shape[-1]) * coeff)
    scores = torch.matmul(q, k.transpose(-1, -2))  # [b, h, sq, sk]
    if mask is not None:
        scores = scores.masked_fill(mask, -10000.0)
    probs = torch.softmax(scores.float() * coeff, dim=-1).to(v.dtype)
    ctx = torch.matmul(probs, v)
    return (ctx, probs) if return_probs else ctx


# ----------------------------------------------------------------------------------------
# KV cache.

class GLMCache:
    """Per-layer keys/values ``[b, heads, len, head_dim]`` (keys after rotary).

    P-tuning prefixes are its first ``prefix_len`` entries. ``update`` appends; a static,
    preallocated variant for CUDA graphs lives with the fast decode loop.
    """

    is_compileable = False
    GROW = 64  # positions added at a time when the preallocated room runs out (inference)

    def __init__(self, num_layers: int):
        self.keys: List[Optional[torch.Tensor]] = [None] * num_layers
        self.values: List[Optional[torch.Tensor]] = [None] * num_layers
        self._room: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * num_layers
        self.prefix_len = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is None:
            # own storage: k and v arrive as views of the layer's whole q/k/v projection, which
            # the cache would otherwise keep alive (twice the memory of the keys and values)
            self.keys[layer], self.values[layer] = k.contiguous(), v.contiguous()
            return k, v
        if old_k.device != k.device:  # P-tuning prefix made at the prefix encoder; block elsewhere
            old_k, old_v = old_k.to(k.device), old_v.to(k.device)
        if torch.is_grad_enabled() or old_k.dtype != k.dtype or old_k.shape[:2] != k.shape[:2]:
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)  # autograd needs fresh tensors
            self._room[layer] = None
        else:
            # Inference: keys/values are views of buffers with room for GROW more positions, so a
            # decode step writes one position instead of copying the whole cache (torch.cat).
            n, add = old_k.shape[2], k.shape[2]
            room = self._room[layer]
            if room is None or room[0].shape[2] < n + add or room[0].data_ptr() != old_k.data_ptr():
                size = list(k.shape)
                size[2] = n + add + self.GROW
                room = (k.new_empty(size), v.new_empty(size))
                room[0][:, :, :n].copy_(old_k)
                room[1][:, :, :n].copy_(old_v)
                self._room[layer] = room
            room[0][:, :, n:n + add].copy_(k)
            room[1][:, :, n:n + add].copy_(v)
            k, v = room[0][:, :, :n + add], room[1][:, :, :n + add]
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def get_seq_length(self, layer: int = 0) -> int:
        """Number of cached tokens (prefix excluded)."""
        k = self.keys[layer]
        return 0 if k is None else k.shape[2] - self.prefix_len

    def reorder(self, beam_idx: torch.Tensor) -> "GLMCache":
        self._room = [None] * len(self.keys)
        for i, k in enumerate(self.keys):
            if k is not None:
                self.keys[i] = k.index_select(0, beam_idx.to(k.device))
                self.values[i] = self.values[i].index_select(0, beam_idx.to(k.device))
        return self

    def __len__(self):
        return len(self.keys)


# ----------------------------------------------------------------------------------------
# Modules. Attribute names equal the checkpoint keys.

class CastLinear(nn.Linear):
    """nn.Linear that runs in the activation dtype (fp16 weights, fp32 compute on CPU)."""

    def forward(self, x):
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)


class CastLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class LMHead(CastLinear):
    """The (tied) output projection. Called as a module, so that device-map hooks move its input to
    its device and bring in an offloaded weight; on CPU it avoids an fp32 copy of the fp16 matrix."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == hidden.dtype:
            return F.linear(hidden, w)
        if hidden.device.type == "cpu" and not (torch.is_grad_enabled() and (w.requires_grad or hidden.requires_grad)):
            from . import cpu_kernels  # noqa: F401  (kept importable for the remote-code loader)
            from .cpu_kernels import available
            fp16_linear = getattr(cpu_kernels, "fp16_linear", None)
            if fp16_linear is not None and available() and w.dtype == torch.float16 and hidden.dtype == torch.float32:
                out = fp16_linear(hidden, w)
                if out is not None:
                    return out
        chunk = 16384  # rows of the vocabulary converted at a time
        return torch.cat([F.linear(hidden, w[i:i + chunk].to(hidden.dtype)) for i in range(0, w.shape[0], chunk)],
                         dim=-1)


def make_linear(config: ChatGLMConfig, in_features: int, out_features: int, dtype, device):
    if config.quantization_bit:
        return QuantizedLinear(in_features, out_features, config.quantization_bit, bias=True,
                               device=device, dtype=dtype)
    return CastLinear(in_features, out_features, bias=True, device=device, dtype=dtype)


class RotaryEmbedding(nn.Module):
    """Holds ``inv_freq`` so the checkpoint key exists; its stored value is ignored (recomputed)."""

    def __init__(self, rot_dim: int, device=None):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(rot_dim).to(device), persistent=True)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_index: int, dtype=None, device=None):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(self.head_dim // 2, device=device)
        self.query_key_value = make_linear(config, config.hidden_size, 3 * config.hidden_size, dtype, device)
        self.dense = make_linear(config, config.hidden_size, config.hidden_size, dtype, device)

    def forward(self, x, cos, sin, mask, cache: Optional[GLMCache]):
        """(output [b, s, hidden], attention weights [b, heads, s, keys])."""
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.num_heads, 3 * self.head_dim)
        qkv = qkv.transpose(1, 2)  # [b, heads, s, 3*head_dim]: rows interleaved per head
        d = self.head_dim
        # q and k side by side in one rotation (the same element-wise operations, half the calls)
        q, k = apply_rotary_2d(qkv[..., :2 * d].unflatten(-1, (2, d)), cos, sin).unbind(-2)
        v = qkv[..., 2 * d:]
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        ctx, probs = glm_attention(q, k, v, mask, self.layer_index, return_probs=True)  # ctx [b, heads, s, d]
        return self.dense(ctx.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)), probs


class GLMMLP(nn.Module):
    def __init__(self, config: ChatGLMConfig, dtype=None, device=None):
        super().__init__()
        self.dense_h_to_4h = make_linear(config, config.hidden_size, config.inner_hidden_size, dtype, device)
        self.dense_4h_to_h = make_linear(config, config.inner_hidden_size, config.hidden_size, dtype, device)

    def forward(self, x):
        return self.dense_4h_to_h(gelu_tanh(self.dense_h_to_4h(x)))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_index: int, dtype=None, device=None):
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = CastLayerNorm(h, eps=eps, device=device, dtype=dtype)
        self.attention = SelfAttention(config, layer_index, dtype=dtype, device=device)
        self.post_attention_layernorm = CastLayerNorm(h, eps=eps, device=device, dtype=dtype)
        self.mlp = GLMMLP(config, dtype=dtype, device=device)
        self.alpha = math.sqrt(2 * ALPHA_LAYERS)

    def forward(self, x, cos, sin, mask, cache: Optional[GLMCache] = None, output_attentions: bool = False):
        """The block's output, and with output_attentions also its attention weights [b, h, s, keys]."""
        x1 = self.input_layernorm(x)
        att, probs = self.attention(x1, cos, sin, mask, cache)
        if not output_attentions:
            probs = None  # freed before the MLP: [b, heads, s, keys] is ~0.5 GB at a 2048-token prefill
        h = x1 * self.alpha + att
        x2 = self.post_attention_layernorm(h)
        out = x2 * self.alpha + self.mlp(x2)
        return (out, probs) if output_attentions else out


class PrefixEncoder(nn.Module):
    """P-tuning v2 prefix: ``[b, pre] -> [b, pre, layers * 2 * hidden]`` (SPEC §8)."""

    def __init__(self, config: ChatGLMConfig, dtype=None, device=None):
        super().__init__()
        out = config.num_layers * 2 * config.hidden_size
        self.prefix_projection = bool(config.prefix_projection)
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size, device=device, dtype=dtype)
            self.trans = nn.Sequential(
                CastLinear(config.hidden_size, config.hidden_size, device=device, dtype=dtype),
                nn.Tanh(),
                CastLinear(config.hidden_size, out, device=device, dtype=dtype),
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, out, device=device, dtype=dtype)

    def forward(self, prefix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = self.embedding(prefix).to(dtype)
        return self.trans(x) if self.prefix_projection else x


# ----------------------------------------------------------------------------------------
# Models.

# The cache field carries the running transformers' name: `cache` on 5.x (whose ModelOutput maps the old
# `past_key_values` onto it, with a deprecation warning), `past_key_values` before. One field list, the
# class built from it (make_dataclass: a field name chosen at import time).
_OUTPUT_FIELDS = (
    ("loss", Optional[torch.Tensor]),
    ("logits", Optional[torch.Tensor]),
    (_CACHE_KW, Optional[GLMCache]),
    ("hidden_states", Optional[Tuple[torch.Tensor, ...]]),
    ("attentions", Optional[Tuple[torch.Tensor, ...]]),
    ("last_hidden_state", Optional[torch.Tensor]),
)
ChatGLMOutput = make_dataclass(
    "ChatGLMOutput", [(name, kind, field(default=None)) for name, kind in _OUTPUT_FIELDS], bases=(ModelOutput,),
    namespace={"__module__": __name__, "__doc__": "Output of the ChatGLM models (every field optional)."})


def _cache_of(output) -> Optional[GLMCache]:
    return output.get(_CACHE_KW) if isinstance(output, dict) else getattr(output, _CACHE_KW, None)


def _output(**fields) -> ChatGLMOutput:
    fields[_CACHE_KW] = fields.pop("past_key_values", None)
    return ChatGLMOutput(**fields)


def compute_dtype_for(param_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp16 weights compute in fp32 on CPU (CPU fp16 math is slow and partly missing)."""
    if device.type == "cpu" and param_dtype == torch.float16:
        return torch.float32
    return param_dtype


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    if _TF_MAJOR >= 5:
        _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() & co.: first stop moving CPU weights to 2 MB pages (loading.py)
        from .loading import stop_large_pages
        stop_large_pages(self)
        return super()._apply(fn, *args, **kwargs)

    def wait_for_large_pages(self, timeout: Optional[float] = None) -> dict:
        """After loading on the CPU the weights are moved from the checkpoint's mapping into 2 MB
        pages on a background thread (decoding is ~15 % faster from them); this waits for that.
        Returns ``{"moved", "total", "seconds", "done"}``. Not needed for correctness."""
        from .loading import wait_for_large_pages
        return wait_for_large_pages(self, timeout)

    def _init_weights(self, module):
        if getattr(module, "weight", None) is None or module.weight.is_meta:
            return
        with torch.no_grad():
            if isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 0.02)
            elif isinstance(module, QuantizedLinear):
                module.weight.zero_()
                module.weight_scale.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.02)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    if _TF_MAJOR < 5 and not hasattr(PreTrainedModel, "_set_gradient_checkpointing"):
        # transformers 4.27 – 4.34 call _set_gradient_checkpointing(module, value=...) for every module;
        # newer versions flag modules that have a `gradient_checkpointing` attribute themselves and hand
        # them the checkpoint function (the user's kwargs, e.g. use_reentrant, bound in).
        def _set_gradient_checkpointing(self, module=None, value=False):
            if isinstance(module, ChatGLMModel):
                module.gradient_checkpointing = value
    elif "every_n_layers" in inspect.signature(PreTrainedModel._set_gradient_checkpointing).parameters:
        # transformers >= 5.25: activation_checkpointing_enable(every_n_layers=N) checkpoints every N-th
        # layer of its own layer class only; ChatGLMModel checkpoints its blocks itself, so it keeps N.
        def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                        every_n_layers: int = 1, **kwargs):
            if int(every_n_layers) < 1:
                raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
            if gradient_checkpointing_func is not None:
                kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
            super()._set_gradient_checkpointing(enable=enable, every_n_layers=every_n_layers, **kwargs)
            for module in self.modules():
                if isinstance(module, ChatGLMModel):
                    module.checkpoint_every_n_layers = int(every_n_layers) if enable else 1


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embedding, 28 GLM blocks, final LayerNorm (and an optional P-tuning prefix)."""

    def __init__(self, config: ChatGLMConfig, dtype=None, device=None):
        super().__init__(config)
        self.gradient_checkpointing = False
        self.checkpoint_every_n_layers = 1  # (transformers >= 5.25: activation_checkpointing_enable(every_n_layers))
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList([GLMBlock(config, i, dtype=dtype, device=device)
                                     for i in range(config.num_layers)])
        self.final_layernorm = CastLayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                             device=device, dtype=dtype)
        self.pre_seq_len = config.pre_seq_len
        self.prefix_encoder = PrefixEncoder(config, dtype=dtype, device=device) if config.pre_seq_len else None
        self.prefix_dropout = nn.Dropout(0.1)
        head_dim = config.hidden_size // config.num_attention_heads
        self.register_buffer("_rotary_inv_freq", rotary_inv_freq(head_dim // 2), persistent=False)

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        return compute_dtype_for(self.word_embeddings.weight.dtype, device)

    def _prefix_cache(self, batch: int, device, dtype) -> GLMCache:
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        prefix = torch.arange(self.pre_seq_len, device=device).unsqueeze(0).expand(batch, -1)
        kv = self.prefix_encoder(prefix, dtype)  # [b, pre, layers*2*hidden]
        kv = kv.view(batch, self.pre_seq_len, cfg.num_layers * 2, heads, head_dim)
        kv = self.prefix_dropout(kv).permute(2, 0, 3, 1, 4)  # [layers*2, b, heads, pre, head_dim]
        cache = GLMCache(cfg.num_layers)
        for layer in range(cfg.num_layers):
            cache.keys[layer], cache.values[layer] = kv[2 * layer], kv[2 * layer + 1]
        cache.prefix_len = self.pre_seq_len
        return cache

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[GLMCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ):
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.word_embeddings(input_ids)
        b, s = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        dtype = self.compute_dtype(device)
        hidden = inputs_embeds.to(dtype)

        cache = past_key_values
        past_len = cache.get_seq_length() if cache is not None else 0
        if past_len == 0:
            check_prompt_length(s, cfg)
        if cache is None and self.pre_seq_len and (use_cache or self.pre_seq_len):
            cache = self._prefix_cache(b, device, dtype)
        elif cache is None and use_cache:
            cache = GLMCache(cfg.num_layers)

        mask, position_ids = self._masks_and_positions(input_ids, attention_mask, position_ids, b, s, past_len,
                                                       device)
        if cache is not None and cache.prefix_len:
            mask = F.pad(mask, (cache.prefix_len, 0), value=False) if mask is not None else None
        cos, sin = rotary_cos_sin(position_ids, self._rotary_inv_freq, dtype)

        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing:
            checkpoint, reentrant = self._checkpoint_function()
            if reentrant and not hidden.requires_grad:
                # Reentrant checkpointing gives the parameters inside a block gradients only when one of the
                # block's tensor inputs requires grad; with frozen embeddings (LoRA) none would, and those
                # parameters would silently get none. (transformers 5.x does the same on the embedding output.)
                hidden = hidden.detach().requires_grad_()
        for i, block in enumerate(self.layers):
            if output_hidden_states:
                all_hidden += (hidden,)
            if output_attentions:  # (the blocks then run without gradient checkpointing)
                hidden, probs = block(hidden, cos, sin, mask, cache, output_attentions=True)
                all_attn += (probs,)
            elif checkpointing and i % self.checkpoint_every_n_layers == 0:
                run, past = _rerunnable(block, cache)
                hidden = checkpoint(run, hidden, cos, sin, mask, *past)
            else:
                hidden = block(hidden, cos, sin, mask, cache)
        hidden = self.final_layernorm(hidden)
        if output_hidden_states:
            all_hidden += (hidden,)
        return _output(last_hidden_state=hidden, past_key_values=cache if use_cache else None,
                       hidden_states=all_hidden, attentions=all_attn)

    def _checkpoint_function(self):
        """(function, reentrant): the function transformers (>= 4.35) set with gradient_checkpointing_enable(),
        which carries the user's checkpoint kwargs (use_reentrant, offload on 5.25+), and whether it may be
        reentrant; non-reentrant torch checkpointing on older versions."""
        fn = getattr(self, "_gradient_checkpointing_func", None)
        if fn is None:
            return (lambda *args: torch.utils.checkpoint.checkpoint(*args, use_reentrant=False)), False
        keywords = fn.keywords if isinstance(fn, functools.partial) else {}
        return fn, bool(keywords.get("use_reentrant", True))

    def _masks_and_positions(self, input_ids, attention_mask, position_ids, b, s, past_len, device):
        """Our bool ``[b, 1, s, past+s]`` mask (True = masked) and ``[b, 2, s]`` positions.

        ``attention_mask`` may be ours (4-D) or a Hugging Face padding mask ``[b, past+s]`` (1 = token).
        """
        cfg = self.config
        pad_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            pad_mask, attention_mask = attention_mask.to(device=device, dtype=torch.bool), None
        elif attention_mask is not None:
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if past_len == 0:
            if input_ids is None and (attention_mask is None or position_ids is None):
                raise ValueError("with inputs_embeds, pass attention_mask and position_ids as well")
            pm = pad_mask[:, -s:] if pad_mask is not None else None
            if attention_mask is None:
                attention_mask = build_attention_mask(input_ids, cfg.bos_token_id, pm)
            if position_ids is None:
                position_ids = build_position_ids(input_ids, cfg.bos_token_id, cfg.mask_token_id,
                                                  cfg.gmask_token_id, pm)
            return attention_mask, position_ids.to(device)
        if position_ids is None:
            raise ValueError("continuing from past_key_values needs position_ids (generate() and chat() "
                             "handle this for you)")
        if attention_mask is None and (s > 1 or pad_mask is not None):
            visible = torch.ones(s, past_len + s, device=device).tril_(past_len) > 0.5  # causal among new tokens
            visible = visible[None, None].expand(b, 1, s, past_len + s)
            if pad_mask is not None:
                visible = visible & pad_mask[:, None, None, -(past_len + s):]
            attention_mask = ~visible
        return attention_mask, position_ids.to(device)


class _StreamerFeed(LogitsProcessor):
    """Passes every token chosen so far (beyond what was sent) to a streamer, one put per token."""

    def __init__(self, streamer, sent: int):
        self.streamer, self.sent = streamer, sent

    def __call__(self, input_ids, scores):
        while input_ids.shape[1] > self.sent:
            self.streamer.put(input_ids[0, self.sent:self.sent + 1].cpu())
            self.sent += 1
        return scores


def _rerunnable(block: "GLMBlock", cache: Optional[GLMCache]):
    """``(function, past)``: ``block`` as a function of ``(hidden, cos, sin, mask, *past)`` that gradient
    checkpointing may run twice (backward recomputes it).

    The block appends its keys/values to ``cache``; the recomputation must start from the same past
    (nothing, or the P-tuning prefix) as the first run, not from the keys that run appended. The past
    goes in as arguments, not through the closure, so that reentrant checkpointing (which tracks only
    its tensor arguments) still carries gradients back to a P-tuning prefix.
    """
    if cache is None:
        return (lambda hidden, cos, sin, mask: block(hidden, cos, sin, mask, None)), ()
    layer = block.attention.layer_index

    def run(hidden, cos, sin, mask, past_keys, past_values):
        cache.keys[layer], cache.values[layer] = past_keys, past_values
        return block(hidden, cos, sin, mask, cache)

    return run, (cache.keys[layer], cache.values[layer])


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """If any score is NaN/inf, replace all scores by zeros with 5e4 at token 5 (no host sync)."""

    def __call__(self, input_ids, scores):
        bad = ~torch.isfinite(scores).all()
        fixed = torch.zeros_like(scores)
        fixed[..., 5] = 5e4
        return torch.where(bad, fixed, scores)


def build_chat_prompt(query: str, history: Optional[Sequence[Tuple[str, str]]] = None) -> str:
    """The ChatGLM-6B multi-round prompt (SPEC §7)."""
    if not history:
        return query
    turns = [f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history)]
    return "".join(turns) + f"[Round {len(history)}]\n问：{query}\n答："


_PUNCT = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))
_CJK = "[\u4e00-\u9fff]"


def process_response(response: str) -> str:
    """Post-process a decoded answer (SPEC §7): strip, date placeholder, full-width punctuation by CJK."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, wide in _PUNCT:
        mark = re.escape(ascii_mark)
        response = re.sub(f"({_CJK}){mark}", lambda m: m.group(1) + wide, response)
        response = re.sub(f"{mark}({_CJK})", lambda m: wide + m.group(1), response)
    return response


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM-6B with its (tied) LM head, `generate`, `chat` and `stream_chat`."""

    def __init__(self, config: ChatGLMConfig, empty_init: bool = False, device=None, dtype=None):
        super().__init__(config)
        if dtype is None:
            dtype = torch.float16 if config.quantization_bit else None
        self.transformer = ChatGLMModel(config, dtype=dtype, device=device)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False, device=device,
                              dtype=self.transformer.word_embeddings.weight.dtype)
        self.lm_head.weight = self.transformer.word_embeddings.weight
        if config.pre_seq_len:
            for name, p in self.named_parameters():
                p.requires_grad = name.startswith("transformer.prefix_encoder.")
        if not empty_init:
            self.post_init()
        if torch.cuda.is_available() and kernels_may_run("cuda"):
            _cuda_warm_up()  # Triton's one-time import and hash, on a thread while the weights load

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device, or a dispatched model's main device (a device_map may
        offload the embedding, whose weight then reads 'meta')."""
        return input_device(self)

    # --- embeddings / tying -------------------------------------------------------------
    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new):
        self.lm_head = new

    def tie_weights(self, *args, **kwargs):
        if getattr(self, "_glm_head_untied", False):
            return  # dispatch.py put embedding and head on different devices: one copy on each
        self.lm_head.weight = self.transformer.word_embeddings.weight

    # --- forward ------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[GLMCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int = 0,
        cache: Optional[GLMCache] = None,
        **kwargs,
    ):
        unknown = set(kwargs) - {"output_attentions", "return_legacy_cache", "cache_position", "num_items_in_batch"}
        if unknown:
            raise TypeError(f"ChatGLM forward() got unexpected arguments {sorted(unknown)}")
        out = self.transformer(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
            past_key_values=past_key_values if past_key_values is not None else cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(kwargs.get("output_attentions")),
        )
        new_cache = _cache_of(out)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=-100)
        if return_dict is False:
            return tuple(x for x in (loss, logits, new_cache, out.hidden_states, out.attentions) if x is not None)
        return _output(loss=loss, logits=logits, past_key_values=new_cache, hidden_states=out.hidden_states,
                       attentions=out.attentions)

    def lm_head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # --- generation plumbing (works with transformers 4.27 … 5.x) -------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own cache object

    def _supports_cache_class(self):  # transformers 4.36–4.4x probe
        return False

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      position_ids=None, use_cache=None, **kwargs):
        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            input_ids = input_ids[:, -1:]
            if position_ids is not None:
                position_ids = position_ids[..., -1:]
            if attention_mask is not None and attention_mask.dim() == 4:
                attention_mask = attention_mask[:, :, -1:]
        else:
            cache = None
            check_prompt_length(input_ids.shape[1], self.config)
        inputs = {
            "input_ids": input_ids,
            _CACHE_KW: cache,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "use_cache": True if use_cache is None else use_cache,
            "logits_to_keep": 1,
        }
        for key in ("output_attentions", "output_hidden_states"):  # (5.x passes them here, 4.x to forward)
            if kwargs.get(key):
                inputs[key] = True
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, *args, **kwargs):
        model_kwargs[_CACHE_KW] = _cache_of(outputs)
        pos = model_kwargs.get("position_ids")
        mask = model_kwargs.get("attention_mask")
        if pos is not None:
            nxt = pos[..., -1:].clone()
            nxt[:, 1] += 1
            model_kwargs["position_ids"] = torch.cat((pos, nxt), dim=-1)
        if mask is not None:
            if mask.dim() == 4:
                row = mask[:, :, -1:]  # [b, 1, 1, s] the newest token's view
                model_kwargs["attention_mask"] = F.pad(row, (0, 1), value=False)
            else:
                model_kwargs["attention_mask"] = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=-1)
        return model_kwargs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Beam search / num_return_sequences repeat every row. Our position ids are [batch, 2, seq];
        # transformers 5.x repeats 3-D position ids along dim 1 (the multimodal [3, batch, seq] layout),
        # which would silently give every beam wrong positions: expand them on the batch dim ourselves.
        position_ids = model_kwargs.pop("position_ids", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        if position_ids is not None and expand_size > 1:
            position_ids = position_ids.repeat_interleave(expand_size, dim=0)
        model_kwargs["position_ids"] = position_ids
        return input_ids, model_kwargs

    def _reorder_cache(self, past, beam_idx):
        return past.reorder(beam_idx) if past is not None else past

    def _generate_streaming(self, input_ids, inputs, args, kwargs):
        """generate(streamer=...) on transformers < 4.28: the streamer protocol (put the prompt, then
        every new token, then end) driven by a logits processor, which sees each chosen token."""
        streamer = kwargs.pop("streamer")
        if input_ids is None or input_ids.shape[0] != 1 or (kwargs.get("num_beams") or 1) > 1:
            raise ValueError("a streamer needs input_ids of batch size 1 and num_beams=1 (as in transformers)")
        feed = _StreamerFeed(streamer, input_ids.shape[1])
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), feed])
        streamer.put(input_ids.cpu())
        try:
            out = super().generate(inputs, *args, **kwargs)
            feed(out if torch.is_tensor(out) else out.sequences, None)
        finally:
            streamer.end()
        return out

    def generate(self, inputs=None, *args, **kwargs):
        """`transformers` generate. Masks travel as a 2-D padding mask (all versions accept that);
        the 2-D positions are derived up front so every step is consistent."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None and torch.is_tensor(input_ids) and kwargs.get("inputs_embeds") is None:
            cfg = self.config
            check_prompt_length(input_ids.shape[1], cfg)
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(input_ids)
            elif mask.dim() == 4:  # the tokenizer's mask: the last row sees exactly the real tokens
                mask = (~mask[:, 0, -1, :].bool()).long()
            kwargs["attention_mask"] = mask
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = build_position_ids(input_ids, cfg.bos_token_id, cfg.mask_token_id,
                                                            cfg.gmask_token_id, mask)
        if kwargs.get("streamer") is not None and not _HF_STREAMER:
            return self._generate_streaming(input_ids, inputs, args, kwargs)
        fast = _fast_generate(self, inputs, args, kwargs)  # CUDA graph decode loop, None if not applicable
        if fast is not None:
            return fast
        return super().generate(inputs, *args, **kwargs)

    # --- chat -----------------------------------------------------------------------------
    @staticmethod
    def process_response(response: str) -> str:
        return process_response(response)

    def _chat_inputs(self, tokenizer, query, history):
        prompt = build_chat_prompt(query, history)
        inputs = tokenizer([prompt], return_tensors="pt")
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history: List[Tuple[str, str]] = None, max_length: int = 2048,
             num_beams: int = 1, do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95,
             logits_processor=None, **kwargs):
        history = list(history or [])
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        gen = dict(max_length=max_length, num_beams=num_beams, do_sample=do_sample, logits_processor=processors)
        if do_sample:
            gen.update(top_p=top_p, temperature=temperature, top_k=kwargs.pop("top_k", 50))
        gen.update(kwargs)
        inputs = self._chat_inputs(tokenizer, query, history)
        outputs = self.generate(**inputs, **gen)
        new_tokens = outputs[0, inputs["input_ids"].shape[1]:].tolist()
        response = self.process_response(tokenizer.decode(new_tokens))
        return response, history + [(query, response)]

    @torch.inference_mode()
    def stream_chat(self, tokenizer, query: str, history: List[Tuple[str, str]] = None, max_length: int = 2048,
                    do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95, logits_processor=None,
                    **kwargs) -> Iterator[Tuple[str, List[Tuple[str, str]]]]:
        history = list(history or [])
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        inputs = self._chat_inputs(tokenizer, query, history)
        prompt_len = inputs["input_ids"].shape[1]
        # Like the original, the step that ends generation (eos or max_length) is not yielded — so we
        # yield each item when the next one arrives — but unlike it we always yield at least once.
        held, yielded = None, False
        for ids in self.stream_generate(**inputs, max_length=max_length, do_sample=do_sample, top_p=top_p,
                                        temperature=temperature, logits_processor=processors, **kwargs):
            if held is not None:
                yield held
                yielded = True
            response = self.process_response(tokenizer.decode(ids[0, prompt_len:].tolist()))
            held = (response, history + [(query, response)])
        if not yielded:
            yield held if held is not None else ("", history + [(query, "")])

    @torch.inference_mode()
    def stream_generate(self, input_ids, attention_mask=None, position_ids=None, max_length: int = 2048,
                        max_new_tokens: Optional[int] = None, do_sample: bool = True, top_p: float = 0.7,
                        temperature: float = 0.95, top_k: int = 50, logits_processor=None, eos_token_id=None,
                        **kwargs) -> Iterator[torch.Tensor]:
        """Yield the growing ``input_ids`` after every new token (our own loop: no private HF helpers)."""
        if kwargs:
            raise TypeError(f"stream_generate() got unsupported arguments {sorted(kwargs)}")
        cfg = self.config
        check_prompt_length(input_ids.shape[1], cfg)
        fast = _fast_stream_generate(self, input_ids, attention_mask, position_ids, max_length, max_new_tokens,
                                     do_sample, top_p, temperature, top_k, logits_processor, eos_token_id)
        if fast is not None:  # CUDA graph decode loop
            yield from fast
            return
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        limit = input_ids.shape[1] + max_new_tokens if max_new_tokens is not None else max_length
        processors = LogitsProcessorList(logits_processor or [])
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k=top_k))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=top_p))
        if position_ids is None:
            position_ids = build_position_ids(input_ids, cfg.bos_token_id, cfg.mask_token_id, cfg.gmask_token_id)
        if attention_mask is None:
            attention_mask = build_attention_mask(input_ids, cfg.bos_token_id)
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        cache, step_ids, step_pos, step_mask = None, input_ids, position_ids, attention_mask
        while input_ids.shape[1] < limit:
            out = self(input_ids=step_ids, position_ids=step_pos, attention_mask=step_mask, past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
            cache = _cache_of(out)
            scores = processors(input_ids, out.logits[:, -1].float())
            if do_sample:
                scores = warpers(input_ids, scores)
                nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                nxt = scores.argmax(dim=-1)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, cfg.pad_token_id))
            input_ids = torch.cat((input_ids, nxt[:, None]), dim=-1)
            unfinished &= ~torch.isin(nxt, eos)
            yield input_ids
            if not bool(unfinished.any()):
                break
            step_ids = nxt[:, None]
            step_pos = step_pos[..., -1:].clone()
            step_pos[:, 1] += 1
            step_mask = F.pad(step_mask[:, :, -1:], (0, 1), value=False)

    # --- quantization and loading ---------------------------------------------------------------
    def quantize(self, bits: int, empty_init: bool = False, **kwargs):
        """Quantize the 28 blocks' linears in place (layer by layer) and record it in the config."""
        if bits == 0:
            return self
        quantize_model(self.transformer.layers, bits)
        self.config.quantization_bit = bits
        return self

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        from .loading import load_pretrained
        if model_args:
            raise TypeError("ChatGLM from_pretrained takes no extra positional arguments")
        return load_pretrained(cls, pretrained_model_name_or_path, **kwargs)


__all__ += ["ChatGLMConfig", "InvalidScoreLogitsProcessor", "ChatGLMOutput"]
