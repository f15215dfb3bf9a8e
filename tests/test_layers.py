"""The model-parallel layers' shapes: what each process builds before a checkpoint fills it.
(Their collectives run under torchrun in test_cli.py.)"""
import json

import torch
from reference_models import build, config
from runs import launch

from llama_gen.model.args import ModelArgs
from llama_gen.model.layers import (ColumnParallelLinear, ParallelEmbedding, ParallelLayers,
                                    RowParallelLinear, VocabParallelEmbedding)
from llama_gen.model.transformer import Transformer
from llama_gen.testing.tiny import TINY_LLAMA3, random_weights


def test_layers_hold_this_rank_slice_in_meta_layout():
    """Rank 1 of 2: column layers split the outputs (dim 0), row layers the inputs (dim 1), the
    Llama 2 embedding its width, the Llama 3 embedding its vocabulary (rows 48..95 here)."""
    assert ColumnParallelLinear(64, 32, parts=2).weight.shape == (16, 64)
    assert RowParallelLinear(32, 64, parts=2).weight.shape == (64, 16)
    assert ParallelEmbedding(96, 64, parts=2).weight.shape == (96, 32)
    vocab = VocabParallelEmbedding(96, 64, parts=2, rank=1)
    assert vocab.weight.shape == (48, 64)
    assert (vocab.vocab_start_index, vocab.vocab_end_index) == (48, 96)


def test_int8_layers_hold_int8_weights_and_a_scale_per_row_they_hold():
    """Rank 1 of 2 in int8: a column layer holds half the rows and their scales; a row layer
    holds every row, half of each, and every row's scale (scales come from whole rows)."""
    column = ColumnParallelLinear(64, 32, parts=2, int8=True)
    row = RowParallelLinear(32, 64, parts=2, int8=True)
    assert (column.weight.shape, column.scales.shape) == ((16, 64), (16,))
    assert (row.weight.shape, row.scales.shape) == ((64, 16), (64,))
    assert column.weight.dtype == row.weight.dtype == torch.int8
    assert ColumnParallelLinear(64, 32, parts=2).scales is None


def test_a_built_model_takes_no_memory_until_the_checkpoint_fills_it(single_process):
    """Every weight a checkpoint holds but the norms' starts on the meta device (no memory, no
    time however large the model), so loading never holds two copies."""
    args = ModelArgs.from_params({**TINY_LLAMA3, "vocab_size": 96})
    model = Transformer(args, ParallelLayers(vocab_parallel_embedding=True))
    placed = {name: p.device.type for name, p in model.named_parameters()}
    assert {d for name, d in placed.items() if "norm" not in name} == {"meta"}
    assert len(placed) == 2 + 9 * args.n_layers + 1  # embedding, head, final norm; 9 per block



# --- fused column layers ----------------------------------------------------------------------

FUSED = {"attention": ("wq", "wk", "wv"), "feed_forward": ("w1", "w3")}


