"""A Hugging Face tokenizer.json of Llama 3's kind (byte-level BPE) into the tiktoken encoder.

Llama 3's Hugging Face repos ship tiktoken's ranks as tokenizer.json: each vocabulary id is the
token's rank once GPT-2's byte-to-unicode mapping is undone, the special tokens are its
`added_tokens`, the split regex is its pre-tokenizer's. Read that way, tiktoken gives the ids
transformers gives, without the `tokenizers` package. A file of another shape is refused here
rather than tokenized differently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex

from ..errors import UserError
from .tokenizer import LLAMA3_PAT_STR, TiktokenTokenizer, _read

# tokenizers' ByteLevel(use_regex=True) split pattern, which is GPT-2's.
GPT2_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Patterns whose meaning is the same in tokenizers' regex engine (Oniguruma) and tiktoken's
# (fancy-regex), and which match every character, as tiktoken needs: it drops unmatched text.
KNOWN_PATTERNS = (LLAMA3_PAT_STR, GPT2_PAT_STR)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters, which byte-level vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}
TO_LATIN1 = str.maketrans({c: chr(b) for c, b in UNICODE_TO_BYTE.items()})  # then encode latin-1


@dataclass(frozen=True)
class ByteLevelVocab:
    """What tiktoken needs: ranks, special tokens, split pattern; bos and eos by name."""

    ranks: dict[bytes, int]
    specials: dict[str, int]
    pat_str: str
    bos: str
    eos: str


class TokenizerJsonTokenizer(TiktokenTokenizer):
    """A Llama 3-style tokenizer.json, encoded by the same tiktoken encoder as Meta's file."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        vocab = read_tokenizer_json(path)
        self._open(path, vocab.ranks, vocab.specials, vocab.pat_str, vocab.bos, vocab.eos)


def read_tokenizer_json(path: Path) -> ByteLevelVocab:
    """Check the file is Llama 3's shape, then read what tiktoken needs (one-line errors)."""
    doc = _load_json(path, _read(path))
    model = doc.get("model") or {}
    unfit = _shape_misfit(doc, model)
    if unfit:
        raise UserError(f"{path}: {unfit}; llama-gen reads only Llama 3-style byte-level BPE "
                        "tokenizer.json files (pass --tokenizer_path to another tokenizer)")
    added = doc.get("added_tokens") or []
    vocab = _byte_level_vocab(path, model.get("vocab"), added)
    ranks = _ranks(path, vocab)
    specials = _specials(path, added, len(ranks))
    _check_merges(path, vocab, model.get("merges"))
    pat_str = _pattern(doc["pre_tokenizer"])
    if not model.get("ignore_merges", False):
        _check_tokens_rebuild(path, ranks, pat_str)
    bos, eos = _bos_eos(path, specials)
    return ByteLevelVocab(ranks, specials, pat_str, bos, eos)


def _load_json(path: Path, data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); re-download tokenizer.json") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: not a tokenizer.json (a JSON object with a 'model')")
    return doc


def _shape_misfit(doc: dict[str, Any], model: dict[str, Any]) -> str | None:
    """What keeps this file from being byte-level BPE as Llama 3's is, or None."""
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')!r}, not byte-level 'BPE'"
    if model.get("byte_fallback"):
        return "its BPE has byte_fallback, as SentencePiece-style (Llama 2) files do"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"its BPE sets {key} {model[key]!r}"
    if doc.get("normalizer") not in (None, {"type": "Sequence", "normalizers": []}):
        return f"its normalizer {_kind(doc['normalizer'])} changes the text"
    if _pattern(doc.get("pre_tokenizer")) is None:
        return (f"its pre-tokenizer {_kind(doc.get('pre_tokenizer'))} is not Llama 3's "
                "(Split by Meta's regex, then ByteLevel) nor GPT-2's ByteLevel")
    decoder = doc.get("decoder")
    if not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
        return f"its decoder {_kind(decoder)} is not ByteLevel"
    return None


def _kind(part: Any) -> str:
    return repr(part.get("type")) if isinstance(part, dict) else repr(part)


