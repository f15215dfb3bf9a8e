"""Whether an output may be resumed: the run's fingerprint, the resume rules, --overwrite moving
the old files aside, and prompts too long for a shorter context retried."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llama_gen.errors import UserError
from llama_gen.job.feed import pending_records
from llama_gen.job.output import JsonlAppender, OutputLock, Writer
from llama_gen.job.records import BadLine
from llama_gen.job.resume import (LINE_DIGEST_BYTES, changed_lines, fingerprint_differences,
                                  forget_retryable_errors, line_digests, move_aside, prepare_output,
                                  run_fingerprint)
from llama_gen.job.tasks import Generation, Prompting
from llama_gen.settings import FIELDS, OUTPUT_DEFINING, Settings
from llama_gen.testing.tiny_tokenizers import build_sentencepiece_model
from llama_gen.text.tokenizer import load_tokenizer


def out_line(id_, sample: int, **extra) -> bytes:
    return (json.dumps({"id": id_, "sample": sample, "completion": "x", **extra}) + "\n").encode()


def job(tmp_path: Path, **kwargs) -> Settings:
    prompt = tmp_path / "prompts.jsonl"
    if not prompt.exists():
        prompt.write_text('{"prompt": "hi"}\n{"prompt": "there"}\n')
    return Settings(**{"ckpt_dir": tmp_path, "prompt_path": prompt,
                       "out_path": tmp_path / "out.jsonl", **kwargs})


FINGERPRINT = {"checkpoint": "/ckpt", "prompt_file": "abc", "temperature": 0.6, "seed": 0,
               "id_key": None, "shards": [["consolidated.00.pth", 10]],
               "prompt_file_bytes": 0}


def stored(run_settings: Path) -> dict:
    """A run settings file's fingerprint, less the digest of its line digests' file."""
    return {k: v for k, v in json.loads(run_settings.read_text()).items() if k != "prompt_lines"}


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name)


def replaced(tmp_path: Path) -> list[Path]:
    return sorted(p for p in tmp_path.iterdir() if ".replaced-" in p.name)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_sentencepiece_model(tmp_path_factory.mktemp("tok") / "t.model"))


def checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "params.json").write_text('{"dim": 64}')
    return ckpt


# --- fingerprint_differences -------------------------------------------------------------------

def test_fingerprint_differences_lists_changed_and_added_keys_sorted(tmp_path):
    prompt = tmp_path / "prompts.jsonl"
    prompt.write_text('{"prompt": "hi"}\n')
    old = {"prompt_file": "p", "seed": 0, "temperature": 0.6, "shards": [["a", 1]], "gone": "x",
           "same": None}
    new = {"prompt_file": "p", "seed": 0, "temperature": 0.7, "shards": [["a", 2]],
           "added": True, "same": None}
    # A key only the old fingerprint has is a setting no longer in it (runtime settings such as
    # max_seq_len were, once): it binds nothing.
    assert fingerprint_differences(old, new, prompt) == [
        'added: null -> true', 'shards: [["a", 1]] -> [["a", 2]]', "temperature: 0.6 -> 0.7"]
    assert fingerprint_differences(new, dict(new), prompt) == []
    [edited] = fingerprint_differences(old, {**old, "prompt_file": "q"}, prompt)
    assert edited.startswith("prompt_file: its content changed, beyond lines added at its end")


def test_an_output_defining_key_an_older_fingerprint_lacks_counts_as_its_default(tmp_path):
    prompt = tmp_path / "prompts.jsonl"
    prompt.write_text('{"prompt": "hi"}\n')
    new = {"prompt_file": "p", "completion_key": "completion", "id_key": None, "echo": False}
    assert fingerprint_differences({"prompt_file": "p"}, new, prompt) == []
    assert fingerprint_differences({"prompt_file": "p"},
                                   {**new, "completion_key": "generated", "echo": True},
                                   prompt) == ['completion_key: "completion" -> "generated"',
                                               "echo: false -> true"]


# --- prepare_output ----------------------------------------------------------------------------

def test_first_run_writes_the_run_settings(tmp_path):
    s = job(tmp_path)
    assert prepare_output(s, FINGERPRINT) == set()
    assert stored(s.settings_path) == FINGERPRINT
    assert s.settings_path.name == "out.jsonl.run.json"
    assert leftovers(tmp_path) == []


def test_resume_with_the_same_settings_returns_the_done_pairs(tmp_path):
    s = job(tmp_path)
    prepare_output(s, FINGERPRINT)
    s.out_path.write_bytes(out_line(1, 0) + out_line(2, 0) + b'{"id": 2, "sa')
    assert prepare_output(s, dict(FINGERPRINT)) == {(1, 0), (2, 0)}
    assert s.out_path.read_bytes() == out_line(1, 0) + out_line(2, 0)


def test_resume_with_changed_settings_is_refused_naming_the_difference(tmp_path):
    s = job(tmp_path)
    prepare_output(s, FINGERPRINT)
    s.out_path.write_bytes(out_line(1, 0))
    changed = {**FINGERPRINT, "temperature": 0.7, "id_key": "key"}
    with pytest.raises(UserError) as e:
        prepare_output(s, changed)
    message = str(e.value)
    assert 'id_key: null -> "key"' in message and "temperature: 0.6 -> 0.7" in message
    assert "--overwrite" in message
    assert stored(s.settings_path) == FINGERPRINT  # untouched
    assert s.out_path.read_bytes() == out_line(1, 0)


def test_a_non_empty_output_without_run_settings_is_refused(tmp_path):
    s = job(tmp_path)
    s.out_path.write_bytes(b"someone else's data\n")
    with pytest.raises(UserError, match=r"not written by llama-gen \(no out\.jsonl\.run\.json\)"):
        prepare_output(s, FINGERPRINT)
    assert not s.settings_path.exists()
    assert s.out_path.read_bytes() == b"someone else's data\n"


def test_an_empty_output_without_run_settings_is_fine(tmp_path):
    s = job(tmp_path)
    s.out_path.write_bytes(b"")
    assert prepare_output(s, FINGERPRINT) == set()
    assert s.settings_path.exists()


def test_overwrite_moves_the_old_files_aside_and_records_the_new_settings(tmp_path, caplog):
    s = job(tmp_path)
    prepare_output(s, FINGERPRINT)
    s.out_path.write_bytes(out_line(1, 0))
    s.errors_path.write_bytes(b'{"line": 2, "reason": "r", "text": "t"}\n')
    changed = {**FINGERPRINT, "seed": 5}
    again = job(tmp_path, overwrite=True)
    with caplog.at_level("INFO", logger="llama_gen.job.resume"):
        assert prepare_output(again, changed) == set()
    # The new output starts empty; the old files are all in the replaced folder, unchanged.
    assert not s.out_path.exists() and not s.errors_path.exists()
    [folder] = replaced(tmp_path)
    assert re.fullmatch(r"out\.jsonl\.replaced-\d{8}-\d{6}", folder.name)
    assert (folder / "out.jsonl").read_bytes() == out_line(1, 0)
    assert (folder / "out.jsonl.errors.jsonl").read_bytes() == \
        b'{"line": 2, "reason": "r", "text": "t"}\n'
    assert stored(folder / "out.jsonl.run.json") == FINGERPRINT
    assert str(folder) in caplog.text  # the user is told where
    assert stored(s.settings_path) == changed
    assert leftovers(tmp_path) == []
    # Overwrite also takes a foreign file (no run settings) and a file it cannot parse; a
    # second overwrite in the same second gets a folder of its own.
    s.settings_path.unlink()
    s.out_path.write_bytes(b"not json\n")
    assert prepare_output(again, FINGERPRINT) == set()
    assert not s.out_path.exists()
    folders = replaced(tmp_path)
    assert len(folders) == 2
    [second] = [f for f in folders if f != folder]
    assert sorted(p.name for p in second.iterdir()) == ["out.jsonl", "out.jsonl.run.lines"]
    assert (second / "out.jsonl").read_bytes() == b"not json\n"
    assert (folder / "out.jsonl").read_bytes() == out_line(1, 0)  # the first is untouched


def test_move_aside_with_nothing_to_move_makes_no_folder(tmp_path):
    s = job(tmp_path, overwrite=True)
    assert move_aside(s) is None
    assert replaced(tmp_path) == []
    assert prepare_output(s, FINGERPRINT) == set()
    assert replaced(tmp_path) == []


def test_move_aside_leaves_the_lock_the_log_and_the_prompts(tmp_path):
    s = job(tmp_path, overwrite=True)
    for path in (s.out_path, s.lock_path, s.log_path):
        path.write_text("old\n")
    folder = move_aside(s)
    assert [p.name for p in folder.iterdir()] == ["out.jsonl"]
    assert s.lock_path.read_text() == s.log_path.read_text() == "old\n"
    assert s.prompt_path.exists()


def test_prepare_output_reports_a_corrupt_middle_line(tmp_path):
    s = job(tmp_path)
    prepare_output(s, FINGERPRINT)
    s.out_path.write_bytes(out_line(1, 0) + b"oops\n" + out_line(2, 0))
    with pytest.raises(UserError, match="line 2 is not a llama-gen output line"):
        prepare_output(s, FINGERPRINT)


def test_run_settings_of_an_earlier_version_without_the_prompt_size_still_resume(tmp_path):
    s = job(tmp_path)
    prepare_output(s, FINGERPRINT)
    s.out_path.write_bytes(out_line(1, 0))  # so that the old run settings bind
    assert prepare_output(s, {**FINGERPRINT, "prompt_file_bytes": 30}) == {(1, 0)}


# --- a start that failed binds nothing ---------------------------------------------------------

def test_run_settings_without_output_lines_bind_nothing(tmp_path):
    # A start that failed (a missing shard, say) left its run settings and lock behind, and no
    # output line: the next run, with other settings, goes ahead and records its own.
    s = job(tmp_path)
    lock = OutputLock(s.lock_path, s.out_path)
    lock.acquire()
    prepare_output(s, FINGERPRINT)
    lock.release()
    other = {**FINGERPRINT, "shards": [["consolidated.00.pth", 10], ["consolidated.01.pth", 9]],
             "seed": 3}
    lock = OutputLock(s.lock_path, s.out_path)
    lock.acquire()
    assert prepare_output(s, other) == set()
    lock.release()
    assert stored(s.settings_path) == other
    # An empty output file is no output either.
    s.out_path.write_bytes(b"")
    assert prepare_output(s, FINGERPRINT) == set()
    assert stored(s.settings_path) == FINGERPRINT
    assert replaced(tmp_path) == []


def test_errors_of_a_run_with_other_settings_and_no_output_are_moved_aside(tmp_path):
    s = job(tmp_path)
    prepare_output(s, FINGERPRINT)
    errors = b'{"line": 2, "reason": "r", "text": "t"}\n'
    s.errors_path.write_bytes(errors)
    # Same settings: the errors file stays (its lines are not written twice).
    assert prepare_output(s, dict(FINGERPRINT)) == set()
    assert s.errors_path.read_bytes() == errors and replaced(tmp_path) == []
    # Other settings: no output line rests on it, so it goes aside rather than blocking.
    other = {**FINGERPRINT, "seed": 1}
    assert prepare_output(s, other) == set()
    assert not s.errors_path.exists()
    [folder] = replaced(tmp_path)
    assert (folder / "out.jsonl.errors.jsonl").read_bytes() == errors
    assert stored(folder / "out.jsonl.run.json") == FINGERPRINT
    assert stored(s.settings_path) == other


# --- run_fingerprint ---------------------------------------------------------------------------

def test_run_fingerprint_survives_a_json_round_trip(tmp_path, tokenizer):
    # The resume check compares the stored JSON with a fresh fingerprint: any tuple or Path in it
    # would make every resume fail.
    ckpt = checkpoint(tmp_path)
    for i in range(2):
        (ckpt / f"consolidated.0{i}.pth").write_bytes(b"x" * (i + 3))
    s = Settings(ckpt_dir=ckpt, prompt_path=job(tmp_path).prompt_path,
                 out_path=tmp_path / "out.jsonl", id_key="key", num_samples=2)
    fp = run_fingerprint(s, tokenizer.path, "torch.bfloat16")
    assert fingerprint_differences(json.loads(json.dumps(fp)), fp, s.prompt_path) == []
    assert fp["shards"] == [["consolidated.00.pth", 3], ["consolidated.01.pth", 4]]
    prepare_output(s, fp)
    s.out_path.write_bytes(out_line("k", 0))  # so that the run settings bind
    assert prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.bfloat16")) == {("k", 0)}
    s.prompt_path.write_text('{"prompt": "changed"}\n')
    with pytest.raises(UserError, match="prompt_file: "):
        prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.bfloat16"))


RUNTIME_CHANGES = {"max_seq_len": 64, "max_batch_size": 2, "device": "cpu",
                   "scheduler": "static", "compile": True, "model_parallel_size": 2,
                   "logging_path": "elsewhere.log", "strict": True}


def test_runtime_settings_are_not_in_the_fingerprint_and_may_change_on_resume(tmp_path,
                                                                               tokenizer):
    s = Settings(ckpt_dir=checkpoint(tmp_path), prompt_path=job(tmp_path).prompt_path,
                 out_path=tmp_path / "out.jsonl")
    fp = run_fingerprint(s, tokenizer.path, "torch.float32")
    assert not set(RUNTIME_CHANGES) & set(fp)
    prepare_output(s, fp)
    s.out_path.write_bytes(out_line(1, 0))
    runtime = {**RUNTIME_CHANGES, "logging_path": tmp_path / "elsewhere.log"}
    for name, value in runtime.items():  # one at a time: --compile excludes --scheduler static
        changed = Settings(ckpt_dir=s.ckpt_dir, prompt_path=s.prompt_path, out_path=s.out_path,
                           **{name: value})
        assert run_fingerprint(changed, tokenizer.path, "torch.float32") == fp, name
        assert prepare_output(changed, run_fingerprint(changed, tokenizer.path,
                                                       "torch.float32")) == {(1, 0)}, name


OUTPUT_CHANGES = {"max_gen_len": 7, "temperature": 0.0, "top_p": 0.5, "seed": 3,
                  "num_samples": 2, "prompt_key": "text", "id_key": "key",
                  "completion_key": "generated", "logprobs": True, "echo": True, "top_k": 5,
                  "min_p": 0.1, "repetition_penalty": 1.2, "presence_penalty": 0.5,
                  "frequency_penalty": 0.5, "stop": ["###"], "min_tokens": 2,
                  "ignore_eos": True, "top_logprobs": 3, "keep_special_tokens": True,
                  "chat": True, "chat_format": "llama2", "system": "Be brief.",
                  "quantize": "int8", "quantize_head": True}


def test_every_setting_is_either_runtime_or_output_defining_here():
    assert set(OUTPUT_CHANGES) == set(OUTPUT_DEFINING)
    assert not set(RUNTIME_CHANGES) & set(OUTPUT_DEFINING)


@pytest.mark.parametrize("name", sorted(OUTPUT_CHANGES))
def test_an_output_defining_setting_changed_on_resume_is_refused(tmp_path, tokenizer, name):
    # --top_logprobs takes --logprobs, --quantize_head --quantize
    both = {"top_logprobs": {"logprobs": True}, "quantize_head": {"quantize": "int8"}}.get(name, {})
    s = Settings(ckpt_dir=checkpoint(tmp_path), prompt_path=job(tmp_path).prompt_path,
                 out_path=tmp_path / "out.jsonl", **both)
    prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.float32"))
    s.out_path.write_bytes(out_line(1, 0))
    changed = Settings(ckpt_dir=s.ckpt_dir, prompt_path=s.prompt_path, out_path=s.out_path,
                       **{**both, name: OUTPUT_CHANGES[name]})
    before, after = json.dumps(FIELDS[name].default), json.dumps(OUTPUT_CHANGES[name])
    with pytest.raises(UserError, match=re.escape(f"{name}: {before} -> {after}")):
        prepare_output(changed, run_fingerprint(changed, tokenizer.path, "torch.float32"))


def test_another_dtype_or_tokenizer_on_resume_is_refused(tmp_path, tokenizer):
    s = Settings(ckpt_dir=checkpoint(tmp_path), prompt_path=job(tmp_path).prompt_path,
                 out_path=tmp_path / "out.jsonl")
    prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.float32"))
    s.out_path.write_bytes(out_line(1, 0))
    with pytest.raises(UserError, match=r'dtype: "torch.float32" -> "torch.bfloat16"'):
        prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.bfloat16"))
    other = build_sentencepiece_model(tmp_path / "other.model", vocab_size=480)
    with pytest.raises(UserError, match="tokenizer: "):
        prepare_output(s, run_fingerprint(s, other, "torch.float32"))


def test_a_hugging_face_folders_config_and_weight_files_bind_a_resume(tmp_path, tokenizer):
    """config.json and generation_config.json by digest, the weight files by name and size, as
    params.json and Meta's shards are."""
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    (ckpt / "generation_config.json").write_text('{"eos_token_id": 2}')
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    for i in (1, 2):
        (ckpt / f"model-0000{i}-of-00002.safetensors").write_bytes(b"x" * (i + 3))
    s = Settings(ckpt_dir=ckpt, prompt_path=job(tmp_path).prompt_path,
                 out_path=tmp_path / "out.jsonl")
    fp = run_fingerprint(s, tokenizer.path, "torch.float32")
    assert fp["shards"] == [["model-00001-of-00002.safetensors", 4],
                            ["model-00002-of-00002.safetensors", 5]]
    assert "params.json" not in fp
    prepare_output(s, fp)
    s.out_path.write_bytes(out_line(1, 0))
    assert prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.float32")) == {(1, 0)}
    for name, text, named in (
            ("generation_config.json", '{"eos_token_id": [2, 3]}', "generation_config.json: "),
            ("config.json", '{"model_type": "llama", "vocab_size": 9}', "config.json: "),
            ("model-00002-of-00002.safetensors", "y" * 9, "shards: ")):
        before = (ckpt / name).read_text()
        (ckpt / name).write_text(text)
        with pytest.raises(UserError, match=f"other settings \\({named}"):
            prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.float32"))
        (ckpt / name).write_text(before)


