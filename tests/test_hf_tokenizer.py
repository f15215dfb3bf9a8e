"""A Hugging Face tokenizer.json (Llama 3's byte-level BPE) read into the tiktoken encoder: the same
ids as Meta's rank file and as transformers, and a one-line refusal for each shape it is not."""
from __future__ import annotations

import base64
import copy
import random
from pathlib import Path
from typing import Any, Callable

import pytest
from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

from hf_tokenizers import read_json, write_json, write_tokenizer_json
from llama_gen.errors import UserError
from llama_gen.testing.tiny_tokenizers import build_sentencepiece_model
from llama_gen.text.tokenizer import Tokenizer, find_tokenizer, load_tokenizer
from llama_gen.text.tokenizer_json import GPT2_PAT_STR, TokenizerJsonTokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "She said: \"Don't stop now, we're almost there.\" I'M SURE THEY'LL come, you'd see.",
    "Grüße aus Köln, schöne Straße! Äpfel über Bäume.",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "東京は日本の首都です。こんにちは、世界！",
    "llamas 🦙 and emoji 👩‍👩‍👧 ✨ 🇫🇷 e\u0301",
    "digits 1 12 123 1234 12345678901234567890 3,141.59 ४२ ٣٤",
    "",
    " ",
    "  leading and trailing  ",
    "\n",
    "line one\n\nline three\r\n\ttabbed\n",
    "   \n \t  \n\n\n    x\u00a0\u3000y",
    "def add(a, b):\n    return a + b\n\n\tprint(add(1, 2))  # 3",
    "x" * 300 + " " * 50 + "!!!???...",
    "<|begin_of_text|>Say <|eot_id|> then <|start_header_id|>user<|end_header_id|>\n\nhi",
    "<s></s><unk> <|reserved_special_token_7|>< |eot_id| >",
]


