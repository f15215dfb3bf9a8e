"""Throughput benchmark: continuous batching vs Meta's static batching on one fixed workload.

    python scripts/bench.py                       # stories15M-shaped fp32 model on the CPU
    python scripts/bench.py --preset 7b --dtype bf16 --batch 64 --device cuda

Both schedulers run the same requests in one process; the script prints generated tokens/s,
their ratio, the share of decode slot-steps wasted, the share of wall time inside model forward
passes, peak memory, and the workload's compute ceiling: its matmul FLOPs divided by the matmul
rate torch reaches here at the same shapes, measured in the same run.
"""
from __future__ import annotations

import math
import random
import resource
import time
from dataclasses import dataclass

import fire
import torch

from llama_gen import parallel
from llama_gen.args import ModelArgs
from llama_gen.engine import Engine, Request, SamplingParams
from llama_gen.model import Transformer
from llama_gen.parallel import ParallelLayers
from llama_gen.tiny import random_weights

PRESETS = {
    # llama2.c's stories15M shape
    "stories15m": {"dim": 288, "n_layers": 6, "n_heads": 6, "multiple_of": 32, "norm_eps": 1e-5,
                   "vocab_size": 32000},
    "7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-5,
           "vocab_size": 32000},
}
EOS = 2


@dataclass
class Workload:
    requests: list[Request]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_tokens) for r in self.requests)


def make_workload(args: ModelArgs, n_prompts: int, min_len: int, max_len: int, max_gen_len: int,
                  stop_rate: float, temperature: float, top_p: float, seed: int) -> Workload:
    """Random prompts; each record's max_gen_len is drawn so that about `stop_rate` of the steps
    end a sequence (a geometric length, capped at max_gen_len), as real completions vary."""
    rng = random.Random(seed)
    requests = []
    for i in range(n_prompts):
        prompt = [1] + [rng.randrange(3, args.vocab_size) for _ in range(rng.randint(min_len, max_len) - 1)]
        length = min(max_gen_len, 1 + int(math.log(1 - rng.random()) / math.log(1 - stop_rate)))
        params = SamplingParams(temperature=temperature, top_p=top_p, max_gen_len=length, seed=i)
        requests.append(Request(prompt, params, tag=i))
    return Workload(requests)


def build_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    model = Transformer(args, ParallelLayers())
    weights = {k: v.to(device=device, dtype=dtype) for k, v in random_weights(args).items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def linear_flops(args: ModelArgs) -> dict[tuple[int, int], int]:
    """(in, out) -> multiply-adds x 2 for one token through every layer's linear maps."""
    hd, kv = args.head_dim, args.kv_heads
    shapes = [(args.dim, args.n_heads * hd), (args.dim, kv * hd), (args.dim, kv * hd),
              (args.n_heads * hd, args.dim), (args.dim, args.ffn_hidden_dim),
              (args.dim, args.ffn_hidden_dim), (args.ffn_hidden_dim, args.dim)]
    flops: dict[tuple[int, int], int] = {}
    for shape in shapes:
        flops[shape] = flops.get(shape, 0) + 2 * shape[0] * shape[1] * args.n_layers
    return flops


def workload_flops(args: ModelArgs, work: Workload, generated: list[int]) -> dict[str, float]:
    """Matmul FLOPs of the useful work: prompts through the layers (logits for the last token
    only), every generated token but the last through the layers, logits for every generated
    token, and attention over each token's context."""
    layer_tokens = work.prompt_tokens + sum(max(g - 1, 0) for g in generated)
    head_tokens = sum(generated)
    attention = 0
    for request, g in zip(work.requests, generated):
        n = len(request.prompt_tokens) + max(g - 1, 0)  # tokens fed; token t sees t + 1 keys
        attention += 2 * 2 * args.dim * args.n_layers * n * (n + 1) // 2
    return {"layers": layer_tokens * sum(linear_flops(args).values()),
            "head": head_tokens * 2 * args.dim * args.vocab_size, "attention": attention}


def matmul_rate(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype,
                seconds: float = 0.3) -> float:
    """FLOP/s of (m, k) @ (k, n) as torch runs it here."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * m * k * n * reps / (time.perf_counter() - start)


def compute_ceiling(args: ModelArgs, flops: dict[str, float], batch: int, prompt_len: int,
                    device: torch.device, dtype: torch.dtype) -> float:
    """Seconds the workload's matmuls take at the rates torch reaches at its shapes."""
    per_shape = linear_flops(args)
    total = sum(per_shape.values())
    # Layers: prompt tokens run as (prompt_len, k) @ (k, n), decode tokens as (batch, k) @ (k, n).
    layer_rate = sum(f / total * (matmul_rate(batch, k, n, device, dtype)
                                  + matmul_rate(prompt_len, k, n, device, dtype)) / 2
                     for (k, n), f in per_shape.items())
    head_rate = matmul_rate(batch, args.dim, args.vocab_size, device, dtype)
    attention_rate = matmul_rate(batch * args.n_heads, args.head_dim, 256, device, dtype)
    return (flops["layers"] / layer_rate + flops["head"] / head_rate
            + flops["attention"] / attention_rate)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated, or on the CPU the process's peak resident set so far (it
    cannot be reset, so a later run reports at least an earlier run's peak)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_scheduler(model: Transformer, work: Workload, scheduler: str, batch: int,
                  max_seq_len: int) -> dict:
    engine = Engine(model, {EOS}, batch, max_seq_len, scheduler=scheduler)
    start = time.perf_counter()
    completions = sorted(engine.generate(work.requests), key=lambda c: c.request.tag)
    wall = time.perf_counter() - start
    generated = [len(c.tokens) for c in completions]
    return {"scheduler": scheduler, "wall": wall, "generated": generated,
            "tokens_per_s": sum(generated) / wall, "stats": engine.stats,
            "tokens": [c.tokens for c in completions],
            "peak_mib": peak_memory_mib(model.output.weight.device)}


