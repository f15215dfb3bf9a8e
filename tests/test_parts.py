"""Part files and their merge: every part's lines reach --out_path exactly once, in prompt-file
order, however often the merge is killed and run again."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llama_gen.job.output import recover_output
from llama_gen.job.parts import (error_part_path, merge_parts, output_parts, part_path, parts_dir,
                                 whole_lines)


def line(record: int, sample: int = 0) -> dict:
    return {"id": f"r{record}", "sample": sample, "completion": f"text {record}.{sample}"}


def write(path: Path, lines: list[dict], torn: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
        f.write(torn)


def order(key) -> tuple:
    record, sample = key
    return int(record[1:]), sample


def read(path: Path) -> list[tuple[str, int]]:
    return [(x["id"], x["sample"]) for x in map(json.loads, path.read_text().splitlines())]


@pytest.fixture
def job(tmp_path):
    out, errors = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    write(out, [line(0), line(1)])
    write(part_path(out, "run1", 0), [line(4), line(2), line(5, 1)], torn='{"id": "r9", "sa')
    write(part_path(out, "run1", 1), [line(3), line(5, 0), line(1)])  # r1 is already out
    write(error_part_path(out, "run1", 1), [{"line": 8, "error": "too long"},
                                            {"line": 7, "error": "bad json"}])
    return out, errors


def test_merge_appends_what_out_lacks_in_prompt_order_and_removes_the_parts(job):
    out, errors = job
    assert merge_parts(out, errors, order) == 5
    assert read(out) == [("r0", 0), ("r1", 0), ("r2", 0), ("r3", 0), ("r4", 0), ("r5", 0),
                         ("r5", 1)]
    assert [json.loads(x)["line"] for x in errors.read_text().splitlines()] == [7, 8]
    assert not parts_dir(out).exists()
    assert merge_parts(out, errors, order) == 0  # nothing left to do


@pytest.mark.parametrize("kept_bytes", [0, 40, 130, None])
def test_a_merge_killed_anywhere_is_finished_by_the_next_with_nothing_lost_or_doubled(
        job, kept_bytes):
    """Simulate a kill mid-merge: --out_path holds part of the appended lines (possibly a torn
    one), the parts are still there. The next merge completes it exactly once."""
    out, errors = job
    before = out.read_bytes()
    merge_parts(out, errors, order)
    merged = out.read_bytes()
    appended = merged[len(before):]
    out.write_bytes(before + appended[:kept_bytes if kept_bytes is not None else len(appended)])
    # the parts as they were before the kill
    write(part_path(out, "run1", 0), [line(4), line(2), line(5, 1)])
    write(part_path(out, "run1", 1), [line(3), line(5, 0), line(1)])
    merge_parts(out, errors, order)
    pairs = read(out)
    assert sorted(pairs) == sorted(set(pairs)) == sorted(read_lines(merged))
    assert recover_output(out) == set(pairs)


def read_lines(data: bytes) -> list[tuple[str, int]]:
    return [(x["id"], x["sample"]) for x in map(json.loads, data.decode().splitlines())]


def test_a_torn_last_line_of_a_part_is_left_for_the_next_run(job):
    out, _ = job
    [first, _] = output_parts(out)
    assert [json.loads(raw)["id"] for _, raw in whole_lines(first)] == ["r4", "r2", "r5"]
    assert os.path.getsize(first) > sum(len(raw) for _, raw in whole_lines(first))


def test_a_zero_filled_region_in_a_part_is_skipped_like_a_torn_line(job, caplog):
    """A client that crashed on NFS can leave zero bytes where its last lines were to go: the
    merge skips that line, logs it, and merges the rest; the sample it held is left for the
    next run, which makes it."""
    out, errors = job
    [first, second] = output_parts(out)
    data = second.read_bytes()
    start = data.index(b"\n") + 1
    end = data.index(b"\n", start)
    second.write_bytes(data[:start] + b"\0" * (end - start) + data[end:])  # r5.0 is zeros
    with caplog.at_level("WARNING"):
        assert merge_parts(out, errors, order) == 4
    assert read(out) == [("r0", 0), ("r1", 0), ("r2", 0), ("r3", 0), ("r4", 0), ("r5", 1)]
    assert "not JSON" in caplog.text and second.name in caplog.text
    assert not parts_dir(out).exists()
