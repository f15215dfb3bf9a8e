"""Tiny model configurations built in this process, and Hugging Face's Llama as the independent
reference they are compared with."""
from __future__ import annotations

import torch
import transformers  # a declared test dependency (pyproject's test extra): never skipped

from llama_gen.engine.engine import Engine
from llama_gen.engine.requests import Request, SamplingParams
from llama_gen.model.args import LLAMA_3_ROPE_ORIGINAL_CONTEXT, ModelArgs
from llama_gen.model.layers import ParallelLayers
from llama_gen.model.transformer import Transformer
from llama_gen.testing.tiny import TINY_LLAMA2, TINY_LLAMA3, random_weights

PARITY_ATOL = 1e-4


SEQ_LEN = 160  # long enough for every RoPE band, the interpolated one too, to move logprobs


# name -> (params.json, vocabulary-parallel embedding)
CONFIGS = {
    # (a) Llama 2: multi-head attention, rope_theta 10000, embedding split on dim 1.
    "llama2-mha": ({**TINY_LLAMA2, "vocab_size": 512}, False),
    # (b) grouped-query attention (4 query heads per KV head), a non-default theta, no scaling.
    "gqa-theta": ({"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 16,
                   "ffn_dim_multiplier": 1.5, "norm_eps": 1e-6, "rope_theta": 100000.0,
                   "vocab_size": 320}, True),
    # (c) Llama 3.1: GQA, rope_theta 500000 and scaled RoPE.
    "llama3.1-scaled": ({**TINY_LLAMA3, "vocab_size": 768}, True),
}


def build(args: ModelArgs, vocab_parallel: bool, seed: int = 0, fuse: bool = True
          ) -> Transformer:
    """`random_weights(args, seed)` in our model, its projections fused as the loader's are."""
    model = Transformer(args, ParallelLayers(vocab_parallel))
    model.load_state_dict(random_weights(args, seed), strict=True, assign=True)
    if fuse:
        model.fuse()
    return model.requires_grad_(False).eval()


def config(name: str) -> tuple[ModelArgs, bool]:
    params, vocab_parallel = CONFIGS[name]
    return ModelArgs.from_params(params), vocab_parallel


def hf_config(args: ModelArgs, rope_changes: dict | None = None, max_positions: int = 131072):
    """`rope_changes` alters HF's RoPE only, for the controls that show the comparison is sharp."""
    rope: dict = {"rope_type": "default"}
    if args.use_scaled_rope:
        rope = {"rope_type": "llama3", "factor": args.rope_scaling()[0], "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": LLAMA_3_ROPE_ORIGINAL_CONTEXT}
    rope |= rope_changes or {}
    if rope["rope_type"] == "default":
        rope = {"rope_type": "default"}
    sizes = dict(hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
                 num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                 num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps,
                 vocab_size=args.vocab_size, max_position_embeddings=max_positions,
                 tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                 attn_implementation="eager")
    if int(transformers.__version__.split(".")[0]) >= 5:  # 5.x: one `rope_parameters` dict
        return transformers.LlamaConfig(**sizes, rope_parameters={**rope,
                                                                  "rope_theta": args.rope_theta})
    return transformers.LlamaConfig(**sizes, rope_theta=args.rope_theta,
                                    rope_scaling=None if rope["rope_type"] == "default" else rope)


# Meta's key -> Hugging Face's, written here apart from the loader's table (an independent check)
HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight",
            "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def hf_names(args: ModelArgs) -> dict[str, str]:
    """Every Meta key of the model and its Hugging Face name."""
    names = dict(HF_NAMES)
    for i in range(args.n_layers):
        names |= {f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}"
                  for ours, theirs in HF_LAYER_NAMES.items()}
    return names


def rope_heads(key: str, args: ModelArgs) -> int | None:
    """The heads whose q or k rows RoPE turns, for the key's weight (None: not q or k)."""
    return {"attention.wq.weight": args.n_heads,
            "attention.wk.weight": args.kv_heads}.get(key.split(".", 2)[-1])


def meta_to_hf(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename Meta's keys to Hugging Face's, permuting q/k rows per head from interleaved pairs
    (x[2i], x[2i+1]) to halves (x[i], x[i + hd/2])."""
    def to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
        return (w.view(heads, args.head_dim // 2, 2, args.dim).transpose(1, 2)
                .reshape(heads * args.head_dim, args.dim))

    return {theirs: state[ours] if (heads := rope_heads(ours, args)) is None
            else to_halves(state[ours], heads) for ours, theirs in hf_names(args).items()}


def hf_model(args: ModelArgs, seed: int = 0, rope_changes: dict | None = None):
    """HF's Llama holding `random_weights(args, seed)`."""
    model = transformers.LlamaForCausalLM(hf_config(args, rope_changes))
    model.load_state_dict(meta_to_hf(random_weights(args, seed), args), strict=True)
    return model.eval()


def hf_logits(args: ModelArgs, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(args, **kwargs)(input_ids=tokens[None]).logits[0].float()  # (T, vocab)


def teacher_forced(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[t] | tokens[:t]) for t >= 1, from logits (T, vocab)."""
    return torch.log_softmax(logits[:-1], dim=-1).gather(-1, tokens[1:, None]).squeeze(-1)


def random_tokens(vocab_size: int, n: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def echo_logprobs(model: Transformer, tokens: torch.Tensor) -> list[float | None]:
    engine = Engine(model, stop_ids=(), max_batch_size=2, max_seq_len=len(tokens) + 4)
    params = SamplingParams(temperature=0.0, max_gen_len=0, echo=True, logprobs=True)
    [done] = engine.generate([Request(tokens.tolist(), params)])
    assert done.tokens == tokens.tolist() and done.finish_reason == "length"
    return done.logprobs
