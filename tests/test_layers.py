"""The model-parallel layers' shapes: what each process builds before a checkpoint fills it.
(Their collectives run under torchrun in test_cli.py.)"""
from llama_gen.model.args import ModelArgs
from llama_gen.model.layers import (ColumnParallelLinear, ParallelEmbedding, ParallelLayers,
                                    RowParallelLinear, VocabParallelEmbedding)
from llama_gen.model.transformer import Transformer
from llama_gen.testing.tiny import TINY_LLAMA3


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
