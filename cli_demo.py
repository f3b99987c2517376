#!/usr/bin/env python
"""Chat with ChatGLM-6B in the terminal; answers are printed as they are generated.

    python cli_demo.py --model /path/to/chatglm-6b-int8   # real weights, e.g. a Hub download
    python cli_demo.py --prompt "你好" --greedy            # one answer, then exit
    python cli_demo.py                                     # no weights: a small RANDOM checkpoint

In the chat, ``clear`` forgets the history and ``exit`` (or Ctrl-D) quits; Ctrl-C stops an answer.

The model and tokenizer are loaded with ``AutoModel`` / ``AutoTokenizer`` and
``trust_remote_code=True`` from a folder laid out like the Hub repo. With ``--code repo`` (the
default) that folder runs this repository's code: when the weights folder lacks our code files,
or holds other ones (THUDM's originals, say), the demo serves it through an overlay folder in the
cache that links the weights and holds copies of our code. ``--code folder`` runs whatever code
the folder has.

Without ``--model`` the demo writes (once, then reuses) a small random checkpoint in the official
INT8 layout with tools/make_checkpoint.py. It shows that everything runs; its answers are
random text.
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Callable, List, Optional, TextIO, Tuple

ROOT = Path(__file__).resolve().parent
WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.safetensors",
                "model.safetensors.index.json")
ENTRY_CODE = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py")  # auto_map targets
DEMO_PRESET, DEMO_BITS, DEMO_SEED = "tiny", 8, 0
DTYPES = ("auto", "float32", "float16", "bfloat16")

RANDOM_NOTICE = (
    "NOTE: no --model given, so this demo runs a small RANDOM checkpoint ({path}).\n"
    "      Its answers are meaningless random text: they only show that the code runs.\n"
    "      For real answers: python cli_demo.py --model /path/to/chatglm-6b-int8")


class DemoError(Exception):
    """A problem the user can fix; main() prints it without a traceback."""


def _tools():
    """tools/make_checkpoint.py, imported with the repo root as package ``chatglm6b`` (its relative imports)."""
    if "chatglm6b" not in sys.modules:
        pkg = types.ModuleType("chatglm6b")
        pkg.__path__ = [str(ROOT)]
        sys.modules["chatglm6b"] = pkg
    return importlib.import_module("chatglm6b.tools.make_checkpoint")


# ---------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Chat with ChatGLM-6B(-INT8) in the terminal, answers streamed.")
    ap.add_argument("--model", metavar="PATH",
                    help="folder with config.json and the weights (e.g. THUDM/chatglm-6b-int8 downloaded); "
                         "without it a small random checkpoint is used and the answers are meaningless")
    ap.add_argument("--prompt", metavar="TEXT", help="answer this one message and exit (no interactive chat)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto = cuda when available, else cpu (default)")
    ap.add_argument("--dtype", choices=DTYPES, default="auto",
                    help="float dtype of the non-quantized tensors; auto = float16 on cuda, float32 on cpu")
    ap.add_argument("--max-length", type=int, default=2048,
                    help="max tokens of prompt + history + answer (default 2048)")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding (deterministic) instead of sampling")
    ap.add_argument("--top-p", type=float, default=0.7, help="nucleus sampling threshold (default 0.7)")
    ap.add_argument("--temperature", type=float, default=0.95, help="sampling temperature (default 0.95)")
    ap.add_argument("--seed", type=int, help="seed torch's RNG, for reproducible sampling")
    ap.add_argument("--code", choices=("repo", "folder"), default="repo",
                    help="repo = run this repository's model code on the weights (default); "
                         "folder = run the .py files inside --model as they are")
    args = ap.parse_args(argv)
    if args.max_length < 1:
        ap.error("--max-length must be a positive number of tokens")
    if not 0 < args.top_p <= 1:
        ap.error("--top-p must be in (0, 1]")
    if args.temperature <= 0:
        ap.error("--temperature must be > 0 (use --greedy for deterministic answers)")
    if args.code == "folder" and args.model is None:
        ap.error("--code folder needs --model: the random demo checkpoint has no code of its own")
    return args


def generation_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for model.stream_chat / model.chat."""
    if args.greedy:
        return dict(max_length=args.max_length, do_sample=False)
    return dict(max_length=args.max_length, do_sample=True, top_p=args.top_p, temperature=args.temperature)


# ---------------------------------------------------------------------------------------------
# folders


