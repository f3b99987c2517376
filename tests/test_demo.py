"""cli_demo.py: arguments, the cached random checkpoint, the code overlay, streaming output, and
end-to-end runs of the real script (greedy answers on the conformance checkpoint must equal the
original code's golden outputs)."""
import inspect
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from chatglm6b import cli_demo
from chatglm6b.tools import make_checkpoint as mc
from conftest import ROOT

DEMO = ROOT / "cli_demo.py"


# --- arguments ----------------------------------------------------------------------------


def test_defaults_are_the_original_chat_defaults():
    args = cli_demo.parse_args([])
    assert args.model is None and args.prompt is None and args.device == "auto" and args.code == "repo"
    assert (args.max_length, args.top_p, args.temperature, args.greedy) == (2048, 0.7, 0.95, False)  # SPEC §7
    assert cli_demo.generation_kwargs(args) == dict(max_length=2048, do_sample=True, top_p=0.7, temperature=0.95)


def test_greedy_flags_turn_sampling_off():
    args = cli_demo.parse_args(["--prompt", "你好", "--greedy", "--max-length", "30", "--device", "cpu"])
    assert args.prompt == "你好" and args.device == "cpu"
    assert cli_demo.generation_kwargs(args) == dict(max_length=30, do_sample=False)


def test_generation_kwargs_are_parameters_of_the_models_stream_chat_and_chat():
    from chatglm6b.modeling_chatglm import ChatGLMForConditionalGeneration as M

    stream, chat = inspect.signature(M.stream_chat).parameters, inspect.signature(M.chat).parameters
    for argv in ([], ["--greedy"]):
        for key in cli_demo.generation_kwargs(cli_demo.parse_args(argv)):
            assert key in stream and key in chat, key


@pytest.mark.parametrize("argv", [
    ["--max-length", "0"], ["--top-p", "1.5"], ["--top-p", "0"], ["--temperature", "0"], ["--device", "tpu"],
    ["--code", "folder"],  # needs --model
])
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli_demo.parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATGLM_CACHE_DIR", str(tmp_path / "c"))
    assert cli_demo.cache_root() == tmp_path / "c"
    monkeypatch.delenv("CHATGLM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli_demo.cache_root() == tmp_path / "xdg" / "chatglm6b"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli_demo.cache_root() == tmp_path / "home" / ".cache" / "chatglm6b"


# --- the random demo checkpoint -----------------------------------------------------------


def test_demo_checkpoint_is_written_once_in_the_official_layout(tmp_path, conformance_dir):
    messages = []
    folder = cli_demo.demo_checkpoint(tmp_path, messages.append)
    assert folder.parent == tmp_path and len(messages) == 1
    # the official INT8 layout: same config.json and same keys/dtypes/shapes as the conformance checkpoint
    assert json.loads((folder / "config.json").read_text()) == json.loads((conformance_dir / "int8" / "config.json").read_text())
    ours = torch.load(folder / "pytorch_model.bin", weights_only=True, mmap=True)
    ref = torch.load(conformance_dir / "int8" / "pytorch_model.bin", weights_only=True, mmap=True)
    assert [(k, v.dtype, v.shape) for k, v in ours.items()] == [(k, v.dtype, v.shape) for k, v in ref.items()]

    stamp = (folder / "pytorch_model.bin").stat().st_mtime_ns
    assert cli_demo.demo_checkpoint(tmp_path, messages.append) == folder
    assert len(messages) == 1 and (folder / "pytorch_model.bin").stat().st_mtime_ns == stamp  # reused
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temp folders left behind


@pytest.mark.parametrize("damage", ["delete weights", "other config", "no marker", "older generator"])
def test_demo_checkpoint_is_rewritten_when_incomplete_or_stale(tmp_path, damage):
    folder = cli_demo.demo_checkpoint(tmp_path)
    if damage == "delete weights":
        (folder / "pytorch_model.bin").unlink()
    elif damage == "other config":
        (folder / "config.json").write_text(json.dumps(mc.make_config("tiny", 4)))
    elif damage == "no marker":
        (folder / ".complete").unlink()
    else:  # written by another version of tools/make_checkpoint.py
        (folder / ".complete").write_text("0" * 40)
    messages = []
    assert cli_demo.demo_checkpoint(tmp_path, messages.append) == folder
    assert len(messages) == 1
    assert json.loads((folder / "config.json").read_text()) == mc.make_config("tiny", 8)
    assert len(torch.load(folder / "pytorch_model.bin", weights_only=True, mmap=True)) == 480


# --- the code overlay ---------------------------------------------------------------------


@pytest.fixture
def code_dir(tmp_path):
    """A stand-in for the repository: package files with relative imports, distinct contents."""
    src = tmp_path / "repo"
    src.mkdir()
    (src / "configuration_chatglm.py").write_text("# ours: configuration\n")
    (src / "modeling_chatglm.py").write_text("from .configuration_chatglm import X\nfrom .quantization import Y\n")
    (src / "quantization.py").write_text("# ours: quantization\n")
    (src / "tokenization_chatglm.py").write_text("# ours: tokenization\n")
    (src / "ice_text.model").write_bytes(b"sp-model")
    (src / "tokenizer_config.json").write_text("{}")
    return src


CODE = ["configuration_chatglm.py", "modeling_chatglm.py", "quantization.py", "tokenization_chatglm.py"]


@pytest.fixture
def weights_dir(tmp_path):
    d = tmp_path / "weights" / "chatglm-6b-int8"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"weights")
    return d