def storages(model: torch.nn.Module) -> dict[int, int]:
    """Bytes of each distinct storage behind the model's parameters and buffers."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*model.parameters(), *model.buffers()]}


def assert_views_of_fused(model: Transformer) -> None:
    """Each block's fused weights are its column layers' weights stacked, and those weights
    are views of them."""
    for block in model.layers:
        for part, names in FUSED.items():
            module = getattr(block, part)
            columns = [getattr(module, name).weight for name in names]
            assert torch.equal(module.fused, torch.cat(columns))
            assert {c.untyped_storage().data_ptr() for c in columns} == {
                module.fused.untyped_storage().data_ptr()}


def test_fused_model_keeps_meta_keys_and_holds_each_weight_once(single_process):
    """After `fuse`, state_dict() is the checkpoint's, key for key and value for value, and
    wq, wk, wv, w1, w3 are views of their block's fused weights: no byte held twice, and the
    parameters' bytes (bench's roofline, the load log) count the weights once."""
    args, vocab_parallel = config("gqa-theta")
    fused, separate = build(args, vocab_parallel), build(args, vocab_parallel, fuse=False)
    want, got = separate.state_dict(), fused.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    weight_bytes = sum(p.numel() * p.element_size() for p in separate.parameters())
    assert sum(p.numel() * p.element_size() for p in fused.parameters()) == weight_bytes
    assert sum(storages(fused).values()) == weight_bytes == sum(storages(separate).values())
    assert_views_of_fused(fused)


def test_casting_or_loading_a_fused_model_keeps_its_fused_weights_in_step(single_process):
    """`.to(dtype)` casts the fused weights with the views (and keeps them views); loading
    other weights into a fused model, assigned or copied, stacks them again: the fused
    product never multiplies by stale weights."""
    args, vocab_parallel = config("llama3.1-scaled")
    model = build(args, vocab_parallel)
    model.to(torch.bfloat16)
    assert model.layers[0].attention.fused.dtype == torch.bfloat16
    assert sum(storages(model).values()) == sum(
        p.numel() * p.element_size() for p in model.parameters())
    assert_views_of_fused(model)
    model.to(torch.float32)
    for assign in (True, False):
        other = random_weights(args, seed=1 + assign)
        model.load_state_dict(other, strict=True, assign=assign)
        assert_views_of_fused(model)
        assert torch.equal(model.layers[1].feed_forward.fused[:args.ffn_hidden_dim],
                           other["layers.1.feed_forward.w1.weight"])


EACH_RANK_FUSES = """
import json, sys, torch
from pathlib import Path
from llama_gen.job.build import load_model
from llama_gen.model.checkpoint import Checkpoint
from llama_gen.model.layers import ParallelLayers
from llama_gen.model.transformer import Transformer
from llama_gen.runtime import distributed
from llama_gen.text.tokenizer import load_tokenizer

dist = distributed.init_distributed(2, device="cpu")
out = Path(sys.argv[1])
for ckpt in map(Path, sys.argv[2:]):
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    fused = load_model(ckpt, tokenizer, dist, torch.float32)
    checkpoint = Checkpoint.open(ckpt, fused.args, tokenizer.kind == "tiktoken")
    separate = Transformer(fused.args, ParallelLayers(checkpoint.embedding_split_dim == 0))
    separate.load_state_dict(checkpoint.state_dict_for(dist.model_parallel_rank, 2, dist.device,
                                                       torch.float32), strict=True, assign=True)
    tokens = torch.arange(3, 40)
    logits = []
    for model in (fused, separate):
        model.setup_cache(1, len(tokens))
        step = model.make_step(torch.arange(len(tokens))[None], slice(0, 1), len(tokens),
                               fresh=True, every_token=True)
        with torch.inference_mode():
            logits.append(model(tokens[None], step))
    (out / f"{ckpt.name}-{dist.rank}.json").write_text(json.dumps({
        "ckpt": ckpt.name, "rank": dist.rank, "diff": (logits[0] - logits[1]).abs().max().item(),
        "sizes": [fused.layers[0].attention.fused_sizes, fused.layers[0].feed_forward.fused_sizes]}))
distributed.shutdown()
"""


def test_each_rank_fuses_its_own_shards_under_torchrun(tiny_checkpoints, tmp_path):
    """Model parallel 2 under torchrun, from two shards and resharded from one: each rank
    stacks its own rows of wq, wk, wv (and w1, w3), and the logits, gathered across the ranks,
    are the separate products' to fp32 rounding."""
    ckpts = [tiny_checkpoints[("llama3", 2)], tiny_checkpoints[("llama2", 1)]]
    proc = launch([str(tmp_path), *map(str, ckpts)], nproc=2, code=EACH_RANK_FUSES)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = [json.loads(path.read_text()) for path in tmp_path.glob("*.json")]
    assert sorted((r["ckpt"], r["rank"]) for r in lines) == sorted(
        (c.name, rank) for c in ckpts for rank in (0, 1))
    llama3 = ModelArgs.from_params({**TINY_LLAMA3, "vocab_size": 96})
    hd, hidden = llama3.head_dim, llama3.ffn_hidden_dim
    for line in lines:
        assert line["diff"] <= 1e-5, line
        if line["ckpt"] == ckpts[0].name:  # this rank's 2 of 4 query heads, 1 of 2 KV heads
            assert line["sizes"] == [[2 * hd, hd, hd], [hidden // 2, hidden // 2]]
