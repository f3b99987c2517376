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
