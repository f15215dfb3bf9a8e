"""OpenAI batch files: request lines from the published examples, the settings they map onto,
readable reasons for what llama-gen cannot answer, and output lines checked field by field
against the published schemas."""
from __future__ import annotations

import json
from typing import Any

import pytest
from openai_schema import (CHAT_CHOICE, CHAT_COMPLETION, COMPLETION, FLOAT, TOP_LOGPROB, USAGE,
                           VLLM_EXAMPLE, MapOf, Nullable, batch_output, problems)

from llama_gen.job.openai_batch import (BatchRequest, body_field, is_batch_request,
                                        parse_batch_request)
from llama_gen.job.openai_output import (CONTEXT_LENGTH_EXCEEDED, Choice, done_key, error_line,
                                         output_id, request_id, response_line)

# --- The published schemas, as field -> type ------------------------------------------------
# Read from openai-python (src/openai/types/chat/chat_completion.py, chat_completion_message.py,
# chat_completion_token_logprob.py, completion.py, completion_choice.py, completion_usage.py)
# and vLLM's BatchRequestOutput / BatchResponseData (vllm/entrypoints/openai/run_batch.py).
# Every field listed is required here; a field the models mark Optional is Nullable.


def test_the_schema_check_catches_what_it_should():
    good = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert problems(good, USAGE) == []
    assert problems({**good, "total_tokens": "3"}, USAGE) == ["line.total_tokens: '3' is not "
                                                              "<class 'int'>"]
    assert problems({"prompt_tokens": 1, "completion_tokens": True}, USAGE) == [
        "line.total_tokens: missing", "line.completion_tokens: True is not <class 'int'>"]
    assert problems({"token": "a", "logprob": -1, "bytes": None}, TOP_LOGPROB) == []
    assert problems([{"a": -1.0}, {"b": "x"}], [MapOf(FLOAT)]) != []
    assert problems({"role": "user", "content": None}, CHAT_CHOICE["message"]) != []


# --- Requests ---------------------------------------------------------------------------------

# OpenAI's batch guide ("Preparing your batch file"), and a completions line per its reference.
OPENAI_CHAT = ('{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", '
               '"body": {"model": "gpt-3.5-turbo-0125", "messages": [{"role": "system", '
               '"content": "You are a helpful assistant."},{"role": "user", "content": '
               '"Hello world!"}],"max_tokens": 1000}}')
OPENAI_COMPLETION = ('{"custom_id": "c-7", "method": "POST", "url": "/v1/completions", "body": '
                     '{"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", '
                     '"max_tokens": 7, "temperature": 0}}')


def request(url: str = "/v1/chat/completions", custom_id: Any = "r-1", **body: Any) -> dict:
    if url == "/v1/chat/completions":
        body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    elif url == "/v1/completions":
        body.setdefault("prompt", "Once upon")
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def parsed(obj: dict) -> BatchRequest:
    result = parse_batch_request(obj)
    assert isinstance(result, BatchRequest), result
    return result


def test_vllm_example_file_parses():
    first, second = (parsed(json.loads(line)) for line in VLLM_EXAMPLE)
    assert first == BatchRequest(
        "request-1", "chat", [{"role": "system", "content": "You are a helpful assistant."},
                              {"role": "user", "content": "Hello world!"}],
        None, {"max_gen_len": 1000}, "meta-llama/Meta-Llama-3-8B-Instruct")
    assert second.custom_id == "request-2"
    assert second.messages[0]["content"] == "You are an unhelpful assistant."


def test_openai_guide_lines_parse():
    chat = parsed(json.loads(OPENAI_CHAT))
    assert (chat.endpoint, chat.model, chat.overrides) == ("chat", "gpt-3.5-turbo-0125",
                                                           {"max_gen_len": 1000})
    completion = parsed(json.loads(OPENAI_COMPLETION))
    assert completion == BatchRequest("c-7", "completion", None, "Say this is a test",
                                      {"max_gen_len": 7, "temperature": 0},
                                      "gpt-3.5-turbo-instruct")


def test_is_batch_request():
    assert is_batch_request(json.loads(OPENAI_CHAT))
    assert is_batch_request({"custom_id": "a", "body": None})
    assert not is_batch_request({"prompt": "hi", "id": 1})
    assert not is_batch_request({"custom_id": "a", "prompt": "hi"})


