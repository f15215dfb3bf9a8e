"""Llama 1/2's SentencePiece and Llama 3's tiktoken tokenizers behind one small interface."""
from __future__ import annotations

import base64
import binascii
import functools
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar, Literal

import sentencepiece as spm
import tiktoken

from ..errors import UserError

TokenizerKind = Literal["sentencepiece", "tiktoken"]

# Meta's split regex for Llama 3 (meta-llama/llama3 and llama-models `Tokenizer.pat_str`).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
# Llama 3.1's named special tokens (llama-models); the rest of the 256 are reserved.
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
# Llama 3.1's ends of a turn: end of text, end of message (a tool call follows), end of turn.
LLAMA3_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
LLAMA3_SPECIAL_TOKENS = LLAMA3_NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{i}|>"
    for i in range(2, 2 + LLAMA3_NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS))
)
# tiktoken panics on very long inputs and is slow on long runs of (non-)whitespace
# (openai/tiktoken#195), so Meta encodes in windows and cuts such runs; we do the same.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

_RANK_LINE = re.compile(rb"([A-Za-z0-9+/]+={0,2}) (\d+)")
_RUN = re.compile(r"\s+|\S+")


class Tokenizer(ABC):
    """Text <-> token ids. `encode` never appends eos; generation stops at any of `stop_ids`."""

    kind: ClassVar[TokenizerKind]

    def __init__(
        self,
        path: Path,
        *,
        n_words: int,
        bos_id: int,
        eos_id: int,
        stop_ids: frozenset[int],
        special_tokens: dict[str, int],
    ) -> None:
        self._path = path
        self._n_words = n_words
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._stop_ids = stop_ids
        self._special_tokens = special_tokens

    @abstractmethod
    def encode(self, text: str, *, bos: bool) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_continuation(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> str:
        """The text `completion_ids` add after `prompt_ids`.

        Decoding the completion alone is wrong: SentencePiece drops the leading space of its first
        piece, and a character whose UTF-8 bytes straddle the boundary would decode as U+FFFD on
        both sides. So decode both and take what follows the longest common prefix.
        """
        prompt = self.decode(prompt_ids)
        full = self.decode([*prompt_ids, *completion_ids])
        if full.startswith(prompt):
            return full[len(prompt) :]
        return full[len(os.path.commonprefix([prompt, full])) :]

    @abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """One token's own bytes, leading space included (a byte-fallback token: its byte)."""

    def token_text(self, token: int) -> str:
        """One token's own text, leading space included (a piece of a multi-byte character
        shows as U+FFFD)."""
        return self.token_bytes(token).decode(errors="replace")

    @property
    def path(self) -> Path:
        return self._path

    @property
    def n_words(self) -> int:
        """Vocabulary size including special tokens: the model's embedding rows."""
        return self._n_words

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._stop_ids

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the control tokens (bos, eos, chat headers, reserved ones), which a
        completion's text leaves out by default."""
        return frozenset(self._special_tokens.values()) | {self._bos_id, self._eos_id}

    @property
    def special_tokens(self) -> dict[str, int]:
        """Name -> id of every special token (none for SentencePiece); do not mutate."""
        return self._special_tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._path)!r}, n_words={self._n_words})"


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2: SentencePiece BPE with byte fallback; bos 1, eos 2, no pad."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(_read(path))
        except (RuntimeError, OSError):
            raise UserError(f"{path}: not a valid SentencePiece model; re-download it") from None
        super().__init__(
            path,
            n_words=self._sp.vocab_size(),
            bos_id=self._sp.bos_id(),
            eos_id=self._sp.eos_id(),
            stop_ids=frozenset({self._sp.eos_id()}),
            special_tokens={},
        )

    def encode(self, text: str, *, bos: bool) -> list[int]:
        ids: list[int] = self._sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._sp.decode(list(ids))
        return text

    def token_bytes(self, token: int) -> bytes:
        if self._sp.IsByte(token):  # a byte-fallback piece, <0xE4>
            return bytes([int(self._sp.IdToPiece(token)[3:5], 16)])
        if self._sp.IsControl(token) or self._sp.IsUnknown(token):
            return self._sp.decode([token]).encode()  # bos, eos: nothing; unk: " \u2047 "
        return self._sp.IdToPiece(token).replace("\u2581", " ").encode()


