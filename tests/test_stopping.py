from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from llama_gen.text.stopping import StopWatch, cut_at_stop
from llama_gen.text.tokenizer import Tokenizer

TEXTS = (
    "Once upon a time, there was a llama who loved to read books.",
    "Grüße aus Köln: Café au lait, crème brûlée!",
    "東京は日本の首都です。むかしむかし、本が大好きなラマがいました。",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "llamas 🦙 and emoji 👩‍👩‍👧 ✨ and  spaces\n\ttabs",
    "def add(a, b):\n    return a + b",
)


@pytest.fixture(params=["spm", "tik"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def watched(tok: Tokenizer, prompt: list[int], generated: list[int],
            stops: Sequence[str]) -> tuple[int, str] | None:
    """(tokens taken when StopWatch fired, its stop string), or None if it never fired."""
    watch = StopWatch(tok, prompt, stops)
    for n, token in enumerate(generated, 1):
        if (stop := watch.add(token)) is not None:
            return n, stop
    return None


def by_full_decode(tok: Tokenizer, prompt: list[int], generated: list[int],
                   stops: Sequence[str]) -> tuple[int, str] | None:
    """The same as `watched`, by the definition: decode every prefix of the completion."""
    for n in range(1, len(generated) + 1):
        _, stop = cut_at_stop(tok.decode_continuation(prompt, generated[:n]), stops)
        if stop is not None:
            return n, stop
    return None


def split(tok: Tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` (with bos) and of what `completion` adds after it."""
    before = tok.encode(prompt, bos=True)
    ids = tok.encode(prompt + completion, bos=True)
    assert ids[: len(before)] == before
    assert tok.decode_continuation(before, ids[len(before) :]) == completion
    return before, ids[len(before) :]


def stops_at(tok: Tokenizer, prompt: list[int], generated: list[int],
             stops: Sequence[str]) -> tuple[int, str, str]:
    """Tokens taken, the stop string and the completion cut before it; checked against the
    definition."""
    found = watched(tok, prompt, generated, stops)
    assert found is not None and found == by_full_decode(tok, prompt, generated, stops)
    n, stop = found
    text, cut_stop = cut_at_stop(tok.decode_continuation(prompt, generated[:n]), stops)
    assert cut_stop == stop
    return n, stop, text


def test_stop_spanning_two_tokens(tok: Tokenizer) -> None:
    prompt, generated = split(tok, "Once upon a time,", " there was a llama who loved books.")
    n, stop, text = stops_at(tok, prompt, generated, ["re wa"])
    assert (stop, text) == ("re wa", " the")
    before = tok.decode_continuation(prompt, generated[: n - 1])
    assert before.endswith((" there", " there w"))  # the stop began tokens earlier


@pytest.mark.parametrize(("stop", "cut"), [("é", " Caf"), ("fé", " Ca"), ("é au", " Caf")])
def test_stop_ending_inside_a_split_character(tok: Tokenizer, stop: str, cut: str) -> None:
    prompt, generated = split(tok, "Hello", " Café au lait")
    assert stops_at(tok, prompt, generated, [stop])[1:] == (stop, cut)
    at_e = len(tok.encode("Hello Café", bos=True)) - len(prompt)
    half = tok.decode_continuation(prompt, generated[: at_e - 1])
    assert half.endswith("Caf\ufffd")  # é's two bytes are two tokens: half of it is U+FFFD
    assert watched(tok, prompt, generated[: at_e - 1], [stop, "é"]) is None


def test_stop_is_an_emoji_split_in_four(tok: Tokenizer) -> None:
    prompt, generated = split(tok, "Hello", " llamas 🦙!")
    n = len(tok.encode("Hello llamas 🦙", bos=True)) - len(prompt)
    for i in range(n - 3, n):
        assert tok.decode_continuation(prompt, generated[:i]).endswith("\ufffd")
    assert stops_at(tok, prompt, generated, ["🦙", "!"]) == (n, "🦙", " llamas ")


def test_later_listed_stop_that_occurs_first_wins(tok: Tokenizer) -> None:
    prompt, generated = split(tok, "The quick", " brown fox jumps over the lazy dog.")
    assert stops_at(tok, prompt, generated, ["lazy", "fox"])[1:] == ("fox", " brown ")
    # "x" and "fox" are complete after the same token: the one that starts first wins
    n, stop, text = stops_at(tok, prompt, generated, ["x", "fox", "o"])
    assert (stop, text) == ("o", " br")
    n, stop, text = stops_at(tok, prompt, generated, ["x", "fox"])
    assert (stop, text) == ("fox", " brown ")
    assert watched(tok, prompt, generated[: n - 1], ["x", "fox"]) is None


def test_stop_in_the_prompt_only_does_not_fire(tok: Tokenizer) -> None:
    prompt, generated = split(tok, "The capital of France is Par", "is. It is big.")
    assert watched(tok, prompt, generated, ["France", "Paris", "capital"]) is None
    assert stops_at(tok, prompt, generated, ["Paris", "big"])[1:] == ("big", "is. It is ")


def test_prompt_ending_inside_a_character(tok: Tokenizer) -> None:
    ids = tok.encode("a🦙 b🦙", bos=True)
    prompt, generated = ids[:3], ids[3:]  # bos, "a", the llama's first byte
    assert tok.decode(prompt).endswith("\ufffd")
    assert stops_at(tok, prompt, generated, ["🦙"]) == (3, "🦙", "")
    assert stops_at(tok, prompt, generated, [" b🦙"])[1:] == (" b🦙", "🦙")


@pytest.mark.parametrize("bos", [True, False])
def test_text_from_an_empty_prompt_has_no_leading_space(tok: Tokenizer, bos: bool) -> None:
    prompt, generated = [tok.bos_id] if bos else [], tok.encode("Hello there. Hello", bos=False)
    assert tok.decode_continuation(prompt, generated) == "Hello there. Hello"
    assert stops_at(tok, prompt, generated, [" Hello"])[1:] == (" Hello", "Hello there.")


def test_cut_at_stop() -> None:
    assert cut_at_stop("one two three", ("three", "two")) == ("one ", "two")
    assert cut_at_stop("one two three", ("four",)) == ("one two three", None)
    assert cut_at_stop("abcabc", ("c",)) == ("ab", "c")
    assert cut_at_stop("xabc", ("ab", "abc")) == ("x", "ab")  # same start: the first listed
    assert cut_at_stop("xabc", ("abc", "ab")) == ("x", "abc")
    assert cut_at_stop("", ("a",)) == ("", None)
    assert cut_at_stop("abc", ()) == ("abc", None)


def random_stream(tok: Tokenizer, rng: random.Random, length: int) -> list[int]:
    """Runs of real text's tokens (whose characters' bytes are often split) and random ids,
    stop tokens left out as the engine leaves them out."""
    pieces = [i for text in TEXTS for i in tok.encode(text, bos=False)]
    ids: list[int] = []
    while len(ids) < length:
        if rng.random() < 0.3:
            ids += [i for i in [rng.randrange(tok.n_words)] if i not in tok.stop_ids]
        else:
            start = rng.randrange(len(pieces))
            ids += pieces[start : start + rng.randint(1, 6)]
    return ids[:length]


def random_stops(text: str, rng: random.Random) -> list[str]:
    """One to three pieces of `text` (or of a text it lacks), 1-6 characters long."""
    stops = []
    for _ in range(rng.randint(1, 3)):
        source = text if text and rng.random() < 0.9 else "Zq\u00e9\U0001f999"
        start = rng.randrange(len(source))
        space = " " if rng.random() < 0.2 else ""  # catches a lost or a doubled leading space
        stops.append(space + source[start : start + rng.randint(1, 6)])
    return stops


@pytest.mark.parametrize("seed", range(4))
def test_same_as_decoding_every_prefix(tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    fired = 0
    for _ in range(100):
        prompt = random_stream(tok, rng, rng.randint(0, 12))
        if rng.random() < 0.5:
            prompt.insert(0, tok.bos_id)
        generated = random_stream(tok, rng, 30)
        stops = random_stops(tok.decode_continuation(prompt, generated), rng)
        expected = by_full_decode(tok, prompt, generated, stops)
        assert watched(tok, prompt, generated, stops) == expected, (prompt, generated, stops)
        fired += expected is not None
    assert fired > 50


class DecodeLengths:
    """A real tokenizer that notes how many ids each decode call is given."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def encode(self, text: str, *, bos: bool) -> list[int]:
        return self.tokenizer.encode(text, bos=bos)

    def decode(self, ids: Sequence[int]) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids)


def test_decodes_a_bounded_window(tok: Tokenizer) -> None:
    pieces = [i for text in TEXTS for i in tok.encode(text, bos=False)]
    ids = (pieces * (4000 // len(pieces) + 1))[:4000]
    counting = DecodeLengths(tok)
    watch = StopWatch(counting, ids[:2000], ["never in the text"])  # type: ignore[arg-type]
    counting.lengths.clear()
    assert all(watch.add(token) is None for token in ids[2000:])
    assert len(counting.lengths) == 2000 and max(counting.lengths) <= 8
