"""The `llama-gen` command: flags into JobSettings, run the job, exit codes.

    torchrun --nproc_per_node N --no-python llama-gen --ckpt_dir DIR --prompt_path p.jsonl \\
        --out_path out.jsonl [flags]
    llama-gen demo
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import fire

from . import distributed
from .errors import UserError
from .flags import strict_flags
from .job import Interrupted, JobSettings, run_job
from .replicas import StoreLost

log = logging.getLogger("llama_gen")


@strict_flags
def generate(ckpt_dir: str, prompt_path: str, out_path: str, logging_path: str | None = None,
             tokenizer_path: str | None = None, max_seq_len: int = 1024,
             max_batch_size: int = 8, max_gen_len: int = 256, temperature: float = 0.6,
             top_p: float = 0.9, seed: int = 0, dtype: str | None = None,
             prompt_key: str = "prompt", id_key: str | None = None, num_samples: int = 1,
             logprobs: bool = False, echo: bool = False, strict: bool = False,
             overwrite: bool = False, model_parallel_size: int | None = None,
             device: str | None = None, scheduler: str = "continuous",
             compile: bool = False) -> None:
    """Answer every prompt of a JSONL file with a Meta-format LLaMA checkpoint, resumably.

    Writes one line per (prompt, sample) to --out_path: the input record's fields plus id,
    sample, completion, finish_reason, prompt_tokens, completion_tokens (and logprobs). Run the
    same command again after a crash to continue: nothing is lost or written twice. Bad input
    lines go to <out_path>.errors.jsonl.

    Args:
        ckpt_dir: directory with params.json and consolidated.NN.pth shards.
        prompt_path: JSONL file, one object per line with a prompt field.
        out_path: JSONL output, appended to and resumed from.
        logging_path: progress log for people (default <out_path>.log).
        tokenizer_path: tokenizer.model (default: in ckpt_dir or its parent).
        max_seq_len: longest prompt + completion in tokens; sizes the KV cache.
        max_batch_size: sequences decoded together; sizes the KV cache.
        max_gen_len: most tokens generated per sample (a record may override it).
        temperature: sampling temperature, 0 = greedy (a record may override it).
        top_p: nucleus sampling mass (a record may override it).
        seed: base seed; each (record, sample) draws from its own stream (a record may override it).
        dtype: bf16, fp16 or fp32 (default bf16 on GPUs that support it, else fp32).
        prompt_key: the field holding the prompt.
        id_key: the field holding a record's id (default: id if present, else the line number).
        num_samples: completions per prompt (a record may override it).
        logprobs: write each generated token's log-probability.
        echo: include the prompt in the completion.
        strict: stop at the first bad input line instead of recording it and going on.
        overwrite: start over even if out_path holds output of other settings.
        model_parallel_size: processes per model copy (default: the shard count when it divides the number of processes, else all of them).
        device: force a device such as cpu (default: this rank's GPU if any, else cpu).
        scheduler: continuous (a finished sequence's slot takes the next prompt at once) or static (Meta's reference batching, for comparison); both give the same completions.
        compile: compile the decode step with torch.compile, replayed as CUDA graphs on GPUs (the first steps wait for the compiler).
    """
    run_job(JobSettings(
        Path(ckpt_dir), Path(prompt_path), Path(out_path),
        Path(logging_path) if logging_path else None,
        Path(tokenizer_path) if tokenizer_path else None, max_seq_len, max_batch_size,
        max_gen_len, temperature, top_p, seed, dtype, prompt_key, id_key, num_samples, logprobs,
        echo, strict, overwrite, model_parallel_size, device, scheduler, compile))


def fire_command(command, argv: list[str], name: str) -> None:
    """Run a `strict_flags` command with fire, or show its help (for the command as written:
    the checked form's catch-alls would take --help for an unknown flag). Asking for help never
    runs it, whatever else the line holds."""
    if any(arg in ("--help", "-h") for arg in argv):
        argv, command = ["--", "--help"], command.__wrapped__
    fire.Fire(command, command=argv, name=name)


def _setup_logging() -> None:
    rank = distributed.launch_env().rank
    logging.basicConfig(format="llama-gen: %(message)s", stream=sys.stderr,
                        level=logging.INFO if rank == 0 else logging.WARNING)


@distributed.record_errors
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _setup_logging()
    rank = distributed.launch_env().rank
    try:
        if argv[:1] == ["demo"]:
            from .demo import demo
            fire_command(strict_flags(demo), argv[1:], "llama-gen demo")
        else:
            fire_command(generate, argv, "llama-gen")
    except UserError as e:
        if rank == 0:
            print(f"llama-gen: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        if rank == 0:
            print(f"llama-gen: {e}; what was finished is written: resume with the same command",
                  file=sys.stderr)
        sys.exit(128 + e.signum)
    except StoreLost as e:
        if rank == 0:
            print(f"llama-gen: error: {e}; what reached the writer is written: run the same "
                  "command again to resume", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before the job's own handler is installed
        if rank == 0:
            print("llama-gen: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if e.filename is None:  # not about a file: a bug's traceback is worth more
            raise
        print(f"llama-gen: error: {e}", file=sys.stderr)  # a full disk, a read-only folder
        sys.exit(1)


if __name__ == "__main__":
    main()
