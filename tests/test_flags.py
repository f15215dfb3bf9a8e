"""Command-line words through fire into a settings dataclass, what is refused before a run, and
`--help`. (The value rules themselves are tested in test_values.py.)"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

import pytest

from llama_gen.cli.flags import flag_table, flags_reference, from_flags, help_text, parse
from llama_gen.errors import UserError
from llama_gen.settings import Settings, check_fields, setting


@dataclass(frozen=True, kw_only=True)
class Cmd:
    path: str = setting(help="where it goes")
    count: int = setting(1, low=1, help="how many")
    scale: float = setting(0.5, help="how big")
    verbose: bool = setting(False, help="say more")
    name: str | None = setting(None, help="a name", per_record=True)

    def __post_init__(self) -> None:
        check_fields(self)


def as_tuple(c: Cmd) -> tuple:
    return (c.path, c.count, c.scale, c.verbose, c.name)


def test_values_arrive_in_their_declared_types():
    got = parse(Cmd, ["--path", "p", "--count", "3", "--scale", "1", "--verbose", "false"], "cmd")
    assert as_tuple(got) == ("p", 3, 1.0, False, None)
    assert type(got.scale) is float and got.verbose is False
    got = parse(Cmd, ["--path", "p", "--verbose", "--name", "7"], "cmd")
    assert as_tuple(got) == ("p", 1, 0.5, True, "7")
    assert as_tuple(parse(Cmd, ["--path=p", "--count=2.0"], "cmd")) == ("p", 2, 0.5, False, None)


@pytest.mark.parametrize("argv, message", [
    (["--path", "p", "--cuont", "3"], "unknown flag --cuont: did you mean --count?"),
    (["--path", "p", "--zzz", "3"], "unknown flag --zzz; see --help"),
    (["--path", "p", "extra"], "unexpected argument 'extra'"),
    (["p"], "unexpected argument 'p'"),  # the required flag is a flag, not a position
    (["--path", "p", "--verbose", "maybe"], '--verbose must be true or false, got "maybe"'),
    (["--path", "p", "--count", "2.5"], "--count must be an integer >= 1, got 2.5"),
    (["--path", "p", "--count", "0"], "--count must be an integer >= 1, got 0"),
    (["--path", "p", "--scale", "nan"], '--scale must be a number, got "nan"'),
])
def test_mistakes_are_refused_before_the_command_runs(argv, message):
    with pytest.raises(UserError, match="^" + re.escape(message)):
        parse(Cmd, argv, "cmd")


@pytest.mark.parametrize("word", ["-n", "-p", "-c", "-o", "-N"])
def test_short_flags_are_refused_in_one_line_that_says_flags_are_written_in_full(word):
    with pytest.raises(UserError) as e:
        parse(Cmd, ["--path", "p", word, "3"], "cmd")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"unknown flag {word}: flags are written in full, as --name value")
    assert "cmd --help" in message


def test_short_flags_are_refused_for_the_real_settings_too():
    argv = ["--ckpt_dir", "c", "--prompt_path", "p", "--out_path", "o", "-n", "2"]
    with pytest.raises(UserError, match="^unknown flag -n: flags are written in full"):
        parse(Settings, argv, "llama-gen")


def test_negative_numbers_are_values_not_short_flags():
    assert parse(Settings, ["--ckpt_dir", "c", "--prompt_path", "p", "--out_path", "o",
                            "--seed", "-3"], "llama-gen").seed == -3


def test_missing_required_flags_are_named():
    with pytest.raises(UserError, match=r"^--path missing: every run needs --path$"):
        parse(Cmd, ["--count", "2"], "cmd")
    with pytest.raises(UserError) as e:
        parse(Settings, ["--prompt_path", "p"], "llama-gen")
    assert str(e.value).startswith("--ckpt_dir --out_path missing: every run needs --ckpt_dir, "
                                   "--prompt_path, --out_path")


def test_text_that_reads_as_a_number_gets_a_quoting_hint():
    with pytest.raises(UserError, match=re.escape("--name must be text, got 2024.01 (text that "
                                                  "reads as a number goes in two quotes")):
        parse(Cmd, ["--path", "p", "--name", "2024.01"], "cmd")
    assert parse(Cmd, ["--path", "p", "--name", "'2024.01'"], "cmd").name == "2024.01"


def test_from_flags_checks_each_value_and_builds_the_dataclass():
    assert as_tuple(from_flags(Cmd, (), {"path": "p", "count": 2.0, "verbose": "yes"})) == (
        "p", 2, 0.5, True, None)
    with pytest.raises(UserError, match="^unexpected argument 'x'"):
        from_flags(Cmd, ("x",), {"path": "p"})
    with pytest.raises(UserError, match="^unknown flag --nmae: did you mean --name?"):
        from_flags(Cmd, (), {"path": "p", "nmae": "x"})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "bf16", "fp16", "fp32"])
def test_dtype_accepts_torch_and_short_names(dtype):
    argv = ["--ckpt_dir", "c", "--prompt_path", "p", "--out_path", "o", "--dtype", dtype]
    assert parse(Settings, argv, "llama-gen").dtype == dtype


def test_dtype_refuses_others_naming_the_choices():
    argv = ["--ckpt_dir", "c", "--prompt_path", "p", "--out_path", "o", "--dtype", "int8"]
    with pytest.raises(UserError, match=re.escape(
            '--dtype must be one of bf16, fp16, fp32, bfloat16, float16, float32, got "int8"')):
        parse(Settings, argv, "llama-gen")


# --- --help ------------------------------------------------------------------------------------

def settings_help() -> str:
    return help_text(Settings, "llama-gen --ckpt_dir DIR ...", "Generate.", {"demo": "try it"})


def test_help_lists_every_settings_field_with_plain_types():
    text = settings_help()
    for f in dataclasses.fields(Settings):
        assert re.search(rf"^  --{f.name}\b", text, re.MULTILINE), f.name
    assert "Optional[" not in text and "| None" not in text and "NoneType" not in text
    assert "Union" not in text and "Literal" not in text
    assert re.search(r"^  --max_seq_len INT$", text, re.MULTILINE)
    assert re.search(r"^  --top_p FLOAT$", text, re.MULTILINE)
    assert re.search(r"^  --ckpt_dir PATH$", text, re.MULTILINE)
    assert re.search(r"^  --id_key STR$", text, re.MULTILINE)
    assert re.search(r"^  --overwrite$", text, re.MULTILINE)  # a switch takes no value
    assert re.search(r"^  --dtype bf16\|fp16\|fp32\|bfloat16\|float16\|float32$", text,
                     re.MULTILINE)


def test_help_marks_the_required_flags_and_shows_defaults():
    text = settings_help()
    blocks = dict(re.findall(r"^  --(\w+).*\n((?:      .*\n)+)", text, re.MULTILINE))
    assert set(blocks) == {f.name for f in dataclasses.fields(Settings)}
    for name in ("ckpt_dir", "prompt_path", "out_path"):
        assert "(required)" in " ".join(blocks[name].split()), name
    for name in set(blocks) - {"ckpt_dir", "prompt_path", "out_path"}:
        assert "required" not in blocks[name], name
    assert "(default 0.9)" in " ".join(blocks["gpu_memory_utilization"].split())
    assert "default: the model's context" in " ".join(blocks["max_seq_len"].split())
    assert "a record may set it" in " ".join(blocks["top_p"].split())
    assert "a record may set it" not in " ".join(blocks["max_seq_len"].split())


def test_help_has_usage_summary_commands_and_short_lines():
    text = settings_help()
    assert text.startswith("usage: llama-gen --ckpt_dir DIR ...\n\nGenerate.\n\nflags:\n")
    assert text.endswith("\ncommands:\n  demo    try it\n")
    assert all(len(line) <= 96 for line in text.splitlines())
    assert "commands:" not in help_text(Cmd, "cmd", "s")
    assert not re.search(r"^\s+-[a-z]\b", text, re.MULTILINE)  # no short flags shown


def test_help_of_a_small_dataclass():
    text = help_text(Cmd, "cmd [flags]", "Do it.")
    assert "  --path STR\n      where it goes (required)\n" in text
    assert "  --count INT\n      how many (default 1)\n" in text
    assert "  --verbose\n      say more\n" in text
    assert "  --name STR\n      a name; a record may set it\n" in text


@pytest.mark.parametrize("typed, stops", [
    ("###", ("###",)), ("a,b", ("a,b",)), ("5", ("5",)), ("\n\n", ("\n\n",)),
    ("[INST]", ("[INST]",)), ('["a"', ('["a"',)), ("[1, 2]", ("[1, 2]",)),
    ('["\\n\\nQuestion:", "###"]', ("\n\nQuestion:", "###")), ('["x"]', ("x",))])
def test_stop_takes_one_text_as_typed_or_a_json_list(typed, stops):
    paths = ["--ckpt_dir", "a", "--prompt_path", "b", "--out_path", "c"]
    assert parse(Settings, [*paths, "--stop", typed], "llama-gen").stop == stops
    assert parse(Settings, [*paths, f"--stop={typed}"], "llama-gen").stop == stops


@pytest.mark.parametrize("typed, message", [('[""]', "non-empty"), ("", "non-empty")])
def test_a_bad_stop_list_is_one_error(typed, message):
    paths = ["--ckpt_dir", "a", "--prompt_path", "b", "--out_path", "c"]
    with pytest.raises(UserError, match=re.escape(message)):
        parse(Settings, [*paths, "--stop", typed], "llama-gen")


# --- the README's flag tables -------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Chosen:
    path: str = setting(help="where <it> goes")
    mode: Literal["a", "b"] = setting("a", help="a | b")
    size: int | None = setting(None, low=1, auto=True, help="how big, or auto")
    lock: bool = setting(True, help="lock it", per_record=True)

    def __post_init__(self) -> None:
        check_fields(self)


def test_a_flag_table_has_type_default_marks_and_escaped_help():
    lines = flag_table(Chosen, ["path", "mode", "size", "lock"],
                       {"record": lambda f: f.metadata["per_record"]})
    assert lines == [
        "| flag | type | default | record | help |",
        "|---|---|---|---|---|",
        "| `--path` | STR | required |  | where \\<it> goes |",
        "| `--mode` | a\\|b | `a` |  | a \\| b |",
        "| `--size` | INT\\|auto |  |  | how big, or auto |",
        "| `--lock` | BOOL | `true` | ✓ | lock it |"]


def test_the_flag_reference_has_a_row_per_flag_of_each_command():
    text = flags_reference()
    rows = re.findall(r"^\| `--(\w+)` \|", text, re.MULTILINE)
    generate = [f.name for f in dataclasses.fields(Settings)]
    assert rows[:len(generate)] == generate
    assert rows[len(generate):len(generate) + 3] == ["prompt_path", "text_key", "completion_key"]
    assert all(line.count(" | ") == text.splitlines()[2].count(" | ")
               for line in text.splitlines()[4:4 + len(generate)])
