"""Whether an output may be resumed, and what it already holds.

A run's fingerprint (`<out_path>.run.json`) records what a finished line depends on: the
checkpoint, the tokenizer, the prompt file and the settings that define the output. A resume
must match it; runtime settings (batch size, context length, device, processes) may change.
The prompt file may change where no answer rests on it: lines added at its end, and lines not
answered yet (a bad line fixed in place), told apart by a digest of each line
(`<out_path>.run.lines`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..model.hf_checkpoint import GENERATION_CONFIG, is_hf_folder, weight_paths
from ..settings import JobSettings, Settings
from .output import cut_torn_last_line, recover_output, write_atomically

log = logging.getLogger(__name__)


def file_digest(path: Path, size: int | None = None) -> str:
    """sha256 of the file, or of its first `size` bytes."""
    h = hashlib.sha256()
    left = path.stat().st_size if size is None else size
    with path.open("rb") as f:
        while left > 0 and (chunk := f.read(min(left, 1 << 20))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def prompt_file_grew(old: dict[str, Any], path: Path) -> bool:
    """Whether the prompt file only had lines appended since `old` (a run's fingerprint) was
    taken: its first bytes are the file then, and a newline ends the last line then (so that
    line reads as before)."""
    size = old.get("prompt_file_bytes")
    if not isinstance(size, int) or not 0 < size < path.stat().st_size:
        return False
    with path.open("rb") as f:
        f.seek(size - 1)
        ends_a_line = b"\n" in f.read(2)  # the old last byte, or the first new one
    return ends_a_line and file_digest(path, size) == old.get("prompt_file")


LINE_DIGEST_BYTES = 8


def line_digests(path: Path, size: int) -> bytes:
    """A digest of each line (less its newline) in the file's first `size` bytes, end to end."""
    digests = bytearray()
    left = size
    with path.open("rb") as f:
        for raw in f:
            if left <= 0:
                break
            raw, left = raw[:left], left - len(raw)
            digests += hashlib.blake2b(raw.rstrip(b"\n"), digest_size=LINE_DIGEST_BYTES).digest()
    return bytes(digests)


def changed_lines(old: bytes, new: bytes) -> set[int]:
    """The numbers (from 1) of the lines whose digests differ, or that one file lacks."""
    size = LINE_DIGEST_BYTES
    n_old, n_new = len(old) // size, len(new) // size
    both = min(n_old, n_new)
    changed = {i + 1 for i in range(both)
               if old[i * size:(i + 1) * size] != new[i * size:(i + 1) * size]}
    return changed | set(range(both + 1, max(n_old, n_new) + 1))


def run_fingerprint(settings: Settings, tokenizer_path: Path, dtype: str,
                    rope_scaling_factor: float | None = None,
                    chat_template: str | None = None) -> dict[str, Any]:
    """What a completion depends on; a resume must match it exactly. `rope_scaling_factor`
    is the one in use (`ModelArgs.rope_scaling`), however it was chosen; `chat_template` the
    folder's template where dialogs are rendered with it (its digest is kept)."""
    prompt_bytes = settings.prompt_path.stat().st_size  # lines appended from now on come after
    return {
        "checkpoint": str(settings.ckpt_dir.resolve()),
        **checkpoint_fingerprint(settings.ckpt_dir),
        "tokenizer": file_digest(tokenizer_path),
        # a tokenizer.json may take its bos and eos from the tokenizer_config.json beside it
        "tokenizer_config": (file_digest(config) if tokenizer_path.suffix == ".json" and (
            config := tokenizer_path.with_name("tokenizer_config.json")).is_file() else None),
        "prompt_file": file_digest(settings.prompt_path, prompt_bytes),
        "prompt_file_bytes": prompt_bytes,
        "dtype": dtype,
        "rope_scaling_factor": rope_scaling_factor,
        "chat_template": (None if chat_template is None else
                          hashlib.sha256(chat_template.encode()).hexdigest()),
        "command": settings.command,
        **settings.output_defining(),
    }


def checkpoint_fingerprint(ckpt_dir: Path) -> dict[str, Any]:
    """The model's files: its config's digest (Meta's params.json; a Hugging Face folder's
    config.json and generation_config.json, whose end-of-text ids stop a completion) and the
    weight files' names and sizes (the weights are too large to digest at every start)."""
    if is_hf_folder(ckpt_dir):
        generation = ckpt_dir / GENERATION_CONFIG
        return {"config.json": file_digest(ckpt_dir / "config.json"),
                GENERATION_CONFIG: file_digest(generation) if generation.is_file() else None,
                "shards": [[p.name, p.stat().st_size] for p in weight_paths(ckpt_dir)]}
    shards = sorted(ckpt_dir.glob("consolidated.*.pth"))
    return {"params.json": file_digest(ckpt_dir / "params.json"),
            "shards": [[p.name, p.stat().st_size] for p in shards]}


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any], prompt_path: Path,
                            settings_type: type[JobSettings] = Settings) -> list[str]:
    """What changed between two runs' fingerprints, in words; [] when a resume may go on.
    A setting that an older fingerprint lacks had its default then (and the command was
    `generate`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(settings_type)}
    defaults["command"] = "generate"
    # Before the factor was recorded, every model that scales RoPE was scaled by 8: Llama 3.2's
    # 1B and 3B wrongly (theirs is 32).
    defaults["rope_scaling_factor"] = None if new.get("rope_scaling_factor") is None else 8.0
    changed = []
    for key in sorted(new.keys() - PROMPT_FILE_KEYS):
        before = old.get(key, defaults.get(key))
        before = list(before) if isinstance(before, tuple) else before  # as JSON has it
        if before != new[key]:
            why = (" (how RoPE is scaled: the lines written were made with another)"
                   if key == "rope_scaling_factor" else "")
            changed.append(f"{key}: {json.dumps(before)} -> {json.dumps(new[key])}{why}")
    if old.get("prompt_file") != new["prompt_file"]:
        if prompt_file_grew(old, prompt_path):
            log.info("%s has new lines since the last run: they are answered too", prompt_path)
        else:
            changed.append(PROMPT_FILE_EDITED)
    return changed


PROMPT_FILE_EDITED = ("prompt_file: its content changed, beyond lines added at its end (lines "
                      "not answered yet may change too, but only where the run that began the "
                      "output kept a digest of each line, and this one did not)")
PROMPT_FILE_KEYS = frozenset({"prompt_file", "prompt_file_bytes", "prompt_lines"})


def edited_lines(settings: Settings, old: dict[str, Any], lines: bytes) -> set[int] | None:
    """The prompt lines changed since the run `old` describes, where its line digests are at
    hand (and are the ones it took); None where they are not."""
    path = settings.prompt_lines_path
    try:
        old_lines = path.read_bytes()
    except FileNotFoundError:
        return None
    if hashlib.sha256(old_lines).hexdigest() != old.get("prompt_lines"):
        return None
    return changed_lines(old_lines, lines)


def has_lines(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def move_aside(settings: Settings) -> Path | None:
    """--overwrite: move the output, its errors and its run settings into a dated folder
    beside them, so that nothing is lost; the folder, or None if there was nothing."""
    paths = [p for p in (settings.out_path, settings.errors_path, settings.settings_path,
                         settings.prompt_lines_path) if p.exists()]
    if not paths:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = settings.out_path.with_name(f"{settings.out_path.name}.replaced-{stamp}")
    for n in range(1, 1000):
        try:
            folder.mkdir()
            break
        except FileExistsError:
            folder = folder.with_name(f"{settings.out_path.name}.replaced-{stamp}-{n}")
    for path in paths:
        path.rename(folder / path.name)
    return folder


def forget_retryable_errors(settings: Settings, edited: set[int] = frozenset()) -> None:
    """Drop the errors file's entries that this run reads again (and records again if they are
    still bad): prompts too long for a shorter context than this run's, and lines `edited`
    since. Lines that are not entries are kept as they are."""
    path = settings.errors_path
    if not has_lines(path):
        return
    cut_torn_last_line(path)
    lines = path.read_bytes().splitlines(keepends=True)  # at b"\n" alone, as it was written
    kept = [line for line in lines if not _read_again(line, settings.max_seq_len, edited)]
    if len(kept) < len(lines):
        write_atomically(path, b"".join(kept).decode("utf-8"))


def _read_again(line: bytes, max_seq_len: int, edited: set[int]) -> bool:
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    if not isinstance(entry, dict):
        return False
    limit = entry.get("max_seq_len")
    return (isinstance(limit, int) and limit < max_seq_len) or entry.get("line") in edited


def read_fingerprint(settings: Settings) -> dict[str, Any]:
    try:
        old = json.loads(settings.settings_path.read_text(encoding="utf-8"))
    except ValueError:
        old = None
    if not isinstance(old, dict):
        raise UserError(f"{settings.settings_path} is not a llama-gen run settings file; move it "
                        "away, or pass --overwrite to start over (the old files are kept aside)")
    return old


def prepare_output(settings: Settings, fingerprint: dict[str, Any],
                   check_edits: Callable[[set[int], set[tuple[Any, int]]], None] | None = None
                   ) -> set[tuple[Any, int]]:
    """Rank 0, holding the lock: check the fingerprint against the output's and recover the
    output; the (id, sample)s it already holds. A fingerprint without output (a start that
    failed) binds nothing. Prompt lines edited since the last run are handed to `check_edits`
    (with what the output holds), which raises UserError where an answer rests on one; without
    it, any edit is refused."""
    lines = line_digests(settings.prompt_path, fingerprint["prompt_file_bytes"])
    fingerprint = {**fingerprint, "prompt_lines": hashlib.sha256(lines).hexdigest()}
    edited: set[int] = set()
    if settings.overwrite and (folder := move_aside(settings)):
        log.info("--overwrite: the earlier output and its files are now in %s", folder)
    elif has_lines(settings.out_path) and settings.settings_path.exists():
        old = read_fingerprint(settings)
        changed = fingerprint_differences(old, fingerprint, settings.prompt_path, type(settings))
        if PROMPT_FILE_EDITED in changed and check_edits is not None:
            found = edited_lines(settings, old, lines)
            if found is not None:
                changed.remove(PROMPT_FILE_EDITED)
                edited = found
        if changed:
            raise UserError(f"{settings.out_path} was written with other settings "
                            f"({'; '.join(changed)}); resume with the same command and files, "
                            "or pass --overwrite to start over (the old files are kept aside)")
    elif has_lines(settings.out_path):
        raise UserError(f"{settings.out_path} exists but was not written by llama-gen (no "
                        f"{settings.settings_path.name}); choose another --out_path or pass "
                        "--overwrite")
    elif has_lines(settings.errors_path) and settings.settings_path.exists():
        old = read_fingerprint(settings)
        if fingerprint_differences(old, fingerprint, settings.prompt_path, type(settings)):
            folder = move_aside(settings)  # no output line rests on them
            log.info("the errors of a run with other settings are now in %s", folder)
    done = recover_output(settings.out_path)
    if edited:
        check_edits(edited, done)
        log.info("%s: %d line(s) changed since the last run, none of them answered: they are "
                 "read again", settings.prompt_path, len(edited))
    forget_retryable_errors(settings, edited)
    write_atomically(settings.prompt_lines_path, lines)  # before the settings that name it
    write_atomically(settings.settings_path, json.dumps(fingerprint, indent=1) + "\n")
    return done
