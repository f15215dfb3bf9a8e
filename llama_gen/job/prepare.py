"""The start of a run, on rank 0 before any model loads: the output locked, recovered and
checked against the run's fingerprint, the part files a killed run left merged, the pending
samples counted and the pending lines checked; every rank gets what rank 0 found."""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..runtime import distributed
from ..runtime.distributed import Dist
from ..settings import JobSettings
from .feed import pending_records
from .output import JsonlAppender, OutputLock, recorded_error_lines
from .parts import merge_parts, output_parts, parts_dir
from .records import BadLine, Record, aliases_taken
from .resume import prepare_output, run_fingerprint
from .tasks import Task, TokenizedRecord, records_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What rank 0 found at the start, shared with every rank."""

    done: frozenset[tuple[Any, int]]  # (id, sample)s the output already holds
    total: int  # samples left to write
    run: str = ""  # this run's name in part files' names (several replicas)
    runs_model: bool = True  # some pending sample can run (else only bad lines are left)


def prepare(task: Task, dtype: str, dist: Dist, lock: OutputLock,
            rope_scaling_factor: float | None = None) -> Prepared:
    """Rank 0 locks and checks the output, counts the work and checks the pending lines before
    any model loads; every rank gets what it found, or stops with rank 0's error."""
    settings = task.settings
    outcome: Prepared | str | None = None
    if dist.is_writer:
        try:
            lock.acquire()
            if output_parts(settings.out_path) or parts_dir(settings.out_path).is_dir():
                merge_parts(settings.out_path, settings.errors_path, prompt_order(task))
            done = prepare_output(settings, run_fingerprint(
                settings, task.prompting.tokenizer.path, dtype, rope_scaling_factor,
                task.prompting.template_text),
                functools.partial(check_edited_lines, task))
            run = start_parts(settings) if dist.data_parallel_size > 1 else ""
            pending, written, aliases = count_samples(task, done)
            if aliases:
                log.info("%s", aliases_taken(aliases))
            if written:  # what a stopped (or failed) run left, before anything else happens
                log.info("resuming: %d of %d sample(s) already in %s, %d to make", written,
                         written + pending, settings.out_path, pending)
            runs_model = pending > 0 and some_prompt_runs(task, done)
            if pending and not runs_model:
                log.info("no pending prompt can run (each is in a bad line): the model is not "
                         "loaded")
            outcome = Prepared(frozenset(done), pending, run, runs_model)
        except (UserError, OSError) as e:
            outcome = str(e)
    outcome = distributed.broadcast_from_rank0(outcome)
    if isinstance(outcome, str):
        raise UserError(outcome)
    if outcome.total == 0 and dist.is_writer:
        log.info("nothing to generate: no prompt in %s is left unanswered in %s (bad lines go "
                 "to %s)", settings.prompt_path, settings.out_path, settings.errors_path)
    return outcome


def prompt_order(task: Task) -> Callable[[tuple[Any, int]], tuple]:
    """Where an (id, sample) comes in the prompt file: merged part lines are sorted by it."""
    position = {item.id: i for i, item in enumerate(records_of(task))
                if isinstance(item, Record)}
    end = len(position)
    return lambda key: (position.get(key[0], end), key[1])


def start_parts(settings: JobSettings) -> str:
    """This run's name for its part files, and a probe file in their folder that every
    replica's leader must see (`check_shared_folder`)."""
    run = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    folder = parts_dir(settings.out_path)
    folder.mkdir(exist_ok=True)
    (folder / f".{run}.probe").write_text(run)
    return run


def check_shared_folder(settings: JobSettings, dist: Dist, run: str) -> None:
    """With several replicas, every leader must see the parts folder rank 0 wrote in: all
    nodes write part files beside --out_path, which rank 0 merges."""
    if not run:
        return
    probe = parts_dir(settings.out_path) / f".{run}.probe"
    blind = distributed.gather_flags(dist.is_model_parallel_leader and not probe.exists())
    if blind:
        raise UserError(f"{parts_dir(settings.out_path)}: replica(s) "
                        f"{', '.join(str(r // dist.model_parallel_size) for r in blind)} cannot "
                        "see this folder rank 0 just wrote in; --out_path's folder must be on a "
                        "filesystem every node shares")


