"""Command-line words into a settings dataclass (see `settings.setting`), and its `--help`.

fire reads the words: `--name value`, `--name=value`, `--flag` for true. It reads each value as
a Python literal where it can and keeps the text otherwise, so `--overwrite false` arrives as
the text "false" (true to Python) and `--num_samples 2.5` as a float; and it would complain
about a flag it did not use (a typo such as `--tempreature`) only after running the command.
So fire hands every word to `parse`, which checks each value against its field's rule and
refuses what it cannot place, before anything runs.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import fire

from ..errors import UserError
from ..settings import rules
from ..values import BadValue

HELP_WORDS = ("--help", "-h")


def parse(cls: type, argv: list[str], command: str) -> Any:
    """A `cls` instance from command-line words, or a UserError naming the word at fault."""
    for word in argv:
        if re.fullmatch(r"-[A-Za-z]", word):
            raise UserError(f"unknown flag {word}: flags are written in full, as --name value "
                            f"(see {command} --help)")
    parsed: list[Any] = []

    texts = raw_texts(cls, argv)

    def take(*unexpected: Any, **values: Any) -> None:
        parsed.append(from_flags(cls, unexpected, {**values, **texts}))

    # Catch-alls, so that fire hands us every word instead of complaining after a run.
    take.__signature__ = inspect.Signature([
        inspect.Parameter("unexpected", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("values", inspect.Parameter.VAR_KEYWORD)])
    fire.Fire(take, command=argv, name=command)
    return parsed[0]


def raw_texts(cls: type, argv: list[str]) -> dict[str, Any]:
    """The values of text-list flags (`--stop`) as typed: a JSON list of texts, or else one
    text (so "[INST]" is one), where fire would split "a,b" into two and read "5" as a
    number."""
    names = {name for name, rule in rules(cls).items() if rule.is_texts}
    texts = {}
    for i, word in enumerate(argv):
        name, equals, value = word.removeprefix("--").partition("=")
        if not word.startswith("--") or name not in names:
            continue
        if not equals:
            if i + 1 == len(argv):
                continue  # fire's bare --name: from_flags asks for a value
            value = argv[i + 1]
        texts[name] = json_texts(value)
    return texts


def json_texts(value: str) -> list[str] | str:
    """`value` read as a JSON list of texts if it is one, else as it is."""
    try:
        texts = json.loads(value)
    except json.JSONDecodeError:
        return value
    ok = isinstance(texts, list) and all(isinstance(t, str) for t in texts)
    return texts if ok else value


def from_flags(cls: type, unexpected: tuple, values: dict[str, Any]) -> Any:
    fields = rules(cls)
    if unexpected:
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        example = f" (the paths are flags too: --{required[0]} {unexpected[0]})" if required else ""
        raise UserError(f"unexpected argument {unexpected[0]!r}: give settings as --name "
                        f"value{example}")
    for name in values.keys() - fields.keys():
        if (why := getattr(cls, "refused", {}).get(name)) is not None:
            raise UserError(f"--{name} {why}")
        near = difflib.get_close_matches(name, list(fields), n=1)
        hint = f": did you mean --{near[0]}?" if near else "; see --help"
        raise UserError(f"unknown flag --{name}{hint}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    if missing := [name for name in required if name not in values]:
        raise UserError(f"{' '.join('--' + name for name in missing)} missing: every run needs "
                        f"{', '.join('--' + name for name in required)}")
    checked = {}
    for name, value in values.items():
        if value is True and fields[name].base is not bool:  # fire's reading of a bare --name
            raise UserError(f"--{name} needs a value: --{name} {fields[name].describe()}")
        try:
            checked[name] = fields[name].check(value, from_words=True)
        except BadValue as e:
            quoting = (f" (text that reads as a number goes in two quotes: --{name} "
                       "\"'2024.01'\")" if isinstance(value, float)
                       and fields[name].base in (str, Path) else "")
            raise UserError(f"--{name} {e}{quoting}") from None
    return cls(**checked)


def help_text(cls: type, usage: str, summary: str, commands: dict[str, str] = {}) -> str:
    """Usage, the summary, each flag with its type, default and help, and other commands."""
    lines = [f"usage: {usage}", "", summary, "", "flags:"]
    for f in dataclasses.fields(cls):
        rule = rules(cls)[f.name]
        kind = ("|".join(rule.choices) if rule.choices else "TEXT|'[\"TEXT\", ...]'"
                if rule.is_texts else rule.base.__name__.upper())
        value = "" if rule.base is bool else f" {kind}"
        default = ("required" if f.default is dataclasses.MISSING else
                   "" if f.default is None or f.default is False or f.default == ()
                   else f"default {f.default}")
        text = f.metadata["help"] + (f" ({default})" if default else "")
        if f.metadata.get("per_record"):
            text += "; a record may set it"
        lines.append(f"  --{f.name}{value}")
        lines.append(textwrap.fill(text, 96, initial_indent=" " * 6, subsequent_indent=" " * 6))
    if commands:
        lines += ["", "commands:"] + [f"  {name:<8}{text}" for name, text in commands.items()]
    return "\n".join(lines) + "\n"
