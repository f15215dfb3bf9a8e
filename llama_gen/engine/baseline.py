"""Static batching, Meta's reference loop (`llama/generation.py`), kept as the baseline that
`scripts/bench.py` and the tests measure continuous batching against: a second scheduler over
the same runner.

A batch of up to `max_batch_size` requests starts together at its shortest prompt (its first
step prefills every row's first `shortest` tokens); each step then gives every row its token at
the next position: a longer prompt's own token while it lasts (forced), else one drawn from the
logits. Every row steps until the whole batch is done, and the next batch starts only then. The
requests, sequences, rows' state and sampling are continuous batching's, so both give the same
completions.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from ..model.transformer import Transformer
from ..text.tokenizer import Tokenizer
from .blocks import OneBlockPerRow
from .engine import Engine
from .requests import Completion, Draw, EngineStats, Request, Sequence, must_fit
from .scheduler import Prefill, StepPlan, held_rows


class StaticScheduler:
    """Meta's static batches over the rows of an unpaged cache (`blocks`)."""

    def __init__(self, blocks: OneBlockPerRow, max_batch_size: int, max_seq_len: int,
                 stop_ids: frozenset[int], tokenizer: Tokenizer | None, stats: EngineStats):
        self.blocks = blocks
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.stop_ids, self.tokenizer, self.stats = stop_ids, tokenizer, stats
        self.start(iter(()))

    def start(self, requests: Iterator[Request]) -> None:
        """Schedule these requests from now on, in batches in their order."""
        self.pending = requests
        self.batch: list[Sequence] = []  # batch[i] holds row i
        self.pos = self.end = 0  # the position each row's next token takes; where all stop

    def schedule(self) -> StepPlan | None:
        """The next step: a new batch's prefill, or the batch's decode of the tokens at
        `pos` - 1 (all rows read `pos` positions); None when every request is done."""
        if self.batch:
            self.stats.wasted_slot_steps += sum(1 for s in self.batch if s.finish_reason)
            return StepPlan(decode=[self.pos] * len(self.batch), held=held_rows(self.batch),
                            forced=self._forced())
        requests = [must_fit(request, self.max_seq_len)
                    for request in itertools.islice(self.pending, self.max_batch_size)]
        if not requests:
            return None
        self.batch = [Sequence.start(r, self.max_seq_len, self.tokenizer) for r in requests]
        shortest = min(len(r.prompt_tokens) for r in requests)
        self.pos = shortest
        self.end = min(self.max_seq_len, max(len(r.prompt_tokens) + s.budget
                                             for r, s in zip(requests, self.batch)))
        for row, seq in enumerate(self.batch):
            self.blocks.extend(row, len(seq.request.prompt_tokens) + 1)
            if seq.budget <= 0:
                seq.finish_reason = "length"
        return StepPlan(loads=list(enumerate(requests)),
                        prefills=[Prefill(0, [r.prompt_tokens[:shortest] for r in requests])],
                        held=held_rows(self.batch), forced=self._forced())

    def _forced(self) -> dict[int, int]:
        """The rows whose prompt still has a token at `pos`: that token."""
        return {row: seq.request.prompt_tokens[self.pos] for row, seq in enumerate(self.batch)
                if self.pos < len(seq.request.prompt_tokens)}

    def postprocess(self, draws: list[Draw]) -> Iterator[Completion]:
        """Each row past its prompt takes its draw; when the batch is done, its completions."""
        for seq, draw in zip(self.batch, draws):
            if draw.prompt_logprobs is not None:
                seq.logprobs = [None, *draw.prompt_logprobs]
            if not (self.pos < len(seq.request.prompt_tokens) or seq.finish_reason):
                seq.append(draw.token, draw.logprob, self.stop_ids, draw.top)
        if all(s.finish_reason for s in self.batch) or self.pos == self.end - 1:
            yield from (seq.completion() for seq in self.batch)
            self.batch = []
        self.pos += 1


def StaticEngine(model: Transformer, stop_ids: Iterable[int], max_batch_size: int,  # noqa: N802
                 max_seq_len: int, tokenizer: Tokenizer | None = None, *,
                 kv_cache_tokens: int | None = None, kv_block_size: int | None = None) -> Engine:
    """The engine with Meta's layout too: every row holds max_seq_len positions (an unpaged
    cache), so a KV budget (`kv_cache_tokens`) bounds the batch instead of paging it, and a
    batch's decode attention is one call, as in Meta's reference; `kv_block_size` is not
    used."""
    if kv_cache_tokens is not None:
        if kv_cache_tokens < max_seq_len:
            raise ValueError(f"a KV cache of {kv_cache_tokens} positions cannot hold one "
                             f"sequence of max_seq_len {max_seq_len}")
        max_batch_size = min(max_batch_size, kv_cache_tokens // max_seq_len)
    return Engine(model, stop_ids, max_batch_size, max_seq_len, tokenizer=tokenizer,
                  kv_block_size=max_seq_len, scheduler=StaticScheduler, attention_rows=None)
