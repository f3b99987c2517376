"""Training ChatGLM-6B (issue 3): loss and gradients, gradient checkpointing, P-tuning v2, LoRA.

Oracles: the golden losses of the original code, the cross-entropy definition, a central finite
difference for one gradient, and equivalences (checkpointing changes memory, not gradients).
"""
import functools
import inspect
import json

import pytest
import torch
import torch.utils.checkpoint

from conftest import CONFORMANCE, model_folder

ATOL = 1e-4


def _load(tmp_path_factory, tag, **kwargs):
    from transformers import AutoModel

    extra = None
    if tag.startswith("ptuning"):
        cfg = json.loads((CONFORMANCE / f"ptuning_proj{tag[-1]}" / "config.json").read_text())
        extra = {"pre_seq_len": cfg["pre_seq_len"], "prefix_projection": cfg["prefix_projection"]}
    folder = model_folder(tmp_path_factory.mktemp(tag), "int8" if extra else tag, extra)
    if not extra:
        return AutoModel.from_pretrained(str(folder), trust_remote_code=True, **kwargs)
    with pytest.warns(UserWarning, match="prefix encoder"):
        model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, **kwargs)
    state = torch.load(CONFORMANCE / f"ptuning_proj{tag[-1]}" / "prefix_encoder.bin", weights_only=True)
    prefix = "transformer.prefix_encoder."
    model.transformer.prefix_encoder.load_state_dict({k[len(prefix):]: v for k, v in state.items()})
    return model


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory):
    return _load(tmp_path_factory, "fp16")