def test_an_old_run_settings_file_lacking_a_newer_key_resumes_with_its_default(tmp_path,
                                                                                tokenizer):
    s = Settings(ckpt_dir=checkpoint(tmp_path), prompt_path=job(tmp_path).prompt_path,
                 out_path=tmp_path / "out.jsonl")
    fp = run_fingerprint(s, tokenizer.path, "torch.float32")
    old = {k: v for k, v in fp.items() if k != "completion_key"}  # written before the flag
    s.settings_path.write_text(json.dumps(old))
    s.out_path.write_bytes(out_line(1, 0))
    assert prepare_output(s, fp) == {(1, 0)}
    s.settings_path.write_text(json.dumps(old))
    renamed = Settings(ckpt_dir=s.ckpt_dir, prompt_path=s.prompt_path, out_path=s.out_path,
                       completion_key="generated")
    with pytest.raises(UserError, match='completion_key: "completion" -> "generated"'):
        prepare_output(renamed, run_fingerprint(renamed, tokenizer.path, "torch.float32"))


def test_the_rope_factor_in_use_binds_a_resume(tmp_path, tokenizer):
    """An output begun with one RoPE scaling is refused with another, whichever way it was
    chosen; a run settings file from before the factor was recorded had 8 where RoPE scales
    (Llama 3.2's 1B and 3B were wrongly run so) and none where it does not."""
    s = Settings(ckpt_dir=checkpoint(tmp_path), prompt_path=job(tmp_path).prompt_path,
                 out_path=tmp_path / "out.jsonl")
    prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.float32", 8.0))
    s.out_path.write_bytes(out_line(1, 0))
    assert prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.float32", 8.0)) == {(1, 0)}
    with pytest.raises(UserError, match=re.escape(
            "rope_scaling_factor: 8.0 -> 32.0 (how RoPE is scaled: the lines written were made "
            "with another)") + ".*pass --overwrite"):
        prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.float32", 32.0))

    for before_the_key, now, resumes in ((8.0, 8.0, True), (8.0, 32.0, False),
                                         (None, None, True)):
        fp = run_fingerprint(s, tokenizer.path, "torch.float32", before_the_key)
        s.settings_path.write_text(json.dumps({k: v for k, v in fp.items()
                                               if k != "rope_scaling_factor"}))
        fresh = run_fingerprint(s, tokenizer.path, "torch.float32", now)
        if resumes:
            assert prepare_output(s, fresh) == {(1, 0)}
        else:
            with pytest.raises(UserError, match=re.escape("rope_scaling_factor: 8.0 -> 32.0")):
                prepare_output(s, fresh)