def test_chat_body_maps_onto_settings():
    body = dict(max_completion_tokens=64, max_tokens=9, temperature=0.7, top_p=0.95, n=3,
                stop=["\n\n", "END"], seed=11, logprobs=True, top_logprobs=5, top_k=40,
                min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
                frequency_penalty=-0.5, min_tokens=2, ignore_eos=False)
    assert parsed(request(**body)).overrides == {
        "max_gen_len": 64, "temperature": 0.7, "top_p": 0.95, "num_samples": 3,
        "stop": ("\n\n", "END"), "seed": 11, "logprobs": True, "top_logprobs": 5, "top_k": 40,
        "min_p": 0.05, "repetition_penalty": 1.1, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "min_tokens": 2, "ignore_eos": False}


@pytest.mark.parametrize("url, body, overrides", [
    ("/v1/chat/completions", {}, {}),  # the run's settings
    ("/v1/chat/completions", {"max_tokens": 9}, {"max_gen_len": 9}),
    ("/v1/chat/completions", {"max_tokens": 9, "max_completion_tokens": None},
     {"max_gen_len": 9}),
    ("/v1/completions", {}, {"max_gen_len": 16}),  # both APIs' default
    ("/v1/completions", {"max_tokens": None}, {"max_gen_len": 16}),
    ("/v1/completions", {"max_tokens": 40}, {"max_gen_len": 40}),
    ("/v1/chat/completions", {"stop": "###"}, {"stop": ("###",)}),
    ("/v1/completions", {"stop": ["a", "b"]}, {"stop": ("a", "b"), "max_gen_len": 16}),
    ("/v1/chat/completions", {"stop": []}, {"stop": ()}),
    ("/v1/chat/completions", {"stop": 5}, {"stop": 5}),  # the settings' rule words the error
    ("/v1/chat/completions", {"logprobs": True}, {"logprobs": True}),
    ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0},
     {"logprobs": False, "top_logprobs": 0}),
    ("/v1/completions", {"logprobs": 3}, {"logprobs": True, "top_logprobs": 3,
                                          "max_gen_len": 16}),
    ("/v1/completions", {"logprobs": 0}, {"logprobs": True, "top_logprobs": 0,
                                          "max_gen_len": 16}),
    ("/v1/chat/completions", {"top_k": -1}, {"top_k": 0}),  # vLLM's older "off"
    ("/v1/chat/completions", {"temperature": None, "top_p": None, "n": None, "seed": None,
                              "stop": None, "logprobs": None, "top_logprobs": None}, {}),
    ("/v1/chat/completions", {"n": 0, "temperature": -1}, {"num_samples": 0, "temperature": -1}),
])
def test_body_fields_and_defaults(url, body, overrides):
    assert parsed(request(url, **body)).overrides == overrides


@pytest.mark.parametrize("endpoint, body, setting, name", [
    ("chat", {"max_tokens": 5}, "max_gen_len", "max_tokens"),
    ("chat", {"max_tokens": 5, "max_completion_tokens": 6}, "max_gen_len",
     "max_completion_tokens"),
    ("chat", {"max_tokens": 5, "max_completion_tokens": None}, "max_gen_len", "max_tokens"),
    ("completion", {"max_tokens": 5, "max_completion_tokens": 6}, "max_gen_len", "max_tokens"),
    ("completion", {}, "max_gen_len", "max_tokens"),  # its default of 16
    ("chat", {"top_logprobs": 3}, "top_logprobs", "top_logprobs"),
    ("completion", {"logprobs": 3}, "top_logprobs", "logprobs"),
    ("chat", {"logprobs": True}, "logprobs", "logprobs"),
    ("chat", {"n": 2}, "num_samples", "n"),
    ("completion", {"stop": "x"}, "stop", "stop"),
    ("chat", {"repetition_penalty": 1.1}, "repetition_penalty", "repetition_penalty"),
])
def test_body_field_names_the_field_behind_a_setting(endpoint, body, setting, name):
    assert body_field(setting, body, endpoint) == name


