"""The import graph of scgpt_train and data_modules (read with ``ast``, every import including function-local
ones): no file-level cycle, no task package importing another, no benchmark runner importing another runner.

A package's ``__init__`` re-exporting its own modules (its face) is not an edge; ``import a.b.c`` is an edge to
the file of ``a.b.c`` only (the parents' faces run too, but re-export what sits below them)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("scgpt_train", "data_modules")
SHARED_TASK_MODULES = {"base"}  # scgpt_train/tasks/base.py: the fine-tune base every task shares


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Modules of ``modules`` that the file imports (``from a import b`` -> ``a.b`` when that is a module)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:  # `import a.b.c.func`-like: the longest module prefix
                t = t.rpartition(".")[0]
            if t and t != name and not (is_pkg and t.startswith(name + ".")):  # a face re-exporting its own modules
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_files():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _task_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["scgpt_train", "tasks"] and len(parts) > 2 else None


def test_no_task_imports_another_task_or_a_benchmark():
    bad = []
    for module, deps in _graph().items():
        task = _task_of(module)
        if task is None or task in SHARED_TASK_MODULES:
            continue
        for dep in deps:
            other = _task_of(dep)
            if (other is not None and other != task and other not in SHARED_TASK_MODULES) or dep in (
                "scgpt_train.tasks",
            ):
                bad.append(f"{module} -> {dep}")
            if dep.startswith("scgpt_train.benchmarks"):
                bad.append(f"{module} -> {dep}")
    assert bad == []


def test_benchmark_runners_import_only_the_harness():
    bad = [
        f"{module} -> {dep}"
        for module, deps in _graph().items()
        if module.startswith("scgpt_train.benchmarks.")
        for dep in deps
        if dep.startswith("scgpt_train.benchmarks") and dep != "scgpt_train.benchmarks.harness"
    ]
    assert bad == []
    harness = _graph()["scgpt_train.benchmarks.harness"]
    assert not {d for d in harness if d.startswith("scgpt_train.benchmarks")}