def main(preset: str = "stories15m", n_prompts: int = 256, min_len: int = 8, max_len: int = 200,
         max_gen_len: int = 256, stop_rate: float = 0.02, batch: int = 32,
         temperature: float = 0.0, top_p: float = 0.9, dtype: str = "fp32",
         device: str = "cpu", schedulers: str = "continuous,static", seed: int = 0) -> None:
    info = parallel.init_distributed(1, device=device)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    args = ModelArgs.from_params(PRESETS[preset])
    model = build_model(args, info.device, torch_dtype)
    work = make_workload(args, n_prompts, min_len, max_len, max_gen_len, stop_rate, temperature,
                         top_p, seed)
    max_seq_len = max_len + max_gen_len
    cache_mib = (2 * args.n_layers * batch * max_seq_len * args.kv_heads * args.head_dim
                 * torch_dtype.itemsize / 2**20)
    print(f"model {preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{dtype}) on {info.device} with {torch.get_num_threads()} threads; {n_prompts} prompts "
          f"of {min_len}-{max_len} tokens ({work.prompt_tokens} in all), max_gen_len "
          f"{max_gen_len}, ~{stop_rate:.0%} of steps end a sequence, batch {batch}, "
          f"temperature {temperature}; KV cache {cache_mib:.0f} MiB, weights "
          f"{sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.0f} MiB")
    results = [run_scheduler(model, work, name, batch, max_seq_len)
               for name in schedulers.split(",")]
    if len(results) == 2:
        same = results[0]["tokens"] == results[1]["tokens"]
        print(f"same tokens from both schedulers: {same}")
    generated = results[0]["generated"]
    flops = workload_flops(args, work, generated)
    avg_prompt = work.prompt_tokens // n_prompts
    ceiling = compute_ceiling(args, flops, batch, avg_prompt, info.device, torch_dtype)
    ceiling_tps = sum(generated) / ceiling
    print(f"workload: {sum(generated)} generated tokens, {sum(flops.values()) / 1e12:.3f} TFLOP "
          f"of matmuls (layers {flops['layers'] / 1e9:.0f}, head {flops['head'] / 1e9:.0f}, "
          f"attention {flops['attention'] / 1e9:.0f} GFLOP); compute ceiling {ceiling:.2f}s = "
          f"{ceiling_tps:.0f} tok/s")
    print(f"{'scheduler':<11} {'tok/s':>8} {'wall s':>7} {'in forward':>10} {'wasted':>7} "
          f"{'decode steps':>12} {'refills':>7} {'peak MiB':>8} {'of ceiling':>10}")
    for r in results:
        s = r["stats"]
        print(f"{r['scheduler']:<11} {r['tokens_per_s']:8.0f} {r['wall']:7.2f} "
              f"{s.forward_seconds / r['wall']:10.0%} {s.wasted_share:7.0%} {s.decode_steps:12d} "
              f"{s.refills:7d} {r['peak_mib']:8.0f} {r['tokens_per_s'] / ceiling_tps:10.0%}")
    if len(results) == 2:
        print(f"continuous / static: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")
    parallel.shutdown()


if __name__ == "__main__":
    fire.Fire(main)
