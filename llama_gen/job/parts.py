"""Part files: with several replicas, each replica's leader appends its output lines, and its
bad lines, to files of its own beside --out_path (`<out_path>.parts/<run>-<replica>.jsonl` and
`...errors.jsonl`), so no result travels between processes. Global rank 0 merges them into
--out_path and the errors file when every replica is done, or, after a crash, at the start of
the next run.

The merge is crash-safe without a rewrite: it appends to --out_path, in prompt-file order, the
parts' lines whose (id, sample) --out_path does not hold yet, fsyncs, and only then deletes the
parts. Killed at any moment, the next merge finds each line either in --out_path (skipped) or
still in its part (appended): none is lost or written twice.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .output import done_pairs, recorded_error_lines, recover_output

log = logging.getLogger(__name__)

ERRORS_SUFFIX = ".errors.jsonl"


def parts_dir(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".parts")


def part_path(out_path: Path, run: str, replica: int) -> Path:
    """Where one replica of one run appends its output lines."""
    return parts_dir(out_path) / f"{run}-{replica}.jsonl"


def error_part_path(out_path: Path, run: str, replica: int) -> Path:
    return parts_dir(out_path) / f"{run}-{replica}{ERRORS_SUFFIX}"


def output_parts(out_path: Path) -> list[Path]:
    folder = parts_dir(out_path)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.jsonl") if not p.name.endswith(ERRORS_SUFFIX))


def error_parts(out_path: Path) -> list[Path]:
    folder = parts_dir(out_path)
    return sorted(folder.glob(f"*{ERRORS_SUFFIX}")) if folder.is_dir() else []


def whole_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of each whole line of a part; a torn last line (its writer was killed)
    is left out."""
    with path.open("rb") as f:
        offset = 0
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            yield offset, raw
            offset += len(raw)


def parsed_lines(path: Path) -> Iterator[tuple[int, bytes, Any]]:
    """(offset, line, its JSON value) of each whole line of a part. A line that does not parse
    is torn too, where it is not the last: a client that crashed on NFS can leave a region of
    zero bytes (or of old data) where its last writes were to go. It is skipped and logged, and
    the sample it held, if any, is made again by the next run."""
    for offset, raw in whole_lines(path):
        try:
            yield offset, raw, json.loads(raw)
        except ValueError:
            log.warning("%s: skipped a line at byte %d that is not JSON (%d bytes, %r...): torn "
                        "by a crash; the next run makes what it held", path, offset, len(raw),
                        raw[:20])


def merge_parts(out_path: Path, errors_path: Path,
                order: Callable[[Any], tuple] = lambda key: ()) -> int:
    """Append every part's lines that --out_path lacks, sorted by `order` of their first
    (id, sample), then the error parts' lines the errors file lacks; then delete the parts.
    Returns how many output lines were appended."""
    parts = output_parts(out_path)
    if not parts and not error_parts(out_path):
        return 0
    done = recover_output(out_path)  # also cuts a torn last line of an interrupted merge
    index = []  # (order, part number, offset): lines are read again when appended
    for number, part in enumerate(parts):
        for offset, _, line in parsed_lines(part):
            try:
                pairs = done_pairs(line)
            except (KeyError, TypeError, ValueError):
                log.warning("%s: skipped a line at byte %d that is not an output line", part,
                            offset)
                continue
            if not done.issuperset(pairs):
                done.update(pairs)
                index.append((order(pairs[0]), number, offset))
    index.sort()
    appended = _append_lines(out_path, parts, [(n, offset) for _, n, offset in index])
    _merge_errors(errors_path, error_parts(out_path))
    for part in parts + error_parts(out_path) + sorted(parts_dir(out_path).glob(".*.probe")):
        part.unlink()
    try:
        parts_dir(out_path).rmdir()
    except OSError:  # something else is in there: left for the user
        pass
    if appended:
        log.info("%s: merged %d line(s) from %d part file(s)", out_path, appended, len(parts))
    return appended


def _append_lines(out_path: Path, parts: list[Path], where: list[tuple[int, int]]) -> int:
    if not where:
        return 0
    handles = [part.open("rb") for part in parts]
    try:
        with out_path.open("ab") as out:
            for number, offset in where:
                handles[number].seek(offset)
                out.write(handles[number].readline())
            out.flush()
            os.fsync(out.fileno())
    finally:
        for handle in handles:
            handle.close()
    return len(where)


def _merge_errors(errors_path: Path, parts: list[Path]) -> None:
    """Bad lines the errors file does not hold yet, by prompt line number, in that order."""
    if not parts:
        return
    known = recorded_error_lines(errors_path)
    new: dict[int, bytes] = {}
    for part in parts:
        for _, raw, entry in parsed_lines(part):
            line = entry.get("line") if isinstance(entry, dict) else None
            if isinstance(line, int) and line not in known:
                new.setdefault(line, raw)
    if new:
        with errors_path.open("ab") as out:
            out.writelines(new[line] for line in sorted(new))
            out.flush()
            os.fsync(out.fileno())