def test_lines_appended_to_the_prompt_file_are_a_resume_other_changes_are_not(tmp_path,
                                                                               tokenizer):
    s = Settings(ckpt_dir=checkpoint(tmp_path), prompt_path=job(tmp_path).prompt_path,
                 out_path=tmp_path / "out.jsonl")
    first = s.prompt_path.read_text()

    def resume_after(content: str) -> None:
        s.prompt_path.write_text(content)
        prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.float32"))

    resume_after(first)
    s.out_path.write_bytes(out_line(1, 0))  # so that the run settings bind
    resume_after(first + '{"prompt": "appended"}\n')  # accepted, and becomes the new start
    assert json.loads(s.settings_path.read_text())["prompt_file_bytes"] == len(first) + 23
    grown = s.prompt_path.read_text()
    for changed in (grown.replace("hi", "ho"), grown[:-1] + ' "x"\n', first):
        s.prompt_path.write_text(grown)
        prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.float32"))
        with pytest.raises(UserError, match="prompt_file: its content changed, beyond lines "
                                            "added at its end"):
            resume_after(changed)
    # After a last line without a newline, text that continues that line changes it: refused;
    # a newline first leaves it as it was.
    s.settings_path.unlink()  # a new job
    s.out_path.unlink()
    s.prompt_path.write_text(grown.rstrip("\n"))
    prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.float32"))
    s.out_path.write_bytes(out_line(1, 0))
    with pytest.raises(UserError, match="prompt_file"):
        resume_after(grown.rstrip("\n") + '{"prompt": "more"}\n')
    resume_after(grown + '{"prompt": "more"}\n')


