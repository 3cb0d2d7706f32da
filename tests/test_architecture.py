"""Architecture checks (STYLE.md 12, 17-20): the import layers, the code dependencies dvc.yaml declares, thin
stages, no task-name branches outside the task modules, reasoned function-level imports and no import cycles.

Every check reads the source (AST, tokens, import-linter's and grimp's graphs) without importing the project, so
the module takes a few seconds. Each check lists every violation in one message; the last tests run the checks on
tiny made-up projects to show that they catch what they are for.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest
import yaml

pytestmark = pytest.mark.quick

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("polypflow", "models", "stages", "flows")  # the project's own top-level packages
LIBRARY = ("polypflow", "stages", "flows")  # where the code-style checks apply
TASK_NAMES = {"detection", "segmentation"}
MAX_STAGE_LINES = 120
PRAGMA = re.compile(r"#\s*(noqa|type:\s*ignore|pragma|pylint:|fmt:|isort:)[\w:,\[\]\s-]*$")


def python_files(*folders: str, repo: Path = REPO) -> list[Path]:
    return sorted(path for folder in folders for path in (repo / folder).rglob("*.py"))


def rel(path: Path, repo: Path = REPO) -> str:
    return path.relative_to(repo).as_posix()


# --- a. import-linter ----------------------------------------------------------------------------------------


def test_import_contracts_hold() -> None:
    """The contracts in pyproject.toml's [tool.importlinter] (layers, models stand alone, stages independent,
    thin flows, acyclic packages)."""
    lint = Path(sys.executable).with_name("lint-imports")  # the venv's, installed by the `test` extra
    assert lint.exists(), f"{lint} missing: pip install -e '.[test]'"
    done = subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"lint-imports failed:\n{done.stdout}\n{done.stderr}"


# --- b. dvc.yaml's code dependencies -------------------------------------------------------------------------


def module_file(module: str, repo: Path = REPO) -> Path | None:
    """The file that defines ``module`` (``a/b.py`` or ``a/b/__init__.py``), or None."""
    base = repo.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path, module: str) -> Iterator[tuple[str, bool]]:
    """(module, must exist) for every import statement anywhere in ``path``: ``from a import b`` names ``a``, and
    ``a.b`` where that is a submodule (otherwise ``b`` is a name defined in ``a``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, True) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            yield base, True
            yield from ((f"{base}.{alias.name}", False) for alias in node.names if alias.name != "*")


def with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_closure(start: str, repo: Path = REPO) -> tuple[set[Path], set[str]]:
    """The project files that ``import start`` executes (parent packages' ``__init__.py`` included), and the
    project modules imported somewhere in them that resolve to no file."""
    files: set[Path] = set()
    unresolved: set[str] = set()
    todo = [(start, True)]
    while todo:
        name, must_exist = todo.pop()
        if module_file(name, repo) is None:
            if must_exist:
                unresolved.add(name)
            continue
        for module in with_parents(name):
            path = module_file(module, repo)
            if path is None or path in files:
                continue
            files.add(path)
            todo.extend(item for item in imported_modules(path, module) if item[0].split(".")[0] in PROJECT)
    return files, unresolved


def stage_bodies(dvc: dict) -> Iterator[tuple[str, dict]]:
    """(name, definition) for every stage; a ``foreach`` stage's definition is its ``do`` block."""
    for name, stage in dvc["stages"].items():
        yield name, stage.get("do", stage)


def literal_deps(stage: dict) -> list[str]:
    deps = [next(iter(dep)) if isinstance(dep, dict) else dep for dep in stage.get("deps", [])]
    return [dep.rstrip("/") for dep in deps if "${" not in dep]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep + "/") for dep in deps)


def code_dep_problems(repo: Path = REPO) -> list[str]:
    """Per stage: code its ``python -m stages.<name>`` imports that no literal dep covers, imports of project
    modules that do not exist, and literal code deps that point nowhere."""
    problems = []
    for name, stage in stage_bodies(yaml.safe_load((repo / "dvc.yaml").read_text())):
        cmd = " ".join(stage["cmd"]) if isinstance(stage["cmd"], list) else stage["cmd"]
        found = re.search(r"python -m (stages\.\w+)", cmd)
        if found is None:
            problems.append(f"{name}: cmd is not `python -m stages.<name>`: {cmd!r}")
            continue
        deps = literal_deps(stage)
        files, unresolved = import_closure(found[1], repo)
        missing = sorted(p for p in (rel(f, repo) for f in files) if not covered(p, deps))
        dangling = sorted(d for d in deps if d.split("/")[0] in PROJECT and not (repo / d).exists())
        for label, items in (("imported but not in deps", missing), ("imports of missing modules", unresolved),
                             ("deps that do not exist", dangling)):
            if items:
                problems.append(f"{name}: {label}: {', '.join(sorted(items))}")
    return problems


