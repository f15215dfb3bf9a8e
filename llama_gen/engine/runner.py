"""Everything on the device: the model over its KV cache, the block table, the rows' decoding
state (`rows.RowState`), and one `run` per step of a scheduler's `StepPlan`.

A step: rows move (their state and, in an unpaged cache, their cache positions), the block
table's changed rows are written, requests are loaded into their rows (with their prompt's
logprobs if wanted: a teacher-forced pass of their own, the row's cache its scratch), then one
forward pass decodes the running rows (one token each) and prefills the new prompts
(right-padded; a long prompt chunk by chunk), so the layers' weights are read once for both.
With `compile`, the decode rows take a compiled copy of the model at fixed shapes (CUDA graphs on
GPUs) and the prefills an eager pass of their own. Then a token per row is drawn, and only the
tokens (and the logprobs asked for) come back to the host, in one copy per step.
"""
from __future__ import annotations

import contextlib

import torch

from ..model.transformer import BlockTable, Step, Transformer
from . import limits
from .blocks import BlockAllocator, OneBlockPerRow
from .decode import Decoder
from .passes import (CPU_ATTENTION_CHUNK, ForwardTimer, attention_chunks, move_cache_row,
                     prompt_logprobs, write_table)
from .requests import Draw, EngineStats
from .rows import RowState
from .scheduler import Prefill, StepPlan
from .transfer import to_device


class Runner:
    """The model and its cache for `max_batch_size` rows of up to `max_seq_len` positions, laid
    out as `blocks` says (one block of max_seq_len per row, or a pool of blocks with a table)."""

    def __init__(self, model: Transformer, blocks: BlockAllocator | OneBlockPerRow,
                 stop_ids: frozenset[int], max_batch_size: int, max_seq_len: int,
                 stats: EngineStats, compile: bool = False,
                 attention_rows: int | None = CPU_ATTENTION_CHUNK):
        self.model, self.stats, self.device = model, stats, model.output.weight.device
        self.attention_rows = attention_rows  # CPU decode rows per attention call (None: all)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.forward_timer: ForwardTimer | None = None  # set one to time forward passes
        self.table: BlockTable | None = None
        self.sink = -1
        if blocks.moves_data:
            model.setup_cache(max_batch_size, max_seq_len)
        else:  # + the sink
            model.setup_cache(max_batch_size, max_seq_len, blocks=blocks.n_blocks + 1,
                              block_size=blocks.block_size)
            self.sink = blocks.sink
            self.table = BlockTable(
                blocks=torch.full((max_batch_size, blocks.width), blocks.sink, dtype=torch.long,
                                  device=self.device),
                place=torch.full((blocks.n_blocks + 1,), -1, dtype=torch.long,
                                 device=self.device))
        self.rows = RowState(max_batch_size, model.args.vocab_size, stop_ids, self.device)
        self.decoder = Decoder(model, self.rows, self.table, self.sink, max_seq_len, stats,
                               compile)

    def warm_up(self) -> float:
        """Compile the decode step at every batch size it will take (and on CUDA record its
        graphs) before the first request; the seconds it took."""
        return self.decoder.warm_up() if self.decoder.compiled is not None else 0.0

    def run(self, plan: StepPlan) -> list[Draw]:
        """Do the plan's step: a `Draw` for each of its decoding and prefilled rows, in order."""
        prompts = self._prepare(plan)
        logits = self._forward(plan)
        tokens = self.rows.draw(logits, plan.held, plan.forced)
        return self.rows.records(logits, tokens, prompts)

    def _prepare(self, plan: StepPlan) -> dict[int, list[float]]:
        """Move rows, write the table's changed rows, load the requests; the prompt logprobs
        of the loaded rows that want them."""
        for move in plan.moves:
            self.rows.move(move.src, move.dst)
            if self.table is None:
                move_cache_row(self.model, move.src, move.dst, move.length)
        if self.table is not None:
            write_table(self.table, plan.table, self.sink)
        prompts = {}
        for row, request in plan.loads:
            self.rows.load(row, request)
            if request.params.prompt_logprobs:
                prompts[row] = self._timed(prompt_logprobs, self.model, request.prompt_tokens,
                                           row, self._table(row, row + 1))
        return prompts

    def _table(self, start: int, stop: int) -> BlockTable | None:
        """The block table of rows start..stop-1 (None in an unpaged cache)."""
        if self.table is None:
            return None
        return BlockTable(self.table.blocks[start:stop], self.table.place)

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        """Logits (rows, vocab): one row per decoding row 0..n-1 (row i reads plan.decode[i]
        cache positions), then one per prefilled prompt. Both share one pass, except that with
        `compile` the decode rows take the compiled step."""
        steps, tokens = [], []
        for prefill in plan.prefills:
            step, prompt_tokens = self._prefill_step(prefill)
            steps.append(step)
            tokens.append(prompt_tokens)
        kv_lens, parts = plan.decode, []
        n = len(kv_lens)
        if n:
            self.stats.decode_steps += 1
        if n and self.decoder.compiled is not None:
            parts.append(self._timed(self.decoder.compiled_logits, n, max(kv_lens)))
        elif n:
            chunks = (attention_chunks(kv_lens, self.attention_rows)
                      if self.device.type == "cpu" and self.attention_rows else None)
            step, decode_tokens = self.decoder.eager_step(n, max(kv_lens), chunks)
            steps.insert(0, step)
            tokens.insert(0, decode_tokens)
        if steps:
            parts.append(self._timed(self.model, torch.cat(tokens) if len(tokens) > 1
                                     else tokens[0], Step.join(steps)))
        if n:
            self.rows.position[:n] += 1
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _prefill_step(self, prefill: Prefill) -> tuple[Step, torch.Tensor]:
        """The step and tokens that prefill the prompts, right-padded, into rows prefill.row,
        prefill.row + 1, ...; its outputs are each prompt's last token. A prompt alone and
        longer than a pass allows goes through passes of its own here but for its last chunk,
        which is the step."""
        prompts, slot = prefill.prompts, prefill.row
        n, longest = len(prompts), max(map(len, prompts))
        if n == 1 and longest > limits.PREFILL_TOKENS:
            return self._chunked_prefill(prompts[0], slot)
        tokens = to_device([p + [0] * (longest - len(p)) for p in prompts], self.device)
        positions = torch.arange(longest, device=self.device).expand(n, longest)
        last = to_device([len(p) - 1 for p in prompts], self.device)
        step = self.model.make_step(positions, slice(slot, slot + n), longest, fresh=True,
                                    last=last, table=self._table(slot, slot + n))
        self.rows.position[slot:slot + n] = last + 1
        self.stats.prefills += n
        return step, tokens.view(-1)

    def _chunked_prefill(self, prompt: list[int], slot: int) -> tuple[Step, torch.Tensor]:
        table = self._table(slot, slot + 1)
        chunk = limits.prefill_chunk(len(prompt),
                                     masked=table is None or self.model.paged_reads != "flex")
        tokens = to_device(prompt, self.device)
        for start in range(0, len(prompt), chunk):
            stop = min(start + chunk, len(prompt))
            step = self.model.make_step(torch.arange(start, stop, device=self.device)[None],
                                        slice(slot, slot + 1), stop, fresh=start == 0,
                                        table=table)
            if stop == len(prompt):
                break
            self._timed(self.model.final_hidden, tokens[start:stop], step)  # fills the cache
        self.rows.position[slot] = len(prompt)
        self.stats.prefills += 1
        return step, tokens[start:]

    def _timed(self, compute, *args):
        with self.forward_timer or contextlib.nullcontext():
            return compute(*args)
