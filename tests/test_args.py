import logging

import pytest

from llama_gen.errors import UserError
from llama_gen.model.args import ModelArgs

LLAMA1_13B = {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-06,
              "vocab_size": -1}
LLAMA2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
             "vocab_size": -1}
LLAMA2_70B = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
              "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}
LLAMA3_8B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
             "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05,
             "rope_theta": 500000.0}
LLAMA31_405B = {"dim": 16384, "ffn_dim_multiplier": 1.2, "multiple_of": 4096, "n_heads": 128,
                "n_kv_heads": 8, "n_layers": 126, "norm_eps": 1e-05, "rope_theta": 500000.0,
                "use_scaled_rope": True, "vocab_size": 128256}


@pytest.mark.parametrize("params, ffn, kv_heads, head_dim", [
    (LLAMA1_13B, 13824, 40, 128),
    (LLAMA2_7B, 11008, 32, 128),
    (LLAMA2_70B, 28672, 8, 128),
    (LLAMA3_8B, 14336, 8, 128),
    (LLAMA31_405B, 53248, 8, 128),
])
def test_meta_release_params_give_the_published_sizes(params, ffn, kv_heads, head_dim, caplog):
    with caplog.at_level(logging.WARNING):
        args = ModelArgs.from_params(params)
    assert (args.ffn_hidden_dim, args.kv_heads, args.head_dim) == (ffn, kv_heads, head_dim)
    assert not caplog.records, "every field of Meta's releases is known"


def test_llama31_fields():
    args = ModelArgs.from_params(LLAMA31_405B)
    assert args.use_scaled_rope and args.rope_theta == 500000.0
    assert ModelArgs.from_params(LLAMA2_7B).rope_theta == 10000.0


def test_unknown_field_warns_and_is_ignored(caplog):
    with caplog.at_level(logging.WARNING):
        args = ModelArgs.from_params({**LLAMA2_7B, "shiny_new_thing": 1})
    assert args == ModelArgs.from_params(LLAMA2_7B)
    assert "shiny_new_thing" in caplog.text


def test_missing_field_is_a_clear_error():
    params = dict(LLAMA2_7B)
    del params["n_heads"]
    with pytest.raises(UserError, match=r"params.json: missing required field\(s\) n_heads"):
        ModelArgs.from_params(params)


@pytest.mark.parametrize("field, value", [("dim", "4096"), ("n_layers", 32.0),
                                          ("use_scaled_rope", 1), ("norm_eps", "small")])
def test_wrong_type_is_a_clear_error(field, value):
    with pytest.raises(UserError, match=f"field '{field}' must be"):
        ModelArgs.from_params({**LLAMA2_7B, field: value})


def test_inconsistent_shapes_are_rejected():
    with pytest.raises(UserError, match="not divisible by n_heads"):
        ModelArgs.from_params({**LLAMA2_7B, "n_heads": 30})
    with pytest.raises(UserError, match="not a multiple of n_kv_heads"):
        ModelArgs.from_params({**LLAMA2_7B, "n_kv_heads": 5})


def test_vocab_size_from_tokenizer_or_checked_against_it():
    assert ModelArgs.from_params(LLAMA2_7B).with_vocab_size(32000).vocab_size == 32000
    assert ModelArgs.from_params(LLAMA3_8B).with_vocab_size(128256).vocab_size == 128256
    with pytest.raises(UserError, match="vocab_size 128256 does not match the tokenizer's 32000"):
        ModelArgs.from_params(LLAMA3_8B).with_vocab_size(32000)


def test_params_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ModelArgs.from_file(tmp_path / "params.json")
    (tmp_path / "params.json").write_text('{"dim": 64,\n "n_layers": }')
    with pytest.raises(UserError, match="line 2: invalid JSON"):
        ModelArgs.from_file(tmp_path / "params.json")


# Llama 3.2's small models, as Meta's params.json gives them (llama-models' sku_list.py).
LLAMA32_1B = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05,
              "rope_theta": 500000.0, "use_scaled_rope": True}
LLAMA32_3B = {**LLAMA32_1B, "dim": 3072, "n_layers": 28, "n_heads": 24, "ffn_dim_multiplier": 1.0}


