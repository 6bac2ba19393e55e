"""The adversarial test matrix (issue #25): every entry point x every input fault that applies to it.

Each cell states its outcome: ``refused`` = exit 2 with one message naming the file (and the cell, gene or key
where one is at fault) and nothing written at the output path; ``ok`` = the run succeeds. Entry points run in
this process through their scripts' ``main`` (what ``python scripts/X.py ARGS`` runs), on tiny real-format inputs
built once per module: the official tiny checkpoint (tests/fixtures/official), real gene symbols, counts or
log-normalized values as each entry point expects.

The table in docs/reliability.md ("The adversarial matrix") is generated from ``ENTRY_POINTS`` and ``FAULTS``:
``python tests/test_adversarial_matrix.py --write-docs`` rewrites it, and
``test_docs_table_is_current`` fails when it is stale. Adding an entry point = one ``EntryPoint`` row.
"""

from __future__ import annotations

import json
import runpy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:  # run as a program (--write-docs)
    sys.path.insert(0, str(ROOT / "tests"))
from conftest import FIXTURES  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- adversarial-matrix:begin -->", "<!-- adversarial-matrix:end -->"
N_CELLS, N_GENES = 40, 60
BAD_CELL, BAD_GENE = 17, 11  # where a planted bad value sits (not the first cell, not the first gene)


# ---------------------------------------------------------------------------------------------------------------
# inputs


def vocab_genes(vocab_dir: Path = FIXTURES) -> list[str]:
    return [g for g in json.loads((vocab_dir / "vocab.json").read_text()) if not g.startswith("<")]