def _seq(g, tag, i):
    return g[f"{tag}.prompt{i}.greedy"][None]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _backward(model, seq, seed=0, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # P-tuning's prefix dropout draws random numbers in train mode
    loss = model(input_ids=seq, labels=seq, **kwargs).loss
    loss.backward()
    return loss.detach(), _grads(model)


# ---------------------------------------------------------------------------------------------
# loss and gradients

def test_labels_give_the_golden_loss_and_grads_reach_every_float_param(fp16_model, golden):
    _, g = golden
    model = fp16_model.train()
    loss, grads = _backward(model, _seq(g, "fp16", 1))
    assert loss.dtype == torch.float32
    assert abs(loss.item() - g["fp16.prompt1.loss"].item()) < ATOL
    names = [n for n, p in model.named_parameters()]
    assert sorted(grads) == sorted(names)  # FP16 model: every parameter is a float one and trains
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    model.eval()


def test_ignore_index_minus_100_follows_cross_entropy(fp16_model, golden):
    _, g = golden
    seq = _seq(g, "fp16", 4)
    labels = seq.clone()
    prompt_len = g["fp16.prompt4.argmax"].shape[1]
    labels[:, :prompt_len] = -100  # train on the answer only
    with torch.no_grad():
        out = fp16_model(input_ids=seq, labels=labels)
    logits = out.logits.float()[0, :-1]
    target = labels[0, 1:]
    keep = target != -100
    expected = -torch.log_softmax(logits[keep], dim=-1).gather(-1, target[keep, None]).mean()
    assert abs(out.loss.item() - expected.item()) < 1e-5


def test_gradient_matches_a_finite_difference(tmp_path_factory, golden):
    """d loss / d (final LayerNorm bias) along a random direction, fp32 weights, central difference."""
    _, g = golden
    model = _load(tmp_path_factory, "fp16", torch_dtype=torch.float32)
    seq = _seq(g, "fp16", 2)
    _, grads = _backward(model, seq)
    bias = model.transformer.final_layernorm.bias
    direction = torch.randn(bias.shape, generator=torch.Generator().manual_seed(3))
    direction /= direction.norm()
    analytic = (grads["transformer.final_layernorm.bias"] * direction).sum().item()
    eps, losses = 1e-2, []
    with torch.no_grad():
        original = bias.detach().clone()
        for sign in (1, -1):
            bias.copy_(original + sign * eps * direction)
            losses.append(model(input_ids=seq, labels=seq).loss.item())
        bias.copy_(original)
    numeric = (losses[0] - losses[1]) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert abs(numeric - analytic) < 0.02 * abs(analytic) + 1e-4


def test_int8_model_trains_only_its_float_params(tmp_path_factory, golden):
    _, g = golden
    model = _load(tmp_path_factory, "int8").train()
    loss, grads = _backward(model, _seq(g, "int8", 0))
    assert abs(loss.item() - g["int8.prompt0.loss"].item()) < ATOL
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(trainable)
    assert "transformer.word_embeddings.weight" in trainable and "transformer.layers.5.input_layernorm.weight" in trainable
    for n, p in model.named_parameters():
        if p.dtype == torch.int8:
            assert not p.requires_grad and p.grad is None, n
    assert all(torch.isfinite(x).all() and x.abs().sum() > 0 for x in grads.values())


# ---------------------------------------------------------------------------------------------
# gradient checkpointing

class _CountAttentionCalls:
    """Counts the blocks' attention forwards (module hooks do not fire in checkpoint recomputation)."""

    def __init__(self, model):
        self.modules, self.calls = [b.attention for b in model.transformer.layers], 0

    def __enter__(self):
        for m in self.modules:
            m.forward = self._counted(type(m).forward.__get__(m))
        return self

    def _counted(self, forward):
        def run(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)
        return run

    def __exit__(self, *exc):
        for m in self.modules:
            del m.forward


def _takes_checkpoint_kwargs(model) -> bool:
    """gradient_checkpointing_enable(gradient_checkpointing_kwargs=...) exists (transformers >= 4.35)."""
    return "gradient_checkpointing_kwargs" in inspect.signature(model.gradient_checkpointing_enable).parameters


def _checkpointing_on(model, reentrant=None, every_n_layers=1):
    """Switch checkpointing on through the running transformers' public API: activation_checkpointing_enable
    (5.25+; the gradient_checkpointing_* names are deprecated there), gradient_checkpointing_enable with
    kwargs (4.35+). 4.27-4.34 have no kwargs: the checkpoint function / layer stride that newer versions
    hand the model are set on it directly, so the model's side is exercised on every version."""
    kwargs = {} if reentrant is None else {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None,
                                              every_n_layers=every_n_layers)
        return
    if _takes_checkpoint_kwargs(model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable()
        if kwargs:
            model.transformer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint,
                                                                               **kwargs)
    if every_n_layers != 1:
        model.transformer.checkpoint_every_n_layers = every_n_layers


def _checkpointing_off(model):
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
        model.transformer.checkpoint_every_n_layers = 1
        if not _takes_checkpoint_kwargs(model):
            model.transformer.__dict__.pop("_gradient_checkpointing_func", None)
    assert not model.transformer.gradient_checkpointing and model.transformer.checkpoint_every_n_layers == 1


def _is_checkpointing(model) -> bool:
    # transformers 5.x renamed the property and deprecated the old name; read the old one only where
    # the new one does not exist, so a False answer does not fall through to a deprecated getter
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


@pytest.mark.parametrize("use_cache, reentrant, every, frozen", [
    (None, None, 1, False), (False, None, 1, False), (None, True, 1, False), (None, None, 2, False),
    (False, True, 3, False), (False, True, 1, True), (False, False, 1, True)])
def test_gradient_checkpointing_gives_the_same_gradients(fp16_model, golden, use_cache, reentrant, every, frozen):
    """Checkpointing changes memory, not gradients: bit-equal loss and gradients, with the checkpoint
    function transformers hands the model (reentrant or not), with every N-th block checkpointed, and with
    frozen embeddings (as under LoRA: no block input requires grad, which reentrant checkpointing needs)."""
    _, g = golden
    model = fp16_model.train()
    seq = _seq(g, "fp16", 3)
    emb = model.transformer.word_embeddings.weight
    emb.requires_grad_(not frozen)
    loss_plain, plain = _backward(model, seq, use_cache=use_cache)
    assert ("transformer.word_embeddings.weight" in plain) != frozen and len(plain) > 100
    _checkpointing_on(model, reentrant, every)
    try:
        assert _is_checkpointing(model)
        with _CountAttentionCalls(model) as counter:
            loss_ckpt, ckpt = _backward(model, seq, use_cache=use_cache)
        layers = len(model.transformer.layers)
        # every block ran once forward; the checkpointed ones (0, N, 2N, ...) again in backward
        assert counter.calls == layers + len(range(0, layers, every))
    finally:
        _checkpointing_off(model)
        model.zero_grad(set_to_none=True)
        model.eval()
        emb.requires_grad_(True)
    assert torch.equal(loss_plain, loss_ckpt)
    assert sorted(plain) == sorted(ckpt)
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name


def test_checkpointing_uses_the_function_transformers_hands_over(fp16_model, golden):
    """The user's checkpoint kwargs reach torch (here: a spy standing in for the function
    gradient_checkpointing_enable(gradient_checkpointing_kwargs=...) installs), once per block."""
    _, g = golden
    model = fp16_model.train()
    calls = []

    def spy(function, *args):
        calls.append(len(args))
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    model.transformer.gradient_checkpointing = True
    model.transformer._gradient_checkpointing_func = spy
    try:
        _backward(model, _seq(g, "fp16", 0), use_cache=False)
    finally:
        model.transformer.gradient_checkpointing = False
        del model.transformer._gradient_checkpointing_func
        model.zero_grad(set_to_none=True)
        model.eval()
    assert calls == [4] * len(model.transformer.layers)  # hidden, cos, sin, mask (no cache, no prefix)


# ---------------------------------------------------------------------------------------------
# P-tuning v2

@pytest.mark.parametrize("tag", ["ptuning0", "ptuning1"])
def test_ptuning_trains_only_the_prefix_encoder(tmp_path_factory, golden, tag):
    _, g = golden
    model = _load(tmp_path_factory, tag)
    seq = _seq(g, tag, 1)
    with torch.no_grad():
        assert abs(model.eval()(input_ids=seq, labels=seq).loss.item() - g[f"{tag}.prompt1.loss"].item()) < ATOL
    prefix = "transformer.prefix_encoder."
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(prefix) for n in trainable)
    model.train()
    _, grads = _backward(model, seq, seed=5)
    assert sorted(grads) == sorted(trainable)
    assert all(torch.isfinite(x).all() and x.abs().sum() > 0 for x in grads.values())
    # with gradient checkpointing (same dropout draws): the same gradients. Not bit for bit on
    # transformers 5.x: its gradient_checkpointing_enable() also makes the embedding output require
    # grad, so the first block's INT8 matmuls take the autograd torch path instead of the CPU kernel;
    # the two agree to fp32 rounding (grads are ~1e-2, stored in fp16 with spacing ~1e-5 there).
    # Reentrant checkpointing tracks only the tensors passed to it: the prefix's keys/values must be
    # among them (not captured by the block's closure), or the prefix encoder would get no gradient.
    for reentrant in (None, True):
        _checkpointing_on(model, reentrant)
        try:
            _, ckpt = _backward(model, seq, seed=5)
        finally:
            _checkpointing_off(model)
        assert sorted(ckpt) == sorted(grads), reentrant
        for name in grads:
            torch.testing.assert_close(ckpt[name], grads[name], atol=5e-5, rtol=1e-3, msg=f"{name} {reentrant}")


# ---------------------------------------------------------------------------------------------
# LoRA (peft)

def test_peft_lora_on_query_key_value_trains(tmp_path_factory, golden):
    from peft import LoraConfig, get_peft_model

    _, g = golden
    base = _load(tmp_path_factory, "fp16")
    qkv_before = base.transformer.layers[0].attention.query_key_value.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"],
                                            lora_dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "query_key_value" in n for n in trainable)
    assert len(trainable) == 2 * 28  # lora_A and lora_B of every block
    model.train()
    seq = _seq(g, "fp16", 1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(5):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=seq, labels=seq).loss
        loss.backward()
        if step == 0:
            # LoRA starts as the identity (B = 0): the loss is the FP16 golden one
            assert abs(loss.item() - g["fp16.prompt1.loss"].item()) < ATOL
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad == trainable
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
    assert torch.equal(base.transformer.layers[0].attention.query_key_value.base_layer.weight, qkv_before)
