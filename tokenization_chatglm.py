"""Tokenizer for ChatGLM-6B.

The vocabulary is the SentencePiece unigram model ``ice_text.model`` (130,344 pieces). On top of
SentencePiece, ChatGLM maps newlines, tabs and runs of spaces to dedicated pieces before encoding and
back after decoding, appends ``[gMASK] <sop>`` to every prompt, and pads on the left with 2-D position
ids and a ``[batch, 1, seq, seq]`` boolean attention mask (``True`` = masked).

The behaviour is pinned here rather than inherited from a transformers version, so results are the
same on transformers 4.27 and 5.x (special-token splitting, clean-up of spaces before punctuation,
padding output).
"""

import inspect
import operator
import os
import re
import shutil
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.utils import PaddingStrategy

VOCAB_FILE_NAME = "ice_text.model"
VOCAB_FILES_NAMES = {"vocab_file": VOCAB_FILE_NAME}

# The released embedding has 130,528 rows for 130,344 pieces: the last 184 rows belong to no piece.
# The model can still sample them, so decoding them must work (they decode to "").
UNUSED_EMBEDDING_ROWS = 184

# Pieces a ChatGLM vocabulary must contain; their absence means the file is not (all of) ice_text.model.
_REQUIRED_PIECES = ("<unk>", "<pad>", "<n>", "[MASK]", "[gMASK]", "<sop>", "<eop>", "<|tab|>", "<|blank_80|>")

_LFS_POINTER_PREFIX = b"version https://git-lfs"
_MAX_BLANK = 80

# One pass over the text for all whitespace that ChatGLM encodes with dedicated pieces.
_SPACES_RE = re.compile(r" {2,}")
# One pass back. Only <|blank_2|> .. <|blank_80|> exist in the vocabulary.
_WHITESPACE_PIECE_RE = re.compile(r"<n>|<\|tab\|>|<\|blank_([2-9]|[1-7][0-9]|80)\|>")
_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")

# transformers 4.27 cleaned these up after decoding; the reference outputs were made with it, so we
# apply the same replacements, in the same order, on every version.
_CLEANUP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _spaces_to_pieces(count: int) -> str:
    """A run of ``count`` >= 2 spaces as ChatGLM writes it: <|blank_80|> greedily, then the rest."""
    full, rest = divmod(count, _MAX_BLANK)
    tail = "<|blank_%d|>" % rest if rest >= 2 else " " * rest
    return "<|blank_80|>" * full + tail


_WHITESPACE_TABLE = {"\n": "<n>", "\t": "<|tab|>"}
_WHITESPACE_TABLE.update({" " * n: _spaces_to_pieces(n) for n in range(2, 257)})


def _whitespace_match(match: "re.Match") -> str:
    run = match.group()
    piece = _WHITESPACE_TABLE.get(run)
    return piece if piece is not None else _spaces_to_pieces(len(run))


def _whitespace_piece_match(match: "re.Match") -> str:
    blanks = match.group(1)
    if blanks is not None:
        return " " * int(blanks)
    return "\n" if match.group() == "<n>" else "\t"


def encode_whitespace(text: str) -> str:
    """``\\n`` -> ``<n>``, ``\\t`` -> ``<|tab|>``, runs of >= 2 spaces -> ``<|blank_N|>`` (greedy from 80)."""
    # Newlines and tabs by str.replace (their pieces hold no spaces, so no run of spaces changes), then
    # one regex pass over the runs of spaces: a third less time than one pass with a callback for all.
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    return _SPACES_RE.sub(_whitespace_match, text) if "  " in text else text


def decode_whitespace(text: str) -> str:
    """Inverse of :func:`encode_whitespace` on decoded text."""
    if "<" not in text:
        return text
    return _WHITESPACE_PIECE_RE.sub(_whitespace_piece_match, text)


def clean_up_spaces(text: str) -> str:
    """Remove the space SentencePiece leaves before punctuation and English contractions."""
    for old, new in _CLEANUP_REPLACEMENTS:
        if old in text:
            text = text.replace(old, new)
    return text


class IceTextModelError(ValueError):
    """``ice_text.model`` is missing or unusable."""


