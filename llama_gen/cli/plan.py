"""`llama-gen plan`: will a run fit on these GPUs, and with which batch size? From params.json
(and the shard files' sizes, where present) alone: no weights are loaded, no GPU is needed.

Every number is per rank (one GPU): a run puts 1/model_parallel_size of every split weight and
of the KV heads on each. Weights and the KV cache are exact byte counts of what a run allocates;
the working-memory terms are estimates of the largest transient tensors of today's code, each
documented where it is computed; the CUDA context is an allowance.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ..engine.engine import LOGPROB_ROWS, PREFILL_MASK_ELEMENTS, PREFILL_TOKENS
from ..errors import UserError
from ..model.args import ModelArgs
from ..model.checkpoint import (SHARD_NAME, check_model_parallel_size, find_shards, full_shapes,
                                split_dim)
from ..settings import Settings, check_fields, rules, setting
from ..values import FALSE_WORDS, TRUE_WORDS

GIB = 2**30
# CUDA context, cuBLAS workspaces and the allocator's slack, which torch's own counters do not
# show: typically 0.5-1 GiB on current GPUs and drivers. An allowance, not a measurement.
CUDA_CONTEXT_BYTES = 3 * GIB // 4
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bfloat16": 2, "float16": 2, "float32": 4}
DEFAULT_DTYPE = "bf16"  # a run's default on GPUs that have bf16
# Per logit of a decode step's (batch, vocab) float32 logits, the sampler's temporaries: the
# probabilities, their sorted copy (fp32) with its int64 indices and its cumulative sum.
SAMPLER_BYTES_PER_LOGIT = 4 + 4 + 8 + 4
LOGIT_BYTES = 4  # logits are float32
PENALTY_BYTES_PER_LOGIT = 5  # TokenCounts: in_prompt (bool) and generated (int32), per slot
MEMORY_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
# --max_batch_size auto: at most this many sequences decode at once (vLLM's max_num_seqs), and
# as many as the KV cache holds at this many tokens each (a few hundred prompt tokens and the
# default --max_gen_len 256: dataset jobs' typical sequence; longer ones only wait for blocks,
# as the engine admits by free blocks and preempts when they run out).
AUTO_MAX_BATCH = 256
AUTO_TOKENS_PER_SEQUENCE = 512
CPU_AUTO_BATCH = 8  # on the CPU auto is 8 full-length slots, with no KV budget to size
# With --max_batch_size auto on a GPU, the default context is the longest of which this many
# sequences fit, so that one full-length sequence never needs the whole cache (it would leave
# no room for other sequences, nor for their slots' working memory).
GPU_AUTO_CONTEXT_SEQUENCES = 2
KV_BLOCK_TOKENS = 128  # a GPU's KV block (engine.default_block_size): caches are whole blocks


@dataclass(frozen=True, kw_only=True)
class PlanSettings:
    """The flags of a run that decide its memory, and the GPU to plan for."""

    ckpt_dir: Path = setting(help="directory with params.json (and consolidated.NN.pth shards, "
                             "whose sizes are checked; they are not read)")
    tokenizer_path: Path | None = setting(None, help="tokenizer.model, read only where "
                                          "params.json's vocab_size is -1 (default: in ckpt_dir "
                                          "or its parent)")
    max_seq_len: int | None = setting(None, low=1, help="longest prompt + completion in tokens "
                                      "(default: the model's context, shortened to what fits)")
    max_batch_size: int | None = setting(
        None, low=1, auto=True, help="sequences decoded at once, or auto (the default): as many "
        f"as the KV cache left beside the model holds at {AUTO_TOKENS_PER_SEQUENCE} tokens each, "
        f"up to {AUTO_MAX_BATCH}")
    dtype: Literal["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"] | None = setting(
        None, help=f"weights and activations (default {DEFAULT_DTYPE}, a run's default on GPUs "
        "that have it)")
    model_parallel_size: int | None = setting(None, low=1, help="processes per model copy "
                                              "(default: as a run chooses from --nproc and the "
                                              "shard count)")
    nproc: int = setting(1, low=1, help="processes the run would launch (torchrun's "
                         "--nproc_per_node x nodes), one GPU each")
    gpu_memory: str | None = setting(None, help="memory of one GPU: 24GB, 80GiB, 80G or a "
                                     "number of bytes; GB means GiB, as GPU makers use it "
                                     "(default: this machine's first GPU)")
    gpu_memory_utilization: float = setting(0.9, low=0, low_open=True, high=1,
                                            help="share of each GPU's memory the run may use")
    json: bool = setting(False, help="print one JSON object instead of the table")

    def __post_init__(self) -> None:
        check_fields(self)


PLAN_USAGE = ("llama-gen plan --ckpt_dir DIR [--nproc N] [--gpu_memory 24GB] [--json] [a run's "
              "flags: those that do not change its memory are ignored]")
PLAN_SUMMARY = """\
Tell whether a run fits on its GPUs before starting it: per GPU, the bytes of weights, the KV
cache's bytes per token and working memory; the largest --max_batch_size that fits at
--max_seq_len, or what --max_batch_size auto picks; and a verdict with advice (more GPUs, a
shorter --max_seq_len, --dtype). Without --max_seq_len, the model's context where it fits.
Reads params.json and the shard files' sizes only: it runs in seconds, on any machine."""


