"""OpenAI batch files through the job: a request's samples held until its one output line can
be written, exactly once across interruptions; then end to end through the `llama-gen` command
on vLLM's example file and a /v1/completions file, every line checked against the published
schemas (test_openai_batch.py)."""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from near_ties import assert_same_but_near_ties, near_tie, redraw
from openai_schema import (CHAT_COMPLETION, COMPLETION, ERROR, VLLM_EXAMPLE, Nullable, batch_output,
                           problems)
from runs import job_args, kill_when, launch, run

from llama_gen.engine.engine import Engine
from llama_gen.engine.requests import Completion, Request, SamplingParams
from llama_gen.engine.sampling import derive_seed
from llama_gen.job.build import load_model
from llama_gen.job.feed import pending_records
from llama_gen.job.lines import batch_choice
from llama_gen.job.openai_batch import BatchRequest
from llama_gen.job.openai_output import response_line
from llama_gen.job.output import recover_output
from llama_gen.job.prepare import count_pending
from llama_gen.job.records import BadLine, Record
from llama_gen.job.results import Results
from llama_gen.job.run_end import Interrupted
from llama_gen.job.tasks import Generation, Prompting, RecordSample, TokenizedRecord
from llama_gen.runtime.distributed import Dist
from llama_gen.settings import Settings
from llama_gen.testing.tiny_tokenizers import build_tiktoken_model
from llama_gen.text.tokenizer import load_tokenizer

ONE_PROCESS = Dist(rank=0, world_size=1, device=torch.device("cpu"), backend="gloo",
                   model_parallel_size=1)
CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
SCHEMA = {CHAT_URL: batch_output(CHAT_COMPLETION), COMPLETIONS_URL: batch_output(COMPLETION)}
ERROR_ENTRY = batch_output(Nullable({"error": {"message": str, "type": str,
                                               "param": Nullable(str), "code": str}}))


def batch_line(custom_id: str, url: str = COMPLETIONS_URL, **body) -> dict:
    if url == CHAT_URL:
        body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    else:
        body.setdefault("prompt", "Once upon a time")
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def write_lines(path: Path, *lines: dict | str) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False))
                            + "\n" for x in lines), encoding="utf-8")
    return path


def output_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def answers(path: Path) -> dict[str, dict]:
    """The output's batch lines by custom_id; each custom_id once."""
    lines = [line for line in output_lines(path) if "custom_id" in line]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a request was answered twice"
    return by_id


def choices(line: dict) -> list[dict]:
    return line["response"]["body"]["choices"]


def n_tokens(choice: dict) -> int:
    """A choice's tokens, counted in its logprobs (chat's or completions')."""
    logprobs = choice["logprobs"]
    return len(logprobs["content"] if "content" in logprobs else logprobs["tokens"])


# --- the job's units ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_tiktoken_model(tmp_path_factory.mktemp("tok") / "t.model"))


def settings(tmp_path: Path, *lines: dict | str, **kwargs) -> Settings:
    prompts = write_lines(tmp_path / "prompts.jsonl", *lines)
    return Settings(ckpt_dir=tmp_path, prompt_path=prompts, out_path=tmp_path / "out.jsonl",
                    **kwargs)


def generation(s: Settings, tokenizer=None) -> Generation:
    return Generation(s, Prompting(tokenizer, None))


def works(s: Settings, tokenizer, done=frozenset()) -> list[TokenizedRecord | BadLine]:
    return list(pending_records(generation(s, tokenizer), set(done)))


def completion_of(request: Request, tokenizer, text: str, stop_reason=None) -> Completion:
    ids = tokenizer.encode(text, bos=False)
    p = request.params
    logprobs = [-0.5] * len(ids) if p.logprobs else None
    top = [[(t, -0.5), (tokenizer.eos_id, -3.0)] for t in ids] if p.top_logprobs else None
    return Completion(request, ids, logprobs, "stop" if stop_reason else "length",
                      len(request.prompt_tokens), stop_reason, top)


def test_a_requests_line_waits_for_all_its_samples_then_holds_them_in_order(tmp_path, tokenizer,
                                                                           stop):
    s = settings(tmp_path, batch_line("r-1", n=2, logprobs=1, model="m"))
    [work] = works(s, tokenizer)
    first, second = generation(s).requests(work)
    results = Results(generation(s, tokenizer), ONE_PROCESS, total=2)
    try:
        results.finished(completion_of(second, tokenizer, " two"))
        assert s.out_path.read_bytes() == b""  # sample 0 is not in yet
        results.finished(completion_of(first, tokenizer, " one"))
        results.end(stop)
    finally:
        results.close()
    [line] = output_lines(s.out_path)
    assert problems(line, SCHEMA[COMPLETIONS_URL]) == []
    assert [(c["index"], c["text"]) for c in choices(line)] == [(0, " one"), (1, " two")]
    assert line["response"]["body"]["model"] == "m"
    assert (results.writer.counts.samples,
            count_pending(generation(s), recover_output(s.out_path))) == (2, 0)


