"""Under torchrun, a user's error is its one line in torchrun's failure report (the error file
named in TORCHELASTIC_ERROR_FILE), and a crash is still its traceback."""
from __future__ import annotations

import json

import pytest
from runs import job_args, run, write_prompts
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from llama_gen.cli import main as cli
from llama_gen.errors import UserError
from llama_gen.job.driver import Incomplete
from llama_gen.runtime import distributed


def report(error_file, exitcode: int = 2) -> str:
    """torchrun's failure report for one rank that left `error_file`, as torchrun reads it."""
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file=str(error_file))
    return ChildFailedError("llama_gen", {0: failure}).format_msg()


def root_cause(stderr: str) -> str:
    """The "Root Cause" entry of torchrun's report on stderr."""
    assert "Root Cause" in stderr, stderr
    return stderr.split("Root Cause", 1)[1].split("=" * 20, 1)[0]


def test_the_error_file_holds_the_line_as_torchrun_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    distributed.write_error_file("llama-gen: error: --ckpt_dir x: no such directory")
    shown = report(path)
    assert "traceback : llama-gen: error: --ckpt_dir x: no such directory\n" in shown
    assert "Traceback" not in shown and "To enable traceback" not in shown


def test_a_report_already_written_is_kept_and_without_torchrun_none_is(tmp_path, monkeypatch):
    path = tmp_path / "error.json"
    path.write_text('{"message": "a crash"}')
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    distributed.write_error_file("llama-gen: error: x")
    assert path.read_text() == '{"message": "a crash"}'
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    distributed.write_error_file("llama-gen: error: x")  # nowhere to write: nothing happens


@pytest.mark.parametrize("rank", ["0", "1"])
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # capsys's stderr
def test_main_writes_a_user_error_on_each_rank_that_meets_it(tmp_path, monkeypatch, capsys,
                                                            rank):
    """Only rank 0 prints it, but any rank may fail first and be torchrun's root cause."""
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    monkeypatch.setenv("RANK", rank)

    def refuse(argv):
        raise UserError("--ckpt_dir x: no such directory")
    monkeypatch.setattr(cli, "command", refuse)
    with pytest.raises(SystemExit) as exited:
        cli.main([])
    assert exited.value.code == 2
    line = "llama-gen: error: --ckpt_dir x: no such directory"
    assert json.loads(path.read_text())["message"]["message"] == line
    assert (line in capsys.readouterr().err) == (rank == "0")


def test_a_rank_with_nothing_of_its_own_to_say_writes_nothing(tmp_path, monkeypatch):
    """Incomplete is empty on the ranks whose log said why: rank 0 has the line."""
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))

    def incomplete(argv):
        raise Incomplete("")
    monkeypatch.setattr(cli, "command", incomplete)
    with pytest.raises(SystemExit) as exited:
        cli.main([])
    assert exited.value.code == 3 and not path.exists()


def test_a_crash_is_still_reported_as_its_traceback(tmp_path, monkeypatch):
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))

    def crash(argv):
        raise RuntimeError("a bug")
    monkeypatch.setattr(cli, "command", crash)
    with pytest.raises(RuntimeError):
        cli.main([])
    shown = report(path, exitcode=1)
    assert "Traceback (most recent call last)" in shown and "RuntimeError: a bug" in shown


def test_under_torchrun_the_root_cause_is_the_line(tmp_path):
    """torchrun still prints its own traceback and report; the report's root cause is the
    line, not the link to torch's docs that it shows for a rank that wrote no error file."""
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    result = run(job_args(tmp_path / "missing", prompts, tmp_path / "o.jsonl"), nproc=2)
    assert result.returncode == 1
    cause = root_cause(result.stderr)
    assert "traceback : llama-gen: error: --ckpt_dir" in cause and "no such directory" in cause
    assert "Traceback" not in cause and "To enable traceback" not in cause, cause
