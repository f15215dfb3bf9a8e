"""The model's shape, read once from Meta's params.json (or, by `hf_config`, from a Hugging Face
config.json) and frozen."""
from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..values import BadValue, Rule

log = logging.getLogger(__name__)

# Llama 3.1's RoPE scaling bands, which Meta's reference hard-codes (a config.json may say others).
LLAMA_3_ROPE_LOW_FREQ_FACTOR = 1.0
LLAMA_3_ROPE_HIGH_FREQ_FACTOR = 4.0
LLAMA_3_ROPE_ORIGINAL_CONTEXT = 8192

# RoPE's long-context scaling factor where params.json names none: Llama 3.1's 8 (Meta's
# reference hard-codes it), but 32 for Llama 3.2's 1B and 3B. Their params.json only says
# use_scaled_rope; their Hugging Face config.json says 32, as a maintainer confirmed
# (llama-models #166, #241). They are told apart by shape: (dim, n_layers, n_heads, n_kv_heads).
LLAMA_31_ROPE_FACTOR = 8.0
LLAMA_32_ROPE_FACTOR = 32.0
LLAMA_32_SHAPES = {(2048, 16, 32, 8): "Llama 3.2 1B", (3072, 28, 24, 8): "Llama 3.2 3B"}

# The context each of Meta's releases was trained for, in tokens.
CONTEXT_LENGTHS = {"Llama 1": 2048, "Llama 2": 4096, "Code Llama": 16384, "Llama 3": 8192,
                   "Llama 3.1": 131072, "Llama 3.2": 131072}

# params.json keys of Meta's checkpoints that are not a text-only Llama (llama-models'
# models/llama3/args.py and models/llama4/args.py), first match wins: Llama 4's files carry
# vision_args and quantization_args too. A key counts where set: not null, false, 0, or -1
# (Meta's "off" for vision_chunk_size and vision_num_cross_attention_layers).
OTHER_MODELS = (
    ("a Llama 4 checkpoint", "llama-gen runs Llama 1 to 3.3, not Llama 4's mixture of experts",
     ("moe_args", "num_experts", "interleave_moe_layer_step", "use_qk_norm",
      "nope_layer_interval", "attention_chunk_size", "attn_temperature_tuning", "floor_scale",
      "attn_scale", "ffn_exp", "vision_args")),
    ("a Llama 3.2 Vision checkpoint", "llama-gen runs text-only Llama models",
     ("vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers",
      "vision_model")),
    ("a quantized checkpoint (Meta's int4 QLoRA or SpinQuant)",
     "llama-gen runs unquantized weights: use the bf16 release of this model",
     ("quantization_args",)),
    ("a LoRA checkpoint", "llama-gen runs plain weights: use the bf16 release of this model",
     ("lora_args",)),
)
UNSET = (None, False, 0, -1)