# --- prompts too long are retried when --max_seq_len grows -------------------------------------

ERRORS = [{"line": 2, "reason": "too long", "text": "a", "max_seq_len": 32},
          {"line": 3, "reason": "invalid JSON", "text": "b"},
          {"line": 4, "reason": "too long", "text": "c", "max_seq_len": 64},
          {"line": 5, "reason": "too long", "text": "d", "max_seq_len": 16}]


def write_errors(path: Path, entries: list[dict], torn: bytes = b"") -> bytes:
    data = b"".join(json.dumps(e).encode() + b"\n" for e in entries) + torn
    path.write_bytes(data)
    return data


def test_forget_retryable_errors_drops_prompts_too_long_for_a_shorter_context(tmp_path):
    s = job(tmp_path, max_seq_len=64)
    write_errors(s.errors_path, ERRORS, torn=b'{"line": 9, "rea')
    forget_retryable_errors(s)
    assert [json.loads(x) for x in s.errors_path.read_bytes().splitlines()] == [
        ERRORS[1], ERRORS[2]]
    assert leftovers(tmp_path) == []


def test_forget_retryable_errors_keeps_everything_when_the_context_did_not_grow(tmp_path):
    for max_seq_len in (16, 8):
        s = job(tmp_path, max_seq_len=max_seq_len)
        data = write_errors(s.errors_path, ERRORS)
        forget_retryable_errors(s)
        assert s.errors_path.read_bytes() == data
    forget_retryable_errors(job(tmp_path, max_seq_len=1024, out_path=tmp_path / "none.jsonl"))
    assert not (tmp_path / "none.jsonl.errors.jsonl").exists()


