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
from typing import Any, Callable

import fire

from ..errors import UserError
from ..settings import rules
from ..values import BadValue, Rule

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


def flag_kind(rule: Rule) -> str:
    """A flag's value as `--help` names it: INT, PATH, its choices, or a text list."""
    return ("|".join(rule.choices) if rule.choices else "TEXT|'[\"TEXT\", ...]'"
            if rule.is_texts else rule.base.__name__.upper())


def help_text(cls: type, usage: str, summary: str, commands: dict[str, str] = {}) -> str:
    """Usage, the summary, each flag with its type, default and help, and other commands."""
    lines = [f"usage: {usage}", "", summary, "", "flags:"]
    for f in dataclasses.fields(cls):
        rule = rules(cls)[f.name]
        value = "" if rule.base is bool else f" {flag_kind(rule)}"
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


# --- the README's flag reference -------------------------------------------------------------

def markdown(text: str) -> str:
    """`text` safe in a Markdown table cell: pipes and angle brackets escaped."""
    return text.replace("|", "\\|").replace("<", "\\<")


def table_default(f: dataclasses.Field) -> str:
    """A field's default as a flag value; empty where the help says what the run chooses."""
    if f.default is dataclasses.MISSING:
        return "required"
    if f.default is None or f.default == ():
        return ""
    return f"`{str(f.default).lower() if isinstance(f.default, bool) else f.default}`"


def flag_table(cls: type, names: list[str], marks: dict[str, Callable[[dataclasses.Field], bool]]
               ) -> list[str]:
    """A Markdown table of `cls`'s flags `names`: flag, type, default, a column per mark
    (a check where it holds), and the help."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    lines = ["| flag | type | default | " + "".join(f"{m} | " for m in marks) + "help |",
             "|---|---|---|" + "---|" * len(marks) + "---|"]
    for name in names:
        f, rule = fields[name], rules(cls)[name]
        kind = flag_kind(rule) + ("|auto" if f.metadata.get("auto") else "")
        checks = "".join(("✓" if holds(f) else "") + " | " for holds in marks.values())
        lines.append(f"| `--{name}` | {markdown(kind)} | {table_default(f)} | {checks}"
                     f"{markdown(f.metadata['help'])} |")
    return lines


def same_flag(a: dataclasses.Field, b: dataclasses.Field | None) -> bool:
    return b is not None and (a.default, a.metadata) == (b.default, b.metadata)


def flags_reference() -> str:
    """The README's flag reference, generated from the settings dataclasses: `llama-gen`'s
    flags, then what `llama-gen score`, `plan` and `demo` take. tests/test_readme.py checks
    that the README holds it as this renders it."""
    from ..settings import DEFINES_OUTPUT, ScoreSettings, Settings
    from .demo import DemoSettings
    from .plan import PlanSettings

    score = {f.name: f for f in dataclasses.fields(ScoreSettings)}
    generate = {f.name: f for f in dataclasses.fields(Settings)}
    kept = {"kept on resume": lambda f: f.metadata["role"] == DEFINES_OUTPUT}
    lines = ["`llama-gen` (generation). *record*: a prompt record may set it for itself; "
             "*kept on resume*: it defines what an output line holds, so a resume must keep it; "
             "*score*: `llama-gen score` takes it too, with the same meaning.", ""]
    lines += flag_table(Settings, list(generate), {
        "record": lambda f: f.metadata["per_record"], **kept,
        "score": lambda f: same_flag(f, score.get(f.name))})
    lines += ["", "`llama-gen score`: the flags marked *score* above, and these of its own "
              "(generation's other flags are refused):", ""]
    lines += flag_table(ScoreSettings, [name for name, f in score.items()
                                        if not same_flag(f, generate.get(name))],
                        kept)
    lines += ["", "`llama-gen plan` (a run's other flags are taken and ignored, so that a run's "
              "command line can be planned as it is):", ""]
    lines += flag_table(PlanSettings, [f.name for f in dataclasses.fields(PlanSettings)], {})
    lines += ["", "`llama-gen demo`:", ""]
    lines += flag_table(DemoSettings, [f.name for f in dataclasses.fields(DemoSettings)], {})
    return "\n".join(lines) + "\n"
