from __future__ import annotations

import base64
from pathlib import Path

import pytest
import regex

from llama_gen.errors import UserError
from llama_gen.testing.tiny_tokenizers import build_sentencepiece_model, build_tiktoken_model
from llama_gen.text import tokenizer as tokmod
from llama_gen.text.tokenizer import (LLAMA3_PAT_STR, SentencePieceTokenizer, TiktokenTokenizer,
                                      Tokenizer, find_tokenizer, load_tokenizer, split_long_runs)

TEXTS = [
    "Hello world",
    "Grüße aus Köln, schöne Straße!",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "東京は日本の首都です。",
    "llamas 🦙 and emoji 👩‍👩‍👧 ✨",
    "",
    " ",
    "  leading and trailing  ",
    "\n",
    "line one\n\nline three\r\n\ttabbed\n",
    "   \n \t  \n",
    "x" * 300 + " " * 50 + "\u00a0\u3000",
    "<s></s><unk> <|begin_of_text|>",
]


@pytest.fixture(params=["spm", "tik"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def n_ranks(path: Path) -> int:
    return len(path.read_text().splitlines())


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=False)
    assert all(0 <= i < tok.n_words for i in ids)
    assert tok.decode(ids) == text


def test_bos_never_eos(tok: Tokenizer) -> None:
    plain = tok.encode("Hello world", bos=False)
    with_bos = tok.encode("Hello world", bos=True)
    assert with_bos == [tok.bos_id, *plain]
    assert tok.bos_id not in plain and tok.eos_id not in with_bos
    assert tok.encode("", bos=True) == [tok.bos_id]


def test_sentencepiece_ids(spm: Tokenizer) -> None:
    assert isinstance(spm, SentencePieceTokenizer)
    assert (spm.kind, spm.bos_id, spm.eos_id, spm.n_words) == ("sentencepiece", 1, 2, 512)
    assert spm.stop_ids == frozenset({2})
    assert spm.special_tokens == {}
    assert spm.decode(spm.encode("Hi", bos=True)) == "Hi"  # bos is a control piece: decodes to ""


def test_llama3_special_token_ids(tik: Tokenizer, tik_path: Path) -> None:
    n = n_ranks(tik_path)
    assert 256 < n < 1000
    special = tik.special_tokens
    assert len(special) == 256 and sorted(special.values()) == list(range(n, n + 256))
    expected = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|reserved_special_token_0|>": 2,
        "<|reserved_special_token_1|>": 3,
        "<|finetune_right_pad_id|>": 4,
        "<|step_id|>": 5,
        "<|start_header_id|>": 6,
        "<|end_header_id|>": 7,
        "<|eom_id|>": 8,
        "<|eot_id|>": 9,
        "<|python_tag|>": 10,
        "<|reserved_special_token_2|>": 11,
        "<|reserved_special_token_246|>": 255,
    }
    assert {name: special[name] - n for name in expected} == expected
    assert (tik.kind, tik.n_words, tik.bos_id, tik.eos_id) == ("tiktoken", n + 256, n, n + 1)
    assert tik.stop_ids == frozenset({n + 1, n + 8, n + 9})
    assert tik.decode([n + 9]) == "<|eot_id|>"


def test_special_token_text_is_plain_text(tik: Tokenizer, tik_path: Path) -> None:
    n = n_ranks(tik_path)
    text = "Say <|eot_id|> then <|begin_of_text|><|start_header_id|>user<|end_header_id|>"
    ids = tik.encode(text, bos=False)
    assert all(i < n for i in ids)
    assert tik.decode(ids) == text


def test_sentencepiece_control_text_is_plain_text(spm: Tokenizer) -> None:
    ids = spm.encode("</s><s>", bos=False)
    assert spm.eos_id not in ids and spm.bos_id not in ids


def test_pat_str_is_metas() -> None:
    meta = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
    assert LLAMA3_PAT_STR == meta
    pieces = regex.findall(LLAMA3_PAT_STR, "I'm 12345 ok\n\n  x  \nHELLO'S")
    assert pieces == ["I", "'m", " ", "123", "45", " ok", "\n\n", " ", " x", "  \n", "HELLO", "'S"]


def test_decode_continuation_keeps_leading_space(tok: Tokenizer) -> None:
    prompt = tok.encode("Hello", bos=True)
    full = tok.encode("Hello world", bos=True)
    assert full[: len(prompt)] == prompt
    completion = full[len(prompt) :]
    assert tok.decode_continuation(prompt, completion) == " world"
    assert tok.decode_continuation(prompt, []) == ""
    if tok.kind == "sentencepiece":
        assert tok.decode(completion) == "world"  # the bug decode_continuation exists for


def test_decode_continuation_split_inside_a_character(tok: Tokenizer) -> None:
    ids = tok.encode("a🦙 b", bos=True)
    assert len(ids) >= 6  # the llama is not in the tiny vocabularies: four byte tokens
    prompt, completion = ids[:3], ids[3:]  # bos, "a", the llama's first byte
    assert tok.decode(prompt).endswith("\ufffd")
    assert tok.decode_continuation(prompt, completion) == "🦙 b"


