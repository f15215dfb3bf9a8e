"""Throughput benchmark: continuous batching vs Meta's static batching on one fixed workload.

    python scripts/bench.py                       # stories15M-shaped fp32 model on the CPU
    python scripts/bench.py --temperature 0       # the same, greedy
    python scripts/bench.py --mode generate --preset 7b --dtype bf16 --batch 64 --device cuda \
        --schedulers continuous,compiled,static --ctranslate2 False

The workload samples as dataset jobs do (temperature 0.8, top-p 0.95); `--temperature 0`
decodes greedily.

The continuous engine (`llama_gen.engine.engine.Engine`) and Meta's static batching
(`llama_gen.engine.baseline.StaticEngine`) run the same requests in one process; the script prints
generated tokens/s, their ratio, the share of decode slot-steps wasted, the share of wall time
inside model forward passes, peak memory, and two bounds: the workload's compute ceiling (its
matmul FLOPs divided by the matmul rate torch reaches here at the same shapes, measured in the
same run) and its memory roofline (the bytes its decode steps must read, divided by the rate of
a large copy on the device; the bound that matters for decoding on GPUs).

    python scripts/bench.py --mode score          # teacher-forced scoring (`llama-gen score`)

`--mode score` scores random texts of log-uniform lengths whole, batched
(`llama_gen.engine.scoring.Scorer`) and one text at a time through the engine's teacher-forced pass
(`prompt_logprobs`, what echo with logprobs runs), and prints scored tokens/s, the
largest logprob difference between the two, and two shares of a compute ceiling at the scorer's
shapes (`scoring_rates`): one from plain products, as generation's, and a stricter one from
each product's fastest form here (`product_rate`: oneDNN's packed product is the fastest at
these shapes on the CPU, and only the output head uses it).

    python scripts/bench.py --device cuda         # --mode roofline: a 7B-shaped bf16 model
    python scripts/bench.py --mode roofline --device cpu --preset tiny --hbm_gbps 20

`--mode roofline` (the default on CUDA) decodes `batch` requests at each batch size (1 and 64)
with a model whose random weights are drawn on the device, and prints tok/s and the share of
the HBM roofline: the bytes a decode step must read (weights, and the KV cache at the run's
context lengths) over the device's memory bandwidth (`--hbm_gbps`, or its datasheet figure for
the GPUs in `HBM_GBPS`).

    python scripts/bench.py --mode budget --temperature 0

    python scripts/bench.py --mode context        # the model's whole context for short prompts
    python scripts/bench.py --mode context --max_seq_len 456   # the same, a context just long enough

`--mode context` is generation's run on issue 24's workload: 128 prompts of 4-328 tokens, batch
32, each generating max_gen_len 128 tokens (as a job on random weights does, which never draws
its end token), sampled, in a cache of `--max_seq_len` positions per row (default 4096, a Llama
2's context: the CPU's default --max_seq_len is the model's). 456 is what the longest prompt
needs. A run's wall time includes setting its engine up (its KV cache), as a job's does.

`--mode budget` runs requests of mixed lengths (prompts of 32-1024 tokens, 64-512 generated)
at `--max_seq_len 4096` in a fixed KV budget (`--kv_budget` tokens; by default what 16 full-length
sequences take), per-slot (one `max_seq_len` block per slot, `kv_budget / max_seq_len` slots)
against paged (`--block_sizes` 16 and 128, up to `batch` sequences), and prints how many
sequences decoded at once, how many were preempted, and tok/s.
"""
from __future__ import annotations

import math
import random
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import fire
import torch

from llama_gen.engine import limits, scoring
from llama_gen.engine.baseline import StaticEngine
from llama_gen.engine.engine import Engine
from llama_gen.engine.passes import DECODE_KV_BUCKET, ForwardTimer, prompt_logprobs
from llama_gen.engine.requests import EngineStats, Request, SamplingParams
from llama_gen.engine.scoring import Scorer, ScoreRequest
from llama_gen.model import kernels
from llama_gen.model.args import ModelArgs
from llama_gen.model.checkpoint import EMBEDDING_KEY, full_shapes
from llama_gen.model.layers import ParallelLayers
from llama_gen.model.quantize import quantized_state
from llama_gen.model.transformer import Transformer
from llama_gen.runtime import distributed
from llama_gen.testing.tiny import random_weights

PRESETS = {
    # llama2.c's stories15M shape
    "stories15m": {"dim": 288, "n_layers": 6, "n_heads": 6, "multiple_of": 32, "norm_eps": 1e-5,
                   "vocab_size": 32000},
    # the same layers with Llama 3's vocabulary and grouped-query attention: the output head
    # and the sampler weigh four times as much
    "stories15m-v128k": {"dim": 288, "n_layers": 6, "n_heads": 6, "n_kv_heads": 2,
                         "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 500000.0,
                         "vocab_size": 128256},
    # Llama 2 7B's params.json (FFN width 11008, as Meta computes it from multiple_of)
    "7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-5,
           "vocab_size": 32000},
    # seconds on the CPU, for smoke tests of every mode's code path
    "tiny": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
             "norm_eps": 1e-5, "vocab_size": 512},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EOS = 2
