"""The decoding state of the runner's rows, on the device so a decode step copies nothing in: per
row, the last token and where it goes, the random stream's counter and seed, and the sampling
controls; per row too, on the host, the request's parameters (what the draw branches on). It
moves with its sequence (`move`) and is set when a row starts a request (`load`). `draw` turns a
step's logits into each row's token and `records` brings the tokens back in one copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .requests import Draw, Request, SamplingParams
from .sampling import apply_penalties, argmax, counter_uniform, sample, token_logprobs, top_logprobs
from .transfer import to_device


@dataclass
class TokenCounts:
    """Per row, which tokens its prompt holds and how often each was generated: what the
    repetition, presence and frequency penalties read. Rows of requests without penalties are
    not kept up to date (their penalties are neutral)."""

    in_prompt: torch.Tensor  # (rows, vocab) bool
    generated: torch.Tensor  # (rows, vocab) int32

    @classmethod
    def empty(cls, rows: int, vocab: int, device: torch.device) -> TokenCounts:
        return cls(torch.zeros(rows, vocab, dtype=torch.bool, device=device),
                   torch.zeros(rows, vocab, dtype=torch.int32, device=device))

    def restart(self, row: int, prompt: list[int]) -> None:
        self.in_prompt[row] = False
        self.in_prompt[row, to_device(prompt, self.in_prompt.device)] = True
        self.generated[row] = 0

    def add(self, tokens: torch.Tensor, taken: torch.Tensor | None = None) -> None:
        """Count row i's new token tokens[i], for rows 0..n-1 (where `taken`)."""
        rows = torch.arange(len(tokens), device=tokens.device)
        ones = self.generated.new_ones(()) if taken is None else taken.to(self.generated.dtype)
        self.generated.index_put_((rows, tokens), ones, accumulate=True)


class RowState:
    """`n_rows` rows of decoding state; `vocab` sizes the penalties' counts, made when a request
    first asks for penalties."""

    def __init__(self, n_rows: int, vocab: int, stop_ids: frozenset[int], device: torch.device):
        def zeros(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n_rows, device=device, dtype=dtype)
        self.n_rows, self.vocab, self.device = n_rows, vocab, device
        self.next_token = zeros(torch.long)  # the last token, input of the next step
        self.position = zeros(torch.long)  # where that token goes in the cache
        self.counter = zeros(torch.long)  # index of the token to draw next (the RNG counter)
        self.seed = zeros(torch.long)
        self.temperature, self.top_p = zeros(torch.float32), zeros(torch.float32)
        self.top_k, self.min_p = zeros(torch.long), zeros(torch.float32)
        self.repetition, self.presence = zeros(torch.float32), zeros(torch.float32)
        self.frequency = zeros(torch.float32)
        self.counts: TokenCounts | None = None
        self.params: list[SamplingParams | None] = [None] * n_rows
        self._stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self._tensors = [self.next_token, self.position, self.counter, self.seed,
                         self.temperature, self.top_p, self.top_k, self.min_p, self.repetition,
                         self.presence, self.frequency]

    def load(self, row: int, request: Request) -> None:
        """Row `row` starts the request: its controls, its stream at counter 0, and, if it
        wants penalties, its prompt's tokens counted."""
        p = self.params[row] = request.params
        self.seed[row], self.counter[row] = p.seed, 0
        self.temperature[row], self.top_p[row] = p.temperature, p.top_p
        self.top_k[row], self.min_p[row] = p.top_k, p.min_p
        self.repetition[row], self.presence[row] = p.repetition_penalty, p.presence_penalty
        self.frequency[row] = p.frequency_penalty
        if p.penalised:
            if self.counts is None:
                self.counts = TokenCounts.empty(self.n_rows, self.vocab, self.device)
                self._tensors += [self.counts.in_prompt, self.counts.generated]
            self.counts.restart(row, request.prompt_tokens)

    def move(self, src: int, dst: int) -> None:
        """Row src's state becomes row dst's."""
        for state in self._tensors:
            state[dst] = state[src]
        self.params[dst] = self.params[src]

    def draw(self, logits: torch.Tensor, held: list[int],
             forced: dict[int, int] | None = None) -> torch.Tensor:
        """Tokens for rows 0..n-1 from their logits rows, each from its own (seed, counter)
        stream; in order: penalties, stop tokens held back in the `held` rows, then greedy, or
        temperature and top-k / top-p / min-p (`sampling.sample`). A `forced` row takes the
        token given instead, and its counter stays (a forced token uses no random number). The
        tokens taken are the rows' next inputs."""
        n = len(logits)
        rows, params = slice(0, n), self.params[:n]
        if self.counts is not None and any(p.penalised for p in params):
            logits = apply_penalties(logits, self.counts.in_prompt[rows],
                                     self.counts.generated[rows], self.repetition[rows],
                                     self.presence[rows], self.frequency[rows])
        if held:
            logits = logits.index_put((to_device(held, self.device)[:, None], self._stop_ids),
                                      logits.new_full((), float("-inf")))
        if all(p.temperature == 0 for p in params):
            tokens = argmax(logits)
        else:
            uniform = counter_uniform(self.seed[rows], self.counter[rows])
            tokens = sample(logits, self.temperature[rows], self.top_p[rows], uniform,
                            self.top_k[rows] if any(p.top_k for p in params) else None,
                            self.min_p[rows] if any(p.min_p for p in params) else None)
        self.counter[rows] += 1
        taken = None
        if forced:
            taken = to_device([i not in forced for i in range(n)], self.device, torch.bool)
            given = to_device([forced.get(i, 0) for i in range(n)], self.device)
            self.counter[rows] -= (~taken).long()
        if self.counts is not None:
            self.counts.add(tokens, taken)
        if taken is not None:
            tokens = torch.where(taken, tokens, given)
        self.next_token[rows] = tokens
        return tokens

    def records(self, logits: torch.Tensor, tokens: torch.Tensor,
                prompt_logprobs: dict[int, list[float]]) -> list[Draw]:
        """Rows 0..n-1's tokens, each one's logprob and its top alternatives where its request
        wants them (under the model's own distribution: before penalties, temperature and
        filters), in one copy from the device: float32 columns, exact for token ids below
        2 ** 24. A row in `prompt_logprobs` carries its prompt's too."""
        params = self.params[:len(tokens)]
        columns = [tokens.float()[:, None]]
        if wants_logprobs := any(p.logprobs for p in params):
            columns.append(token_logprobs(logits, tokens)[:, None])
        if k := max(p.top_logprobs for p in params):
            columns += top_logprobs(logits, k)[::-1]  # ids, then their logprobs
        host = torch.cat([c.float() for c in columns], dim=1).tolist() if len(columns) > 1 \
            else [[t] for t in tokens.tolist()]
        first = 1 + wants_logprobs
        return [Draw(int(row[0]), row[1] if wants_logprobs else None,
                     [(int(t), v) for t, v in zip(row[first:first + p.top_logprobs],
                                                  row[first + k:first + k + p.top_logprobs])]
                     if p.top_logprobs else None,
                     prompt_logprobs.get(i))
                for i, (row, p) in enumerate(zip(host, params))]
