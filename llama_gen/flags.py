"""Command-line values into the types a command declares, before it runs.

fire reads each value as a Python literal where it can and keeps the text otherwise, so
`--overwrite false` arrives as the text "false" (true to Python), `--num_samples 2.5` as a
float and `--top_p abc` as text; and it complains about a flag it did not use (a typo such as
`--tempreature`) only after the command has run. `strict_flags` makes a command refuse all of
these as one-line errors before it starts.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import Any

from .errors import UserError

TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


def typed(flag: str, value: Any, kind: Any) -> Any:
    """`value` as `kind` (bool, int, float, str, or one of them | None), or a UserError."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None:
            return None
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
    if kind is bool:
        text = str(value).lower()
        if isinstance(value, (bool, int, str)) and text in TRUE + FALSE:
            return text in TRUE
        raise UserError(f"{flag} takes true or false, not {value!r}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{flag} takes a whole number, not {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise UserError(f"{flag} takes a finite number, not {value!r}")
    if kind is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{flag} takes text, not {value!r} (text that reads as a number goes "
                        f"in two quotes: {flag} \"'2024.01'\")")
    raise TypeError(f"no conversion to {kind} for {flag}")


def strict_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` for fire: the parameters without defaults stay positional, the others are flags;
    extra words and unknown flags are errors (with the nearest flag named), and every value is
    converted to its declared type."""
    signature = inspect.signature(command)
    kinds = typing.get_type_hints(command)
    params = list(signature.parameters.values())
    required = [p for p in params if p.default is p.empty]
    flags = [p.replace(kind=p.KEYWORD_ONLY) for p in params if p.default is not p.empty]

    @functools.wraps(command)
    def checked(*words: Any, **values: Any) -> Any:
        if len(words) > len(required):
            raise UserError(f"unexpected argument {words[len(required)]!r}: give settings as "
                            "--name value")
        for name in values.keys() - signature.parameters.keys():
            near = difflib.get_close_matches(name, [p.name for p in flags], n=1)
            hint = f": did you mean --{near[0]}?" if near else "; see --help"
            raise UserError(f"unknown flag --{name}{hint}")
        arguments = signature.bind(*words, **values).arguments
        return command(**{name: typed(f"--{name}", value, kinds[name])
                          for name, value in arguments.items()})

    # What fire reads: the same parameters, plus catch-alls so that it hands leftovers to us
    # instead of running the command first.
    checked.__signature__ = signature.replace(parameters=[
        *required, inspect.Parameter("unexpected", inspect.Parameter.VAR_POSITIONAL), *flags,
        inspect.Parameter("unknown", inspect.Parameter.VAR_KEYWORD)])
    return checked
