"""Devices and the model-parallel layers' shapes: what each process builds before a checkpoint
fills it. (The layers' collectives run under torchrun in test_cli.py.)"""
import pytest
import torch

from llama_gen.args import ModelArgs
from llama_gen.errors import UserError
from llama_gen.model import Transformer
from llama_gen.parallel import (ColumnParallelLinear, Launch, ParallelEmbedding, ParallelLayers,
                                RowParallelLinear, VocabParallelEmbedding, launch_env,
                                pick_device)
from llama_gen.tiny import TINY_LLAMA3


def test_device_defaults_to_this_process_gpu_else_the_cpu():
    assert pick_device(local_rank=0, local_world_size=1, gpus=0) == torch.device("cpu")
    assert pick_device(local_rank=1, local_world_size=2, gpus=4) == torch.device("cuda", 1)
    # Where each process sees only its own GPU (CUDA_VISIBLE_DEVICES per process), it is cuda:0.
    assert pick_device(local_rank=3, local_world_size=4, gpus=1) == torch.device("cuda", 0)
    assert pick_device(1, 2, gpus=2, device="cpu") == torch.device("cpu")


def test_cuda_without_an_index_is_this_process_gpu():
    assert pick_device(2, 4, gpus=4, device="cuda") == torch.device("cuda", 2)
    assert pick_device(0, 1, gpus=1, device="cuda:0") == torch.device("cuda", 0)


@pytest.mark.parametrize("device, local_world_size, gpus, message", [
    ("cuda", 1, 0, "torch sees no CUDA GPU here"),
    ("cuda:2", 1, 2, "this machine has 2 GPU(s), cuda:0 to cuda:1"),
    ("cuda:0", 2, 2, "puts all 2 processes of this machine on one GPU"),
    ("gpu", 1, 1, "--device 'gpu' is not a device"),
])
def test_impossible_devices_are_user_errors(device, local_world_size, gpus, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pick_device(0, local_world_size, gpus, device)


def test_launch_env_reads_torchrun_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launch_env() == Launch(0, 1, 0, 1)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert launch_env() == Launch(5, 8, 1, 4)
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(UserError, match="must be integers"):
        launch_env()


def test_layers_hold_this_rank_slice_in_meta_layout():
    """Rank 1 of 2: column layers split the outputs (dim 0), row layers the inputs (dim 1), the
    Llama 2 embedding its width, the Llama 3 embedding its vocabulary (rows 48..95 here)."""
    assert ColumnParallelLinear(64, 32, parts=2).weight.shape == (16, 64)
    assert RowParallelLinear(32, 64, parts=2).weight.shape == (64, 16)
    assert ParallelEmbedding(96, 64, parts=2).weight.shape == (96, 32)
    vocab = VocabParallelEmbedding(96, 64, parts=2, rank=1)
    assert vocab.weight.shape == (48, 64)
    assert (vocab.vocab_start_index, vocab.vocab_end_index) == (48, 96)


def test_a_built_model_takes_no_memory_until_the_checkpoint_fills_it(single_process):
    """Every weight a checkpoint holds but the norms' starts on the meta device (no memory, no
    time however large the model), so loading never holds two copies."""
    args = ModelArgs.from_params({**TINY_LLAMA3, "vocab_size": 96})
    model = Transformer(args, ParallelLayers(vocab_parallel_embedding=True))
    placed = {name: p.device.type for name, p in model.named_parameters()}
    assert {d for name, d in placed.items() if "norm" not in name} == {"meta"}
    assert len(placed) == 2 + 9 * args.n_layers + 1  # embedding, head, final norm; 9 per block