def test_overlay_links_weights_and_copies_our_code(tmp_path, code_dir, weights_dir):
    cache = tmp_path / "cache"
    folder = cli_demo.model_folder(weights_dir, "repo", cache, code_dir)
    assert folder == cli_demo.overlay_dir(cache, weights_dir.resolve()) and folder.parent == cache / "overlays"
    for name in ("config.json", "pytorch_model.bin"):
        assert os.readlink(folder / name) == str(weights_dir.resolve() / name)
    for name in CODE:
        assert not (folder / name).is_symlink() and (folder / name).read_bytes() == (code_dir / name).read_bytes()
    for name in ("ice_text.model", "tokenizer_config.json"):  # the weights folder has none: ours
        assert os.readlink(folder / name) == str(code_dir / name)


def test_overlay_replaces_foreign_code_but_keeps_the_folders_tokenizer_files(tmp_path, code_dir, weights_dir):
    (weights_dir / "modeling_chatglm.py").write_text("# THUDM's original\n")
    (weights_dir / "ice_text.model").write_bytes(b"their sp-model")
    folder = cli_demo.model_folder(weights_dir, "repo", tmp_path / "cache", code_dir)
    assert folder != weights_dir.resolve()
    assert (folder / "modeling_chatglm.py").read_bytes() == (code_dir / "modeling_chatglm.py").read_bytes()
    assert os.readlink(folder / "ice_text.model") == str(weights_dir.resolve() / "ice_text.model")


def test_overlay_follows_changes_of_the_weights_folder(tmp_path, code_dir, weights_dir):
    cache = tmp_path / "cache"
    folder = cli_demo.model_folder(weights_dir, "repo", cache, code_dir)
    (folder / "quantization.py").write_text("# stale copy\n")
    (weights_dir / "pytorch_model.bin").unlink()
    (weights_dir / "model.safetensors").write_bytes(b"st")
    assert cli_demo.model_folder(weights_dir, "repo", cache, code_dir) == folder
    assert not (folder / "pytorch_model.bin").exists() and not (folder / "pytorch_model.bin").is_symlink()
    assert os.readlink(folder / "model.safetensors") == str(weights_dir.resolve() / "model.safetensors")
    assert (folder / "quantization.py").read_bytes() == (code_dir / "quantization.py").read_bytes()


def test_complete_folder_with_our_code_is_used_directly(tmp_path, code_dir, weights_dir):
    for name in mc.package_files(code_dir):
        (weights_dir / name).write_bytes((code_dir / name).read_bytes())
    assert cli_demo.model_folder(weights_dir, "repo", tmp_path / "cache", code_dir) == weights_dir.resolve()
    assert not (tmp_path / "cache").exists()


def test_overlays_of_different_folders_do_not_collide(tmp_path):
    a, b = tmp_path / "x" / "int8", tmp_path / "y" / "int8"
    assert cli_demo.overlay_dir(tmp_path, a) != cli_demo.overlay_dir(tmp_path, b)
    assert cli_demo.overlay_dir(tmp_path, a) == cli_demo.overlay_dir(tmp_path, a)


