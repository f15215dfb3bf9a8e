"""Sampler micro-benchmark: `sampling.sample` alone, ms per call, at each batch size and
vocabulary, with top-p alone and with top-k and top-p together.

    python scripts/bench_sampler.py                      # this tree's sampler
    python scripts/bench_sampler.py --baseline /work/main/llama_gen/engine/sampling.py
    python scripts/bench_sampler.py --device cuda --baseline old_sampling.py

With `--baseline` (another copy of `llama_gen/engine/sampling.py`, loaded from its path), the two
run in alternating pairs (baseline then this tree, then this tree then baseline, ...) on the
same logits, and the script prints each one's median over the pairs, the median of the
per-pair ratios, and whether every draw gave the same tokens. Each timing is the median of
`calls` calls after one warm-up call. On the CPU the clock is the process's CPU time by default
(`--clock cpu`): on a shared machine, time spent waiting for a core is not the sampler's. On
CUDA it is wall time, each call between two synchronisations.

Logits are random normal times `scale` (3 by default: a few hundred tokens hold most of the
mass at 32000, as a language model's next-token distribution does), temperature 0.8, top-p
0.95, top-k 40. `--threads` sets torch's CPU threads: on a shared machine one thread gives
steadier numbers.
"""
from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from types import ModuleType

import fire
import torch

from llama_gen.engine import sampling


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_sampling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(batch: int, vocab: int, top_k: bool, scale: float, device: str) -> tuple:
    """`sample`'s arguments for one setting: the same on every call and for both samplers."""
    gen = torch.Generator().manual_seed(batch * vocab)
    logits = (torch.randn(batch, vocab, generator=gen) * scale).to(device)
    temperature = torch.full((batch,), 0.8, device=device)
    top_p = torch.full((batch,), 0.95, device=device)
    uniform = sampling.counter_uniform(torch.arange(batch), torch.zeros(batch, dtype=torch.long))
    k = torch.full((batch,), 40, device=device) if top_k else None
    return logits, temperature, top_p, uniform.to(device), k


def milliseconds(module: ModuleType, args: tuple, calls: int, clock: Callable[[], float]
                 ) -> tuple[float, torch.Tensor]:
    """The median time of `calls` calls, after a warm-up call, and the tokens drawn."""
    cuda = args[0].device.type == "cuda"
    tokens = module.sample(*args)
    times = []
    for _ in range(calls):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        module.sample(*args)
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - start)
    return statistics.median(times) * 1e3, tokens.cpu()


def numbers(value: int | str | tuple) -> list[int]:
    """A comma-separated list as fire passes it: an int, a tuple, or a string."""
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value]
    return [int(v) for v in str(value).split(",")]


def main(baseline: str | None = None, batches: str = "1,32,64", vocabs: str = "32000,128256",
         pairs: int = 5, calls: int = 5, scale: float = 3.0, device: str = "cpu",
         threads: int | None = None, clock: str | None = None) -> None:
    """`batches`, `vocabs`: comma-separated; `pairs`: alternating pairs with a baseline (one
    run without); `clock`: "cpu" (the process's CPU time, the default on the CPU) or "wall"
    (the default on CUDA)."""
    if threads:
        torch.set_num_threads(threads)
    clock = clock or ("wall" if device == "cuda" else "cpu")
    timer = {"cpu": time.process_time, "wall": time.perf_counter}[clock]
    samplers = {"this tree": sampling}
    if baseline:
        samplers = {"baseline": load(baseline), **samplers}
    names = list(samplers)
    print(f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, {clock} "
          f"time, logits randn x {scale}, temperature 0.8; median of {calls} calls per run, "
          f"{pairs if baseline else 1} run(s) each" + (", alternating" if baseline else ""))
    header = f"{'batch':>5} {'vocab':>6} {'filters':<14}" + "".join(f"{n + ' ms':>15}"
                                                                      for n in names)
    print(header + (f"{'ratio':>7} {'same tokens':>11}" if baseline else ""))
    for vocab in numbers(vocabs):
        for batch in numbers(batches):
            for top_k in (False, True):
                args = inputs(batch, vocab, top_k, scale, device)
                times = {name: [] for name in names}
                drawn = {}
                for pair in range(pairs if baseline else 1):
                    for name in (names if pair % 2 == 0 else names[::-1]):
                        ms, drawn[name] = milliseconds(samplers[name], args, calls, timer)
                        times[name].append(ms)
                filters = "top-k + top-p" if top_k else "top-p"
                line = f"{batch:5d} {vocab:6d} {filters:<14}" + "".join(
                    f"{statistics.median(times[n]):15.2f}" for n in names)
                if baseline:
                    ratio = statistics.median(b / a for a, b in zip(*times.values()))
                    same = torch.equal(*drawn.values())
                    line += f"{ratio:7.2f} {'yes' if same else 'NO':>11}"
                print(line, flush=True)


if __name__ == "__main__":
    fire.Fire(main)
