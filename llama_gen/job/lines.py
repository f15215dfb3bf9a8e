"""Generated text for output lines: a completion's text as a line shows it (special tokens
dropped unless kept, cut before the stop string that ended it), and a batch request's choices,
held until the request has all of them."""
from __future__ import annotations

import os
import time
from typing import Any

from ..engine.requests import Completion, SamplingParams
from ..settings import Settings
from ..text.stopping import cut_at_stop
from ..text.tokenizer import Tokenizer
from .openai_output import Choice, request_id, response_line


def shown_ids(tokenizer: Tokenizer, ids: list[int], params: SamplingParams) -> list[int]:
    """The ids whose text a completion shows: special tokens only if asked to keep them."""
    if not params.skip_special_tokens:
        return ids
    return [t for t in ids if t not in tokenizer.special_ids]


def completion_text(tokenizer: Tokenizer, prompt_ids: list[int], new_ids: list[int],
                    params: SamplingParams, stop_reason: str | int | None) -> str:
    """The generated text, cut before the stop string that ended it. Stop strings count only
    after the first min_tokens tokens, as the engine looked for them."""
    shown = shown_ids(tokenizer, new_ids, params)
    text = tokenizer.decode_continuation(prompt_ids, shown)
    if isinstance(stop_reason, str):
        n_head = len(shown_ids(tokenizer, new_ids[:params.min_tokens], params))
        head_text = tokenizer.decode_continuation(prompt_ids, shown[:n_head]) if n_head else ""
        head = len(os.path.commonprefix([head_text, text]))  # a split character: U+FFFD there
        text = text[:head] + cut_at_stop(text[head:], params.stop)[0]
    return text


def batch_choice(completion: Completion, tokenizer: Tokenizer) -> Choice:
    """A batch request's completion as one of its choices: the text an output line would hold,
    and per token its id, text (a special token's name, sampled or an alternative), bytes,
    logprob and alternatives (when asked for). A special token the text leaves out is marked
    so, for completions' text_offset to point into the text."""
    request, p = completion.request, completion.request.params
    assert not p.echo, "a batch request never echoes its prompt"
    ids = completion.tokens
    text = completion_text(tokenizer, request.prompt_tokens, ids, p, completion.stop_reason)
    shown = set(shown_ids(tokenizer, ids, p))
    top = completion.top_logprobs
    return Choice(text, completion.finish_reason, list(ids),
                  [tokenizer.token_text(t) for t in ids], completion.logprobs,
                  None if top is None else [[(tokenizer.token_text(t), lp) for t, lp in alts]
                                            for alts in top],
                  [list(tokenizer.token_bytes(t)) for t in ids], [t in shown for t in ids])


class BatchAnswers:
    """Batch requests' choices, held until a request has all of them: its output line holds
    them all. What is held when the run stops is dropped (the next run makes it again)."""

    def __init__(self, settings: Settings, tokenizer: Tokenizer | None):
        self.settings, self.tokenizer = settings, tokenizer
        self.model = settings.ckpt_dir.resolve().name  # for a body that names no model
        self._held: dict[str, dict[int, Choice]] = {}

    def add(self, completion: Completion) -> dict[str, Any] | None:
        """The request's output line once this completion is its last choice, else None."""
        record, sample = completion.request.tag.record, completion.request.tag.sample
        held = self._held.setdefault(record.batch.custom_id, {})
        held[sample] = batch_choice(completion, self.tokenizer)
        n = self.settings.with_overrides(record.overrides).num_samples
        if len(held) < n:
            return None
        del self._held[record.batch.custom_id]
        return response_line(record.batch, [held[i] for i in range(n)],
                             completion.prompt_tokens, self.model,
                             request_id(record.batch.custom_id), int(time.time()))
