"""The README against the code: its flag tables are the settings as `flags_reference` renders
them, every output field and exit code is documented, every `--flag` it names exists, its links
resolve, and its test command is the one CI runs."""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from llama_gen.cli import main
from llama_gen.cli.demo import DemoSettings
from llama_gen.cli.flags import flags_reference
from llama_gen.cli.plan import PlanSettings
from llama_gen.settings import OUTPUT_FIELDS, SCORE_FIELDS, ScoreSettings, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {path: path.read_text(encoding="utf-8")
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}

START, END = "<!-- flags:start -->\n", "<!-- flags:end -->"

# Flags of the other tools the README shows (torchrun, pip, Slurm, vLLM, the tiny-model script).
OTHER_TOOLS = {
    "torchrun": {"nnodes", "node_rank", "nproc_per_node", "master_addr", "master_port",
                 "max_restarts", "no-python"},
    "pip": {"index-url"},
    "slurm": {"signal", "no-requeue", "dependency", "cpus-per-task", "gpus-per-node", "gres",
              "no-kill"},
    "vllm": {"block-size", "enforce-eager"},
    "scripts/make_tiny_model.py": {"family", "n_shards"},
    "llama-gen itself": {"help", "name"},  # --help, and `--name value` as the form of a flag
}


def section(text: str, heading: str) -> str:
    """The text under a Markdown heading, up to the next heading of its level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    after = re.search(rf"^#{{1,{level}}} ", text[start + len(heading):], re.MULTILINE)
    return text[start:start + len(heading) + after.start()] if after else text[start:]


def table_rows(text: str) -> dict[str, str]:
    """A Markdown table's rows by their first cell, backticks dropped."""
    return {line.split("|")[1].strip().strip("`"): line for line in text.splitlines()
            if line.startswith("| ")}


def test_the_flag_tables_are_the_settings_as_rendered_now():
    assert README.count(START) == 1 and README.count(END) == 1
    between = README[README.index(START) + len(START):README.index(END)]
    assert between == flags_reference(), (
        "the README's flag tables differ from the settings: paste the output of "
        "`python -c 'from llama_gen.cli.flags import flags_reference; "
        "print(flags_reference(), end=\"\")'` between the flags markers")


def test_the_flag_tables_name_every_flag_of_every_command():
    between = README[README.index(START):README.index(END)]
    for cls in (Settings, ScoreSettings, PlanSettings, DemoSettings):
        for f in dataclasses.fields(cls):
            assert f"| `--{f.name}` |" in between, (cls.__name__, f.name)


@pytest.mark.parametrize("field", sorted(set(OUTPUT_FIELDS) | set(SCORE_FIELDS)))
def test_every_output_field_is_documented(field):
    rows = table_rows(section(README, "### Output fields"))
    assert field in rows, f"README's Output fields has no row for {field}"


def exit_codes() -> tuple[set[int], bool]:
    """The exit statuses `main` gives: the constants passed to `fail` and `sys.exit`, and
    whether one is 128 + a signal."""
    codes, by_signal = set(), False
    for node in ast.walk(ast.parse(Path(main.__file__).read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        arg = (node.args[1] if name == "fail" and len(node.args) > 1 else
               node.args[0] if name == "sys.exit" and node.args else None)
        if isinstance(arg, ast.Constant) and isinstance(arg.value, int):
            codes.add(arg.value)
        elif isinstance(arg, ast.BinOp) and ast.unparse(arg.left) == "128":
            by_signal = True
    return codes, by_signal


def test_every_exit_status_main_gives_is_in_the_exit_codes_table():
    codes, by_signal = exit_codes()
    assert {1, 2, 3} <= codes and by_signal  # the reading of main.py still finds them
    table = section(README, "### Exit codes")
    rows = table_rows(table)
    assert "0" in rows
    for code in codes:
        if code > 128:
            assert str(code) in table, code  # 130: Ctrl-C before the job's handler
        else:
            assert str(code) in rows, code
    assert "128 + N" in rows and "130" in rows["128 + N"] and "143" in rows["128 + N"]


def test_every_flag_the_docs_name_is_a_flag_of_llama_gen_or_of_a_named_tool():
    """A renamed or dropped flag leaves no trace in the README or the design notes."""
    ours = {f.name for cls in (Settings, ScoreSettings, PlanSettings, DemoSettings)
            for f in dataclasses.fields(cls)}
    others = set().union(*OTHER_TOOLS.values())
    for path, text in DOCS.items():
        if path.name == "benchmarks.md":  # history, with the benchmark scripts' own flags
            continue
        named = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9_-]*)", text))
        assert named - ours - others == set(), f"{path.name} names flags that do not exist"


def anchors(text: str) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_the_docs_links_resolve_to_files_and_headings():
    for path, text in DOCS.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"https?://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{path.name}: {target}"
            if anchor:
                assert anchor in anchors(linked.read_text(encoding="utf-8")), (
                    f"{path.name}: {target}")


def test_the_readme_tests_with_the_command_ci_runs():
    command = "python -m pytest -q"
    blocks = re.findall(r"```bash\n(.*?)```", README, re.DOTALL)
    assert any(command in line.split("#")[0] for block in blocks for line in block.splitlines())
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_readme_sends_layout_design_and_benchmarks_to_docs():
    for name in ("layout.md", "design.md", "benchmarks.md"):
        assert f"](docs/{name})" in README, name
