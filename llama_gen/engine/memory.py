"""One rank's memory in bytes, from the model's shape alone: weights, the KV cache per token,
working memory, how many sequences a budget holds and --max_seq_len's default.

Plain arithmetic on `ModelArgs`: no torch, no device. `llama-gen plan` prints it for a GPU it
describes; a run (`job.build`) sizes its KV cache by it within the budget it measures. The
weights' shapes are `model.checkpoint`'s table, imported where they are counted, as that
module imports torch for its loader.

Every number is per rank (one GPU): a run puts 1/model_parallel_size of every split weight and of
the KV heads on each. Weights and the KV cache are exact byte counts of what a run allocates; the
working-memory terms are estimates of the largest transient tensors of the engine, each
documented where it is computed; the CUDA context is an allowance.

The bounds below are the engine's: it imports them from here, so that what it allocates and
what is counted here are one number.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import UserError
from ..model.args import ModelArgs
from .limits import KV_BLOCK_TOKENS, LOGPROB_ROWS, PREFILL_MASK_ELEMENTS, PREFILL_TOKENS

GIB = 2**30
# --dtype's choices: each names a torch dtype (by torch's name) of this many bytes per element.
DTYPES = {"bf16": ("bfloat16", 2), "fp16": ("float16", 2), "fp32": ("float32", 4),
          "bfloat16": ("bfloat16", 2), "float16": ("float16", 2), "float32": ("float32", 4)}


# CUDA context, cuBLAS workspaces and the allocator's slack, which torch's own counters do not
# show: typically 0.5-1 GiB on current GPUs and drivers. An allowance, not a measurement.
CUDA_CONTEXT_BYTES = 3 * GIB // 4
# Per logit of a decode step's (batch, vocab) float32 logits, the most the draw allocates
# beside them at once, every control on (scripts/sampler_memory.py measures it with torch's CPU
# memory profiler over the whole batch, as a GPU draws it: 28.1 bytes in `RowState.draw`, 24.1
# of them in `sample` (its radix selects' int32 digits and counts of the entries inside the
# prefix), the penalised copy the other 4; 28.1-29.0 in `RowState.records`, whose top logprobs
# hold a float32 log-softmax and three int64 sort keys (4 + 3 x 8)). Rounded up to 32 for the
# CUDA allocator's rounding; tests/test_memory.py holds the measurement to it.
SAMPLER_BYTES_PER_LOGIT = 32
LOGIT_BYTES = 4  # logits are float32
PENALTY_BYTES_PER_LOGIT = 5  # TokenCounts: in_prompt (bool) and generated (int32), per slot
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
UNKNOWN_CONTEXT = 4096  # --max_seq_len's default for a shape no release of Meta's has


def weight_sizes(args: ModelArgs) -> list[tuple[int, bool]]:
    """Each weight's elements, and whether it is split across model-parallel ranks (whichever
    dimension it is split on; the embedding's is either) or replicated, as the norms are."""
    from ..model.checkpoint import full_shapes, split_dim
    return [(math.prod(shape), split_dim(key, 0) is not None)
            for key, shape in full_shapes(args).items()]


def parameter_count(args: ModelArgs) -> int:
    return sum(numel for numel, _ in weight_sizes(args))


def weight_bytes(args: ModelArgs, mp_size: int, dtype_bytes: int, quantize: str | None = None,
                 quantize_head: bool = False) -> int:
    """One rank's weights: 1/mp_size of every split weight, and the whole of the replicated
    ones. With --quantize int8 the blocks' linear weights (and the head's, with
    --quantize_head) take a byte per element and a scale in the model's dtype per row this
    rank holds: a column-parallel layer's 1/mp_size of the rows, a row-parallel layer's all."""
    # a tied head is the embedding's own tensor (`Transformer.tie_head`; the vocabulary-split
    # embedding of Llama 3's tokenizer), unless the head is int8
    shared = (args.vocab_size * args.dim // mp_size * dtype_bytes
              if args.tie_word_embeddings and not (quantize and quantize_head) else 0)
    if quantize is None:
        return sum(numel // mp_size if split else numel
                   for numel, split in weight_sizes(args)) * dtype_bytes - shared
    from ..model.checkpoint import full_shapes, split_dim
    from ..model.quantize import quantized_key
    total = 0
    for key, shape in full_shapes(args).items():
        dim = split_dim(key, 0)
        elements = math.prod(shape) // (1 if dim is None else mp_size)
        if not quantized_key(key, quantize_head):
            total += elements * dtype_bytes
            continue
        rows = shape[0] // mp_size if dim == 0 else shape[0]
        total += elements + rows * dtype_bytes
    return total - shared