def _fix_hint(path: str) -> str:
    return (
        f"Download the real file again from the model repository (in a git clone run `git lfs install && "
        f"git lfs pull`, or use huggingface_hub.snapshot_download) and make sure {VOCAB_FILE_NAME} sits next to "
        f"tokenizer_config.json. Offending path: {path!r}."
    )


def load_ice_text_model(path: Optional[str]) -> spm.SentencePieceProcessor:
    """Load ``ice_text.model`` with checks that turn the usual download problems into clear errors."""
    if path is None:
        raise IceTextModelError(
            f"The tokenizer needs its vocabulary file {VOCAB_FILE_NAME}, but none was found. " + _fix_hint("<none>")
        )
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise IceTextModelError(f"{VOCAB_FILE_NAME} not found at {path!r}. " + _fix_hint(path))
    with open(path, "rb") as handle:
        data = handle.read()
    if not data:
        raise IceTextModelError(f"{VOCAB_FILE_NAME} at {path!r} is empty (0 bytes). " + _fix_hint(path))
    if data.startswith(_LFS_POINTER_PREFIX):
        raise IceTextModelError(
            f"{VOCAB_FILE_NAME} at {path!r} is a Git LFS pointer ({len(data)} bytes of text), not the "
            f"SentencePiece model: the repository was cloned without Git LFS. " + _fix_hint(path)
        )
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError depending on the build
        raise IceTextModelError(
            f"{VOCAB_FILE_NAME} at {path!r} ({len(data)} bytes) is not a readable SentencePiece model; it is "
            f"probably truncated or corrupted ({exc}). " + _fix_hint(path)
        ) from None
    missing = [p for p in _REQUIRED_PIECES if processor.piece_to_id(p) == processor.unk_id() and p != "<unk>"]
    if missing:
        raise IceTextModelError(
            f"{VOCAB_FILE_NAME} at {path!r} loads but lacks the ChatGLM pieces {missing} "
            f"({processor.get_piece_size()} pieces; ChatGLM-6B has 130344). " + _fix_hint(path)
        )
    return processor


class IceTextVocab:
    """The SentencePiece side: ``.sp`` is the ``SentencePieceProcessor`` (converters read it)."""

    def __init__(self, sp: spm.SentencePieceProcessor):
        self.sp = sp
        self.num_pieces = sp.get_piece_size()
        self.pieces: List[str] = list(sp.id_to_piece(list(range(self.num_pieces))))
        self.piece_to_id: Dict[str, int] = {piece: i for i, piece in enumerate(self.pieces)}


