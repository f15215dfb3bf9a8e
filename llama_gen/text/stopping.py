"""Stop strings: found in the decoded text as tokens arrive, across token boundaries.

The generated text is, by definition, `tokenizer.decode_continuation(prompt_ids, generated_ids)`:
what the job writes. A completion stops at the first token after which that text contains a stop
string, and is cut before the stop string that starts earliest in it. Two stop strings that start
at the same place: the one listed first wins. (A `stop` value is checked where every setting is,
by `values.Rule`: a non-empty text or a list of them.)
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder writes for the bytes of a character not yet complete


def earliest_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Where the earliest-starting stop string occurs in `text`, and which one (ties: the first
    listed); None if none occurs."""
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    return best


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """`text` up to the earliest-starting stop string, and that string; (text, None) if none."""
    found = earliest_stop(text, stops)
    return (text, None) if found is None else (text[: found[0]], found[1])


def continuation(before: str, full: str) -> str:
    """What `full` adds after `before`, as `Tokenizer.decode_continuation` takes it."""
    if full.startswith(before):
        return full[len(before) :]
    return full[len(os.path.commonprefix([before, full])) :]


def last_chars(text: str, n: int) -> str:
    return text[max(len(text) - n, 0) :]


class StopWatch:
    """Watches one sequence's generated tokens for stop strings, at a bounded cost per token.

    Only the tokens since the last *clean cut* are decoded: a token boundary where the decoded
    text so far is non-empty and does not end in U+FFFD, so no character is still open and no
    later piece loses its leading space (SentencePiece drops it from the first piece only). The
    text after a clean cut does not depend on the tokens before it, so the window is decoded
    after a fixed sentinel piece standing for them. Of the text before the cut only its last
    `len(longest stop) - 1` characters are kept: a new match can start no earlier.

    Until the first clean cut after the prompt (a prompt whose text is empty or ends inside a
    character) the window is the whole sequence and the prompt's text is taken off as
    `decode_continuation` does. A window grows past a few tokens only while the text keeps
    ending in U+FFFD (bytes of no complete character), or stays empty.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stops: Sequence[str]):
        assert all(stops), "stop strings are non-empty (stop_problem)"
        self._tokenizer = tokenizer
        self._stops = tuple(stops)
        self._keep = max(map(len, self._stops), default=1) - 1
        self._sentinel = tokenizer.encode("a", bos=False)
        self._sentinel_text = tokenizer.decode(self._sentinel)
        assert self._sentinel_text == "a", self._sentinel_text
        self._tail = ""  # the last `_keep` characters of the generated text before the cut
        self.stop: str | None = None  # the stop string found, once found
        prompt_text = tokenizer.decode(prompt_ids)
        if self._is_clean(prompt_text):
            self._restart()
        else:
            self._context: list[int] = []
            self._context_text = ""
            self._window = list(prompt_ids)
            self._prompt_text = prompt_text

    def add(self, token: int) -> str | None:
        """Take the next generated token; the stop string starting earliest in the generated
        text, as soon as that text contains one (then add no more tokens)."""
        assert self.stop is None, "a stopped sequence takes no more tokens"
        self._window.append(token)
        full = self._tokenizer.decode([*self._context, *self._window])
        text = continuation(self._prompt_text, full[len(self._context_text) :])
        found = earliest_stop(self._tail + text, self._stops)
        if found is not None:
            self.stop = found[1]
            return self.stop
        if self._is_clean(full) and self._prompt_settled(full):
            self._tail = last_chars(self._tail + text, self._keep)
            self._restart()
        return None

    @staticmethod
    def _is_clean(text: str) -> bool:
        return text != "" and not text.endswith(REPLACEMENT)

    def _prompt_settled(self, full: str) -> bool:
        """Whether the generated text's start is fixed: `full` (the text from the sequence's
        start while the prompt is in the window) is no longer a proper prefix of the prompt's.
        A guard: the decoders we know never shrink the text as tokens arrive."""
        before = self._prompt_text
        return full.startswith(before) or not before.startswith(full)

    def _restart(self) -> None:
        """Start a new window at a clean cut."""
        self._context = self._sentinel
        self._context_text = self._sentinel_text
        self._window = []
        self._prompt_text = ""
