"""Registers the repo root (a flat Hub remote-code folder) as package ``chatglm6b``.

The model files import each other relatively, as ``transformers`` loads them, so a script run from a
checkout imports them as ``chatglm6b.<module>``. Every script in this folder starts with
``import _package`` (its own folder is first on ``sys.path`` when run as ``python3 benchmarks/x.py``).
"""

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if "chatglm6b" not in sys.modules:
    _pkg = types.ModuleType("chatglm6b")
    _pkg.__path__ = [str(ROOT)]
    sys.modules["chatglm6b"] = _pkg


def run_child(argv, env=None, what: str = "child") -> dict:
    """Run ``python3 argv...`` in a fresh interpreter and return the JSON of the last line it printed
    starting with ``RESULT `` (the benchmarks' child-process protocol), with ``process_wall_s``
    added; raises with the child's output tails if it fails."""
    import json
    import subprocess
    import time

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *map(str, argv)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT "):]), process_wall_s=round(wall, 2))