def read_json(path: Path, holds: str) -> Any:
    """A checkpoint's JSON file; `holds` says, where it is missing, what the folder should hold."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: not found; {holds}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def refuse_other_models(params: dict[str, Any], source: str) -> None:
    """A params.json of a Llama 4, a Llama 3.2 Vision or a quantized Llama is refused by name
    before its unknown keys could only warn and its weights fail to match later."""
    inner = params.get("model") if isinstance(params.get("model"), dict) else {}
    keys = {k: v for k, v in {**inner, **params}.items() if v not in UNSET}
    for what, fix, markers in OTHER_MODELS:
        if found := [k for k in markers if k in keys]:
            raise UserError(f"{source}: {what} ({', '.join(found)}): {fix}")


def shape_problems(args: ModelArgs) -> list[str]:
    """What makes these sizes impossible for the model, in words (none: they fit)."""
    problems = [f"{name} must be positive" for name in ("dim", "n_layers", "n_heads", "multiple_of")
                if getattr(args, name) <= 0]
    if args.vocab_size == 0 or args.vocab_size < -1:
        problems.append("vocab_size must be positive or -1")
    if args.n_heads > 0 and args.dim % args.n_heads:
        problems.append(f"dim {args.dim} is not divisible by n_heads {args.n_heads}")
    if args.n_heads > 0 and args.dim // args.n_heads % 2:
        problems.append("head dimension must be even for rotary embeddings")
    if args.kv_heads <= 0 or args.n_heads % args.kv_heads:
        problems.append(f"n_heads {args.n_heads} is not a multiple of n_kv_heads {args.kv_heads}")
    if args.intermediate_size is not None and args.intermediate_size <= 0:
        problems.append("intermediate_size must be positive")
    if args.trained_context is not None and args.trained_context <= 0:
        problems.append("trained_context must be positive")
    return problems + rope_problems(args)


def rope_problems(args: ModelArgs) -> list[str]:
    problems = []
    if args.rope_theta <= 0:
        problems.append("rope_theta must be positive")
    if args.rope_scaling_factor is not None and args.rope_scaling_factor < 1:
        problems.append("rope_scaling_factor must be at least 1")
    if not 0 < args.rope_low_freq_factor < args.rope_high_freq_factor:
        problems.append(f"RoPE's low_freq_factor {args.rope_low_freq_factor:g} must be positive "
                        f"and below its high_freq_factor {args.rope_high_freq_factor:g}")
    if args.rope_original_context <= 0:
        problems.append("RoPE's original context must be positive")
    return problems


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int  # -1 in Llama 1/2 files: resolved from the tokenizer by `with_vocab_size`
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False
    rope_scaling_factor: float | None = None  # None: the release's (see `rope_scaling`)
    # Llama 3.1's scaling bands, which only a config.json changes (its rope_scaling's
    # low_freq_factor, high_freq_factor and original_max_position_embeddings).
    rope_low_freq_factor: float = LLAMA_3_ROPE_LOW_FREQ_FACTOR
    rope_high_freq_factor: float = LLAMA_3_ROPE_HIGH_FREQ_FACTOR
    rope_original_context: int = LLAMA_3_ROPE_ORIGINAL_CONTEXT
    # The FFN width as a config.json gives it (intermediate_size: fine-tunes and open_llama
    # do not follow Meta's rule); None: Meta's, from dim, multiple_of and ffn_dim_multiplier.
    intermediate_size: int | None = None
    # The context trained for where the config says it (max_position_embeddings); None: the
    # release's, told from the shape (`family`).
    trained_context: int | None = None
    tie_word_embeddings: bool = False  # the output head is the embedding (Llama 3.2 1B, 3B)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def llama_32_model(self) -> str | None:
        """"Llama 3.2 1B" or "3B" where params.json has their shape and scaled RoPE, else None."""
        if not self.use_scaled_rope:
            return None
        return LLAMA_32_SHAPES.get((self.dim, self.n_layers, self.n_heads, self.kv_heads))

    @property
    def family(self) -> str | None:
        """Which of Meta's releases this shape is, from params.json alone, or None: Llama 3.1
        and later scale RoPE (3.2's 1B and 3B have their own shapes); Llama 3 has rope_theta
        500000, Code Llama 1e6; Llama 1 and 2 keep 10000 and differ in norm_eps (1e-6, 1e-5)."""
        if self.use_scaled_rope:
            return "Llama 3.2" if self.llama_32_model else "Llama 3.1"
        if self.rope_theta == 500000:
            return "Llama 3"
        if self.rope_theta == 1e6:
            return "Code Llama"
        if self.rope_theta == 10000:
            return {1e-6: "Llama 1", 1e-5: "Llama 2"}.get(self.norm_eps)
        return None

    @property
    def context_length(self) -> int | None:
        """The context the model was trained for, positions beyond it untrained: the config's
        where it says (config.json's max_position_embeddings), else the release's from the shape
        (None for a shape no release of Meta's has)."""
        if self.trained_context is not None:
            return self.trained_context
        return CONTEXT_LENGTHS.get(self.family)

    def rope_scaling(self) -> tuple[float | None, str]:
        """RoPE's scaling factor (None where RoPE is not scaled) and why it is the one:
        params.json's (or --rope_scaling_factor's, see `with_rope_scaling`) where given, else
        the release's."""
        if not self.use_scaled_rope:
            return None, "params.json does not scale RoPE"
        if self.rope_scaling_factor is not None:
            return self.rope_scaling_factor, "given"
        if model := self.llama_32_model:
            return LLAMA_32_ROPE_FACTOR, (f"{model}'s (its shape; params.json names no factor, "
                                          "its Hugging Face config.json says 32)")
        return LLAMA_31_ROPE_FACTOR, "Llama 3.1's (params.json names no factor)"

    def with_rope_scaling(self, factor: float | None, source: str) -> ModelArgs:
        """These args with RoPE scaled by `factor` where given (--rope_scaling_factor), which
        only a model that scales RoPE takes."""
        if factor is None:
            return self
        if not self.use_scaled_rope:
            lacks = ("no rope_scaling of rope_type llama3" if source.endswith("config.json")
                     else "no use_scaled_rope")
            raise UserError(f"--rope_scaling_factor {factor:g}: {source} does not scale RoPE "
                            f"({lacks}): leave the flag out")
        return dataclasses.replace(self, rope_scaling_factor=factor)

    @classmethod
    def from_params(cls, params: dict[str, Any], source: str = "params.json") -> ModelArgs:
        """Validate a params.json dict strictly: unknown keys warn, missing or mistyped keys fail,
        and a model that is no text-only Llama is refused by name (`refuse_other_models`)."""
        if not isinstance(params, dict):
            raise UserError(f"{source}: expected a JSON object, got {type(params).__name__}")
        refuse_other_models(params, source)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in sorted(set(params) - set(fields)):
            log.warning("%s: ignoring unknown field %r", source, key)
        missing = [
            name for name, f in fields.items()
            if f.default is dataclasses.MISSING and name not in params
        ]
        if missing:
            raise UserError(f"{source}: missing required field(s) {', '.join(missing)}")
        kinds = typing.get_type_hints(cls)
        values = {}
        for name in fields.keys() & params.keys():
            try:
                values[name] = Rule(kinds[name]).check(params[name])
            except BadValue as e:
                raise UserError(f"{source}: field {name!r} {e}") from None
        return cls(**values).checked(source)

    @classmethod
    def from_file(cls, path: Path) -> ModelArgs:
        params = read_json(path, "a Meta checkpoint directory holds params.json and "
                                 "consolidated.NN.pth shards, a Hugging Face one config.json and "
                                 "*.safetensors")
        return cls.from_params(params, source=str(path))

    def with_vocab_size(self, tokenizer_vocab: int, source: str = "params.json") -> ModelArgs:
        """Resolve vocab_size -1 from the tokenizer, or check that both agree."""
        if self.vocab_size == -1:
            return dataclasses.replace(self, vocab_size=tokenizer_vocab)
        if self.vocab_size != tokenizer_vocab:
            raise UserError(
                f"{source}: vocab_size {self.vocab_size} does not match the tokenizer's "
                f"{tokenizer_vocab} tokens; pass the tokenizer that belongs to this checkpoint "
                "with --tokenizer_path")
        return self

    def checked(self, source: str) -> ModelArgs:
        """These args, or a UserError naming `source` where their sizes cannot make a model."""
        if problems := shape_problems(self):
            raise UserError(f"{source}: {'; '.join(problems)}")
        return self
