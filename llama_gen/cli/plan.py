"""`llama-gen plan`: will a run fit on these GPUs, and with which batch size? From params.json
(or a Hugging Face folder's config.json) and the weight files' sizes, where present, alone: no
weights are loaded, no GPU is needed.

The bytes come from `engine.memory`, per rank (one GPU); this module reads the command line,
resolves a run's defaults for the GPU it describes, and words the verdict and the advice.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..engine.memory import (DTYPES, GPU_AUTO_CONTEXT_SEQUENCES, Shape, Sizing, cache_room,
                             context_slots, gib, longest_seq_len, memory_at, parameter_count,
                             run_sizing, slot_working_bytes, valid_mp_sizes, weight_bytes,
                             whole_blocks)
from ..errors import UserError
from ..job.build import default_model_parallel_size, read_params
from ..job.sizing import check_seq_len, context_default
from ..model.args import ModelArgs
from ..model.checkpoint import SHARD_NAME, find_shards
from ..model.hf_checkpoint import WEIGHT_FILES, is_hf_folder, weight_paths
from ..settings import Settings, check_fields, rules, setting, settings_part
from ..values import FALSE_WORDS, TRUE_WORDS

DEFAULT_DTYPE = "bf16"  # a run's default on GPUs that have bf16
MEMORY_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
# The run's settings that decide its memory, as the run defines them.
RUN_MEMORY_SETTINGS = ("ckpt_dir", "tokenizer_path", "max_seq_len", "max_batch_size", "dtype",
                       "model_parallel_size", "gpu_memory_utilization", "kv_cache_tokens",
                       "scheduler", "compile", "quantize", "quantize_head")


@dataclass(frozen=True, kw_only=True)
class PlanSettings(settings_part(Settings, *RUN_MEMORY_SETTINGS)):
    """The flags of a run that decide its memory, and the GPU to plan for."""

    nproc: int | None = setting(None, low=1, help="processes the run would launch (torchrun's "
                                "--nproc_per_node x nodes), one GPU each (default: "
                                "--model_parallel_size, or 1)")
    gpu_memory: str | None = setting(None, help="memory of one GPU: 24GB, 80GiB, 80G or a "
                                     "number of bytes; GB means GiB, as GPU makers use it "
                                     "(default: this machine's first GPU)")
    json: bool = setting(False, help="print one JSON object instead of the table")

    def __post_init__(self) -> None:
        check_fields(self)


PLAN_USAGE = ("llama-gen plan --ckpt_dir DIR [--nproc N] [--gpu_memory 24GB] [--json] [a run's "
              "flags: those that do not change its memory are ignored]")
PLAN_SUMMARY = f"""\
Tell whether a run fits on its GPUs before starting it: per GPU, the bytes of weights, the KV
cache's bytes per token and working memory; the KV cache that fits beside them for at most
--max_batch_size sequences at once (auto: as many as it holds, up to 256), as the run sizes it;
and a verdict with advice (more GPUs, a shorter --max_seq_len, --dtype). Flags left out take a
run's defaults on a GPU: --max_seq_len the model's context where it fits, --dtype
{DEFAULT_DTYPE}, --model_parallel_size from --nproc and the shard count, --nproc one model copy.
Reads params.json (a Hugging Face folder's config.json) and the weight files' sizes only (the
tokenizer only where params.json's vocab_size is -1): it runs in seconds, on any machine."""


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


def shard_sizes(ckpt_dir: Path) -> list[int]:
    """The weight files' sizes: Meta's shards in shard order, a Hugging Face folder's files in
    name order; none where the directory holds no weights."""
    if is_hf_folder(ckpt_dir):
        if not any((ckpt_dir / name).is_file() for name in WEIGHT_FILES):
            return []
        return [path.stat().st_size for path in weight_paths(ckpt_dir)]
    if not any(SHARD_NAME.fullmatch(p.name) for p in ckpt_dir.iterdir()):
        return []
    return [path.stat().st_size for path in find_shards(ckpt_dir)]


@dataclass(frozen=True)
class Plan:
    """One rank's memory for a run, whether it fits and what to change if not. Bytes are
    exact for weights and the KV cache, estimates for working memory and the CUDA context."""

    ckpt_dir: str
    parameters: int
    dtype: str
    quantize: str | None  # --quantize: the blocks' weights in int8
    nproc: int
    model_parallel_size: int
    gpu_memory: int
    usable: int  # gpu_memory x gpu_memory_utilization
    max_seq_len: int
    max_batch_size: int  # at most this many sequences at once: as given, or what auto picks
    auto_batch: bool
    kv_cache_tokens: int | None  # the KV cache, as the run sizes it; None: it does not fit
    full_length_sequences: int  # sequences of max_seq_len the KV cache holds at once
    kv_bytes_per_token: int
    memory: dict[str, int]  # per rank, term by term (where it does not fit: the least it needs)
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


def resolved_mp_size(settings: PlanSettings, args: ModelArgs,
                     n_shards: int) -> tuple[int, int]:
    """--nproc and --model_parallel_size, or a run's defaults (one model copy; the shard count
    where --nproc allows), checked as a run checks them."""
    nproc = settings.nproc or settings.model_parallel_size or 1
    mp = settings.model_parallel_size or (
        default_model_parallel_size(nproc, n_shards) if n_shards else nproc)
    if mp not in (sizes := valid_mp_sizes(args)):
        raise UserError(f"model-parallel size {mp} does not divide this model's heads "
                        f"({args.n_heads}, {args.kv_heads} KV), FFN width, dim and vocabulary: "
                        f"use one of {', '.join(map(str, sizes))} (--model_parallel_size)")
    if nproc % mp:
        raise UserError(f"--nproc {nproc} is not a multiple of the model-parallel size "
                        f"{mp}: each model copy takes {mp} processes")
    return nproc, mp


def checkpoint_notes(args: ModelArgs, sizes: list[int], hf: bool = False
                     ) -> tuple[dict[str, Any] | None, list[str]]:
    """The weight files against the model's config: their sizes must be its parameters in 16
    or 32 bits (a tied head stored once), Meta's shards split evenly (a Hugging Face folder's
    files are cut by size, not by rank)."""
    config, files = ("config.json", "weight file") if hf else ("params.json", "shard file")
    if not sizes:
        return None, [f"no {files}s: weights counted from {config} alone"]
    params = parameter_count(args) - (args.vocab_size * args.dim if args.tie_word_embeddings
                                      else 0)
    per_param = sum(sizes) / params
    info = {"shards": len(sizes), "bytes": sum(sizes), "bytes_per_parameter": round(per_param, 3)}
    stored = next((n for n in (2, 4) if abs(per_param - n) <= 0.05 * n), None)
    each = stored and weight_bytes(args, len(sizes), stored)
    if stored is None or not hf and any(abs(size - each) > 0.05 * each for size in sizes):
        uneven = "" if hf else " (or unevenly)"
        return info, [f"the {len(sizes)} {files}(s) hold {gib(sum(sizes))} GiB, "
                      f"{per_param:.2f} bytes for each of {config}'s {params:,} "
                      f"parameters{uneven}: does {config} belong to this checkpoint?"]
    return info, [f"{len(sizes)} {files}(s), {gib(sum(sizes))} GiB: {config}'s "
                  f"{params:,} parameters in {8 * stored} bits, as expected"]


def sized(shape: Shape, usable: int, batch: int | None,
          kv_cache_tokens: int | None) -> Sizing | None:
    """The run's sizing on a GPU of `usable` bytes (`memory.run_sizing`); None where it does
    not fit."""
    return run_sizing(shape, cache_room(shape, usable), batch, kv_cache_tokens)


def advice(shape: Shape, usable: int, batch: int | None, kv_cache_tokens: int | None,
           nproc: int) -> list[str]:
    """What would make the run fit: fewer sequences, more GPUs, a shorter max_seq_len, a 16-bit
    dtype."""
    def fits(candidate: Shape) -> bool:
        return sized(candidate, usable, batch, kv_cache_tokens) is not None
    out, longest = [], whole_blocks(shape.max_seq_len, shape.block_size)
    if batch and batch > 1 and kv_cache_tokens is None and sized(shape, usable, 1, None):
        most = ((cache_room(shape, usable) - longest * shape.kv_bytes_per_token)
                // slot_working_bytes(shape))
        out.append(f"--max_batch_size {most}: the most sequences whose working memory fits "
                   f"beside one of --max_seq_len {shape.max_seq_len}")
    copies = nproc // shape.mp_size
    for size in (s for s in valid_mp_sizes(shape.args) if s > shape.mp_size):
        if fits(replace(shape, mp_size=size)):
            out.append(f"more GPUs: --nproc {size * copies} --model_parallel_size {size} "
                       f"({size} GPUs per model copy) fits")
            break
    else:
        out.append(f"more GPUs of this size: no model-parallel size this model allows (up to "
                   f"{shape.args.kv_heads}, its KV heads) fits")
    if seq_len := longest_seq_len(shape, fits):
        out.append(f"--max_seq_len {seq_len}: the longest that fits")
    else:
        out.append(f"no shorter --max_seq_len fits on {shape.mp_size} GPU(s) per model copy")
    if shape.dtype_bytes == 4:
        half = fits(replace(shape, dtype_bytes=2))
        out.append("--dtype bf16 (fp16 on GPUs without bf16) halves the weights and the cache"
                   + (": it fits" if half else ", not enough alone"))
    if shape.quantize is None:
        int8 = fits(replace(shape, quantize="int8"))
        out.append("--quantize int8 stores the blocks' weights in a byte per parameter"
                   + (": it fits" if int8 else ", not enough alone"))
    return out


def verdict(shape: Shape, memory: dict[str, int], usable: int, batch: int | None,
            sizing: Sizing | None) -> str:
    """Whether the plan fits, in words: the run's sizing (None where it does not fit) for at
    most `batch` sequences (None: auto)."""
    needed, per_gpu = sum(memory.values()), f"{gib(usable)} GiB usable per GPU"
    if sizing is not None:
        tokens = sizing.kv_cache_tokens
        whole = tokens // whole_blocks(shape.max_seq_len, shape.block_size)
        who = ("--max_batch_size auto picks" if batch is None else
               f"--max_batch_size {batch}: at most")
        return (f"fits: {who} {sizing.max_batch_size} sequences decoding at once over a KV "
                f"cache of {tokens} tokens ({gib(memory['KV cache'])} GiB; {whole} sequence(s) "
                f"of --max_seq_len {shape.max_seq_len} at once, more where shorter); it all "
                f"needs {gib(needed)} of the {per_gpu}")
    weights = memory["weights"]
    if weights + shape.overhead > usable:
        return (f"does not fit: the weights alone take {gib(weights)} GiB per GPU; with the "
                f"CUDA context that is more than the {per_gpu}")
    beside = f" beside {batch} sequences' working memory" if batch and batch > 1 else ""
    return (f"does not fit: weights and working memory leave no room for one sequence of "
            f"--max_seq_len {shape.max_seq_len}{beside}: it needs {gib(needed)} of the "
            f"{per_gpu}")


def planned_seq_len(settings: PlanSettings, shape: Shape, usable: int, notes: list[str]) -> int:
    """--max_seq_len as given (checked), or its default, with a note."""
    if settings.max_seq_len is not None:
        check_seq_len(shape.args, settings.max_seq_len)
        return settings.max_seq_len
    slots, sequences = context_slots(settings.max_batch_size, GPU_AUTO_CONTEXT_SEQUENCES,
                                     paged=True)
    length, why = context_default(shape, usable, slots, sequences)
    notes.append(f"--max_seq_len not given: {why}")
    return length or shape.args.context_length


def check_cache_tokens(tokens: int | None, shape: Shape) -> None:
    """--kv_cache_tokens holds one sequence of --max_seq_len in whole blocks, as a run checks
    it."""
    need = whole_blocks(shape.max_seq_len, shape.block_size)
    if tokens is not None and tokens // shape.block_size * shape.block_size < need:
        raise UserError(f"--kv_cache_tokens {tokens} cannot hold one sequence of --max_seq_len "
                        f"{shape.max_seq_len} in whole blocks of {shape.block_size} positions: "
                        f"give at least {need}, or a shorter --max_seq_len")


def make_plan(settings: PlanSettings) -> Plan:
    """The plan for a run with these settings, from the model's config and the weight files'
    sizes."""
    if not settings.ckpt_dir.is_dir():
        raise UserError(f"--ckpt_dir {settings.ckpt_dir}: no such directory (it holds "
                        "params.json, or a Hugging Face folder's config.json)")
    args = read_params(settings.ckpt_dir, tokenizer_path=settings.tokenizer_path)
    sizes, hf = shard_sizes(settings.ckpt_dir), is_hf_folder(settings.ckpt_dir)
    nproc, mp = resolved_mp_size(settings, args, 1 if hf else len(sizes))  # as a run counts
    dtype = settings.dtype or DEFAULT_DTYPE
    gpu_memory = gpu_memory_bytes(settings)
    usable = int(gpu_memory * settings.gpu_memory_utilization)
    checkpoint, notes = checkpoint_notes(args, sizes, hf)
    # a run's decode step on a GPU: CUDA graphs, unless --compile false or the static baseline
    graphs = settings.scheduler == "continuous" and settings.compile is not False
    shape = Shape(args, mp, DTYPES[dtype][1], 1, decode_graphs=graphs,
                  quantize=settings.quantize, quantize_head=settings.quantize_head)
    shape = replace(shape, max_seq_len=planned_seq_len(settings, shape, usable, notes))
    batch, given_tokens = settings.max_batch_size, settings.kv_cache_tokens
    check_cache_tokens(given_tokens, shape)
    sizing = sized(shape, usable, batch, given_tokens)
    least = given_tokens or whole_blocks(shape.max_seq_len, shape.block_size)
    memory = (memory_at(shape, sizing.max_batch_size, sizing.kv_cache_tokens) if sizing
              else memory_at(shape, batch or 1, least))
    if settings.dtype is None:
        notes.append(f"--dtype not given: planned for {DEFAULT_DTYPE}, a run's default on GPUs "
                     "that have it")
    tokens = sizing.kv_cache_tokens if sizing else None
    return Plan(ckpt_dir=str(settings.ckpt_dir), parameters=parameter_count(args), dtype=dtype,
                quantize=settings.quantize, nproc=nproc, model_parallel_size=mp,
                gpu_memory=gpu_memory, usable=usable,
                max_seq_len=shape.max_seq_len,
                max_batch_size=sizing.max_batch_size if sizing else batch or 1,
                auto_batch=batch is None, kv_cache_tokens=tokens,
                full_length_sequences=(tokens or 0) // whole_blocks(shape.max_seq_len,
                                                                    shape.block_size),
                kv_bytes_per_token=shape.kv_bytes_per_token, memory=memory, fits=bool(sizing),
                verdict=verdict(shape, memory, usable, batch, sizing),
                advice=[] if sizing else advice(shape, usable, batch, given_tokens, nproc),
                notes=notes, checkpoint=checkpoint)


def batch_words(plan: Plan) -> str:
    if not plan.auto_batch:
        return str(plan.max_batch_size)
    if plan.kv_cache_tokens is None:
        return "auto (no room for one sequence)"
    return f"auto ({plan.max_batch_size})"


def plan_text(plan: Plan) -> str:
    """The plan as a small table for people."""
    copies = plan.nproc // plan.model_parallel_size
    weights = f"{plan.dtype} ({plan.quantize} weights)" if plan.quantize else plan.dtype
    lines = [f"{plan.ckpt_dir}: {plan.parameters / 1e9:.2f}B parameters, {weights}, "
             f"{plan.nproc} GPU(s) of {gib(plan.gpu_memory)} GiB, model parallel "
             f"{plan.model_parallel_size} ({copies} model cop{'y' if copies == 1 else 'ies'})",
             f"--max_batch_size {batch_words(plan)} x --max_seq_len {plan.max_seq_len}; KV "
             f"cache {plan.kv_bytes_per_token / 2**10:.1f} KiB per token per GPU"
             + (f", {plan.kv_cache_tokens} KV tokens" if plan.kv_cache_tokens else ""), "",
             f"  {'per GPU':<34}{'GiB':>8}"]
    lines += [f"  {name:<34}{gib(size):>8}" for name, size in plan.memory.items()]
    lines += [f"  {'total':<34}{gib(plan.needed):>8}",
              f"  {'usable (x gpu_memory_utilization)':<34}{gib(plan.usable):>8}", "",
              plan.verdict]
    lines += ["advice:"] + [f"  - {line}" for line in plan.advice] if plan.advice else []
    lines += [f"note: {note}" for note in plan.notes]
    lines.append("note: working memory and the CUDA context are estimates; weights and the "
                 "KV cache are exact (a run measures its working memory before it sizes the "
                 "cache, in a profiling step)")
    return "\n".join(lines) + "\n"


def plan(settings: PlanSettings) -> None:
    """`llama-gen plan`: print the plan, as a table or (--json) one JSON object."""
    made = make_plan(settings)
    print(json.dumps(made.as_dict()) if settings.json else plan_text(made), end="\n"
          if settings.json else "")