# Each mode's model, workload and engines, unless flags say otherwise.
MODE_DEFAULTS = {
    "generate": {"preset": "stories15m", "dtype": "fp32", "batch": 32, "n_prompts": 256,
                 "min_len": 8, "max_len": 200, "max_gen_len": 256, "stop_rate": 0.02,
                 "schedulers": "continuous,static"},
    # generation with short prompts in a long context (`--max_seq_len`, CONTEXT_MAX_SEQ_LEN)
    "context": {"preset": "stories15m", "dtype": "fp32", "batch": 32, "n_prompts": 128,
                "min_len": 4, "max_len": 328, "max_gen_len": 128, "stop_rate": 0.0,
                "schedulers": "continuous"},
    "score": {"preset": "stories15m", "dtype": "fp32", "batch": 32, "n_prompts": 128,
              "min_len": 32, "max_len": 2048, "max_gen_len": 0, "schedulers": "batched,single"},
    # `batch` requests at each batch size, every one generating exactly max_gen_len tokens
    "roofline": {"preset": "7b", "dtype": "bf16", "batch": "1,64", "n_prompts": 0,
                 "min_len": 512, "max_len": 512, "max_gen_len": 128, "schedulers": "continuous"},
    "budget": {"preset": "stories15m", "dtype": "fp32", "batch": 256, "n_prompts": 128,
               "min_len": 32, "max_len": 1024, "max_gen_len": 512, "schedulers": "continuous"},
}
CONTEXT_MAX_SEQ_LEN = 4096
# Datasheet HBM bandwidths in GB/s, by what the device's name holds and does not hold.
HBM_GBPS = (
    (("H200",), (), 4800),
    (("H100", "SXM"), (), 3350),
    (("H100", "HBM3"), ("PCIE", "NVL"), 3350),  # torch names the SXM part "H100 80GB HBM3"
    (("A100", "80GB"), ("PCIE",), 2039),
    (("A100", "40GB"), (), 1555),
)


@dataclass
class Workload:
    requests: list[Request]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_tokens) for r in self.requests)


def make_workload(args: ModelArgs, n_prompts: int, min_len: int, max_len: int, max_gen_len: int,
                  stop_rate: float, temperature: float, top_p: float, seed: int) -> Workload:
    """Random prompts; each record's max_gen_len is drawn so that about `stop_rate` of the steps
    end a sequence (a geometric length, capped at max_gen_len), as real completions vary; with
    `stop_rate` 0 every record's is max_gen_len."""
    rng = random.Random(seed)
    requests = []
    for i in range(n_prompts):
        n = rng.randint(min_len, max_len)
        prompt = [1] + [rng.randrange(3, args.vocab_size) for _ in range(n - 1)]
        draw = rng.random()
        length = max_gen_len if stop_rate == 0 else min(
            max_gen_len, 1 + int(math.log(1 - draw) / math.log(1 - stop_rate)))
        params = SamplingParams(temperature=temperature, top_p=top_p, max_gen_len=length, seed=i)
        requests.append(Request(prompt, params, tag=i))
    return Workload(requests)


def device_random_weights(args: ModelArgs, device: torch.device, dtype: torch.dtype,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights scaled as `random_weights`' (norms near one, activations O(1)), drawn on
    `device` in `dtype`: a 7B takes no host memory and no host-to-device copy."""
    gen = torch.Generator(device).manual_seed(seed)
    weights = {}
    for key, shape in full_shapes(args).items():
        w = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        if len(shape) == 1:
            weights[key] = w.mul_(0.1).add_(1.0)
        else:
            weights[key] = w if key == EMBEDDING_KEY else w.mul_(shape[1] ** -0.5)
    return weights


def build_model(args: ModelArgs, device: torch.device, dtype: torch.dtype,
                on_device: bool = False, quantize: str | None = None) -> Transformer:
    """A random-weight model: with `on_device` its weights are drawn on the device; else drawn
    on the CPU in float32 (`random_weights`, whose tokens earlier runs recorded) and copied.
    `quantize` int8: the blocks' linear weights quantized as `llama-gen --quantize int8` does,
    one at a time as they are handed over."""
    model = Transformer(args, ParallelLayers(int8=quantize == "int8"))  # weights on meta
    if on_device:
        weights = device_random_weights(args, device, dtype)
    else:
        weights = {k: v.to(device=device, dtype=dtype) for k, v in random_weights(args).items()}
    handed = ((key, weights.pop(key)) for key in list(weights))
    model.load_state_dict(quantized_state(model, handed, device, dtype), strict=True, assign=True)
    model.fuse()
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


def per_second(work: float, run: Callable[[], object], device: torch.device,
               seconds: float = 0.3) -> float:
    """`work` (done by each call of `run`) per second, as torch runs it here, after warm-up."""
    for _ in range(3):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return work * reps / (time.perf_counter() - start)


def matmul_rate(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of (m, k) @ (k, n) as torch runs it here."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    return per_second(2 * m * k * n, lambda: a @ b, device)


@dataclass(frozen=True)
class MatmulRates:
    """FLOP/s torch reaches here at the workload's shapes."""

    layers: float  # the layers' linear maps, the mean of prompt-sized and decode-sized rows
    head: float  # the output head at decode rows
    attention: float

    @classmethod
    def measure(cls, args: ModelArgs, batch: int, prompt_len: int, device: torch.device,
                dtype: torch.dtype) -> MatmulRates:
        per_shape = linear_flops(args)
        total = sum(per_shape.values())
        layers = sum(f / total * (matmul_rate(batch, k, n, device, dtype)
                                  + matmul_rate(prompt_len, k, n, device, dtype)) / 2
                     for (k, n), f in per_shape.items())
        return cls(layers, matmul_rate(batch, args.dim, args.vocab_size, device, dtype),
                   matmul_rate(batch * args.n_heads, args.head_dim, 256, device, dtype))

    def mean(self, other: MatmulRates) -> MatmulRates:
        return MatmulRates((self.layers + other.layers) / 2, (self.head + other.head) / 2,
                           (self.attention + other.attention) / 2)


def ceiling_seconds(flops: dict[str, float], rates: MatmulRates) -> float:
    """Seconds the workload's matmuls take at the rates torch reaches at its shapes."""
    return (flops["layers"] / rates.layers + flops["head"] / rates.head
            + flops["attention"] / rates.attention)


def memory_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes/s moved by a large device-to-device copy (read + write), as torch runs it here: a
    proxy for the memory bandwidth (a pure read can be faster; on a CPU, writes also cost a
    read of the line they fill), so the roofline it gives is approximate."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return per_second(2 * src.numel(), lambda: dst.copy_(src), device)


@dataclass(frozen=True)
class StepBytes:
    """What decode steps must read at least."""

    weights: int  # every weight but the embedding table, once per step (a step reads few rows)
    kv_per_token: int  # one cached token's keys and values, every layer

    @classmethod
    def of(cls, model: Transformer) -> StepBytes:
        args = model.args
        weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                      if name != "tok_embeddings.weight")
        return cls(weights, 2 * args.n_layers * args.kv_heads * args.head_dim
                   * model.output.weight.element_size())

    def after_prefill(self, prompt_lens: list[int], gen_len: int) -> int:
        """Bytes of the gen_len - 1 decode steps that follow the prefill of sequences that
        decode together: step j (from 1) reads the weights and each sequence's p + j keys and
        values (its prompt's p, the j - 1 tokens fed before, and its own)."""
        steps = gen_len - 1
        contexts = steps * sum(prompt_lens) + len(prompt_lens) * steps * (steps + 1) // 2
        return steps * self.weights + contexts * self.kv_per_token


