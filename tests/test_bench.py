"""The benchmark script runs end to end on a small workload (its numbers are not asserted)."""
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "scripts" / "bench.py"


def test_bench_runs_both_schedulers_and_they_agree():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--n_prompts", "12", "--max_len", "40", "--max_gen_len",
         "12", "--batch", "4"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "same tokens from both schedulers: True" in result.stdout
    assert "continuous / static:" in result.stdout