def without_run_only_flags(words: list[str]) -> list[str]:
    """`words` less a run's flags that do not change its memory (--prompt_path, --temperature,
    a bare --logprobs ...), so a run's command line can be planned as it is."""
    plan_names, run_rules = rules(PlanSettings).keys(), rules(Settings)
    kept, skip = [], False
    for i, word in enumerate(words):
        if skip:
            skip = False
            continue
        name, equals, _ = word.removeprefix("--").partition("=")
        if not word.startswith("--") or name in plan_names or name not in run_rules:
            kept.append(word)
            continue
        following = words[i + 1] if i + 1 < len(words) else "--"
        bare_flag = run_rules[name].base is bool and (
            following.startswith("--") or following.lower() not in TRUE_WORDS + FALSE_WORDS)
        skip = not equals and not bare_flag
    return kept


def parse_memory(text: str) -> int:
    """Bytes from "24GB", "24GiB", "80G", "512MB" or a plain number of bytes. K, M, G and T are
    binary with or without "i": GPU makers' "80GB" is 80 GiB (81920 MiB in nvidia-smi)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b?)\s*", text, re.I)
    if match is None:
        raise UserError(f"--gpu_memory {text!r} is not a memory size: write it as 24GB, 80GiB, "
                        "80G or a number of bytes")
    size = float(match[1]) * MEMORY_UNITS[(match[2] or "").lower()]
    if size < 1:
        raise UserError(f"--gpu_memory {text!r} must be more than zero")
    return int(size)


def gpu_memory_bytes(settings: PlanSettings) -> int:
    """--gpu_memory, or the total memory of this machine's first GPU."""
    if settings.gpu_memory is not None:
        return parse_memory(settings.gpu_memory)
    import torch
    if not torch.cuda.is_available():
        raise UserError("--gpu_memory missing and no GPU here to measure: give one GPU's "
                        "memory, e.g. --gpu_memory 24GB")
    return torch.cuda.get_device_properties(0).total_memory


def read_args(settings: PlanSettings) -> ModelArgs:
    """params.json's shape, its vocab_size -1 resolved from the tokenizer as a run does."""
    params_path = settings.ckpt_dir / "params.json"
    if not settings.ckpt_dir.is_dir():
        raise UserError(f"--ckpt_dir {settings.ckpt_dir}: no such directory (it holds "
                        "params.json)")
    args = ModelArgs.from_file(params_path)
    if args.vocab_size != -1 and settings.tokenizer_path is None:
        return args
    from ..text.tokenizer import find_tokenizer, load_tokenizer
    tokenizer = load_tokenizer(find_tokenizer(settings.ckpt_dir, settings.tokenizer_path))
    return args.with_vocab_size(tokenizer.n_words, str(params_path))


def shard_sizes(ckpt_dir: Path) -> list[int]:
    """The shard files' sizes in shard order; none where the directory holds no shards."""
    if not any(SHARD_NAME.fullmatch(p.name) for p in ckpt_dir.iterdir()):
        return []
    return [path.stat().st_size for path in find_shards(ckpt_dir)]


def parameter_count(args: ModelArgs) -> int:
    return sum(math.prod(shape) for shape in full_shapes(args).values())


