"""End to end: a record may set its settings by OpenAI's and vLLM's names (`max_tokens`,
`max_completion_tokens`, `n`), with the effect, the output and the resume checks of llama-gen's
own names."""
from __future__ import annotations

import json

from runs import assert_one_line_error, job_args, read_output, run, write_prompts

from llama_gen.settings import OUTPUT_FIELDS

FLAGS = ["--temperature", "0", "--max_gen_len", "12", "--ignore_eos", "--max_seq_len", "64"]


def test_max_tokens_and_n_act_as_max_gen_len_and_num_samples(tiny_checkpoints, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [
        {"id": "openai", "prompt": "x", "max_tokens": 3, "n": 2},
        {"id": "llama", "prompt": "x", "max_gen_len": 3, "num_samples": 2},
        {"id": "both", "prompt": "x", "max_gen_len": 3, "max_tokens": 3}])
    out = tmp_path / "o.jsonl"
    args = [*job_args(tiny_checkpoints[("llama2", 1)], prompts, out), *FLAGS]
    result = run(args)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("per-record fields taken by their OpenAI/vLLM names: max_tokens "
                               "as max_gen_len, n as num_samples") == 1
    lines = read_output(out)
    assert set(lines) == {("openai", 0), ("openai", 1), ("llama", 0), ("llama", 1)}
    ours = ["completion", *OUTPUT_FIELDS]
    for sample in (0, 1):
        openai, llama = lines["openai", sample], lines["llama", sample]
        assert (openai["completion_tokens"], openai["finish_reason"]) == (3, "length")
        assert {k: v for k, v in openai.items() if k in ours and k != "id"} == \
            {k: v for k, v in llama.items() if k in ours and k != "id"}
        # The record's own fields are echoed as it wrote them, whichever names it used.
        assert list(openai) == ["id", "prompt", "max_tokens", "n", *list(llama)[4:]]
        assert (openai["max_tokens"], openai["n"]) == (3, 2)
    errors = [json.loads(line) for line in (tmp_path / "o.jsonl.errors.jsonl").read_text()
              .splitlines()]
    assert [(e["line"], e["reason"]) for e in errors] == [
        (3, "has both 'max_gen_len' and 'max_tokens' (its OpenAI/vLLM name): give one")]

    # An answered record's max_tokens edited: the resume is refused, as for max_gen_len.
    written = out.read_bytes()
    prompts.write_text(prompts.read_text().replace('"max_tokens": 3, "n"', '"max_tokens": 5, "n"'))
    assert_one_line_error(run(args), "--overwrite")
    assert out.read_bytes() == written