def decode_bytes(model: Transformer, work: Workload, generated: list[int], batch: int) -> float:
    """Bytes the workload's decode steps must read at least: the weights once per step, with
    steps always full (ceil(tokens / batch) of them), and each generated token's cached
    context."""
    step = StepBytes.of(model)
    contexts = sum(g * len(r.prompt_tokens) + g * (g - 1) // 2
                   for r, g in zip(work.requests, generated))
    return math.ceil(sum(generated) / batch) * step.weights + contexts * step.kv_per_token


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated, or on the CPU the process's peak resident set so far (it
    cannot be reset, so a later run reports at least an earlier run's peak)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_engine(model: Transformer, name: str, batch: int, max_seq_len: int,
                stop_ids: tuple[int, ...] = (EOS,)) -> tuple[Engine, float]:
    """The engine `name`: continuous, static, or compiled (continuous with the compiled decode
    step, compiled here), and the seconds compiling took."""
    compiled = name == "compiled"
    if name == "static":
        engine = StaticEngine(model, stop_ids, batch, max_seq_len)
    elif name in ("continuous", "compiled"):
        engine = Engine(model, stop_ids, batch, max_seq_len, compile=compiled)
    else:
        raise SystemExit(f"unknown scheduler {name!r}: continuous, static or compiled")
    if not compiled:
        return engine, 0.0
    start = time.perf_counter()
    engine.runner.warm_up()  # every batch bucket
    # an unpaged cache: one sequence crosses the first cache bucket, one reaches the end
    greedy = SamplingParams(temperature=0, max_gen_len=3)
    for length in (min(DECODE_KV_BUCKET, max_seq_len - 3) - 1, max_seq_len - 3):
        list(engine.generate([Request([1] * length, greedy)]))
    engine.stats = EngineStats()
    return engine, time.perf_counter() - start


def run_scheduler(model: Transformer, work: Workload, name: str, batch: int,
                  max_seq_len: int) -> dict:
    """`name`: continuous, static, or compiled (see `make_engine`). The wall time includes
    setting the engine up (`setup`: its KV cache, allocated afresh as a job's is), not compiling
    it (`compile_seconds`)."""
    for layer in model.layers:  # else an engine would keep the last one's cache, written before
        layer.attention.cache = None
    start = time.perf_counter()
    engine, compile_seconds = make_engine(model, name, batch, max_seq_len)
    setup = time.perf_counter() - start - compile_seconds
    engine.forward_timer = ForwardTimer(model.output.weight.device)
    start = time.perf_counter()
    completions = sorted(engine.generate(work.requests), key=lambda c: c.request.tag)
    wall = time.perf_counter() - start + setup
    s = engine.stats
    return {"name": name, "wall": wall, "setup": f"{setup:.2f}",
            "tokens": [c.tokens for c in completions],
            "in_forward": f"{engine.forward_timer.seconds() / wall:.0%}",
            "wasted": f"{s.wasted_share:.0%}",
            "decode_steps": s.decode_steps, "refills": s.refills,
            "peak_mib": f"{peak_memory_mib(model.output.weight.device):.0f}",
            "compile_seconds": compile_seconds}


def ctranslate2_available() -> bool:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


def ctranslate2_spec(model: Transformer, names: list[str]):
    """CTranslate2's decoder spec holding the model's weights, with vocabulary `names`."""
    import numpy as np
    from ctranslate2.specs import common_spec, transformer_spec

    args = model.args
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        args.n_layers, args.n_heads, pre_norm=True, activation=common_spec.Activation.SWISH,
        ffn_glu=True, rms_norm=True, rotary_dim=0, rotary_interleave=True,  # Meta's pairs
        rotary_base=args.rope_theta,
        num_heads_kv=None if args.kv_heads == args.n_heads else args.kv_heads)
    w = {k: v.float().numpy() for k, v in model.state_dict().items()}
    decoder = spec.decoder
    decoder.scale_embeddings = False
    decoder.embeddings.weight = w["tok_embeddings.weight"]
    decoder.layer_norm.gamma = w["norm.weight"]
    decoder.projection.weight = w["output.weight"]
    for i, layer in enumerate(decoder.layer):
        key = f"layers.{i}."
        layer.self_attention.layer_norm.gamma = w[key + "attention_norm.weight"]
        layer.self_attention.linear[0].weight = np.concatenate(
            [w[f"{key}attention.{name}.weight"] for name in ("wq", "wk", "wv")])
        layer.self_attention.linear[1].weight = w[key + "attention.wo.weight"]
        layer.ffn.layer_norm.gamma = w[key + "ffn_norm.weight"]
        layer.ffn.linear_0.weight = w[key + "feed_forward.w1.weight"]
        layer.ffn.linear_0_noact.weight = w[key + "feed_forward.w3.weight"]
        layer.ffn.linear_1.weight = w[key + "feed_forward.w2.weight"]
    spec.config.bos_token, spec.config.eos_token, spec.config.unk_token = "<s>", "</s>", "<unk>"
    spec.config.layer_norm_epsilon = args.norm_eps
    spec.register_vocabulary(names)
    spec.validate()
    spec.optimize(quantization=None)
    return spec


