"""Every GPU kernel compiles to machine code for each GPU generation we claim, on this CPU-only
machine: the Triton kernels (stub driver, below) and the opt-in CUDA C GEMV (NVRTC, at the end).

CI has no GPU, and the device machine is an H100 only: without this, a kernel that does not build
for an A100 / RTX 30xx / RTX 40xx / T4 (or a Python-side argument error that only shows at launch)
would go unnoticed. Triton compiles for a target given by its driver; here a stub driver names the
target (sm_70, sm_75, sm_80, sm_86, sm_89, sm_90, sm_100, sm_120) and its shared-memory size, Triton runs its whole
pipeline down to ptxas (cubin), checks the kernel's shared memory against that GPU's limit, and the
stub's launcher does nothing. The launchers are the package's own (``cuda_kernels._run_*``,
``fast_decode.layer_norm`` …) with the configurations the package picks for that capability
(``cuda_kernels._plan``), on the full-size ChatGLM-6B shapes, so the test covers what a user's GPU
would compile. It does not run a kernel: the values are checked on the device (``pytest -m cuda``).
"""
from __future__ import annotations

import importlib
import re
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chatglm6b import cuda_kernels as ck
from chatglm6b import fast_decode as fd

# (compute capability, max dynamic shared memory per block in bytes, a GPU of that kind)
TARGETS = [((7, 0), 98304, "V100"), ((7, 5), 65536, "T4"), ((8, 0), 166912, "A100"), ((8, 6), 101376, "RTX 3090 / A10"),
           ((8, 9), 101376, "L4 / RTX 4090"), ((9, 0), 232448, "H100 / H200"), ((10, 0), 232448, "B200"),
           ((12, 0), 101376, "RTX 5090")]
HIDDEN, HEADS, HEAD_DIM, INNER, VOCAB = 4096, 32, 128, 16384, 130528
SHAPES = {"qkv": (3 * HIDDEN, HIDDEN), "dense": (HIDDEN, HIDDEN), "h_to_4h": (INNER, HIDDEN), "4h_to_h": (HIDDEN, INNER)}


def _triton():
    try:
        return importlib.import_module("triton")
    except ImportError:
        pytest.fail("these tests compile the GPU kernels with Triton: pip install triton (.ci/run installs it)")