def test_a_prompt_too_long_is_retried_after_a_resume_with_a_longer_context(tmp_path, tokenizer):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 10
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "short", "id": "a"}) + "\n"
                                            + json.dumps({"prompt": long_prompt, "id": "b"})
                                            + "\n")
    n = len(tokenizer.encode(long_prompt, bos=True))
    ckpt = checkpoint(tmp_path)

    def run(max_seq_len: int) -> list:
        s = Settings(ckpt_dir=ckpt, prompt_path=tmp_path / "prompts.jsonl",
                     out_path=tmp_path / "out.jsonl", max_seq_len=max_seq_len)
        done = prepare_output(s, run_fingerprint(s, tokenizer.path, "torch.float32"))
        work = list(pending_records(Generation(s, Prompting(tokenizer, None)), done))
        writer = Writer(s, total=0, tally=Generation.tally)
        for item in work:
            if isinstance(item, BadLine):
                writer.bad_line(item)
            else:
                writer.output({"id": item.record.id, "sample": 0, "completion": "x",
                               "completion_tokens": 1}, item.record.line)
        writer.close()
        return work

    first = run(32)
    assert [type(x).__name__ for x in first] == ["TokenizedRecord", "BadLine"]
    assert first[1].max_seq_len == 32
    assert [json.loads(x) for x in (tmp_path / "out.jsonl.errors.jsonl").read_bytes()
            .splitlines()] == [first[1].as_json()]
    assert first[1].as_json()["max_seq_len"] == 32
    # The same context: still a bad line, recorded once. A longer one that is still too short
    # (n tokens need n + 1): tried, and recorded again with the context it was tried at.
    assert [type(x).__name__ for x in run(32)] == ["BadLine"]
    again = run(n)
    assert [(type(x).__name__, x.max_seq_len) for x in again] == [("BadLine", n)]
    assert [json.loads(x)["max_seq_len"] for x in (tmp_path / "out.jsonl.errors.jsonl")
            .read_bytes().splitlines()] == [n]
    # A context long enough: the prompt is work again, and its error is gone.
    retried = run(n + 1)
    assert [(type(x).__name__, x.record.id) for x in retried] == [("TokenizedRecord", "b")]
    assert (tmp_path / "out.jsonl.errors.jsonl").read_bytes() == b""
    assert replaced(tmp_path) == []


