"""Hugging Face Llama folders written by transformers itself (`save_pretrained`) from the tiny
random weights, the same weights in Meta's layout, and transformers' forward pass as the
reference a run's greedy tokens and logprobs are checked against."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers  # a declared test dependency (pyproject's test extra): never skipped

from llama_gen.model.args import ModelArgs
from llama_gen.model.checkpoint import EMBEDDING_KEY
from llama_gen.testing.tiny import random_weights, write_checkpoint
from llama_gen.text.tokenizer import load_tokenizer
from near_ties import NEAR_TIE
from reference_models import PARITY_ATOL, hf_names, meta_to_hf, rope_heads

LLAMA2_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                "rope_theta": 500000.0}


def hf_config(args: ModelArgs, rope: dict, tied: bool, max_positions: int, bos: int,
              eos: int) -> transformers.LlamaConfig:
    """transformers' config of the model `args` describe (transformers 5: `rope_parameters`)."""
    return transformers.LlamaConfig(
        hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps,
        vocab_size=args.vocab_size, max_position_embeddings=max_positions,
        tie_word_embeddings=tied, rope_parameters=dict(rope), bos_token_id=bos,
        eos_token_id=eos, attn_implementation="eager")


def hf_llama(args: ModelArgs, tokenizer_path: Path, rope: dict, tied: bool,
             max_positions: int = 4096, seed: int = 0) -> transformers.LlamaForCausalLM:
    """transformers' Llama in fp32 holding `random_weights(args, seed)` (peaked logits, unlike
    its own initialization, so greedy choices are rarely near-ties); tied: the head is the
    embedding."""
    tokenizer = load_tokenizer(tokenizer_path)
    weights = random_weights(args, seed)
    if tied:
        weights["output.weight"] = weights[EMBEDDING_KEY]
    model = transformers.LlamaForCausalLM(hf_config(args, rope, tied, max_positions,
                                                    tokenizer.bos_id, tokenizer.eos_id))
    model.load_state_dict(meta_to_hf(weights, args), strict=True)
    return model.float().eval()


def save_folder(model: transformers.LlamaForCausalLM, folder: Path, tokenizer_path: Path,
                tokenizer_at: str | None = "tokenizer.model", max_shard_size: str | None = None,
                bin_file: bool = False) -> Path:
    """`model` as transformers writes it (safetensors, sharded under `max_shard_size`), or as
    older folders hold it (one pytorch_model.bin), with the tokenizer at `tokenizer_at` (None:
    the caller writes one)."""
    folder.mkdir(parents=True, exist_ok=True)
    if bin_file:
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
        torch.save(state, folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, **({"max_shard_size": max_shard_size}
                                         if max_shard_size else {}))
    if tokenizer_at is not None:
        (folder / tokenizer_at).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tokenizer_path, folder / tokenizer_at)
    return folder


def edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def as_transformers_4(config: dict) -> dict:
    """config.json as transformers 4 wrote it: `rope_theta` beside a `rope_scaling` (None for
    default RoPE) instead of transformers 5's `rope_parameters`."""
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    return config


def hf_to_meta(hf: dict[str, torch.Tensor], args: ModelArgs, tied: bool
               ) -> dict[str, torch.Tensor]:
    """Hugging Face's state dict under Meta's keys, q/k rows back to interleaved pairs: the
    inverse of `reference_models.meta_to_hf`, written independently of the loader."""
    def to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
        return (w.view(heads, 2, args.head_dim // 2, args.dim).transpose(1, 2)
                .reshape(heads * args.head_dim, args.dim))

    names = hf_names(args) | ({"output.weight": "model.embed_tokens.weight"} if tied else {})
    return {ours: hf[theirs] if (heads := rope_heads(ours, args)) is None
            else to_pairs(hf[theirs], heads) for ours, theirs in names.items()}


def save_meta_folder(model: transformers.LlamaForCausalLM, folder: Path, params: dict,
                     args: ModelArgs, tokenizer_path: Path, vocab_parallel: bool) -> Path:
    """The HF model's weights as Meta's consolidated.00.pth and params.json, in fp32."""
    weights = hf_to_meta(model.state_dict(), args, model.config.tie_word_embeddings)
    write_checkpoint(folder, params, {k: v.clone() for k, v in weights.items()},
                     vocab_parallel_embedding=vocab_parallel, dtype=torch.float32)
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return folder


def assert_matches_hf(model: transformers.LlamaForCausalLM, prompt: list[int],
                      tokens: list[int], logprobs: list[float], stop: int | None) -> None:
    """A greedy completion is transformers' own: teacher-forced on the same tokens, each token
    (and the stop token that ended it) is its most likely one, or within NEAR_TIE of it, and
    each logprob is its logprob within PARITY_ATOL."""
    chosen = tokens + ([stop] if stop is not None else [])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + chosen])).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)  # (len(chosen), vocab)
    for i, token in enumerate(chosen):
        best = expected[i].max()
        assert best - expected[i, token] < NEAR_TIE, (i, token, expected[i].argmax().item())
    torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float32),
                               expected[torch.arange(len(tokens)), tokens],
                               atol=PARITY_ATOL, rtol=0)