class _NoLaunch:
    """What Triton's launcher would be: the kernel is built and checked, then not run."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        pass


class _StubDriver:
    """A Triton driver for a GPU that is not there: device i is the capability i // 10, i % 10."""

    def __init__(self, GPUTarget):
        self.GPUTarget = GPUTarget
        self.device = 90
        self.shared = {}
        self.loaded = []
        self.utils = SimpleNamespace(get_device_properties=self._props, load_binary=self._load)
        self.launcher_cls = _NoLaunch

    def _props(self, device):
        return {"max_shared_mem": self.shared[device], "multiprocessor_count": 108, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}

    def _load(self, name, kernel, shared, device):
        assert kernel[:4] == b"\x7fELF", f"{name}: no cubin"  # ptxas produced an ELF image
        self.loaded.append((device, name, shared))
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.GPUTarget("cuda", self.device, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@pytest.fixture(scope="module")
def stub():
    _triton()
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    drv = _StubDriver(GPUTarget)
    old, old_driver = ck._capability, driver._active  # (no default driver to reset to without a GPU)
    driver.set_active(drv)
    try:
        yield drv
    finally:
        driver._active = old_driver
        ck._capability = old


def _use(stub, cap):
    shared = {c: s for c, s, _ in TARGETS}[cap]
    stub.device = cap[0] * 10 + cap[1]
    stub.shared[stub.device] = shared
    ck._capability = lambda device=None: cap
    return cap


@pytest.fixture(params=TARGETS, ids=[f"sm_{c[0]}{c[1]}" for c, _, _ in TARGETS])
def target(request, stub):
    return _use(stub, request.param[0])


# bf16 on sm_86 / sm_89 builds as on sm_80 (those differ in shared memory, which fp16 covers); so
# does sm_120's as sm_100's; sm_70 has no bf16 hardware and no reason to run it
LINEAR_CASES = [(c, bits, dt) for c, _, _ in TARGETS for bits in (8, 4) for dt in (torch.float16, torch.bfloat16)
                if dt == torch.float16 or c not in ((7, 0), (8, 6), (8, 9), (12, 0))]


def _loaded_since(stub, n0):
    return [name for dev, name, _ in stub.loaded[n0:] if dev == stub.device]


@contextmanager
def _fresh_device(stub, index, cap, shared):
    """A stub device index no other test uses (Triton's in-memory caches are per device, so its launches
    compile again) that builds for capability `cap` with `shared` bytes of shared memory."""
    from triton.backends.compiler import GPUTarget

    old_target = stub.GPUTarget
    stub.GPUTarget = lambda backend, arch, warp: GPUTarget(backend, cap[0] * 10 + cap[1], warp)
    stub.device = index
    stub.shared[index] = shared
    ck._capability = lambda device=None: cap
    try:
        yield
    finally:
        stub.GPUTarget = old_target


def _builds_on(index):
    """The kernels of cuda_kernels and fast_decode compiled for stub device `index`."""
    kernels = [k for k in list(vars(ck._build()).values()) + list(fd._build().values())
               if hasattr(k, "device_caches")]  # (the namespace holds triton too)
    return [c for k in kernels if index in k.device_caches for c in k.device_caches[index][0].values()]


def _weights(bits, N, K, dtype):
    q = torch.randint(-128, 128, (N, K * bits // 8), dtype=torch.int8)
    return q, torch.rand(N, dtype=torch.float16) + 0.5, torch.randn(N, dtype=dtype)


@pytest.mark.parametrize("cap,bits,dtype", LINEAR_CASES,
                         ids=[f"sm_{c[0]}{c[1]}-int{b}-{str(d)[6:]}" for c, b, d in LINEAR_CASES])
def test_linear_kernels_compile(stub, cap, bits, dtype):
    """Each path cuda_kernels.linear can take on this GPU (batch-1 GEMV, 2..16-row decode kernels
    with and without K split, 17..64-row tiles, the 65..256-row tiles, dequantize + cuBLAS), for each layer
    shape, with and without the fused GELU, and with programmatic dependent launch on sm_90."""
    target = _use(stub, cap)
    n0 = len(stub.loaded)
    pdl_levels = (0, 1, 2, 3, 4) if target >= (9, 0) else (0,)  # (3 / 4: the GEMV's late trigger)
    seen = set()
    for name, (N, K) in SHAPES.items():
        q, scale, bias = _weights(bits, N, K, dtype)
        for M in (1, 16, 24, 64, 128, 256):
            x = torch.randn(M, K, dtype=dtype)
            aligned = ck._words(q, bits, K) is not None
            assert aligned
            path, run, cfg = ck._plan(M, N, K, bits, dtype, aligned, target)
            for act in (0, 1):
                # (3 / 4, the late trigger, differ only for the GEMV; one build per shape covers it)
                for pdl in (pdl_levels if M == 1 and act == 0 else pdl_levels[:3]):
                    y = run(x, q, scale, bias, bits, cfg, act=act, pdl=pdl)
                    assert y.shape == (M, N) and y.dtype == dtype
                    seen.add(path)
        # a prompt: dequantize the weight, then torch's matmul
        w = ck._dequantize(q, scale, bits, dtype)
        assert w.shape == (N, K)
    # a prompt's layer: its four weights dequantized by one launch (fewer weights: empty slots)
    layer = [_weights(bits, N, K, dtype)[:2] for N, K in SHAPES.values()]
    for count in (4, 1):
        outs = ck._run_dequant_group(layer[:count], bits, dtype)
        assert [tuple(o.shape) for o in outs] == list(SHAPES.values())[:count]
    # fp16 INT4 takes the bit-trick kernel for 2..64 rows; the others reach _qmm_kernel somewhere
    assert seen >= {"gemv", "qmm_asm" if bits == 4 and dtype == torch.float16 else "qmm"}, seen
    names = set(_loaded_since(stub, n0))
    kernels = {f"_{path}_kernel" for path in seen - {"dequant_mm"}}  # (dequant_mm: _dequant_kernel + cuBLAS)
    assert kernels | {"_dequant_kernel", "_dequant4_kernel"} <= names, names


def test_prefill_and_decode_kernels_compile(stub, target):
    """fast_decode's kernels: LayerNorm (residual, embedding gather), GELU, prefill rotary into the
    KV cache, decode attention (one split, splits merged in-kernel and by the combine kernel), the
    greedy pick, the fused sampler and the bookkeeping step; fp16 and bf16; PDL on sm_90."""
    pdl = 2 if target >= (9, 0) else 0
    for dtype in (torch.float16, torch.bfloat16):
        for rows in (1, 16, 1024):
            a = torch.randn(rows, HIDDEN, dtype=dtype)
            w, b = torch.randn(HIDDEN, dtype=dtype), torch.randn(HIDDEN, dtype=dtype)
            assert fd.layer_norm(a, w, b, 1e-5).shape == a.shape
            assert fd.layer_norm(a, w, b, 1e-5, residual=a, alpha=7.48, pdl=pdl if rows <= 16 else 0).shape == a.shape
        # a split-K GEMV's partials reduced by the LayerNorm (with and without the linear's bias, with norms)
        for splits, lin_bias in ((2, b), (4, None)):
            ws = torch.randn(splits, HIDDEN)
            assert fd.layer_norm(a[:1], w, b, 1e-5, alpha=7.48, pdl=pdl, norms=torch.zeros(1, 2),
                                 partials=(ws, torch.rand(HIDDEN, dtype=dtype), lin_bias)).shape == (1, HIDDEN)
        table = torch.randn(1000, HIDDEN, dtype=torch.float16)
        ids = torch.randint(0, 1000, (2,))
        assert fd.layer_norm(table, w, b, 1e-5, ids=ids, dtype=dtype, pdl=pdl).dtype == dtype
        ck.gelu_(torch.randn(4, INNER, dtype=dtype), pdl=pdl)
        # prefill: rotary of q/k, k/v written into the cache's first slots
        bsz, s = 2, 64
        qkv = torch.randn(bsz * s, 3 * HIDDEN, dtype=dtype)
        cos_t = torch.randn(2048, HEAD_DIM // 2, dtype=torch.float32)
        pos = torch.randint(0, 64, (bsz, 2, s))
        cache = torch.zeros(bsz, HEADS, 256, HEAD_DIM, dtype=dtype)
        q_out, k_out, _ = fd.prefill_rotary(qkv, cos_t, cos_t.clone(), pos, bsz, s, HEADS, HEAD_DIM, 11.3,
                                            k_out=cache[:, :, :s], v_out=cache.clone()[:, :, :s])
        assert q_out.shape == (bsz, HEADS, s, HEAD_DIM)
        # decode attention at batch 1 and 16, splits merged in the kernel and by the combine kernel
        for batch, inline, pre, chunk in ((1, True, False, 0), (1, True, True, 256), (16, False, False, 0),
                                          (16, True, False, 0)):
            cfg = dict(fd._attn_cfg(batch), INLINE=inline, PRE=pre, CHUNK=chunk)
            length = 2048
            kc = torch.zeros(batch, HEADS, length, HEAD_DIM, dtype=dtype)
            cs = torch.randn(batch, 2, HEAD_DIM, dtype=torch.float32)
            cur = torch.tensor([1500], dtype=torch.int32)
            pad = torch.zeros(batch, dtype=torch.int32)
            out = torch.empty(batch, HIDDEN, dtype=dtype)
            qkv1 = torch.randn(batch, 3 * HIDDEN, dtype=dtype)
            for splits in (1, 4):  # (the combine kernel runs for splits > 1 without the in-kernel merge)
                scratch = fd.attention_scratch(batch, HEADS, HEAD_DIM, splits, "cpu")
                fd.decode_attention(qkv1, kc, kc.clone(), cs, cur, pad, out, 11.3, 1.0, splits, scratch, cfg=cfg,
                                    pdl=pdl if batch <= 2 else 0)
    # greedy pick and bookkeeping (one slot of 2 rows)
    logits = torch.randn(2, VOCAB, dtype=torch.float16)
    slot = SimpleNamespace(pick_key=torch.zeros(2, dtype=torch.long), pick_flag=torch.zeros(1, dtype=torch.int32),
                           unfinished=torch.ones(2, dtype=torch.bool), eos=torch.full((fd.MAX_EOS,), -1),
                           pad_id=torch.zeros(1, dtype=torch.long), ids=torch.zeros(2, 65, dtype=torch.long),
                           tok=torch.zeros(2, dtype=torch.long), pos=torch.zeros(2, 2, dtype=torch.long),
                           cache=SimpleNamespace(pos=torch.zeros(1, dtype=torch.int32)),
                           alive=torch.ones(1, dtype=torch.bool), gen_len=torch.zeros(1, dtype=torch.long), batch=2)
    for processors in ([], [object()]):
        mode = fd._choose(logits, slot, ("greedy",), processors)
        fd._bookkeep(slot, mode)
    fd._bookkeep(slot, torch.zeros(2, dtype=torch.long))  # sampled tokens
    # the fused sampler (three passes and the pick; with and without temperature / top-p / the processor)
    for dtype in (torch.float16, torch.bfloat16):
        for processors, key in ((False, ("sample", True, 50, True, True)), (True, ("sample", False, 7, False, True))):
            fd.sample_tokens(torch.randn(2, VOCAB, dtype=dtype), key, processors, torch.ones(1), torch.zeros(1),
                             slot.pick_flag)
    fd._bookkeep(slot, (torch.zeros(2, dtype=torch.long), True))  # (with the processor: token 5 on the flag)
    # the screened LM head of batch-1 greedy steps (INT8 screen on the batch-1 GEMV's main loop, candidates,
    # the whole head when undecided, the final LayerNorm's norms) and the bookkeeping that resets it
    for dtype in (torch.float16, torch.bfloat16):
        w, head = _screen_head(dtype)
        x = torch.randn(1, HIDDEN, dtype=dtype)
        norms = torch.zeros(1, 2)
        ln_w = torch.ones(HIDDEN, dtype=dtype)
        x = fd.layer_norm(x, ln_w, ln_w, 1e-5, residual=x, alpha=7.48, pdl=pdl, norms=norms)
        scr = torch.tensor([-(1 << 31), 0], dtype=torch.int32)
        hi = torch.empty(w.shape[0])
        for check in (False, True):
            head.pick(x, w, slot.pick_key[:1], slot.pick_flag, scr, hi, norms, check=check,
                      pdl_screen=min(pdl, 1), pdl=pdl)
        for work in (None, torch.zeros(1, fd._SAMPLE_WORK, dtype=torch.int32)[:, fd._SAMPLE_SCREEN:]):  # (sampling from the top k;
            # work: the threshold from radix counts of the lower bounds)
            head.pick(x, w, None, None, scr, hi, norms, pdl_screen=min(pdl, 1), pdl=pdl, top_k=50, lo=hi.clone(),
                      y=torch.empty(1, w.shape[0], dtype=dtype), work=work)
        fd.head_logits(x, w)
    one = SimpleNamespace(**{**vars(slot), "batch": 1, "pick_key": slot.pick_key[:1], "unfinished": slot.unfinished[:1],
                             "ids": slot.ids[:1], "tok": slot.tok[:1], "pos": slot.pos[:1],
                             "scr": torch.zeros(2, dtype=torch.int32)})
    fd._bookkeep(one, 2, screen=True)
    # (built by this test, or already by an earlier one for this target: Triton keeps one build per device
    # and specialization, e.g. the GELU kernel that a linear's prompt path runs after cuBLAS)
    names = set(_loaded_since(stub, 0))
    want = {"_ln_kernel", "_gelu_kernel", "_prefill_rotary_kernel", "_decode_attn_kernel", "_attn_combine_kernel",
            "_pick_kernel", "_bookkeep_kernel", "_screen_kernel", "_cand_kernel", "_head_kernel",
            "_sample_pass_kernel", "_sample_pick_kernel"}
    assert want <= names, want - names


_SCREEN_HEADS = {}


def _screen_head(dtype):
    """(head weight, its fast_decode.ScreenHead): a 4096-row slice of the vocabulary (the kernels' specialisation
    is that of the full 130528 rows: both multiples of 16), built once per dtype."""
    if dtype not in _SCREEN_HEADS:
        w = (torch.randn(4096, HIDDEN) * 0.02).to(dtype)
        _SCREEN_HEADS[dtype] = (w, fd.ScreenHead(w))
    return _SCREEN_HEADS[dtype]


def test_volta_linears_are_opt_in(monkeypatch):
    """On sm_70 the quantized linears use the Triton kernels only with CHATGLM_TRITON_SM70=1 (they build
    there, test above; values unchecked on a V100); sm_75+ always, older GPUs never."""
    for cap, default, opted in (((6, 1), False, False), ((7, 0), False, True), ((7, 5), True, True),
                                ((9, 0), True, True)):
        monkeypatch.setattr(ck, "_capability", lambda device=None, cap=cap: cap)
        for flag, want in ((False, default), (True, opted)):
            monkeypatch.setattr(ck, "SM70", flag)
            assert ck._device_ok(torch.device("cuda", 0)) is want, (cap, flag)


def test_compile_ahead_builds_what_the_launches_use(stub):
    """cuda_kernels.compile_ahead (opt-in, CHATGLM_COMPILE_AHEAD): inside it, launches only compile, on
    a thread pool, once per specialisation (a step launches each kernel once per layer); afterwards
    the same launches find every build in Triton's in-memory cache: nothing more is compiled."""
    N, K = SHAPES["dense"]
    weights = {bits: _weights(bits, N, K, torch.float16) for bits in (8, 4)}
    x1, x16 = torch.randn(1, K, dtype=torch.float16), torch.randn(16, K, dtype=torch.float16)
    w, b = torch.randn(HIDDEN, dtype=torch.float16), torch.randn(HIDDEN, dtype=torch.float16)

    def step():  # a decode step's worth of launches: the same kernels, layer after layer
        for _layer in range(3):
            fd.layer_norm(x1, w, b, 1e-5, residual=x1, alpha=3.0, pdl=2)
            for bits, (q, scale, bias) in weights.items():
                for x in (x1, x16):
                    path, run, cfg = ck._plan(x.shape[0], N, K, bits, torch.float16, True, (9, 0))
                    run(x, q, scale, bias, bits, cfg, act=1)

    with _fresh_device(stub, 3090, (9, 0), 232448):
        with ck.compile_ahead(torch.device("cpu"), workers=2) as done:
            step()
        distinct = len(_builds_on(3090))
        assert len(done) == distinct >= 5  # LayerNorm, GEMV x2, the 16-row kernels x2 (+ split-K reduce)
        step()
        assert len(_builds_on(3090)) == distinct  # the real launches compiled nothing new


@pytest.mark.parametrize("value,want,warns", [("6", 6, False), ("", 0, False), ("yes", 0, True)])
def test_compile_ahead_switch(value, want, warns):
    """CHATGLM_COMPILE_AHEAD: a thread count; anything else warns and leaves it off (import still works)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    code = ("import sys, types, warnings; warnings.simplefilter('always'); pkg = types.ModuleType('chatglm6b'); "
            "pkg.__path__ = [sys.argv[1]]; sys.modules['chatglm6b'] = pkg; "
            "from chatglm6b import cuda_kernels; print(cuda_kernels.COMPILE_AHEAD)")
    res = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, CHATGLM_COMPILE_AHEAD=value))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(want)
    assert ("is not a number of threads" in res.stderr) is warns, res.stderr[-2000:]


def test_pdl_instructions_only_where_asked(stub):
    """On sm_90 a kernel launched with PDL carries the grid-dependency instructions (it waits for
    the previous kernel and lets the next one start); without PDL, and on other GPUs, it has none."""
    found = {}
    for cap in ((9, 0), (8, 0)):
        _use(stub, cap)
        x = torch.randn(1, HIDDEN, dtype=torch.float16)
        w, b = torch.randn(HIDDEN, dtype=torch.float16), torch.randn(HIDDEN, dtype=torch.float16)
        for pdl in ((0, 2) if cap >= (9, 0) else (0,)):
            fd.layer_norm(x, w, b, 1e-5, residual=x, alpha=3.0, pdl=pdl)
    kern = fd._build()["ln_kernel"]
    for dev, cache in kern.device_caches.items():
        for compiled in cache[0].values():
            ptx = compiled.asm["ptx"]
            pdl = bool(compiled.src.constants.get((kern.arg_names.index("PDL"),), False))  # the constexpr
            found.setdefault(dev, []).append(("griddepcontrol" in ptx, pdl))
    assert (True, True) in found[90] and (False, False) in found[90], found[90]
    assert all(not has for has, _ in found[80]), found[80]


def test_late_trigger_comes_after_the_main_loop(stub):
    """PDL levels 3 / 4 launch like 1 / 2; the batch-1 GEMV built for them lets the next kernel launch
    after its main loop (its launch_dependents follows its wait, outside the loop) or, with LATE_STEPS,
    inside the loop; built for the others it does so at its start (before the wait)."""
    assert ck.launch_options(3) == ck.launch_options(1) == dict(PDL=True)
    assert ck.launch_options(4) == ck.launch_options(2) == dict(PDL=True, launch_pdl=True)
    assert [ck.late_trigger(p) for p in (0, 1, 2, 3, 4, True)] == [False, False, False, True, True, False]
    _use(stub, (9, 0))
    N, K = SHAPES["dense"]
    order = {}
    for bits in (8, 4):
        q, scale, bias = _weights(bits, N, K, torch.float16)
        x = torch.randn(1, K, dtype=torch.float16)
        path, run, cfg = ck._plan(1, N, K, bits, torch.float16, True, (9, 0))
        assert path == "gemv"
        for pdl in (2, 4):
            run(x, q, scale, bias, bits, cfg, pdl=pdl)
        ck.LATE_STEPS = 2  # (the trigger inside the loop: at the start of its second-to-last step)
        try:
            run(x, q, scale, bias, bits, cfg, pdl=4)
        finally:
            ck.LATE_STEPS = 0
    kern = ck._build().gemv_kernel
    for compiled in kern.device_caches[stub.device][0].values():
        consts = compiled.src.constants
        if not consts.get((kern.arg_names.index("PDL"),), False):
            continue
        ptx = compiled.asm["ptx"]
        late = int(consts.get((kern.arg_names.index("LATE"),), 0))
        bits = consts[(kern.arg_names.index("BITS"),)]
        assert ptx.count("griddepcontrol.launch_dependents") == 1
        lines = ptx.splitlines()
        at = next(i for i, ln in enumerate(lines) if "griddepcontrol.launch_dependents" in ln)
        block = next((lines[i] for i in range(at, -1, -1) if lines[i].startswith("$L__BB")), "")
        order[(bits, late)] = (ptx.index("griddepcontrol.launch_dependents") > ptx.index("griddepcontrol.wait"),
                               "Loop" in block)  # (the PTX marks a loop's blocks "in Loop" / "Loop Header")
    # at the start (before the wait); after the loop; inside the loop
    assert order == {(8, 0): (False, False), (8, 1): (True, False), (8, 3): (True, True),
                     (4, 0): (False, False), (4, 1): (True, False), (4, 3): (True, True)}, order


def test_decode_step_launch_levels():
    """The PDL level of each linear in a decode step (fast_decode._pdl_levels): 0 off; 1 launched
    normally; 2 launched early; + 2 for the batch-1 GEMV's late trigger. INT4 batch 1 takes the "b1"
    entries (qkv / h_to_4h / 4h_to_h early, the MLP's two late), batch 2 the "small" class's (h_to_4h
    early only), INT8 everything early, batch 16 nothing early; PDL off (or not supported) gives 0."""
    def levels(kind, batch, pdl=True):
        return fd._pdl_levels(SimpleNamespace(pdl=pdl, weight_kind=kind), SimpleNamespace(batch=batch))

    assert levels(4, 1) == ({"qkv": 2, "dense": 1, "h_to_4h": 4, "4h_to_h": 4}, 2)
    assert levels(4, 2) == ({"qkv": 1, "dense": 1, "h_to_4h": 2, "4h_to_h": 1}, 2)
    assert levels(8, 1) == ({"qkv": 2, "dense": 2, "h_to_4h": 2, "4h_to_h": 2}, 2)
    assert levels(4, 16) == ({"qkv": 1, "dense": 1, "h_to_4h": 1, "4h_to_h": 1}, 2)
    assert levels(16, 1) == ({"qkv": 0, "dense": 0, "h_to_4h": 0, "4h_to_h": 0}, 0)
    assert levels(4, 1, pdl=False) == ({"qkv": 0, "dense": 0, "h_to_4h": 0, "4h_to_h": 0}, 0)
    assert [ck.launch_options(v) for v in (2, 1, 4)] == [dict(PDL=True, launch_pdl=True), dict(PDL=True),
                                                          dict(PDL=True, launch_pdl=True)]


def test_launches_fix_the_compile_options(stub):
    """Every launch passes cuda_kernels.COMPILE_OPTIONS (FP contraction on, what the kernels were
    checked with on the GPU): Triton 3.9 warned on each first compile that its default turns off
    in 3.10, and a build without the option would follow that default. A device index no other
    test uses makes Triton parse the options again (its in-memory cache is per device)."""
    import warnings

    with _fresh_device(stub, 2090, (9, 0), 232448), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.randn(1, HIDDEN, dtype=torch.float16)
        w, b = torch.randn(HIDDEN, dtype=torch.float16), torch.randn(HIDDEN, dtype=torch.float16)
        fd.layer_norm(x, w, b, 1e-5, residual=x, alpha=3.0, pdl=2)
        N, K = SHAPES["dense"]
        for bits in (8, 4):
            q, scale, bias = _weights(bits, N, K, torch.float16)
            for M in (1, 16, 128):
                path, run, cfg = ck._plan(M, N, K, bits, torch.float16, True, (9, 0))
                run(torch.randn(M, K, dtype=torch.float16), q, scale, bias, bits, cfg, act=1)
    fusion = [str(w.message) for w in caught if "FP_FUSION" in str(w.message)]
    assert not fusion, fusion[0]
    built = _builds_on(2090)
    assert {c.name for c in built} >= {"_ln_kernel", "_gemv_kernel", "_qmm_asm_kernel", "_gelu_kernel"}, built
    assert all(c.metadata.enable_fp_fusion is True for c in built)


def _threads_along_k(ttgir: str, kb: int, mb: int = 16) -> list:
    """(threads of a warp along K, along M) of each activation-tile load in a build of a tiled kernel:
    the fp16 / bf16 pointer tensors [kb, mb] (K first) or [mb, kb] (transposed); kb != mb."""
    layouts = dict(re.findall(r"^#(blocked\d*) = #ttg\.blocked<\{.*?threadsPerWarp = \[(\d+, \d+)\]", ttgir, re.M))
    found = []
    for rows, cols, name in set(re.findall(r"tensor<(\d+)x(\d+)x!tt\.ptr<b?f16>, #(blocked\d*)>", ttgir)):
        shape = (int(rows), int(cols))
        if sorted(shape) == sorted((kb, mb)):
            tpw = [int(t) for t in layouts[name].split(", ")]
            found.append((tpw[0], tpw[1]) if shape[0] == kb else (tpw[1], tpw[0]))
    return found


def test_int4_activation_tiles_load_along_k(stub):
    """The activation tiles of the INT4 tiled kernels (2..64 rows: _qmm_asm_kernel for fp16, _qmm_kernel
    for bf16) are strided in both orientations (a weight word's columns are
    8 apart, a byte's 2), so Triton lays their loads out by its default order, and that default
    flipped in Triton 3.7. The orientation the launcher picks (XT, by the Triton version) must give
    the layout with a warp's threads along K, the one measured fast (H100, Triton 3.9, INT4 batch-16
    decode: 4269 tokens/s with it, 2935 with the threads along M). Checked on this Triton's own sm_90
    build."""
    with _fresh_device(stub, 3190, (9, 0), 232448):
        for name in ("4h_to_h", "qkv"):
            N, K = SHAPES[name]
            q, scale, bias = _weights(4, N, K, torch.float16)
            for dtype in (torch.float16, torch.bfloat16):
                path, run, cfg = ck._plan(16, N, K, 4, dtype, True, (9, 0))
                run(torch.randn(16, K, dtype=dtype), q, scale, bias, 4, cfg)
    built = [c for c in _builds_on(3190) if c.name in ("_qmm_asm_kernel", "_qmm_kernel")]
    assert {c.name for c in built} == {"_qmm_asm_kernel", "_qmm_kernel"}, [c.name for c in built]
    for c in built:
        kname = "BLOCK_KW" if c.name == "_qmm_asm_kernel" else "BLOCK_KQ"
        kb = c.src.constants[(c.src.fn.arg_names.index(kname),)]
        loads = _threads_along_k(c.asm["ttgir"], kb)
        assert loads and all(k > m for k, m in loads), (c.name, kb, loads)
    # 17..64 rows (_MID_CFG: _qmm_asm_kernel with 32-row tiles for fp16, _qmm_kernel for bf16): these
    # tiles are square (32 words x 32 rows, 64 bytes x 64 rows), so the orientation is read from a
    # build of the same config with twice the K tile
    for index, (M, dtype, kname) in enumerate([(24, torch.float16, "BLOCK_KW"), (48, torch.float16, "BLOCK_KW"),
                                               (64, torch.bfloat16, "BLOCK_KQ")]):
        with _fresh_device(stub, 3191 + index, (9, 0), 232448):
            N, K = SHAPES["dense"]
            q, scale, bias = _weights(4, N, K, dtype)
            path, run, cfg = ck._plan(M, N, K, 4, dtype, True, (9, 0))
            assert path == ("qmm_asm" if kname == "BLOCK_KW" else "qmm"), (M, path)
            run(torch.randn(M, K, dtype=dtype), q, scale, bias, 4, dict(cfg, **{kname: 2 * cfg[kname]}))
        kernel = "_qmm_asm_kernel" if kname == "BLOCK_KW" else "_qmm_kernel"
        (mid,) = [c for c in _builds_on(3191 + index) if c.name == kernel]
        loads = _threads_along_k(mid.asm["ttgir"], 2 * cfg[kname], cfg["BLOCK_M"])
        assert loads and all(k > m for k, m in loads), (M, loads)


def test_build_errors_are_recognised(stub):
    """fast_decode falls back to the eager path (once, with a warning) on an exception from building
    a kernel, and only then (tests/test_cuda_model.py checks the fallback on the GPU). Two real build
    failures are recognised as such: a tensor-core tile on an sm_80 'GPU' with 1 KB of shared memory
    (Triton's OutOfResources) and a target Triton has no code generation for (an MLIR pass fails, a
    plain RuntimeError raised inside triton.compiler.compile)."""
    N, K = SHAPES["dense"]
    q, scale, bias = _weights(8, N, K, torch.float16)
    path, run, cfg = ck._plan(64, N, K, 8, torch.float16, True, (8, 0))
    x = torch.randn(64, K, dtype=torch.float16)
    failures = []
    with _fresh_device(stub, 2080, (8, 0), 1024):
        with pytest.raises(Exception) as info:
            run(x, q, scale, bias, 8, cfg)
        failures.append(info.value)
    _use(stub, (8, 0))
    stub.device = 2081  # (the stub names the target after the device index: "sm_2081")
    stub.shared[stub.device] = 166912
    with pytest.raises(Exception) as info:
        run(x, q, scale, bias, 8, cfg)
    failures.append(info.value)
    assert type(failures[0]).__name__ == "OutOfResources", repr(failures[0])
    assert type(failures[1]) is RuntimeError, repr(failures[1])
    for exc in failures:
        assert fd._is_build_error(exc), repr(exc)
    assert not fd._is_build_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not fd._is_build_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))


@pytest.mark.parametrize("cap", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
def test_persistent_probe_builds(stub, cap, monkeypatch):
    """benchmarks/probe_persistent.py (a persistent MLP chain on the product GEMV's main loop, with
    grid barriers; for a device session) builds with the product's GEMV configs, INT8 and INT4,
    activations read past L1 or not, and as a cooperative launch; its loads of weights and
    activations stay vectorised."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))  # as when run
    probe = importlib.import_module("probe_persistent")
    target = _use(stub, cap)
    n0 = len(stub.loaded)
    for bits in (8, 4):
        weights = probe.make_weights(bits, 1, "cpu")
        cfg1 = probe.gemv_cfg(bits, probe.INNER, probe.HIDDEN, target)
        cfg2 = probe.gemv_cfg(bits, probe.HIDDEN, probe.INNER, target)
        x = torch.randn(1, probe.HIDDEN, dtype=torch.float16)
        m = torch.empty(1, probe.INNER, dtype=torch.float16)
        bar = torch.zeros(2, dtype=torch.int32)
        for xcm in (".cg", ""):
            probe.run_persistent(x, m, weights, bar, bits, cfg1, cfg2, 132, xcm, layers=1)
        probe.run_persistent(x, m, weights, bar, bits, cfg1, cfg2, 132, layers=1, cooperative=True)
    assert _loaded_since(stub, n0) == ["_mlp_kernel"] * 6
    compiled = list(probe.kernel().device_caches[stub.device][0].values())
    assert sum(c.metadata.launch_cooperative_grid for c in compiled) == 2
    ptx = [c.asm["ptx"] for c in compiled if not c.metadata.launch_cooperative_grid]
    assert len(ptx) == 4
    for text in ptx:
        # barrier: arrivals released at GPU scope, polls acquire; weights as 16-byte loads
        assert re.search(r"(atom|red)\.global\.gpu\.release\.add", text) and "ld.global.gpu.acquire" in text
        assert ".v4.b32" in text
    assert sum("ld.global.cg" in t for t in ptx) == 2  # (the ".cg" builds of INT8 and INT4)


@pytest.mark.cuda
def test_stub_builds_what_the_gpu_builds():
    """On a real GPU (the device machine): the kernels built through the stub driver for this GPU's
    capability are byte for byte the cubins Triton builds through the real driver — so what the
    CPU-only tests above compile is what such a GPU runs. Fresh compiles on both sides (no cache)."""
    triton = _triton()
    if not torch.cuda.is_available():
        pytest.fail("this test needs an NVIDIA GPU (run it on the device machine with -m cuda)")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    cap = tuple(torch.cuda.get_device_capability())
    props = torch.cuda.get_device_properties(0)

    def launch(device):
        f16 = torch.float16
        x = torch.randn(1, HIDDEN, dtype=f16, device=device)
        w, b = torch.randn(HIDDEN, dtype=f16, device=device), torch.randn(HIDDEN, dtype=f16, device=device)
        fd.layer_norm(x, w, b, 1e-5, residual=x, alpha=3.0)
        for bits in (8, 4):
            for M in (1, 16):
                N, K = SHAPES["h_to_4h"]
                q, scale, bias = (t.to(device) for t in _weights(bits, N, K, f16))
                path, run, cfg = ck._plan(M, N, K, bits, f16, True, cap)
                run(torch.randn(M, K, dtype=f16, device=device), q, scale, bias, bits, cfg, act=1)

    def cubins(dev):
        out = {}
        kernels = list(vars(ck._build()).values()) + list(fd._build().values())
        for kern in (k for k in kernels if hasattr(k, "device_caches")):  # (the namespace holds triton too)
            cache = kern.device_caches.get(dev)
            for compiled in (cache[0].values() if cache else ()):
                out.setdefault(compiled.name, set()).add(compiled.asm["cubin"])
        return out

    old_always = triton.knobs.compilation.always_compile
    triton.knobs.compilation.always_compile = True
    try:
        launch("cuda")
        torch.cuda.synchronize()
        real = cubins(torch.cuda.current_device())
        drv = _StubDriver(GPUTarget)
        old_cap, old_driver = ck._capability, driver._active
        driver.set_active(drv)
        try:
            drv.device = 1000 + cap[0] * 10 + cap[1]  # a device index the real GPU does not use
            drv.shared[drv.device] = props.shared_memory_per_block_optin
            drv.GPUTarget = lambda backend, arch, warp: GPUTarget(backend, cap[0] * 10 + cap[1], warp)
            ck._capability = lambda device=None: cap
            launch("cpu")
            stubbed = cubins(drv.device)
        finally:
            driver._active = old_driver
            ck._capability = old_cap
    finally:
        triton.knobs.compilation.always_compile = old_always
    # (the real side may hold more: kernels other tests ran in this process)
    assert {"_ln_kernel", "_gemv_kernel"} <= set(stubbed) <= set(real), (sorted(real), sorted(stubbed))
    for name in stubbed:
        assert stubbed[name] <= real[name], f"{name}: a stub-built cubin differs from the GPU's"


# ----------------------------------------------------------------------------------------------
# the opt-in tensor-core GEMV (cuda_mma.py, CUDA C compiled by NVRTC at load; sm_80+)

def test_ring_probe_builds(monkeypatch):
    """benchmarks/probe_ring.py (a persistent chain of dependent GEMVs — the MLP, or a decode layer's
    four linears — whose weights stream through a shared-memory ring by bulk copies; for a device session) builds with NVRTC for sm_90 in every config it runs;
    each config's shared memory fits Hopper's 227 KB per block and its per-CTA row buffer holds the
    most rows the kernel's split of a phase (slots cta * U / G .. (cta + 1) * U / G) gives one CTA,
    on 132 SMs (H100 SXM) and 114 (H100 PCIe); sm_80 has no bulk copies: NVRTC refuses it."""
    from chatglm6b import cuda_mma as mm

    if mm.nvrtc_version() is None:
        pytest.fail("NVRTC not found: pip install nvidia-cuda-nvrtc-cu12 (.ci/run installs it)")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))  # as when run
    probe = importlib.import_module("probe_ring")
    for cfg in probe.configs():
        for grid in (132, 114):
            full = probe.full_cfg(cfg, grid)
            assert probe.smem_bytes(full) <= 227 * 1024, (cfg, grid)
            for n, k, _ in probe.shapes(cfg.get("CHAIN", 2)):
                rows = cfg["SB"] // (k // 2)
                slots = n // rows
                assert slots * rows == n
                split = [(c * slots // grid, (c + 1) * slots // grid) for c in range(grid)]
                assert split[0][0] == 0 and split[-1][1] == slots
                assert all(e == a2 for (_, e), (a2, _) in zip(split, split[1:]))
                assert max(e - a for a, e in split) * rows <= full["MAXROWS"], (cfg, grid, n)
        cubin = mm.compile_cubin(probe.SOURCE, "sm_90", probe.full_cfg(cfg, 132))
        assert cubin[:4] == b"\x7fELF" and b"ring_chain" in cubin, cfg
    with pytest.raises(RuntimeError, match=r"requires \.target sm_90"):
        mm.compile_cubin(probe.SOURCE, "sm_80", probe.full_cfg(probe.configs()[0], 132))


MMA_ARCHS = [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]


@pytest.mark.parametrize("cap", MMA_ARCHS, ids=[f"sm_{a}{b}" for a, b in MMA_ARCHS])
def test_mma_gemv_builds(cap):
    """NVRTC (the nvidia-cuda-nvrtc wheel; no GPU needed to compile) builds the tensor-core GEMV for
    every configuration cuda_mma picks on this capability — per layer shape, INT8 and INT4, with and
    without bias, and each PDL level on sm_90."""
    from chatglm6b import cuda_mma as mm

    if mm.nvrtc_version() is None:
        pytest.fail("NVRTC not found: pip install nvidia-cuda-nvrtc-cu12 (.ci/run installs it)")
    arch = f"sm_{cap[0]}{cap[1]}"
    built = set()
    for bits in (8, 4):
        for name, (N, K) in SHAPES.items():
            assert mm.supports(bits, N, K, torch.float16), (bits, name)
            cfg = mm.config_for(bits, N, K, cap)
            for has_bias in (0, 1):
                for pdl in ((0, 1, 2) if cap >= (9, 0) else (0,)):
                    defines = dict(BITS=bits, MT=cfg["MT"], WARPS=cfg["WARPS"], U=cfg["U"], HAS_BIAS=has_bias,
                                   PDL=pdl)
                    key = tuple(sorted(defines.items()))
                    if key in built:
                        continue
                    cubin = mm.compile_cubin(mm._SOURCE, arch, defines)
                    assert cubin[:4] == b"\x7fELF", (arch, defines)
                    built.add(key)
    assert len(built) >= 4


def test_mma_cubin_cache_is_reused_and_pruned(tmp_path, monkeypatch):
    """The NVRTC cubins are cached under $CHATGLM_CACHE_DIR: a second request reads the file (no
    compile) and refreshes its age; a new build deletes cubins last used more than 30 days ago and
    leaves recent ones and other files alone."""
    import os
    import time

    from chatglm6b import cuda_mma as mm

    if mm.nvrtc_version() is None:
        pytest.fail("NVRTC not found: pip install nvidia-cuda-nvrtc-cu12 (.ci/run installs it)")
    monkeypatch.setenv("CHATGLM_CACHE_DIR", str(tmp_path))
    month = time.time() - 31 * 86400
    old, recent, other = (tmp_path / "mma_gemv-000000000000000000dead.cubin",
                          tmp_path / "mma_gemv-000000000000000000beef.cubin", tmp_path / "cpu_kernels-0000dead.so")
    for f in (old, recent, other):
        f.write_bytes(b"x")
    os.utime(old, (month, month))
    os.utime(other, (month, month))
    defines = dict(BITS=4, MT=1, WARPS=4, U=2, HAS_BIAS=1, PDL=0)
    cubin = mm._cached_cubin("sm_80", defines)
    assert cubin[:4] == b"\x7fELF"
    assert not old.exists() and recent.exists() and other.exists()
    made = [p for p in tmp_path.glob("mma_gemv-*.cubin") if p != recent]
    assert len(made) == 1 and made[0].read_bytes() == cubin
    os.utime(made[0], (month, month))
    calls = []
    monkeypatch.setattr(mm, "compile_cubin", lambda *a: calls.append(a))
    assert mm._cached_cubin("sm_80", defines) == cubin and not calls  # read back, not compiled
    assert made[0].stat().st_mtime > time.time() - 60  # in use again: no longer stale
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([made[0].name, recent.name, other.name])


@pytest.mark.parametrize("bits", [8, 4])
def test_gemv_triple_buffer_has_two_tiles_in_flight_before_the_wait(stub, bits):
    """PREFETCH=2 (the triple-buffered batch-1 GEMV): the program issues its first two weight tiles before
    the PDL wait, twice the weight loads PREFETCH=True issues there, and builds for every target with a
    ragged K (masked tiles) as well as whole tiles. (Its values are checked on the device: the CUDA
    kernel tests run it against float64.)"""
    N, K = SHAPES["4h_to_h"]
    before, loop = {}, {}
    for cap, _, _ in TARGETS:
        _use(stub, cap)
        for k in (K, K - 8 * 3 * 7):
            q, scale, bias = _weights(bits, N, k, torch.float16)
            x = torch.randn(1, k, dtype=torch.float16)
            for pf in (True, 2):
                cfg = dict(BLOCK_N=8, BLOCK_KW=128, PREFETCH=pf, EV="evict_first", XVEC=2, num_warps=4)
                ck._run_gemv(x, q, scale, bias, bits, cfg, pdl=2 if cap >= (9, 0) else 0)
            # unreduced split-K partials (the LayerNorm after the linear reduces them: fast_decode FOLD_REDUCE)
            ws = ck._run_gemv(x, q, scale, None, bits, dict(cfg, PREFETCH=True, SPLIT_K=2),
                              pdl=2 if cap >= (9, 0) else 0, reduce=False)
            assert ws.dtype == torch.float32 and ws.shape == (2, N)
    kern = ck._build().gemv_kernel

    def const(consts, name, default=None):
        return consts.get((kern.arg_names.index(name),), default)

    for compiled in kern.device_caches[90][0].values():
        consts = compiled.src.constants
        # (this test's builds: other tests leave theirs in the same cache)
        mine = dict(PDL=True, BITS=bits, BLOCK_N=8, BLOCK_KW=128, SPLIT_K=1, LATE=0, L2_BYTES=0)
        if any(const(consts, k, 0) != v for k, v in mine.items()) or const(consts, "PREFETCH") not in (1, 2):
            continue
        ptx = compiled.asm["ptx"]
        head = ptx[:ptx.index("griddepcontrol.wait")]
        key = (int(const(consts, "PREFETCH")), bool(const(consts, "EVEN_K")))
        before[key] = len(re.findall(r"ld\.global", head))
        # the weight loads (evict_first) after the wait: the loop's prefetches
        loop[key] = [(m.group(1), m.group(2)) for m in
                     re.finditer(r"(@%p\d+ )?(ld\.global\.L1::evict_first\S*)", ptx[len(head):])]
    assert set(before) == {(1, True), (2, True), (1, False), (2, False)}, before
    for even in (True, False):
        assert before[(1, even)] > 0 and before[(2, even)] == 2 * before[(1, even)], before
    # PREFETCH=2 predicates its loop loads off where the tile they fetch would lie past the program's K
    # range (they are never used), and whole tiles keep PREFETCH=True's vector width
    assert loop[(2, True)] and all(p for p, _ in loop[(2, True)]), loop[(2, True)]
    assert not any(p for p, _ in loop[(1, True)]), loop[(1, True)]
    for pf in (1, 2):
        assert {ld.split(".")[-2] for _, ld in loop[(pf, True)]} == {"v4"}, loop[(pf, True)]