def test_code_folder_mode_uses_the_folder_as_is_or_says_what_is_missing(tmp_path, code_dir, weights_dir):
    with pytest.raises(cli_demo.DemoError, match="modeling_chatglm.py"):
        cli_demo.model_folder(weights_dir, "folder", tmp_path / "cache", code_dir)
    for name in cli_demo.ENTRY_CODE:
        (weights_dir / name).write_text("# theirs\n")
    assert cli_demo.model_folder(weights_dir, "folder", tmp_path / "cache", code_dir) == weights_dir.resolve()


@pytest.mark.parametrize("problem, message", [
    ("missing", "no such folder"), ("no config", "config.json"), ("no weights", "no weights")])
def test_bad_model_folders_raise_errors_that_say_what_is_wrong(tmp_path, code_dir, weights_dir, problem, message):
    if problem == "missing":
        weights_dir = tmp_path / "nowhere"
    elif problem == "no config":
        (weights_dir / "config.json").unlink()
    else:
        (weights_dir / "pytorch_model.bin").unlink()
    with pytest.raises(cli_demo.DemoError, match=message):
        cli_demo.model_folder(weights_dir, "repo", tmp_path / "cache", code_dir)


def test_overlay_refuses_an_incomplete_checkout(tmp_path, code_dir, weights_dir):
    (code_dir / "quantization.py").unlink()
    with pytest.raises(cli_demo.DemoError, match="quantization.py"):
        cli_demo.model_folder(weights_dir, "repo", tmp_path / "cache", code_dir)


