"""The engine: a scheduler that decides (`scheduler.Scheduler`, continuous batching, or
`baseline.StaticScheduler`, Meta's static batches) and a runner that executes (`runner.Runner`),
in a loop of three calls a step, as nano-vllm's: schedule, run, postprocess.

The path of one token: `Engine._run` asks the scheduler for the step's `StepPlan`; `Runner.run`
does it on the device, drawing each row's token (`RowState.draw`, `sampling.sample`) and
copying the tokens back in one copy (`RowState.records`: one `Draw` per row); the scheduler's
`postprocess` gives each sequence its draw (`Sequence.append`) and yields the completions of
the finished.

A prompt's own logprobs (echo with logprobs) come from `prompt_logprobs`, a teacher-forced pass
of their own; the scoring of whole texts uses the same pass.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from ..model.transformer import Transformer
from ..text.tokenizer import Tokenizer
from .blocks import cache_blocks, default_block_size
from .passes import CPU_ATTENTION_CHUNK, ForwardTimer
from .requests import Completion, EngineStats, Request
from .runner import Runner
from .scheduler import Scheduler


class Engine:
    """`max_batch_size` rows of up to `max_seq_len` positions over `model`, stopping at
    `stop_ids`; `tokenizer` is needed only by requests with stop strings. The KV cache holds
    `kv_cache_tokens` positions (default: max_seq_len for every row) in blocks of
    `kv_block_size` (default: `default_block_size`); with one block of max_seq_len per row it is
    unpaged. `compile` runs decode steps through `compile_decode`. `scheduler` decides the
    steps: continuous batching, or the static baseline's (`baseline.StaticEngine`). On the CPU a
    decode step's attention runs `attention_rows` rows per call (None: the whole batch in one)."""

    def __init__(self, model: Transformer, stop_ids: Iterable[int], max_batch_size: int,
                 max_seq_len: int, *, tokenizer: Tokenizer | None = None,
                 compile: bool = False, kv_cache_tokens: int | None = None,
                 kv_block_size: int | None = None, scheduler: type = Scheduler,
                 attention_rows: int | None = CPU_ATTENTION_CHUNK):
        self.model = model
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.stop_ids = frozenset(stop_ids)
        stats = EngineStats()
        device = model.output.weight.device
        self.blocks = cache_blocks(max_batch_size, max_seq_len,
                                   kv_block_size or default_block_size(device, max_seq_len),
                                   kv_cache_tokens)
        self.runner = Runner(model, self.blocks, self.stop_ids, max_batch_size, max_seq_len,
                             stats, compile, attention_rows)
        self.scheduler = scheduler(self.blocks, max_batch_size, max_seq_len, self.stop_ids,
                                   tokenizer, stats)

    @property
    def stats(self) -> EngineStats:
        """What the scheduler and the runner counted; assign a fresh one to start again."""
        return self.scheduler.stats

    @stats.setter
    def stats(self, stats: EngineStats) -> None:
        self.scheduler.stats = self.runner.stats = stats

    @property
    def forward_timer(self) -> ForwardTimer | None:
        """Set one to time the forward passes."""
        return self.runner.forward_timer

    @forward_timer.setter
    def forward_timer(self, timer: ForwardTimer | None) -> None:
        self.runner.forward_timer = timer

    def generate(self, requests: Iterable[Request],
                 should_stop: Callable[[], bool] | None = None) -> Iterator[Completion]:
        """Completions in the order they finish; all model-parallel ranks must pass the same
        requests in the same order. `should_stop` is asked before every forward pass; when it
        says yes, unfinished sequences, and admitted prompts not yet prefilled, are dropped.
        A request that cannot run (see `requests.fits`) raises PromptUnfit, a ValueError, when it
        is reached."""
        return self._run(iter(requests), should_stop or (lambda: False))

    @torch.inference_mode()  # entered at each resumption of the generator
    def _run(self, requests: Iterator[Request],
             should_stop: Callable[[], bool]) -> Iterator[Completion]:
        self.scheduler.start(requests)
        while (plan := self.scheduler.schedule()) is not None and not should_stop():
            yield from self.scheduler.postprocess(self.runner.run(plan))
