"""OpenAI batch files, the request side: a request line in, a `BatchRequest` (or the reason it
cannot run) out, so that a file written for the OpenAI Batch API or `vllm run-batch` runs
unchanged. Its output lines are `openai_output`'s. Plain Python on plain data.

Facts this module relies on:
- A request line is `{"custom_id", "method": "POST", "url", "body"}`, `url` one of
  /v1/chat/completions, /v1/completions (OpenAI also has /v1/embeddings, /v1/responses...);
  custom_ids are unique in a file (OpenAI's batch guide and BatchRequestInput; vLLM
  `vllm/entrypoints/openai/run_batch.py`, where method and url are required fields).
- Request fields (openai-python `chat/completion_create_params.py`, `completion_create_params.py`;
  vLLM `chat_completion/protocol.py`, `completion/protocol.py`): chat takes `logprobs` (bool) and
  `top_logprobs` (0-20, needs logprobs true); completions take `logprobs` (an int, at most 5 at
  OpenAI: that many alternatives, plus the sampled token, per position). `stop` is a string or a
  list. Chat's `max_completion_tokens` replaces the deprecated `max_tokens` and wins over it
  (vLLM); completions' `max_tokens` defaults to 16 at both. vLLM adds top_k (-1 or 0 = off),
  min_p, repetition_penalty, min_tokens, ignore_eos.
- Body fields a request leaves out take the run's settings, as vLLM takes the model's generation
  config (Llama 3's is temperature 0.6, top_p 0.9, llama-gen's defaults), except completions'
  max_tokens (16). The body's model is echoed back (vLLM answers with the served model's name).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..values import shown

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # both OpenAI and vLLM

# Body fields that map one to one onto a llama-gen setting, where the body sets them (not null).
SETTING_OF = {"temperature": "temperature", "top_p": "top_p", "n": "num_samples",
              "seed": "seed", "top_k": "top_k", "min_p": "min_p",
              "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
              "frequency_penalty": "frequency_penalty", "min_tokens": "min_tokens",
              "ignore_eos": "ignore_eos"}
# Read by parse_batch_request itself.
READ = frozenset({"messages", "prompt", "model", "max_tokens", "max_completion_tokens", "stop",
                  "logprobs", "top_logprobs"})
# Fields that do not change the text generated: accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                     "stream_options", "prompt_cache_key", "safety_identifier", "request_id",
                     "session_id", "priority", "cache_salt", "include_reasoning",
                     "add_special_tokens"})  # the prompt formats place BOS themselves
# Fields llama-gen cannot honour: what each asks for. Accepted only at a value that asks for
# nothing: null, or the field's values in NO_OP, else false, an empty list or an empty object.
UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "tool calling",
    "function_call": "tool calling",
    "response_format": "structured output", "structured_outputs": "structured output",
    "guided_json": "structured output", "guided_regex": "structured output",
    "guided_choice": "structured output", "guided_grammar": "structured output",
    "guided_decoding_backend": "structured output",
    "logit_bias": "logit biases", "allowed_token_ids": "allowed tokens",
    "bad_words": "banned words", "logprob_token_ids": "logprobs of chosen tokens",
    "stream": "streaming (a batch request is answered whole)",
    "echo": "the prompt echoed in the completion", "suffix": "insertion (a suffix)",
    "best_of": "best-of ranking", "use_beam_search": "beam search",
    "length_penalty": "beam search", "prompt_logprobs": "prompt logprobs",
    "audio": "audio output", "modalities": "audio output", "prediction": "predicted outputs",
    "web_search_options": "web search", "reasoning_effort": "reasoning controls",
    "verbosity": "verbosity controls", "thinking_token_budget": "reasoning controls",
    "stop_token_ids": "stop token ids (stop strings are supported)",
    "include_stop_str_in_output": "the stop string kept in the output",
    "skip_special_tokens": "special tokens' text (the run's --keep_special_tokens)",
    "spaces_between_special_tokens": "special tokens' text",
    "chat_template": "a custom chat template", "chat_template_kwargs": "a custom chat template",
    "add_generation_prompt": "a custom chat template",
    "continue_final_message": "continuing the last message", "documents": "documents (RAG)",
    "truncate_prompt_tokens": "prompt truncation",
    "truncation_side": "prompt truncation", "return_tokens_as_token_ids": "token ids as tokens",
    "return_token_ids": "token ids in the output", "mm_processor_kwargs": "multimodal input",
    "media_io_kwargs": "multimodal input", "vllm_xargs": "vLLM extensions",
    "kv_transfer_params": "vLLM extensions", "ec_transfer_params": "vLLM extensions",
    "repetition_detection": "repetition detection", "watermarking": "watermarking",
}
NO_OP = {"tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
         "response_format": ({"type": "text"},), "best_of": (1,), "length_penalty": (1,),
         "modalities": (["text"],), "skip_special_tokens": (True,),
         "spaces_between_special_tokens": (True,), "add_generation_prompt": (True,)}
CHAT_ROLES = {"system": "system", "developer": "system",  # OpenAI's new name for system
              "user": "user", "assistant": "assistant"}


class Unsupported(ValueError):
    """A request llama-gen cannot answer; the message is the one-line reason."""


@dataclass(frozen=True)
class BatchRequest:
    """One request line. Exactly one of messages (chat) and prompt (completion) is set."""

    custom_id: str
    endpoint: Literal["chat", "completion"]
    messages: list[dict[str, str]] | None  # [{"role", "content"}], content as plain text
    prompt: str | None
    overrides: dict[str, Any] = field(default_factory=dict)  # llama-gen settings, unchecked
    model: str | None = None  # the body's model, echoed back


def is_batch_request(obj: dict) -> bool:
    """Whether a prompt record is a batch request line (it has custom_id and body)."""
    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj


def parse_batch_request(obj: dict[str, Any]) -> BatchRequest | str:
    """The request, or a one-line reason why llama-gen cannot answer it. Settings come back in
    llama-gen's names and types, unchecked: their rules check them."""
    try:
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise Unsupported(f"custom_id must be a non-empty string, got {shown(custom_id)}")
        endpoint = endpoint_of(obj)
        body = obj.get("body")
        if not isinstance(body, dict):
            raise Unsupported(f"body must be a JSON object, got {shown(body)}")
        url = obj["url"]
        for name, value in body.items():
            check_field(name, value, url)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise Unsupported(f"body.model must be a string, got {shown(model)}")
        if endpoint == "chat":
            messages, prompt = chat_messages(body.get("messages")), None
        else:
            messages, prompt = None, completion_prompt(body.get("prompt"))
        return BatchRequest(custom_id, endpoint, messages, prompt,
                            settings_of(body, endpoint), model)
    except Unsupported as e:
        return str(e)


