"""The `llama-gen` command: words into `Settings`, run the job, one-line errors and exit codes.

    torchrun --nproc_per_node N --no-python llama-gen --ckpt_dir DIR --prompt_path p.jsonl \\
        --out_path out.jsonl [flags]
    llama-gen score --ckpt_dir DIR --prompt_path texts.jsonl --out_path scores.jsonl
    llama-gen demo
    llama-gen plan --ckpt_dir DIR --nproc N --gpu_memory 24GB
"""
from __future__ import annotations

import difflib
import logging
import sys
from typing import NoReturn

import torch

from .. import __version__
from ..engine.passes import CompileFailed
from ..errors import UserError
from ..job.driver import Incomplete, Interrupted, run_job
from ..job.replicas import StoreLost
from ..runtime import distributed
from ..settings import ScoreSettings, Settings
from .flags import HELP_WORDS, help_text, parse

log = logging.getLogger("llama_gen")

USAGE = ("torchrun --nproc_per_node N --no-python llama-gen --ckpt_dir DIR --prompt_path "
         "PROMPTS.jsonl --out_path OUT.jsonl [flags]")
SUMMARY = """\
Answer every prompt of a JSONL file with a Meta-format LLaMA checkpoint, resumably.

Writes one line per (prompt, sample) to --out_path: the input record's fields plus id, sample,
completion, finish_reason, prompt_tokens, completion_tokens (and logprobs). Run the same
command again after a crash to continue: nothing is lost or written twice. Bad input lines go
to <out_path>.errors.jsonl. Without torchrun, `llama-gen --ckpt_dir ...` runs one process."""

SCORE_USAGE = ("torchrun --nproc_per_node N --no-python llama-gen score --ckpt_dir DIR "
               "--prompt_path TEXTS.jsonl --out_path OUT.jsonl [flags]")
SCORE_SUMMARY = """\
Score every record of a JSONL file by its log-likelihood under a Meta-format LLaMA checkpoint,
teacher-forced, resumably: a whole text ({"text": ...}, every token after bos), a completion
given its prompt ({"prompt": ..., "completion": ...}), or a dialog's last assistant message
given the messages before it ({"messages": [...]}, in the checkpoint's chat format).

Writes one line per record: its fields plus id, sample (0), logprob (the sum), n_tokens and
mean_logprob (and with --logprobs, token_logprobs and token_ids). Resume, lock, errors file and
progress work as for generation."""


COMMANDS = ("score", "plan", "demo")


def command(argv: list[str]) -> None:
    """Run what `argv` asks for; help and the version go to stdout and run nothing."""
    from .demo import DEMO_SUMMARY, DemoSettings, demo
    from .plan import PLAN_SUMMARY, PLAN_USAGE, PlanSettings, plan, without_run_only_flags
    asks_help = any(word in HELP_WORDS for word in argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        near = difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.6)
        if near:
            raise UserError(f"unknown command {argv[0]!r}: did you mean `llama-gen {near[0]}`?")
    if argv == ["--version"]:
        print(f"llama-gen {__version__} (torch {torch.__version__})")
    elif argv[:1] == ["demo"]:
        if asks_help:
            print(help_text(DemoSettings, "llama-gen demo [flags]", DEMO_SUMMARY), end="")
        else:
            demo(parse(DemoSettings, argv[1:], "llama-gen demo"))
    elif argv[:1] == ["plan"]:
        if asks_help:
            print(help_text(PlanSettings, PLAN_USAGE, PLAN_SUMMARY), end="")
        else:
            plan(parse(PlanSettings, without_run_only_flags(argv[1:]), "llama-gen plan"))
    elif argv[:1] == ["score"]:
        if asks_help:
            print(help_text(ScoreSettings, SCORE_USAGE, SCORE_SUMMARY), end="")
        else:
            run_job(parse(ScoreSettings, argv[1:], "llama-gen score"))
    elif asks_help:
        print(help_text(Settings, USAGE, SUMMARY, {
            "score": "score texts by their log-likelihood (llama-gen score --help)",
            "plan": "will a run fit on its GPUs, and at which batch size? (llama-gen plan "
                    "--help)",
            "demo": "try the whole pipeline on a tiny model (llama-gen demo --help)"}), end="")
    else:
        run_job(parse(Settings, argv, "llama-gen"))


def out_of_memory_advice(error: torch.OutOfMemoryError) -> str:
    """One line: what ran out, that finished lines are kept, and what to change."""
    first = next((line for line in str(error).splitlines() if line.strip()), "")
    cause = f" ({first[:200]})" if first else ""
    return (f"out of memory{cause}; every finished line is written. Lower "
            "--gpu_memory_utilization (the KV cache takes what it leaves), --max_batch_size or "
            "--max_seq_len, use --dtype bf16 or fp16, or spread the model over more GPUs "
            "(`llama-gen plan` with the same flags shows what fits), then run the same command "
            "to resume")


def _setup_logging(rank: int) -> None:
    logging.basicConfig(format="llama-gen: %(message)s", stream=sys.stderr,
                        level=logging.INFO if rank == 0 else logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    """`llama-gen`. Under torchrun, a rank that fails ends with a hard exit once its line (or a
    crash's traceback) is said: its files are closed and its process group aborted by then,
    and the interpreter's own teardown could still wait there for a lost peer."""
    try:
        _run(argv)
    except SystemExit as e:
        if e.code and distributed.has_peers():
            distributed.exit_now(e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException:  # a crash: `record` wrote its traceback for torchrun's report
        if distributed.has_peers():
            sys.excepthook(*sys.exc_info())
            distributed.exit_now(1)
        raise


@distributed.record_errors
def _run(argv: list[str] | None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rank = distributed.launch_env().rank
    _setup_logging(rank)

    def fail(message: str, code: int, every_rank: bool = False) -> NoReturn:
        """Exit with `code` after one line: on stderr from rank 0 (from each rank that meets
        it, for an error of its own), and as this rank's entry in torchrun's failure report."""
        line = f"llama-gen: {message}"
        if every_rank or rank == 0:
            print(line, file=sys.stderr)
        distributed.write_error_file(line)
        sys.exit(code)

    try:
        command(argv)
    except UserError as e:
        fail(f"error: {e}", 2)
    except CompileFailed as e:  # a machine without what the compiler needs
        fail(f"error: --compile: {e}; run without --compile", 2)
    except Interrupted as e:
        fail(f"{e}; what was finished is written: run the same command to resume",
             128 + e.signum)
    except StoreLost as e:  # on whichever replica noticed it
        fail(f"error: {e}; what this replica finished is in its part files: run the same "
             "command again to resume", 1, every_rank=True)
    except Incomplete as e:  # empty on the ranks whose log said why
        if not str(e):
            sys.exit(3)
        fail(f"error: {e}", 3)
    except KeyboardInterrupt:  # before the job's own handler is installed
        fail("interrupted", 130)
    except torch.OutOfMemoryError as e:  # on whichever rank it happened
        fail(f"error: {out_of_memory_advice(e)}", 1, every_rank=True)
    except OSError as e:
        if e.filename is None:  # not about a file: a bug's traceback is worth more
            raise
        fail(f"error: {e}", 1, every_rank=True)  # a full disk, a read-only folder


if __name__ == "__main__":
    main()
