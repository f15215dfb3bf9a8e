"""The OpenAI batch output format as a schema, and a checker of lines against it: what llama-gen's
batch output lines are held to."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Nullable:
    spec: Any


@dataclass(frozen=True)
class MapOf:  # a JSON object of arbitrary keys to spec
    spec: Any


FLOAT = (int, float)


USAGE = {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int}


FINISH = frozenset({"stop", "length"})


TOP_LOGPROB = {"token": str, "logprob": FLOAT, "bytes": Nullable([int])}


TOKEN_LOGPROB = {**TOP_LOGPROB, "top_logprobs": [TOP_LOGPROB]}


CHAT_CHOICE = {"index": int, "finish_reason": FINISH,
               "message": {"role": frozenset({"assistant"}), "content": Nullable(str)},
               "logprobs": Nullable({"content": Nullable([TOKEN_LOGPROB])})}


CHAT_COMPLETION = {"id": str, "object": frozenset({"chat.completion"}), "created": int,
                   "model": str, "choices": [CHAT_CHOICE], "usage": USAGE}


COMPLETION_CHOICE = {"text": str, "index": int, "finish_reason": FINISH,
                     "logprobs": Nullable({"tokens": [str], "token_logprobs": [FLOAT],
                                           "top_logprobs": [MapOf(FLOAT)],
                                           "text_offset": [int]})}


COMPLETION = {"id": str, "object": frozenset({"text_completion"}), "created": int,
              "model": str, "choices": [COMPLETION_CHOICE], "usage": USAGE}


ERROR = {"code": str, "message": str}  # BatchRequestOutput.error in openai-openapi


def batch_output(body: Any) -> dict:
    return {"id": str, "custom_id": str, "error": Nullable(ERROR),
            "response": Nullable({"status_code": int, "request_id": str, "body": body})}


def problems(value: Any, spec: Any, path: str = "line") -> list[str]:
    """Where `value` breaks `spec`; [] when it conforms."""
    if isinstance(spec, Nullable):
        return [] if value is None else problems(value, spec.spec, path)
    if isinstance(spec, frozenset):
        return [] if value in spec else [f"{path}: {value!r} not one of {sorted(spec)}"]
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{path}: {value!r} is not a list"]
        return [p for i, v in enumerate(value) for p in problems(v, spec[0], f"{path}[{i}]")]
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not an object"]
        return [p for k, v in value.items() for p in problems(v, spec.spec, f"{path}.{k}")]
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not an object"]
        missing = [f"{path}.{k}: missing" for k in spec if k not in value]
        return missing + [p for k, s in spec.items() if k in value
                          for p in problems(value[k], s, f"{path}.{k}")]
    ok = isinstance(value, spec) and not (isinstance(value, bool) and spec is not bool)
    return [] if ok else [f"{path}: {value!r} is not {spec}"]


# vLLM's examples/offline_inference/openai_batch/openai_example_batch.jsonl, as published.
VLLM_EXAMPLE = [
    '{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": '
    '{"model": "meta-llama/Meta-Llama-3-8B-Instruct", "messages": [{"role": "system", "content": '
    '"You are a helpful assistant."},{"role": "user", "content": "Hello world!"}],'
    '"max_completion_tokens": 1000}}',
    '{"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions", "body": '
    '{"model": "meta-llama/Meta-Llama-3-8B-Instruct", "messages": [{"role": "system", "content": '
    '"You are an unhelpful assistant."},{"role": "user", "content": "Hello world!"}],'
    '"max_completion_tokens": 1000}}',
]
