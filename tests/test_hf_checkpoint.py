"""Hugging Face Llama folders, written by transformers' own `save_pretrained` from tiny random
weights, load and run as transformers runs them: greedy tokens its most likely ones (near-ties
aside) and logprobs within PARITY_ATOL of its own, at model parallel 1 and 2 (under torchrun);
the same weights in Meta's layout give the same tokens; and each broken folder is one clear
error."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from hf_folders import (LLAMA2_ROPE, LLAMA32_ROPE, as_transformers_4,
                        assert_matches_hf, edit_json, hf_llama, save_folder,
                        save_meta_folder)
from hf_tokenizers import write_tokenizer_json
from runs import job_args, read_output, run, write_prompts

from llama_gen.engine.engine import Engine
from llama_gen.engine.requests import Request, SamplingParams
from llama_gen.errors import UserError
from llama_gen.job.build import load_model, read_params
from llama_gen.job.tasks import Prompting
from llama_gen.model.args import ModelArgs
from llama_gen.model.checkpoint import Checkpoint
from llama_gen.model.hf_checkpoint import (HFCheckpoint, generation_eos_ids,
                                           unpermute)
from llama_gen.settings import Settings
from llama_gen.testing.tiny import TINY_LLAMA2
from llama_gen.testing.tiny_tokenizers import (build_sentencepiece_model,
                                               build_tiktoken_model)
from llama_gen.text.tokenizer import load_tokenizer

PROMPTS = ["Hello world", "Guten Morgen, wie geht's?", "a", "The quick brown fox jumps"]
MAX_GEN_LEN = 24
CPU = torch.device("cpu")
# Llama 3.2 1B's make-up, tiny: grouped-query attention, scaled RoPE, a tied head.
TINY_LLAMA32 = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
                "norm_eps": 1e-5, "rope_theta": 500000.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> (folder, transformers' model, tokenizer file): (a) Llama 2-style, SentencePiece,
    safetensors in shards with an index; (b) Llama 3.2-style, one model.safetensors, a
    tokenizer.json only; (c) b's config.json as transformers 4 spelled it, the tiktoken file at
    original/tokenizer.model; (d) a's weights in one pytorch_model.bin."""
    root = tmp_path_factory.mktemp("hf")
    sp = build_sentencepiece_model(root / "sp.model")
    tt = build_tiktoken_model(root / "tiktoken.model")
    llama2 = ModelArgs.from_params({**TINY_LLAMA2, "vocab_size": load_tokenizer(sp).n_words})
    llama32 = ModelArgs.from_params({**TINY_LLAMA32, "vocab_size": load_tokenizer(tt).n_words})
    a = hf_llama(llama2, sp, LLAMA2_ROPE, tied=False)
    b = hf_llama(llama32, tt, LLAMA32_ROPE, tied=True, seed=1)
    made = {
        "llama2-sharded": (save_folder(a, root / "a", sp, max_shard_size="60KB"), a, sp),
        "llama32-tied": (save_folder(b, root / "b", tt, tokenizer_at=None), b,
                         write_tokenizer_json(tt, root / "b")),
        "llama32-transformers4": (save_folder(b, root / "c", tt, "original/tokenizer.model"), b,
                                  tt),
        "llama2-bin": (save_folder(a, root / "d", sp, bin_file=True), a, sp),
    }
    edit_json(root / "c" / "config.json", as_transformers_4)
    return made


def greedy(folder, tokenizer_path, dist) -> list:
    """The prompts' greedy completions with logprobs, this process's model loaded from
    `folder`."""
    tokenizer = load_tokenizer(tokenizer_path)
    model = load_model(folder, tokenizer, dist, torch.float32)
    engine = Engine(model, stop_ids=tokenizer.stop_ids, max_batch_size=4, max_seq_len=64)
    params = SamplingParams(temperature=0.0, max_gen_len=MAX_GEN_LEN, logprobs=True)
    done = engine.generate([Request(tokenizer.encode(p, bos=True), params, tag=i)
                            for i, p in enumerate(PROMPTS)])
    return sorted(done, key=lambda c: c.request.tag)


def test_folders_are_as_described(folders):
    a, b, c, d = (folders[k][0] for k in ("llama2-sharded", "llama32-tied",
                                          "llama32-transformers4", "llama2-bin"))
    assert len(list(a.glob("model-*-of-*.safetensors"))) > 2
    assert (a / "model.safetensors.index.json").is_file()
    assert (b / "model.safetensors").is_file() and not list(b.glob("*.index.json"))
    config_b, config_c = (json.loads((f / "config.json").read_text()) for f in (b, c))
    assert config_b["tie_word_embeddings"] and config_b["rope_parameters"]["factor"] == 32
    assert "rope_scaling" not in config_b and "rope_parameters" not in config_c
    assert config_c["rope_scaling"]["factor"] == 32 and config_c["rope_theta"] == 500000
    assert [p.name for p in d.glob("*.bin")] == ["pytorch_model.bin"]
    assert not list(d.glob("*.safetensors"))


