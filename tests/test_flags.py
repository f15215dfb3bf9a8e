"""Command-line values through fire into declared types, and what is refused before a run."""
from __future__ import annotations

import fire
import pytest

from llama_gen.errors import UserError
from llama_gen.flags import strict_flags, typed


def test_booleans_accept_only_true_or_false_spellings():
    for value in (True, "true", "True", "yes", 1, "1"):
        assert typed("--x", value, bool) is True
    for value in (False, "false", "FALSE", "no", 0, "0"):
        assert typed("--x", value, bool) is False
    for value in ("maybe", 2, 0.5, None):
        with pytest.raises(UserError, match="--x takes true or false"):
            typed("--x", value, bool)


@pytest.mark.parametrize("kind, good, bad", [
    (int, [(3, 3), (2.0, 2)], [2.5, True, "3x", None]),
    (float, [(0, 0.0), (0.6, 0.6)], [float("nan"), float("inf"), "abc", False]),
    (str, [("bf16", "bf16"), (5, "5")], [True, 1.5, ["a"]]),
    (int | None, [(None, None), (4, 4)], ["four"]),
])
def test_numbers_and_text_are_checked(kind, good, bad):
    for value, want in good:
        got = typed("--flag", value, kind)
        assert got == want and type(got) is type(want)
    for value in bad:
        with pytest.raises(UserError, match="^--flag takes"):
            typed("--flag", value, kind)


def make_command(calls: list):
    def command(path: str, count: int = 1, scale: float = 0.5, verbose: bool = False,
                name: str | None = None) -> None:
        calls.append((path, count, scale, verbose, name))
    return strict_flags(command)


def fire_command(argv: list[str]) -> list:
    calls: list = []
    fire.Fire(make_command(calls), command=argv, name="cmd")
    return calls


def test_values_arrive_in_their_declared_types():
    assert fire_command(["p", "--count", "3", "--scale", "1", "--verbose", "false"]) == [
        ("p", 3, 1.0, False, None)]
    assert fire_command(["--path", "p", "--verbose", "--name", "7"]) == [("p", 1, 0.5, True, "7")]


@pytest.mark.parametrize("argv, message", [
    (["p", "--cuont", "3"], "unknown flag --cuont: did you mean --count?"),
    (["p", "--zzz", "3"], "unknown flag --zzz; see --help"),
    (["p", "extra"], "unexpected argument 'extra'"),
    (["p", "--verbose", "maybe"], "--verbose takes true or false, not 'maybe'"),
    (["p", "--count", "2.5"], "--count takes a whole number, not 2.5"),
    (["p", "--scale", "nan"], "--scale takes a finite number, not 'nan'"),
])
def test_mistakes_are_refused_before_the_command_runs(argv, message):
    calls: list = []
    with pytest.raises(UserError, match="^" + message.replace("?", r"\?").replace(".", r"\.")):
        fire.Fire(make_command(calls), command=argv, name="cmd")
    assert calls == []