def test_dvc_code_deps_cover_each_stages_imports() -> None:
    """STYLE.md 20: a stage's code deps are derived from its imports, so an edit to any file the stage runs
    re-runs it. Add a missing file (or its folder) to the stage's deps in dvc.yaml."""
    problems = code_dep_problems()
    assert not problems, "dvc.yaml deps drifted from the stages' imports:\n" + "\n".join(problems)


# --- c. thin stages ------------------------------------------------------------------------------------------


def long_stages(repo: Path = REPO) -> dict[str, int]:
    return {rel(p, repo): n for p in python_files("stages", repo=repo) if p.name != "__init__.py"
            if (n := len(p.read_text().splitlines())) > MAX_STAGE_LINES}


def test_stages_are_thin() -> None:
    """STYLE.md 5: a stage is a thin command line over the library; logic past this length belongs in polypflow."""
    long = long_stages()
    assert not long, f"stage modules over {MAX_STAGE_LINES} lines: {long}"


# --- d. no branches on a task's name -------------------------------------------------------------------------


def names_task(node: ast.AST) -> bool:
    """A "detection"/"segmentation" literal, alone or inside a tuple/list/set literal."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value.lower() in TASK_NAMES
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(names_task(element) for element in node.elts)
    return False


BRANCH_OPS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)


def task_branches(path: Path) -> Iterator[int]:
    """Lines of ``path`` that compare with a task's name or match a case on it."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare) and any(isinstance(op, BRANCH_OPS) for op in node.ops):
            if any(names_task(operand) for operand in [node.left, *node.comparators]):
                yield node.lineno
        elif isinstance(node, ast.MatchValue) and names_task(node.value):
            yield node.lineno


def task_branch_offenders(repo: Path = REPO) -> list[str]:
    tasks = repo / "polypflow" / "tasks"
    return [f"{rel(path, repo)}:{line}" for path in python_files(*LIBRARY, repo=repo)
            if not path.is_relative_to(tasks) for line in sorted(set(task_branches(path)))]


def test_no_branch_on_task_name_outside_tasks() -> None:
    """STYLE.md 18: a task is a contract, not a string; only polypflow/tasks/ may ask which task it is."""
    offenders = task_branch_offenders()
    assert not offenders, "comparisons with a task's name outside polypflow/tasks/:\n" + "\n".join(offenders)


# --- e. function-level imports carry their reason ------------------------------------------------------------


