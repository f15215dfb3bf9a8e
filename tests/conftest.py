"""Shared fixtures: one in-process model-parallel group of size 1, tiny checkpoints on disk, and
the tiny SentencePiece and tiktoken tokenizers."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from llama_gen.job.driver import StopRequested
from llama_gen.runtime import distributed
from llama_gen.testing.tiny import make_tiny_model
from llama_gen.testing.tiny_tokenizers import build_sentencepiece_model, build_tiktoken_model
from llama_gen.text.tokenizer import Tokenizer, load_tokenizer

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def single_process():
    """torch.distributed and fairscale initialised as one process on the CPU (gloo)."""
    dist = distributed.init_distributed(1, device="cpu")
    yield dist
    distributed.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """Float32 tiny checkpoints keyed by (family, n_shards); same weights across shard counts."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {(family, n): make_tiny_model(root / f"{family}-{n}", family, n, dtype=torch.float32)
            for family in ("llama2", "llama3") for n in (1, 2)}


@pytest.fixture
def checkpoint_copy(tiny_checkpoints, tmp_path):
    """A private, editable copy of a tiny checkpoint, for tests that damage it."""
    def copy(family: str = "llama2", n_shards: int = 1) -> Path:
        dst = tmp_path / f"{family}-{n_shards}"
        shutil.copytree(tiny_checkpoints[(family, n_shards)], dst)
        return dst
    return copy


@pytest.fixture
def stop():
    """A StopRequested, with the test runner's own signal handlers put back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield StopRequested()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sentencepiece_model(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.fixture(scope="session")
def tik_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiktoken_model(tmp_path_factory.mktemp("tik") / "tokenizer.model")


@pytest.fixture(scope="session")
def spm(spm_path: Path) -> Tokenizer:
    return load_tokenizer(spm_path)


@pytest.fixture(scope="session")
def tik(tik_path: Path) -> Tokenizer:
    return load_tokenizer(tik_path)
