"""int8 weight-only against the model's dtype on this machine: the products, then decoding.

    python scripts/bench_int8.py                          # CPU, fp32 and bf16, both parts
    python scripts/bench_int8.py --part decode --pairs 5  # only decoding, 5 ABBA pairs

`--part products` times one layer's product x @ W.T at `rows` rows of x (1 and 32: a decode
step's batch) for each way of multiplying by an int8 weight, at stories15M's shapes and a 7B's
FFN: the model dtype's product (`kernels.linear`), torch's int8 kernel
(`torch._weight_int8pack_mm`), the dequantize-then-multiply pattern eagerly
(`F.linear(x, w.to(dtype)) * s`, a full-precision copy of W per call) and compiled (what
inductor makes of it), the dequantized row blocks (`dequantized_blocks_linear`), and
`int8_linear`, which picks among them. Microseconds
per product, medians of `repeats` timings.

`--part decode` runs a stories15M-shaped model through the engine (bench.py's `decode_timing`:
`batch` prompts of 32-64 tokens, 64 tokens generated each) in the model dtype and with int8
blocks, as ABBA pairs (dtype, int8, int8, dtype, ...), and prints each run's generated tok/s
(over its whole run, prefill included: a difference of two timings is too noisy on a shared
machine) and the medians, with their ratio.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import fire
import torch
import torch.nn.functional as F
from bench import DTYPES, PRESETS, build_model, decode_timing, mixed_requests

from llama_gen.model.args import ModelArgs
from llama_gen.model.kernels import dequantized_blocks_linear, int8_linear, linear
from llama_gen.model.quantize import quantize_rows
from llama_gen.runtime import distributed

# (name, out_features, in_features)
SHAPES = [("stories15M w1", 768, 288), ("stories15M head", 32000, 288), ("7B w1", 11008, 4096)]


def microseconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm: compiled code made, memory allocated
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def product_ways(x: torch.Tensor, weight: torch.Tensor) -> dict[str, Callable[[], object]]:
    q, scales = quantize_rows(weight, weight.abs().amax(dim=1), x.dtype)
    torch._dynamo.reset()  # a fresh compiled pattern for each shape: no recompile limit
    compiled = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s, dynamic=False)
    return {"dtype linear": lambda: linear(x, weight),
            "int8pack_mm": lambda: torch._weight_int8pack_mm(x, q, scales),
            "cast eager": lambda: F.linear(x, q.to(x.dtype)) * scales,
            "cast compiled": lambda: compiled(x, q, scales),
            "dequant blocks": lambda: dequantized_blocks_linear(x, q, scales),
            "int8_linear": lambda: int8_linear(x, q, scales)}


def products(dtypes: list[str], rows: list[int], repeats: int) -> None:
    names = list(product_ways(torch.zeros(1, 8), torch.ones(8, 8)))
    print(f"{'shape':<16} {'dtype':<5} {'rows':>4} " + " ".join(f"{n:>14}" for n in names)
          + "   (microseconds per product, median)")
    for label, out_features, in_features in SHAPES:
        gen = torch.Generator().manual_seed(0)
        weight32 = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
        for dtype_name in dtypes:
            weight = weight32.to(DTYPES[dtype_name])
            for m in rows:
                x = torch.randn(m, in_features, generator=gen).to(weight.dtype)
                times = [microseconds(run, repeats) for run in product_ways(x, weight).values()]
                print(f"{label:<16} {dtype_name:<5} {m:4d} "
                      + " ".join(f"{t:14.0f}" for t in times), flush=True)


def decode(dtypes: list[str], batches: list[int], pairs: int, preset: str,
           temperature: float, top_p: float) -> None:
    args = ModelArgs.from_params(PRESETS[preset])
    cpu = torch.device("cpu")
    for dtype_name in dtypes:
        models = {kind: build_model(args, cpu, DTYPES[dtype_name], quantize=kind)
                  for kind in (None, "int8")}
        for batch in batches:
            requests = mixed_requests(args, batch, (32, 64), (64, 64), temperature, top_p,
                                      seed=0)
            rates: dict[str | None, list[float]] = {None: [], "int8": []}
            for i in range(pairs):
                for kind in ((None, "int8") if i % 2 == 0 else ("int8", None)):
                    r = decode_timing(models[kind], "continuous", requests)
                    rates[kind].append(batch * r["gen_len"] / r["whole"])
            base, int8 = (statistics.median(rates[k]) for k in (None, "int8"))
            print(f"{preset} {dtype_name} batch {batch}: tok/s {dtype_name} "
                  f"{[round(v, 1) for v in rates[None]]} median {base:.1f}; int8 "
                  f"{[round(v, 1) for v in rates['int8']]} median {int8:.1f}; "
                  f"int8 / {dtype_name} {int8 / base:.2f}x", flush=True)


def main(part: str = "products,decode", dtypes: str = "fp32,bf16", rows: str = "1,32",
         batches: str = "1,32", pairs: int = 3, repeats: int = 20,
         preset: str = "stories15m", temperature: float = 0.8, top_p: float = 0.95) -> None:
    """`part`: products, decode or both; `dtypes`, `rows` and `batches` comma-separated;
    `pairs` ABBA pairs of decode runs (at least 3 for a median), sampled as dataset jobs sample
    (`--temperature 0` for greedy)."""
    listed = (lambda v: v.split(",") if isinstance(v, str) else [str(i) for i in v])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "products" in part:
        products(listed(dtypes), [int(r) for r in listed(rows)], repeats)
    if "decode" in part:
        distributed.init_distributed(1, device="cpu")
        decode(listed(dtypes), [int(b) for b in listed(batches)], pairs, preset, temperature,
               top_p)
        distributed.shutdown()


if __name__ == "__main__":
    fire.Fire(main)