@pytest.mark.parametrize("params, model", [(LLAMA32_1B, "1B"), (LLAMA32_3B, "3B")])
def test_llama32_small_models_scale_rope_by_32(params, model):
    """Their params.json names no factor: 32 is theirs (their config.json), not 3.1's 8."""
    args = ModelArgs.from_params(params)
    assert (args.family, args.llama_32_model) == ("Llama 3.2", f"Llama 3.2 {model}")
    assert (args.ffn_hidden_dim, args.context_length) == (8192, 131072)
    factor, why = args.rope_scaling()
    assert factor == 32 and f"Llama 3.2 {model}'s" in why and "config.json says 32" in why


def test_the_rope_factor_is_params_json_s_or_the_flag_s_where_given():
    llama31 = ModelArgs.from_params(LLAMA31_405B)
    assert llama31.family == "Llama 3.1" and llama31.rope_scaling()[0] == 8
    assert ModelArgs.from_params(LLAMA2_7B).rope_scaling() == (None,
                                                              "params.json does not scale RoPE")
    assert ModelArgs.from_params({**LLAMA32_1B, "rope_scaling_factor": 16.0}).rope_scaling() \
        == (16.0, "given")
    flagged = ModelArgs.from_params(LLAMA32_1B).with_rope_scaling(8.0, "params.json")
    assert flagged.rope_scaling() == (8.0, "given")
    assert ModelArgs.from_params(LLAMA32_1B).with_rope_scaling(None, "params.json") \
        == ModelArgs.from_params(LLAMA32_1B)
    with pytest.raises(UserError, match="x/params.json does not scale RoPE"):
        ModelArgs.from_params(LLAMA3_8B).with_rope_scaling(32.0, "x/params.json")
    with pytest.raises(UserError, match="rope_scaling_factor must be at least 1"):
        ModelArgs.from_params({**LLAMA32_1B, "rope_scaling_factor": 0.5})


def test_a_llama31_shape_near_llama32_s_is_not_taken_for_it():
    """Only the exact (dim, layers, heads, KV heads) of 3.2's 1B and 3B get 32."""
    for changed in ({"n_layers": 17}, {"n_kv_heads": 4}, {"use_scaled_rope": False}):
        args = ModelArgs.from_params({**LLAMA32_1B, **changed})
        assert args.llama_32_model is None and args.rope_scaling()[0] in (8, None)


# Llama 3.3 70B's params.json is Llama 3.1 70B's (llama-models' sku_list.py lists both so).
LLAMA33_70B = {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256,
               "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "norm_eps": 1e-05,
               "rope_theta": 500000.0, "use_scaled_rope": True}


def test_llama33_70b_loads_as_llama31_70b():
    args = ModelArgs.from_params(LLAMA33_70B)
    assert (args.family, args.context_length, args.rope_scaling()[0]) == ("Llama 3.1", 131072, 8)
    assert (args.ffn_hidden_dim, args.kv_heads, args.head_dim) == (28672, 8, 128)


# Meta's params.json for what is not a text-only Llama (llama-models' sku_list.py and
# models/llama4/args.py; Scout's as its reference code reads it).
LLAMA31_8B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05,
              "rope_theta": 500000.0, "use_scaled_rope": True}
LLAMA32_11B_VISION = {**LLAMA31_8B, "vision_chunk_size": 448, "vision_max_num_chunks": 4,
                      "vision_num_cross_attention_layers": 8}
LLAMA32_1B_QLORA = {**LLAMA32_1B, "quantization_args": {"group_size": 256},
                    "lora_args": {"rank": 16, "scale": 2.0}}
