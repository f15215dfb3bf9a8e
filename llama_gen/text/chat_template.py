"""A checkpoint folder's own chat template (a fine-tune's ChatML, Zephyr, ...), rendered as
Hugging Face transformers' `apply_chat_template` renders it, then turned into token ids.

The template is the folder's code: it runs only inside jinja2's `ImmutableSandboxedEnvironment`
(what transformers uses), set up as transformers sets it up (trim_blocks, lstrip_blocks, loop
controls, `raise_exception`, `strftime_now`, its `tojson`, the `{% generation %}` tag), with
`messages`, `add_generation_prompt` and the folder's named special tokens (`bos_token`, ...).
jinja2 is imported only here and only when a folder has a template, so that Meta checkpoints run
without it.

Rendered text becomes ids as transformers tokenizes it (`add_special_tokens=False`): the
tokenizer's special-token strings are matched first, longest first, and become their ids; the text
between them is encoded without bos. With SentencePiece each such piece gets the tokenizer's
leading-space prefix, which is transformers' `legacy=True` behaviour and Meta's own encoding of
each Llama 2 turn (`legacy=False` would drop it after a special token).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import UserError
from .chat import DialogError, check_ends_with_user, message_problem
from .tokenizer import Tokenizer

TEMPLATE_FILE, CONFIG_FILE = "chat_template.jinja", "tokenizer_config.json"
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names a template may use for the special tokens.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")
# Tokens that end a turn in the chat formats templates write (Llama 3's, ChatML's, Phi's, ...):
# where the template writes one, the model's turn ends there too.
SHIELDS = 0x100000  # Unicode's supplementary private use area B: characters no text uses
TURN_ENDS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "</s>")


@dataclass(frozen=True)
class ChatTemplate:
    """A folder's chat template, compiled, with the special tokens it renders bound to the run's
    tokenizer's ids."""

    source: str  # the file it came from, for messages
    text: str
    tokenizer: Tokenizer
    named_tokens: dict[str, str]  # bos_token, eos_token, ... as tokenizer_config.json names them
    specials: dict[str, int]  # special-token text -> id, matched in the rendered text
    compiled: Any = field(repr=False, compare=False)
    special_pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)
    # eos_token's id, and the ids of the usual end-of-turn tokens that the template writes
    end_of_turn_ids: frozenset[int] = field(init=False, compare=False)
    shields: dict[str, str] = field(init=False, repr=False, compare=False)
    unshield: dict[int, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Longest first where they overlap, as transformers' added-token matching does.
        ordered = sorted(self.specials, key=len, reverse=True)
        object.__setattr__(self, "special_pattern", re.compile("|".join(map(re.escape, ordered))))
        ends = {t for t in TURN_ENDS if t in self.text} | {self.named_tokens.get("eos_token")}
        object.__setattr__(self, "end_of_turn_ids",
                           frozenset(self.specials[t] for t in ends if t in self.specials))
        # Special-token text typed in a message stays text, as in Meta's formats (transformers
        # would make it the control token: a prompt could then end a turn or open a system
        # one). It is rendered as a private-use character no template changes and no special
        # token matches, and is put back before it is encoded.
        shields = {text: chr(SHIELDS + i) for i, text in enumerate(ordered)}
        object.__setattr__(self, "shields", shields)
        object.__setattr__(self, "unshield", {ord(c): text for text, c in shields.items()})

    def _shielded(self, content: str) -> str:
        if not self.specials:
            return content
        return self.special_pattern.sub(lambda m: self.shields[m.group()], content)

    def render(self, messages: list[Any], add_generation_prompt: bool) -> str:
        """The template's text for `messages`; DialogError where the template rejects them
        (its raise_exception, or any error of its code on this dialog)."""
        plain = [{"role": m["role"], "content": self._shielded(m["content"])} for m in messages]
        try:
            text: str = self.compiled.render(messages=plain, add_generation_prompt=
                                             add_generation_prompt, tools=None, documents=None,
                                             **self.named_tokens)
        except Exception as e:  # the folder's code failing on this dialog, whatever it raised
            reason = " ".join(str(e).split()) or type(e).__name__
            raise DialogError(f"the chat template ({self.source}) rejects this dialog: "
                              f"{reason}") from None
        return text

    def ids(self, text: str) -> list[int]:
        """Rendered text as token ids: special-token strings as their ids, the rest encoded."""
        ids: list[int] = []
        start = 0
        for match in self.special_pattern.finditer(text) if self.specials else ():
            ids += self._encoded(text[start:match.start()].translate(self.unshield))
            ids.append(self.specials[match.group()])
            start = match.end()
        return ids + self._encoded(text[start:].translate(self.unshield))

    def dialog_tokens(self, messages: list[Any]) -> list[int]:
        """The dialog, ending with the user's message, rendered with the generation prompt."""
        _check_dialog(messages)
        check_ends_with_user(messages, "the dialog")
        return self.ids(self.render(messages, add_generation_prompt=True))

    def reply_tokens(self, messages: list[Any]) -> tuple[list[int], list[int]]:
        """(context, reply) for scoring the last assistant message: the dialog before it with the
        generation prompt, then what the finished dialog adds, up to its first end of turn."""
        _check_dialog(messages)
        if messages[-1]["role"] != "assistant" or len(messages) == 1:
            raise DialogError("scoring needs a dialog that ends with the assistant's reply after "
                              "a user message")
        check_ends_with_user(messages[:-1], "the dialog before the reply")
        context = self.ids(self.render(messages[:-1], add_generation_prompt=True))
        finished = self.ids(self.render(messages, add_generation_prompt=False))
        if finished[: len(context)] != context:
            raise DialogError(f"the chat template ({self.source}) renders the dialog before the "
                              "reply differently inside the finished dialog, so the reply cannot "
                              "be scored on its own")
        reply = finished[len(context):]
        ends = [i for i, token in enumerate(reply) if token in self.end_of_turn_ids]
        return context, reply[: ends[0] + 1] if ends else reply

    def _encoded(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False) if text else []


def load_chat_template(folder: Path, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The folder's chat template bound to `tokenizer`, or None where it has none:
    chat_template.jinja (newer transformers save it there, and it wins, as in transformers), else
    tokenizer_config.json's chat_template (a string, or named templates of which "default" is it).
    A template that does not parse is a UserError naming its file."""
    config = _read_config(folder / CONFIG_FILE)
    jinja_file = folder / TEMPLATE_FILE
    if jinja_file.is_file():
        text, source = _read_text(jinja_file), str(jinja_file)
    else:
        text, source = _config_template(config, folder / CONFIG_FILE), str(folder / CONFIG_FILE)
    if text is None:
        return None
    named = {name: token for name in NAMED_TOKENS
             if (token := _token_text(config.get(name))) is not None}
    return ChatTemplate(source, text, tokenizer, named,
                        _special_ids(config, named, text, tokenizer, source),
                        _compiled(text, source))


def _check_dialog(messages: list[Any]) -> None:
    problem = message_problem(messages)
    if problem:
        raise DialogError(problem)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the chat template ({e})") from None


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); re-download it") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object; re-download it")
    return config


def _config_template(config: dict[str, Any], path: Path) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise UserError(f"{path}: chat_template lists templates {sorted(map(str, named))} but "
                        "none named \"default\"; put the one to use in chat_template.jinja")
    raise UserError(f"{path}: chat_template must be a string or a list of {{name, template}}, "
                    f"got {type(template).__name__}")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_ids(config: dict[str, Any], named: dict[str, str], template: str,
                 tokenizer: Tokenizer, source: str) -> dict[str, int]:
    """Special-token text -> id: the tokenizer's own, then tokenizer_config.json's added tokens
    (a fine-tune may rename reserved ids, e.g. to <|im_start|>), then SentencePiece's bos and eos
    under the names the config gives them. An added token beyond the tokenizer's vocabulary is
    refused where the template writes it (its text would silently become ordinary tokens)."""
    specials = dict(tokenizer.special_tokens)
    added = config.get("added_tokens_decoder") or {}
    for key, value in added.items() if isinstance(added, dict) else ():
        text = _token_text(value)
        if text is None or text in specials or not str(key).isdigit():
            continue
        if int(key) < tokenizer.n_words:
            specials[text] = int(key)
        elif text in template:
            raise UserError(f"{source}: the chat template writes {text}, id {key} in "
                            f"{CONFIG_FILE}, but the tokenizer has only {tokenizer.n_words} "
                            "tokens; give --chat_format llama2 or llama3, or a matching tokenizer")
    if tokenizer.kind == "sentencepiece":
        for name, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
            if name in named:
                specials.setdefault(named[name], token_id)
    return specials


def _compiled(text: str, source: str) -> Any:
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        jinja2 = None
    if jinja2 is None or _version(jinja2.__version__) < (3, 1, 6):  # older ones have escapes
        raise UserError(f"{source}: reading this chat template needs jinja2 3.1.6 or later "
                        "(pip install 'jinja2>=3.1.6'); or give --chat_format llama2 or llama3")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_tag(), "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{source}: the chat template does not parse: {e.message} (template "
                        f"line {e.lineno}); fix it, or give --chat_format llama2 or llama3"
                        ) from None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _raise_exception(message: str) -> None:
    import jinja2
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' tojson: jinja2's own escapes HTML characters, which templates do not want."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _generation_tag() -> Any:
    """`{% generation %}...{% endgeneration %}`, which transformers uses to mark the assistant's
    tokens for training; for rendering it is its body."""
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()  # type: ignore[no-any-return]

    return Generation

