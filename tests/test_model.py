"""The transformer against an independent implementation (Hugging Face's Llama), and the KV cache
against a full recompute.

Hugging Face's `LlamaForCausalLM` shares no code with ours: its RoPE rotates halves rather than
interleaved pairs (so q/k rows are permuted per head when converting), it computes Llama 3.1's
scaled frequencies itself, and it runs eager attention without a cache. Agreement to 1e-4 in fp32
on teacher-forced log-probabilities is what a Meta checkpoint run through both would show.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers  # a declared test dependency (pyproject's test extra): never skipped
from reference_models import (CONFIGS, PARITY_ATOL, build, config, echo_logprobs, hf_config,
                              hf_logits, random_tokens, teacher_forced)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from llama_gen.engine.passes import attention_chunks
from llama_gen.job.build import load_model, read_model_args
from llama_gen.model.args import ModelArgs
from llama_gen.model.layers import ParallelLayers
from llama_gen.model.transformer import Step, Transformer, rope_frequencies, rope_rotations
from llama_gen.text.tokenizer import load_tokenizer

CACHE_ATOL = 1e-5


parity_diffs: dict[str, float] = {}  # measured max |ours - HF|, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def report_parity_diffs():
    yield
    if parity_diffs:
        print("\nmax |logprob ours - HF| (fp32): " +
              ", ".join(f"{k}: {v:.2e}" for k, v in sorted(parity_diffs.items())))


# --- the reference: Hugging Face transformers ---------------------------------------------------


# --- ours, two ways in ---------------------------------------------------------------------------

def forward_all(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """One full forward over a fresh cache: logits (T, vocab)."""
    n = len(tokens)
    model.setup_cache(1, n)
    step = model.make_step(torch.arange(n)[None], slice(0, 1), kv_len=n, every_token=True)
    with torch.inference_mode():
        return model(tokens[None], step)


# --- parity ---------------------------------------------------------------------------------------

def test_tiny_rope_spans_all_three_llama31_bands():
    """Precondition of the scaled-RoPE parity test: head_dim 16 with theta 500000 puts inverse
    frequencies in the kept, interpolated and divided bands alike."""
    args, _ = config("llama3.1-scaled")
    base = rope_frequencies(dataclasses.replace(args, use_scaled_rope=False))
    wavelen = 2 * torch.pi / base
    assert (wavelen < 8192 / 4).any()
    assert ((wavelen >= 8192 / 4) & (wavelen <= 8192)).any()
    assert (wavelen > 8192).any()


@pytest.mark.parametrize("name", CONFIGS)
def test_rope_frequencies_match_hf(name):
    args, _ = config(name)
    cfg = hf_config(args)
    if args.use_scaled_rope:
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    else:
        expected = transformers.LlamaForCausalLM(cfg).model.rotary_emb.inv_freq
    torch.testing.assert_close(rope_frequencies(args), expected, rtol=1e-6, atol=0)


def meta_scaled_frequencies(freqs: list[float], factor: float) -> list[float]:
    """Llama 3's RoPE scaling as llama-models' `apply_scaling` writes it, one frequency at a
    time, with the factor as a parameter (Meta's hard-codes 3.1's 8)."""
    low_freq_factor, high_freq_factor, old_context_len = 1, 4, 8192
    low_freq_wavelen, high_freq_wavelen = (old_context_len / low_freq_factor,
                                           old_context_len / high_freq_factor)
    scaled = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            scaled.append(freq)
        elif wavelen > low_freq_wavelen:
            scaled.append(freq / factor)
        else:
            smooth = ((old_context_len / wavelen - low_freq_factor)
                      / (high_freq_factor - low_freq_factor))
            scaled.append((1 - smooth) * freq / factor + smooth * freq)
    return scaled


LLAMA32_1B = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05,
              "rope_theta": 500000.0, "use_scaled_rope": True}


def test_llama32_rope_is_scaled_by_32_at_positions_beyond_8192():
    """Llama 3.2 1B's rotations (its params.json names no factor) against Meta's formula with
    32 and against Hugging Face's, whose config.json says 32, at positions past 3.2's original
    context of 8192 (where the wrong factor, 3.1's 8, would show most)."""
    args = ModelArgs.from_params(LLAMA32_1B)
    hd = args.head_dim
    unscaled = [1.0 / 500000.0 ** (i / hd) for i in range(0, hd, 2)]
    formula = torch.tensor(meta_scaled_frequencies(unscaled, 32.0))
    torch.testing.assert_close(rope_frequencies(args), formula, rtol=1e-6, atol=0)
    wrong = torch.tensor(meta_scaled_frequencies(unscaled, 8.0))
    assert not torch.allclose(rope_frequencies(args), wrong, rtol=1e-3, atol=0)

    positions = torch.tensor([8192, 8193, 20000, 65536, 131071])
    ours = rope_rotations(args, 131072)[positions]  # (P, hd/2, (cos, sin))
    angles = positions[:, None].double() * formula.double()  # the formula in float64
    expected = torch.stack((angles.cos(), angles.sin()), dim=-1).float()
    # float32 angles of up to 131071 radians carry an error of about 131071 * 2**-24 = 0.008
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-2)
    hf = LlamaRotaryEmbedding(hf_config(args))
    cos, sin = hf(torch.zeros(1, len(positions), hd), positions[None])
    torch.testing.assert_close(ours[..., 0], cos[0, :, : hd // 2], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[..., 1], sin[0, :, : hd // 2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_hf(single_process, name):
    args, vocab_parallel = config(name)
    tokens = random_tokens(args.vocab_size)
    ours = forward_all(build(args, vocab_parallel), tokens)
    theirs = hf_logits(args, tokens)

    diff = (teacher_forced(ours, tokens) - teacher_forced(theirs, tokens)).abs().max().item()
    parity_diffs[f"forward/{name}"] = diff
    assert diff <= PARITY_ATOL
    # The whole distribution at every position, not only the forced tokens.
    full = (torch.log_softmax(ours, -1) - torch.log_softmax(theirs, -1)).abs().max().item()
    assert full <= PARITY_ATOL


@pytest.mark.parametrize("name", CONFIGS)
def test_engine_echo_logprobs_match_hf(single_process, name):
    args, vocab_parallel = config(name)
    tokens = random_tokens(args.vocab_size, seed=2)
    logprobs = echo_logprobs(build(args, vocab_parallel), tokens)

    assert logprobs[0] is None and len(logprobs) == len(tokens)
    expected = teacher_forced(hf_logits(args, tokens), tokens)
    diff = (torch.tensor(logprobs[1:]) - expected).abs().max().item()
    parity_diffs[f"echo/{name}"] = diff
    assert diff <= PARITY_ATOL


@pytest.mark.parametrize("family,n_shards", [("llama2", 1), ("llama2", 2), ("llama3", 1),
                                             ("llama3", 2)])
def test_loaded_checkpoint_matches_hf(single_process, tiny_checkpoints, family, n_shards):
    """The tiny checkpoint on disk (Meta layout, 1 or 2 shards) loaded as the CLI loads it."""
    ckpt = tiny_checkpoints[(family, n_shards)]
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    model = load_model(ckpt, tokenizer, single_process, torch.float32)
    args = read_model_args(ckpt, tokenizer)
    tokens = torch.tensor([tokenizer.bos_id] + random_tokens(args.vocab_size, seed=3).tolist())

    logprobs = echo_logprobs(model, tokens)
    expected = teacher_forced(hf_logits(args, tokens), tokens)
    diff = (torch.tensor(logprobs[1:]) - expected).abs().max().item()
    parity_diffs[f"checkpoint/{family}-{n_shards}shard"] = diff
    assert diff <= PARITY_ATOL


@pytest.mark.parametrize("rope_changes", [
    {"rope_type": "default"},  # no Llama 3.1 scaling at all
    {"high_freq_factor": 3.0},  # only the interpolated band's frequency moves (by 1/3)
], ids=["unscaled", "middle-band"])
def test_parity_would_catch_a_rope_scaling_error(single_process, rope_changes):
    """Control: over SEQ_LEN positions the 1e-4 comparison sees a wrong scaling, even one confined
    to the interpolated band, so a model with such an error could not pass the tests above."""
    args, vocab_parallel = config("llama3.1-scaled")
    tokens = random_tokens(args.vocab_size)
    ours = teacher_forced(forward_all(build(args, vocab_parallel), tokens), tokens)
    theirs = teacher_forced(hf_logits(args, tokens, rope_changes=rope_changes), tokens)
    assert (ours - theirs).abs().max().item() > 10 * PARITY_ATOL


# --- the KV cache ---------------------------------------------------------------------------------

def scribble(model: Transformer, seed: int = 7) -> None:
    """Fill every cache slot with large finite junk, as slots reused by other sequences hold."""
    gen = torch.Generator().manual_seed(seed)
    for block in model.layers:
        for t in (block.attention.cache.k, block.attention.cache.v):
            t.copy_(100 * torch.randn(t.shape, generator=gen))


def recompute_last(reference: Transformer, prefix: list[int]) -> torch.Tensor:
    """Logits for the last token of `prefix` from a full forward over a fresh cache."""
    return forward_all(reference, torch.tensor(prefix))[-1]


@pytest.mark.parametrize("name", ["llama2-mha", "llama3.1-scaled"])
def test_cached_decode_equals_full_recompute(single_process, name):
    args, vocab_parallel = config(name)
    model, reference = build(args, vocab_parallel), build(args, vocab_parallel)
    seq = random_tokens(args.vocab_size, n=6, seed=4).tolist()
    model.setup_cache(3, 32)
    scribble(model)
    slot = slice(1, 2)  # not the first row: the step's rows must address the right slot
    with torch.inference_mode():
        positions = torch.arange(len(seq))[None]
        logits = model(torch.tensor([seq]), model.make_step(positions, slot, len(seq)))
        for _ in range(16):
            torch.testing.assert_close(logits[0], recompute_last(reference, seq),
                                       atol=CACHE_ATOL, rtol=0)
            seq.append(int(logits[0].argmax()))
            pos = len(seq) - 1
            step = model.make_step(torch.tensor([[pos]]), slot, kv_len=pos + 1)
            logits = model(torch.tensor([[seq[-1]]]), step)
    assert len(set(seq[6:])) > 1  # the decoded tokens are not one repeated token


@pytest.mark.parametrize("chunk_rows", [None, 2])
@pytest.mark.parametrize("name", ["llama2-mha", "llama3.1-scaled"])
def test_decode_batch_of_mixed_prompt_lengths(single_process, name, chunk_rows):
    """Rows at different positions decode in one step; each row's logits are those of its own
    prefix alone, whatever its neighbours hold beyond its position. With `chunk_rows`, rows are
    attended in chunks that each read the cache only up to their own longest context."""
    args, vocab_parallel = config(name)
    model, reference = build(args, vocab_parallel), build(args, vocab_parallel)
    seqs = [random_tokens(args.vocab_size, n=n, seed=10 + n).tolist() for n in (2, 11, 5, 3, 7)]
    model.setup_cache(len(seqs), 32)
    scribble(model)
    with torch.inference_mode():
        logits = []
        for row, seq in enumerate(seqs):  # prefill each prompt alone into its own slot
            step = model.make_step(torch.arange(len(seq))[None], slice(row, row + 1), len(seq))
            logits.append(model(torch.tensor([seq]), step)[0])
        logits = torch.stack(logits)
        for _ in range(8):
            for row, seq in enumerate(seqs):
                torch.testing.assert_close(logits[row], recompute_last(reference, seq),
                                           atol=CACHE_ATOL, rtol=0)
                seq.append(int(logits[row].argmax()))
            positions = torch.tensor([[len(s) - 1] for s in seqs])
            kv_lens = [len(s) for s in seqs]
            chunks = attention_chunks(kv_lens, chunk_rows) if chunk_rows else None
            assert chunk_rows is None or min(n for _, _, n in chunks) < max(kv_lens)
            step = model.make_step(positions, slice(0, len(seqs)), max(kv_lens), chunks=chunks)
            logits = model(torch.tensor([[s[-1]] for s in seqs]), step)


@pytest.mark.parametrize("name", ["llama2-mha", "llama3.1-scaled"])
def test_joined_step_decodes_and_prefills_in_one_pass(single_process, name):
    """`Step.join`: a decode segment and a right-padded prefill segment in one forward pass give
    every row the logits of its own prefix alone."""
    args, vocab_parallel = config(name)
    model, reference = build(args, vocab_parallel), build(args, vocab_parallel)
    decoding = [random_tokens(args.vocab_size, n=n, seed=30 + n).tolist() for n in (4, 9)]
    prompts = [random_tokens(args.vocab_size, n=n, seed=40 + n).tolist() for n in (3, 6)]
    model.setup_cache(4, 32)
    scribble(model)
    with torch.inference_mode():
        for row, seq in enumerate(decoding):
            model(torch.tensor([seq[:-1]]),
                  model.make_step(torch.arange(len(seq) - 1)[None], slice(row, row + 1),
                                  len(seq) - 1))
        decode = model.make_step(torch.tensor([[len(s) - 1] for s in decoding]), slice(0, 2),
                                 kv_len=max(map(len, decoding)))
        longest = max(map(len, prompts))
        padded = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
        prefill = model.make_step(torch.arange(longest).expand(2, longest), slice(2, 4), longest,
                                  fresh=True, last=torch.tensor([len(p) - 1 for p in prompts]))
        tokens = torch.cat([torch.tensor([s[-1] for s in decoding]), padded.view(-1)])
        logits = model.logits(model.final_hidden(tokens, Step.join([decode, prefill])))
    assert logits.shape == (4, args.vocab_size)
    for row, seq in enumerate(decoding + prompts):
        torch.testing.assert_close(logits[row], recompute_last(reference, seq),
                                   atol=CACHE_ATOL, rtol=0)


def test_packed_head_computes_the_product_and_follows_weight_changes(single_process):
    """The CPU output head's oneDNN copy of its weight gives x @ W.T, and is made again when the
    weight is written or replaced (as loading a checkpoint does)."""
    head = ParallelLayers().column(16, 40, gather_output=True, packed=True)
    head.weight = torch.nn.Parameter(torch.randn(40, 16), requires_grad=False)
    x = torch.randn(5, 16)
    for change in ("none", "replaced", "written"):  # the replacement has the packed version, 0
        if change == "replaced":
            head.weight = torch.nn.Parameter(torch.randn(40, 16), requires_grad=False)
        elif change == "written":
            with torch.no_grad():
                head.weight.mul_(-2)
        with torch.inference_mode():
            got = head(x)
        torch.testing.assert_close(got, x @ head.weight.T, atol=1e-5, rtol=1e-5)
    # The packed product ran, not the fallback after a failure.
    assert head.packed.enabled == torch.backends.mkldnn.is_available()


# --- fused projections ----------------------------------------------------------------------------

FUSED_ATOL = 1e-5  # fp32 rounding: one product of stacked weights sums as the separate ones do


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_projections_give_the_unfused_logits(single_process, name):
    """wq/wk/wv and w1/w3 stacked into one product each (`Transformer.fuse`) give the separate
    products' logits, in a prefill over a fresh cache and in cached decode steps after it."""
    args, vocab_parallel = config(name)
    fused, separate = build(args, vocab_parallel), build(args, vocab_parallel, fuse=False)
    assert fused.layers[0].attention.fused is not None and separate.layers[0].attention.fused is None
    seq = random_tokens(args.vocab_size, n=24, seed=5).tolist()
    logits = []
    for model in (fused, separate):
        model.setup_cache(2, 48)
        with torch.inference_mode():
            prompt = model(torch.tensor([seq]), model.make_step(
                torch.arange(len(seq))[None], slice(0, 1), len(seq), fresh=True,
                every_token=True))
            steps = [model.decode(torch.tensor([token]), torch.tensor([len(seq) + i]),
                                  len(seq) + i + 1) for i, token in enumerate(seq[:8])]
        logits.append(torch.cat([prompt, *steps]))
    torch.testing.assert_close(logits[0], logits[1], atol=FUSED_ATOL, rtol=0)