class IceTokenizer:
    """ChatGLM's text <-> id mapping without any transformers machinery (``tokenizer.sp_tokenizer``).

    Ids are SentencePiece ids shifted by ``num_image_tokens`` (0 for ChatGLM-6B).
    """

    def __init__(self, vocab_file: Optional[str], num_image_tokens: int = 0):
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be a non-negative int (0 for ChatGLM-6B), got {num_image_tokens!r}")
        self.vocab_file = vocab_file
        self.text_tokenizer = IceTextVocab(load_ice_text_model(vocab_file))
        self.num_image_tokens = num_image_tokens
        self.num_tokens = num_image_tokens + self.text_tokenizer.num_pieces

    # ---- text -> pieces / ids -------------------------------------------------------------------
    @staticmethod
    def _prepare(text: str) -> str:
        text = encode_whitespace(text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates have no UTF-8 form; SentencePiece cannot take them.
            text = _LONE_SURROGATE_RE.sub("\ufffd", text)
        return text

    def encode(self, text: str) -> List[int]:
        ids = self.text_tokenizer.sp.encode(self._prepare(text))
        if self.num_image_tokens:
            ids = [i + self.num_image_tokens for i in ids]
        return ids

    def tokenize(self, text: str) -> List[str]:
        return self.text_tokenizer.sp.encode(self._prepare(text), out_type=str)

    # ---- ids / pieces -> text -------------------------------------------------------------------
    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids; image-token ids and unused embedding rows contribute nothing."""
        offset, n = self.num_image_tokens, self.text_tokenizer.num_pieces
        sp_ids = [i - offset for i in ids if offset <= i < offset + n]
        return decode_whitespace(self.text_tokenizer.sp.decode(sp_ids))

    def decode_tokens(self, tokens: Sequence[str]) -> str:
        kept = [t for t in tokens if t and not self._is_image_token(t)]
        return decode_whitespace(self.text_tokenizer.sp.decode_pieces(kept))

    # ---- single items ---------------------------------------------------------------------------
    def _is_image_token(self, token: str) -> bool:
        return self.num_image_tokens > 0 and token.startswith("<image_") and token.endswith(">")

    def id_to_token(self, index: int) -> str:
        if 0 <= index < self.num_image_tokens:
            return f"<image_{index}>"
        local = index - self.num_image_tokens
        if 0 <= local < self.text_tokenizer.num_pieces:
            return self.text_tokenizer.pieces[local]
        return ""  # an unused embedding row

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of ``token``, or None when it is not a piece of the vocabulary."""
        local = self.text_tokenizer.piece_to_id.get(token)
        if local is not None:
            return local + self.num_image_tokens
        if self._is_image_token(token):
            number = token[len("<image_"):-1]
            if number.isdigit() and int(number) < self.num_image_tokens:
                return int(number)
        return None

    def __getitem__(self, item: Union[int, str]) -> Union[str, int]:
        if isinstance(item, str):
            index = self.token_to_id(item)
            return self.num_image_tokens + self.text_tokenizer.sp.unk_id() if index is None else index
        return self.id_to_token(operator.index(item))


def _as_id(value) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"token ids must be integers, got {value!r} ({type(value).__name__}); pass a list of ints, "
            f"a 1-D numpy array or a 1-D torch tensor"
        ) from None


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM-6B tokenizer (``ice_text.model``).

    * ``tokenizer(text)`` -> ``input_ids`` ending in ``[gMASK] <sop>``; a pair gives
      ``a [gMASK] <sop> b <eop>``.
    * With padding (left only) the output also holds ``attention_mask`` (bool ``[1, s, s]`` per row,
      ``True`` = masked) and ``position_ids`` (``[2, s]`` per row), as the model expects. Without padding
      only ``input_ids`` are returned. Any ``attention_mask``/``position_ids`` given to :meth:`pad` are
      rebuilt from the ids (leading ``<pad>`` ids count as padding, so re-padding is stable).
    * The special tokens ``<sop> <eop> <pad> <unk> [MASK]`` (and tokens added with ``add_tokens``) written
      in text map to their ids, and whitespace next to them is dropped, as the reference tokenizer did;
      ``[gMASK]`` in text is ordinary text.
    * Decoding never fails for ids of the model's output range; unused embedding rows decode to "".
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(
        self,
        vocab_file: Optional[str] = None,
        do_lower_case: bool = False,
        remove_space: bool = False,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        end_token: str = "</s>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        padding_side: str = "left",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        num_image_tokens: int = 0,
        **kwargs,
    ):
        _check_padding_side(padding_side)
        # transformers 5 routes unknown "*_token" keys of tokenizer_config.json through this dict and
        # would otherwise register them as special tokens ("[gMASK]" would then be split out of text).
        extra_named = dict(kwargs.pop("model_specific_special_tokens", None) or {})
        gmask_token = str(extra_named.pop("gmask_token", gmask_token))
        end_token = str(extra_named.pop("end_token", end_token))
        if extra_named:
            kwargs["model_specific_special_tokens"] = extra_named
        # Our decode cleans up spaces before punctuation by default on every transformers version.
        kwargs.setdefault("clean_up_tokenization_spaces", True)

        # Everything the base class may touch during its __init__ (get_vocab, token ids) exists first.
        self.vocab_file = vocab_file
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.num_image_tokens = num_image_tokens
        self.gmask_token = gmask_token
        self.end_token = end_token
        self.sp_tokenizer = IceTokenizer(vocab_file, num_image_tokens=num_image_tokens)
        self._no_split_cache: Tuple[Optional[frozenset], Optional["re.Pattern"]] = (None, None)

        super().__init__(
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            bos_token=bos_token,
            eos_token=eos_token,
            mask_token=mask_token,
            padding_side=padding_side,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=num_image_tokens,
            **kwargs,
        )
        # Keep the official config keys when saving.
        self.init_kwargs["gmask_token"] = gmask_token
        self.init_kwargs["end_token"] = end_token
        if not hasattr(self, "chat_template"):  # transformers < 4.34 has no chat templates
            self.chat_template = kwargs.get("chat_template")

    # ------------------------------------------------------------------------------------------------
    # Vocabulary
    # ------------------------------------------------------------------------------------------------
    @property
    def padding_side(self) -> str:
        return "left"

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        _check_padding_side(value)

    @property
    def vocab_size(self) -> int:
        return self.sp_tokenizer.num_tokens

    def get_vocab(self) -> Dict[str, int]:
        tokenizer = self.sp_tokenizer
        vocab = {f"<image_{i}>": i for i in range(tokenizer.num_image_tokens)}
        if tokenizer.num_image_tokens:
            vocab.update({p: i + tokenizer.num_image_tokens for p, i in tokenizer.text_tokenizer.piece_to_id.items()})
        else:
            vocab.update(tokenizer.text_tokenizer.piece_to_id)
        vocab.update(self._added_vocab())
        return vocab

    def _added_vocab(self) -> Dict[str, int]:
        # 4.27 keeps it in `added_tokens_encoder`, 5.x in `_added_tokens_encoder`; both expose get_added_vocab.
        try:
            return dict(self.get_added_vocab())
        except AttributeError:  # called before the base class set it up
            return {}

    @property
    def gmask_token_id(self) -> int:
        return self._token_to_id(self.gmask_token)

    @property
    def end_token_id(self) -> int:
        return self._token_to_id(self.end_token)

    def _token_to_id(self, token: str) -> int:
        index = self.sp_tokenizer.token_to_id(token)
        if index is None:
            index = self._added_vocab().get(token)
        if index is None:
            index = self.sp_tokenizer.token_to_id(str(self.unk_token)) if self.unk_token is not None else 0
        return index

    def _convert_token_to_id(self, token: str) -> int:
        return self._token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        index = _as_id(index)
        self._check_id(index)
        return self.sp_tokenizer.id_to_token(index)

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str], None]) -> Union[int, List[int], None]:
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        table = self.sp_tokenizer.text_tokenizer.piece_to_id
        offset = self.sp_tokenizer.num_image_tokens
        ids = [table.get(t, -1) for t in tokens]
        for i, index in enumerate(ids):
            if index < 0:
                ids[i] = self._token_to_id(tokens[i])
            elif offset:
                ids[i] = index + offset
        return ids

    @property
    def _id_limit(self) -> int:
        """Ids below this are decodable: the vocabulary plus the unused embedding rows after it."""
        return self.vocab_size + UNUSED_EMBEDDING_ROWS

    def _check_id(self, index: int) -> None:
        if 0 <= index < self._id_limit or index in self._added_vocab().values():
            return
        raise ValueError(
            f"token id {index} is outside the ChatGLM vocabulary: ids must be in [0, {self._id_limit}) (the "
            f"model's embedding rows). Check that these ids come from this tokenizer/model."
        )

    # ------------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------------
    def _no_split_pattern(self) -> Optional["re.Pattern"]:
        tokens = set(self.all_special_tokens)
        tokens.update(self._added_vocab())
        tokens.update(getattr(self, "unique_no_split_tokens", ()) or ())
        tokens.discard("")
        key = frozenset(tokens)
        cached_key, pattern = self._no_split_cache
        if cached_key != key:
            alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
            pattern = re.compile(f"({alternatives})") if alternatives else None
            self._no_split_cache = (key, pattern)
        return pattern

    def _segments(self, text, kwargs: dict):
        """Yield ``(is_special, string)`` for ``text``: special/added tokens and the text between them."""
        if not isinstance(text, str):
            raise TypeError(
                f"ChatGLMTokenizer encodes str, got {type(text).__name__}; pass a string, a list of strings "
                f"(batch), or token ids"
            )
        _check_padding_side(kwargs.pop("padding_side", None))
        memo = kwargs.pop("_no_split_memo", None)  # (pattern,): computed once for a whole batch
        split_special = kwargs.pop("split_special_tokens", getattr(self, "split_special_tokens", False))
        text, _unused = self.prepare_for_tokenization(text, **kwargs)
        pattern = None if split_special else memo[0] if memo is not None else self._no_split_pattern()
        parts = pattern.split(text) if pattern is not None else [text]
        # parts alternates text, token, text, ...; whitespace next to a token is dropped (as the
        # reference tokenizer did on transformers 4.27).
        for i in range(1, len(parts), 2):
            parts[i - 1] = parts[i - 1].rstrip()
            parts[i + 1] = parts[i + 1].lstrip()
        for i, part in enumerate(parts):
            if i % 2:
                yield True, part
            elif part:
                yield False, self._normalize(part)

    def _normalize(self, text: str) -> str:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return text

    def tokenize(self, text: str, **kwargs) -> List[str]:
        """Pieces of ``text`` (no ``[gMASK] <sop>``; those are added by ``__call__``/``encode``)."""
        tokens: List[str] = []
        for is_special, part in self._segments(text, kwargs):
            if is_special:
                tokens.append(part)
            else:
                tokens.extend(self.sp_tokenizer.tokenize(part))
        return tokens

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        return self.sp_tokenizer.tokenize(self._normalize(text))

    def _text_to_ids(self, text: str, kwargs: dict) -> List[int]:
        """``convert_tokens_to_ids(tokenize(text))`` without building piece strings (much faster)."""
        ids: List[int] = []
        for is_special, part in self._segments(text, kwargs):
            if is_special:
                ids.append(self._token_to_id(part))
            else:
                ids.extend(self.sp_tokenizer.encode(part))
        return ids

    # transformers turns str inputs into ids through tokenize() + convert_tokens_to_ids(); we hand it
    # the ids directly (same result). Non-str inputs (ids, pre-split words) go through unchanged.
    def _str_to_ids(self, value, kwargs: dict):
        if isinstance(value, str):
            ids = self._text_to_ids(value, dict(kwargs))
            return ids if ids else value  # transformers rejects an empty id list, but encodes "" fine
        return value

    def _pair_to_ids(self, value, kwargs: dict):
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value):
            return type(value)(self._str_to_ids(v, kwargs) for v in value)
        return self._str_to_ids(value, kwargs)

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        if not args and not kwargs.get("is_split_into_words") and not kwargs.get("sanitize_control_tokens"):
            extra = _tokenize_kwargs(super()._encode_plus, kwargs)
            batched = _BATCH_IN_ENCODE_PLUS and isinstance(text, (list, tuple)) and bool(text)
            if batched and isinstance(text[0], (str, list, tuple)):
                extra = dict(extra, _no_split_memo=(self._no_split_pattern(),))
                text = [self._pair_to_ids(t, extra) for t in text]
                if isinstance(text_pair, (list, tuple)):
                    text_pair = [self._str_to_ids(t, extra) for t in text_pair]
            elif not isinstance(text, (list, tuple)):
                text = self._str_to_ids(text, extra)
                text_pair = self._str_to_ids(text_pair, extra)
        return super()._encode_plus(text, text_pair, *args, **kwargs)

    def _batch_encode_plus(self, batch_text_or_text_pairs, *args, **kwargs):  # transformers 4.x only
        if not args and not kwargs.get("is_split_into_words"):
            extra = _tokenize_kwargs(super()._batch_encode_plus, kwargs)
            extra["_no_split_memo"] = (self._no_split_pattern(),)
            converted = []
            for item in batch_text_or_text_pairs:
                if isinstance(item, str):
                    ids = self._str_to_ids(item, extra)
                    converted.append(item if isinstance(ids, str) else (ids, None))
                else:
                    converted.append(self._pair_to_ids(item, extra))
            batch_text_or_text_pairs = converted
        return super()._batch_encode_plus(batch_text_or_text_pairs, *args, **kwargs)

    def build_inputs_with_special_tokens(
        self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None
    ) -> List[int]:
        ids = list(token_ids_0) + [self.gmask_token_id, self._token_to_id(str(self.bos_token))]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self._token_to_id(str(self.eos_token))]
        return ids

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        # what build_inputs_with_special_tokens adds: [gMASK] <sop>, and <eop> after a pair's second part
        # (the base class builds two empty sequences to count them, for every encoded text)
        return 3 if pair else 2

    def get_special_tokens_mask(
        self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None, already_has_special_tokens: bool = False
    ) -> List[int]:
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError(
                    "token_ids_1 must be None when already_has_special_tokens=True: pass the full sequence as "
                    "token_ids_0"
                )
            special = set(self.all_special_ids)
            special.add(self.gmask_token_id)
            return [1 if int(i) in special else 0 for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None
    ) -> List[int]:
        # ChatGLM has no token types; the model does not take them.
        length = len(token_ids_0) + 2 + (len(token_ids_1) + 1 if token_ids_1 is not None else 0)
        return [0] * length

    # ------------------------------------------------------------------------------------------------
    # Padding: left only, with ChatGLM's 2-D positions and [1, s, s] boolean mask
    # ------------------------------------------------------------------------------------------------
    def pad(self, encoded_inputs, *args, **kwargs):
        encoded_inputs = _drop_derived_keys(encoded_inputs)
        _check_padding_side(kwargs.get("padding_side"))
        if args:  # positional use: signatures differ between transformers versions, pass through
            return super().pad(encoded_inputs, *args, **kwargs)
        return_tensors = kwargs.pop("return_tensors", None)
        encoded_inputs, input_kind = _to_python(encoded_inputs)
        if return_tensors is None:
            return_tensors = input_kind  # like transformers: tensors in, same kind of tensors out
        out = super().pad(encoded_inputs, **kwargs)
        for key in ("attention_mask", "position_ids"):
            value = out.get(key)
            if (
                isinstance(value, list)
                and value
                and all(isinstance(v, np.ndarray) for v in value)
                and len({v.shape for v in value}) == 1
            ):
                out[key] = np.stack(value)
        if return_tensors is not None:
            out.convert_to_tensors(tensor_type=return_tensors)
        return out

    def prepare_for_model(self, ids, pair_ids=None, *args, **kwargs):
        # Convert to tensors here so the per-sequence mask/positions (numpy arrays) get their batch axis
        # as an array: transformers 4.x would build a tensor from a list of arrays (slow, warns).
        if args or kwargs.get("return_tensors") is None or kwargs.get("return_overflowing_tokens"):
            return super().prepare_for_model(ids, pair_ids, *args, **kwargs)
        return_tensors = kwargs.pop("return_tensors")
        prepend = kwargs.pop("prepend_batch_axis", False)
        out = super().prepare_for_model(ids, pair_ids, **kwargs)
        if prepend:
            for key, value in list(out.items()):
                out[key] = value[None] if isinstance(value, np.ndarray) else [value]
        return out.convert_to_tensors(tensor_type=return_tensors)

    def _pad(
        self,
        encoded_inputs,
        max_length: Optional[int] = None,
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: Optional[int] = None,
        padding_side: Optional[str] = None,
        return_attention_mask: Optional[bool] = None,
        **kwargs,
    ) -> dict:
        _check_padding_side(padding_side)
        padding_strategy = PaddingStrategy(padding_strategy)
        if padding_strategy == PaddingStrategy.DO_NOT_PAD:
            return encoded_inputs
        main_key = self.model_input_names[0]
        ids = [int(i) for i in encoded_inputs[main_key]]
        if padding_strategy == PaddingStrategy.LONGEST or max_length is None:
            max_length = len(ids)
        if pad_to_multiple_of and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        added = max(0, max_length - len(ids))
        pad_id = self.pad_token_id

        mask, positions = self.build_mask_and_positions(ids, added)
        encoded_inputs.pop("attention_mask", None)
        encoded_inputs.pop("position_ids", None)
        if return_attention_mask is not False:
            encoded_inputs["attention_mask"] = mask
        encoded_inputs["position_ids"] = positions
        if added:
            encoded_inputs[main_key] = [pad_id] * added + ids
            if "token_type_ids" in encoded_inputs:
                encoded_inputs["token_type_ids"] = [self.pad_token_type_id] * added + list(
                    encoded_inputs["token_type_ids"]
                )
            if "special_tokens_mask" in encoded_inputs:
                encoded_inputs["special_tokens_mask"] = [1] * added + list(encoded_inputs["special_tokens_mask"])
        return encoded_inputs

    def build_mask_and_positions(self, ids: Sequence[int], left_padding: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """The ``[1, L, L]`` bool mask (True = masked) and ``[2, L]`` int64 positions for ``ids``.

        ``L = left_padding + len(ids)``. Leading ``<pad>`` ids of ``ids`` also count as padding. The
        prefix up to ``<sop>`` attends bidirectionally, ``<sop>`` onwards causally; channel 0 holds
        positions with everything from ``<sop>`` on set to the mask position (``[MASK]`` if present, else
        ``[gMASK]``), channel 1 the block positions 1, 2, ... from ``<sop>`` on. Padding is masked and
        has position 0.
        """
        ids = [int(i) for i in ids]
        pad_id = self.pad_token_id
        lead = 0
        while lead < len(ids) and ids[lead] == pad_id:
            lead += 1
        real = ids[lead:]
        pad = left_padding + lead
        size, total = len(real), left_padding + len(ids)

        bos_id = self._token_to_id(str(self.bos_token))
        context = real.index(bos_id) if bos_id in real else size
        mask = np.ones((1, total, total), dtype=bool)
        visible = np.tril(np.ones((size, size), dtype=bool))
        visible[:, :context] = True
        mask[0, pad:, pad:] = ~visible

        mask_id, gmask_id = self._token_to_id(str(self.mask_token)), self.gmask_token_id
        mask_position = None
        if mask_id in real:
            mask_position = real.index(mask_id)
        elif gmask_id in real:
            mask_position = real.index(gmask_id)
        position = np.arange(size, dtype=np.int64)
        if mask_position is not None:
            position[context:] = mask_position
        block = np.zeros(size, dtype=np.int64)
        block[context:] = np.arange(1, size - context + 1, dtype=np.int64)
        positions = np.zeros((2, total), dtype=np.int64)
        positions[0, pad:] = position
        positions[1, pad:] = block
        return mask, positions

    # ------------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------------
    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return self.sp_tokenizer.decode_tokens(tokens)

    def _decode(
        self,
        token_ids,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: Optional[bool] = None,
        spaces_between_special_tokens: bool = True,
        **kwargs,
    ) -> str:
        if isinstance(token_ids, (list, tuple)):
            ids = [_as_id(i) for i in token_ids]
        elif hasattr(token_ids, "tolist"):  # numpy / torch
            value = token_ids.tolist()
            ids = [_as_id(i) for i in value] if isinstance(value, list) else [_as_id(value)]
        else:
            ids = [_as_id(token_ids)]
        drop = {self.pad_token_id}
        if skip_special_tokens:
            drop.update(self.all_special_ids)
            drop.add(self.gmask_token_id)
        added = {i: t for t, i in self._added_vocab().items() if i >= self.vocab_size}
        limit = self._id_limit
        parts: List[str] = []
        run: List[int] = []
        for index in ids:
            if index in drop:
                continue
            if index in added:
                if run:
                    parts.append(self.sp_tokenizer.decode(run))
                    run = []
                parts.append(added[index])
                continue
            if not 0 <= index < limit:
                self._check_id(index)  # raises
            run.append(index)
        if run or not parts:
            parts.append(self.sp_tokenizer.decode(run))
        text = (" " if spaces_between_special_tokens else "").join(parts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = getattr(self, "clean_up_tokenization_spaces", True)
        if clean_up_tokenization_spaces:
            text = clean_up_spaces(text)
        return text

    # ------------------------------------------------------------------------------------------------
    # Chat
    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def build_prompt(query: str, history: Optional[Sequence[Tuple[str, str]]] = None) -> str:
        """The prompt ``chat()`` feeds the model: the query alone without history, otherwise
        ``[Round i]\\n问：{q}\\n答：{r}\\n`` per past turn and ``[Round n]\\n问：{query}\\n答：``."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        if history is None or len(history) == 0:
            return query
        rounds = []
        for i, turn in enumerate(history):
            if not isinstance(turn, (list, tuple)) or len(turn) != 2 or not all(isinstance(s, str) for s in turn):
                raise TypeError(
                    f"history[{i}] must be a (query, response) pair of strings, got {turn!r}; history is the "
                    f"list chat() returns"
                )
            rounds.append(f"[Round {i}]\n问：{turn[0]}\n答：{turn[1]}\n")
        rounds.append(f"[Round {len(history)}]\n问：{query}\n答：")
        return "".join(rounds)

    def apply_chat_template(self, conversation, *args, **kwargs):
        """transformers' ``apply_chat_template``; when tokenizing, the ids end in ``[gMASK] <sop>`` exactly
        like ``chat()``'s input (transformers itself would tokenize without special tokens)."""
        base = getattr(super(), "apply_chat_template", None)
        if base is None:
            raise NotImplementedError(
                "apply_chat_template needs transformers >= 4.34; on this version build the prompt with "
                "ChatGLMTokenizer.build_prompt(query, history) and call the tokenizer on it"
            )
        if args or not kwargs.get("tokenize", True):
            return base(conversation, *args, **kwargs)
        if kwargs.pop("return_assistant_tokens_mask", False):
            raise ValueError("return_assistant_tokens_mask is not supported by ChatGLMTokenizer (no offsets)")
        kwargs.pop("tokenize", None)
        call_kwargs = dict(kwargs.pop("tokenizer_kwargs", None) or {})
        for key in ("padding", "truncation", "max_length", "return_tensors"):
            if key in kwargs:
                call_kwargs[key] = kwargs.pop(key)
        if kwargs.pop("sanitize_control_tokens", False):
            call_kwargs["split_special_tokens"] = True  # the template itself writes no control tokens
        return_dict = kwargs.pop("return_dict", _default_of(base, "return_dict", False))
        rendered = base(conversation, tokenize=False, **kwargs)
        out = self(rendered, **call_kwargs)
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_directory must be an existing directory, got {save_directory!r}")
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE_NAME)
        source = self.sp_tokenizer.vocab_file
        if source and os.path.isfile(source):
            if os.path.abspath(source) != os.path.abspath(target):
                shutil.copyfile(source, target)
        else:
            with open(target, "wb") as handle:
                handle.write(self.sp_tokenizer.text_tokenizer.sp.serialized_model_proto())
        return (target,)


def _check_padding_side(side: Optional[str]) -> None:
    if side is not None and side != "left":
        raise ValueError(
            f"ChatGLM pads on the left only (padding_side={side!r} given): its attention mask and position "
            f"ids assume the prompt ends at the last position. Use padding_side='left' (the default)."
        )


# transformers 5 encodes batches in _encode_plus; 4.x has a separate _batch_encode_plus.
_BATCH_IN_ENCODE_PLUS = not hasattr(PreTrainedTokenizer, "_batch_encode_plus")
_NAMED_PARAMETERS: Dict[object, frozenset] = {}


def _tokenize_kwargs(method, kwargs: dict) -> dict:
    """The part of ``kwargs`` that transformers would forward to ``tokenize()`` (its unnamed extras)."""
    key = getattr(method, "__func__", method)
    names = _NAMED_PARAMETERS.get(key)
    if names is None:
        names = frozenset(inspect.signature(method).parameters)
        _NAMED_PARAMETERS[key] = names
    return {k: v for k, v in kwargs.items() if k not in names}


_DERIVED_KEYS = ("attention_mask", "position_ids")


def _drop_derived_keys(encoded_inputs):
    """The mask and positions are functions of the ids; drop incoming ones so padding rebuilds them."""
    if isinstance(encoded_inputs, (list, tuple)):
        return [
            {k: v for k, v in e.items() if k not in _DERIVED_KEYS} if hasattr(e, "items") else e
            for e in encoded_inputs
        ]
    if hasattr(encoded_inputs, "items") and any(k in encoded_inputs for k in _DERIVED_KEYS):
        return {k: v for k, v in encoded_inputs.items() if k not in _DERIVED_KEYS}
    return encoded_inputs


def _to_python(encoded_inputs):
    """Tensors/arrays in ``encoded_inputs`` as lists, and "pt"/"np" for the kind found (else None)."""
    kind = None

    def convert(value):
        nonlocal kind
        if isinstance(value, np.ndarray):
            kind = kind or "np"
            return value.tolist()
        if type(value).__module__.startswith("torch") and hasattr(value, "tolist"):
            kind = "pt"
            return value.tolist()
        return value

    if isinstance(encoded_inputs, (list, tuple)):
        converted = [{k: convert(v) for k, v in e.items()} if hasattr(e, "items") else e for e in encoded_inputs]
    elif hasattr(encoded_inputs, "items"):
        converted = {k: convert(v) for k, v in encoded_inputs.items()}
    else:
        return encoded_inputs, None
    return converted, kind


def _default_of(function, name: str, fallback):
    try:
        parameter = inspect.signature(function).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default
