"""One check for every value a user gives: command-line flags, prompt-record overrides and
params.json fields all go through `Rule.check`, so a rule is written, and worded, once."""
from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")


class BadValue(ValueError):
    """A value that breaks its rule; `rule` says what was expected ("an integer >= 1")."""

    def __init__(self, rule: str, value: Any):
        super().__init__(f"must be {rule}, got {shown(value)}")
        self.rule = rule


def shown(value: Any) -> str:
    """A value as the user wrote it: JSON where it is JSON (true, "5", NaN), else repr."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (an int too large for a float is not one)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class Rule:
    """A value's type (bool, int, float, str, Path, a Literal of choices, `tuple[str, ...]` (one
    text or a list of them), or one of them | None) and, for numbers, its bounds."""

    kind: Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.kind)

    @property
    def base(self) -> Any:
        """The kind without `| None`."""
        if typing.get_origin(self.kind) in (typing.Union, types.UnionType):
            (base,) = [k for k in typing.get_args(self.kind) if k is not type(None)]
            return base
        return self.kind

    @property
    def choices(self) -> tuple[str, ...]:
        return typing.get_args(self.base) if typing.get_origin(self.base) is typing.Literal else ()

    @property
    def is_texts(self) -> bool:
        return self.base == tuple[str, ...]

    def describe(self) -> str:
        """What the rule accepts, in words: "an integer >= 1", "a number in (0, 1]"."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.is_texts:
            return "a non-empty text or a list of them"
        noun = {bool: "true or false", int: "an integer", float: "a number", str: "text",
                Path: "a path"}[self.base]
        low, high = self._shown_bound(self.low), self._shown_bound(self.high)
        if self.low is not None and self.high is not None:
            return f"{noun} in {'(' if self.low_open else '['}{low}, {high}]"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {low}"
        return noun

    def _shown_bound(self, bound: float | None) -> str:
        if bound is None:
            return ""
        return str(int(bound)) if self.base is int else f"{bound:g}"

    def check(self, value: Any, from_words: bool = False) -> Any:
        """`value` in the rule's type, or BadValue. `from_words`: the value was typed on a
        command line, where fire reads `false` as text and `2.0` as a float, so booleans may
        be words and whole floats count as integers."""
        if value is None and self.optional:
            return None
        converted = self._converted(value, from_words)
        if converted is None or not self._within_bounds(converted):
            raise BadValue(self.describe(), value)
        return converted

    def _converted(self, value: Any, from_words: bool) -> Any:
        """`value` as the base type, or None where it is not one."""
        base = self.base
        if self.choices:
            return value if value in self.choices else None
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower() if isinstance(value, (int, str)) else ""
            return text in TRUE_WORDS if from_words and text in TRUE_WORDS + FALSE_WORDS else None
        if base is int:
            if from_words and isinstance(value, float) and value.is_integer():
                value = int(value)
            return value if is_int(value) else None
        if base is float:
            return float(value) if is_number(value) else None
        if self.is_texts:  # one text, or a list of them (a JSON list on a command line)
            texts = [value] if isinstance(value, str) else value
            ok = isinstance(texts, (list, tuple)) and all(isinstance(t, str) and t for t in texts)
            return tuple(texts) if ok else None
        if base in (str, Path):  # fire reads `--prompt_key 5` as the number 5
            ok = isinstance(value, (str, Path)) or (from_words and is_int(value))
            return base(str(value)) if ok else None
        raise TypeError(f"no rule for {base}")

    def _within_bounds(self, value: Any) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value <= self.high
