"""A Hugging Face Llama folder's config.json as the `ModelArgs` Meta's params.json gives, read
as transformers reads it (its defaults where a key is missing), from the JSON alone.

What this model cannot run is refused at once, one line naming the key: another architecture,
biases, another activation, a head size of its own, another RoPE, a sliding window, quantized
weights. Keys that do not change the math (token ids, dtype, dropout, use_cache, ...) are not
read at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from ..values import BadValue, Rule, shown
from .args import ModelArgs, read_json

ARCHITECTURE, MODEL_TYPE = "LlamaForCausalLM", "llama"
PLAIN_LLAMA = "llama-gen runs plain Llama models"

REQUIRED = object()
# config.json key: (ModelArgs field, its type, transformers' LlamaConfig default or REQUIRED).
# The shape has no default here: transformers' (Llama 1 7B's) would only fail later, at the
# weights.
FIELDS = {
    "hidden_size": ("dim", int, REQUIRED),
    "num_hidden_layers": ("n_layers", int, REQUIRED),
    "num_attention_heads": ("n_heads", int, REQUIRED),
    "num_key_value_heads": ("n_kv_heads", int | None, None),
    "intermediate_size": ("intermediate_size", int, REQUIRED),
    "vocab_size": ("vocab_size", int, REQUIRED),
    "rms_norm_eps": ("norm_eps", float, 1e-6),
    "max_position_embeddings": ("trained_context", int, 2048),
    "tie_word_embeddings": ("tie_word_embeddings", bool, False),
}
DEFAULT_ROPE_THETA = 10000.0
LLAMA3_ROPE = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor",
               "original_max_position_embeddings": "rope_original_context"}


def read_config(path: Path) -> ModelArgs:
    """A Hugging Face folder's config.json as the model's args."""
    config = read_json(path, "a Hugging Face checkpoint folder holds config.json and its "
                             "*.safetensors")
    return args_from_config(config, str(path))


def read_folder_args(ckpt_dir: Path) -> ModelArgs:
    """The model of a checkpoint folder, its format told from the folder: Meta's params.json
    where it has one, else Hugging Face's config.json."""
    if (ckpt_dir / "params.json").is_file():
        return ModelArgs.from_file(ckpt_dir / "params.json")
    if (ckpt_dir / "config.json").is_file():
        return read_config(ckpt_dir / "config.json")
    raise UserError(f"{ckpt_dir}: holds neither params.json (a Meta checkpoint) nor config.json "
                    "(a Hugging Face one): pass the checkpoint's folder as --ckpt_dir")


def args_from_config(config: Any, source: str = "config.json") -> ModelArgs:
    """config.json's dict as `ModelArgs`, strictly: a missing or mistyped shape key fails, and so
    does anything `refuse_unsupported` names."""
    if not isinstance(config, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(config).__name__}")
    refuse_unsupported(config, source)
    missing = [key for key, (_, _, default) in FIELDS.items()
               if default is REQUIRED and key not in config]
    if missing:
        raise UserError(f"{source}: missing required field(s) {', '.join(missing)}")
    values = {field: checked(config, key, kind, default, source)
              for key, (field, kind, default) in FIELDS.items()}
    return ModelArgs(**values, **rope_fields(config, source)).checked(source)


def checked(config: dict[str, Any], key: str, kind: Any, default: Any, source: str) -> Any:
    if key not in config:
        return default
    try:
        return Rule(kind).check(config[key])
    except BadValue as e:
        raise UserError(f"{source}: field {key!r} {e}") from None


def rope_fields(config: dict[str, Any], source: str) -> dict[str, Any]:
    """RoPE's `ModelArgs` fields from `rope_scaling` (transformers 4) or `rope_parameters`
    (transformers 5, rope_theta inside), `rope_type` (or the older `type`) default or llama3."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    name = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    if not isinstance(rope, dict):
        raise UserError(f"{source}: field {name!r} must be an object, got {shown(rope)}")
    theta = rope.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    fields = {"rope_theta": checked({"rope_theta": theta}, "rope_theta", float, None, source)}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return fields
    if rope_type != "llama3":
        raise UserError(f"{source}: {name}'s rope_type {shown(rope_type)} is not supported: "
                        f"{PLAIN_LLAMA}, whose RoPE is unscaled or scaled as Llama 3.1's "
                        "(rope_type \"llama3\")")
    rope = {"original_max_position_embeddings": config.get("max_position_embeddings"), **rope}
    if missing := [key for key in LLAMA3_ROPE if rope.get(key) is None]:
        raise UserError(f"{source}: {name} of rope_type \"llama3\" lacks {', '.join(missing)}")
    for key, field in LLAMA3_ROPE.items():
        kind = int if key.startswith("original") else float
        fields[field] = checked(rope, key, kind, None, f"{source}: {name}")
    return {**fields, "use_scaled_rope": True}


def refuse_unsupported(config: dict[str, Any], source: str) -> None:
    """One line for the first thing config.json says that this Llama cannot run as told."""
    model_type, architectures = config.get("model_type"), config.get("architectures")
    if model_type != MODEL_TYPE or architectures not in (None, [ARCHITECTURE]):
        named = [f"model_type {shown(model_type)}" if model_type is not None else "no model_type"]
        named += [f"architectures {shown(architectures)}"] if architectures is not None else []
        raise UserError(f"{source}: {', '.join(named)}: not a Llama; llama-gen runs "
                        f"{ARCHITECTURE} checkpoints (model_type \"{MODEL_TYPE}\")")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise UserError(f"{source}: {key} is true: {PLAIN_LLAMA}, whose layers have no "
                            "biases")
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {shown(config['hidden_act'])}: {PLAIN_LLAMA}, "
                        "whose feed-forward is SwiGLU (hidden_act \"silu\")")
    head_dim, hidden, heads = (config.get(k) for k in ("head_dim", "hidden_size",
                                                       "num_attention_heads"))
    if head_dim is not None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0 \
            and head_dim != hidden // heads:
        raise UserError(f"{source}: head_dim {shown(head_dim)} is not hidden_size / "
                        f"num_attention_heads ({hidden} / {heads}): {PLAIN_LLAMA}, whose heads "
                        "split the hidden size")
    if config.get("sliding_window") is not None:
        raise UserError(f"{source}: sliding_window {shown(config['sliding_window'])}: "
                        f"{PLAIN_LLAMA}, whose attention sees the whole context")
    if (partial := partial_rotary_factor(config)) != 1:
        raise UserError(f"{source}: partial_rotary_factor {shown(partial)}: {PLAIN_LLAMA}, "
                        "whose RoPE turns the whole head")
    if (quantization := config.get("quantization_config")) is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise UserError(f"{source}: quantization_config ({method or 'quantized'} weights): "
                        "llama-gen loads unquantized weights (bf16, fp16 or fp32): use the "
                        "model's unquantized release")


def partial_rotary_factor(config: dict[str, Any]) -> Any:
    rope = config.get("rope_scaling") or config.get("rope_parameters")
    inner = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    return inner if inner is not None else config.get("partial_rotary_factor", 1)
