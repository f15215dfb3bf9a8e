"""The `llama-gen` command: flags in, completions out."""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import fire

from . import parallel
from .build import default_model_parallel_size, load_model, read_model_args, resolve_dtype
from .checkpoint import find_shards
from .engine import Engine, Request, SamplingParams
from .errors import UserError
from .sampling import derive_seed
from .tokenizer import find_tokenizer, load_tokenizer

log = logging.getLogger("llama_gen")


@dataclass(frozen=True)
class Settings:
    ckpt_dir: Path
    prompts: tuple[str, ...]
    tokenizer_path: Path | None = None
    max_seq_len: int = 1024
    max_batch_size: int = 8
    max_gen_len: int | None = 256
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int = 0
    dtype: str | None = None
    logprobs: bool = False
    echo: bool = False
    model_parallel_size: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "max_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1")
        if self.max_gen_len is not None and self.max_gen_len < 1:
            raise UserError("--max_gen_len must be at least 1")
        if self.temperature < 0:
            raise UserError("--temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError("--top_p must be in (0, 1]")


def run(settings: Settings) -> None:
    tokenizer = load_tokenizer(find_tokenizer(settings.ckpt_dir, settings.tokenizer_path))
    read_model_args(settings.ckpt_dir, tokenizer)  # params.json errors before any process group
    n_shards = len(find_shards(settings.ckpt_dir))
    _, world_size, _ = parallel.launch_env()
    mp = settings.model_parallel_size or default_model_parallel_size(world_size, n_shards)
    dist = parallel.init_distributed(mp, settings.device)
    try:
        dtype = resolve_dtype(settings.dtype, dist.device)
        model = load_model(settings.ckpt_dir, tokenizer, dist, dtype)
        engine = Engine(model, tokenizer.stop_ids, settings.max_batch_size, settings.max_seq_len)
        mine = range(dist.data_parallel_rank, len(settings.prompts), dist.data_parallel_size)
        requests = [Request(tokenizer.encode(settings.prompts[i], bos=True), SamplingParams(
            temperature=settings.temperature, top_p=settings.top_p,
            max_gen_len=settings.max_gen_len, seed=derive_seed(settings.seed, i),
            logprobs=settings.logprobs, echo=settings.echo), tag=i) for i in mine]
        results = []
        for c in engine.generate(requests):
            prompt_ids = c.request.prompt_tokens
            new_ids = c.tokens[len(prompt_ids):] if settings.echo else c.tokens
            text = tokenizer.decode_continuation(prompt_ids, new_ids)
            record = {"index": c.request.tag, "prompt": settings.prompts[c.request.tag],
                      "completion": settings.prompts[c.request.tag] + text if settings.echo
                      else text,
                      "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                      "completion_tokens": c.completion_tokens}
            if c.error:
                record["error"] = c.error
            if c.logprobs is not None:
                record["logprobs"] = c.logprobs
            results.append(record)
        failed = []
        for record in sorted(parallel.gather_to_rank0(results), key=lambda r: r["index"]):
            print(json.dumps(record, ensure_ascii=False), flush=True)
            if "error" in record:
                failed.append(f"prompt {record['index']}: {record['error']}")
        if failed:
            raise UserError(f"{len(failed)} prompt(s) failed; first: {failed[0]}")
    finally:
        parallel.shutdown()


def generate(ckpt_dir: str, prompt: str | list[str], tokenizer_path: str | None = None,
             max_seq_len: int = 1024, max_batch_size: int = 8, max_gen_len: int | None = 256,
             temperature: float = 0.6, top_p: float = 0.9, seed: int = 0,
             dtype: str | None = None, logprobs: bool = False, echo: bool = False,
             model_parallel_size: int | None = None, device: str | None = None) -> None:
    """Generate completions for prompts with a Meta-format LLaMA checkpoint; prints JSON lines.

    Run as one process (`llama-gen ...`) or several (`torchrun --nproc_per_node N --no-python
    llama-gen ...`): the checkpoint is resharded to the model-parallel size as needed.

    Args:
        ckpt_dir: directory with params.json and consolidated.NN.pth shards.
        prompt: a prompt, or a list of prompts (--prompt='["a", "b"]').
        tokenizer_path: tokenizer.model (SentencePiece or tiktoken); default: in ckpt_dir or its parent.
        max_seq_len: longest prompt + completion, in tokens; sizes the KV cache.
        max_batch_size: sequences decoded together; sizes the KV cache.
        max_gen_len: most tokens generated per prompt.
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling mass.
        seed: random seed; each prompt draws from its own stream derived from it.
        dtype: bf16, fp16 or fp32 (default: bf16 on GPUs that support it, else fp32).
        logprobs: include each token's log-probability.
        echo: include the prompt (and its logprobs) in the output.
        model_parallel_size: processes per model copy (default: the number of shards when it divides the world size, else the world size).
        device: force a device (e.g. cpu); default: this rank's GPU if any, else cpu.
    """
    prompts = (prompt,) if isinstance(prompt, str) else tuple(str(p) for p in prompt)
    run(Settings(Path(ckpt_dir), prompts, Path(tokenizer_path) if tokenizer_path else None,
                 max_seq_len, max_batch_size, max_gen_len, temperature, top_p, seed, dtype,
                 logprobs, echo, model_parallel_size, device))


def _setup_logging() -> None:
    rank, _, _ = parallel.launch_env()
    logging.basicConfig(format="llama-gen: %(message)s", stream=sys.stderr,
                        level=logging.INFO if rank == 0 else logging.WARNING)


@parallel.record_errors
def main(argv: list[str] | None = None) -> None:
    _setup_logging()
    try:
        fire.Fire(generate, command=argv, name="llama-gen")
    except UserError as e:
        rank, _, _ = parallel.launch_env()
        if rank == 0:
            print(f"llama-gen: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
