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