def test_harmless_fields_are_accepted_and_ignored():
    harmless = dict(model="x", user="u-1", metadata={"k": "v"}, store=False, stream=False,
                    stream_options=None, service_tier="auto", parallel_tool_calls=True,
                    tools=None, tool_choice="none", response_format={"type": "text"},
                    logit_bias={}, function_call=None, echo=False, best_of=1,
                    skip_special_tokens=True, add_generation_prompt=True, stop_token_ids=[],
                    include_stop_str_in_output=False, use_beam_search=False,
                    modalities=["text"], reasoning_effort=None)
    assert parsed(request(**harmless)).overrides == {}


def test_messages_become_plain_text_with_llama_roles():
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "name": "ann", "content": [
                    {"type": "text", "text": "Line one"}, {"type": "text", "text": "line two"}]},
                {"role": "assistant", "content": "Ok."},
                {"role": "user", "content": "More"}]
    assert parsed(request(messages=messages)).messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Line one\nline two"},  # as vLLM joins text parts
        {"role": "assistant", "content": "Ok."}, {"role": "user", "content": "More"}]


def test_a_one_prompt_list_is_that_prompt():
    assert parsed(request("/v1/completions", prompt=["Hello"])).prompt == "Hello"


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.mark.parametrize("obj, reason", [
    ({**request(), "method": "GET"}, 'method must be "POST"'),
    ({k: v for k, v in request().items() if k != "method"}, 'method must be "POST"'),
    (request("/v1/embeddings", input="hi"), 'url "/v1/embeddings" is not supported'),
    (request("/v1/responses"), "llama-gen answers /v1/chat/completions and /v1/completions"),
    ({**request(), "url": None}, "url null is not supported"),
    (request(custom_id=7), "custom_id must be a non-empty string, got 7"),
    (request(custom_id=""), "custom_id must be a non-empty string"),
    ({**request(), "body": "hi"}, 'body must be a JSON object, got "hi"'),
    ({k: v for k, v in request().items() if k != "body"}, "body must be a JSON object, got null"),
    (request(messages=None), "body.messages is missing"),
    (request(messages=[]), "body.messages is not a non-empty list"),
    (request(messages="Hi"), "body.messages is not a non-empty list"),
    (request(messages=["Hi"]), "body.messages[0] must be an object with role and content"),
    (request(messages=[{"role": "tool", "content": "42", "tool_call_id": "c"}]),
     'body.messages[0].role "tool" is not supported'),
    (request(messages=[{"content": "Hi"}]), "body.messages[0].role null is not supported"),
    (request(messages=[{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]),
     "body.messages[1] holds tool calls"),
    (request(messages=[{"role": "user", "content": None}]),
     "body.messages[0].content must be text or a list of text parts, got null"),
    (request(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]),
     "body.messages[0].content has image_url parts: llama-gen reads text only"),
    (request(tools=[{"type": "function", "function": {"name": "f"}}]),
     "body.tools asks for tool calling, which llama-gen does not support"),
    (request(tool_choice="required"), "body.tool_choice asks for tool calling"),
    (request(response_format={"type": "json_object"}),
     "body.response_format asks for structured output"),
    (request(logit_bias={"50256": -100}), "body.logit_bias asks for logit biases"),
    (request(stream=True), "body.stream asks for streaming"),
    (request(COMPLETIONS, echo=True), "body.echo asks for the prompt echoed"),
    (request(COMPLETIONS, best_of=3), "body.best_of asks for best-of ranking"),
    (request(COMPLETIONS, suffix="end"), "body.suffix asks for insertion"),
    (request(guided_json={"type": "object"}), "body.guided_json asks for structured output"),
    (request(skip_special_tokens=False), "body.skip_special_tokens asks for special tokens'"),
    (request(temprature=0.2), "body.temprature is not a /v1/chat/completions parameter that "
                              "llama-gen knows: remove it"),
    (request(top_logprobs=3), "body.top_logprobs needs body.logprobs: true"),
    (request(logprobs=False, top_logprobs=3), "body.top_logprobs needs body.logprobs: true"),
    (request(model=5), "body.model must be a string, got 5"),
    (request(COMPLETIONS, prompt=""), "body.prompt is missing or empty"),
    (request(COMPLETIONS, prompt=None), "body.prompt is missing or empty"),
    (request(COMPLETIONS, prompt=[1212, 318, 257]), "body.prompt given as token ids"),
    (request(COMPLETIONS, prompt=[[1212, 318]]), "body.prompt given as token ids"),
    (request(COMPLETIONS, prompt=["a", "b"]), "body.prompt is a list of 2 prompts"),
    (request(COMPLETIONS, logprobs=True), "body.logprobs must be an integer for "
                                          "/v1/completions"),
    (request(COMPLETIONS, logprobs=2, top_logprobs=2), "body.top_logprobs is a chat parameter"),
])
def test_bad_requests_give_a_readable_reason(obj, reason):
    result = parse_batch_request(obj)
    assert isinstance(result, str), result
    assert reason in result
    assert "\n" not in result and len(result) < 200