def test_a_stop_drops_a_partial_answer_and_the_next_run_makes_the_whole_request(
        tmp_path, tokenizer, stop):
    s = settings(tmp_path, batch_line("r-1", n=3), batch_line("r-2"))
    work_1, work_2 = works(s, tokenizer)
    results = Results(generation(s, tokenizer), ONE_PROCESS, total=4)
    try:
        task = generation(s)
        for request in [*task.requests(work_1)][:2] + [*task.requests(work_2)]:
            results.finished(completion_of(request, tokenizer, " x"))
        signal.raise_signal(signal.SIGTERM)  # caught: only noted
        with pytest.raises(Interrupted, match="stopped by SIGTERM: 3 sample"):
            results.end(stop, stopped="SIGTERM")
    finally:
        results.close()
    assert [line["custom_id"] for line in output_lines(s.out_path)] == ["r-2"]
    done = recover_output(s.out_path)
    assert count_pending(generation(s), done) == 3
    [again] = works(s, tokenizer, done)
    assert (again.record.id, again.samples) == ("r-1", [0, 1, 2])


def test_a_choice_is_the_jobs_own_text_with_its_tokens(tokenizer):
    eot = tokenizer.special_tokens["<|eot_id|>"]
    rec = Record(1, "r-1", "Say", {})
    prompt = tokenizer.encode("Say", bos=True)
    ids = tokenizer.encode(" a", bos=False) + [eot] + tokenizer.encode(" b. c", bos=False)
    params = SamplingParams(stop=(".",), logprobs=True, top_logprobs=1)
    top = [[(eot, -2.0)] for _ in ids]
    done = Completion(Request(prompt, params, tag=RecordSample(rec, 0)), ids, [-1.0] * len(ids),
                      "stop", len(prompt), ".", top)
    choice = batch_choice(done, tokenizer)
    assert (choice.text, choice.finish_reason, choice.token_ids) == (" a b", "stop", ids)
    at = len(tokenizer.encode(" a", bos=False))
    # One name for a special token, sampled or an alternative, in its text and its bytes; the
    # text leaves it out.
    assert choice.tokens[at] == "<|eot_id|>" and choice.top_logprobs[0] == [("<|eot_id|>", -2.0)]
    assert bytes(choice.token_bytes[at]) == b"<|eot_id|>"
    assert choice.in_text[at] is False and choice.in_text.count(False) == 1
    kept = "".join(t for t, shown in zip(choice.tokens, choice.in_text) if shown)
    assert kept.startswith(" a b.")
    assert choice.logprobs == [-1.0] * len(ids)
    line = response_line(BatchRequest("r-1", "completion", None, "Say"), [choice], 3,
                         model="tiny", request_id="x", created=0)
    offsets = line["response"]["body"]["choices"][0]["logprobs"]["text_offset"]
    assert offsets[at] == offsets[at + 1] == len("Say a")  # the name takes no room in the text


def test_batch_requests_are_counted_shared_and_reported_like_records(tmp_path, tokenizer):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 10
    s = settings(tmp_path, {"prompt": "plain", "completion": "gold", "id": "p"},
                 batch_line("r-1", n=3, stop="x"), batch_line("r-2", prompt=long_prompt),
                 batch_line("r-3", url=CHAT_URL, n=0), completion_key="generated",
                 max_seq_len=32)
    assert count_pending(generation(s), set()) == 1 + 3 + 1
    assert count_pending(generation(s), {("r-1", 0), ("r-1", 1), ("r-1", 2)}) == 2
    items = works(s, tokenizer)
    assert [type(x).__name__ for x in items] == ["TokenizedRecord", "TokenizedRecord", "BadLine",
                                                 "BadLine"]
    too_long, bad_n = items[2:]
    assert bad_n.custom_id == "r-3" and bad_n.reason == "body.n must be an integer in [1, 1024], got 0"
    assert isinstance(too_long, BadLine) and too_long.max_seq_len == 32
    entry = too_long.as_json()
    assert (entry["custom_id"], entry["error"]["code"], entry["line"], entry["max_seq_len"]) == (
        "r-2", "context_length_exceeded", 3, 32)