# --- the errors file read back: lines split at newlines alone, lines that are not entries kept ---

def test_an_errors_file_entry_holding_a_line_separator_does_not_stop_the_next_start(tmp_path):
    s = job(tmp_path, max_seq_len=1024)  # a run's, resolved before its output is prepared
    errors = JsonlAppender(s.errors_path)
    errors.write(BadLine(2, "too long", json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False),
                         max_seq_len=8).as_json())
    errors.close()
    forget_retryable_errors(s)
    assert s.errors_path.read_bytes() == b""


def test_an_errors_file_line_that_is_not_an_entry_does_not_stop_the_next_start(tmp_path):
    s = job(tmp_path, max_seq_len=64)
    write_errors(s.errors_path, [ERRORS[0]])
    with s.errors_path.open("ab") as f:
        f.write(b"garbage\n[5]\n")
    forget_retryable_errors(s)
    assert s.errors_path.read_bytes() == b"garbage\n[5]\n"


def test_line_digests_tell_which_lines_changed(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": 3}')  # the last line without its newline
    before = line_digests(path, path.stat().st_size)
    assert len(before) == 3 * LINE_DIGEST_BYTES
    path.write_bytes(b'{"a": 1}\n{"b": 20}\n{"c": 3}\n{"d": 4}\n')
    after = line_digests(path, path.stat().st_size)
    assert changed_lines(before, after) == {2, 4}  # its newline added: line 3 is the same
    assert changed_lines(after, before) == {2, 4}
    assert line_digests(path, 9) == before[:LINE_DIGEST_BYTES]  # the bytes the run read
    assert changed_lines(before, before) == set()
