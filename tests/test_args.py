import logging

import pytest

from llama_gen.args import ModelArgs
from llama_gen.errors import UserError

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
