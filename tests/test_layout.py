"""The package's folders follow its imports: cli → job → engine → model and text → runtime,
with the tiny fixtures (testing) beside the command line, and settings, values and errors at
the top. A module that imports against that direction fails here, naming the import."""
from __future__ import annotations

import ast
from pathlib import Path

import llama_gen

PACKAGE = Path(llama_gen.__file__).parent

# Which of the package's parts each part may import, besides itself and the modules every part
# may use (errors, values, the package's own __init__ for its version).
MAY_IMPORT = {
    "runtime": set(),
    "model": {"runtime"},
    "text": set(),
    "engine": {"model", "text", "runtime"},
    "job": {"engine", "model", "text", "runtime", "settings"},
    "cli": {"job", "engine", "model", "text", "runtime", "testing", "settings"},
    "testing": {"model", "text"},
    "settings": set(),
    "__main__": {"cli", "runtime"},
}
EVERY_PART_MAY_IMPORT = {"errors", "values", "__init__"}


def part_of(dotted: str) -> str:
    """The part a module of the package belongs to: its folder, or a top-level module's name
    (a name the package's __init__ defines, such as __version__, is the __init__'s)."""
    parts = dotted.split(".")[1:]  # less "llama_gen"
    if not parts or not ((PACKAGE / parts[0]).is_dir() or (PACKAGE / f"{parts[0]}.py").exists()):
        return "__init__"
    return parts[0]


def imports_of(path: Path, root: Path = PACKAGE.parent) -> list[tuple[int, str]]:
    """(line, module) of every import of the package's own modules in `path` (a file under
    `root`/llama_gen), function-level ones included."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                targets = [node.module or ""]
            found += [(node.lineno, t) for t in targets if t.startswith("llama_gen")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("llama_gen")]
    return found


def test_every_part_has_a_place_in_the_direction():
    parts = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.stem for p in PACKAGE.glob("*.py")}
    assert parts - MAY_IMPORT.keys() - EVERY_PART_MAY_IMPORT == set()


def test_imports_follow_the_direction():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = part_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for line, target in imports_of(path):
            there = part_of(target)
            if there in (here, *EVERY_PART_MAY_IMPORT) or there in MAY_IMPORT[here]:
                continue
            wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_relative_absolute_and_function_level_imports(tmp_path):
    """The walk above is itself checked, on a module written for it."""
    module = tmp_path / "llama_gen" / "engine" / "runner.py"
    module.parent.mkdir(parents=True)
    module.write_text("from ..model.args import ModelArgs\nimport llama_gen.text.chat\n"
                      "def late():\n    from ..cli import plan\n    from . import blocks\n")
    assert imports_of(module, tmp_path) == [
        (1, "llama_gen.model.args"), (2, "llama_gen.text.chat"), (4, "llama_gen.cli"),
        (5, "llama_gen.engine.blocks")]
    assert [part_of(t) for _, t in imports_of(module, tmp_path)] == [
        "model", "text", "cli", "engine"]


# Sizes a reader takes in at once: a module, a class, a function.
MOST_LINES = {"module": 400, "class": 150, "function": 50}


def test_modules_classes_and_functions_stay_small():
    over = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(PACKAGE.parent)
        if (n := len(text.splitlines())) > MOST_LINES["module"]:
            over.append(f"{where}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            kind = ("class" if isinstance(node, ast.ClassDef) else "function"
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
            if kind and (n := node.end_lineno - node.lineno + 1) > MOST_LINES[kind]:
                over.append(f"{where}:{node.lineno}: {kind} {node.name}, {n} lines")
    assert not over, "\n".join(over)