LLAMA32_1B_SPINQUANT = {**LLAMA32_1B, "quantization_args": {"group_size": 256}}
LLAMA4_SCOUT = {"dim": 5120, "n_layers": 48, "n_heads": 40, "n_kv_heads": 8, "vocab_size": 202048,
                "multiple_of": 2048, "ffn_dim_multiplier": 1.2, "ffn_exp": 4.0,
                "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                "nope_layer_interval": 4, "attention_chunk_size": 8192, "use_qk_norm": True,
                "vision_args": {"image_size": {"height": 336, "width": 336},
                                "patch_size": {"height": 14, "width": 14}, "dim": 1408,
                                "n_layers": 34, "n_heads": 16, "mlp_ratio": 4.0,
                                "output_dim": 4096, "pixel_shuffle_ratio": 0.5},
                "moe_args": {"num_experts": 16, "capacity_factor": 1.0, "auto_scale_F": True,
                             "top_k": 1, "interleave_moe_layer_step": 1},
                "quantization_args": None, "lora_args": None}


@pytest.mark.parametrize("params, says", [
    (LLAMA32_11B_VISION, "a Llama 3.2 Vision checkpoint (vision_chunk_size, vision_max_num_chunks,"
                         " vision_num_cross_attention_layers): llama-gen runs text-only Llama"),
    ({**LLAMA31_8B, "vision_chunk_size": 560}, "a Llama 3.2 Vision checkpoint (vision_chunk_size)"),
    (LLAMA32_1B_QLORA, "a quantized checkpoint (Meta's int4 QLoRA or SpinQuant) "
                       "(quantization_args): llama-gen runs unquantized weights"),
    (LLAMA32_1B_SPINQUANT, "(quantization_args): llama-gen runs unquantized weights"),
    ({**LLAMA32_1B, "lora_args": {"rank": 16, "scale": 2.0}}, "a LoRA checkpoint (lora_args)"),
    (LLAMA4_SCOUT, "a Llama 4 checkpoint (moe_args, use_qk_norm, nope_layer_interval, "
                   "attention_chunk_size, ffn_exp, vision_args): llama-gen runs Llama 1 to 3.3"),
    ({"model": LLAMA4_SCOUT}, "a Llama 4 checkpoint (moe_args"),
    ({**LLAMA31_8B, "num_experts": 16}, "a Llama 4 checkpoint (num_experts)"),
], ids=["vision-11b", "vision-key", "qlora", "spinquant", "lora", "llama4-scout",
        "llama4-nested", "llama4-key"])
def test_meta_checkpoints_that_are_not_a_text_llama_are_refused_by_name(params, says):
    with pytest.raises(UserError) as refused:
        ModelArgs.from_params(params, "ckpt/params.json")
    assert str(refused.value).startswith("ckpt/params.json: ") and says in str(refused.value)
    assert "\n" not in str(refused.value)


def test_meta_s_off_values_of_those_keys_are_a_text_llama(caplog):
    """Meta's ModelArgs defaults (vision_chunk_size -1: no vision; nulls; use_qk_norm false)."""
    off = {"vision_chunk_size": -1, "vision_num_cross_attention_layers": -1,
           "quantization_args": None, "lora_args": None, "moe_args": None, "use_qk_norm": False}
    with caplog.at_level(logging.WARNING):
        assert ModelArgs.from_params({**LLAMA31_8B, **off}) == ModelArgs.from_params(LLAMA31_8B)
    assert "vision_chunk_size" in caplog.text  # unknown to us, so it still warns


def test_an_explicit_ffn_width_and_rope_bands_override_meta_s():
    """The fields a config.json sets; params.json's own computation stays the default."""
    args = ModelArgs.from_params({**LLAMA31_8B, "intermediate_size": 8640,
                                  "rope_low_freq_factor": 2.0, "rope_high_freq_factor": 8.0,
                                  "rope_original_context": 4096, "trained_context": 2048})
    assert (args.ffn_hidden_dim, args.context_length) == (8640, 2048)
    default = ModelArgs.from_params(LLAMA31_8B)
    assert (default.ffn_hidden_dim, default.rope_low_freq_factor, default.rope_high_freq_factor,
            default.rope_original_context, default.tie_word_embeddings) == (
        14336, 1.0, 4.0, 8192, False)
    with pytest.raises(UserError, match="low_freq_factor 4 must be positive and below"):
        ModelArgs.from_params({**LLAMA31_8B, "rope_low_freq_factor": 4.0})
    with pytest.raises(UserError, match="intermediate_size must be positive"):
        ModelArgs.from_params({**LLAMA31_8B, "intermediate_size": 0})