def kv_bytes_per_token(args: ModelArgs, mp_size: int, dtype_bytes: int) -> int:
    """K and V of every layer for one token, this rank's KV heads only."""
    return 2 * args.n_layers * (args.kv_heads // mp_size) * args.head_dim * dtype_bytes


def valid_mp_sizes(args: ModelArgs) -> list[int]:
    """Model-parallel sizes a run accepts for this model: they divide the heads, the KV heads,
    the FFN width, dim and the vocabulary."""
    from ..model.checkpoint import check_model_parallel_size
    sizes = []
    for size in range(1, args.kv_heads + 1):
        try:
            check_model_parallel_size(args, size, 1)
        except UserError:
            continue
        sizes.append(size)
    return sizes


@dataclass(frozen=True)
class Shape:
    """What one rank's memory depends on."""

    args: ModelArgs
    mp_size: int
    dtype_bytes: int
    max_seq_len: int
    overhead: int = CUDA_CONTEXT_BYTES  # the device's own (the CUDA context); 0 on the CPU
    block_size: int = KV_BLOCK_TOKENS  # positions per KV block: the cache is whole blocks
    decode_graphs: bool = False  # decode runs as CUDA graphs (compiled), with their own pool
    quantize: str | None = None  # --quantize: int8 weights (`weight_bytes`)
    quantize_head: bool = False

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.args, self.mp_size, self.dtype_bytes, self.quantize,
                            self.quantize_head)

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.args, self.mp_size, self.dtype_bytes)


@dataclass(frozen=True)
class Sizing:
    """How a run spends its memory: sequences decoding at once, and the KV cache's capacity in
    tokens (None: a full --max_seq_len for each of them)."""

    max_batch_size: int
    kv_cache_tokens: int | None = None