def cache_root() -> Path:
    """$CHATGLM_CACHE_DIR, else $XDG_CACHE_HOME/chatglm6b, else ~/.cache/chatglm6b (as cpu_kernels)."""
    if os.environ.get("CHATGLM_CACHE_DIR"):
        return Path(os.environ["CHATGLM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "chatglm6b"


_COMPLETE = ".complete"  # written last, inside a temp folder that is then renamed into place


def _generator_fingerprint(mc) -> str:
    """Changes whenever tools/make_checkpoint.py does, so a cached checkpoint never outlives its recipe."""
    return hashlib.sha1(Path(mc.__file__).read_bytes()).hexdigest()


def _is_complete(folder: Path, config: dict, fingerprint: str) -> bool:
    try:
        return ((folder / _COMPLETE).read_text() == fingerprint and (folder / "pytorch_model.bin").is_file()
                and json.loads((folder / "config.json").read_text()) == config)
    except (OSError, ValueError):
        return False


def demo_checkpoint(cache: Path, log: Callable[[str], None] = lambda m: None) -> Path:
    """The random tiny INT8 checkpoint under ``cache``, written on first use (weights + config only)."""
    mc = _tools()
    config, fingerprint = mc.make_config(DEMO_PRESET, DEMO_BITS), _generator_fingerprint(mc)
    target = cache / f"demo-{DEMO_PRESET}-int{DEMO_BITS}-seed{DEMO_SEED}"
    if _is_complete(target, config, fingerprint):
        return target
    log(f"writing a random {DEMO_PRESET} INT{DEMO_BITS} checkpoint to {target} (once)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=cache))
    try:
        mc.write_checkpoint(tmp, config, DEMO_BITS, "bin", seed=DEMO_SEED)
        (tmp / _COMPLETE).write_text(fingerprint)
        if target.exists():  # incomplete, or from another version of the generator
            shutil.rmtree(target)
        os.rename(tmp, target)
    except OSError:
        if not _is_complete(target, config, fingerprint):  # not just another demo finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_weights_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise DemoError(f"--model {folder}: no such folder. Give the folder that holds config.json and the "
                        f"weights, e.g. a download of THUDM/chatglm-6b-int8.")
    if not (folder / "config.json").is_file():
        raise DemoError(f"{folder} has no config.json: it is not a model folder (download the whole Hub repo)")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise DemoError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)


def overlay_dir(cache: Path, folder: Path) -> Path:
    """Where the overlay for ``folder`` lives: stable per folder, so transformers' module cache is reused."""
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:10]
    return cache / "overlays" / f"{folder.name}-{digest}"


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def build_overlay(folder: Path, dst: Path, code_dir: Path = ROOT) -> Path:
    """Make ``dst`` a model folder: links to everything in ``folder``, with our code files copied over it.

    Tokenizer files the weights folder lacks are linked from ``code_dir``. Entries of an earlier
    overlay that are no longer wanted are removed; unchanged ones are left alone.
    """
    mc = _tools()
    names = mc.package_files(code_dir)
    missing = [n for n in names if not (code_dir / n).is_file()]
    if missing:
        raise DemoError(f"this checkout ({code_dir}) lacks {missing}, so there is no code to run the weights "
                        f"with; restore those files (git status) or use --code folder")
    wanted = {e.name: ("link", e) for e in folder.iterdir() if e.name != "__pycache__"}
    for name in names:
        if name.endswith(".py"):
            wanted[name] = ("copy", code_dir / name)
        elif name not in wanted:
            wanted[name] = ("link", code_dir / name)
    dst.mkdir(parents=True, exist_ok=True)
    for entry in dst.iterdir():
        if entry.name not in wanted:
            _remove(entry)
    for name, (kind, src) in wanted.items():
        target = dst / name
        if kind == "link":
            if target.is_symlink() and os.readlink(target) == str(src):
                continue
            _remove(target)
            os.symlink(src, target)
        else:
            if not target.is_symlink() and _same_file(target, src):
                continue
            _remove(target)
            shutil.copyfile(src, target)
    return dst


def model_folder(path, code: str = "repo", cache: Optional[Path] = None, code_dir: Path = ROOT) -> Path:
    """The folder to give from_pretrained for the weights in ``path`` (see the module docstring)."""
    folder = Path(path).expanduser().resolve()
    _check_weights_folder(folder)
    if code == "folder":
        missing = [n for n in ENTRY_CODE if not (folder / n).is_file()]
        if missing:
            raise DemoError(f"--code folder: {folder} lacks {missing}; drop --code folder to run this "
                            f"repository's code on those weights")
        return folder
    names = _tools().package_files(code_dir)
    if all(_same_file(folder / n, code_dir / n) if n.endswith(".py") else (folder / n).is_file() for n in names):
        return folder  # already a complete folder with exactly our code
    return build_overlay(folder, overlay_dir(cache or cache_root(), folder), code_dir)


# ---------------------------------------------------------------------------------------------
# model


def pick_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); "
                        "use --device cpu, or install a CUDA build of torch")
    return choice


