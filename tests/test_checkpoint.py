import pytest
import torch

from llama_gen.errors import UserError
from llama_gen.model.args import ModelArgs
from llama_gen.model.checkpoint import (Checkpoint, _slice_across_shards, check_model_parallel_size,
                                        find_shards)
from llama_gen.testing.tiny import TINY_LLAMA2, TINY_LLAMA3, random_weights, write_checkpoint

VOCAB = 96
CPU = torch.device("cpu")


def tiny_args(params):
    return ModelArgs.from_params({**params, "vocab_size": VOCAB})


def test_written_shards_follow_meta_layout(tmp_path):
    """Meta splits column-parallel weights on dim 0, row-parallel on dim 1, and the embedding on
    dim 1 (Llama 2) or dim 0 (Llama 3); norms are whole in every shard."""
    for params, vocab_parallel, embedding in ((TINY_LLAMA2, False, (VOCAB, 32)),
                                              (TINY_LLAMA3, True, (VOCAB // 2, 64))):
        args = tiny_args(params)
        write_checkpoint(tmp_path / "c", {**params, "vocab_size": VOCAB}, random_weights(args),
                         2, vocab_parallel)
        shard = torch.load(tmp_path / "c" / "consolidated.01.pth", weights_only=True)
        hidden, kv = args.ffn_hidden_dim, args.kv_heads * args.head_dim
        assert shard["tok_embeddings.weight"].shape == embedding
        assert shard["layers.0.attention.wq.weight"].shape == (32, 64)
        assert shard["layers.0.attention.wk.weight"].shape == (kv // 2, 64)
        assert shard["layers.0.attention.wo.weight"].shape == (64, 32)
        assert shard["layers.1.feed_forward.w1.weight"].shape == (hidden // 2, 64)
        assert shard["layers.1.feed_forward.w2.weight"].shape == (64, hidden // 2)
        assert shard["output.weight"].shape == (VOCAB // 2, 64)
        assert shard["norm.weight"].shape == (64,)


@pytest.mark.parametrize("params, vocab_parallel", [(TINY_LLAMA2, False), (TINY_LLAMA3, True)])
@pytest.mark.parametrize("n_shards, mp_size", [(1, 1), (2, 1), (1, 2), (2, 2), (2, 4), (4, 2)])
def test_reshard_gives_each_rank_its_slice_of_the_full_weight(tmp_path, params, vocab_parallel,
                                                              n_shards, mp_size):
    args = tiny_args(params)
    full = random_weights(args, seed=3)
    write_checkpoint(tmp_path, {**params, "vocab_size": VOCAB}, full, n_shards, vocab_parallel,
                     dtype=torch.float32, rope_freqs=True)
    ckpt = Checkpoint.open(tmp_path, args, vocab_parallel_if_unsplit=vocab_parallel)
    assert ckpt.embedding_split_dim == (0 if vocab_parallel else 1)
    slices = [ckpt.state_dict_for(r, mp_size, CPU, torch.float32) for r in range(mp_size)]
    assert "rope.freqs" not in slices[0]
    for key, weight in full.items():
        if weight.dim() == 1:
            assert all(torch.equal(s[key], weight) for s in slices)
            continue
        dims = [d for d in range(2) if slices[0][key].shape[d] != weight.shape[d]]
        dim = dims[0] if dims else 0
        assert torch.equal(torch.cat([s[key] for s in slices], dim=dim), weight), key


def test_slice_across_uneven_groupings():
    full = torch.arange(24).reshape(12, 2)
    for n_pieces in (1, 2, 3, 4, 6):
        pieces = list(full.chunk(n_pieces))
        for size in (1, 2, 3, 4, 6, 12):
            got = [_slice_across_shards(pieces, 0, r, size) for r in range(size)]
            assert all(torch.equal(g, w) for g, w in zip(got, full.chunk(size))), (n_pieces, size)


def test_model_parallel_size_must_cut_whole_heads():
    args = tiny_args(TINY_LLAMA3)  # 4 heads, 2 KV heads
    check_model_parallel_size(args, 2, 1)
    with pytest.raises(UserError, match="checkpoint has 1 shard.*model-parallel size 4 does not "
                                        "divide n_kv_heads 2"):
        check_model_parallel_size(args, 4, 1)
    with pytest.raises(UserError, match="size 3 does not divide n_heads 4"):
        check_model_parallel_size(args, 3, 2)
    odd_vocab = ModelArgs.from_params({**TINY_LLAMA3, "vocab_size": VOCAB + 1})
    with pytest.raises(UserError, match="size 2 does not divide vocab_size 97"):
        check_model_parallel_size(odd_vocab, 2, 1)  # the output head splits the vocabulary


def write(tmp_path, n_shards=2, params=TINY_LLAMA2):
    args = tiny_args(params)
    write_checkpoint(tmp_path, {**params, "vocab_size": VOCAB}, random_weights(args), n_shards)
    return args


def test_missing_directory_and_shards(tmp_path):
    with pytest.raises(UserError, match="checkpoint directory not found"):
        find_shards(tmp_path / "nope")
    with pytest.raises(UserError, match="no consolidated.NN.pth shards"):
        find_shards(tmp_path)
    write(tmp_path, n_shards=3)
    (tmp_path / "consolidated.01.pth").unlink()
    with pytest.raises(UserError, match="consolidated.01.pth missing; a checkpoint of 3 shards "
                                        "needs all of them: copy the missing file"):
        find_shards(tmp_path)


def test_a_gap_in_the_numbering_names_every_missing_shard(tmp_path):
    args = write(tmp_path, n_shards=4)
    for i in (1, 2):
        (tmp_path / f"consolidated.{i:02d}.pth").unlink()
    with pytest.raises(UserError, match=r"shard\(s\) consolidated.01.pth, consolidated.02.pth "
                                        "missing; a checkpoint of 4 shards"):
        Checkpoint.open(tmp_path, args, False)


@pytest.mark.parametrize("params, vocab_parallel", [(TINY_LLAMA2, False), (TINY_LLAMA3, True)])
@pytest.mark.parametrize("total, kept", [(2, 1), (4, 2), (4, 3)])
def test_shards_missing_at_the_end_are_named_not_a_shape(tmp_path, params, vocab_parallel, total,
                                                         kept):
    """No gap in the numbering, but every weight is 1/total of params.json's: the count the
    slices belong to and the missing files are named, whichever way the embedding is split."""
    args = tiny_args(params)
    write_checkpoint(tmp_path, {**params, "vocab_size": VOCAB}, random_weights(args), total,
                     vocab_parallel_embedding=vocab_parallel)
    for i in range(kept, total):
        (tmp_path / f"consolidated.{i:02d}.pth").unlink()
    missing = ", ".join(f"consolidated.{i:02d}.pth" for i in range(kept, total))
    for vocab_parallel_if_unsplit in (False, True):
        with pytest.raises(UserError) as e:
            Checkpoint.open(tmp_path, args, vocab_parallel_if_unsplit)
        message = str(e.value)
        assert "\n" not in message
        assert f"{kept} shard(s) found" in message
        assert f"seems to have {total} shards, and {missing} " in message
        assert "copy" in message and "has shape" not in message


def test_shards_that_disagree(tmp_path):
    args = write(tmp_path)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["layers.1.attention.wv.weight"] = shard["layers.1.attention.wv.weight"][:-1]
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(UserError, match=r"consolidated.01.pth: layers.1.attention.wv.weight has "
                                        r"shape \(31, 64\), expected \(32, 64\)"):
        Checkpoint.open(tmp_path, args, False)


def test_params_that_do_not_match_the_shards(tmp_path):
    write(tmp_path)
    deeper = tiny_args({**TINY_LLAMA2, "n_layers": 3})
    with pytest.raises(UserError, match="keys do not match params.json.*missing layers.2"):
        Checkpoint.open(tmp_path, deeper, False)
    wider = tiny_args({**TINY_LLAMA2, "dim": 128, "n_heads": 8})
    with pytest.raises(UserError, match="tok_embeddings.weight has shape"):
        Checkpoint.open(tmp_path, wider, False)


class NotATensor:
    pass


def test_files_that_are_not_weights_are_refused_without_unpickling(tmp_path):
    args = write(tmp_path, n_shards=1)
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="consolidated.00.pth: cannot be read"):
        Checkpoint.open(tmp_path, args, False)
    torch.save({"x": NotATensor()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(UserError, match="cannot be read as a PyTorch checkpoint"):
        Checkpoint.open(tmp_path, args, False)


@pytest.mark.parametrize("bf16_in_hardware, want", [(True, torch.bfloat16), (False, torch.float16)])
def test_default_dtype_is_bf16_on_gpus_that_have_it_else_fp16_and_fp32_on_the_cpu(
        monkeypatch, bf16_in_hardware, want):
    from llama_gen.job.build import resolve_dtype
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: bf16_in_hardware)
    assert resolve_dtype(None, torch.device("cuda")) == want
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