@pytest.fixture(scope="module")
def json_path(tik_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_json(tik_path, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def tok(json_path: Path) -> Tokenizer:
    return load_tokenizer(json_path)


def transformers_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    # split_special_tokens: special-token text in a prompt is plain text, as in llama-gen.
    return PreTrainedTokenizerFast(tokenizer_file=str(path), split_special_tokens=True)


@pytest.fixture(scope="module")
def hf(json_path: Path) -> PreTrainedTokenizerFast:
    return transformers_tokenizer(json_path)


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_as_the_tiktoken_file(tok: Tokenizer, tik: Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=True)
    assert ids == tik.encode(text, bos=True)
    assert tok.decode(ids[1:]) == tik.decode(ids[1:]) == text


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_as_transformers(tok: Tokenizer, hf: PreTrainedTokenizerFast, text: str) -> None:
    ids = tok.encode(text, bos=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert hf.decode(ids) == tok.decode(ids) == text


def test_special_token_text_stays_text(tok: Tokenizer, tik_path: Path) -> None:
    n_ranks = len(tik_path.read_text().splitlines())
    ids = tok.encode("<|begin_of_text|><|eot_id|>", bos=False)
    assert ids and all(i < n_ranks for i in ids)


def test_ids_and_specials_are_the_tiktoken_files(tok: Tokenizer, tik: Tokenizer) -> None:
    assert isinstance(tok, TokenizerJsonTokenizer) and tok.kind == "tiktoken"
    assert tok.special_tokens == tik.special_tokens
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (tik.n_words, tik.bos_id, tik.eos_id)
    assert tok.stop_ids == tik.stop_ids
    assert tok.n_words == max(tok.special_tokens.values()) + 1
    assert [tok.token_bytes(i) for i in range(tok.n_words)] == [
        tik.token_bytes(i) for i in range(tik.n_words)]


def test_bos_and_eos_from_tokenizer_config(json_path: Path, tmp_path: Path) -> None:
    doc = read_json(json_path)
    names = {"<|begin_of_text|>": "<s>", "<|end_of_text|>": "</s>"}
    for token in doc["added_tokens"]:
        token["content"] = names.get(token["content"], token["content"])
    path = write_json(tmp_path / "tokenizer.json", doc)
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"}
    write_json(tmp_path / "tokenizer_config.json", config)
    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id) == (tok.special_tokens["<s>"], tok.special_tokens["</s>"])
    eot, eom = tok.special_tokens["<|eot_id|>"], tok.special_tokens["<|eom_id|>"]
    assert tok.stop_ids == {tok.eos_id, eot, eom}


def test_gpt2_byte_level_pre_tokenizer(json_path: Path, tmp_path: Path) -> None:
    doc = read_json(json_path)
    doc["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False,
                            "trim_offsets": True, "use_regex": True}
    path = write_json(tmp_path / "tokenizer.json", doc)
    tok, hf = load_tokenizer(path), transformers_tokenizer(path)
    assert tok._enc._pat_str == GPT2_PAT_STR  # type: ignore[attr-defined]
    for text in TEXTS:
        assert tok.encode(text, bos=False) == hf.encode(text, add_special_tokens=False), text


def test_ignore_merges_false_when_merges_rebuild_every_token(json_path: Path,
                                                             tmp_path: Path) -> None:
    doc = read_json(json_path)
    doc["model"]["ignore_merges"] = False
    path = write_json(tmp_path / "tokenizer.json", doc)
    tok, hf = load_tokenizer(path), transformers_tokenizer(path)
    for text in TEXTS:
        assert tok.encode(text, bos=False) == hf.encode(text, add_special_tokens=False), text


def write_rank_file(path: Path, tokens: list[bytes]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


def test_ignore_merges_false_refused_when_a_token_is_not_rebuilt(tmp_path: Path) -> None:
    # "bc" joins first in "abcd", and neither "abc" nor "bcd" is a token: the merges stop at
    # a|bc|d, where tiktoken, like ignore_merges true, takes the token "abcd" whole.
    ranks = write_rank_file(tmp_path / "r.model",
                            [bytes([b]) for b in range(256)] + [b"bc", b"ab", b"cd", b"abcd"])
    path = write_tokenizer_json(ranks, tmp_path / "hf")
    assert load_tokenizer(path).encode("abcd", bos=False) == [259]
    doc = read_json(path)
    doc["model"]["ignore_merges"] = False
    write_json(path, doc)
    assert transformers_tokenizer(path).encode("abcd", add_special_tokens=False) == [
        ord("a"), 256, ord("d")]
    assert "token 259 ('abcd') is not rebuilt by its merges" in refusal(path)


def random_vocabulary(rng: random.Random) -> list[bytes]:
    """The bytes, then tokens over a, b and c, each joining two earlier ones in a random order, so
    a token's rank may be below its parts' ("abc" before "bc"), as in real vocabularies."""
    tokens, pool = [bytes([b]) for b in range(256)], [b"a", b"b", b"c"]
    while len(pool) < 18:
        joined = rng.choice(pool) + rng.choice(pool)
        if joined not in pool and len(joined) <= 8:
            tokens.append(joined)
            pool.append(joined)
    return tokens


def test_random_vocabularies_agree_with_transformers(tmp_path: Path) -> None:
    """The converter's files pass the merge checks, and then the ids are transformers'."""
    rng = random.Random(0)
    for i in range(30):
        ranks = write_rank_file(tmp_path / f"{i}.model", random_vocabulary(rng))
        path = write_tokenizer_json(ranks, tmp_path / str(i))
        tok, hf = load_tokenizer(path), transformers_tokenizer(path)
        for _ in range(100):
            text = "".join(rng.choice("aabbcc ") for _ in range(rng.randint(1, 24)))
            assert tok.encode(text, bos=False) == hf.encode(text, add_special_tokens=False), text


def refusal(path: Path) -> str:
    with pytest.raises(UserError) as e:
        load_tokenizer(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def set_key(where: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = where.split(".")
        for key in parents:
            doc = doc[int(key)] if key.isdigit() else doc[key]
        doc[last] = value
    return change


def drop_vocab_id(rank: int) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        vocab = doc["model"]["vocab"]
        (text,) = [text for text, i in vocab.items() if i == rank]
        del vocab[text]
    return change


def lengthen_byte_zero(doc: dict[str, Any]) -> None:
    vocab = doc["model"]["vocab"]
    vocab["\u0100\u0100"] = vocab.pop("\u0100")  # byte 0 shows as U+0100 in GPT-2's byte map


def swap_merges(doc: dict[str, Any]) -> None:
    merges = doc["model"]["merges"]
    merges[0], merges[-1] = merges[-1], merges[0]


def bad_added(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["added_tokens"][-1].update({field: value})


def drop_llama3_names_and_config(doc: dict[str, Any]) -> None:
    doc["added_tokens"][0]["content"] = "<s>"  # no <|begin_of_text|>, no tokenizer_config.json


REFUSALS = {
    "wordpiece": (set_key("model.type", "WordPiece"), "its model is 'WordPiece'"),
    "unigram": (set_key("model.type", "Unigram"), "its model is 'Unigram'"),
    "byte_fallback": (set_key("model.byte_fallback", True), "byte_fallback"),
    "dropout": (set_key("model.dropout", 0.1), "dropout"),
    "normalizer": (set_key("normalizer", {"type": "NFC"}), "normalizer 'NFC' changes the text"),
    "metaspace": (set_key("pre_tokenizer", {"type": "Metaspace", "replacement": "\u2581"}),
                  "pre-tokenizer 'Metaspace'"),
    "other_regex": (set_key("pre_tokenizer.pretokenizers.0.pattern.Regex", r"\S+|\s+"),
                    "pre-tokenizer 'Sequence'"),
    "prefix_space": (set_key("pre_tokenizer.pretokenizers.1.add_prefix_space", True),
                     "pre-tokenizer 'Sequence'"),
    "byte_level_prefix_space": (set_key("pre_tokenizer", {"type": "ByteLevel", "use_regex": True,
                                                          "add_prefix_space": True}),
                                "pre-tokenizer 'ByteLevel'"),
    "decoder": (set_key("decoder", {"type": "Metaspace"}), "decoder 'Metaspace'"),
    "not_byte_level": (set_key("model.vocab.\u2581the", 0), "'\u2581the' is not byte-level"),
    "vocab_gap": (drop_vocab_id(300), "ids are not 0..N-1"),
    "missing_byte": (lengthen_byte_zero, "1 of the 256 bytes are not in the vocabulary (byte 0"),
    "merge_order": (swap_merges, "comes before an earlier one's"),
    "merge_missing": (lambda doc: doc["model"]["merges"].pop(), "no merge joins"),
    "merge_not_in_vocab": (lambda doc: doc["model"]["merges"].insert(0, ["x", "q"]),
                           "its result is not in the vocabulary"),
    "not_special": (bad_added("special", False), "is not special"),
    "added_id_gap": (bad_added("id", 100000), "added tokens' ids"),
    "no_bos": (drop_llama3_names_and_config, "no <|begin_of_text|>"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused(json_path: Path, tmp_path: Path, case: str) -> None:
    change, words = REFUSALS[case]
    doc = copy.deepcopy(read_json(json_path))
    change(doc)
    message = refusal(write_json(tmp_path / "tokenizer.json", doc))
    assert words in message


def test_refused_bos_token_not_special(json_path: Path, tmp_path: Path) -> None:
    doc = read_json(json_path)
    doc["added_tokens"][0]["content"] = "<s>"
    path = write_json(tmp_path / "tokenizer.json", doc)
    write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<bos>"})
    assert "tokenizer_config.json's bos_token is '<bos>'" in refusal(path)


def test_refused_not_json(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE", ')
    assert "not valid JSON" in refusal(path)


def test_refused_llama2_style_tokenizer_json(tmp_path: Path) -> None:
    """transformers' own Llama 2 tokenizer.json (SentencePiece BPE, Metaspace, byte fallback)."""
    spm_path = build_sentencepiece_model(tmp_path / "sp.model")
    LlamaTokenizerFast(vocab_file=str(spm_path)).save_pretrained(tmp_path / "hf")
    assert "byte_fallback" in refusal(tmp_path / "hf" / "tokenizer.json")


def test_search_order(tik_path: Path, json_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "Llama-3.2-1B"
    folder.mkdir(parents=True)
    with pytest.raises(UserError, match="pass --tokenizer_path"):
        find_tokenizer(folder)
    (tmp_path / "models" / "tokenizer.model").write_bytes(tik_path.read_bytes())
    assert find_tokenizer(folder) == tmp_path / "models" / "tokenizer.model"
    write_tokenizer_json(tik_path, folder)
    assert find_tokenizer(folder) == folder / "tokenizer.json"
    assert isinstance(load_tokenizer(find_tokenizer(folder)), TokenizerJsonTokenizer)
    (folder / "original").mkdir()
    (folder / "original" / "tokenizer.model").write_bytes(tik_path.read_bytes())
    assert find_tokenizer(folder) == folder / "original" / "tokenizer.model"
    (folder / "tokenizer.model").write_bytes(tik_path.read_bytes())
    assert find_tokenizer(folder) == folder / "tokenizer.model"
    assert find_tokenizer(folder, json_path) == json_path