def nested_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements inside a def or class body (module-level ``if``/``try`` blocks are module level)."""
    def visit(node: ast.AST, nested: bool) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if nested and isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda)
            yield from visit(child, inner)
    yield from visit(tree, False)


def reason_lines(source: str) -> set[int]:
    """Lines that carry a comment saying something (a bare ``# noqa``/``# type: ignore`` says nothing)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {tok.start[0] for tok in tokens if tok.type == tokenize.COMMENT and not PRAGMA.fullmatch(tok.string)}


def unexplained_imports(path: Path) -> Iterator[int]:
    """Lines of function-level imports with no reason on their own lines or on the comment line just above.
    A reason above a run of consecutive nested imports covers the whole run."""
    source = path.read_text()
    lines, reasons = source.splitlines(), reason_lines(source)
    explained_ends: set[int] = set()
    for node in sorted(nested_imports(ast.parse(source, str(path))), key=lambda n: n.lineno):
        above = node.lineno - 1
        own = any(line in reasons for line in range(node.lineno, node.end_lineno + 1))
        comment_above = above in reasons and lines[above - 1].lstrip().startswith("#")
        if own or comment_above or above in explained_ends:
            explained_ends.add(node.end_lineno)
        else:
            yield node.lineno


def unexplained_import_offenders(repo: Path = REPO) -> list[str]:
    return [f"{rel(path, repo)}:{line}" for path in python_files(*LIBRARY, repo=repo)
            for line in unexplained_imports(path)]


def test_function_level_imports_give_a_reason() -> None:
    """An import inside a function hides a dependency (and often a layering problem): say why it is there, on its
    line or the comment line just above (e.g. ``# lazy: onnxruntime only for --backend onnx``)."""
    offenders = unexplained_import_offenders()
    assert not offenders, "function-level imports without a comment:\n" + "\n".join(offenders)


# --- f. no import cycles -------------------------------------------------------------------------------------


def import_cycles(package: str) -> list[str]:
    """Every direct import A -> B of ``package`` for which B also reaches A, with the chain back."""
    graph = grimp.build_graph(package, cache_dir=None)
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                cycles.append(f"{importer} -> {imported}, back: {' -> '.join(back)}")
    return cycles


def test_no_import_cycles_in_polypflow() -> None:
    """STYLE.md 19: a cycle cannot come back unnoticed (module level, finer than the package-level contract)."""
    cycles = import_cycles("polypflow")
    assert not cycles, "import cycles in polypflow:\n" + "\n".join(cycles)


# --- the checks catch what they are for (tiny projects in tmp_path) ------------------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_code_dep_check_catches_drift(tmp_path: Path) -> None:
    stage = "python -m stages.train"
    repo = write(tmp_path, {
        "stages/__init__.py": "", "polypflow/__init__.py": "", "polypflow/train/__init__.py": "",
        "stages/train.py": "import os\nfrom polypflow.train import engine\n",
        "polypflow/train/engine.py": "def f():\n    from polypflow import io\n    import polypflow.gone\n",
        "polypflow/io.py": "from . import train\n",
        "dvc.yaml": yaml.safe_dump({"stages": {
            "train": {"matrix": {"m": [1]}, "cmd": stage, "deps": ["stages/train.py", "polypflow/train", "${x}"]},
            "split": {"foreach": [1], "do": {"cmd": stage, "deps": ["stages", "polypflow", "polypflow/old.py"]}},
        }}, sort_keys=False),
    })
    assert code_dep_problems(repo) == [
        "train: imported but not in deps: polypflow/__init__.py, polypflow/io.py, stages/__init__.py",
        "train: imports of missing modules: polypflow.gone",
        "split: imports of missing modules: polypflow.gone",
        "split: deps that do not exist: polypflow/old.py",
    ]


def test_style_checks_catch_violations(tmp_path: Path) -> None:
    repo = write(tmp_path, {
        "polypflow/tasks/seg.py": "ok = task == 'segmentation'\n",
        "stages/a.py": (
            "if task == 'detection': pass\n"
            "def f(task):\n"
            "    import json  # lazy: only here\n"
            "    # the two below: heavy\n"
            "    import numpy\n"
            "    import torch\n"
            "\n"
            "    import yaml  # noqa: F401\n"
            "    match task:\n"
            "        case 'segmentation': pass\n"
            "    return task in ('x', 'detection') or task != 'Detection'\n"
        ),
    })
    assert task_branch_offenders(repo) == ["stages/a.py:1", "stages/a.py:10", "stages/a.py:11"]
    assert unexplained_import_offenders(repo) == ["stages/a.py:8"]
    write(repo, {"stages/__init__.py": "\n" * 200, "stages/long.py": "\n" * (MAX_STAGE_LINES + 1)})
    assert long_stages(repo) == {"stages/long.py": MAX_STAGE_LINES + 1}


def test_cycle_check_catches_a_cycle_through_a_function_level_import(tmp_path: Path, monkeypatch) -> None:
    write(tmp_path, {
        "archcycle/__init__.py": "", "archcycle/a.py": "from archcycle import b\n",
        "archcycle/b.py": "def f():\n    from archcycle import c\n",
        "archcycle/c.py": "import archcycle.a\n", "archcycle/d.py": "import archcycle.a\n",  # d: on no cycle
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("archcycle") == [
        "archcycle.a -> archcycle.b, back: archcycle.b -> archcycle.c -> archcycle.a",
        "archcycle.b -> archcycle.c, back: archcycle.c -> archcycle.a -> archcycle.b",
        "archcycle.c -> archcycle.a, back: archcycle.a -> archcycle.b -> archcycle.c",
    ]