def weight_bytes(args: ModelArgs, mp_size: int, dtype_bytes: int) -> int:
    """One rank's weights: 1/mp_size of every split weight (whichever dimension it is split
    on; the embedding's is either), and the whole of the replicated norms."""
    total = 0
    for key, shape in full_shapes(args).items():
        numel = math.prod(shape)
        total += numel if split_dim(key, 0) is None else numel // mp_size
    return total * dtype_bytes


def kv_bytes_per_token(args: ModelArgs, mp_size: int, dtype_bytes: int) -> int:
    """K and V of every layer for one token, this rank's KV heads only."""
    return 2 * args.n_layers * (args.kv_heads // mp_size) * args.head_dim * dtype_bytes


@dataclass(frozen=True)
class Shape:
    """What one rank's memory depends on."""

    args: ModelArgs
    mp_size: int
    dtype_bytes: int
    max_seq_len: int
    overhead: int = CUDA_CONTEXT_BYTES  # the device's own (the CUDA context); 0 on the CPU
    block_size: int = KV_BLOCK_TOKENS  # positions per KV block: the cache is whole blocks

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.args, self.mp_size, self.dtype_bytes)


@dataclass(frozen=True)
class Sizing:
    """How a run spends its memory: sequences decoding at once, and the KV cache's capacity in
    tokens (None: a full --max_seq_len for each of them)."""

    max_batch_size: int
    kv_cache_tokens: int | None = None