def _pattern(pre: Any) -> str | None:
    """The split regex of Llama 3's pre-tokenizer (Split, then ByteLevel without its regex), or
    GPT-2's for a lone ByteLevel with its regex; None for any other pre-tokenizer."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        plain = pre.get("use_regex", True) and pre.get("add_prefix_space", True) is False
        return GPT2_PAT_STR if plain else None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not isinstance(steps, list) or len(steps) != 2:
        return None
    split, byte_level = steps
    if not isinstance(split, dict) or not isinstance(byte_level, dict):
        return None
    pattern = split.get("pattern")
    fits = (split.get("type") == "Split" and split.get("behavior") == "Isolated"
            and not split.get("invert") and isinstance(pattern, dict)
            and pattern.get("Regex") in KNOWN_PATTERNS
            and byte_level == {**byte_level, "type": "ByteLevel", "use_regex": False,
                               "add_prefix_space": False})
    return pattern["Regex"] if fits else None


def _byte_level_vocab(path: Path, vocab: Any, added: list[dict[str, Any]]) -> dict[str, int]:
    """The vocabulary as written (GPT-2's byte map), less any added token listed in it too (GPT-2's
    <|endoftext|>), which is left to the specials."""
    if not isinstance(vocab, dict):
        raise UserError(f"{path}: its BPE model has no vocab; re-download tokenizer.json")
    added_ids = {a.get("id") for a in added}
    texts = {text: rank for text, rank in vocab.items() if rank not in added_ids}
    if not set("".join(texts)) <= UNICODE_TO_BYTE.keys():
        (text, *_) = (t for t in texts if not set(t) <= UNICODE_TO_BYTE.keys())
        raise UserError(f"{path}: vocabulary entry {text!r} is not byte-level (GPT-2's byte "
                        "map); a SentencePiece-style tokenizer.json is not read")
    return texts


def _ranks(path: Path, texts: dict[str, int]) -> dict[bytes, int]:
    """Vocabulary ids as tiktoken ranks: bytes -> id, 0..N-1 each once, every byte among them."""
    ranks = {text.translate(TO_LATIN1).encode("latin-1"): rank for text, rank in texts.items()}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: vocabulary ids are not 0..N-1, each token once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise UserError(f"{path}: {len(missing)} of the 256 bytes are not in the vocabulary "
                        f"(byte {missing[0]} first), so some text cannot be encoded")
    return ranks


def _specials(path: Path, added: list[dict[str, Any]], n_ranks: int) -> dict[str, int]:
    """`added_tokens` by content: all special, numbered n_ranks, n_ranks + 1, ... with no gap
    (a model may emit any id below its vocabulary size, and each must decode)."""
    specials: dict[str, int] = {}
    for token in added:
        if not token.get("special"):
            raise UserError(f"{path}: added token {token.get('content')!r} (id {token.get('id')}) "
                            "is not special; tiktoken cannot match such tokens in text")
        specials[token["content"]] = token["id"]
    if sorted(specials.values()) != list(range(n_ranks, n_ranks + len(specials))):
        raise UserError(f"{path}: added tokens' ids are not {n_ranks}, {n_ranks + 1}, ... "
                        "following the vocabulary, each once")
    return specials


def _check_merges(path: Path, vocab: dict[str, int], merges: Any) -> None:
    """Check that tokenizers' BPE, joining the listed pair that comes first, joins as tiktoken
    does, joining the pair whose join has the lowest rank: (1) each merge is two tokens whose join
    is a token; (2) the merges come in the order of their join's id; (3) every split of a token
    into two tokens is a merge. By (1) and (3) a pair may be joined in one exactly when it may in
    the other; by (2) the first listed is the one of lowest rank. Only two different pairs making
    the same token, adjacent at once, could still be taken in another order (tiktoken takes the
    leftmost). Checked on the byte-level text: one character per byte, so joins agree."""
    if not isinstance(merges, list):
        raise UserError(f"{path}: its BPE model has no merges list; re-download tokenizer.json")
    listed: set[str] = set()
    last = -1
    for i, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
            raise UserError(f"{path}: merge {i} {merge!r} is not two vocabulary tokens")
        joined = vocab.get(parts[0] + parts[1])
        if joined is None or joined < last:
            what = "is not in the vocabulary" if joined is None else "comes before an earlier one's"
            raise UserError(f"{path}: merge {i} {merge!r}: its result {what}; the merges do not "
                            "follow the vocabulary's ranks as Llama 3's do")
        last = joined
        listed.add(f"{parts[0]} {parts[1]}")  # byte-level text has no spaces
    # Each listed merge is a split of a token into two tokens, so as many splits as merges is all.
    splits = sum(1 for token in vocab for cut in range(1, len(token))
                 if token[:cut] in vocab and token[cut:] in vocab)
    if splits != len(listed):
        left, right, token = next((t[:cut], t[cut:], t) for t in vocab for cut in range(1, len(t))
                                  if t[:cut] in vocab and t[cut:] in vocab
                                  and f"{t[:cut]} {t[cut:]}" not in listed)
        raise UserError(f"{path}: no merge joins {left!r} and {right!r} although token "
                        f"{token!r} is their join; tiktoken would join them")


def _check_tokens_rebuild(path: Path, ranks: dict[bytes, int], pat_str: str) -> None:
    """With ignore_merges false, tokenizers builds even a word that is itself a token from its
    bytes, where tiktoken takes the token whole: the same only if the merges rebuild it."""
    for token, rank in ranks.items():
        try:
            text = token.decode()
        except UnicodeDecodeError:
            continue  # never a whole word: words are split from text
        if len(token) > 1 and regex.findall(pat_str, text) == [text]:
            if _merge_by_rank(ranks, token) != [token]:
                raise UserError(f"{path}: token {rank} ({text!r}) is not rebuilt by its merges "
                                "and ignore_merges is false: transformers would split it")


def _merge_by_rank(ranks: dict[bytes, int], word: bytes) -> list[bytes]:
    """tiktoken's byte-pair merge without its whole-word shortcut."""
    parts = [bytes([b]) for b in word]
    while len(parts) > 1:
        joins = [(ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        found = [(rank, i) for rank, i in joins if rank is not None]
        if not found:
            break
        _, i = min(found)  # the lowest rank, leftmost on a tie
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _bos_eos(path: Path, specials: dict[str, int]) -> tuple[str, str]:
    """Llama 3's <|begin_of_text|> / <|end_of_text|> where present, else tokenizer_config.json's
    bos_token / eos_token beside the file (a string or {"content": ...})."""
    names = ["<|begin_of_text|>", "<|end_of_text|>"]
    config_path = path.parent / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if any(name not in specials for name in names) and config_path.is_file():
        config = _load_json(config_path, _read(config_path))
    for i, key in enumerate(("bos_token", "eos_token")):
        if names[i] in specials:
            continue
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value not in specials:
            found = (f"{config_path.name}'s {key} is {value!r}, not one of them" if config
                     else f"no {config_path.name} beside it names one")
            raise UserError(f"{path}: no {names[i]} among its added tokens, and {found}; "
                            "pass --tokenizer_path to another tokenizer")
        names[i] = value
    return names[0], names[1]
