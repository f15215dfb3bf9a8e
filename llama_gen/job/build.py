"""From a checkpoint directory to a ready model and engine on this process's device: the
model's args and tokenizer checked together, this rank's weights loaded (quantized where asked),
and the engine over a cache `sizing` sized."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..engine import memory
from ..engine.engine import Engine
from ..engine.memory import Sizing
from ..errors import UserError
from ..model.args import ModelArgs
from ..model.checkpoint import check_model_parallel_size
from ..model.folder import (config_path, open_checkpoint, read_model_config, shard_count,
                            vocabulary_rows)
from ..model.hf_checkpoint import HFCheckpoint
from ..model.layers import ParallelLayers
from ..model.quantize import quantized_state
from ..model.transformer import Transformer
from ..runtime import distributed
from ..runtime.distributed import Dist
from ..settings import Settings
from ..text.tokenizer import Tokenizer, find_tokenizer, load_tokenizer
from .sizing import compiles_decode

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, torch_name) for name, (torch_name, _) in memory.DTYPES.items()}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype by name; by default bf16 on GPUs that have it in hardware, fp16 on other GPUs
    (V100, T4: emulated bf16 is slow, and fp32 would double the memory), fp32 on the CPU."""
    if name is None:
        if device.type != "cuda":
            return torch.float32
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if bf16_ok else torch.float16
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_model_parallel_size(world_size: int, n_shards: int) -> int:
    """One model copy per shard set where the processes allow it, else all processes share one."""
    return n_shards if world_size % n_shards == 0 else world_size


def model_parallel_size(settings: Settings) -> int:
    """--model_parallel_size, or by default one model copy per shard set where it fits."""
    if settings.model_parallel_size is not None:
        return settings.model_parallel_size
    world_size = distributed.launch_env().world_size
    return default_model_parallel_size(world_size, shard_count(settings.ckpt_dir))


def read_params(ckpt_dir: Path, tokenizer: Tokenizer | None = None,
                tokenizer_path: Path | None = None) -> ModelArgs:
    """The model's shape (params.json's, or config.json's in a Hugging Face folder) with its
    vocabulary: vocab_size -1 (Llama 1/2) is the tokenizer's, and a given one must agree with
    it. `tokenizer`: the run's, which where params.json leaves the vocabulary to it must have
    the checkpoint's output rows; without one (`llama-gen plan`, which reads no weights) the
    tokenizer at `tokenizer_path` (default: in ckpt_dir or its parent) is read only where the
    vocabulary needs it: vocab_size -1, or a path given."""
    path = config_path(ckpt_dir)
    args = read_model_config(ckpt_dir)
    if tokenizer is not None and args.vocab_size == -1:
        check_tokenizer_fits(ckpt_dir, tokenizer)
    elif tokenizer is None and (args.vocab_size == -1 or tokenizer_path is not None):
        tokenizer = load_tokenizer(find_tokenizer(ckpt_dir, tokenizer_path))
    return args if tokenizer is None else args.with_vocab_size(tokenizer.n_words, str(path))


def read_model_args(ckpt_dir: Path, tokenizer: Tokenizer,
                    rope_scaling_factor: float | None = None) -> ModelArgs:
    """A run's model: its config's shape with the tokenizer's vocabulary (`read_params`) and
    RoPE scaled by --rope_scaling_factor where given. Logs the RoPE scaling in use."""
    args = read_params(ckpt_dir, tokenizer)
    release_factor, why = args.rope_scaling()
    path = config_path(ckpt_dir)
    hf = path.name == "config.json"  # a Hugging Face folder, told by its name, not its shape
    name = path.parent.resolve().name if hf or args.family is None else args.family
    why = "as config.json says" if hf else why
    args = args.with_rope_scaling(rope_scaling_factor, str(path))
    if rope_scaling_factor is not None:
        log.info("RoPE scaled by %g (--rope_scaling_factor; without it: %g, %s)",
                 rope_scaling_factor, release_factor, why)
    elif release_factor is not None:
        log.info("%s: RoPE scaled by %g, %s", name, release_factor, why)
    return args