def test_a_batch_request_ignores_the_runs_echo_and_chat_flags(tmp_path, tokenizer):
    s = settings(tmp_path, batch_line("r-1", prompt="Hello", seed=4, n=2), echo=True,
                 chat=True)
    [work] = works(s, tokenizer)
    assert work.tokens == tokenizer.encode("Hello", bos=True)  # raw, not a chat turn
    requests = list(generation(s).requests(work))
    assert [r.params.echo for r in requests] == [False, False]
    assert [r.params.seed for r in requests] == [derive_seed(4, "r-1", i) for i in range(2)]


def test_a_batch_bad_line_keeps_its_custom_id_through_a_part_file():
    """Another replica's bad line reaches the errors file through its errors part, as JSON."""
    bad = BadLine(3, "the prompt has 90 tokens", "{}", max_seq_len=64, custom_id="r-1")
    entry = json.loads(json.dumps(bad.as_json()))
    assert entry["custom_id"] == "r-1" and entry["line"] == 3 and entry["max_seq_len"] == 64


# --- end to end through the command ------------------------------------------------------------

COMPLETIONS = [
    batch_line("c-sampled", prompt="The cat", n=2, stop=[" the", "\n"], seed=5, temperature=1,
               logprobs=2, max_tokens=8, model="llama-tiny"),
    batch_line("c-greedy", prompt="Once", temperature=0, logprobs=0, max_tokens=6),
    batch_line("chat-logprobs", url=CHAT_URL, n=2, logprobs=True, top_logprobs=2, max_tokens=5,
               seed=1),
]
BAD = [
    batch_line("c-embed", url="/v1/embeddings", input="x"),
    batch_line("c-zero", n=0),
    "not json",
    batch_line("c-long", prompt="word " * 80, max_tokens=3),
]
ANSWERED = {"request-1", "request-2", "c-sampled", "c-greedy", "chat-logprobs"}
BASE = ["--max_seq_len", "64", "--max_batch_size", "3"]


@pytest.fixture(scope="module")
def answered(tiny_checkpoints, tmp_path_factory):
    """vLLM's example file, completions and bad requests, and a plain record: one run."""
    folder = tmp_path_factory.mktemp("answered")
    prompts = write_lines(folder / "batch.jsonl", *VLLM_EXAMPLE, *COMPLETIONS, *BAD,
                          {"prompt": "plain", "id": "p", "max_gen_len": 3})
    out = folder / "out.jsonl"
    args = [*job_args(tiny_checkpoints[("llama3", 1)], prompts, out), *BASE]
    result = run(args)
    assert result.returncode == 0, result.stderr
    return args, out


def test_every_request_has_one_line_in_its_endpoints_format(answered):
    _, out = answered
    lines = answers(out)
    assert set(lines) == ANSWERED
    urls = {json.loads(x)["custom_id"]: json.loads(x)["url"] for x in VLLM_EXAMPLE}
    urls.update({x["custom_id"]: x["url"] for x in COMPLETIONS})
    for custom_id, line in lines.items():
        assert problems(line, SCHEMA[urls[custom_id]]) == [], custom_id
        assert line["error"] is None and line["response"]["status_code"] == 200
        usage = line["response"]["body"]["usage"]
        if all(c["logprobs"] for c in choices(line)):  # one entry per token
            assert usage["completion_tokens"] == sum(map(n_tokens, choices(line)))
    [plain] = [line for line in output_lines(out) if "custom_id" not in line]
    assert (plain["id"], plain["sample"]) == ("p", 0)  # a plain record keeps its shape