@pytest.mark.parametrize("name", ["llama2-sharded", "llama32-tied", "llama32-transformers4",
                                  "llama2-bin"])
def test_one_process_runs_as_transformers(folders, single_process, name):
    folder, reference, tokenizer = folders[name]
    completions = greedy(folder, tokenizer, single_process)
    assert sum(len(c.tokens) for c in completions) > 2 * len(PROMPTS)
    for c in completions:
        stop = c.stop_reason if c.finish_reason == "stop" else None
        assert_matches_hf(reference, c.request.prompt_tokens, c.tokens, c.logprobs, stop)


@pytest.mark.parametrize("name", ["llama2-sharded", "llama32-tied"])
def test_model_parallel_2_under_torchrun_runs_as_transformers(folders, tmp_path, name):
    """(a): the embedding split on dim across ranks, read shard file by shard file; (b): the
    tied head is the embedding's vocabulary slice on each rank, the GQA heads are cut before
    they are un-permuted."""
    folder, reference, tokenizer_path = folders[name]
    tokenizer = load_tokenizer(tokenizer_path)
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "out.jsonl"
    result = run([*job_args(folder, prompts, out),  # the folder's own tokenizer, found
                  "--temperature", "0", "--max_gen_len", str(MAX_GEN_LEN), "--logprobs",
                  "--max_seq_len", "64", "--model_parallel_size", "2"], nproc=2)
    assert result.returncode == 0, result.stderr
    lines = read_output(out)
    assert len(lines) == len(PROMPTS)
    for (i, _), line in lines.items():
        stop = line.get("stop_reason") if line["finish_reason"] == "stop" else None
        assert_matches_hf(reference, tokenizer.encode(PROMPTS[i - 1], bos=True),
                          line["token_ids"], line["logprobs"],
                          stop if isinstance(stop, int) else None)


def test_two_ranks_slices_join_into_one_ranks(folders):
    """At model parallel 2, every split weight of each rank is its half of the whole, the
    query and key heads un-permuted per rank as the whole is."""
    for name, vocab_parallel in (("llama2-sharded", False), ("llama32-tied", True)):
        folder, _, tokenizer = folders[name]
        args = read_params(folder, load_tokenizer(tokenizer))
        ckpt = HFCheckpoint.open(folder, args, vocab_parallel_if_unsplit=vocab_parallel)
        whole = ckpt.state_dict_for(0, 1, CPU, torch.float32)
        halves = [ckpt.state_dict_for(r, 2, CPU, torch.float32) for r in range(2)]
        assert whole.keys() == halves[0].keys()
        for key, weight in whole.items():
            if weight.dim() == 1:
                assert all(torch.equal(h[key], weight) for h in halves)
                continue
            dim = next(d for d in range(2) if halves[0][key].shape[d] != weight.shape[d])
            assert torch.equal(torch.cat([h[key] for h in halves], dim=dim), weight), key


@pytest.mark.parametrize("name, params, vocab_parallel", [
    ("llama2-sharded", TINY_LLAMA2, False),
    ("llama32-tied", {**TINY_LLAMA32, "use_scaled_rope": True, "rope_scaling_factor": 32.0,
                      "trained_context": 4096, "rope_original_context": 64}, True)])
def test_meta_layout_of_the_same_weights_gives_the_same_tokens(folders, single_process,
                                                               tmp_path, name, params,
                                                               vocab_parallel):
    folder, reference, tokenizer = folders[name]
    args = read_params(folder, load_tokenizer(tokenizer))
    meta = save_meta_folder(reference, tmp_path / "meta", {**params,
                                                           "vocab_size": args.vocab_size},
                            args, tokenizer, vocab_parallel)
    hf_state = HFCheckpoint.open(folder, args, vocab_parallel).state_dict_for(0, 1, CPU,
                                                                             torch.float32)
    meta_state = Checkpoint.open(meta, args, vocab_parallel).state_dict_for(0, 1, CPU,
                                                                            torch.float32)
    assert hf_state.keys() == meta_state.keys()
    assert all(torch.equal(hf_state[k], meta_state[k]) for k in hf_state)
    hf_run, meta_run = (greedy(f, tokenizer, single_process) for f in (folder, meta))
    assert [c.tokens for c in hf_run] == [c.tokens for c in meta_run]


