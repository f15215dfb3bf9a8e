"""--quantize int8: the rounding bound, the int8 product against the dequantized one, the
fused layers, the head and embedding, the plan's bytes, and the same numbers at model parallel
1 and 2 (scales, weights, greedy tokens and logprobs) under torchrun."""
from __future__ import annotations

import json
from pathlib import Path

import near_ties
import pytest
import torch
from runs import assert_one_line_error, job_args, launch, read_output, run, write_prompts

from llama_gen.engine.memory import weight_bytes
from llama_gen.job.build import load_model
from llama_gen.model import kernels
from llama_gen.model.checkpoint import Checkpoint
from llama_gen.model.kernels import dequantized_blocks_linear, int8_linear
from llama_gen.model.layers import ParallelLayers
from llama_gen.model.quantize import dequantize, int8_layers, quantize_rows, quantized_state
from llama_gen.model.transformer import Transformer
from llama_gen.text.tokenizer import load_tokenizer

FAMILY = "llama3"  # GQA, a vocabulary-split embedding: the harder split
TEXT = [3, 17, 250, 9, 41, 77, 5, 120, 33, 64, 2, 199, 8, 90, 150, 11, 60, 240, 7, 30, 101]
# The teacher-forced logprob difference int8 may make on the tiny model (random weights,
# logits of about 1 nat spread), derived from the rounding: each weight moves by at most half
# its row's scale, max|w| / 254; uniform rounding moves a product's output by s / sqrt(12) per
# unit of |x|, about 0.6% of its RMS for these Gaussian rows (max|w| is about 2.5 RMS). 14
# products over 2 blocks compound that to a few percent of the logits: at most a few 0.01 nats.
# Measured: 0.026 (llama3), 0.022 (llama2). A 4-bit rounding (15 levels) must exceed it.
LOGPROB_BOUND = 0.1


def slices_of(model: Transformer, ckpt: Path, tokenizer) -> Checkpoint:
    return Checkpoint.open(ckpt, model.args, vocab_parallel_if_unsplit=tokenizer.kind == "tiktoken")


@pytest.fixture(scope="module")
def loaded(single_process, tiny_checkpoints):
    """The tiny model in float32: full precision, int8 blocks, int8 blocks and head."""
    ckpt = tiny_checkpoints[(FAMILY, 1)]
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    kinds = {"fp32": {}, "int8": {"quantize": "int8"},
             "int8_head": {"quantize": "int8", "quantize_head": True}}
    return {name: load_model(ckpt, tokenizer, single_process, torch.float32, **kw)
            for name, kw in kinds.items()}


