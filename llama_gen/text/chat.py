"""Meta's chat formats: a dialog of {"role", "content"} messages as the token ids that Llama 2 and
Llama 3/3.1 chat models were trained on (FACTS.md, "Chat formats").

Plain Python on plain data. A message is exactly {"role": str, "content": str} with role system,
user or assistant: other keys (OpenAI's "name", a fine-tuning "weight") are refused rather than
silently dropped, since Meta's formats have no place for them.

- Llama 2 (meta-llama/llama `chat_completion`): a leading system message goes into the first user
  message as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}`; each finished pair is
  bos `[INST] {user} [/INST] {assistant} ` eos, the last user message bos `[INST] {user} [/INST]`.
  Contents are stripped as Meta's are (the merged system + user text as one). Roles alternate
  strictly, and content may not hold the control tags (Meta answers such dialogs with an error).
- Llama 3 (meta-llama/llama3 `ChatFormat`): begin_of_text, then per message
  start_header {role} end_header "\\n\\n" {content} eot, then the assistant header and "\\n\\n"
  left open for the model. Contents are stripped, as in Meta's llama3 repo and Hugging Face's chat
  template (llama-models does not strip; the two differ only for content with outer whitespace).
- A folder's own chat template (`chat_template.py`): what a fine-tune was trained on.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Union

from ..errors import UserError
from ..values import shown
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .chat_template import ChatTemplate

ChatFormat = Literal["llama2", "llama3"]
CHAT_FORMATS: tuple[ChatFormat, ...] = ("llama2", "llama3")
Chat = Union[ChatFormat, "ChatTemplate"]  # Meta's format, or the folder's template
TEMPLATE = "template"  # --chat_format's word for the folder's template
LOOKED_FOR = "chat_template.jinja, or chat_template in tokenizer_config.json"
ROLES = ("system", "user", "assistant")
LLAMA2_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
LLAMA2_SYS_OPEN, LLAMA2_SYS_CLOSE = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA1_NORM_EPS, LLAMA2_NORM_EPS = 1e-6, 1e-5  # params.json; Llama 1 has no chat format
LLAMA3_END_OF_TURN = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")

Message = dict[str, str]


class DialogError(ValueError):
    """A dialog the chat format cannot encode; str(e) is one line for the errors file."""


class AddedSystem(dict):  # type: ignore[type-arg]
    """The system message `with_system` adds (from --system or a record's "system" field).

    A marked dict, so that errors keep naming the record's own messages[i] and name this one as
    the system text; copying it into a plain dict loses the mark (then indices count it)."""


def message_problem(value: Any) -> str | None:
    """Why `value` is not a dialog (a non-empty list of {role, content} string objects with known
    roles), or None. Format independent: order and content rules come with the format."""
    if not isinstance(value, list):
        return f"messages must be a list of {{role, content}} objects, got {type(value).__name__}"
    if not value:
        return "messages is empty; give at least one user message"
    for i, message in enumerate(value):
        name = _name(value, i)
        if not isinstance(message, dict):
            return f"{name} must be an object with role and content, got {type(message).__name__}"
        for key in ("role", "content"):
            if key not in message:
                return f"{name} has no {key!r}"
            if not isinstance(message[key], str):
                return f"{name} {key} must be a string, got {shown(message[key])[:60]}"
        if message["role"] not in ROLES:
            return (f"{name} has unknown role {shown(message['role'])[:60]}; "
                    "roles are system, user and assistant")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            return (f"{name} has key {shown(extra[0])[:60]} besides role and content; "
                    "remove it (Meta's chat formats have no place for it)")
    return None


def chat_format_for(tokenizer: Tokenizer, norm_eps: float, requested: str | None,
                    template: ChatTemplate | None = None) -> Chat:
    """The run's chat format: `requested` if given (llama2 or llama3 must fit the tokenizer's
    special tokens; "template" needs the folder's `template`). Else the folder's template where
    it has one that is not Meta's format, else the checkpoint family's Meta format: tiktoken ->
    llama3 and SentencePiece -> llama2 when norm_eps is Llama 2's. Llama 1 (norm_eps 1e-6) has no
    chat format: a UserError."""
    if requested == TEMPLATE:
        if template is None:
            raise UserError(f"--chat_format template: the checkpoint folder has no chat template "
                            f"(looked for {LOOKED_FOR}); pass --chat_format llama2 or llama3")
        return template
    if requested is not None:
        return _checked_request(tokenizer, requested)
    try:
        meta = _family_format(tokenizer, norm_eps)
    except UserError:
        if template is None:
            raise
        return template
    if template is None or _renders_as(template, meta, tokenizer):
        return meta
    return template


# Meta's own Hugging Face folders carry Meta's format as a template. Whether a template is Meta's
# is told by the ids it renders for these dialogs, not by its text: copies of Meta's templates
# differ in whitespace and spelling between releases yet render the same ids, and one that renders
# other ids (a fine-tune's, or Llama 3.1's, which adds dates to the system header) is what that
# folder's model was tuned on, so it wins.
PROBE_DIALOGS = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."}],
)


def _renders_as(template: ChatTemplate, fmt: ChatFormat, tokenizer: Tokenizer) -> bool:
    try:
        return all(template.dialog_tokens(dialog) == dialog_tokens(dialog, fmt, tokenizer)
                   for dialog in PROBE_DIALOGS)
    except DialogError:  # a template that refuses a plain dialog is not Meta's
        return False


LLAMA3_CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _family_format(tokenizer: Tokenizer, norm_eps: float) -> ChatFormat:
    if tokenizer.kind == "tiktoken":
        _check_llama3_tokens(tokenizer)
        return "llama3"
    if math.isclose(norm_eps, LLAMA2_NORM_EPS):
        return "llama2"
    if math.isclose(norm_eps, LLAMA1_NORM_EPS):
        raise UserError(
            "this checkpoint is Llama 1 (SentencePiece tokenizer, norm_eps 1e-06), which has no "
            "chat format; use a Llama 2 or 3 chat checkpoint, or pass --chat_format llama2 if "
            "this is a Llama 2 checkpoint")
    raise UserError(
        f"cannot tell the chat format of a SentencePiece checkpoint with norm_eps {norm_eps} "
        "(Llama 2 has 1e-05); pass --chat_format llama2 if it is a Llama 2 chat model")


def _checked_request(tokenizer: Tokenizer, requested: str) -> ChatFormat:
    if requested not in CHAT_FORMATS:
        raise UserError(f"--chat_format must be llama2, llama3 or template, got {shown(requested)}")
    fits: ChatFormat = "llama3" if tokenizer.kind == "tiktoken" else "llama2"
    if requested == fits:
        if fits == "llama3":
            _check_llama3_tokens(tokenizer)
        return fits
    family = "Llama 3's tiktoken" if fits == "llama3" else "Llama 1/2's SentencePiece"
    raise UserError(
        f"--chat_format {requested} does not fit this checkpoint's tokenizer ({family}; "
        f"its special tokens differ); pass --chat_format {fits} or leave the flag out")


def _check_llama3_tokens(tokenizer: Tokenizer) -> None:
    """A byte-level BPE tokenizer (a tokenizer.json) need not have Llama 3's chat tokens."""
    if missing := [t for t in LLAMA3_CHAT_TOKENS if t not in tokenizer.special_tokens]:
        raise UserError(f"{tokenizer.path}: has no {', '.join(missing)}, so Llama 3's chat "
                        "format does not fit it; use a folder whose chat template fits it "
                        "(--chat_format template)")


def with_system(messages: list[Any], system: str | None) -> list[Any]:
    """`messages` with a leading `AddedSystem` message of `system` when it is given and the dialog
    has no system message of its own (the dialog's own wins). Never mutates `messages`."""
    has_own = any(isinstance(m, dict) and m.get("role") == "system" for m in messages)
    if system is None or has_own:
        return list(messages)
    return [AddedSystem(role="system", content=system), *messages]


def dialog_tokens(messages: list[Any], fmt: Chat, tokenizer: Tokenizer) -> list[int]:
    """The dialog, which must end with the user's message, encoded for the model to answer: Llama 2
    ends with the open `[INST] {user} [/INST]`, Llama 3 with the assistant header and "\\n\\n", a
    template with its generation prompt. Raises DialogError for a dialog the format cannot encode."""
    if not isinstance(fmt, str):
        return fmt.dialog_tokens(messages)
    _check_prompt_dialog(messages, fmt, "the dialog")
    if fmt == "llama2":
        return _llama2_ids(_llama2_turns(messages), tokenizer)
    ids = [_special(tokenizer, "<|begin_of_text|>")]
    for message in messages:
        ids += _llama3_message(message, tokenizer)
    return ids + _llama3_header("assistant", tokenizer)


def reply_tokens(messages: list[Any], fmt: Chat, tokenizer: Tokenizer
                 ) -> tuple[list[int], list[int]]:
    """(context, reply) for scoring a dialog that ends with the assistant's message: context is
    `dialog_tokens` of the dialog before it, reply what the model would generate, end-of-turn token
    included (Llama 3: content + eot; Llama 2: ` {content} ` + eos). context + reply is the finished
    dialog's ids as Meta encodes it. Raises DialogError.

    Llama 2 encodes a finished (user, assistant) pair as one string, so the reply is the pair's ids
    after the open prompt's; SentencePiece never merges across the space after `[/INST]`, so the
    open prompt's ids are a prefix. A tokenizer for which they are not gets a DialogError."""
    if not isinstance(fmt, str):
        return fmt.reply_tokens(messages)
    problem = message_problem(messages)
    if problem:
        raise DialogError(problem)
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise DialogError(f"{_name(messages, last)} has role {shown(messages[last]['role'])}; "
                          "scoring needs the assistant's reply as the last message")
    if last == 0:
        raise DialogError("messages holds only the assistant's reply; scoring needs the user's "
                          "message before it")
    _check_prompt_dialog(messages[:-1], fmt, "the dialog before the reply")
    if fmt == "llama3":
        context = dialog_tokens(messages[:-1], fmt, tokenizer)
        return context, _llama3_content(messages[last], tokenizer)
    _check_llama2(messages)
    turns = _llama2_turns(messages)
    context = _llama2_ids(turns[:-1] + [(turns[-1][0], None)], tokenizer)
    finished = _llama2_ids(turns, tokenizer)
    if finished[: len(context)] != context:
        raise DialogError("the tokenizer encodes the reply's first token together with "
                          "[/INST], so the reply cannot be scored on its own")
    return context, finished[len(context) :]


def end_of_turn_ids(fmt: Chat, tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that end the model's turn: Llama 3's eot, end_of_text and eom; Llama 2's eos; a
    template's (`ChatTemplate.end_of_turn_ids`)."""
    if not isinstance(fmt, str):
        return fmt.end_of_turn_ids
    if fmt == "llama2":
        return frozenset({tokenizer.eos_id})
    return frozenset(_special(tokenizer, name) for name in LLAMA3_END_OF_TURN)


def _check_prompt_dialog(messages: list[Any], fmt: ChatFormat, what: str) -> None:
    """Raise DialogError unless `messages` is a dialog `fmt` encodes, ending with the user's."""
    problem = message_problem(messages)
    if problem:
        raise DialogError(problem)
    if fmt == "llama2":
        _check_llama2(messages)
    else:
        _check_llama3(messages)
    check_ends_with_user(messages, what)


def check_ends_with_user(messages: list[Any], what: str) -> None:
    """Raise DialogError unless the last message is the user's (the model answers it)."""
    last = len(messages) - 1
    if messages[last]["role"] != "user":
        raise DialogError(f"{what} ends with {_name(messages, last)} of role "
                          f"{shown(messages[last]['role'])}; the model's turn must follow a "
                          "user message")


def _check_llama2(messages: list[Message]) -> None:
    """No control tags in any content; an optional system message, then user and assistant
    alternating, starting with user."""
    for i, message in enumerate(messages):
        for tag in LLAMA2_TAGS:
            if tag in message["content"]:
                raise DialogError(f"{_name(messages, i)} contains {tag}, a control tag of the "
                                  "Llama 2 chat format; remove it from the content")
    start = 1 if messages[0]["role"] == "system" else 0
    for i in range(start, len(messages)):
        needed = ("user", "assistant")[(i - start) % 2]
        role = messages[i]["role"]
        if role != needed:
            why = ("a system message may only come first" if role == "system"
                   else "roles alternate user, assistant, ...")
            raise DialogError(f"{_name(messages, i)} has role {shown(role)} where the Llama 2 "
                              f"format needs {shown(needed)} ({why})")


def _check_llama3(messages: list[Message]) -> None:
    for i in range(1, len(messages)):
        if messages[i]["role"] == "system":
            raise DialogError(f"{_name(messages, i)} has role \"system\"; the Llama 3 format "
                              "takes a system message only as the first message")


def _llama2_turns(messages: list[Message]) -> list[tuple[str, str | None]]:
    """(user text, assistant text or None) per turn, stripped as Meta does, with a leading system
    message merged into the first user text."""
    texts = [m["content"] for m in messages]
    if messages[0]["role"] == "system":
        texts = [LLAMA2_SYS_OPEN + texts[0] + LLAMA2_SYS_CLOSE + texts[1], *texts[2:]]
    users = [t.strip() for t in texts[::2]]
    answers: list[str | None] = [t.strip() for t in texts[1::2]]
    return list(zip(users, answers + [None] * (len(users) - len(answers)), strict=True))


def _llama2_ids(turns: Sequence[tuple[str, str | None]], tokenizer: Tokenizer) -> list[int]:
    ids: list[int] = []
    for user, answer in turns:
        if answer is None:
            ids += tokenizer.encode(f"[INST] {user} [/INST]", bos=True)
        else:
            ids += tokenizer.encode(f"[INST] {user} [/INST] {answer} ", bos=True)
            ids.append(tokenizer.eos_id)
    return ids


def _llama3_header(role: str, tokenizer: Tokenizer) -> list[int]:
    return [_special(tokenizer, "<|start_header_id|>"), *tokenizer.encode(role, bos=False),
            _special(tokenizer, "<|end_header_id|>"), *tokenizer.encode("\n\n", bos=False)]


def _llama3_content(message: Message, tokenizer: Tokenizer) -> list[int]:
    """The message's stripped content and eot: what the model writes after its header."""
    return [*tokenizer.encode(message["content"].strip(), bos=False),
            _special(tokenizer, "<|eot_id|>")]


def _llama3_message(message: Message, tokenizer: Tokenizer) -> list[int]:
    return _llama3_header(message["role"], tokenizer) + _llama3_content(message, tokenizer)


def _special(tokenizer: Tokenizer, name: str) -> int:
    assert name in tokenizer.special_tokens, f"{tokenizer!r} has no {name}: not a Llama 3 tokenizer"
    return tokenizer.special_tokens[name]


def _name(messages: list[Any], i: int) -> str:
    """How errors name messages[i]: by its index in the record's own list."""
    if isinstance(messages[i], AddedSystem):
        return "the system text (--system or the record's \"system\" field)"
    offset = 1 if isinstance(messages[0], AddedSystem) else 0
    return f"messages[{i - offset}]"