class TiktokenTokenizer(Tokenizer):
    """Llama 3: a tiktoken rank file plus 256 special tokens numbered from len(ranks)."""

    kind = "tiktoken"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        ranks = _parse_rank_file(path, _read(path))
        specials = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self._open(path, ranks, specials, LLAMA3_PAT_STR, "<|begin_of_text|>", "<|end_of_text|>")

    def _open(self, path: Path, ranks: dict[bytes, int], specials: dict[str, int], pat_str: str,
              bos: str, eos: str) -> None:
        """The encoder and the ids, for Meta's rank file and tokenizer.json's alike."""
        self._enc = tiktoken.Encoding(
            name=path.name,
            pat_str=pat_str,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
        stop = {specials[eos]} | {specials[t] for t in LLAMA3_STOP_TOKENS if t in specials}
        super().__init__(
            path,
            n_words=self._enc.n_vocab,
            bos_id=specials[bos],
            eos_id=specials[eos],
            stop_ids=frozenset(stop),
            special_tokens=specials,
        )

    def encode(self, text: str, *, bos: bool) -> list[int]:
        # User text never yields special ids: "<|eot_id|>" in a prompt is encoded as plain text.
        ids = [self.bos_id] if bos else []
        for start in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            window = text[start : start + TIKTOKEN_MAX_ENCODE_CHARS]
            for chunk in split_long_runs(window, MAX_NO_WHITESPACES_CHARS):
                ids += self._enc.encode(chunk, allowed_special=set(), disallowed_special=())
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._enc.decode(list(ids))
        return text

    def token_bytes(self, token: int) -> bytes:
        return self._enc.decode_single_token_bytes(token)


def split_long_runs(text: str, max_run: int) -> Iterator[str]:
    """Cut `text` so no piece holds more than `max_run` consecutive whitespace or
    non-whitespace characters; cuts fall every `max_run` characters into a run, as in Meta's."""
    start = 0
    for run in _RUN.finditer(text):
        for cut in range(run.start() + max_run, run.end(), max_run):
            yield text[start:cut]
            start = cut
    yield text[start:]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: tokenizer file not found; check --tokenizer_path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory; give the tokenizer.model file in it") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the tokenizer file ({e.strerror})") from None


def _parse_rank_file(path: Path, data: bytes) -> dict[bytes, int]:
    """Parse `base64-token rank` lines; blank lines are skipped, as tiktoken's loader does."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        m = _RANK_LINE.fullmatch(line.strip())
        try:
            if m is None:
                raise ValueError
            token = base64.b64decode(m[1], validate=True)
        except (ValueError, binascii.Error):
            raise UserError(
                f"{path}: line {lineno}: expected '<base64 token> <rank>', "
                f"got {line[:40].decode(errors='replace')!r}; "
                "the tiktoken file is damaged, re-download tokenizer.model"
            ) from None
        ranks[token] = int(m[2])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(
            f"{path}: ranks are not 0..N-1, each token once, as Llama 3's tokenizer needs; "
            "re-download tokenizer.model"
        )
    return ranks


def _looks_like_rank_file(data: bytes) -> bool:
    first = data.split(b"\n", 1)[0].strip()
    return _RANK_LINE.fullmatch(first) is not None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open a tokenizer, telling its kind from the contents: a JSON object is a Hugging Face
    tokenizer.json (read as Llama 3's byte-level BPE), text `base64 rank` lines are a tiktoken rank
    file (Llama 3); anything else must be a SentencePiece model protobuf (Llama 1/2)."""
    path = Path(path)
    data = _read(path)
    if data.lstrip()[:1] == b"{":
        from .tokenizer_json import TokenizerJsonTokenizer  # it builds on this module

        return TokenizerJsonTokenizer(path)
    if _looks_like_rank_file(data):
        return TiktokenTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except UserError:
        raise UserError(
            f"{path}: neither a SentencePiece model (Llama 1/2) nor a tiktoken rank file "
            "(Llama 3); point --tokenizer_path at the checkpoint's tokenizer.model"
        ) from None


def find_tokenizer(ckpt_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """The explicit `tokenizer_path` if given, else the first of: tokenizer.model in `ckpt_dir`
    (SentencePiece, or tiktoken in Meta's Llama 3 folders); Llama 3's tiktoken file in a Hugging
    Face folder's original/; its tokenizer.json; tokenizer.model in the parent (where Llama 1/2
    downloads keep it, next to 7B/, 13B/, ...)."""
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        if not path.is_file():
            raise UserError(f"{path}: tokenizer file not found; check --tokenizer_path")
        return path
    ckpt_dir = Path(ckpt_dir)
    parent = Path(os.path.abspath(ckpt_dir)).parent  # abspath: keep symlinked dirs' own parent
    candidates = [ckpt_dir / "tokenizer.model", ckpt_dir / "original" / "tokenizer.model",
                  ckpt_dir / "tokenizer.json", parent / "tokenizer.model"]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(
        f"no tokenizer in {ckpt_dir} (tokenizer.model, original/tokenizer.model, tokenizer.json) "
        f"or {parent} (tokenizer.model); pass --tokenizer_path PATH"
    )
