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
from .passes import (CPU_ATTENTION_CHUNK, ForwardTimer, attention_chunks, compile_decode,
                     compile_failure, decode_kv_bucket, move_cache_row, prompt_logprobs,
                     write_table)
from .requests import Draw, EngineStats
from .rows import RowState
from .scheduler import Prefill, StepPlan


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
        self._compiled_decode = compile_decode(model) if compile else None

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
            self.stats.slot_steps += n
        if n and self._compiled_decode is not None:
            parts.append(self._decode_compiled(n, max(kv_lens)))
        elif n:
            chunks = (attention_chunks(kv_lens, self.attention_rows)
                      if self.device.type == "cpu" and self.attention_rows else None)
            steps.insert(0, self.model.make_step(self.rows.position[:n, None], slice(0, n),
                                                 max(kv_lens), chunks=chunks,
                                                 table=self._table(0, n)))
            tokens.insert(0, self.rows.next_token[:n])
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
        tokens = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=self.device)
        positions = torch.arange(longest, device=self.device).expand(n, longest)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        step = self.model.make_step(positions, slice(slot, slot + n), longest, fresh=True,
                                    last=last, table=self._table(slot, slot + n))
        self.rows.position[slot:slot + n] = last + 1
        self.stats.prefills += n
        return step, tokens.view(-1)

    def _chunked_prefill(self, prompt: list[int], slot: int) -> tuple[Step, torch.Tensor]:
        table = self._table(slot, slot + 1)
        chunk = limits.prefill_chunk(len(prompt),
                                     masked=table is None or self.model.paged_reads != "flex")
        tokens = torch.tensor(prompt, device=self.device)
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

    def _decode_compiled(self, n: int, kv_len: int) -> torch.Tensor:
        """Logits (n, vocab) of the compiled decode step for rows 0..n-1, over every row (padding
        rows, wasted, write at max_seq_len - 1: no prompt reaches it, a sequence writes it before
        reading it, and a paged row holding no block there names the sink). Reads of an unpaged
        cache are rounded up to `decode_kv_bucket`: a few shapes serve the whole run."""
        tokens, positions = self.rows.next_token[:n], self.rows.position[:n]
        if padding := self.max_batch_size - n:
            tokens = torch.cat((tokens, tokens.new_zeros(padding)))
            positions = torch.cat((positions, positions.new_full((padding,), self.max_seq_len - 1)))
        self.stats.slot_steps += padding
        self.stats.wasted_slot_steps += padding
        if self.table is not None and self.model.paged_reads == "flex":
            kv_len = self.max_seq_len  # unused: flex's block mask bounds each row's reads
        else:
            kv_len = decode_kv_bucket(kv_len, self.max_seq_len)
        blocks = () if self.table is None else (self.table.blocks, self.table.place)
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        try:
            return self._timed(self._compiled_decode, tokens, positions, kv_len, *blocks)[:n]
        except Exception as e:
            if (failed := compile_failure(e)) is None:
                raise
            raise failed from None

    def _timed(self, compute, *args):
        with self.forward_timer or contextlib.nullcontext():
            return compute(*args)