def test_main_reports_folder_problems_without_a_traceback(tmp_path, monkeypatch, capsys, conformance_dir):
    monkeypatch.setenv("CHATGLM_CACHE_DIR", str(tmp_path))
    assert cli_demo.main(["--model", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli_demo.main(["--model", str(conformance_dir / "int8"), "--code", "folder", "--device", "cpu"]) == 2
    assert "lacks" in capsys.readouterr().err


def test_cuda_request_without_cuda_says_use_cpu(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CHATGLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_demo.main(["--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err
    assert cli_demo.pick_device("auto") == "cpu"


# --- streaming output ---------------------------------------------------------------------


@pytest.mark.parametrize("text, settled", [
    ("你好", "你好"),
    ("Hello,", "Hello"),  # becomes "，" if a CJK char follows
    ("好?!", "好"),
    ("今年是[[训练", "今年是"),  # may become "2023年"
    ("a [", "a "),
    ("天气,[[", "天气"),
    ("abc\ufffd", "abc"),  # an unfinished multi-byte character
    ("[[训练时间]]", "[[训练时间]]"),  # complete: process_response would already have replaced it
    ("", ""),
])
def test_settled_length_holds_back_what_post_processing_may_still_change(text, settled):
    assert text[:cli_demo.settled_length(text)] == settled


def printed(stream):
    out = io.StringIO()
    printer = cli_demo.StreamPrinter(out)
    for text in stream:
        printer.update(text)
    printer.finish(stream[-1])
    return out.getvalue()


def test_stream_printer_prints_each_piece_once_and_ends_with_the_answer():
    from chatglm6b.modeling_chatglm import process_response

    # raw decoded text growing token by token, post-processed as stream_chat does (SPEC §7)
    raw = ["你好", "你好,", "你好,我", "你好,我是", "你好,我是[[", "你好,我是[[训练时间", "你好,我是[[训练时间]]", "你好,我是[[训练时间]]的?"]
    stream = [process_response(r) for r in raw]
    assert stream[-1] == "你好，我是2023年的？"
    assert printed(stream) == "你好，我是2023年的？\n"


def test_stream_printer_on_the_golden_stream(golden):
    stream = golden[0]["chat"]["stream"]
    assert printed(stream) == stream[-1] + "\n"


def test_stream_printer_reprints_when_shown_text_changes():
    assert printed(["ab", "abc", "aXc"]) == "ab" + "c" + "\naXc\n"


# --- the real script ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    """Environment for the script: caches (demo checkpoint, overlays, compiled kernels, transformers'
    remote-code modules) in one temp folder per module, so kernels compile once, not per run."""
    root = tmp_path_factory.mktemp("demo-env")
    return dict(os.environ, CHATGLM_CACHE_DIR=str(root / "cache"), HF_MODULES_CACHE=str(root / "hf-modules"),
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONIOENCODING="utf-8")


def run_demo(args, env, cwd, stdin=None, timeout=400):
    return subprocess.run([sys.executable, str(DEMO), *args], input=stdin, capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=timeout, cwd=str(cwd))


def answers(stdout):
    """The answers of an interactive session, in order."""
    return [part.split("\n用户：")[0].rstrip("\n") for part in stdout.split("ChatGLM-6B：")[1:]]


@pytest.mark.slow
def test_smoke_prompt_with_the_random_demo_checkpoint(tmp_path, demo_env):
    run = run_demo(["--prompt", "你好", "--greedy", "--max-length", "30"], demo_env, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "RANDOM checkpoint" in run.stderr and "meaningless" in run.stderr
    assert "writing a random" in run.stderr
    assert run.stdout.endswith("\n") and run.stdout.count("\n") == 1
    assert run.stdout.strip()  # the random weights are tuned to produce tokens, not to echo <sop>
    again = run_demo(["--prompt", "你好", "--greedy", "--max-length", "30"], demo_env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "writing a random" not in again.stderr  # the checkpoint is cached
    assert again.stdout == run.stdout  # greedy: same answer


# stream_chat, like the original, never yields the step that reaches max_length (the golden
# stream of "Hello" at max_length 30 has 26 strings for 27 new tokens). Streamed at 41, "你好"
# therefore shows exactly the tokens of the golden chat("你好", max_length=40).
ROUND1_MAX_LENGTH = "41"


@pytest.mark.slow
def test_prompt_answer_equals_the_original_code_on_the_conformance_checkpoint(tmp_path, demo_env, conformance_dir,
                                                                              golden):
    run = run_demo(["--model", str(conformance_dir / "int8"), "--prompt", "你好", "--greedy",
                    "--max-length", ROUND1_MAX_LENGTH, "--device", "cpu"], demo_env, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == golden[0]["chat"]["round1"] + "\n"
    assert "RANDOM" not in run.stderr


@pytest.mark.slow
def test_streamed_answer_equals_the_original_stream(tmp_path, demo_env, conformance_dir, golden):
    run = run_demo(["--model", str(conformance_dir / "int8"), "--prompt", "Hello", "--greedy", "--max-length", "30"],
                   demo_env, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == golden[0]["chat"]["stream"][-1] + "\n"


@pytest.mark.slow
def test_interactive_clear_forgets_the_history(tmp_path, demo_env, conformance_dir, golden):
    run = run_demo(["--model", str(conformance_dir / "int8"), "--greedy", "--max-length", ROUND1_MAX_LENGTH],
                   demo_env, tmp_path, stdin="你好\nclear\n你好\nexit\n")
    assert run.returncode == 0, run.stderr
    assert "(history cleared)" in run.stdout
    # with the history cleared the second "你好" is a first round again: the golden first answer twice
    assert answers(run.stdout) == [golden[0]["chat"]["round1"]] * 2


def test_chat_loop_passes_the_history_to_the_model(tmp_path, conformance_dir):
    """The in-process loop with the real model: each answer is what stream_chat gives for that history."""
    folder = cli_demo.model_folder(conformance_dir / "int8", "repo", tmp_path)
    tokenizer, model = cli_demo.load_model(folder, "cpu", torch.float32)
    # max_new_tokens, not max_length: the random model never stops by itself, so a second round's
    # prompt (with the first answer in it) would not fit into the same max_length
    gen = dict(max_new_tokens=10, do_sample=False)
    lines = iter(["你好", "  ", "晚上睡不着应该怎么办"])  # blank lines are ignored; EOF ends the chat
    out = io.StringIO()

    def read(prompt):  # what input() does: show the prompt, return a line, EOFError at the end
        out.write(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    history = cli_demo.chat_loop(model, tokenizer, gen, read=read, out=out)

    def last(stream):
        *_, final = stream
        return final

    r1, h1 = last(model.stream_chat(tokenizer, "你好", history=[], **gen))
    r2, h2 = last(model.stream_chat(tokenizer, "晚上睡不着应该怎么办", history=h1, **gen))
    assert h1 == [("你好", r1)] and r1
    assert answers(out.getvalue()) == [r1, r2]
    assert history == h2 == h1 + [("晚上睡不着应该怎么办", r2)]
    fresh, _ = last(model.stream_chat(tokenizer, "晚上睡不着应该怎么办", history=[], **gen))
    assert fresh != r2  # so the check above really depends on the history being passed