def endpoint_of(obj: dict[str, Any]) -> Literal["chat", "completion"]:
    method, url = obj.get("method"), obj.get("url")
    if method != "POST":
        raise Unsupported(f"method must be \"POST\" (the batch format's only method), got "
                          f"{shown(method)}")
    if url not in ENDPOINTS:
        raise Unsupported(f"url {shown(url)} is not supported: llama-gen answers "
                          f"{' and '.join(ENDPOINTS)}")
    return ENDPOINTS[url]


def check_field(name: str, value: Any, url: str) -> None:
    """Unsupported for a field llama-gen cannot honour or does not know."""
    if name in SETTING_OF or name in READ or name in IGNORED:
        return
    if name not in UNSUPPORTED:
        raise Unsupported(f"body.{name} is not a {url} parameter that llama-gen knows: "
                          "remove it")
    asks_nothing = value is None or (value in NO_OP[name] if name in NO_OP
                                     else value is False or value == [] or value == {})
    if not asks_nothing:
        raise Unsupported(f"body.{name} asks for {UNSUPPORTED[name]}, which llama-gen does not "
                          "support: remove it")


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """The messages as [{"role", "content"}] with plain-text content; system for developer."""
    if not isinstance(messages, list) or not messages:
        what = "missing" if messages is None else f"not a non-empty list: {shown(messages)}"
        raise Unsupported(f"body.messages is {what} (a chat request needs its messages)")
    plain = []
    for i, message in enumerate(messages):
        where = f"body.messages[{i}]"
        if not isinstance(message, dict):
            raise Unsupported(f"{where} must be an object with role and content")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise Unsupported(f"{where}.role {shown(role)} is not supported (system, developer, "
                              "user or assistant: llama-gen has no tool calling)")
        if message.get("tool_calls") or message.get("function_call"):
            raise Unsupported(f"{where} holds tool calls, which llama-gen does not support")
        plain.append({"role": CHAT_ROLES[role],
                      "content": content_text(message.get("content"), where)})
    return plain