def test_the_body_settings_shape_the_answers(answered):
    _, out = answered
    lines = answers(out)
    vllm = lines["request-1"]["response"]["body"]
    assert vllm["model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert vllm["usage"]["total_tokens"] <= 64  # max_completion_tokens 1000 meets the context
    sampled = choices(lines["c-sampled"])
    assert [c["index"] for c in sampled] == [0, 1]
    for c in sampled:
        assert " the" not in c["text"] and "\n" not in c["text"]
        assert len(c["logprobs"]["tokens"]) <= 8
        assert all(1 <= len(top) <= 3 for top in c["logprobs"]["top_logprobs"])
        assert c["logprobs"]["text_offset"][0] == len("The cat")
    [greedy] = choices(lines["c-greedy"])
    assert all(len(top) == 1 for top in greedy["logprobs"]["top_logprobs"])  # logprobs 0
    chat = choices(lines["chat-logprobs"])
    assert len(chat) == 2 and all(len(t["top_logprobs"]) == 2
                                  for c in chat for t in c["logprobs"]["content"])


def test_bad_requests_and_a_prompt_too_long_go_to_the_errors_file(answered):
    _, out = answered
    errors = {e.get("custom_id", e["line"]): e
              for e in output_lines(out.with_name("out.jsonl.errors.jsonl"))}
    assert set(errors) == {"c-embed", "c-zero", "c-long", 8}
    for custom_id in ("c-embed", "c-zero", "c-long"):
        assert problems(errors[custom_id], ERROR_ENTRY) == [], custom_id
        assert problems(errors[custom_id]["error"], ERROR) == []
    assert errors["c-zero"]["error"]["message"] == "body.n must be an integer in [1, 1024], got 0"
    assert errors["c-long"]["error"]["code"] == "context_length_exceeded"
    assert errors["c-long"]["max_seq_len"] == 64
    assert set(errors[8]) == {"line", "reason", "text"}  # not JSON: no custom_id to answer
    assert not {"c-embed", "c-zero", "c-long"} & {x.get("custom_id") for x in output_lines(out)}


def test_a_longer_context_answers_the_prompt_too_long_on_resume(answered, tmp_path):
    args, out = answered
    for path in out.parent.glob("out.jsonl*"):
        shutil.copy(path, tmp_path / path.name)
    copy = tmp_path / "out.jsonl"
    before = copy.read_bytes()
    result = run([*args[:5], str(copy), "--max_seq_len", "256", "--max_batch_size", "3"])
    assert result.returncode == 0, result.stderr
    assert copy.read_bytes().startswith(before)
    assert set(answers(copy)) == ANSWERED | {"c-long"}
    errors = output_lines(tmp_path / "out.jsonl.errors.jsonl")
    assert {e.get("custom_id") for e in errors} == {"c-embed", "c-zero", None}


def test_the_same_seed_gives_the_same_choices_alone_and_among_others(answered, tmp_path,
                                                                     tiny_checkpoints,
                                                                     single_process):
    """A request answered alone and among the others draws from its own seed: its choices are
    the same, but for a proven near-tie (alone, it is batched with other neighbours, so its
    logits differ in their last bits); their log-probabilities agree up to rounding."""
    args, out = answered
    alone = write_lines(tmp_path / "alone.jsonl", COMPLETIONS[2])  # a chat: tokens as bytes
    result = run([*args[:3], str(alone), "--out_path", str(tmp_path / "o.jsonl"), *BASE])
    assert result.returncode == 0, result.stderr
    got, want = answers(tmp_path / "o.jsonl")["chat-logprobs"], answers(out)["chat-logprobs"]
    ckpt = tiny_checkpoints[("llama3", 1)]
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    model = load_model(ckpt, tokenizer, single_process, torch.float32)
    s = Settings(ckpt_dir=ckpt, prompt_path=alone, out_path=tmp_path / "x.jsonl")
    task = Generation(s, Prompting.for_run(s, tokenizer, model.args))
    requests = {r.tag.sample: r for w in pending_records(task, set()) for r in task.requests(w)}
    ids = {tokenizer.token_bytes(i): i for i in range(tokenizer.n_words)}
    pairs = []
    for a, b in zip(choices(got), choices(want), strict=True):
        shown = [[t for t in c["logprobs"]["content"] if t["bytes"]] for c in (a, b)]  # no eot
        pairs.append((requests[a["index"]], *([ids[bytes(t["bytes"])] for t in x]
                                              for x in shown)))
        same = next((i for i, (x, y) in enumerate(zip(*shown)) if x["bytes"] != y["bytes"]),
                    min(map(len, shown)))
        assert [x["logprob"] for x in shown[0][:same]] == pytest.approx(
            [y["logprob"] for y in shown[1][:same]], abs=1e-4)
    assert len(pairs) == 2 and all(a for _, a, _ in pairs)
    assert_same_but_near_ties(model, pairs, task.prompting.stop_ids, most=1)


def test_interrupted_and_resumed_each_request_is_answered_once(tiny_checkpoints, tmp_path,
                                                               single_process):
    """SIGINT while requests with 3 samples each are half done: what was whole is kept, the
    rest is made again, and the answers are those of an uninterrupted run (two replicas).

    Greedy answers must be identical. A sampled answer may differ only at a proven near-tie:
    the two runs batch a sequence with different neighbours, so its logits differ by float
    rounding (~1e-6), and a uniform that close to a step of the CDF may draw either token.
    Equality by design would need a batch-invariant forward pass, which the engine does not
    promise; luck is not enough either (about 1 draw in 10 of the tiny model's flat
    distributions lies within 1e-4 of a step). So `near_tie` re-derives the draw at the first
    differing token from the request's own seed and counter: it must give one of the two
    tokens, with the uniform within NEAR_TIE (a hundred times the rounding) of the step
    between them. A wrong seed, counter or filter, or a dropped or repeated token, fails."""
    ckpt = tiny_checkpoints[("llama3", 1)]
    prompts = write_lines(tmp_path / "p.jsonl", *(
        batch_line(f"r{i}", CHAT_URL, messages=[{"role": "user", "content": f"Story {i}:"}], n=3,
                   max_tokens=30, seed=i, temperature=0 if i % 5 == 0 else 1, logprobs=True)
        for i in range(30)))
    args = [*job_args(ckpt, prompts, tmp_path / "o.jsonl"), "--max_batch_size", "4",
            "--keep_special_tokens"]  # every token in the logprobs, so ids come from bytes
    want = run([*args[:5], str(tmp_path / "whole.jsonl"), *args[6:], "--model_parallel_size",
                "1"], nproc=2)
    assert want.returncode == 0, want.stderr
    out = tmp_path / "o.jsonl"
    proc = launch(args, hold_at=3)
    kill_when(proc, out, min_lines=3, sig=signal.SIGINT)
    assert proc.returncode == 128 + signal.SIGINT, "the job finished before it was interrupted"
    before = out.read_bytes()
    assert before.endswith(b"\n") and 3 <= len(answers(out)) < 30
    with out.open("ab") as f:
        f.write(b'{"id": "batch_req_0", "custom_id": "r2", "resp')  # torn, as a crash leaves
    result = run(args)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(before)
    got, whole = answers(out), answers(tmp_path / "whole.jsonl")
    assert set(got) == set(whole) == {f"r{i}" for i in range(30)}
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    ids = {tokenizer.token_bytes(i): i for i in range(tokenizer.n_words)}
    assert len(ids) == tokenizer.n_words
    model = load_model(ckpt, tokenizer, single_process, torch.float32)
    s = Settings(ckpt_dir=ckpt, prompt_path=prompts, out_path=tmp_path / "x.jsonl")
    task = Generation(s, Prompting.for_run(s, tokenizer, model.args))
    requests = {(r.tag.record.id, r.tag.sample): r
                for w in pending_records(task, set()) for r in task.requests(w)}
    key, tokens = next(((k, c["index"]), [ids[bytes(t["bytes"])] for t in content])
                       for k in ("r1", "r2", "r3") for c in choices(got[k])
                       if len(content := c["logprobs"]["content"]) >= 3)
    cdf, u = redraw(model, requests[key], tokens[:2])  # a draw re-derived as it ran
    assert (cdf <= u).sum().item() == tokens[2]
    ties = []
    for custom_id, line in got.items():
        for c, w in zip(choices(line), choices(whole[custom_id]), strict=True):
            if c["message"]["content"] == w["message"]["content"]:
                continue
            assert int(custom_id[1:]) % 5, f"greedy {custom_id} differs"
            a, b = ([ids[bytes(t["bytes"])] for t in x["logprobs"]["content"]] for x in (c, w))
            why = near_tie(model, requests[custom_id, c["index"]], a, b, task.prompting.stop_ids)
            assert why, f"{custom_id} sample {c['index']}: {a} vs {b}"
            ties.append(why)
    assert len(ties) <= 3, ties  # a few at most: rounding moves few draws across a step


def test_near_tie_accepts_only_a_neighbour_across_a_step_near_the_uniform(tiny_checkpoints,
                                                                        single_process):
    """What the comparison above lets through: a completion of the tiny model against copies
    with one token changed to its neighbour id (a near-tie only where the uniform lies within
    NEAR_TIE of the step between them) or to a far one (never), or ended there by a stop."""
    ckpt = tiny_checkpoints[("llama3", 1)]
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    model = load_model(ckpt, tokenizer, single_process, torch.float32)
    request = Request(tokenizer.encode("Story 1:", bos=True),
                      SamplingParams(temperature=1.0, max_gen_len=16, seed=2))
    [done] = Engine(model, (), max_batch_size=1, max_seq_len=64).generate([request])
    a, vocab, stops = done.tokens, model.args.vocab_size, frozenset({tokenizer.eos_id})
    verdicts = [near_tie(model, request, a, a[:j] + [(a[j] + d) % vocab], stops)
                for j in range(len(a)) for d in (-1, 1)]
    assert 0 < sum(map(bool, verdicts)) < len(verdicts) // 4
    assert not any(near_tie(model, request, a, a[:j] + [(a[j] + 50) % vocab], stops)
                   for j in range(len(a)))
    assert not near_tie(model, request, a, a[:3], stops)  # a stop token is far from a[3]