def base_adata(kind: str) -> ad.AnnData:
    """A valid input: ``N_CELLS`` cells x ``N_GENES`` genes of the tiny checkpoint's vocabulary, 2 groups.
    ``kind``: ``counts`` (Poisson integers) or ``log`` (log1p of counts normalized to 1e4 per cell)."""
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, (N_CELLS, N_GENES)).astype(np.float32)
    x[:, 0] += 1  # no empty cell
    if kind == "log":
        x = np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32)
    genes = vocab_genes()[:N_GENES]
    obs = pd.DataFrame(
        {"group": pd.Categorical(["a", "b"] * (N_CELLS // 2)), "condition": ["ctrl"] * N_CELLS},
        index=[f"cell-{i}" for i in range(N_CELLS)],
    )
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame({"gene_name": genes}, index=genes))


def _with_value(value: float) -> Callable[[ad.AnnData], ad.AnnData]:
    def plant(a: ad.AnnData) -> ad.AnnData:
        x = a.X.toarray()
        x[BAD_CELL, BAD_GENE] = value
        a.X = sp.csr_matrix(x)
        return a

    return plant


def _low_depth_counts(a: ad.AnnData) -> ad.AnnData:
    a.X = sp.csr_matrix(np.random.default_rng(1).poisson(1.0, a.shape).clip(0, 7).astype(np.float32))
    return a


def _duplicate_gene(a: ad.AnnData) -> ad.AnnData:
    names = list(a.var_names)
    names[BAD_GENE] = names[BAD_GENE - 1]
    a.var_names = names
    a.var["gene_name"] = names
    return a


def _drop_obs(a: ad.AnnData) -> ad.AnnData:
    a.obs = a.obs.drop(columns=["group", "condition"])
    return a


@dataclass(frozen=True)
class Fault:
    """One way an input can be wrong. ``make`` turns a valid AnnData into the faulty one (``None``: the fault is
    about the file, see ``write``); ``names`` says what the refusal must name besides the file."""

    name: str
    description: str
    make: Callable[[ad.AnnData], ad.AnnData] | None = None
    names: tuple[str, ...] = ()


FAULTS = {
    f.name: f
    for f in [
        Fault("missing_path", "the input path does not exist (a typo)"),
        Fault("not_hdf5", "a text file named .h5ad"),
        Fault("truncated", "an .h5ad cut to half its bytes (an interrupted copy)"),
        Fault("empty", "0 cells", lambda a: a[:0].copy()),
        Fault("zero_genes", "0 genes", lambda a: a[:, :0].copy()),
        Fault("nan", "a NaN value", _with_value(np.nan), (f"cell-{BAD_CELL}",)),
        Fault("inf", "an infinite value", _with_value(np.inf), (f"cell-{BAD_CELL}",)),
        Fault("negative", "a negative value", _with_value(-1.0), (f"cell-{BAD_CELL}",)),
        Fault("non_integer", "a fractional value where raw counts are required", _with_value(0.5)),
        Fault(
            "counts_for_log",
            "low-depth integer counts (max 7) where log-normalized values are required",
            _low_depth_counts,
        ),  # fmt: skip
        Fault(
            "duplicate_genes", "two columns with the same gene name", _duplicate_gene, (vocab_genes()[BAD_GENE - 1],)
        ),
        Fault("missing_column", "the obs column the run needs is absent", _drop_obs),
    ]
}


def write_fault(fault: Fault, kind: str, path: Path) -> Path:
    """The faulty input file for ``fault`` at ``path`` (``missing_path``: nothing is written)."""
    if fault.name == "missing_path":
        return path
    if fault.name == "not_hdf5":
        path.write_text("cell,gene,count\nc1,CD3E,4\n")
        return path
    a = base_adata(kind)
    if fault.make is not None:
        a = fault.make(a)
    a.write_h5ad(path)
    if fault.name == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


# ---------------------------------------------------------------------------------------------------------------
# entry points


@dataclass(frozen=True)
class EntryPoint:
    """An entry point run on one input file. ``argv(input, out, aux)`` builds its arguments; ``kind`` the values
    it reads; ``faults`` maps each fault that applies to ``refused`` / ``ok``; ``key`` the obs column or option
    that ``missing_column`` must name."""

    name: str
    script: str
    kind: str
    argv: Callable[[Path, Path, dict], list[str]]
    faults: dict[str, str]
    key: str | None = None
    out_is_dir: bool = False
    notes: dict[str, str] = field(default_factory=dict)


COMMON = {f: "refused" for f in ("missing_path", "not_hdf5", "truncated", "empty", "zero_genes", "nan", "inf")}

ENTRY_POINTS = [
    EntryPoint(
        "build_corpus",
        "build_corpus.py",
        "counts",
        lambda inp, out, aux: ["h5ad", str(inp), "--out", str(out)],
        {**COMMON, "negative": "refused", "non_integer": "refused", "duplicate_genes": "refused"},
        out_is_dir=True,
    ),
    EntryPoint(
        "embed",
        "embed.py",
        "counts",
        lambda inp, out, aux: [
            "--checkpoint",
            str(FIXTURES),
            "--input",
            str(inp),
            "--output",
            str(out),
            "--device",
            "cpu",
        ],  # fmt: skip
        {**COMMON, "negative": "refused", "duplicate_genes": "warned"},
    ),
    EntryPoint(
        "reference_map (query)",
        "reference_map.py",
        "counts",
        lambda inp, out, aux: [
            "--checkpoint",
            str(FIXTURES),
            "--reference",
            str(aux["reference"]),
            "--query",
            str(inp),
            "--label-key",
            "group",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ],  # fmt: skip
        {**COMMON, "negative": "refused", "duplicate_genes": "warned"},
    ),
    EntryPoint(
        "reference_map (reference)",
        "reference_map.py",
        "counts",
        lambda inp, out, aux: [
            "--checkpoint",
            str(FIXTURES),
            "--reference",
            str(inp),
            "--query",
            str(aux["reference"]),
            "--label-key",
            "group",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ],  # fmt: skip
        {**COMMON, "negative": "refused", "duplicate_genes": "warned", "missing_column": "refused"},
        key="group",
    ),
    EntryPoint(
        "gene_programs",
        "gene_programs.py",
        "log",
        lambda inp, out, aux: [
            "--checkpoint",
            str(FIXTURES),
            "--adata",
            str(inp),
            "--gmt",
            str(aux["gmt"]),
            "--out",
            str(out),
            "--label-key",
            "group",
        ],  # fmt: skip
        {**COMMON, "negative": "refused", "duplicate_genes": "warned", "missing_column": "refused"},
        key="group",
        out_is_dir=True,
    ),
    EntryPoint(
        "attention_grn",
        "attention_grn.py",
        "log",
        lambda inp, out, aux: [
            "--checkpoint",
            str(FIXTURES),
            "--adata",
            str(inp),
            "--tf-targets",
            str(aux["tf_targets"]),
            "--out",
            str(out),
            "--condition-key",
            "condition",
            "--setting",
            "control",
            "--n-random",
            "10",
            "--no-progress",
        ],  # fmt: skip
        {**COMMON, "negative": "refused", "duplicate_genes": "warned", "missing_column": "refused"},
        key="condition",
        out_is_dir=True,
    ),
]


@pytest.fixture(scope="module")
def aux(tmp_path_factory) -> dict:
    """Valid companion inputs: a labelled reference, a GMT, a TF-target table, all over the vocabulary's genes."""
    d = tmp_path_factory.mktemp("aux")
    genes = vocab_genes()[:N_GENES]
    reference = d / "reference.h5ad"
    base_adata("counts").write_h5ad(reference)
    gmt = d / "sets.gmt"
    gmt.write_text("".join(f"SET_{i}\tna\t" + "\t".join(genes[i * 6 : i * 6 + 6]) + "\n" for i in range(5)))
    tf_targets = d / "tf.tsv"
    edges = [(genes[0], genes[j]) for j in range(1, 8)] + [(genes[1], genes[j]) for j in range(8, 14)]
    pd.DataFrame(edges, columns=["source", "target"]).to_csv(tf_targets, sep="\t", index=False)
    return {"reference": reference, "gmt": gmt, "tf_targets": tf_targets}


_MAINS: dict[str, Callable] = {}


def script_main(script: str) -> Callable:
    if script not in _MAINS:
        _MAINS[script] = runpy.run_path(str(ROOT / "scripts" / script))["main" if script != "build_corpus.py" else
                                                                           "build_main"]  # fmt: skip
    return _MAINS[script]


def cells() -> list[tuple[EntryPoint, str, str]]:
    return [(e, f, outcome) for e in ENTRY_POINTS for f, outcome in e.faults.items()]


@pytest.mark.parametrize(
    "entry, fault_name, outcome", cells(), ids=[f"{e.name}-{f}".replace(" ", "_") for e, f, _ in cells()]
)
def test_matrix_cell(entry: EntryPoint, fault_name: str, outcome: str, aux, tmp_path, capsys, caplog):
    fault = FAULTS[fault_name]
    inp = write_fault(fault, entry.kind, tmp_path / f"input_{fault_name}.h5ad")
    out = tmp_path / ("out_dir" if entry.out_is_dir else "out.h5ad")
    try:
        code = script_main(entry.script)(entry.argv(inp, out, aux))
    except SystemExit as e:  # argparse and sys.exit inside main
        code = e.code
    err = capsys.readouterr().err + caplog.text
    if outcome in ("ok", "warned"):
        assert code == 0, err[-3000:]
        missing = [n for n in fault.names if n not in err] if outcome == "warned" else []
        assert not missing, f"{entry.name} on {fault.description}: no warning naming {missing}:\n{err[-3000:]}"
        return
    assert code == 2, f"{entry.name} on {fault.description}: exit {code}, expected 2\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    named = [inp.name] + list(fault.names) + ([entry.key] if fault_name == "missing_column" and entry.key else [])
    missing = [n for n in named if n not in err]
    assert not missing, f"{entry.name} on {fault.description}: the message does not name {missing}:\n{err[-3000:]}"
    half_written = out.exists() and (not entry.out_is_dir or any(out.iterdir()))
    assert not half_written, f"{entry.name} on {fault.description} left {out} behind"


# ---------------------------------------------------------------------------------------------------------------
# the table in docs/reliability.md


def render_table() -> str:
    faults = list(FAULTS)
    head = "| entry point | " + " | ".join(f"`{f}`" for f in faults) + " |"
    rows = [head, "|---|" + "---|" * len(faults)]
    for e in ENTRY_POINTS:
        marks = {"refused": "2", "ok": "ok", "warned": "w"}
        rows.append(f"| `{e.script}` {e.name} | " + " | ".join(marks.get(e.faults.get(f, ""), "n/a") for f in faults)
                    + " |")  # fmt: skip
    legend = "\n".join(f"- `{f.name}`: {f.description}" for f in FAULTS.values())
    return (
        f"{BEGIN}\n<!-- generated by `python tests/test_adversarial_matrix.py --write-docs`; do not edit -->\n\n"
        "`2` = refused: exit status 2, one message naming the file (and the cell, gene or obs key at fault), "
        "nothing written at the output path; `w` = runs, with a warning naming the gene; `ok` = runs; `n/a` = the "
        "fault does not apply. Each cell is one "
        "case of `tests/test_adversarial_matrix.py::test_matrix_cell`.\n\n"
        + "\n".join(rows)
        + "\n\n"
        + legend
        + f"\n{END}"
    )


def current_doc_table() -> str | None:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN) : text.index(END) + len(END)]


def write_docs() -> None:
    text, table = DOC.read_text(), render_table()
    old = current_doc_table()
    DOC.write_text(text.replace(old, table) if old else text.rstrip("\n") + "\n\n## The adversarial matrix\n\n"
                   + table + "\n")  # fmt: skip


def test_docs_table_is_current():
    assert current_doc_table() == render_table(), "run: python tests/test_adversarial_matrix.py --write-docs"


if __name__ == "__main__":
    if "--write-docs" in sys.argv:
        write_docs()
        print(f"wrote the matrix into {DOC}")