def logprobs(model: Transformer, tokens: list[int] = TEXT) -> torch.Tensor:
    """Each token's teacher-forced logprob after the ones before it."""
    every = near_ties.teacher_forced_logits(model, tokens).log_softmax(-1)
    return every[:-1].gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def test_each_weight_rounds_to_within_half_its_rows_scale():
    """|w - q s| <= s / 2 for every element, in every scale dtype: the bound the rest rests
    on. A row's largest |w| becomes 127 exactly (but for fp16 scales under its smallest
    normal number), and an all-zero row stays zero."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 96, generator=gen) * torch.logspace(-3, 1, 40)[:, None]
    weight[5] = 0
    weight[7, 3] = -10 * weight[7].abs().max()  # a negative extreme
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, scales = quantize_rows(weight, weight.abs().amax(dim=1), dtype)
        assert q.dtype == torch.int8 and scales.dtype == dtype
        error = (weight - dequantize(q, scales)).abs()
        assert (error <= scales.float()[:, None] / 2 * (1 + 1e-6)).all(), dtype
        # fp16 has no normal scale under 6.1e-5: rows under 127 times that round coarser
        fine = weight.abs().amax(dim=1) >= 127 * torch.finfo(dtype).tiny
        assert not q[5].any() and (q.abs().amax(dim=1)[fine] == 127).all(), dtype
        assert q[7, 3] == -127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_int8_product_is_the_dequantized_product(dtype, monkeypatch):
    """`int8_linear` (on the CPU torch's int8 kernel for bf16, dequantized row blocks for
    float32) and the dequantized row blocks alone (here 16 rows a block)
    equal x @ dequantized.T to the dtype's rounding; for a 3-D x and a transposed view too
    (the CPU's `linear` returns those)."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(80, 96, generator=gen) / 10
    q, scales = quantize_rows(weight, weight.abs().amax(dim=1), dtype)
    want_weight = dequantize(q, scales)
    monkeypatch.setattr(kernels, "DEQUANTIZED_BLOCK_ELEMENTS", 16 * 96)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for x in (torch.randn(1, 96, generator=gen), torch.randn(2, 5, 96, generator=gen),
              torch.randn(96, 7, generator=gen).T):
        x = x.to(dtype)
        want = (x.float() @ want_weight.T)
        got = int8_linear(x, q, scales)
        assert got.dtype == dtype and got.shape == (*x.shape[:-1], 80)
        torch.testing.assert_close(got.float(), want, **tol)
        blocks = dequantized_blocks_linear(x.reshape(-1, 96), q, scales)
        torch.testing.assert_close(blocks.float(), want.reshape(-1, 80), **tol)


def test_loaded_int8_weights_are_the_checkpoints_within_half_a_scale(loaded):
    """Every linear layer of the blocks is int8 with a scale per row, and within half a scale
    of the checkpoint's weight; the embedding is the checkpoint's, bit for bit, and so is the
    head without --quantize_head."""
    fp, int8 = loaded["fp32"], loaded["int8"]
    layers = int8_layers(int8)
    assert len(layers) == 7 * fp.args.n_layers and "output.weight" not in layers
    weights = fp.state_dict()
    for key, layer in layers.items():
        assert layer.weight.dtype == torch.int8 and layer.scales.dtype == torch.float32, key
        error = (dequantize(layer.weight, layer.scales) - weights[key]).abs()
        assert (error <= layer.scales[:, None] / 2 * (1 + 1e-6)).all(), key
    for model in (int8, loaded["int8_head"]):
        assert torch.equal(model.tok_embeddings.weight, fp.tok_embeddings.weight)
    assert torch.equal(int8.output.weight, fp.output.weight)


def test_quantize_head_puts_the_head_in_int8_within_its_rounding_bound(loaded):
    """With --quantize_head the head is int8 too. The blocks being the same int8 ones, the
    hidden states h are the same, and each logit moves by at most (s / 2) |h|_1: a logprob,
    a logit less a log-sum-exp (which moves no more than the largest logit), by at most
    twice that."""
    int8, head = loaded["int8"], loaded["int8_head"]
    assert head.output.weight.dtype == torch.int8 and int8.output.weight.dtype == torch.float32
    moved = (logprobs(head) - logprobs(int8)).abs()
    assert moved.max() > 1e-4  # the head changed
    step = head.make_step(torch.arange(len(TEXT))[None], slice(0, 1), len(TEXT),
                          every_token=True)
    with torch.inference_mode():
        hidden = head.final_hidden(torch.tensor([TEXT]), step)[:-1]  # (N - 1, dim)
    bound = 2 * (head.output.scales.max() / 2) * hidden.abs().sum(dim=-1)
    assert (moved <= bound + 1e-5).all()


def test_teacher_forced_logprobs_stay_within_the_stated_bound(loaded, tiny_checkpoints):
    """int8 blocks move the teacher-forced logprobs by less than LOGPROB_BOUND (see there);
    the same model rounded to 4 bits (15 levels per row) moves them by more: the bound is no
    wider than int8 needs."""
    fp, int8 = loaded["fp32"], loaded["int8"]
    moved = (logprobs(int8) - logprobs(fp)).abs().max()
    assert 1e-4 < moved < LOGPROB_BOUND
    coarse = Transformer(fp.args, ParallelLayers(vocab_parallel_embedding=True))
    state = dict(fp.state_dict())
    for key in int8_layers(int8):
        w = state[key]
        q, scales = quantize_rows(w, w.abs().amax(dim=1) * 127 / 7, torch.float32)
        state[key] = dequantize(q, scales)
    coarse.load_state_dict(state, strict=True, assign=True)
    assert (logprobs(coarse.eval()) - logprobs(fp)).abs().max() > LOGPROB_BOUND


def test_fused_int8_columns_stack_weights_and_scales_and_multiply_as_the_separate_ones(
        loaded, tiny_checkpoints):
    """After `fuse` wq/wk/wv (w1/w3) are int8 views of one int8 weight with their scales
    stacked beside it, and the fused product is the separate layers' products; a cast keeps
    the weights int8 and the views views, and casts the scales."""
    ckpt = tiny_checkpoints[(FAMILY, 1)]
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    fused = loaded["int8"]
    separate = Transformer(fused.args, ParallelLayers(vocab_parallel_embedding=True, int8=True))
    separate.load_state_dict(quantized_state(separate, slices_of(fused, ckpt, tokenizer).slices(
        0, 1), torch.device("cpu"), torch.float32), strict=True, assign=True)
    for block in fused.layers:
        for module in (block.attention, block.feed_forward):
            columns = [getattr(module, name) for name in module.COLUMNS]
            assert module.fused.dtype == torch.int8
            assert torch.equal(module.fused_scales, torch.cat([c.scales for c in columns]))
            assert {c.weight.untyped_storage().data_ptr() for c in columns} == {
                module.fused.untyped_storage().data_ptr()}
    torch.testing.assert_close(logprobs(fused), logprobs(separate.eval()), atol=1e-6, rtol=0)
    cast = Transformer(fused.args, ParallelLayers(vocab_parallel_embedding=True, int8=True))
    cast.load_state_dict(fused.state_dict(), strict=True, assign=True)
    cast.fuse()
    cast.to(torch.bfloat16)
    attention = cast.layers[0].attention
    assert attention.fused.dtype == torch.int8 and attention.fused_scales.dtype == torch.bfloat16
    assert attention.wq.weight.untyped_storage().data_ptr() == \
        attention.fused.untyped_storage().data_ptr()
    assert attention.wk.scales.dtype == torch.bfloat16


def held_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def test_the_plan_counts_the_bytes_an_int8_model_holds(loaded):
    """`weight_bytes` with --quantize int8 is what the loaded model holds, weights and
    scales, with and without the head; about a quarter of float32's here, where the head and
    embedding (in float32) are much of the tiny model."""
    args = loaded["fp32"].args
    for name, head in (("int8", False), ("int8_head", True)):
        assert weight_bytes(args, 1, 4, "int8", head) == held_bytes(loaded[name].state_dict())
    assert weight_bytes(args, 1, 4) == held_bytes(loaded["fp32"].state_dict())


AT_MP_2 = """
import sys, torch
from pathlib import Path
from llama_gen.job.build import load_model
from llama_gen.runtime import distributed
from llama_gen.text.tokenizer import load_tokenizer

dist = distributed.init_distributed(2, device="cpu")
ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
model = load_model(ckpt, load_tokenizer(ckpt / "tokenizer.model"), dist, torch.float32,
                   quantize="int8", quantize_head=True)
torch.save(model.state_dict(), out / f"state-{dist.rank}.pt")
distributed.shutdown()
"""


def test_model_parallel_2_quantizes_to_the_same_numbers(loaded, tiny_checkpoints, tmp_path):
    """Loaded at model parallel 2 (two shards into two ranks), each rank holds its slice of
    the int8 weights that model parallel 1 holds, bit for bit, and the same scales: a column
    layer its rows' scales, a row layer (wo, w2; split along its rows) all of them, agreed
    by the maximum over the group. The plan's bytes are each rank's."""
    proc = launch([str(tiny_checkpoints[(FAMILY, 2)]), str(tmp_path)], nproc=2, code=AT_MP_2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    whole = loaded["int8_head"].state_dict()
    for rank in (0, 1):
        part = torch.load(tmp_path / f"state-{rank}.pt", weights_only=True)
        assert part.keys() == whole.keys()
        for key in int8_layers(loaded["int8_head"]):
            scales = key.removesuffix("weight") + "scales"
            split = 1 if key.endswith(("wo.weight", "w2.weight")) else 0
            assert torch.equal(part[key], whole[key].chunk(2, dim=split)[rank]), key
            want = whole[scales] if split else whole[scales].chunk(2)[rank]
            assert torch.equal(part[scales], want), scales
        assert held_bytes(part) == weight_bytes(loaded["fp32"].args, 2, 4, "int8", True)


GREEDY = ["--temperature", "0", "--max_gen_len", "10", "--logprobs", "--max_seq_len", "64",
          "--quantize", "int8"]
PROMPTS = [{"prompt": "Hello world"}, {"prompt": "Guten Morgen, wie geht's?"},
           {"prompt": "a b c"}]


def assert_alike_greedy(model, tokenizer, got: dict, want: dict) -> None:
    """The same greedy tokens, or tokens that first differ where the int8 model's two most
    likely tokens are a near-tie; logprobs within ALIKE_ATOL up to there."""
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        j = near_ties.first_difference(g["token_ids"], w["token_ids"])
        torch.testing.assert_close(torch.tensor(g["logprobs"][:j]), torch.tensor(w["logprobs"][:j]),
                                   atol=near_ties.ALIKE_ATOL, rtol=0)
        if g["token_ids"] != w["token_ids"]:
            prefix = tokenizer.encode(w["prompt"], bos=True) + w["token_ids"][:j]
            lp = near_ties.teacher_forced_logits(model, prefix)[-1].log_softmax(-1)
            gap = (lp[g["token_ids"][j]] - lp[w["token_ids"][j]]).abs()
            assert gap < near_ties.NEAR_TIE, f"{key}: a real difference at token {j}"


def test_int8_runs_alike_at_model_parallel_1_and_2_and_refuses_another_quantize_on_resume(
        loaded, tiny_checkpoints, tmp_path):
    """Through the CLI: one process with the static scheduler, and two under torchrun (model
    parallel 2) with the continuous one. The int8 numbers being the same (above), only the
    float32 sums' order differs: the greedy tokens are the same but at near-ties, and the
    logprobs within ALIKE_ATOL as for any two splits. Resuming the first output without
    --quantize is refused, naming it."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    lines = {}
    for nproc, shards, extra in ((None, 1, ["--scheduler", "static"]), (2, 2, [])):
        out = tmp_path / f"out-{nproc}.jsonl"
        ckpt = tiny_checkpoints[(FAMILY, shards)]
        result = run([*job_args(ckpt, prompts, out), *GREEDY, *extra], nproc)
        assert result.returncode == 0, result.stderr
        assert "int8 weights" in result.stderr
        lines[nproc] = read_output(out)
    tokenizer = load_tokenizer(tiny_checkpoints[(FAMILY, 1)] / "tokenizer.model")
    assert_alike_greedy(loaded["int8"], tokenizer, lines[2], lines[None])
    differs = [abs(a - b) for key, line in lines[None].items()
               for a, b in zip(line["logprobs"], logprobs(
                   loaded["fp32"], tokenizer.encode(line["prompt"], bos=True)
                   + line["token_ids"])[-len(line["token_ids"]):].tolist())]
    assert 1e-4 < max(differs) < LOGPROB_BOUND  # int8's, not float32's
    again = run([*job_args(tiny_checkpoints[(FAMILY, 1)], prompts, tmp_path / "out-None.jsonl"),
                 *GREEDY[:-2]])
    assert_one_line_error(again, 'quantize: "int8" -> null')


def test_scoring_in_int8_scores_with_the_int8_model(loaded, tiny_checkpoints, tmp_path):
    """`llama-gen score --quantize int8` gives the int8 model's teacher-forced logprobs."""
    ckpt = tiny_checkpoints[(FAMILY, 1)]
    prompts = write_prompts(tmp_path / "texts.jsonl", [{"text": "The quick brown fox."}])
    out = tmp_path / "scores.jsonl"
    result = run(["score", *job_args(ckpt, prompts, out), "--logprobs", "--quantize", "int8"])
    assert result.returncode == 0, result.stderr
    [line] = read_output(out).values()
    tokens = line["token_ids"]
    tokens = tokens if tokens[0] == load_tokenizer(ckpt / "tokenizer.model").bos_id else [
        load_tokenizer(ckpt / "tokenizer.model").bos_id, *tokens]
    want = logprobs(loaded["int8"], tokens)[-len(line["token_logprobs"]):]
    torch.testing.assert_close(torch.tensor(line["token_logprobs"]), want, atol=1e-5, rtol=0)
    assert json.dumps(line)  # a plain JSON line


def test_a_hugging_face_folder_quantizes_as_its_meta_layout(single_process, tmp_path):
    """A Llama 3.2-style folder (tied head, Q/K in transformers' layout) with --quantize int8
    --quantize_head holds, bit for bit, what the same weights in Meta's layout hold: the
    quantization sees Meta's rows whatever the folder's format."""
    from hf_folders import LLAMA32_ROPE, hf_llama, save_folder, save_meta_folder

    from llama_gen.job.build import read_params
    from llama_gen.model.args import ModelArgs
    from llama_gen.testing.tiny_tokenizers import build_tiktoken_model
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
              "norm_eps": 1e-5, "rope_theta": 500000.0}
    tiktoken = build_tiktoken_model(tmp_path / "tiktoken.model")
    tokenizer = load_tokenizer(tiktoken)
    reference = hf_llama(ModelArgs.from_params({**params, "vocab_size": tokenizer.n_words}),
                         tiktoken, LLAMA32_ROPE, tied=True, seed=1)
    folder = save_folder(reference, tmp_path / "hf", tiktoken, "original/tokenizer.model")
    args = read_params(folder, tokenizer)
    meta = save_meta_folder(reference, tmp_path / "meta", {
        **params, "vocab_size": args.vocab_size, "use_scaled_rope": True}, args, tiktoken, True)
    hf, from_meta = (load_model(f, tokenizer, single_process, torch.float32, quantize="int8",
                                quantize_head=True).state_dict() for f in (folder, meta))
    assert hf.keys() == from_meta.keys() and hf["output.weight"].dtype == torch.int8
    assert all(torch.equal(hf[key], from_meta[key]) for key in hf)
