"""Encode throughput of ChatGLMTokenizer relative to raw SentencePiece, on ~1 MB of mixed text.

    python benchmarks/bench_tokenizer.py [--mb 1.0] [--repeats 5]

The text (Chinese prose, English prose and indented code with tabs, newlines and long space runs) is
generated deterministically from a fixed seed. Reported: best-of-N wall time of
  * raw    -- ``sp.encode(text)`` of the bare SentencePieceProcessor (no whitespace mapping, no HF),
  * ours   -- ``tokenizer.encode(text)`` (whitespace mapping, special-token handling, [gMASK] <sop>),
  * batch  -- ``tokenizer(docs)["input_ids"]`` on the same text cut into ~1 KB documents,
  * naive  -- 79 ``str.replace`` passes for the whitespace rule + ``sp.encode`` (reference point),
and the ratios raw_time / ours_time (1.0 = as fast as raw SentencePiece).
"""
import argparse
import os
import platform
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ZH_WORDS = (
    "我们 今天 天气 非常 好 机器 学习 人工智能 模型 训练 数据 中文 分词 问题 答案 时间 晚上 睡不着 应该 怎么办 "
    "北京 上海 大学 学生 老师 研究 方法 结果 系统 用户 需要 可以 因为 所以 但是 如果 已经 开始 工作 生活 "
    "世界 国家 经济 发展 技术 公司 产品 服务 市场 社会 文化 历史 医生 医院 健康 饮食 运动 旅行 朋友 家庭"
).split()
ZH_PUNCT = ["，", "。", "！", "？", "；", "：", "、"]
EN_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can out up about who some "
    "language model training data tokenizer vocabulary sentence benchmark throughput performance python network "
    "attention transformer gradient optimizer learning rate batch sequence position embedding layer output"
).split()
CODE_LINES = [
    "def {name}(x, y=None):",
    "    \"\"\"Return the {name} of x.\"\"\"",
    "    if y is None:",
    "        y = x * 2  # default",
    "    for i in range({n}):",
    "        total += x[i] * y[i]",
    "\treturn total",
    "class {Name}(object):",
    "    value = {n}          # aligned comment",
    "    items = [1, 2, 3]                                                                                 # long pad",
    "",
]


def make_text(target_bytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    chunks, size = [], 0
    while size < target_bytes:
        kind = rng.random()
        if kind < 0.4:
            words = [rng.choice(ZH_WORDS) + (rng.choice(ZH_PUNCT) if rng.random() < 0.15 else "") for _ in range(60)]
            chunk = "".join(words) + "\n\n"
        elif kind < 0.75:
            words = [rng.choice(EN_WORDS) for _ in range(80)]
            chunk = " ".join(words).capitalize() + ".\n"
        else:
            name = rng.choice(EN_WORDS)
            lines = [rng.choice(CODE_LINES).format(name=name, Name=name.title(), n=rng.randint(1, 999)) for _ in range(12)]
            chunk = "\n".join(lines) + "\n"
        chunks.append(chunk)
        size += len(chunk.encode("utf-8"))
    return "".join(chunks)


def naive_pipeline(sp, text: str):
    """The straightforward reading of the whitespace rule: 2 + 79 str.replace passes, then SentencePiece."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(80, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return sp.encode(text)


def best_times(variants: dict, repeats: int) -> dict:
    """Best wall time per variant; runs are interleaved so background load hits all variants alike."""
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0, help="text size in MB (default 1.0)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant; best is reported")
    args = parser.parse_args()

    import _package  # noqa: F401  (registers the repo root as package `chatglm6b`)
    import transformers
    from chatglm6b.tokenization_chatglm import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer(vocab_file=str(ROOT / "ice_text.model"))
    sp = tokenizer.sp_tokenizer.text_tokenizer.sp
    text = make_text(int(args.mb * 1_000_000))
    docs, start = [], 0
    while start < len(text):  # ~1 KB documents cut at line ends
        end = text.find("\n", start + 700)
        end = len(text) if end < 0 else end + 1
        docs.append(text[start:end])
        start = end

    raw_ids = sp.encode(text)
    our_ids = tokenizer.encode(text)
    # Same ids as the plain rule (the text contains no special-token strings).
    assert our_ids == naive_pipeline(sp, text) + [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    times = best_times(
        {
            "raw": lambda: sp.encode(text),
            "ours": lambda: tokenizer.encode(text),
            "batch": lambda: tokenizer(docs)["input_ids"],
            "naive": lambda: naive_pipeline(sp, text),
        },
        args.repeats,
    )
    t_raw, t_ours, t_batch, t_naive = times["raw"], times["ours"], times["batch"], times["naive"]

    mb = len(text.encode("utf-8")) / 1e6
    print(f"text: {mb:.2f} MB, {len(text)} chars, {len(docs)} documents; transformers {transformers.__version__}, "
          f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"tokens: raw SentencePiece {len(raw_ids)}, ChatGLMTokenizer {len(our_ids)}")
    print(f"raw sp.encode            {t_raw * 1e3:8.1f} ms  {mb / t_raw:6.1f} MB/s")
    print(f"tokenizer.encode(text)   {t_ours * 1e3:8.1f} ms  {mb / t_ours:6.1f} MB/s  ratio {t_raw / t_ours:.2f}x")
    print(f"tokenizer(docs) batch    {t_batch * 1e3:8.1f} ms  {mb / t_batch:6.1f} MB/s  ratio {t_raw / t_batch:.2f}x")
    print(f"79x str.replace + sp     {t_naive * 1e3:8.1f} ms  {mb / t_naive:6.1f} MB/s  ratio {t_raw / t_naive:.2f}x"
          "  (whitespace rule done naively, no transformers; for comparison)")


if __name__ == "__main__":
    main()