def check_tokenizer_fits(ckpt_dir: Path, tokenizer: Tokenizer) -> None:
    """The tokenizer's vocabulary is the checkpoint's output rows: else it is the wrong one."""
    rows = vocabulary_rows(ckpt_dir)
    if rows is not None and rows != tokenizer.n_words:
        raise UserError(f"{tokenizer.path}: this tokenizer has {tokenizer.n_words} tokens, but "
                        f"the checkpoint in {ckpt_dir} was trained with {rows} (its output "
                        "layer's rows): pass the tokenizer that belongs to this checkpoint with "
                        "--tokenizer_path")


def load_model(ckpt_dir: Path, tokenizer: Tokenizer, dist: Dist, dtype: torch.dtype,
               args: ModelArgs | None = None, quantize: str | None = None,
               quantize_head: bool = False) -> Transformer:
    """This rank's slice of the checkpoint's weights in a model on its device; `args` as
    `read_model_args` gives them (read again where not given). --quantize int8 quantizes the
    blocks' linear layers (and with --quantize_head the head) slice by slice as they load."""
    start = time.perf_counter()
    args = args or read_model_args(ckpt_dir, tokenizer)
    n_shards = shard_count(ckpt_dir)
    check_model_parallel_size(args, dist.model_parallel_size, n_shards)
    # An unsplit embedding is split as Meta's shards split it: on the vocabulary for Llama 3.
    weights = open_checkpoint(ckpt_dir, args, tokenizer.kind == "tiktoken")
    int8 = quantize == "int8"
    model = Transformer(args, ParallelLayers(weights.embedding_split_dim == 0, int8=int8,
                                             int8_head=int8 and quantize_head))
    state = quantized_state(model, weights.slices(dist.model_parallel_rank,
                                                  dist.model_parallel_size), dist.device, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the model holds the weights now: fusing frees each separate one
    model.tie_head()
    model.fuse()
    model.requires_grad_(False).eval()
    if dist.rank == 0:
        files = (f"{len(weights.files)} weight file(s)" if isinstance(weights, HFCheckpoint)
                 else f"{n_shards} shard(s)")
        log.info("loaded %s (%s, model parallel %d, %s%s) in %.1fs", ckpt_dir, files,
                 dist.model_parallel_size, str(dtype).removeprefix("torch."),
                 f", {quantize} weights" if quantize else "", time.perf_counter() - start)
    return model


def make_engine(settings: Settings, model: Transformer, tokenizer: Tokenizer, dist: Dist,
                stop_ids: frozenset[int], sizing: Sizing):
    """The engine --scheduler names, over this rank's model, stopping at `stop_ids`, with
    `sizing`'s sequences at once and KV cache (see `size_cache`)."""
    if settings.scheduler == "static":
        from ..engine.baseline import StaticEngine
        return StaticEngine(model, stop_ids, sizing.max_batch_size, settings.max_seq_len,
                            tokenizer, kv_cache_tokens=sizing.kv_cache_tokens)
    compile = compiles_decode(settings, dist.device)
    engine = Engine(model, stop_ids, sizing.max_batch_size, settings.max_seq_len,
                    tokenizer=tokenizer, compile=compile,
                    kv_cache_tokens=sizing.kv_cache_tokens, kv_block_size=settings.kv_block_size)
    if compile:
        seconds = engine.runner.warm_up()
        if dist.rank == 0:
            kind = "compiled and recorded as CUDA graphs" if dist.device.type == "cuda" else \
                "compiled (on the CPU not faster than eager)"
            log.info("decode step %s for batch sizes %s in %.1f s%s", kind,
                     ", ".join(map(str, engine.runner.decoder.buckets)), seconds,
                     "" if settings.compile else " (--compile auto; false turns it off)")
    return engine


