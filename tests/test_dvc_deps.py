"""dvc.yaml lists every socialmae file a stage runs: DVC re-runs a stage only when a listed
dependency changes, so a missing file means a stale result after a code change.

The files a stage runs are found statically from ``socialmae <command>``: the CLI command's
imports, then, transitively, each module's top-level imports plus the function-local imports
of the functions and classes actually used (and what they call within their module).
"""

from __future__ import annotations

import ast
import itertools
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "socialmae"


def _module_path(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


@dataclass
class _Module:
    """A parsed module: its top-level imports and, per top-level definition, the
    definition's own imports and the other top-level names it uses."""

    name: str
    path: Path
    top_imports: list[tuple[str, str | None]] = field(default_factory=list)
    local_imports: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)
    uses: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str) -> _Module:
        path = _module_path(name)
        assert path is not None, name
        module = cls(name, path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module.top_imports += _imports(node, package)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found: list[tuple[str, str | None]] = []
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        found += _imports(inner, package)
                module.local_imports[node.name] = found
                module.uses[node.name] = {
                    n.id for n in ast.walk(node) if isinstance(n, ast.Name)
                } | {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
        return module


def _imports(node: ast.Import | ast.ImportFrom, package: str) -> list[tuple[str, str | None]]:
    """``(module, name or None for the whole module)`` for each socialmae import."""
    if isinstance(node, ast.Import):
        found = [(alias.name, None) for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        found = []
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            found.append((submodule, None) if _module_path(submodule) else (base, alias.name))
    return [(m, n) for m, n in found if m.split(".")[0] == PACKAGE]


def stage_files(command: str) -> set[str]:
    """Repository-relative paths of the socialmae files ``socialmae <command>`` executes."""
    cli = _Module.parse(f"{PACKAGE}.cli")
    entry = _command_function(cli, command)
    modules: dict[str, _Module] = {}
    done: set[tuple[str, str | None]] = set()
    todo = [(f"{PACKAGE}.cli", entry)]
    while todo:
        key = todo.pop()
        if key in done:
            continue
        done.add(key)
        name, symbol = key
        parts = name.split(".")
        todo += [(".".join(parts[:i]), "") for i in range(1, len(parts))]  # packages' __init__
        module = modules.setdefault(name, _Module.parse(name))
        todo += module.top_imports
        if symbol == "":  # executed as a parent package: top level only
            continue
        symbols = set(module.local_imports) if symbol is None else _reachable(module, symbol)
        for used in symbols:
            todo += module.local_imports.get(used, [])
        if symbol is not None and symbol not in module.local_imports:
            todo += [(m, n) for m, n in module.top_imports if n == symbol]  # a re-export
            todo += _lazy_reexport(module, symbol)
    return {str(modules[n].path.relative_to(ROOT)) for n in modules}


def _reachable(module: _Module, symbol: str) -> set[str]:
    seen, todo = set(), [symbol]
    while todo:
        name = todo.pop()
        if name in seen or name not in module.local_imports:
            continue
        seen.add(name)
        todo += [u for u in module.uses[name] if u in module.local_imports]
    return seen


def _lazy_reexport(module: _Module, symbol: str) -> list[tuple[str, str | None]]:
    """A PEP 562 package: the module its ``_LAZY`` table names for ``symbol``."""
    for node in ast.walk(ast.parse(module.path.read_text())):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == symbol:
                    assert isinstance(value, ast.Constant), symbol
                    return [(str(value.value), symbol)]
    return []


def _command_function(cli: _Module, command: str) -> str:
    tree = ast.parse(cli.path.read_text())
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "command":
                named = decorator.args[0].value if decorator.args else node.name.replace("_", "-")
                if named == command:
                    return node.name
    raise AssertionError(f"no command {command!r} in socialmae/cli.py")


def _stages() -> list[tuple[str, str, list[str]]]:
    """``(stage name, socialmae command, deps)`` of every stage in dvc.yaml."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = []
    for name, stage in spec.items():
        body = stage.get("do", stage)
        argv = shlex.split(body["cmd"])
        assert argv[0] == PACKAGE, f"{name}: the stage does not run the socialmae command"
        found.append((name, argv[1], [str(d) for d in body.get("deps", [])]))
    return found


def missing_deps(command: str, deps: list[str]) -> list[str]:
    """The files ``socialmae <command>`` runs that no entry of ``deps`` covers."""
    covered = [d.rstrip("/") for d in deps]
    return sorted(
        path
        for path in stage_files(command)
        if not any(path == d or path.startswith(d + "/") for d in covered)
    )


def _related(path: str, entries: list[str]) -> bool:
    """``path`` is one of ``entries``, inside one, or holds one."""
    path = path.rstrip("/")
    return any(
        e == path or e.startswith(path + "/") or path.startswith(e + "/")
        for e in (e.rstrip("/") for e in entries)
    )


def _path_options(argv: list[str]) -> dict[str, str]:
    """``{option: value}`` of the ``--option value`` pairs of a stage command."""
    return {a[2:]: b for a, b in itertools.pairwise(argv) if a.startswith("--")}


@pytest.mark.parametrize("stage", [s[0] for s in _stages()])
def test_stage_commands_name_the_paths_dvc_tracks(stage):
    """dvc.yaml reads as the data flow: each stage command names its output directory
    (``--out``, holding the stage's outs) and its inputs (each one a dependency)."""
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    body = body.get("do", body)
    options = _path_options(shlex.split(body["cmd"]))
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in body.get("outs", [])]
    assert "out" in options and _related(options.pop("out"), outs), (stage, body["cmd"])
    deps = [str(d) for d in body.get("deps", [])]
    for option, value in options.items():
        if option != "params":
            assert _related(value, deps), f"{stage}: --{option} {value} is not a dependency"


@pytest.mark.parametrize(("stage", "command", "deps"), _stages(), ids=[s[0] for s in _stages()])
def test_stage_deps_list_every_file_the_stage_runs(stage, command, deps):
    missing = missing_deps(command, deps)
    assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but does not list them in deps"


def test_the_check_finds_what_a_stage_runs():
    """The analysis itself: the label order reaches finetune through the stage code, a
    dropped entry is reported, and the data stages do not run the training code."""
    finetune = stage_files("finetune")
    assert {"socialmae/tasks.py", "socialmae/train/finetune.py", "socialmae/cli.py"} <= finetune
    deps = {name: d for name, _, d in _stages()}["finetune"]
    assert missing_deps("finetune", [d for d in deps if d != "socialmae/tasks.py"]) == [
        "socialmae/tasks.py"
    ]
    assert "socialmae/registry/locks.py" in stage_files("register")
    download = stage_files("download")
    assert not any(p.startswith("socialmae/train/") for p in download)
    assert "socialmae/checkpoints.py" not in download


def _import_graph() -> dict[str, set[str]]:
    """Every socialmae module -> the socialmae modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= {module for module, _ in _imports(node, package)}
        graph[name] = found - {name}
    return graph


def test_no_import_cycles():
    """No module imports, even inside a function, a module that imports it back (the model
    owns save/load; the .pth conversion imports the model, never the reverse)."""
    graph = _import_graph()
    assert "socialmae.checkpoints" in graph["socialmae.train.finetune"]  # the graph is real
    state: dict[str, str] = {}  # visiting | done

    def visit(module: str, path: list[str]) -> None:
        state[module] = "visiting"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "visiting":
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
