"""The public entry points document every parameter in a numpydoc ``Parameters`` section (read with ``ast``).

Covered: each script's entry function (the function its ``if __name__ == "__main__":`` block calls, defined in the
script or imported by it; the ``bench_*`` measurement scripts aside), the public functions of ``scgpt_train.api``,
``ScGPT``, ``ScGPTConfig``, ``TokenLayout`` and every data module class (``*DataModule``) of ``data_modules``. A
dataclass documents its fields, a class its ``__init__``'s parameters (in the class docstring or ``__init__``'s).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("bench_"))
PACKAGES = ("scgpt_train.", "data_modules.")
CLASSES = [
    ("scgpt_train/model/scgpt.py", "ScGPT"),
    ("scgpt_train/model/config.py", "ScGPTConfig"),
    ("data_modules/tokenize/layout.py", "TokenLayout"),
]


def documented(doc: str | None) -> set[str] | None:
    """The names of a docstring's numpydoc ``Parameters`` entries (``a, b : type`` names both; ``*args`` is
    ``args``), or None when it has no such section."""
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = next(i for i in range(len(lines) - 1) if lines[i] == "Parameters" and set(lines[i + 1]) == {"-"})
    except StopIteration:
        return None
    names = set()
    for i in range(start + 2, len(lines)):
        line = lines[i]
        if i + 1 < len(lines) and line and set(lines[i + 1]) == {"-"}:  # the next section
            break
        if line and not line[0].isspace():
            names |= {n.strip().lstrip("*") for n in line.split(" : ")[0].split(",")}
    return names


def parameters(func: ast.FunctionDef) -> list[str]:
    a = func.args
    names = [x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return [n for n in names if n not in ("self", "cls")]


def missing(doc: str | None, names: list[str]) -> list[str] | str:
    found = documented(doc)
    if not names:
        return []
    return "no Parameters section" if found is None else [n for n in names if n not in found]


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _function(tree: ast.Module, name: str) -> ast.FunctionDef | None:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def entry_function(script: Path) -> tuple[Path, ast.FunctionDef]:
    """The function the script's ``__main__`` block calls: its own, or one imported from the project."""
    tree = _tree(script)
    main = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    called = [n.func.id for n in ast.walk(main) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    project = [n for n in tree.body if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(PACKAGES)]
    imported = {alias.asname or alias.name: node.module for node in project for alias in node.names}
    for name in reversed(called):  # exit_with(build_main()): the innermost call is walked last
        if (func := _function(tree, name)) is not None:
            return script, func
        if name in imported:
            path = ROOT / (imported[name].replace(".", "/") + ".py")
            return path, _function(_tree(path), name)
    raise AssertionError(f"{script.name}: no entry function called in its __main__ block")


def test_the_parameters_reader_sees_a_missing_name_and_a_missing_section():
    doc = """Summary.

    Parameters
    ----------
    a, b : int
        Two.
    *args
        More.

    Returns
    -------
    c
        Not a parameter.
    """
    assert documented(doc) == {"a", "b", "args"}
    assert missing(doc, ["a", "b", "args", "c"]) == ["c"]
    assert missing("Summary only.", ["a"]) == "no Parameters section"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_each_script_entry_function_documents_its_parameters(script):
    path, func = entry_function(script)
    assert missing(ast.get_docstring(func), parameters(func)) == [], f"{path.relative_to(ROOT)}: {func.name}"


def test_the_entry_functions_found_are_the_scripts_mains():
    found = {p.name: (path.relative_to(ROOT).as_posix(), f.name) for p in SCRIPTS for path, f in [entry_function(p)]}
    assert found["embed.py"] == ("scripts/embed.py", "main")
    assert found["benchmark.py"] == ("scripts/benchmark.py", "main")
    assert found["build_corpus.py"] == ("data_modules/store/cli.py", "build_main")
    classes = {name for _, name in data_module_classes()}
    assert {"CorpusDataModule", "AnnDataModule", "PerturbationDataModule", "MultiomicDataModule"} <= classes


def api_functions() -> list[ast.FunctionDef]:
    tree = _tree(ROOT / "scgpt_train" / "api.py")
    return [n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]


@pytest.mark.parametrize("func", api_functions(), ids=lambda f: f.name)
def test_each_api_function_documents_its_parameters(func):
    assert missing(ast.get_docstring(func), parameters(func)) == [], f"scgpt_train.api.{func.name}"


def data_module_classes() -> list[tuple[str, str]]:
    out = []
    for path in sorted((ROOT / "data_modules").rglob("*.py")):
        for node in _tree(path).body:
            if isinstance(node, ast.ClassDef) and re.search(r"DataModule$", node.name):
                out.append((path.relative_to(ROOT).as_posix(), node.name))
    return out


@pytest.mark.parametrize("where", CLASSES + data_module_classes(), ids=lambda w: w[1])
def test_each_public_class_documents_its_parameters(where):
    path, name = where
    cls = next(n for n in _tree(ROOT / path).body if isinstance(n, ast.ClassDef) and n.name == name)
    if any("dataclass" in ast.unparse(d) for d in cls.decorator_list):
        names = [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
        docs = [ast.get_docstring(cls)]
    else:
        init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        names = parameters(init) if init else []
        docs = [ast.get_docstring(cls), init and ast.get_docstring(init)]
    gaps = [missing(doc, names) for doc in docs]
    assert [] in gaps, f"{path}: {name}: {gaps[0]}"