# --- Output lines -----------------------------------------------------------------------------

def choice(logprobs: bool = False, top: bool = False, finish: str = "stop",
           text: str = " goal ok") -> Choice:
    """Two generated tokens; the second's logprob is -inf (written as OpenAI's -9999.0)."""
    return Choice(text, finish, [5, 6], [" goal", " ok"],
                  [-0.5, float("-inf")] if logprobs else None,
                  [[(" goal", -0.5), (" x", -1.25)], [(" y", -0.1), (" z", float("-inf"))]]
                  if top else None)


def line_for(url: str, choices: list[Choice], **body: Any) -> dict:
    req = parsed(request(url, custom_id="req-9", **body))
    line = response_line(req, choices, prompt_tokens=4, model="llama-3-8b",
                         request_id="req_abc", created=1_700_000_000)
    return json.loads(json.dumps(line, allow_nan=False))  # as written: JSON, no -inf


MODES = [dict(), dict(logprobs=True), dict(logprobs=True, top=True)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 3])
def test_chat_lines_match_the_schema(mode, n):
    choices = [choice(**mode, finish=("stop", "length")[i % 2], text=f"t{i}") for i in range(n)]
    body = {"n": n, "stop": ["\n"], "logprobs": mode.get("logprobs"),
            "top_logprobs": 2 if mode.get("top") else None}
    line = line_for(CHAT, choices, **body)
    assert problems(line, batch_output(CHAT_COMPLETION)) == []
    out = line["response"]["body"]
    assert (line["custom_id"], line["error"], line["response"]["status_code"]) == (
        "req-9", None, 200)
    assert (out["object"], out["created"], out["model"]) == ("chat.completion", 1_700_000_000,
                                                             "llama-3-8b")
    assert [c["index"] for c in out["choices"]] == list(range(n))
    assert [c["message"]["content"] for c in out["choices"]] == [f"t{i}" for i in range(n)]
    assert out["choices"][-1]["finish_reason"] == ("stop", "length")[(n - 1) % 2]
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 2 * n,
                            "total_tokens": 4 + 2 * n}


def test_chat_logprobs_field_by_field():
    (with_top,) = line_for(CHAT, [choice(logprobs=True, top=True)], logprobs=True,
                           top_logprobs=2)["response"]["body"]["choices"]
    first, second = with_top["logprobs"]["content"]
    assert first == {"token": " goal", "logprob": -0.5, "bytes": [32, 103, 111, 97, 108],
                     "top_logprobs": [
                         {"token": " goal", "logprob": -0.5, "bytes": [32, 103, 111, 97, 108]},
                         {"token": " x", "logprob": -1.25, "bytes": [32, 120]}]}
    assert second["logprob"] == -9999.0 and second["top_logprobs"][1]["logprob"] == -9999.0
    (plain,) = line_for(CHAT, [choice(logprobs=True)], logprobs=True)["response"]["body"][
        "choices"]
    assert [t["top_logprobs"] for t in plain["logprobs"]["content"]] == [[], []]
    (none,) = line_for(CHAT, [choice()])["response"]["body"]["choices"]
    assert none["logprobs"] is None


def test_chat_logprobs_keep_a_tokens_own_bytes():
    """A byte-fallback token that is half a character: its text is U+FFFD, its bytes are real."""
    half = Choice("\u20ac", "length", [228, 131], ["\ufffd", "\ufffd"], [-0.1, -0.2],
                  token_bytes=[[0xE2], [0x82, 0xAC]])
    (out,) = line_for(CHAT, [half], logprobs=True)["response"]["body"]["choices"]
    assert [t["bytes"] for t in out["logprobs"]["content"]] == [[0xE2], [0x82, 0xAC]]
    assert problems(out, CHAT_CHOICE) == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 2])