def test_split_long_runs() -> None:
    assert list(split_long_runs("aaaaa  bb", 2)) == ["aa", "aa", "a  bb"]
    assert list(split_long_runs("ab      c", 3)) == ["ab   ", "   c"]
    assert list(split_long_runs("", 3)) == [""]
    text = "x" * 10 + " " * 7 + "yz" + "\n" * 3
    chunks = list(split_long_runs(text, 4))
    assert "".join(chunks) == text
    assert all(max(map(len, regex.findall(r"\s+|\S+", c)), default=0) <= 4 for c in chunks)


def test_long_input_chunking(tik: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    long = "a" * 30_000 + " " + "b" * 3 + "\n" * 30_000
    assert tik.decode(tik.encode(long, bos=False)) == long
    monkeypatch.setattr(tokmod, "TIKTOKEN_MAX_ENCODE_CHARS", 7)
    monkeypatch.setattr(tokmod, "MAX_NO_WHITESPACES_CHARS", 3)
    for text in TEXTS:
        assert tik.decode(tik.encode(text, bos=False)) == text


def test_kind_is_read_from_contents(spm_path: Path, tik_path: Path, tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(tik_path.read_bytes())
    (tmp_path / "b.txt").write_bytes(spm_path.read_bytes())
    assert isinstance(load_tokenizer(tmp_path / "a.bin"), TiktokenTokenizer)
    assert isinstance(load_tokenizer(str(tmp_path / "b.txt")), SentencePieceTokenizer)
    assert load_tokenizer(tmp_path / "a.bin").path == tmp_path / "a.bin"


def test_tiny_tokenizers_are_deterministic(spm_path: Path, tik_path: Path, tmp_path: Path) -> None:
    assert build_tiktoken_model(tmp_path / "t").read_bytes() == tik_path.read_bytes()
    assert build_sentencepiece_model(tmp_path / "s").read_bytes() == spm_path.read_bytes()
    lines = tik_path.read_text().splitlines()
    first = [base64.b64decode(line.split()[0]) for line in lines[:256]]
    assert first == [bytes([b]) for b in range(256)]
    assert [int(line.split()[1]) for line in lines] == list(range(len(lines)))


def test_find_tokenizer_search_order(tmp_path: Path) -> None:
    ckpt = tmp_path / "7B"
    ckpt.mkdir()
    with pytest.raises(UserError) as e:
        find_tokenizer(ckpt)
    assert str(ckpt) in str(e.value) and str(tmp_path) in str(e.value)
    (tmp_path / "tokenizer.model").write_text("parent")
    assert find_tokenizer(ckpt) == tmp_path / "tokenizer.model"
    (ckpt / "tokenizer.model").write_text("inside")
    assert find_tokenizer(ckpt) == ckpt / "tokenizer.model"
    explicit = tmp_path / "other.model"
    explicit.write_text("explicit")
    assert find_tokenizer(ckpt, explicit) == explicit
    with pytest.raises(UserError, match="not found"):
        find_tokenizer(ckpt, tmp_path / "missing.model")


def one_line_error(path: Path) -> str:
    with pytest.raises(UserError) as e:
        load_tokenizer(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def test_error_missing_file(tmp_path: Path) -> None:
    assert "not found" in one_line_error(tmp_path / "tokenizer.model")
    assert "is a directory" in one_line_error(tmp_path)


@pytest.mark.parametrize("garbage", [b"", b"\x00\x01\xff" * 100, b"not a tokenizer\n", b"\n\n"])
def test_error_garbage_file(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(garbage)
    assert "neither a SentencePiece model" in one_line_error(path)


def test_error_malformed_tiktoken_line(tik_path: Path, tmp_path: Path) -> None:
    lines = tik_path.read_text().splitlines()
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join([*lines[:4], "Zm9v", *lines[5:]]) + "\n")
    assert "line 5" in one_line_error(path)
    path.write_text("\n".join([*lines[:6], "@@@ 6", *lines[7:]]) + "\n")
    assert "line 7" in one_line_error(path)
    path.write_text("\n".join(lines[:10] + lines[11:]) + "\n")  # rank 10 missing
    assert "ranks are not 0..N-1" in one_line_error(path)


def test_token_bytes_join_to_the_text_and_byte_tokens_keep_their_byte(tmp_path):
    text = "Grüße, 東京 🙂 hello"
    for build in (build_sentencepiece_model, build_tiktoken_model):
        tokenizer = load_tokenizer(build(tmp_path / f"{build.__name__}.model"))
        ids = tokenizer.encode(text, bos=False)
        pieces = [tokenizer.token_bytes(i) for i in ids]
        assert b"".join(pieces).decode().lstrip() == text
        assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces)  # a byte of a character
        assert tokenizer.token_bytes(tokenizer.bos_id) in (b"", b"<|begin_of_text|>")
