"""Shared test fixtures.

The repository root is a flat Hugging Face remote-code folder whose modules use relative
imports (as the Hub requires). Tests import it as the package ``chatglm6b`` so those
imports resolve exactly as they do under ``trust_remote_code``.
"""
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CHATGLM_SHARED", ROOT.parent / "shared")).resolve()  # absolute: tests symlink into it
CONFORMANCE = SHARED / "conformance"
CODE_FILES = [
    "configuration_chatglm.py",
    "modeling_chatglm.py",
    "quantization.py",
    "loading.py",
    "dispatch.py",
    "tokenization_chatglm.py",
    "cpu_kernels.py",
    "cuda_kernels.py",
    "cuda_mma.py",
    "fast_decode.py",
    "tokenizer_config.json",
    "ice_text.model",
]

# A private remote-code module cache per test session: runs of different venvs/checkouts must not
# import each other's copies of our modules (transformers names the cache folder after the model folder).
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="chatglm-hf-modules-"))

if "chatglm6b" not in sys.modules:
    _pkg = types.ModuleType("chatglm6b")
    _pkg.__path__ = [str(ROOT)]
    sys.modules["chatglm6b"] = _pkg


def model_folder(tmp_path: Path, weights: str, extra_config: dict = None) -> Path:
    """A folder laid out like the Hub repo: our code + tokenizer files + a conformance checkpoint."""
    import json

    dst = tmp_path / f"model-{weights}"
    dst.mkdir(parents=True, exist_ok=True)
    for name in CODE_FILES:
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, dst / name)
    src = CONFORMANCE / weights
    for f in src.iterdir():
        if f.name == "config.json":
            continue
        os.symlink(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(extra_config or {})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def run_child(code: str, *args, env=None, timeout: float = 300) -> dict:
    """Run ``code`` in a fresh interpreter (``sys.argv[1:]`` = args) and return the JSON of the last
    line it printed starting with ``RESULT ``; fails with its output if it exits non-zero or prints none."""
    import json
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not CONFORMANCE.exists():
        raise RuntimeError(f"conformance data not found at {CONFORMANCE}; set CHATGLM_SHARED")
    return CONFORMANCE


@pytest.fixture(scope="session")
def golden():
    import json

    from safetensors.torch import load_file

    return json.loads((CONFORMANCE / "golden.json").read_text()), load_file(str(CONFORMANCE / "golden.safetensors"))