def count_pending(task: Task, done: set[tuple[Any, int]]) -> int:
    """Samples still to write, in a pass that tokenizes nothing; a record whose fields clash
    with the output's is an error here, before any work."""
    return count_samples(task, done)[0]


def count_samples(task: Task, done: set[tuple[Any, int]]) -> tuple[int, int, set[str]]:
    """The prompt file's samples still to write, those `done` already holds, and the fields
    its records set by OpenAI's and vLLM's names (`records.ALIASES`)."""
    pending = written = 0
    aliases: set[str] = set()
    for item in records_of(task):
        if isinstance(item, Record):
            aliases.update(item.aliases)
            if item.batch is None:  # a batch line's output holds none of its fields
                check_no_clash(item, task, resuming=bool(done))
            n = task.settings.with_overrides(item.overrides).num_samples
            left = sum((item.id, i) not in done for i in range(n))
            pending, written = pending + left, written + n - left
    return pending, written, aliases


def check_edited_lines(task: Task, edited: set[int], done: set[tuple[Any, int]]) -> None:
    """Prompt lines may change before they are answered (a bad line fixed in place), not
    after: the rest of an answered record's samples would answer another prompt. UserError
    where an `edited` line's record has a sample in the output, or an answered id is gone."""
    settings = task.settings
    answered = {record_id for record_id, _ in done}
    seen = set()
    for item in records_of(task):
        if not isinstance(item, Record):
            continue
        seen.add(item.id)
        if item.line in edited and item.id in answered:
            raise UserError(f"{settings.prompt_path}: line {item.line} (id "
                            f"{json.dumps(item.id)}) changed since its answer was written to "
                            f"{settings.out_path}; lines not answered yet, the bad ones "
                            "included, may change, answered ones may not: undo the change, or "
                            "pass --overwrite to start over (the old files are kept aside)")
    if gone := answered - seen:
        some = json.dumps(next(iter(gone)))
        raise UserError(f"{settings.out_path} holds answers for {len(gone)} id(s) that "
                        f"{settings.prompt_path} no longer has (e.g. {some}): an answered line "
                        "was changed or removed; undo the change, or pass --overwrite to start "
                        "over (the old files are kept aside)")


def some_prompt_runs(task: Task, done: set[tuple[Any, int]]) -> bool:
    """Whether a pending record makes a prompt that runs, read up to the first one that does;
    with --strict, every pending line is checked (tokenized too) and the first bad one ends
    the run here, before the model loads, as it would have ended it later."""
    settings, runs = task.settings, False
    for item in pending_records(task, done):
        if isinstance(item, BadLine) and settings.strict:
            if item.line not in recorded_error_lines(settings.errors_path):
                errors = JsonlAppender(settings.errors_path)
                errors.write(item.as_json())
                errors.close()
            raise UserError(f"{settings.prompt_path}: line {item.line}: {item.reason} (--strict, "
                            f"checked before the model loads; see {settings.errors_path})")
        if isinstance(item, TokenizedRecord):
            runs = True
            if not settings.strict:
                break
    return runs


def check_no_clash(record: Record, task: Task, resuming: bool = False) -> None:
    """Output lines hold the record's fields and llama-gen's: none may have both."""
    settings = task.settings
    taken = [k for k in task.output_fields if k in record.fields
             and not (k == "id" and settings.id_key in (None, "id"))]  # the id, written as is
    if not taken:
        return
    if task.named_output is None or taken[0] != task.named_output:
        fix = f"rename it in the input (llama-gen writes {', '.join(settings.written_fields)})"
    elif resuming:  # the output's lines were written with this --completion_key
        fix = ("rename it in the input, or start over with another name (--completion_key "
               "generated --overwrite)")
    else:
        fix = "pass --completion_key with another name (--completion_key generated)"
    raise UserError(f"{settings.prompt_path}: line {record.line}: field {taken[0]!r} is also "
                    f"an output field: {fix}")
