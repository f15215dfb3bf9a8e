"""Hugging Face config.json files as ModelArgs: the published configs of five Llama releases, the
RoPE each gives against transformers' own, the transformers 5 spelling, and each refusal."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers  # a declared test dependency (pyproject's test extra): never skipped
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from llama_gen.errors import UserError
from llama_gen.model.args import ModelArgs
from llama_gen.model.hf_config import args_from_config, read_config, read_folder_args
from llama_gen.model.transformer import rope_frequencies

# The published config.json files (huggingface.co/<repo>/blob/main/config.json), values copied.
LLAMA2_7B_HF = {
    "_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000}
META_LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0", "use_cache": True, "vocab_size": 128256}
LLAMA31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 128256}
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}
# openlm-research/open_llama_3b: no rope_theta, no num_key_value_heads (transformers' defaults:
# 10000, one KV head per head), and an FFN width (8640) that Meta's rule would not give (8704).
OPEN_LLAMA_3B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 3200, "initializer_range": 0.02,
    "intermediate_size": 8640, "max_position_embeddings": 2048, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 26, "pad_token_id": 0,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000}

# Meta's params.json for the same releases (llama-models' sku_list.py).
META_PARAMS = {
    "Llama-2-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                   "norm_eps": 1e-05, "vocab_size": -1},
    "Meta-Llama-3-8B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                        "vocab_size": 128256, "ffn_dim_multiplier": 1.3, "multiple_of": 1024,
                        "norm_eps": 1e-05, "rope_theta": 500000.0},
    "Llama-3.1-8B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                     "vocab_size": 128256, "ffn_dim_multiplier": 1.3, "multiple_of": 1024,
                     "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
    "Llama-3.2-1B": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8,
                     "vocab_size": 128256, "ffn_dim_multiplier": 1.5, "multiple_of": 256,
                     "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
}

RELEASES = {  # name: (config.json, family, context, RoPE factor, tied head)
    "Llama-2-7b": (LLAMA2_7B_HF, "Llama 2", 4096, None, False),
    "Meta-Llama-3-8B": (META_LLAMA3_8B, "Llama 3", 8192, None, False),
    "Llama-3.1-8B": (LLAMA31_8B_INSTRUCT, "Llama 3.1", 131072, 8.0, False),
    "Llama-3.2-1B": (LLAMA32_1B, "Llama 3.2", 131072, 32.0, True),
    "open_llama_3b": (OPEN_LLAMA_3B, "Llama 1", 2048, None, False),
}


def shape(args: ModelArgs) -> tuple:
    return (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.head_dim,
            args.ffn_hidden_dim, args.norm_eps, args.rope_theta)


@pytest.mark.parametrize("name", RELEASES)
def test_published_configs_give_the_release_s_model(name):
    config, family, context, factor, tied = RELEASES[name]
    args = args_from_config(config)
    assert (args.dim, args.n_layers, args.n_heads) == (config["hidden_size"],
                                                      config["num_hidden_layers"],
                                                      config["num_attention_heads"])
    assert args.kv_heads == config.get("num_key_value_heads", config["num_attention_heads"])
    assert (args.ffn_hidden_dim, args.norm_eps, args.vocab_size) == (
        config["intermediate_size"], config["rms_norm_eps"], config["vocab_size"])
    assert (args.family, args.context_length, args.rope_scaling()[0]) == (family, context, factor)
    assert args.tie_word_embeddings is tied


@pytest.mark.parametrize("name", META_PARAMS)
def test_a_release_s_config_json_and_params_json_give_the_same_model(name):
    hf, meta = args_from_config(RELEASES[name][0]), ModelArgs.from_params(META_PARAMS[name])
    assert shape(hf) == shape(meta)
    assert (hf.family, hf.context_length, hf.rope_scaling()[0]) == (
        meta.family, meta.context_length, meta.rope_scaling()[0])


def test_intermediate_size_is_taken_as_given():
    """open_llama_3b's 8640 is not what Meta's rule makes of dim 3200 (8704)."""
    args = args_from_config(OPEN_LLAMA_3B)
    assert args.ffn_hidden_dim == 8640
    assert ModelArgs(dim=3200, n_layers=26, n_heads=32, vocab_size=32000).ffn_hidden_dim == 8704


def hf_frequencies(config: dict) -> torch.Tensor:
    return LlamaRotaryEmbedding(config=transformers.LlamaConfig.from_dict(config)).inv_freq


OTHER_BANDS = {**LLAMA32_1B, "rope_scaling": {
    "rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
    "original_max_position_embeddings": 4096}}


@pytest.mark.parametrize("config", [*(r[0] for r in RELEASES.values()), OTHER_BANDS],
                         ids=[*RELEASES, "other-bands"])
def test_rope_frequencies_are_transformers_own(config):
    """Scaled or not, with Llama 3.1's bands or others a config.json may give: the frequencies
    our model builds are those transformers builds from the same file."""
    ours = rope_frequencies(args_from_config(config))
    torch.testing.assert_close(ours, hf_frequencies(config), rtol=1e-6, atol=0)


def test_other_bands_are_not_llama31_s():
    """The control: other bands change the frequencies, so the test above can tell them."""
    args = args_from_config(OTHER_BANDS)
    assert (args.rope_low_freq_factor, args.rope_high_freq_factor,
            args.rope_original_context) == (2.0, 8.0, 4096)
    llama31_bands = dataclasses.replace(args, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                                        rope_original_context=8192)
    assert not torch.allclose(rope_frequencies(args), rope_frequencies(llama31_bands))


def test_transformers_5_rope_parameters_read_as_rope_scaling(tmp_path):
    """transformers 5 writes rope_scaling and rope_theta as one `rope_parameters` dict."""
    v5 = {k: v for k, v in LLAMA32_1B.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**LLAMA32_1B["rope_scaling"], "rope_theta": 500000.0}
    assert args_from_config(v5) == args_from_config(LLAMA32_1B)
    default = {**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    assert args_from_config(default).rope_theta == 10000.0
    assert args_from_config(default).rope_scaling()[0] is None
    old_type = {**LLAMA32_1B, "rope_scaling": {
        **{k: v for k, v in LLAMA32_1B["rope_scaling"].items() if k != "rope_type"},
        "type": "llama3"}}
    assert args_from_config(old_type) == args_from_config(LLAMA32_1B)


def test_a_config_the_installed_transformers_wrote(tmp_path):
    """Whichever spelling the installed transformers saves (rope_parameters from 5 on)."""
    written = transformers.LlamaConfig.from_dict(LLAMA32_1B)
    written.save_pretrained(tmp_path)
    assert read_config(tmp_path / "config.json") == args_from_config(LLAMA32_1B)


REFUSALS = [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
     'model_type "mistral", architectures ["MistralForCausalLM"]: not a Llama'),
    ({"architectures": ["LlamaForSequenceClassification"]},
     'architectures ["LlamaForSequenceClassification"]: not a Llama'),
    ({"model_type": "mllama"}, 'model_type "mllama"'),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling's rope_type \"linear\" is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 'rope_type "yarn"'),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_parameters's rope_type \"dynamic\""),
    ({"attention_bias": True}, "attention_bias is true"),
    ({"mlp_bias": True}, "mlp_bias is true"),
    ({"hidden_act": "gelu"}, 'hidden_act "gelu"'),
    ({"head_dim": 128}, "head_dim 128 is not hidden_size / num_attention_heads (2048 / 32)"),
    ({"sliding_window": 4096}, "sliding_window 4096"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}},
     "quantization_config (awq weights)"),
]


@pytest.mark.parametrize("change, words", REFUSALS, ids=[w.split()[0] for _, w in REFUSALS])
def test_what_is_not_a_plain_llama_is_refused_in_one_line(tmp_path, change, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA32_1B, **change}))
    with pytest.raises(UserError) as refused:
        read_config(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message
    assert "llama-gen" in message  # and what it runs instead


def test_the_plain_values_of_those_keys_pass():
    plain = {"head_dim": 64, "sliding_window": None, "quantization_config": None,
             "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
             "partial_rotary_factor": 1.0}
    assert args_from_config({**LLAMA32_1B, **plain}) == args_from_config(LLAMA32_1B)
    unnamed = {k: v for k, v in LLAMA32_1B.items() if k != "architectures"}
    assert args_from_config(unnamed) == args_from_config(LLAMA32_1B)  # as transformers 5 saves


@pytest.mark.parametrize("change, words", [
    ({"hidden_size": None}, r"missing required field\(s\) hidden_size"),
    ({"hidden_size": "2048"}, "field 'hidden_size' must be an integer"),
    ({"rms_norm_eps": "small"}, "field 'rms_norm_eps' must be a number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling of rope_type \"llama3\" lacks low_freq_factor, high_freq_factor"),
    ({"rope_scaling": {**LLAMA32_1B["rope_scaling"], "factor": "32"}},
     "rope_scaling: field 'factor' must be a number"),
    ({"rope_scaling": {**LLAMA32_1B["rope_scaling"], "low_freq_factor": 4.0}},
     "low_freq_factor 4 must be positive and below its high_freq_factor 4"),
    ({"rope_scaling": "llama3"}, "field 'rope_scaling' must be an object"),
    ({"num_key_value_heads": 5}, "n_heads 32 is not a multiple of n_kv_heads 5"),
])
def test_missing_mistyped_or_impossible_values_are_clear_errors(change, words):
    config = {k: v for k, v in {**LLAMA32_1B, **change}.items() if v is not None}
    with pytest.raises(UserError, match=words):
        args_from_config(config, "x/config.json")


def test_a_folder_s_format_is_told_from_its_files(tmp_path):
    with pytest.raises(UserError, match="holds neither params.json .* nor config.json"):
        read_folder_args(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B_INSTRUCT))
    assert read_folder_args(tmp_path) == args_from_config(LLAMA31_8B_INSTRUCT)
    (tmp_path / "params.json").write_text(json.dumps(META_PARAMS["Llama-3.1-8B"]))
    assert read_folder_args(tmp_path) == ModelArgs.from_params(META_PARAMS["Llama-3.1-8B"])


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="config.json: not found; a Hugging Face checkpoint"):
        read_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"hidden_size": 64,\n "vocab_size": }')
    with pytest.raises(UserError, match="line 2: invalid JSON"):
        read_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(UserError, match="expected a JSON object, got list"):
        read_config(tmp_path / "config.json")