def activation_bytes_per_token(shape: Shape) -> int:
    """One layer's transients per token of a pass (the previous layer's are freed): the
    residual stream, its norm and a block's output; q, k, v and the attention output; the FFN's
    w1 and w3 outputs and their product; RoPE's float32 copies of q and k."""
    a, mp, b = shape.args, shape.mp_size, shape.dtype_bytes
    heads, kv_heads = a.n_heads // mp, a.kv_heads // mp
    return (b * (3 * a.dim + (2 * heads + 2 * kv_heads) * a.head_dim + 3 * a.ffn_hidden_dim // mp)
            + 2 * 4 * (heads + kv_heads) * a.head_dim)


def fixed_working_bytes(shape: Shape) -> dict[str, int]:
    """Working memory that does not grow with the batch (estimates, per rank)."""
    a = shape.args
    return {
        # A pass prefills at most PREFILL_TOKENS tokens: a group of prompts, or a chunk of a
        # long one.
        "prefill activations": PREFILL_TOKENS * activation_bytes_per_token(shape),
        # a chunk's float32 attention mask where reads need one
        "prefill attention mask": PREFILL_MASK_ELEMENTS * 4,
        # prompt logprobs: LOGPROB_ROWS rows of float32 logits and their log-softmax
        "prompt logprob rows": 2 * LOGPROB_ROWS * a.vocab_size * LOGIT_BYTES,
        "rotary table": shape.max_seq_len * a.head_dim // 2 * 2 * 4,
        "int8 weight in full precision (graphs)": dequantized_weight_bytes(shape),
    }


def dequantized_weight_bytes(shape: Shape) -> int:
    """With int8 weights and CUDA graphs, the largest weight in the model's dtype, an allowance:
    should inductor not fuse the compiled step's cast into its product, the graphs' pool holds
    a full-precision copy of a weight, of the largest one at most (a GPU check is to tell). 0
    otherwise (the eager product's blocks are small)."""
    if not (shape.quantize and shape.decode_graphs):
        return 0
    a, mp = shape.args, shape.mp_size
    fused_w1_w3, w2 = 2 * a.ffn_hidden_dim // mp * a.dim, a.dim * a.ffn_hidden_dim // mp
    fused_qkv = (a.n_heads + 2 * a.kv_heads) * a.head_dim // mp * a.dim
    head = a.vocab_size // mp * a.dim if shape.quantize_head else 0
    return max(fused_w1_w3, w2, fused_qkv, head) * shape.dtype_bytes


def per_slot_bytes(shape: Shape) -> dict[str, int]:
    """What each batch slot adds: its KV cache (exact) and its share of the decode step's
    transients (estimates). Logits are gathered whole on every rank, so they do not shrink
    with the model-parallel size."""
    a = shape.args
    slot = {
        "KV cache": shape.max_seq_len * shape.kv_bytes_per_token,
        "decode logits and sampler": a.vocab_size * (LOGIT_BYTES + SAMPLER_BYTES_PER_LOGIT),
        "penalty counts": a.vocab_size * PENALTY_BYTES_PER_LOGIT,
    }
    if shape.decode_graphs:
        slot["decode graph pool"] = graph_pool_per_slot(shape)
    return slot


def graph_pool_per_slot(shape: Shape) -> int:
    """What each row adds to the CUDA graphs' own memory pool (0 without graphs): the graph of
    the largest batch holds its output, the float32 logits gathered whole, and its layers'
    transients, which the smaller batches' graphs share (one pool for them all). An estimate in
    a run too: the graphs are recorded after the cache is allocated, at its address."""
    if not shape.decode_graphs:
        return 0
    return shape.args.vocab_size * LOGIT_BYTES + activation_bytes_per_token(shape)


def context_table_bytes(shape: Shape, batch: int) -> int:
    """What grows with the context beside the KV cache, which the profiling step's shorter
    context does not reach: the rotary table, and the block table with the decode step's copy
    of it (int64, a row per sequence)."""
    rotary = fixed_working_bytes(shape)["rotary table"]
    return rotary + 2 * batch * -(-shape.max_seq_len // shape.block_size) * 8


def profiled_room(shape: Shape, budget: int, batch: int, measured: int) -> int:
    """The room `run_sizing` takes (see `cache_room`) where a run measured its working memory
    (`engine.profile`): `measured` bytes at `batch` rows replace the estimates, the graph pool
    and int8's full-precision weight (`dequantized_weight_bytes`) stay estimates. `run_sizing` takes the slots' estimated working memory off the room, so it is
    given back here."""
    return budget - measured - batch * graph_pool_per_slot(shape) - \
        dequantized_weight_bytes(shape) + batch * slot_working_bytes(shape)


def slot_working_bytes(shape: Shape) -> int:
    """What each sequence decoding at once adds beside its KV cache."""
    return sum(size for name, size in per_slot_bytes(shape).items() if name != "KV cache")


def memory_at(shape: Shape, batch: int, kv_cache_tokens: int | None = None) -> dict[str, int]:
    """One rank's memory, term by term, with `batch` slots and a KV cache of `kv_cache_tokens`
    tokens (None: max_seq_len per slot)."""
    slots = {name: batch * value for name, value in per_slot_bytes(shape).items()}
    if kv_cache_tokens is not None:
        slots["KV cache"] = kv_cache_tokens * shape.kv_bytes_per_token
    return {"CUDA context (allowance)": shape.overhead,
            "weights": shape.weight_bytes,
            **fixed_working_bytes(shape), **slots}


def cache_room(shape: Shape, usable: int) -> int:
    """Bytes of `usable` left for the KV cache and the slots' working memory, beside the
    device's overhead, the weights and the fixed working memory (negative where they do not
    fit)."""
    return (usable - shape.overhead - shape.weight_bytes
            - sum(fixed_working_bytes(shape).values()))


def holds(shape: Shape, usable: int, slots: int, sequences: int) -> bool:
    """Whether `usable` bytes hold, beside the device's overhead, the weights and the fixed
    working memory, `slots` slots' working memory and a KV cache of `sequences` sequences of
    max_seq_len."""
    longest = whole_blocks(shape.max_seq_len, shape.block_size)
    return (cache_room(shape, usable) - slots * slot_working_bytes(shape)
            >= sequences * longest * shape.kv_bytes_per_token)


def context_slots(max_batch_size: int | None, auto_slots: int, paged: bool) -> tuple[int, int]:
    """What --max_seq_len's default must leave room for: (slots, full-length sequences). A
    cache sized from memory (a GPU's paged one) needs GPU_AUTO_CONTEXT_SEQUENCES full-length
    sequences, or --max_batch_size where fewer, beside --max_batch_size slots' working memory
    (`auto_slots` for auto); full-length slots (the CPU's, scoring's) a full length each."""
    slots = max_batch_size or auto_slots
    return slots, min(slots, GPU_AUTO_CONTEXT_SEQUENCES) if paged else slots


def whole_blocks(tokens: int, block_size: int = KV_BLOCK_TOKENS) -> int:
    """`tokens` rounded up to whole KV blocks."""
    return -(-tokens // block_size) * block_size


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


def run_sizing(shape: Shape, room: int, batch: int | None, kv_cache_tokens: int | None = None,
               full_length_slots: bool = False) -> Sizing | None:
    """A run's sequences at once and KV cache in `room` bytes (see `cache_room`): as a run on a
    GPU sizes itself and as `llama-gen plan` shows it, so that the two cannot disagree.
    --max_batch_size (`batch`; None: auto) caps the sequences decoding at once, as vLLM's
    max_num_seqs: the cache holds what the room leaves beside their working memory
    (`auto_sizing`, `sized_slots`), or --kv_cache_tokens (`given_cache`). Scoring keeps a
    full-length slot per text (it reads whole rows), as many as fit up to `batch`. None where
    not one full-length sequence fits, or the given cache does not."""
    if full_length_slots:
        most = full_slots(shape, room)
        return Sizing(min(batch or most, most)) if most else None
    if kv_cache_tokens is not None:
        return given_cache(shape, room, batch, kv_cache_tokens)
    if batch is None:
        return auto_sizing(shape, room)
    return sized_slots(shape, room, batch)


def longest_seq_len(shape: Shape, fits: Callable[[Shape], bool]) -> int | None:
    """The longest --max_seq_len below `shape`'s at which `fits` holds (a multiple of 256 from
    256 on), or None where none does; `fits` must hold at every length below one where it
    does."""
    low, high = 0, shape.max_seq_len - 1
    while low < high:
        middle = (low + high + 1) // 2
        if fits(replace(shape, max_seq_len=middle)):
            low = middle
        else:
            high = middle - 1
    if low == 0:
        return None
    return low // 256 * 256 if low >= 256 else low


def default_seq_len(shape: Shape, usable: int, slots: int, sequences: int) -> int | None:
    """--max_seq_len's default: `shape`'s (the model's context) where `usable` bytes hold
    `slots` slots and `sequences` full-length sequences (`holds`, `context_slots`), else the
    longest that does (see `longest_seq_len`); None where none does."""
    def fits(candidate: Shape) -> bool:
        return holds(candidate, usable, slots, sequences)
    return shape.max_seq_len if fits(shape) else longest_seq_len(shape, fits)


def gib(size: int) -> str:
    return f"{size / GIB:.2f}"