def run_ctranslate2(model: Transformer, work: Workload, batch: int, directory: str) -> dict:
    """The same weights and requests through CTranslate2's `generate_batch` (greedy, fp32): it
    sorts the prompts by length, runs batches of `batch`, and drops finished sequences from a
    batch. A callback stops each sequence at its own max_gen_len."""
    import ctranslate2

    if model.args.use_scaled_rope or model.output.weight.device.type != "cpu":
        raise SystemExit("the CTranslate2 column covers unscaled RoPE models on the CPU")
    names = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, model.args.vocab_size)]
    ctranslate2_spec(model, names).save(directory)
    generator = ctranslate2.Generator(directory, device="cpu", compute_type="float32",
                                      intra_threads=torch.get_num_threads())

    budgets = [r.params.max_gen_len for r in work.requests]
    generated = [0] * len(budgets)

    def stop_at_budget(step) -> bool:  # `step.step` counts the batch's steps, not the sequence's
        generated[step.batch_id] += 1
        return generated[step.batch_id] >= budgets[step.batch_id]

    start = time.perf_counter()
    results = generator.generate_batch(
        [[names[t] for t in r.prompt_tokens] for r in work.requests], max_batch_size=batch,
        max_length=max(budgets), include_prompt_in_result=False, sampling_topk=1,
        end_token=names[EOS], callback=stop_at_budget)
    wall = time.perf_counter() - start
    return {"name": "ctranslate2", "wall": wall, "setup": "-",
            "tokens": [r.sequences_ids[0] for r in results],
            "in_forward": "-", "wasted": "-", "decode_steps": "-", "refills": "-",
            "peak_mib": "-"}


def make_texts(args: ModelArgs, n_texts: int, min_len: int, max_len: int,
               seed: int) -> list[ScoreRequest]:
    """Random texts (BOS first) scored whole, their lengths log-uniform in [min_len, max_len]:
    many short texts and a few long ones, as a corpus has."""
    rng = random.Random(seed)
    texts = []
    for i in range(n_texts):
        n = round(math.exp(rng.uniform(math.log(min_len), math.log(max_len))))
        tokens = [1] + [rng.randrange(3, args.vocab_size) for _ in range(n - 1)]
        texts.append(ScoreRequest(tokens, first_scored=1, tag=i))
    return texts


