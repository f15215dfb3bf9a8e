"""The batch job: prompts.jsonl in, one output line per (record, sample) out, exactly once.

`run_job` reads top to bottom: prepare (rank 0 takes the lock, merges the part files a killed
run left, recovers the output, checks the run's fingerprint, and tells every rank what is
done: `prepare.py`), feed (the chunks of pending records each replica claims, as requests:
`feed.py`), run (the task's engine or scorer: `tasks.py`), write (each replica's leader its
own lines: `results.py`), and at the end rank 0 waits for the other replicas (or declares them
lost) and merges their part files into the output (`run_end.py`).

What the job does with a record is its task's: generation or scoring (`tasks.py`), picked
once from the settings' type. The job drives the task and never asks which one it holds.

Processes: each model-parallel group's first rank (its leader) reads the prompt file, claims
chunks of it for its replica (`replicas.Replicas`) and hands their requests to its group; the
other ranks of the group receive the same requests from it and run the same schedule. With one
replica, its leader (global rank 0) writes --out_path itself; with several, every replica's
leader writes part files (`parts.py`).
"""
from __future__ import annotations

import dataclasses

from ..runtime import distributed
from ..settings import JobSettings
from .feed import RequestFeed
from .output import OutputLock
from .prepare import check_shared_folder, prepare
from .results import Results
from .run_end import Incomplete, Interrupted, StopRequested
from .tasks import task_for, with_settings

__all__ = ["run_job", "Incomplete", "Interrupted", "StopRequested", "Results"]


def run_job(settings: JobSettings) -> None:
    """Run the whole job on this rank; raises UserError for what a user can fix, Interrupted
    after a signal, Incomplete for a run that misses samples. Its --max_seq_len is resolved
    before the output is prepared (a resume retries the prompts too long for a shorter one),
    its --max_batch_size once the model is loaded."""
    from ..text.tokenizer import find_tokenizer, load_tokenizer
    from .build import load_model, model_parallel_size, read_model_args, resolve_dtype
    from .sizing import resolve_max_seq_len, size_cache

    distributed.stop_if_launcher_dies()
    settings.check_paths()
    tokenizer = load_tokenizer(find_tokenizer(settings.ckpt_dir, settings.tokenizer_path))
    # A bad params.json or config.json, or chat flags the checkpoint cannot take, before any process group.
    args = read_model_args(settings.ckpt_dir, tokenizer, settings.rope_scaling_factor)
    task = task_for(settings, tokenizer, args)
    dist = distributed.init_distributed(model_parallel_size(settings), settings.device)
    stop = StopRequested()
    lock = OutputLock(settings.lock_path, settings.out_path, settings.lock)
    results = feed = None
    ended = False  # this rank's run ended cleanly
    try:
        dtype = resolve_dtype(settings.dtype, dist.device)
        task = with_settings(task, dataclasses.replace(
            settings, max_seq_len=resolve_max_seq_len(settings, args, dist, dtype)))
        prepared = prepare(task, str(dtype), dist, lock, args.rope_scaling()[0])
        check_shared_folder(task.settings, dist, prepared.run)
        results = Results(task, dist, prepared.total, prepared.run, bool(prepared.done),
                          args.context_length)
        model = sizing = None
        if prepared.runs_model:
            model = load_model(settings.ckpt_dir, tokenizer, dist, dtype, args,
                               settings.quantize, settings.quantize_head)
            sizing = size_cache(task.settings, model, dist)
        feed = RequestFeed(task, prepared.done, dist, results.writer, stop,
                           results.replicas if dist.is_model_parallel_leader else None,
                           sizing.max_batch_size if sizing else settings.max_batch_size)
        if sizing is None:  # no sample to write: the feed only records bad lines
            for _ in feed.requests():
                pass
        else:
            for result in task.run(model, sizing, dist, feed.requests(), feed.should_stop):
                results.finished(result)
        results.end(stop, feed.stopped(), feed.claimed, feed.chunks)
        ended = True
    except BaseException as e:
        if results is not None:
            results.abandon(e, *((feed.claimed, feed.chunks) if feed else ()))
        raise
    finally:
        _close(results, lock, ended)


def _close(results: Results | None, lock: OutputLock, ended: bool) -> None:
    """This rank's files closed (synced) and its lock released, then its process group torn
    down: gracefully after a clean end; aborted after an error or a lost peer, where a graceful
    teardown can wait forever (and `main` then exits hard). Files first, so that neither costs
    a written line."""
    try:
        if results is not None:
            results.close()
        lock.release()
    finally:
        if ended:
            distributed.shutdown()
        else:
            distributed.abort()