def pick_dtype(choice: str, device: str):
    import torch

    if choice == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, choice)


def load_model(folder: Path, device: str, dtype):
    """Tokenizer and model through the Auto classes, as a user of the Hub repo would load them."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    # transformers 5 renamed `torch_dtype` to `dtype`
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, **{dtype_kw: dtype})
    return tokenizer, model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# streaming output

_PLACEHOLDER = "[[训练时间]]"  # the response post-processing turns it into "2023年" (SPEC §7)
_UNSETTLED_TAIL = ",!:;?\ufffd"  # ASCII marks turn full-width when a CJK char follows; U+FFFD = partial UTF-8


def settled_length(text: str) -> int:
    """How much of a partial response can no longer change when more tokens arrive.

    Held back: the start of a "[[训练时间]]" placeholder at the end, and before it any trailing
    ASCII , ! : ; ? (full-width once a CJK char follows) or U+FFFD (an unfinished multi-byte char).
    """
    n = len(text)
    hold = next((k for k in range(min(len(_PLACEHOLDER) - 1, n), 0, -1) if text.endswith(_PLACEHOLDER[:k])), 0)
    while hold < n and text[n - hold - 1] in _UNSETTLED_TAIL:
        hold += 1
    return n - hold


class StreamPrinter:
    """Prints a response that arrives as ever longer versions of itself, each piece once."""

    def __init__(self, out: TextIO):
        self.out, self.shown = out, ""

    def update(self, text: str) -> None:
        self._show(text[:settled_length(text)])

    def finish(self, text: str) -> None:
        self._show(text)
        self.out.write("\n")
        self.out.flush()

    def _show(self, text: str) -> None:
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
        else:  # what was shown changed after all: print the corrected answer whole, on a new line
            self.out.write("\n" + text)
        self.shown = text
        self.out.flush()


def answer(model, tokenizer, query: str, history: List[Tuple[str, str]], gen_kwargs: dict,
           out: TextIO) -> Tuple[str, List[Tuple[str, str]]]:
    """Stream one answer to ``out``; returns (response, history including this turn)."""
    printer, response, new_history = StreamPrinter(out), "", history + [(query, "")]
    for response, new_history in model.stream_chat(tokenizer, query, history=history, **gen_kwargs):
        printer.update(response)
    printer.finish(response)
    return response, new_history


def _empty_answer_hint(gen_kwargs: dict, with_history: bool) -> str:
    limit = f"--max-length {gen_kwargs['max_length']}" if "max_length" in gen_kwargs else "the length limit"
    if with_history:
        return f"(empty answer: if the conversation has outgrown {limit} tokens, type 'clear' or raise it)"
    return f"(empty answer: if the prompt already fills {limit} tokens, raise it)"


def chat_loop(model, tokenizer, gen_kwargs: dict, read: Callable[[str], str] = input,
              out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> List[Tuple[str, str]]:
    """Interactive chat until ``exit`` / EOF; returns the final history."""
    history: List[Tuple[str, str]] = []
    out.write("ChatGLM-6B: type a message. 'clear' forgets the history, 'exit' quits, "
              "Ctrl-C stops an answer.\n")
    while True:
        try:
            query = read("\n用户：").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return history
        if not query:
            continue
        if query.lower() in ("exit", "quit"):
            return history
        if query.lower() == "clear":
            history = []
            if getattr(out, "isatty", lambda: False)():
                out.write("\033[2J\033[H")  # clear the terminal too
            out.write("(history cleared)\n")
            continue
        out.write("\nChatGLM-6B：")
        try:
            response, new_history = answer(model, tokenizer, query, history, gen_kwargs, out)
        except KeyboardInterrupt:
            out.write("\n(stopped; this turn is not kept in the history)\n")
            continue
        if not response:  # nothing worth remembering
            err.write(_empty_answer_hint(gen_kwargs, bool(history)) + "\n")
            continue
        history = new_history


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        cache = cache_root()
        weights = Path(args.model) if args.model else demo_checkpoint(cache, log)
        folder = model_folder(weights, args.code, cache)
    except DemoError as e:
        log(f"error: {e}")
        return 2
    if args.model is None:
        log(RANDOM_NOTICE.format(path=weights))
    log(f"loading {folder} on {device} ({str(dtype).replace('torch.', '')}) ...")
    tokenizer, model = load_model(folder, device, dtype)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    gen_kwargs = generation_kwargs(args)

    if args.prompt is not None:
        response, _ = answer(model, tokenizer, args.prompt, [], gen_kwargs, sys.stdout)
        if not response:
            log(_empty_answer_hint(gen_kwargs, False))
        return 0
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and ↑ history for input())
        except ImportError:
            pass
    chat_loop(model, tokenizer, gen_kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
