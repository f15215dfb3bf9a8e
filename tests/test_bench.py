"""The benchmark script runs end to end on a small workload (its numbers are not asserted)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parent.parent / "scripts" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def bench_output(*args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def table(output: str, header: str) -> list[list[str]]:
    """The rows of the table whose header line starts with `header`, split on spaces."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    return [line.split() for line in lines[start + 1:] if ":" not in line]


def run_bench(*extra: str, header: str = "engine",
              summary: str = "continuous / static:") -> dict[str, list[str]]:
    """The results table's rows by engine name (the first column, titled `header`)."""
    output = bench_output("--n_prompts", "12", "--max_len", "40", "--max_gen_len", "12",
                          "--batch", "4", *extra)
    assert summary in output
    return {row[0]: row for row in table(output, header)}


def test_bench_runs_every_scheduler_and_they_agree():
    rows = run_bench("--ctranslate2", "False", "--schedulers", "continuous,compiled,static",
                     "--temperature", "0")
    assert set(rows) == {"continuous", "compiled", "static"}
    assert rows["static"][-1] == rows["compiled"][-1] == "100%"  # the continuous run's tokens
    assert rows["continuous"][5] == "0%"  # no wasted slot-steps


def test_context_mode_runs_short_prompts_in_the_whole_context():
    output = bench_output("--mode", "context", "--preset", "tiny", "--n_prompts", "6",
                          "--max_len", "20", "--max_gen_len", "8")
    assert "6 prompts of 4-20 tokens" in output and "(max_seq_len 4096)" in output
    [row] = table(output, "engine")
    assert row[0] == "continuous" and float(row[3]) >= 0  # its setup seconds


def test_a_zero_stop_rate_generates_max_gen_len_from_the_same_prompts():
    args = bench.ModelArgs.from_params(bench.PRESETS["tiny"])
    never = bench.make_workload(args, 20, 4, 30, 16, 0.0, 0.8, 0.95, seed=0).requests
    often = bench.make_workload(args, 20, 4, 30, 16, 0.2, 0.8, 0.95, seed=0).requests
    assert {r.params.max_gen_len for r in never} == {16}
    assert len({r.params.max_gen_len for r in often}) > 1
    assert [r.prompt_tokens for r in never] == [r.prompt_tokens for r in often]


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


def test_bench_samples_by_default_as_dataset_jobs_do():
    output = bench_output("--preset", "tiny", "--n_prompts", "4", "--max_len", "16",
                          "--max_gen_len", "4", "--schedulers", "continuous")
    assert "temperature 0.8, top-p 0.95" in output


@pytest.mark.parametrize("name, gbps", [
    ("NVIDIA H200", 4800), ("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H100 SXM5 80GB", 3350),
    ("NVIDIA A100-SXM4-80GB", 2039), ("NVIDIA A100-SXM4-40GB", 1555),
    ("NVIDIA A100-PCIE-40GB", 1555), ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
    ("NVIDIA A100 80GB PCIe", None), ("NVIDIA GeForce RTX 4090", None)])
def test_hbm_bandwidth_comes_from_the_device_name(name, gbps):
    assert bench.hbm_gbps_by_name(name) == gbps


def test_a_device_without_a_known_bandwidth_needs_the_flag():
    with pytest.raises(SystemExit, match="--hbm_gbps"):
        bench.hbm_bandwidth(torch.device("cpu"), None)
    assert bench.hbm_bandwidth(torch.device("cpu"), 20)[0] == 20e9


def test_decode_steps_after_prefill_read_the_weights_and_each_context():
    step = bench.StepBytes(weights=1000, kv_per_token=3)
    prompts, gen_len = [5, 9, 2], 4
    each_step = [1000 + 3 * sum(p + j for p in prompts) for j in range(1, gen_len)]
    assert step.after_prefill(prompts, gen_len) == sum(each_step)


def test_weights_drawn_on_the_device_fill_every_parameter_in_its_dtype(single_process):
    args = bench.ModelArgs.from_params(bench.PRESETS["tiny"])
    model = bench.build_model(args, torch.device("cpu"), torch.bfloat16, on_device=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert 0.5 < model.norm.weight.float().mean() < 1.5  # norms near one, as random_weights'


def test_roofline_mode_runs_the_gpu_code_path_on_the_cpu():
    output = bench_output("--mode", "roofline", "--device", "cpu", "--preset", "tiny",
                          "--hbm_gbps", "20", "--batch", "1,4", "--min_len", "8", "--max_len",
                          "16", "--max_gen_len", "6")
    rows = table(output, "engine")
    assert [(row[0], row[1], row[3]) for row in rows] == [("continuous", "1", "6"),
                                                          ("continuous", "4", "6")]
    assert all(row[-2].endswith("%") for row in rows)  # the share of the roofline


def test_budget_mode_fits_more_sequences_paged_than_per_slot():
    output = bench_output("--mode", "budget", "--preset", "tiny", "--max_seq_len", "64",
                          "--kv_budget", "256", "--block_sizes", "16", "--n_prompts", "16",
                          "--min_len", "4", "--max_len", "24", "--min_gen_len", "4",
                          "--max_gen_len", "24", "--batch", "16", "--temperature", "0")
    rows = {row[0]: row for row in table(output, "kv cache")}
    assert set(rows) == {"per-slot", "paged-16"}
    assert int(rows["per-slot"][2]) == 4 and int(rows["per-slot"][3]) <= 4  # 256 / 64 slots
    assert int(rows["paged-16"][3]) > 4  # sequences decoding at once in the same budget
    assert rows["paged-16"][-1] == "100%"  # preempted sequences regenerate the same tokens