def test_unpermute_undoes_transformers_permutation():
    """transformers' converter (convert_llama_weights_to_hf.py's `permute`), undone per head."""
    n, hd, dim = 3, 8, 5
    meta = torch.randn(n * hd, dim)
    hf = meta.view(n, hd // 2, 2, dim).transpose(1, 2).reshape(n * hd, dim)
    assert torch.equal(unpermute(hf, hd), meta)
    assert not torch.equal(hf, meta)


def test_generation_configs_eos_ids_join_the_stop_ids(folders, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(folders["llama32-tied"][0], folder)
    tokenizer = load_tokenizer(folders["llama32-tied"][2])
    settings = Settings(ckpt_dir=folder, prompt_path=tmp_path / "p.jsonl",
                        out_path=tmp_path / "o.jsonl")
    args = read_params(folder, tokenizer)
    (folder / "generation_config.json").unlink()
    assert generation_eos_ids(folder, tokenizer.n_words) == frozenset()
    without = Prompting.for_run(settings, tokenizer, args).stop_ids
    for eos, ids in ((7, {7}), ([5, 6, 9], {5, 6, 9}), (None, set())):
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        assert generation_eos_ids(folder, tokenizer.n_words) == ids
        assert Prompting.for_run(settings, tokenizer, args).stop_ids == without | ids
    for eos, error in ((tokenizer.n_words, f"eos_token_id {tokenizer.n_words} is not among the "
                                           f"tokenizer's {tokenizer.n_words} tokens"),
                       ([1, -1], "eos_token_id -1 is not among"),
                       ("2", 'eos_token_id "2" is neither a token id nor a list')):
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        with pytest.raises(UserError, match=re.escape(error)):
            Prompting.for_run(settings, tokenizer, args)


def broken(folders, tmp_path, name: str):
    """A copy of a folder, to break, its args and tokenizer."""
    folder = tmp_path / name
    shutil.copytree(folders[name][0], folder)
    return folder, load_tokenizer(folders[name][2])


def test_untied_folder_without_its_head_is_refused(folders, tmp_path):
    folder, tokenizer = broken(folders, tmp_path, "llama32-tied")
    edit_json(folder / "config.json", lambda c: {**c, "tie_word_embeddings": False})
    with pytest.raises(UserError, match="no lm_head.weight in the weight files, and config.json's "
                                        "tie_word_embeddings is false"):
        HFCheckpoint.open(folder, read_params(folder, tokenizer), True)


def test_a_shard_the_index_lists_but_the_folder_lacks_is_named(folders, tmp_path):
    folder, tokenizer = broken(folders, tmp_path, "llama2-sharded")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(UserError, match=f"{shard.name}, listed in model.safetensors.index.json, "
                                        "is missing: copy it from the download"):
        HFCheckpoint.open(folder, read_params(folder, tokenizer), False)


def test_a_weight_of_another_shape_is_named_with_its_file(folders, tmp_path):
    folder, tokenizer = broken(folders, tmp_path, "llama32-tied")
    edit_json(folder / "config.json", lambda c: {**c, "intermediate_size": 160})
    with pytest.raises(UserError, match=r"model.safetensors: model.layers.0.mlp.gate_proj.weight "
                                        r"has shape \(192, 64\), expected \(160, 64\)"):
        HFCheckpoint.open(folder, read_params(folder, tokenizer), True)


def test_missing_and_unexpected_tensors_are_listed(folders, tmp_path):
    folder, tokenizer = broken(folders, tmp_path, "llama2-bin")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # ignored
    torch.save(state, folder / "pytorch_model.bin")
    args = read_params(folder, tokenizer)
    HFCheckpoint.open(folder, args, False)
    state["model.layers.2.mlp.up_proj.weight"] = state.pop("model.layers.1.mlp.up_proj.weight")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="do not match config.json \\(missing model.layers.1.mlp."
                                        "up_proj.weight; unexpected model.layers.2.mlp.up_proj"):
        HFCheckpoint.open(folder, args, False)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match="no model.safetensors, model.safetensors.index.json, "
                                        "pytorch_model.bin or pytorch_model.bin.index.json"):
        HFCheckpoint.open(folder, args, False)


def test_a_tied_head_is_the_embedding_s_own_tensor(folders, single_process):
    """Llama 3.2's tied head holds no copy of the embedding (its vocabulary rows are the same
    on every rank), and the plan counts it once; an untied head keeps its own weights."""
    from llama_gen.engine.memory import weight_bytes
    folder, _, tokenizer_path = folders["llama32-tied"]
    tied = load_model(folder, load_tokenizer(tokenizer_path), single_process, torch.float32)
    assert tied.output.weight is tied.tok_embeddings.weight
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tied.state_dict().values()}
    assert weight_bytes(tied.args, 1, 4) == sum(storages.values())
    folder, _, tokenizer_path = folders["llama2-sharded"]
    untied = load_model(folder, load_tokenizer(tokenizer_path), single_process, torch.float32)
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
