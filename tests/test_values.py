"""values.Rule: the one check for every value a user gives (flags, prompt records, params.json)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pytest

from llama_gen.values import BadValue, Rule, shown

# --- command-line words (from_words=True): what fire hands over ----------------------------------

def test_booleans_accept_only_true_or_false_spellings():
    rule = Rule(bool)
    for value in (True, "true", "True", "yes", 1, "1"):
        assert rule.check(value, from_words=True) is True
    for value in (False, "false", "FALSE", "no", 0, "0"):
        assert rule.check(value, from_words=True) is False
    for value in ("maybe", 2, 0.5, None):
        with pytest.raises(BadValue, match="^must be true or false, got "):
            rule.check(value, from_words=True)


@pytest.mark.parametrize("kind, good, bad", [
    (int, [(3, 3), (2.0, 2)], [2.5, True, "3x", None]),
    (float, [(0, 0.0), (0.6, 0.6)], [float("nan"), float("inf"), "abc", False]),
    (str, [("bf16", "bf16"), (5, "5")], [True, 1.5, ["a"]]),
    (int | None, [(None, None), (4, 4)], ["four"]),
])
def test_numbers_and_text_are_checked(kind, good, bad):
    rule = Rule(kind)
    for value, want in good:
        got = rule.check(value, from_words=True)
        assert got == want and type(got) is type(want)
    for value in bad:
        with pytest.raises(BadValue, match="^must be "):
            rule.check(value, from_words=True)


@pytest.mark.parametrize("kind, value, message", [
    (bool, "maybe", 'must be true or false, got "maybe"'),
    (int, 2.5, "must be an integer, got 2.5"),
    (int, True, "must be an integer, got true"),
    (float, float("nan"), "must be a number, got NaN"),
    (float, "abc", 'must be a number, got "abc"'),
    (str, ["a"], 'must be text, got ["a"]'),
    (int | None, "four", 'must be an integer, got "four"'),
])
def test_a_refusal_says_the_rule_and_the_value_as_json(kind, value, message):
    with pytest.raises(BadValue) as e:
        Rule(kind).check(value, from_words=True)
    assert str(e.value) == message
    assert e.value.rule == message.removeprefix("must be ").rsplit(", got ", 1)[0]


# --- JSON values (from_words=False): records and params.json are exact -------------------------

@pytest.mark.parametrize("kind, value", [
    (bool, "true"), (bool, 1), (bool, "yes"),  # a record's booleans are JSON booleans
    (int, 2.0),                                # a whole float is not an integer in JSON
    (str, 5), (Path, 5),                       # nor is a number text
])
def test_json_values_are_not_read_as_words(kind, value):
    with pytest.raises(BadValue):
        Rule(kind).check(value)
    Rule(kind).check(value, from_words=True)  # the same value typed on a command line is fine


def test_values_come_back_in_the_rule_type():
    assert Rule(float).check(1) == 1.0 and type(Rule(float).check(1)) is float
    assert Rule(Path).check("a/b") == Path("a/b")
    assert Rule(Path | None).check(None) is None
    assert Rule(str).check("x") == "x"


def test_none_only_where_the_kind_allows_it():
    assert Rule(int | None, low=1).check(None) is None
    for kind in (int, float, str, Path, bool):
        with pytest.raises(BadValue, match="got null$"):
            Rule(kind).check(None)


# --- bounds and choices ------------------------------------------------------------------------

def test_bounds_closed_open_and_both():
    at_least_1 = Rule(int, low=1)
    assert at_least_1.check(1) == 1
    with pytest.raises(BadValue, match=r"^must be an integer >= 1, got 0$"):
        at_least_1.check(0)
    positive = Rule(float, low=0, low_open=True)
    assert positive.check(0.5) == 0.5
    with pytest.raises(BadValue, match=r"^must be a number > 0, got 0$"):
        positive.check(0)
    top_p = Rule(float, low=0, high=1, low_open=True)
    assert top_p.check(1) == 1.0 and top_p.check(1e-9) == 1e-9
    for bad, text in ((0, "0"), (1.01, "1.01"), (-1, "-1")):
        with pytest.raises(BadValue, match=re.escape(f"must be a number in (0, 1], got {text}")):
            top_p.check(bad)
    closed = Rule(float, low=0, high=2)
    assert closed.describe() == "a number in [0, 2]" and closed.check(0) == 0.0


def test_bounds_apply_to_words_too():
    with pytest.raises(BadValue, match=r"^must be an integer >= 1, got 0.0$"):
        Rule(int, low=1).check(0.0, from_words=True)


def test_choices():
    rule = Rule(Literal["a", "b"] | None)
    assert rule.choices == ("a", "b") and rule.optional
    assert rule.check("b") == "b" and rule.check(None) is None
    for bad in ("c", "A", 1, True):
        with pytest.raises(BadValue, match="^must be one of a, b, got "):
            rule.check(bad, from_words=True)


@pytest.mark.parametrize("rule, words", [
    (Rule(bool), "true or false"),
    (Rule(int), "an integer"),
    (Rule(int | None, low=1), "an integer >= 1"),
    (Rule(float, low=0), "a number >= 0"),
    (Rule(float, low=0, high=1, low_open=True), "a number in (0, 1]"),
    (Rule(str), "text"),
    (Rule(Path | None), "a path"),
    (Rule(Literal["x", "y"]), "one of x, y"),
])
def test_describe(rule, words):
    assert rule.describe() == words


def test_base_and_optional():
    assert Rule(int | None).base is int and Rule(int | None).optional
    assert Rule(int).base is int and not Rule(int).optional


def test_shown_is_json_where_it_can_be():
    assert shown("5") == '"5"' and shown(5) == "5" and shown(True) == "true"
    assert shown(float("nan")) == "NaN" and shown(None) == "null" and shown("é") == '"é"'
    assert shown(Path("a")) == repr(Path("a"))


def test_huge_json_integers_are_refused_not_a_crash():
    # json.loads reads `1111...` (400 digits) as an int too large for a float.
    huge = int("1" * 400)
    with pytest.raises(BadValue, match="^must be a number >= 0"):
        Rule(float, low=0).check(huge)
