"""The benchmark script runs end to end on a small workload (its numbers are not asserted)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "scripts" / "bench.py"


def run_bench(*extra: str, header: str = "engine",
              summary: str = "continuous / static:") -> dict[str, list[str]]:
    """The results table's rows by engine name (the first column, titled `header`)."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--n_prompts", "12", "--max_len", "40", "--max_gen_len",
         "12", "--batch", "4", *extra], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {line.split()[0]: line.split() for line in lines[start + 1:] if ":" not in line}
    assert summary in result.stdout
    return rows


def test_bench_runs_every_scheduler_and_they_agree():
    rows = run_bench("--ctranslate2", "False", "--schedulers", "continuous,compiled,static")
    assert set(rows) == {"continuous", "compiled", "static"}
    assert rows["static"][-1] == rows["compiled"][-1] == "100%"  # the continuous run's tokens
    assert rows["continuous"][4] == "0%"  # no wasted slot-steps


def test_bench_ctranslate2_column_computes_the_same_model():
    pytest.importorskip("ctranslate2")
    rows = run_bench("--ctranslate2", "True")
    assert rows["ctranslate2"][-1] == "100%"


def test_bench_scoring_mode_scores_batched_as_one_at_a_time():
    rows = run_bench("--mode", "score", header="scorer", summary="batched / single:")
    assert set(rows) == {"batched", "single"}
    assert float(rows["single"][-1]) <= 1e-5  # max |logprob difference| from the batched run


def test_load_benchmark_writes_and_loads_a_sharded_checkpoint(tmp_path):
    script = str(BENCH.parent / "bench_load.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ckpt = str(tmp_path / "ckpt")
    subprocess.run([sys.executable, script, "write", ckpt, "--dim", "64", "--n_layers", "2",
                    "--n_heads", "4", "--n_shards", "2"], check=True, env=env, timeout=120)
    result = subprocess.run([sys.executable, script, "load", ckpt], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "rank 0: loaded its" in result.stdout and "peak resident memory" in result.stdout
