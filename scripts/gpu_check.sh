#!/usr/bin/env bash
# llama-gen's GPU check, for anyone with a CUDA GPU for a few minutes: the CUDA tests (compiled
# decode in a fresh process, the decode kernel, compile counts, whole-step syncs, GPU against
# CPU), then the decode benchmark (a 7B-shaped bf16 model at batch 1 and 64, eager and
# compiled, against the HBM roofline; then compiled with --quantize int8's weights). Every
# result goes into one JSON file. At most 7.6 minutes (one command of a lent GPU's 10): each
# phase has its own time limit.
#
#   scripts/gpu_check.sh [OUT.json] [WHEELS_DIR]
#
# Needs the node's own torch (2.5 or later) with CUDA, and no network: llama-gen's other
# dependencies (fairscale, fire, termcolor, jsonlines) come from WHEELS_DIR (default
# ../shared/wheels, or $WHEELS), where they are missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu_check.json}")
WHEELS=${2:-${WHEELS:-../shared/wheels}}
PY=${PYTHON:-python3}
TESTS_LIMIT=${TESTS_LIMIT:-220}
BENCH_LIMIT=${BENCH_LIMIT:-45}  # eager decode
COMPILED_LIMIT=${COMPILED_LIMIT:-100}  # compiled decode: a 7B compiled at each batch bucket
INT8_LIMIT=${INT8_LIMIT:-90}  # int8 weights, compiled (the GPU's default)

if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: torch sees no CUDA GPU here" >&2
    exit 2
fi
SITE=$(mktemp -d)
if ! "$PY" -c 'import fairscale, fire, jsonlines' 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu_check: fairscale, fire or jsonlines is missing and $WHEELS holds no wheels:" \
             "pass the folder of wheels as the second argument" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)

start=$(date +%s)
timeout "$TESTS_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda.py \
    --junitxml "$WORK/tests.xml" >"$WORK/tests.txt" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - start ))

bench() {  # name, time limit, schedulers, bench.py's other flags
    local name=$1 limit=$2 schedulers=$3 start=$(date +%s)
    shift 3
    timeout "$limit" "$PY" scripts/bench.py --device cuda --schedulers "$schedulers" "$@" \
        >"$WORK/$name.txt" 2>&1
    echo "$? $(( $(date +%s) - start ))" >"$WORK/$name.rc"
}
bench eager "$BENCH_LIMIT" continuous
bench compiled "$COMPILED_LIMIT" compiled
bench int8 "$INT8_LIMIT" compiled --quantize int8

"$PY" - "$OUT" "$WORK" "$tests_rc" "$tests_s" <<'EOF'
"""Gather the phases' results into one JSON file."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, work = Path(sys.argv[1]), Path(sys.argv[2])
tests_rc, tests_s = map(int, sys.argv[3:])
tests = []
if (work / "tests.xml").exists():
    for case in ET.parse(work / "tests.xml").getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if (node := case.find(tag)) is not None:
                outcome = {"failure": "failed", "error": "error"}.get(tag, tag)
                message = (node.get("message") or node.text or "")[:2000]
                break
        else:
            message = ""
        tests.append({"name": case.get("name"), "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message,
                      "numbers": {p.get("name"): p.get("value")
                                  for p in case.iter("property")}})
report = {
    "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "tests": {"exit_code": tests_rc, "timed_out": tests_rc == 124, "seconds": tests_s,
              "counts": {k: sum(t["outcome"] == k for t in tests)
                         for k in ("passed", "failed", "error", "skipped")},
              "cases": tests,
              "output_tail": (work / "tests.txt").read_text(errors="replace")[-6000:]},
}
for name in ("eager", "compiled", "int8"):
    rc, seconds = map(int, (work / f"{name}.rc").read_text().split())
    report[f"bench_{name}"] = {"exit_code": rc, "timed_out": rc == 124, "seconds": seconds,
                               "output": (work / f"{name}.txt").read_text(errors="replace")[-8000:]}

out.write_text(json.dumps(report, indent=1))
print(f"gpu_check: {report['device']}, torch {report['torch']}: tests {report['tests']['counts']} "
      f"in {tests_s} s (exit {tests_rc}); bench exits "
      f"{report['bench_eager']['exit_code']}, {report['bench_compiled']['exit_code']}, "
      f"{report['bench_int8']['exit_code']} -> {out}")
EOF
