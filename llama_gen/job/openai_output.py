"""OpenAI batch files, the output side: a request's whole answer, or its error, as one batch
output line, and which custom_id a written line completes. Plain Python on plain data.

Facts this module relies on:
- An output line is `{"id", "custom_id", "response": {"status_code", "request_id", "body"} |
  null, "error": {"code", "message"} | null}` (BatchRequestOutput in openai/openai-openapi;
  vLLM's BatchRequestOutput/BatchResponseData). OpenAI writes a request it rejected as response
  {status_code 400, body {"error": {message, type, param, code}}} with error null
  (openai/openai-openapi#302), and error {code, message} with response null for requests that
  never ran; vLLM writes response {status_code 400, body null} with error set. `error_line`
  fills both, so code that checks either field sees the failure.
- The bodies are openai-python's `ChatCompletion` (object "chat.completion"; choices[{index,
  message{role "assistant", content}, logprobs{content[ChatCompletionTokenLogprob{token, logprob,
  bytes, top_logprobs[{token, logprob, bytes}]}]} | null, finish_reason}]) and `Completion`
  (object "text_completion"; choices[{text, index, logprobs{tokens, token_logprobs,
  top_logprobs[{token: logprob}], text_offset} | null, finish_reason}]), each with usage
  {prompt_tokens, completion_tokens, total_tokens} (src/openai/types/chat/chat_completion.py,
  chat_completion_token_logprob.py, completion.py, completion_choice.py, completion_usage.py).
  With n > 1 the prompt is counted once and the choices' tokens are summed (vLLM's
  serving_completion/serving_chat do the same).
- A log-probability of -inf is written as -9999.0 (OpenAI's documented floor; vLLM clamps
  likewise). text_offset counts from the start of the prompt (OpenAI's legacy completions; vLLM
  counts from the completion's start).

Neither API resumes a batch; here a request is done once its output line is whole (`done_key`).
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any, Literal

from .openai_batch import BatchRequest

LOGPROB_FLOOR = -9999.0  # OpenAI's "very unlikely"; -inf is not JSON

# Error codes for `error_line` (OpenAI's words where it has one).
INVALID_REQUEST = "invalid_request"  # parse_batch_request's reasons, a bad setting
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # the prompt does not fit the context


@dataclass(frozen=True)
class Choice:
    """One generated sample of a request, as the job layer hands it over. The per-token lists
    (tokens, logprobs, top_logprobs, token_bytes, in_text) are as long as token_ids; tokens
    are each token's text (a special token's name), so that those in the text join to it
    where the tokenizer allows it."""

    text: str
    finish_reason: Literal["stop", "length"]
    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float] | None = None  # None: the request asked for none
    top_logprobs: list[list[tuple[str, float]]] | None = None  # per position, most likely first
    token_bytes: list[list[int]] | None = None  # None: each token's text in UTF-8
    in_text: list[bool] | None = None  # per token: its text is in `text` (None: every one's)


def digest(custom_id: str) -> str:
    return hashlib.sha256(custom_id.encode("utf-8")).hexdigest()[:24]


def request_id(custom_id: str) -> str:
    """The response's request_id: the same for a custom_id in every run."""
    return "req_" + digest(custom_id)


def output_id(custom_id: str) -> str:
    """The output line's id: the same for a custom_id in every run, so a resume keeps it."""
    return "batch_req_" + digest(custom_id)


def response_line(request: BatchRequest, choices: list[Choice], prompt_tokens: int, model: str,
                  request_id: str, created: int) -> dict[str, Any]:
    """A request's whole output line (status 200): choices in index order; usage counts the
    prompt once and every choice's tokens. The body names the request's model, else `model`."""
    completion_tokens = sum(len(c.token_ids) for c in choices)
    chat = request.endpoint == "chat"
    body = {
        "id": ("chatcmpl-" if chat else "cmpl-") + digest(request.custom_id),
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": request.model or model,
        "choices": [chat_choice(i, c) if chat else completion_choice(i, c, request.prompt)
                    for i, c in enumerate(choices)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    return {"id": output_id(request.custom_id), "custom_id": request.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body},
            "error": None}


def chat_choice(index: int, choice: Choice) -> dict[str, Any]:
    return {"index": index,
            "message": {"role": "assistant", "content": choice.text, "refusal": None},
            "logprobs": chat_logprobs(choice), "finish_reason": choice.finish_reason}


def completion_choice(index: int, choice: Choice, prompt: str | None) -> dict[str, Any]:
    return {"text": choice.text, "index": index,
            "logprobs": completion_logprobs(choice, len(prompt or "")),
            "finish_reason": choice.finish_reason}


def floored(logprob: float) -> float:
    return max(float(logprob), LOGPROB_FLOOR)


def utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def per_token(choice: Choice) -> zip:
    """(token, logprob, bytes, alternatives) per generated token."""
    n = len(choice.token_ids)
    assert choice.logprobs is not None and len(choice.tokens) == len(choice.logprobs) == n, \
        "a choice has one text and one logprob per token"
    tops = choice.top_logprobs if choice.top_logprobs is not None else [[]] * n
    token_bytes = choice.token_bytes or [utf8(t) for t in choice.tokens]
    assert len(tops) == len(token_bytes) == n, "a choice has per-token lists of one length"
    return zip(choice.tokens, choice.logprobs, token_bytes, tops)


def chat_logprobs(choice: Choice) -> dict[str, Any] | None:
    """ChoiceLogprobs: per token its text, logprob, UTF-8 bytes and top alternatives."""
    if choice.logprobs is None:
        return None
    content = [{"token": token, "logprob": floored(logprob), "bytes": token_bytes,
                "top_logprobs": [{"token": t, "logprob": floored(lp), "bytes": utf8(t)}
                                 for t, lp in top]}
               for token, logprob, token_bytes, top in per_token(choice)]
    return {"content": content, "refusal": None}


def completion_logprobs(choice: Choice, prompt_chars: int) -> dict[str, Any] | None:
    """Completions' Logprobs: per token its text, logprob, {text: logprob} of the alternatives
    and the sampled token (up to logprobs + 1 entries), and character offset from the start of
    the prompt."""
    if choice.logprobs is None:
        return None
    tops = []
    for token, logprob, _, top in per_token(choice):
        alternatives = {t: floored(lp) for t, lp in top}
        alternatives.setdefault(token, floored(logprob))
        tops.append(alternatives)
    in_text = choice.in_text or [True] * len(choice.tokens)
    offsets = itertools.accumulate((len(t) if shown else 0
                                    for t, shown in zip(choice.tokens, in_text)),
                                   initial=prompt_chars)
    return {"tokens": list(choice.tokens),
            "token_logprobs": [floored(lp) for lp in choice.logprobs],
            "top_logprobs": tops,
            "text_offset": list(offsets)[:len(choice.tokens)]}


def error_line(custom_id: str, message: str, code: str, status_code: int = 400, *,
               request_id: str) -> dict[str, Any]:
    """A failed request's output line, read as failed by OpenAI's readers (response.status_code
    and response.body.error) and by vLLM's (error set)."""
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return {"id": output_id(custom_id), "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id,
                         "body": {"error": {"message": message, "type": kind, "param": None,
                                            "code": code}}},
            "error": {"code": code, "message": message}}


def done_key(line: dict[str, Any]) -> str | None:
    """The custom_id a written output line completes; None for a failed request's line (the
    next run tries it again, as it does a bad line) or a line of another kind."""
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return None
    response = line.get("response")
    ok = isinstance(response, dict) and response.get("status_code") == 200
    return line["custom_id"] if ok and line.get("error") is None else None