def scoring_flops(args: ModelArgs, texts: list[ScoreRequest]) -> dict[str, float]:
    """Matmul FLOPs of scoring: every token but the last through the layers, logits for every
    scored token, and attention over each fed token's context."""
    fed = [r.input_length for r in texts]
    scored = sum(len(r.tokens) - r.first_scored for r in texts)
    attention = sum(2 * 2 * args.dim * args.n_layers * n * (n + 1) // 2 for n in fed)
    return {"layers": sum(fed) * sum(linear_flops(args).values()),
            "head": scored * 2 * args.dim * args.vocab_size, "attention": attention}


def product_rate(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of x @ W.T for x (m, k) and W (n, k) in the fastest form torch has here: the
    plain product, the layers' `kernels.linear`, or oneDNN's packed product (the CPU head's)."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    packed = kernels.PackedWeight()
    forms = [lambda: x @ w.T, lambda: kernels.linear(x, w)]
    if packed.usable(x, w):
        forms.append(lambda: packed.linear(x, w))
    return max(per_second(2 * m * k * n, form, device) for form in forms)


def scoring_rates(args: ModelArgs, text_len: int, device: torch.device, dtype: torch.dtype,
                  best: bool) -> MatmulRates:
    """Matmul rates at the scorer's shapes: the layers at a full pass (PREFILL_TOKENS rows), the
    head at the scorer's logit rows, attention scores for a text of `text_len`. Plain products
    as for generation's ceiling, or with `best` each in its fastest form (`product_rate`)."""
    rate = product_rate if best else matmul_rate
    per_shape = linear_flops(args)
    total = sum(per_shape.values())
    rows = limits.PREFILL_TOKENS
    layers = 1 / sum(f / total / rate(rows, k, n, device, dtype)
                     for (k, n), f in per_shape.items())
    head_rows = min(scoring.SCORE_LOGIT_ROWS, limits.LOGPROB_ROWS)
    return MatmulRates(layers, rate(head_rows, args.dim, args.vocab_size, device, dtype),
                       matmul_rate(text_len, args.head_dim, text_len, device, dtype))


def run_scorer(model: Transformer, texts: list[ScoreRequest], name: str, batch: int,
               max_seq_len: int) -> dict:
    """`name`: batched (the Scorer) or single (one text at a time through
    `prompt_logprobs`, in slot 0)."""
    passes: int | str = "-"
    padding = "-"
    start = time.perf_counter()
    if name == "batched":
        scorer = Scorer(model, batch, max_seq_len)
        logprobs = {s.request.tag: s.logprobs for s in scorer.score(texts)}
        passes, padding = scorer.stats.passes, f"{scorer.stats.padding_share:.0%}"
    elif name == "single":
        model.setup_cache(1, max_seq_len)
        with torch.inference_mode():
            logprobs = {r.tag: prompt_logprobs(model, r.tokens, 0) for r in texts}
        passes = sum(-(-r.input_length // limits.PREFILL_TOKENS) for r in texts)
    else:
        raise SystemExit(f"unknown scorer {name!r}: batched or single")
    wall = time.perf_counter() - start
    return {"name": name, "wall": wall, "logprobs": [logprobs[r.tag] for r in texts],
            "passes": passes, "padding": padding,
            "peak_mib": f"{peak_memory_mib(model.output.weight.device):.0f}"}


def score_main(model: Transformer, texts: list[ScoreRequest], names: list[str], batch: int,
               max_seq_len: int) -> None:
    """Each scorer's run, with the matmul rates (plain and best) measured just before and after
    it: the machine's speed drifts."""
    weight = model.output.weight
    lengths = [len(r.tokens) for r in texts]
    cache_mib = (2 * model.args.n_layers * batch * max_seq_len * model.args.kv_heads
                 * model.args.head_dim * weight.element_size() / 2**20)
    print(f"{len(texts)} texts of {min(lengths)}-{max(lengths)} tokens ({sum(lengths)} in all, "
          f"log-uniform lengths), scored whole; batch {batch}, passes of at most "
          f"{limits.PREFILL_TOKENS} tokens; KV cache {cache_mib:.0f} MiB")
    text_len = sum(lengths) // len(lengths)

    def rates() -> tuple[MatmulRates, MatmulRates]:
        return tuple(scoring_rates(model.args, text_len, weight.device, weight.dtype, best)
                     for best in (False, True))

    results, before = [], rates()
    for name in names:
        result = run_scorer(model, texts, name, batch, max_seq_len)
        after = rates()
        result["rates"] = [b.mean(a) for b, a in zip(before, after)]
        results.append(result)
        before = after
    report_scoring(results, model, texts)


def report_scoring(results: list[dict], model: Transformer, texts: list[ScoreRequest]) -> None:
    """The workload and one table row per scorer, with both ceilings (plain products as
    generation's, and each product in its fastest form); the first run's logprobs are the
    reference."""
    flops = scoring_flops(model.args, texts)
    scored = sum(len(r.tokens) - r.first_scored for r in texts)
    print(f"workload: {scored} scored tokens, {sum(flops.values()) / 1e12:.3f} TFLOP of matmuls "
          f"(layers {flops['layers'] / 1e9:.0f}, head {flops['head'] / 1e9:.0f}, attention "
          f"{flops['attention'] / 1e9:.0f} GFLOP)")
    print(f"{'scorer':<11} {'tok/s':>7} {'wall s':>7} {'passes':>6} {'padding':>7} "
          f"{'peak MiB':>8} {'ceiling tok/s':>13} {'of ceiling':>10} {'best-form tok/s':>15} "
          f"{'of best':>7} {'max |diff|':>10}")
    reference = results[0]["logprobs"]
    for r in results:
        tok_s = scored / r["wall"]
        plain, best = (scored / ceiling_seconds(flops, rates) for rates in r["rates"])
        diff = max(abs(a - b) for ours, ref in zip(r["logprobs"], reference)
                   for a, b in zip(ours, ref))
        print(f"{r['name']:<11} {tok_s:7.0f} {r['wall']:7.2f} {r['passes']:>6} "
              f"{r['padding']:>7} {r['peak_mib']:>8} {plain:13.0f} {tok_s / plain:10.0%} "
              f"{best:15.0f} {tok_s / best:7.0%} {diff:10.1e}")
    for r in results[1:]:
        print(f"{results[0]['name']} / {r['name']}: {r['wall'] / results[0]['wall']:.2f}x")


def mixed_requests(args: ModelArgs, n: int, prompt_lens: tuple[int, int],
                   gen_lens: tuple[int, int], temperature: float, top_p: float,
                   seed: int) -> list[Request]:
    """`n` random prompts whose lengths are uniform in `prompt_lens`, each generating exactly a
    number of tokens uniform in `gen_lens` (when run without stop ids)."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        prompt = [1] + [rng.randrange(3, args.vocab_size)
                        for _ in range(rng.randint(*prompt_lens) - 1)]
        params = SamplingParams(temperature=temperature, top_p=top_p,
                                max_gen_len=rng.randint(*gen_lens), seed=i)
        requests.append(Request(prompt, params, tag=i))
    return requests


def hbm_gbps_by_name(name: str) -> float | None:
    """The datasheet memory bandwidth (GB/s) of the device named `name`, if `HBM_GBPS` has it."""
    upper = name.upper()
    for needed, excluded, gbps in HBM_GBPS:
        if all(n in upper for n in needed) and not any(x in upper for x in excluded):
            return gbps
    return None


def hbm_bandwidth(device: torch.device, hbm_gbps: float | None) -> tuple[float, str]:
    """The device's memory bandwidth in bytes/s, and where the figure came from."""
    if hbm_gbps:
        return hbm_gbps * 1e9, "--hbm_gbps"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    gbps = hbm_gbps_by_name(name)
    if gbps is None:
        raise SystemExit(f"no memory bandwidth known for {name!r}: pass --hbm_gbps (its "
                         "datasheet's GB/s)")
    return gbps * 1e9, f"{name}'s datasheet"


def with_gen_len(requests: list[Request], gen_len: int) -> list[Request]:
    return [replace(r, params=replace(r.params, max_gen_len=gen_len)) for r in requests]


def decode_timing(model: Transformer, name: str, requests: list[Request]) -> dict:
    """All of `requests` in one engine with a slot each and no stop ids: the wall seconds to
    prefill them and sample their first tokens (`first`), and to generate them whole
    (`whole`), both after a warm-up run. `whole - first` is the decode steps' time."""
    gen_len = requests[0].params.max_gen_len
    max_seq_len = max(len(r.prompt_tokens) for r in requests) + gen_len
    engine, compile_seconds = make_engine(model, name, len(requests), max_seq_len, stop_ids=())

    def wall(requests: list[Request]) -> float:
        start = time.perf_counter()
        completions = list(engine.generate(requests))  # its tokens are on the host: synchronised
        seconds = time.perf_counter() - start
        assert all(len(c.tokens) == c.request.params.max_gen_len for c in completions)
        return seconds

    wall(with_gen_len(requests, 2))  # kernels chosen, memory allocated
    first, whole = wall(with_gen_len(requests, 1)), wall(requests)
    return {"name": name, "batch": len(requests), "gen_len": gen_len, "first": first,
            "whole": whole, "compile_seconds": compile_seconds,
            "prompt_lens": [len(r.prompt_tokens) for r in requests],
            "peak_mib": f"{peak_memory_mib(model.output.weight.device):.0f}"}


def roofline_main(model: Transformer, names: list[str], batches: list[int],
                  requests_for: Callable[[int], list[Request]],
                  bandwidth: tuple[float, str]) -> None:
    """Each engine at each batch size, against the HBM roofline of its decode steps."""
    step = StepBytes.of(model)
    print(f"decode steps read at least {step.weights / 1e9:.3g} GB of weights each and "
          f"{step.kv_per_token / 2**10:.3g} KiB per cached token; memory bandwidth "
          f"{bandwidth[0] / 1e9:.0f} GB/s ({bandwidth[1]})")
    print(f"{'engine':<11} {'batch':>5} {'prompt':>6} {'gen':>5} {'prefill s':>9} "
          f"{'tok/s':>8} {'decode tok/s':>12} {'ms/step':>8} {'roofline tok/s':>14} "
          f"{'of roofline':>11} {'peak MiB':>8}")
    for name in names:
        for batch in batches:
            r = decode_timing(model, name, requests_for(batch))
            report_roofline(r, step, bandwidth[0])


def report_roofline(r: dict, step: StepBytes, bandwidth: float) -> None:
    """One row: tok/s over the whole run, and over its decode steps against the roofline."""
    batch, gen_len = r["batch"], r["gen_len"]
    decode_seconds = max(r["whole"] - r["first"], 1e-9)
    decode_tokens = batch * (gen_len - 1)
    decode_tok_s = decode_tokens / decode_seconds
    roofline = decode_tokens / (step.after_prefill(r["prompt_lens"], gen_len) / bandwidth)
    print(f"{r['name']:<11} {batch:5d} {sum(r['prompt_lens']) // batch:6d} {gen_len:5d} "
          f"{r['first']:9.2f} {batch * gen_len / r['whole']:8.1f} {decode_tok_s:12.1f} "
          f"{decode_seconds / (gen_len - 1) * 1000:8.2f} {roofline:14.1f} "
          f"{decode_tok_s / roofline:11.0%} {r['peak_mib']:>8}", flush=True)
    if r["compile_seconds"]:
        print(f"{r['name']} at batch {batch}: compiling took {r['compile_seconds']:.1f} s")


def budget_configs(max_seq_len: int, kv_budget: int, block_sizes: list[int],
                   batch: int) -> list[tuple[str, int, int]]:
    """(name, kv_block_size, max_batch_size) in one KV budget: per-slot (a block of
    max_seq_len per slot, as many slots as fit), then paged at each block size (up to `batch`
    sequences at once)."""
    if kv_budget < max_seq_len:
        raise SystemExit(f"--kv_budget {kv_budget} holds no sequence of --max_seq_len "
                         f"{max_seq_len}: raise it to at least {max_seq_len}")
    return ([("per-slot", max_seq_len, kv_budget // max_seq_len)]
            + [(f"paged-{block}", block, batch) for block in block_sizes])


def run_budget(model: Transformer, requests: list[Request], name: str, block: int, slots: int,
               max_seq_len: int, kv_budget: int) -> dict:
    """The requests through an engine with `slots` slots, KV blocks of `block` tokens and a
    cache of `kv_budget` tokens (rounded down to whole blocks), with no stop ids."""
    cache_tokens = kv_budget // block * block
    engine = Engine(model, (), slots, max_seq_len, kv_cache_tokens=cache_tokens,
                    kv_block_size=block)
    start = time.perf_counter()
    completions = sorted(engine.generate(requests), key=lambda c: c.request.tag)
    wall = time.perf_counter() - start
    s = engine.stats
    return {"name": name, "block": block, "slots": slots, "cache_tokens": cache_tokens,
            "wall": wall, "tokens": [c.tokens for c in completions],
            "peak_running": s.peak_running, "preempted": s.preempted,
            "peak_kv_tokens": s.peak_kv_tokens, "decode_steps": s.decode_steps,
            "peak_mib": f"{peak_memory_mib(model.output.weight.device):.0f}"}


def budget_main(model: Transformer, requests: list[Request], max_seq_len: int, kv_budget: int,
                block_sizes: list[int], batch: int) -> None:
    prompts = [len(r.prompt_tokens) for r in requests]
    gens = [r.params.max_gen_len for r in requests]
    kv_mib = kv_budget * StepBytes.of(model).kv_per_token / 2**20
    print(f"{len(requests)} requests: prompts of {min(prompts)}-{max(prompts)} tokens "
          f"({sum(prompts)} in all), {min(gens)}-{max(gens)} generated ({sum(gens)} in all), "
          f"temperature {requests[0].params.temperature}; max_seq_len {max_seq_len}; KV budget "
          f"{kv_budget} tokens ({kv_mib:.0f} MiB, {kv_budget / max_seq_len:g} full-length "
          "sequences)")
    print(f"{'kv cache':<11} {'block':>5} {'max batch':>9} {'peak running':>12} "
          f"{'preempted':>9} {'peak KV tokens':>14} {'decode steps':>12} {'tok/s':>7} "
          f"{'wall s':>7} {'peak MiB':>8} {'same tokens':>11}")
    results = []
    for name, block, slots in budget_configs(max_seq_len, kv_budget, block_sizes, batch):
        results.append(run_budget(model, requests, name, block, slots, max_seq_len, kv_budget))
        report_budget(results[-1], results[0]["tokens"])
    for r in results[1:]:
        print(f"{r['name']} / {results[0]['name']}: {results[0]['wall'] / r['wall']:.2f}x")


def report_budget(r: dict, reference: list[list[int]]) -> None:
    """One configuration's row, its tokens against the first configuration's."""
    tok_s = sum(map(len, r["tokens"])) / r["wall"]
    kv_share = r["peak_kv_tokens"] / r["cache_tokens"]
    same = sum(a == b for a, b in zip(r["tokens"], reference)) / len(reference)
    print(f"{r['name']:<11} {r['block']:5d} {r['slots']:9d} {r['peak_running']:12d} "
          f"{r['preempted']:9d} {r['peak_kv_tokens']:8d} ({kv_share:3.0%}) "
          f"{r['decode_steps']:12d} {tok_s:7.0f} {r['wall']:7.2f} {r['peak_mib']:>8} "
          f"{same:11.0%}", flush=True)


def listed(value: object, kind: type = str) -> list:
    """A comma-separated flag as a list: fire passes "a,b" as a tuple, and "a" as itself."""
    items = value.split(",") if isinstance(value, str) else (
        list(value) if isinstance(value, (tuple, list)) else [value])
    return [kind(item) for item in items]


def main(mode: str | None = None, preset: str | None = None, n_prompts: int | None = None,
         min_len: int | None = None, max_len: int | None = None, max_gen_len: int | None = None,
         min_gen_len: int = 64, stop_rate: float | None = None, batch: int | str | None = None,
         temperature: float = 0.8, top_p: float = 0.95, dtype: str | None = None,
         device: str = "cpu", schedulers: str | None = None, ctranslate2: bool | None = None,
         seed: int = 0, hbm_gbps: float | None = None, max_seq_len: int | None = None,
         kv_budget: int | None = None, block_sizes: str = "16,128",
         quantize: str = "none") -> None:
    """`mode`: generate (the default on the CPU), context, score, roofline (the default on
    CUDA) or budget. `preset`, `dtype`, `batch`, `n_prompts`, `min_len`, `max_len` (prompt
    lengths), `max_gen_len`, `stop_rate` and `schedulers` default to the mode's
    (MODE_DEFAULTS). Generation's `max_seq_len`: max_len + max_gen_len (context: 4096). Its
    `schedulers`: any of continuous, static and compiled (continuous with `--compile`'s
    decode step); scoring's: batched and single. `ctranslate2`: add a CTranslate2 run of the
    same weights to greedy generation (default: if it is installed). `--temperature 0`:
    greedy. Roofline: `batch` lists the batch sizes, `hbm_gbps` the device's memory bandwidth.
    Budget: `max_seq_len` (4096), `kv_budget` in tokens (16 x max_seq_len), `block_sizes`
    paged, `min_gen_len` to `max_gen_len` generated. `quantize`: none, int8 (the blocks' weights,
    as `--quantize int8`), or none,int8 to run the mode on each, one after the other."""
    mode = mode or ("roofline" if str(device).startswith("cuda") else "generate")
    if mode not in MODE_DEFAULTS:
        raise SystemExit(f"unknown mode {mode!r}: generate, context, score, roofline or "
                         "budget")
    given = {"preset": preset, "dtype": dtype, "batch": batch, "n_prompts": n_prompts,
             "min_len": min_len, "max_len": max_len, "max_gen_len": max_gen_len,
             "schedulers": schedulers, "stop_rate": stop_rate}
    w = {**MODE_DEFAULTS[mode], **{k: v for k, v in given.items() if v is not None}}
    if w["preset"] not in PRESETS:
        raise SystemExit(f"unknown preset {w['preset']!r}: one of {', '.join(PRESETS)}")
    dist = distributed.init_distributed(1, device=device)
    bandwidth = hbm_bandwidth(dist.device, hbm_gbps) if mode == "roofline" else None
    on_device = mode == "roofline" or dist.device.type != "cpu"
    flags = {"min_gen_len": min_gen_len, "temperature": temperature,
             "top_p": top_p, "ctranslate2": ctranslate2, "seed": seed, "bandwidth": bandwidth,
             "max_seq_len": max_seq_len, "kv_budget": kv_budget,
             "block_sizes": listed(block_sizes, int)}
    for kind in listed(quantize):
        model = build_model(ModelArgs.from_params(PRESETS[w["preset"]]), dist.device,
                            DTYPES[w["dtype"]], on_device, None if kind == "none" else kind)
        print(f"model {w['preset']} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"params, {w['dtype']}{'' if kind == 'none' else f', {kind} blocks'}) on "
              f"{dist.device} with {torch.get_num_threads()} threads; weights "
              f"{sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.0f} MiB")
        run_mode(mode, model, w, flags)
        del model
    distributed.shutdown()


def run_mode(mode: str, model: Transformer, w: dict, flags: dict) -> None:
    """Build the mode's workload from the settings `w` and `main`'s other flags, and run it."""
    args, names, seed = model.args, listed(w["schedulers"]), flags["seed"]
    sampling = (flags["temperature"], flags["top_p"])
    prompt_lens = (w["min_len"], w["max_len"])
    if mode == "score":
        texts = make_texts(args, w["n_prompts"], w["min_len"], w["max_len"], seed)
        score_main(model, texts, names, w["batch"], w["max_len"])
    elif mode == "roofline":
        gen_lens = (w["max_gen_len"], w["max_gen_len"])
        if w["max_gen_len"] < 2:
            raise SystemExit("--max_gen_len must be at least 2 for decode steps to time")
        roofline_main(model, names, listed(w["batch"], int),
                      lambda n: mixed_requests(args, n, prompt_lens, gen_lens, *sampling, seed),
                      flags["bandwidth"])
    elif mode == "budget":
        max_seq_len = flags["max_seq_len"] or 4096
        requests = mixed_requests(args, w["n_prompts"], prompt_lens,
                                  (flags["min_gen_len"], w["max_gen_len"]), *sampling, seed)
        budget_main(model, requests, max_seq_len, flags["kv_budget"] or 16 * max_seq_len,
                    flags["block_sizes"], w["batch"])
    else:
        work = make_workload(args, w["n_prompts"], w["min_len"], w["max_len"],
                             w["max_gen_len"], w["stop_rate"], *sampling, seed)
        tight = w["max_len"] + w["max_gen_len"]
        generate_main(model, work, names, w["batch"], flags["max_seq_len"] or (
                          CONTEXT_MAX_SEQ_LEN if mode == "context" else tight),
                      flags["ctranslate2"], f"{w['min_len']}-{w['max_len']}", w["max_gen_len"],
                      w["stop_rate"], sampling)


def generate_main(model: Transformer, work: Workload, names: list[str], batch: int,
                  max_seq_len: int, ctranslate2: bool | None, lengths: str, max_gen_len: int,
                  stop_rate: float, sampling: tuple[float, float]) -> None:
    """`sampling`: (temperature, top_p). CTranslate2's run decodes greedily, so it runs (by
    default, when installed) only for greedy workloads."""
    args, weight = model.args, model.output.weight
    temperature, top_p = sampling
    cache_mib = (2 * args.n_layers * batch * max_seq_len * args.kv_heads * args.head_dim
                 * weight.element_size() / 2**20)
    decoding = "greedy" if temperature == 0 else f"temperature {temperature}, top-p {top_p}"
    print(f"{len(work.requests)} prompts of {lengths} tokens ({work.prompt_tokens} in all), "
          f"max_gen_len {max_gen_len}, ~{stop_rate:.0%} of steps end a sequence, batch {batch}, "
          f"{decoding}; KV cache {cache_mib:.0f} MiB (max_seq_len {max_seq_len})")
    if ctranslate2 is None:
        ctranslate2 = temperature == 0 and ctranslate2_available()
    elif ctranslate2 and temperature != 0:
        raise SystemExit("the CTranslate2 column decodes greedily: add --temperature 0")
    # Before the runs: its two buffers must not meet a device the runs have filled.
    bandwidth = memory_bandwidth(weight.device, 1024 if weight.device.type == "cuda" else 256)
    results = run_all(model, work, names, ctranslate2, batch, max_seq_len)
    report(results, model, work, batch, bandwidth)


def run_all(model: Transformer, work: Workload, schedulers: list[str], ctranslate2: bool,
            batch: int, max_seq_len: int) -> list[dict]:
    """Each scheduler's run (and CTranslate2's), in order, with the matmul rates around it: the
    machine's speed drifts, so each run's ceiling uses rates measured just before and after."""
    weight = model.output.weight
    avg_prompt = work.prompt_tokens // len(work.requests)

    def rates() -> MatmulRates:
        return MatmulRates.measure(model.args, batch, avg_prompt, weight.device, weight.dtype)

    runs = [lambda name=name: run_scheduler(model, work, name, batch, max_seq_len)
            for name in schedulers]
    with tempfile.TemporaryDirectory() as ctranslate2_dir:
        if ctranslate2:
            runs.append(lambda: run_ctranslate2(model, work, batch, ctranslate2_dir))
        results, before = [], rates()
        for run in runs:
            result = run()
            after = rates()
            result["rates"], before = before.mean(after), after
            results.append(result)
    return results


def report(results: list[dict], model: Transformer, work: Workload, batch: int,
           bandwidth: float) -> None:
    """The workload and one table row per run; the first run's tokens are the reference."""
    args, reference = model.args, results[0]
    generated = [len(t) for t in reference["tokens"]]
    flops = workload_flops(args, work, generated)
    print(f"workload: {sum(generated)} generated tokens, {sum(flops.values()) / 1e12:.3f} TFLOP "
          f"of matmuls (layers {flops['layers'] / 1e9:.0f}, head {flops['head'] / 1e9:.0f}, "
          f"attention {flops['attention'] / 1e9:.0f} GFLOP); decode reads at least "
          f"{decode_bytes(model, work, generated, batch) / 1e9:.1f} GB at "
          f"{bandwidth / 1e9:.0f} GB/s (a large copy's rate here)")
    print(f"{'engine':<11} {'tok/s':>7} {'wall s':>7} {'setup s':>7} {'in forward':>10} "
          f"{'wasted':>7} "
          f"{'decode steps':>12} {'refills':>7} {'peak MiB':>8} {'ceiling tok/s':>13} "
          f"{'of ceiling':>10} {'roofline tok/s':>14} {'of roofline':>11} {'same tokens':>11}")
    for r in results:
        lengths = [len(t) for t in r["tokens"]]
        r["tokens_per_s"] = sum(lengths) / r["wall"]
        ceiling = sum(lengths) / ceiling_seconds(workload_flops(args, work, lengths), r["rates"])
        roofline = sum(lengths) / (decode_bytes(model, work, lengths, batch) / bandwidth)
        same = sum(a == b for a, b in zip(r["tokens"], reference["tokens"])) / len(work.requests)
        print(f"{r['name']:<11} {r['tokens_per_s']:7.0f} {r['wall']:7.2f} {r['setup']:>7} "
              f"{r['in_forward']:>10} {r['wasted']:>7} {r['decode_steps']:>12} {r['refills']:>7} {r['peak_mib']:>8} "
              f"{ceiling:13.0f} {r['tokens_per_s'] / ceiling:10.0%} {roofline:14.0f} "
              f"{r['tokens_per_s'] / roofline:11.0%} {same:11.0%}")
    for r in results[1:]:
        print(f"{reference['name']} / {r['name']}: "
              f"{reference['tokens_per_s'] / r['tokens_per_s']:.2f}x")
    for r in results:
        if r.get("compile_seconds"):
            print(f"{r['name']}: compiling took {r['compile_seconds']:.1f} s before the run "
                  "(not in its wall time)")


if __name__ == "__main__":
    fire.Fire(main)