def fixed_working_bytes(shape: Shape) -> dict[str, int]:
    """Working memory that does not grow with the batch (estimates, per rank)."""
    a, mp, b = shape.args, shape.mp_size, shape.dtype_bytes
    heads, kv_heads = a.n_heads // mp, a.kv_heads // mp
    # A pass prefills at most PREFILL_TOKENS tokens: a group of prompts, or a chunk of a long
    # one. One layer's transients in it (the previous layer's are freed): the residual stream,
    # its norm and a block's output; q, k, v and the attention output; the FFN's w1 and w3
    # outputs and their product; RoPE's float32 copies of q and k.
    per_token = (b * (3 * a.dim + (2 * heads + 2 * kv_heads) * a.head_dim
                      + 3 * a.ffn_hidden_dim // mp)
                 + 2 * 4 * (heads + kv_heads) * a.head_dim)
    return {
        "prefill activations": PREFILL_TOKENS * per_token,
        # a chunk's float32 attention mask where reads need one (engine.PREFILL_MASK_ELEMENTS)
        "prefill attention mask": PREFILL_MASK_ELEMENTS * 4,
        # prompt logprobs: LOGPROB_ROWS rows of float32 logits and their log-softmax
        "prompt logprob rows": 2 * LOGPROB_ROWS * a.vocab_size * LOGIT_BYTES,
        "rotary table": shape.max_seq_len * a.head_dim // 2 * 2 * 4,
    }


def per_slot_bytes(shape: Shape) -> dict[str, int]:
    """What each batch slot adds: its KV cache (exact) and its share of the decode step's
    transients (estimates). Logits are gathered whole on every rank, so they do not shrink
    with the model-parallel size."""
    a = shape.args
    return {
        "KV cache": shape.max_seq_len * shape.kv_bytes_per_token,
        "decode logits and sampler": a.vocab_size * (LOGIT_BYTES + SAMPLER_BYTES_PER_LOGIT),
        "penalty counts": a.vocab_size * PENALTY_BYTES_PER_LOGIT,
    }


def slot_working_bytes(shape: Shape) -> int:
    """What each sequence decoding at once adds beside its KV cache."""
    return sum(size for name, size in per_slot_bytes(shape).items() if name != "KV cache")


def cache_room(shape: Shape, usable: int) -> int:
    """Bytes of `usable` left for the KV cache and the slots' working memory, beside the
    device's overhead, the weights and the fixed working memory (negative where they do not
    fit)."""
    return (usable - shape.overhead - weight_bytes(shape.args, shape.mp_size, shape.dtype_bytes)
            - sum(fixed_working_bytes(shape).values()))


def largest_batch(shape: Shape, usable: int) -> int:
    """The most full-length batch slots whose cache and transients fit in `usable` bytes beside
    the device's overhead, the weights and the fixed working memory; 0 where not one does."""
    return max(0, cache_room(shape, usable) // sum(per_slot_bytes(shape).values()))


def auto_sizing(shape: Shape, room: int) -> Sizing | None:
    """--max_batch_size auto in `room` bytes (see `cache_room`): a KV cache of every token the
    room holds beside the slots' working memory, and as many slots as it holds sequences of
    AUTO_TOKENS_PER_SEQUENCE tokens (at most AUTO_MAX_BATCH, at least one); None where not one
    sequence of max_seq_len fits. The cache holds at least one full-length sequence, and no
    more tokens than full-length slots need."""
    per_token, slot, longest = shape.kv_bytes_per_token, slot_working_bytes(shape), \
        whole_blocks(shape.max_seq_len, shape.block_size)
    if room < longest * per_token + slot:
        return None
    average = min(shape.max_seq_len, AUTO_TOKENS_PER_SEQUENCE)
    batch = min(AUTO_MAX_BATCH, room // (average * per_token + slot),
                (room - longest * per_token) // slot)
    return sized_slots(shape, room, max(batch, 1))


def sized_slots(shape: Shape, room: int, batch: int) -> Sizing | None:
    """`batch` slots (an explicit --max_batch_size) in `room` bytes: a KV cache of what the
    room holds beside their working memory, up to a full-length sequence each; None where not
    one full-length sequence fits."""
    room_left = room - batch * slot_working_bytes(shape)
    block = shape.block_size
    tokens = max(0, room_left) // shape.kv_bytes_per_token // block * block
    longest = whole_blocks(shape.max_seq_len, block)
    if tokens < longest:
        return None
    return Sizing(batch, min(tokens, batch * longest))


def whole_blocks(tokens: int, block_size: int = KV_BLOCK_TOKENS) -> int:
    """`tokens` rounded up to whole KV blocks."""
    return -(-tokens // block_size) * block_size


def given_cache(shape: Shape, room: int, batch: int | None, tokens: int) -> Sizing | None:
    """A KV cache of `tokens` positions (--kv_cache_tokens) in `room` bytes, with `batch`
    slots, or for auto as many as it holds sequences of AUTO_TOKENS_PER_SEQUENCE tokens (at
    most AUTO_MAX_BATCH, at least one) whose working memory fits beside it; None where the
    cache and the slots' working memory do not fit."""
    left, slot = room - tokens * shape.kv_bytes_per_token, slot_working_bytes(shape)
    if batch is None:
        average = min(shape.max_seq_len, AUTO_TOKENS_PER_SEQUENCE)
        batch = max(1, min(AUTO_MAX_BATCH, tokens // average, left // slot))
    return Sizing(batch, tokens) if left >= batch * slot else None


def full_slots(shape: Shape, room: int) -> int:
    """How many full-length slots (a cache of max_seq_len each, as scoring keeps) fit in `room`
    bytes, at most AUTO_MAX_BATCH."""
    return min(AUTO_MAX_BATCH, max(0, room) // sum(per_slot_bytes(shape).values()))


def default_seq_len(shape: Shape, usable: int, slots: int) -> int | None:
    """--max_seq_len's default: `shape`'s (the model's context) where `slots` full-length
    sequences fit in `usable` bytes, else the longest that does (see `longest_seq_len`); None
    where none does."""
    if largest_batch(shape, usable) >= slots:
        return shape.max_seq_len
    return longest_seq_len(shape, usable, slots)


def valid_mp_sizes(args: ModelArgs) -> list[int]:
    """Model-parallel sizes a run accepts for this model: they divide the heads, the KV heads,
    the FFN width, dim and the vocabulary."""
    sizes = []
    for size in range(1, args.kv_heads + 1):
        try:
            check_model_parallel_size(args, size, 1)
        except UserError:
            continue
        sizes.append(size)
    return sizes


def longest_seq_len(shape: Shape, usable: int, batch: int) -> int | None:
    """The longest --max_seq_len below the asked one at which `batch` slots fit (a multiple of
    256 from 256 on), or None where none does."""
    low, high = 0, shape.max_seq_len - 1
    while low < high:
        middle = (low + high + 1) // 2
        if largest_batch(replace(shape, max_seq_len=middle), usable) >= batch:
            low = middle
        else:
            high = middle - 1
    if low == 0:
        return None
    return low // 256 * 256 if low >= 256 else low


@dataclass(frozen=True)
class Plan:
    """One rank's memory for a run, whether it fits and what to change if not. Bytes are
    exact for weights and the KV cache, estimates for working memory and the CUDA context."""

    ckpt_dir: str
    parameters: int
    dtype: str
    nproc: int
    model_parallel_size: int
    gpu_memory: int
    usable: int  # gpu_memory x gpu_memory_utilization
    max_seq_len: int
    max_batch_size: int  # what --max_batch_size auto picks, where auto_batch
    auto_batch: bool
    kv_cache_tokens: int | None  # auto's KV cache; None: max_seq_len per slot
    kv_bytes_per_token: int
    memory: dict[str, int]  # per rank at max_batch_size, term by term
    largest_batch: int
    fits: bool
    verdict: str
    advice: list[str]
    notes: list[str]
    checkpoint: dict[str, Any] | None  # the shard files: count, bytes, bytes per parameter

    @property
    def needed(self) -> int:
        return sum(self.memory.values())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "needed": self.needed}


def resolved_mp_size(settings: PlanSettings, args: ModelArgs, n_shards: int) -> int:
    """--model_parallel_size or a run's default for --nproc, checked as a run checks it."""
    from ..job.build import default_model_parallel_size
    mp = settings.model_parallel_size or (
        default_model_parallel_size(settings.nproc, n_shards) if n_shards else settings.nproc)
    if mp not in (sizes := valid_mp_sizes(args)):
        raise UserError(f"model-parallel size {mp} does not divide this model's heads "
                        f"({args.n_heads}, {args.kv_heads} KV), FFN width, dim and vocabulary: "
                        f"use one of {', '.join(map(str, sizes))} (--model_parallel_size)")
    if settings.nproc % mp:
        raise UserError(f"--nproc {settings.nproc} is not a multiple of the model-parallel size "
                        f"{mp}: each model copy takes {mp} processes")
    return mp


def memory_at(shape: Shape, batch: int, kv_cache_tokens: int | None = None) -> dict[str, int]:
    """One rank's memory, term by term, with `batch` slots and a KV cache of `kv_cache_tokens`
    tokens (None: max_seq_len per slot)."""
    slots = {name: batch * value for name, value in per_slot_bytes(shape).items()}
    if kv_cache_tokens is not None:
        slots["KV cache"] = kv_cache_tokens * shape.kv_bytes_per_token
    return {"CUDA context (allowance)": shape.overhead,
            "weights": weight_bytes(shape.args, shape.mp_size, shape.dtype_bytes),
            **fixed_working_bytes(shape), **slots}


def checkpoint_notes(args: ModelArgs, sizes: list[int]) -> tuple[dict[str, Any] | None,
                                                                 list[str]]:
    """The shard files against params.json: their sizes must be its parameters in 16 or 32 bits,
    split evenly."""
    if not sizes:
        return None, ["no shard files: weights counted from params.json alone"]
    params = parameter_count(args)
    per_param = sum(sizes) / params
    info = {"shards": len(sizes), "bytes": sum(sizes), "bytes_per_parameter": round(per_param, 3)}
    stored = next((n for n in (2, 4) if abs(per_param - n) <= 0.05 * n), None)
    each = stored and weight_bytes(args, len(sizes), stored)
    if stored is None or any(abs(size - each) > 0.05 * each for size in sizes):
        return info, [f"the {len(sizes)} shard file(s) hold {gib(sum(sizes))} GiB, "
                      f"{per_param:.2f} bytes for each of params.json's {params:,} parameters "
                      "(or unevenly): does params.json belong to this checkpoint?"]
    return info, [f"{len(sizes)} shard file(s), {gib(sum(sizes))} GiB: params.json's "
                  f"{params:,} parameters in {8 * stored} bits, as expected"]


def advice(shape: Shape, usable: int, batch: int, nproc: int) -> list[str]:
    """What would make `batch` slots fit: a smaller batch, more GPUs, a shorter max_seq_len,
    a 16-bit dtype."""
    most = largest_batch(shape, usable)
    if most >= batch:
        return []
    out = [f"--max_batch_size {most}: the most that fits at --max_seq_len "
           f"{shape.max_seq_len}"] if most else []
    copies = nproc // shape.mp_size
    for size in (s for s in valid_mp_sizes(shape.args) if s > shape.mp_size):
        if (more := largest_batch(replace(shape, mp_size=size), usable)) >= batch:
            out.append(f"more GPUs: --nproc {size * copies} --model_parallel_size {size} "
                       f"({size} GPUs per model copy) fits --max_batch_size {batch} (up to "
                       f"{more})")
            break
    else:
        out.append(f"more GPUs of this size: no model-parallel size this model allows (up to "
                   f"{shape.args.kv_heads}, its KV heads) fits --max_batch_size {batch}")
    if seq_len := longest_seq_len(shape, usable, batch):
        out.append(f"--max_seq_len {seq_len}: the longest at which --max_batch_size {batch} fits")
    else:
        out.append(f"no shorter --max_seq_len makes --max_batch_size {batch} fit on "
                   f"{shape.mp_size} GPU(s) per model copy")
    if shape.dtype_bytes == 4:
        half = largest_batch(replace(shape, dtype_bytes=2), usable)
        out.append(f"--dtype bf16 (fp16 on GPUs without bf16) halves the weights and the cache: "
                   f"up to --max_batch_size {half} fits" + ("" if half >= batch else
                                                            ", not enough alone"))
    return out


def gib(size: int) -> str:
    return f"{size / GIB:.2f}"


def verdict(shape: Shape, memory: dict[str, int], usable: int, most: int, batch: int,
            auto: Sizing | None = None) -> str:
    """Whether the plan fits, in words; `auto`: what --max_batch_size auto picked (batch is 1
    where it found no room)."""
    needed, per_gpu = sum(memory.values()), f"{gib(usable)} GiB usable per GPU"
    if auto is not None:
        return (f"fits: --max_batch_size auto picks {auto.max_batch_size} sequences decoding at "
                f"once over a KV cache of {auto.kv_cache_tokens} tokens "
                f"({gib(memory['KV cache'])} GiB) at --max_seq_len {shape.max_seq_len}; it all "
                f"needs {gib(needed)} of the {per_gpu}")
    if most >= batch:
        return (f"fits: --max_batch_size {batch} at --max_seq_len {shape.max_seq_len} needs "
                f"{gib(needed)} of the {per_gpu}; up to --max_batch_size {most} fits")
    if most:
        return (f"does not fit at --max_batch_size {batch}: it needs {gib(needed)} of the "
                f"{per_gpu}; at most {most} sequences of --max_seq_len {shape.max_seq_len} fit")
    weights = memory["weights"]
    if weights + shape.overhead > usable:
        return (f"does not fit: the weights alone take {gib(weights)} GiB per GPU; with the "
                f"CUDA context that is more than the {per_gpu}")
    return (f"does not fit: weights and working memory leave no room for one sequence of "
            f"--max_seq_len {shape.max_seq_len} in the {per_gpu}")


UNKNOWN_CONTEXT = 4096  # --max_seq_len's default for a shape no release of Meta's has


def check_seq_len(args: ModelArgs, max_seq_len: int) -> None:
    """An explicit --max_seq_len may not pass the model's context (as vLLM refuses a longer
    max_model_len): its positions past it were never trained."""
    if args.context_length is not None and max_seq_len > args.context_length:
        raise UserError(f"--max_seq_len {max_seq_len} is longer than the context {args.family} "
                        f"was trained for ({args.context_length} tokens): use at most "
                        f"{args.context_length}, or leave it out")


def context_default(shape: Shape, usable: int, slots: int) -> tuple[int | None, str]:
    """--max_seq_len's default and why, in words: the model's context (`shape.args`), or the
    longest part of it at which `slots` full-length sequences fit in `usable` bytes; None where
    not even a short one fits."""
    args = shape.args
    context = args.context_length
    if context is None:
        return UNKNOWN_CONTEXT, (f"{UNKNOWN_CONTEXT}, a guess: params.json is none of "
                                 "Meta's releases, whose contexts are known; pass --max_seq_len")
    fitting = default_seq_len(replace(shape, max_seq_len=context), usable, slots)
    if fitting == context:
        return context, f"{context}, {args.family}'s context"
    room = f"{slots} sequences of it" if slots > 1 else "one sequence of it"
    if fitting is None:
        return None, (f"{args.family}'s context of {context} tokens leaves no room for {room} "
                      f"beside the weights in {gib(usable)} GiB")
    return fitting, (f"{fitting}: {args.family}'s context of {context} tokens shortened to "
                     f"what fits, {room}, beside the weights in {gib(usable)} GiB")


def planned_seq_len(settings: PlanSettings, shape: Shape, usable: int, notes: list[str]) -> int:
    """--max_seq_len as given (checked), or its default, with a note."""
    if settings.max_seq_len is not None:
        check_seq_len(shape.args, settings.max_seq_len)
        return settings.max_seq_len
    length, why = context_default(shape, usable,
                                  settings.max_batch_size or GPU_AUTO_CONTEXT_SEQUENCES)
    notes.append(f"--max_seq_len not given: {why}")
    return length or shape.args.context_length


def make_plan(settings: PlanSettings) -> Plan:
    """The plan for a run with these settings, from params.json and the shard files' sizes."""
    args = read_args(settings)
    sizes = shard_sizes(settings.ckpt_dir)
    mp = resolved_mp_size(settings, args, len(sizes))
    dtype = settings.dtype or DEFAULT_DTYPE
    gpu_memory = gpu_memory_bytes(settings)
    usable = int(gpu_memory * settings.gpu_memory_utilization)
    checkpoint, notes = checkpoint_notes(args, sizes)
    shape = Shape(args, mp, DTYPE_BYTES[dtype], 1)
    shape = replace(shape, max_seq_len=planned_seq_len(settings, shape, usable, notes))
    auto = settings.max_batch_size is None and auto_sizing(shape, cache_room(shape, usable))
    batch = auto.max_batch_size if auto else settings.max_batch_size or 1
    most = largest_batch(shape, usable)
    memory = memory_at(shape, batch, auto.kv_cache_tokens if auto else None)
    if settings.dtype is None:
        notes.append(f"--dtype not given: planned for {DEFAULT_DTYPE}, a run's default on GPUs "
                     "that have it")
    return Plan(ckpt_dir=str(settings.ckpt_dir), parameters=parameter_count(args), dtype=dtype,
                nproc=settings.nproc, model_parallel_size=mp, gpu_memory=gpu_memory,
                usable=usable, max_seq_len=shape.max_seq_len, max_batch_size=batch,
                auto_batch=settings.max_batch_size is None,
                kv_cache_tokens=auto.kv_cache_tokens if auto else None,
                kv_bytes_per_token=shape.kv_bytes_per_token,
                memory=memory, largest_batch=most, fits=bool(auto) or most >= batch,
                verdict=verdict(shape, memory, usable, most, batch, auto or None),
                advice=[] if auto else advice(shape, usable, batch, settings.nproc), notes=notes,
                checkpoint=checkpoint)


def batch_words(plan: Plan) -> str:
    if not plan.auto_batch:
        return str(plan.max_batch_size)
    if plan.kv_cache_tokens is None:
        return "auto (no room for one sequence)"
    return f"auto ({plan.max_batch_size}, {plan.kv_cache_tokens} KV tokens)"


def plan_text(plan: Plan) -> str:
    """The plan as a small table for people."""
    copies = plan.nproc // plan.model_parallel_size
    lines = [f"{plan.ckpt_dir}: {plan.parameters / 1e9:.2f}B parameters, {plan.dtype}, "
             f"{plan.nproc} GPU(s) of {gib(plan.gpu_memory)} GiB, model parallel "
             f"{plan.model_parallel_size} ({copies} model cop{'y' if copies == 1 else 'ies'})",
             f"--max_batch_size {batch_words(plan)} x --max_seq_len {plan.max_seq_len}; KV "
             f"cache {plan.kv_bytes_per_token / 2**10:.1f} KiB per token per GPU", "",
             f"  {'per GPU':<34}{'GiB':>8}"]
    lines += [f"  {name:<34}{gib(size):>8}" for name, size in plan.memory.items()]
    lines += [f"  {'total':<34}{gib(plan.needed):>8}",
              f"  {'usable (x gpu_memory_utilization)':<34}{gib(plan.usable):>8}", "",
              f"largest --max_batch_size at --max_seq_len {plan.max_seq_len}: "
              f"{plan.largest_batch}", plan.verdict]
    lines += ["advice:"] + [f"  - {line}" for line in plan.advice] if plan.advice else []
    lines += [f"note: {note}" for note in plan.notes]
    lines.append("note: working memory and the CUDA context are estimates; weights and the "
                 "KV cache are exact")
    return "\n".join(lines) + "\n"


def plan(settings: PlanSettings) -> None:
    """`llama-gen plan`: print the plan, as a table or (--json) one JSON object."""
    made = make_plan(settings)
    print(json.dumps(made.as_dict()) if settings.json else plan_text(made), end="\n"
          if settings.json else "")