def test_completion_lines_match_the_schema(mode, n):
    choices = [choice(**mode) for _ in range(n)]
    body = {"n": n, "stop": "\n"}
    if mode.get("logprobs"):
        body["logprobs"] = 2 if mode.get("top") else 0
    line = line_for(COMPLETIONS, choices, **body)
    assert problems(line, batch_output(COMPLETION)) == []
    out = line["response"]["body"]
    assert out["object"] == "text_completion"
    assert [(c["index"], c["text"]) for c in out["choices"]] == [(i, " goal ok") for i in range(n)]
    assert out["usage"]["completion_tokens"] == 2 * n and out["usage"]["prompt_tokens"] == 4


def test_completion_logprobs_field_by_field():
    (out,) = line_for(COMPLETIONS, [choice(logprobs=True, top=True)], prompt="test",
                      logprobs=2)["response"]["body"]["choices"]
    assert out["logprobs"] == {
        "tokens": [" goal", " ok"], "token_logprobs": [-0.5, -9999.0],
        # the alternatives, and the sampled token where it is not among them (logprobs + 1)
        "top_logprobs": [{" goal": -0.5, " x": -1.25},
                         {" y": -0.1, " z": -9999.0, " ok": -9999.0}],
        "text_offset": [4, 9]}  # from the prompt's start, as OpenAI's "test" -> [4]
    (only_sampled,) = line_for(COMPLETIONS, [choice(logprobs=True)], logprobs=0)[
        "response"]["body"]["choices"]
    assert only_sampled["logprobs"]["top_logprobs"] == [{" goal": -0.5}, {" ok": -9999.0}]


def test_the_body_names_the_requested_model_else_the_runs():
    named = line_for(CHAT, [choice()], model="gpt-4o-mini")
    assert named["response"]["body"]["model"] == "gpt-4o-mini"
    assert line_for(CHAT, [choice()])["response"]["body"]["model"] == "llama-3-8b"


def test_error_line_reads_as_failed_to_openai_and_vllm_readers():
    line = json.loads(json.dumps(error_line("req-9", "the prompt has 5000 tokens; the context "
                                            "holds 4096", CONTEXT_LENGTH_EXCEEDED,
                                            request_id="req_abc")))
    assert problems(line, batch_output(Nullable({"error": {
        "message": str, "type": str, "param": Nullable(str), "code": Nullable(str)}}))) == []
    assert line["response"]["status_code"] == 400
    assert line["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert line["error"] == {"code": "context_length_exceeded",
                             "message": "the prompt has 5000 tokens; the context holds 4096"}
    assert line["id"] == output_id("req-9")
    server = error_line("req-9", "out of memory", "server_error", 500, request_id="r")
    assert server["response"]["body"]["error"]["type"] == "server_error"


def test_ids_are_stable_across_runs_and_distinct_per_request():
    assert output_id("request-1") == output_id("request-1")
    assert request_id("request-1") == request_id("request-1") != request_id("request-2")
    assert output_id("request-1") != output_id("request-2")
    assert output_id("request-1").startswith("batch_req_")
    one = line_for(CHAT, [choice()])
    assert one["id"] == output_id("req-9") == line_for(CHAT, [choice(text="other")])["id"]
    assert one["response"]["body"]["id"].startswith("chatcmpl-")
    assert line_for(COMPLETIONS, [choice()])["response"]["body"]["id"].startswith("cmpl-")


def test_done_key_is_the_custom_id_of_a_whole_answer_only():
    assert done_key(line_for(CHAT, [choice()])) == "req-9"
    assert done_key(line_for(COMPLETIONS, [choice(), choice()], n=2)) == "req-9"
    assert done_key(error_line("req-9", "bad", "invalid_request", request_id="r")) is None
    assert done_key({"id": 3, "sample": 0, "completion": "x"}) is None  # a plain output line
    assert done_key({"custom_id": "a", "response": None, "error": {"code": "x"}}) is None