def content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or text parts joined by newlines (as vLLM)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise Unsupported(f"{where}.content must be text or a list of text parts, got "
                          f"{shown(content)}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"{kind} parts" if isinstance(kind, str) else f"the part {shown(part)}"
            raise Unsupported(f"{where}.content has {what}: llama-gen reads text only")
        texts.append(part["text"])
    return "\n".join(texts)


def completion_prompt(prompt: Any) -> str:
    """A completion request's prompt: one non-empty string (or a list holding just that)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if prompt is None or prompt == "":
        raise Unsupported("body.prompt is missing or empty (a completion request needs one)")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise Unsupported(f"body.prompt is a list of {len(prompt)} prompts: llama-gen answers "
                          "one prompt per request (write one line per prompt)")
    raise Unsupported("body.prompt given as token ids is not supported: give the text")


def body_field(setting: str, body: dict[str, Any], endpoint: str) -> str:
    """The body field that set a llama-gen setting (`settings_of` in reverse), to word a bad
    value in the request's own terms."""
    if setting == "max_gen_len":
        chat_max = endpoint == "chat" and body.get("max_completion_tokens") is not None
        return "max_completion_tokens" if chat_max else "max_tokens"
    if setting == "top_logprobs" and endpoint == "completion":
        return "logprobs"
    return next((k for k, v in SETTING_OF.items() if v == setting), setting)


def settings_of(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """The llama-gen settings a body sets, in llama-gen's names and types."""
    values = {SETTING_OF[k]: v for k, v in body.items() if k in SETTING_OF and v is not None}
    if values.get("top_k") == -1:  # vLLM's older spelling of "off"
        values["top_k"] = 0
    if (stop := body.get("stop")) is not None:
        values["stop"] = (stop,) if isinstance(stop, str) else (
            tuple(stop) if isinstance(stop, list) else stop)
    max_tokens = body.get("max_tokens")
    if endpoint == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens = body["max_completion_tokens"]
    if endpoint == "completion" and max_tokens is None:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    if max_tokens is not None:
        values["max_gen_len"] = max_tokens
    values.update(chat_logprobs_settings(body) if endpoint == "chat"
                  else completion_logprobs_settings(body))
    return values


def chat_logprobs_settings(body: dict[str, Any]) -> dict[str, Any]:
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if top not in (None, 0) and logprobs is not True:
        raise Unsupported("body.top_logprobs needs body.logprobs: true")
    values = {}
    if logprobs is not None:
        values["logprobs"] = logprobs
    if top is not None:
        values["top_logprobs"] = top
    return values


def completion_logprobs_settings(body: dict[str, Any]) -> dict[str, Any]:
    logprobs = body.get("logprobs")
    if "top_logprobs" in body and body["top_logprobs"] is not None:
        raise Unsupported("body.top_logprobs is a chat parameter: /v1/completions takes "
                          "logprobs as the number of alternatives")
    if logprobs is None:
        return {}
    if not isinstance(logprobs, int) or isinstance(logprobs, bool):
        raise Unsupported(f"body.logprobs must be an integer for /v1/completions (how many "
                          f"alternatives per token, 0-5), got {shown(logprobs)}")
    return {"logprobs": True, "top_logprobs": logprobs}
