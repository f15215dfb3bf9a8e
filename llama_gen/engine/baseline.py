"""Static batching, Meta's reference loop (`llama/generation.py`), kept as the baseline that
`scripts/bench.py` and the tests measure the continuous engine against.

A batch of up to `max_batch_size` requests starts together at its shortest prompt (`_prefill`);
each step then chooses every row's next token (`_choose`): a longer prompt's own token while it
lasts, else one drawn from the logits. Every row steps until the whole batch is done, and the
next batch starts only then. The requests, sequences, slot state, sampling and counters are the
continuous engine's (`engine.SlotEngine`), so both give the same completions.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch

from ..model.transformer import Transformer
from ..text.tokenizer import Tokenizer
from .engine import Completion, Request, Sequence, SlotEngine, checked


class StaticEngine(SlotEngine):
    """Meta's layout too: every row holds max_seq_len positions (an unpaged cache), so a KV
    budget (`kv_cache_tokens`) bounds the batch instead of paging it."""

    def __init__(self, model: Transformer, stop_ids: Iterable[int], max_batch_size: int,
                 max_seq_len: int, tokenizer: Tokenizer | None = None, *,
                 kv_cache_tokens: int | None = None, kv_block_size: int | None = None):
        if kv_cache_tokens is not None:
            if kv_cache_tokens < max_seq_len:
                raise ValueError(f"a KV cache of {kv_cache_tokens} positions cannot hold one "
                                 f"sequence of max_seq_len {max_seq_len}")
            max_batch_size = min(max_batch_size, kv_cache_tokens // max_seq_len)
        super().__init__(model, stop_ids, max_batch_size, max_seq_len, tokenizer,
                         kv_block_size=max_seq_len)

    def generate(self, requests: Iterable[Request],
                 should_stop: Callable[[], bool] | None = None) -> Iterator[Completion]:
        """Completions batch by batch (as `Engine.generate`, whose rules they follow)."""
        return self._run(iter(requests), should_stop or (lambda: False))

    @torch.inference_mode()  # entered at each resumption of the generator
    def _run(self, pending: Iterator[Request],
             should_stop: Callable[[], bool]) -> Iterator[Completion]:
        while batch := [checked(request, self.max_seq_len)
                        for request in itertools.islice(pending, self.max_batch_size)]:
            stopped = yield from self._batch(batch, should_stop)
            if stopped:
                return

    def _batch(self, requests: list[Request], should_stop: Callable[[], bool]):
        """Meta's loop over one batch in slots 0..n-1; returns True if stopped early."""
        batch = [self._start(request, slot) for slot, request in enumerate(requests)]
        n = len(batch)
        shortest = min(len(r.prompt_tokens) for r in requests)
        end = min(self.max_seq_len, max(len(r.prompt_tokens) + s.budget
                                        for r, s in zip(requests, batch)))
        logits = self._prefill(batch, shortest)
        for pos in range(shortest, end):  # choose the token at `pos` for every row
            chosen = self._choose(batch, pos, logits)
            if all(s.finish_reason for s in batch) or pos == end - 1:
                break
            if should_stop():
                return True
            self.stats.decode_steps += 1
            self.stats.slot_steps += n
            self.stats.wasted_slot_steps += sum(1 for s in batch if s.finish_reason)
            positions = torch.full((n,), pos, device=self.device)
            logits = self._timed(self.model.decode, chosen, positions, pos + 1)
        for seq in batch:
            yield seq.completion()
        return False

    def _prefill(self, batch: list[Sequence], shortest: int) -> torch.Tensor:
        """Every row's first `shortest` prompt tokens in one pass: the logits of the last."""
        n = len(batch)
        tokens = torch.tensor([s.request.prompt_tokens[:shortest] for s in batch],
                              device=self.device)
        positions = torch.arange(shortest, device=self.device).expand(n, shortest)
        step = self.model.make_step(positions, slice(0, n), shortest, fresh=True)
        self.stats.prefills += n
        for seq in batch:
            if seq.budget <= 0:
                seq.finish_reason = "length"
        return self._timed(self.model, tokens, step)

    def _choose(self, batch: list[Sequence], pos: int, logits: torch.Tensor) -> torch.Tensor:
        """Each row's token at `pos`: its prompt's while the prompt lasts (a forced token uses
        no random number), else one drawn from its logits, which its sequence takes."""
        prompts = [s.request.prompt_tokens for s in batch]
        forced = [pos < len(p) for p in prompts]
        drawn = self._draw(batch, logits)
        forced_t = torch.tensor(forced, device=self.device)
        self._counter[:len(batch)] -= forced_t.long()
        self._count(drawn, ~forced_t)
        chosen = [p[pos] if f else t for p, f, t in zip(prompts, forced, drawn.tolist())]
        chosen_t = torch.tensor(chosen, device=self.device)
        _, logprobs, tops = self._detail(batch, logits, chosen_t)
        for seq, f, token, logprob, top in zip(batch, forced, chosen, logprobs, tops):
            if not (f or seq.finish_reason):
                seq.append(token, logprob, self.stop_ids, top)
        return chosen_t
