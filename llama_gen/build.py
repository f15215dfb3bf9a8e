"""From a checkpoint directory to a ready model and engine on this process's device."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .args import ModelArgs
from .checkpoint import Checkpoint, check_model_parallel_size, find_shards
from .errors import UserError
from .engine import Engine
from .model import Transformer
from . import distributed
from .distributed import Dist
from .layers import ParallelLayers
from .settings import Settings
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
    return default_model_parallel_size(world_size, len(find_shards(settings.ckpt_dir)))


def read_model_args(ckpt_dir: Path, tokenizer: Tokenizer) -> ModelArgs:
    params_path = ckpt_dir / "params.json"
    return ModelArgs.from_file(params_path).with_vocab_size(tokenizer.n_words, str(params_path))


def load_model(ckpt_dir: Path, tokenizer: Tokenizer, dist: Dist, dtype: torch.dtype) -> Transformer:
    start = time.perf_counter()
    args = read_model_args(ckpt_dir, tokenizer)
    n_shards = len(find_shards(ckpt_dir))
    check_model_parallel_size(args, dist.model_parallel_size, n_shards)
    checkpoint = Checkpoint.open(ckpt_dir, args,
                                 vocab_parallel_if_unsplit=tokenizer.kind == "tiktoken")
    model = Transformer(args, ParallelLayers(checkpoint.embedding_split_dim == 0))
    state = checkpoint.state_dict_for(dist.model_parallel_rank, dist.model_parallel_size,
                                      dist.device, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    if dist.rank == 0:
        log.info("loaded %s (%d shard(s), model parallel %d, %s) in %.1fs", ckpt_dir, n_shards,
                 dist.model_parallel_size, str(dtype).removeprefix("torch."),
                 time.perf_counter() - start)
    return model


def make_engine(settings: Settings, model: Transformer, tokenizer: Tokenizer, dist: Dist,
                stop_ids: frozenset[int]):
    """The engine --scheduler names, over this rank's model, stopping at `stop_ids`."""
    if settings.scheduler == "static":
        from .baseline import StaticEngine
        return StaticEngine(model, stop_ids, settings.max_batch_size, settings.max_seq_len,
                            tokenizer)
    if settings.compile and dist.rank == 0:
        log.info("--compile: the first decode steps compile the model (a minute or more for "
                 "large models)%s", "" if dist.device.type == "cuda" else
                 "; on the CPU the compiled step is not faster than the eager one")
    return Engine(model, stop_ids, settings.max_batch_size, settings.max_seq_len,
                  tokenizer=tokenizer, compile=settings.compile)
