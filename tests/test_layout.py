"""The project's layout rules, checked on the source with `ast` (nothing is imported).

- The library (pipeline/, models/) never imports the entry points (stages/, cli/).
- Every project module a DVC stage runs (its `python -m` module and everything that
  imports, transitively, function-level imports included) is among that stage's `deps`
  in dvc.yaml, so no code change escapes DVC's view; every code dep listed exists and
  is one the stage runs, so no edit reruns a stage for nothing.
- cli.submit takes the stages and their commands from dvc.yaml, in its order.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from cli.submit import dvc_stages, entrypoint

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("pipeline", "models", "stages", "cli")  # top-level packages of the project
LIBRARY = ("pipeline", "models")
ENTRY_POINTS = ("stages", "cli")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The project file that defines module `name` (``a.b`` -> a/b.py or a/b/__init__.py)."""
    if name.split(".")[0] not in PROJECT:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement under `node`, in functions too; not `if TYPE_CHECKING:` ones."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [node]
    found: list[ast.Import | ast.ImportFrom] = []
    children = (
        node.orelse if isinstance(node, ast.If) and _is_type_checking(node) else ast.iter_child_nodes(node)
    )
    for child in children:
        found += _import_nodes(child)
    return found


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Dotted names of the modules `path` imports (absolute; `from a import b` gives a and a.b)."""
    package = ".".join(path.relative_to(root).parent.parts)  # what `from .` means in `path`
    names: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parent + ([base] if base else []))
        names.add(base)
        names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name}


def _has_code(path: Path) -> bool:
    """False for a file that holds nothing but (at most) a docstring."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def closure(module: str, root: Path = ROOT) -> set[str]:
    """Repo-relative paths of every project file that running `module` executes.

    Importing ``a.b.c`` runs a/__init__.py and a/b/__init__.py too; those count when
    they hold code.
    """
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]), root)
            if path is None or path in seen:
                continue
            seen.add(path)
            todo += imported_modules(path, root)
    return {p.relative_to(root).as_posix() for p in seen if p.name != "__init__.py" or _has_code(p)}


def stage_module(name: str, stage: dict) -> str:
    """The module a stage's ``cmd: python -m <module>`` runs."""
    match = re.fullmatch(r"python -m ([\w.]+)", stage["cmd"].strip())
    assert match, f"dvc.yaml: stages.{name}.cmd={stage['cmd']!r}: expected 'python -m <module>'"
    return match.group(1)


def interpolate(text: str) -> str:
    """Resolves dvc.yaml's ``${section.key}`` references from params.yaml, as DVC does."""

    def lookup(match: re.Match[str]) -> str:
        value: object = PARAMS
        for key in match.group(1).split("."):
            assert isinstance(value, dict) and key in value, (
                f"dvc.yaml: {text}: no {match.group(1)} in params.yaml"
            )
            value = value[key]
        return str(value)

    return re.sub(r"\$\{\s*([\w.]+)\s*\}", lookup, text)


def code_deps(stage: dict) -> list[str]:
    """A stage's deps inside the project's code folders (data deps are left out)."""
    deps = [interpolate(dep) for dep in stage.get("deps", [])]
    return [dep for dep in deps if Path(dep).parts[0] in PROJECT]


def uncovered(files: set[str], deps: list[str]) -> list[str]:
    """The files that no dep covers (a dep is a file, or a folder covering what is inside)."""
    return sorted(
        f for f in files if not any(f == d.rstrip("/") or f.startswith(d.rstrip("/") + "/") for d in deps)
    )


def covers_any(files: set[str], dep: str) -> bool:
    """Whether `dep` covers at least one of `files`."""
    return len(uncovered(files, [dep])) < len(files)


def library_files() -> list[Path]:
    return sorted(p for package in LIBRARY for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", library_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_library_never_imports_stages_or_cli(path: Path) -> None:
    wrong = sorted(m for m in imported_modules(path) if m.split(".")[0] in ENTRY_POINTS)
    assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}: the library must not depend on entry points"


@pytest.mark.parametrize("name", list(STAGES))
def test_every_module_a_stage_runs_is_in_its_deps(name: str) -> None:
    stage = STAGES[name]
    missing = uncovered(closure(stage_module(name, stage)), code_deps(stage))
    assert not missing, f"dvc.yaml: stages.{name}.deps lacks {missing}, which the stage imports"


@pytest.mark.parametrize("name", list(STAGES))
def test_every_code_dep_listed_exists(name: str) -> None:
    absent = [dep for dep in code_deps(STAGES[name]) if not (ROOT / dep).exists()]
    assert not absent, f"dvc.yaml: stages.{name}.deps lists {absent}, which do not exist"


@pytest.mark.parametrize("name", list(STAGES))
def test_every_code_dep_listed_is_one_the_stage_runs(name: str) -> None:
    # A stale dep makes DVC rerun the stage (and all after it) for a file it never runs.
    stage = STAGES[name]
    files = closure(stage_module(name, stage))
    code = [d for d in code_deps(stage) if d.endswith(".py") or any((ROOT / d).rglob("*.py"))]
    stale = [d for d in code if not covers_any(files, d)]
    assert not stale, f"dvc.yaml: stages.{name}.deps lists {stale}, which the stage never imports"


def test_the_import_walk_sees_a_function_level_import_that_escapes_the_deps(tmp_path: Path) -> None:
    # A miniature project: the stage imports a module whose function imports another.
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "data").mkdir(parents=True)
    (tmp_path / "pipeline" / "__init__.py").write_text('"""Docstring only: not a dependency."""\n')
    (tmp_path / "pipeline" / "data" / "__init__.py").write_text("VERSION = 1\n")
    (tmp_path / "stages" / "one.py").write_text("from pipeline.data import first\n")
    (tmp_path / "pipeline" / "data" / "first.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pipeline import typed_only\n"
        "def run():\n    from . import second\n    return second\n"
    )
    (tmp_path / "pipeline" / "data" / "second.py").write_text("import json\nfrom ..third import x\n")
    (tmp_path / "pipeline" / "third.py").write_text("x = 1\n")
    (tmp_path / "pipeline" / "typed_only.py").write_text("x = 1\n")
    files = closure("stages.one", tmp_path)
    assert files == {
        "stages/one.py",
        "pipeline/data/__init__.py",
        "pipeline/data/first.py",
        "pipeline/data/second.py",
        "pipeline/third.py",
    }
    deps = ["stages/one.py", "pipeline/data", "${data.raw}"]
    assert uncovered(files, deps) == ["pipeline/third.py"]


def test_submit_runs_dvc_yamls_commands_in_its_order() -> None:
    commands = dvc_stages()
    assert list(commands) == list(STAGES)
    assert (
        entrypoint(["evaluate", "train"], commands)
        == f"{STAGES['train']['cmd']} && {STAGES['evaluate']['cmd']}"
    )


def test_submit_rejects_a_stage_without_a_command(tmp_path: Path) -> None:
    path = tmp_path / "dvc.yaml"
    path.write_text("stages:\n  a:\n    cmd: python -m stages.a\n  b:\n    deps: [x]\n")
    with pytest.raises(ValueError, match=r"dvc\.yaml: stages\.b\.cmd: expected one command string, got None"):
        dvc_stages(path)
