"""Every entry point of the adversarial matrix and the outcome each fault must have there.

An entry point's ``run(input, out, ctx)`` runs it in this process the way a user runs it: a script through its
``main`` (what ``python scripts/X.py ARGS`` runs), ``train.py`` through ``scgpt_train.pipeline.run`` as
``tests/conftest.py::train_in_process`` does (through ``train.py``'s own ``__main__`` where the refusal comes before
Hydra starts), the Python API by calling it. It returns the exit status (2 for a ``UserInputError`` raised by
``train.py``'s pipeline or the API) and that error's message; anything else it raises fails the cell.
``ctx`` holds the companion inputs (``aux`` fixture) and ``fault``, the fault's name.

Outcomes: ``refused`` (exit 2 / a ``UserInputError``, one message naming the file or the API argument, and the
fault's ``names``; nothing written at the output path), ``warned`` (runs; a warning naming the fault's ``names``),
``ok`` (runs).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import FIXTURES, ROOT, train_in_process

from adversarial.faults import LABEL, vocab_genes
from scgpt_train.errors import UserInputError


@dataclass(frozen=True)
class EntryPoint:
    """``name``: the row; ``kind``: the values it reads (``counts`` / ``log``); ``faults``: fault -> outcome;
    ``key``: what ``missing_column`` must name; ``argument``: for the API, the argument a message must name (instead
    of the file; never the API's temporary file; ``a|b``: either)."""

    name: str
    kind: str
    run: Callable[[Any, Path, dict], tuple[int, str]]
    faults: dict[str, str]
    key: str | None = None
    out_is_dir: bool = False
    argument: str | None = None


R, W, OK = "refused", "warned", "ok"
# ids_symbols_disagree is "ok" where no vocabulary keyed by symbols is given (build_corpus without --vocab, fine-tuning
# from scratch): the Ensembl ids are the keys and the symbol column is never read, so nothing is wrong. Against a
# checkpoint's symbols (embed, reference mapping) the ids decide through the id table and the disagreement is warned.
COMMON = dict.fromkeys(("missing_path", "not_hdf5", "truncated", "empty", "zero_genes", "nan", "inf", "negative"), R)
OUTPUTS = {"disk_full": R, "out_unwritable": R}
# A full disk while HDF5 writes leaves HDF5 unusable in that process (it may crash at any later close), so those cells
# run in a fresh interpreter: embed.py's checks the one h5ad writer (scgpt_train.evaluation.report.write_h5ad ->
# data_modules.atomic.atomic_path), which reference_map.py, predict_perturbation.py, gene_programs.py and api.finetune
# write through too; build_corpus.py's checks the shard writer api.build_corpus uses (each more such cell would cost an
# interpreter start).
SHARED = "shared"  # not run in this row: the same writer's cell in another row checks it (see OUTPUTS)
UNWRITABLE = {"disk_full": SHARED, "out_unwritable": R}

_MAINS: dict[str, Callable] = {}


def _main(script: str) -> Callable:
    if script not in _MAINS:
        name = "build_main" if script == "build_corpus.py" else "main"
        _MAINS[script] = runpy.run_path(str(ROOT / "scripts" / script))[name]
    return _MAINS[script]


def script(
    name: str, argv: Callable[[Path, Path, dict], list], fresh: tuple[str, ...] = ()
) -> Callable[[Any, Path, dict], tuple[int, str]]:
    """``main`` of ``scripts/NAME`` in this process; for the faults in ``fresh``, ``python scripts/NAME`` in a fresh
    interpreter (a full disk while HDF5 writes leaves HDF5 unusable in that process: the exit status is checked
    as a user gets it)."""

    def run(inp, out, ctx) -> tuple[int, str]:
        if ctx["fault"] in fresh:
            command = [sys.executable, str(ROOT / "scripts" / name), *map(str, argv(inp, out, ctx))]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
            return done.returncode, done.stderr
        try:
            return _main(name)([str(a) for a in argv(inp, out, ctx)]), ""
        except SystemExit as e:  # argparse and sys.exit inside main
            return e.code, ""

    return run


def _reference_map_argv(reference, query, out) -> list:
    """``scripts/reference_map.py``'s arguments: the fault goes into the query or the reference, the other is clean."""
    return [
        *("--checkpoint", FIXTURES, "--reference", reference, "--query", query, "--label-key", LABEL),
        *("--out", out, "--device", "cpu", "--no-progress"),
    ]


def refusal(call: Callable[[], Any]) -> tuple[int, str]:
    """(0, "") when ``call`` returns, (2, message) when it raises a ``UserInputError`` (what train.py prints
    before exiting 2, what the API raises); anything else propagates."""
    from scgpt_train.errors import find_user_input_error

    try:
        call()
    except Exception as e:
        if (found := find_user_input_error(e)) is None:
            raise
        return 2, str(found)
    return 0, ""


def _train_main(argv: list[str]) -> tuple[int, str]:
    """``python train.py ARGV`` in this process, for refusals that come before Hydra starts. ``exit_with`` must raise
    ``SystemExit`` here, never end the process, even after an earlier test's HDF5 write hit a full disk."""
    from data_modules import atomic

    saved, hdf5_failed = sys.argv, atomic._HDF5_FAILED_WRITE
    sys.argv, atomic._HDF5_FAILED_WRITE = ["train.py", *argv], False
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as e:
        return e.code, ""
    finally:
        sys.argv, atomic._HDF5_FAILED_WRITE = saved, hdf5_failed
    return 0, ""


# the tiniest runs: one training step, no baselines, no figures
FINETUNE = ["trainer.max_epochs=1", "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1",
            "data.num_workers=0", "callbacks.progress_bar=null", "task.umap=false", "layout.max_seq_len=33",
            "validate_before_fit=false", "task.baselines=[]", "logger=csv", "data.batch_size=8"]  # fmt: skip
PRETRAIN = ["data=corpus", "model=demo_tiny", "trainer.max_steps=1", "trainer.val_check_interval=1",
            "data.num_workers=0", "data.batch_size=8", "data.val_batch_size=8", "layout.max_seq_len=33",
            "validate_before_fit=false", "callbacks.progress_bar=null",
            "callbacks.periodic_checkpoint=null"]  # fmt: skip


def finetune_run(inp, out, ctx) -> tuple[int, str]:
    over = ["experiment=finetune_annotation_demo", f"data.label_key={LABEL}", "data.query_fraction=0.3", *FINETUNE]
    over += [f"data.path={inp}"] + ([f"data.query_path={inp}"] if ctx["fault"] == "duplicate_files" else [])
    if ctx["fault"] == "out_unwritable":
        return _train_main([f"hydra.run.dir={out}", *over])
    return refusal(lambda: train_in_process(over, out))


def pretrain_run(corpus, out, ctx) -> tuple[int, str]:
    return refusal(lambda: train_in_process([*PRETRAIN, f"data.corpus_dir={corpus}"], out))


def _api(function: str, call: Callable[..., Any]) -> Callable[[Any, Path, dict], tuple[int, str]]:
    def run(x, out, ctx) -> tuple[int, str]:
        from scgpt_train import api

        return refusal(lambda: call(getattr(api, function), x, out, ctx))

    return run


SCRIPT_ROWS = [
    EntryPoint(
        "`build_corpus.py`",
        "counts",
        script(
            "build_corpus.py",
            lambda inp, out, ctx: ["h5ad", inp, *([inp] if ctx["fault"] == "duplicate_files" else []), "--out", out],
            fresh=("disk_full",),
        ),  # fmt: skip
        {
            **COMMON,
            "non_integer": R,
            "duplicate_genes": R,
            "duplicate_cells": W,
            "duplicate_files": R,
            "ids_symbols_disagree": OK,
            **OUTPUTS,
        },  # fmt: skip
        out_is_dir=True,
    ),
    EntryPoint(
        "`embed.py`",
        "counts",
        script(
            "embed.py",
            lambda inp, out, ctx: ["--checkpoint", FIXTURES, "--input", inp, "--output", out, "--device", "cpu"],
            fresh=("disk_full",),
        ),  # fmt: skip
        {**COMMON, "duplicate_genes": W, "duplicate_cells": OK, "ids_symbols_disagree": W, **OUTPUTS},
    ),
    EntryPoint(
        "`reference_map.py` (query)",
        "counts",
        script(
            "reference_map.py",
            lambda inp, out, ctx: _reference_map_argv(ctx["reference"], inp, out),
        ),  # fmt: skip
        {**COMMON, "duplicate_genes": W, "duplicate_cells": OK, "ids_symbols_disagree": W, **UNWRITABLE},
    ),
    EntryPoint(
        "`reference_map.py` (reference)",
        "counts",
        script(
            "reference_map.py",
            lambda inp, out, ctx: _reference_map_argv(inp, ctx["reference"], out),
        ),  # fmt: skip
        {**COMMON, "duplicate_genes": W, "duplicate_cells": OK, "ids_symbols_disagree": W, "missing_column": R},
        key=LABEL,
    ),
    EntryPoint(
        "`gene_programs.py`",
        "log",
        script(
            "gene_programs.py",
            lambda inp, out, ctx: [
                "--checkpoint",
                FIXTURES,
                "--adata",
                inp,
                "--gmt",
                ctx["gmt"],
                "--out",
                out,
                "--label-key",
                LABEL,
            ],
        ),
        {**COMMON, "duplicate_genes": W, "missing_column": R, **UNWRITABLE},
        key=LABEL,
        out_is_dir=True,
    ),
    EntryPoint(
        "`attention_grn.py`",
        "log",
        script(
            "attention_grn.py",
            lambda inp, out, ctx: [
                "--checkpoint",
                FIXTURES,
                "--adata",
                inp,
                "--tf-targets",
                ctx["tf_targets"],
                "--out",
                out,
                "--condition-key",
                "condition",
                "--setting",
                "control",
                "--n-random",
                "10",
                "--no-progress",
            ],
        ),
        {**COMMON, "duplicate_genes": W, "missing_column": R, **OUTPUTS},
        key="condition",
        out_is_dir=True,
    ),
    EntryPoint(
        "`predict_perturbation.py`",
        "log",
        script(
            "predict_perturbation.py",
            lambda inp, out, ctx: [
                "--checkpoint",
                FIXTURES / "perturbation",
                "--controls",
                inp,
                "--conditions",
                f"{vocab_genes()[0]}+ctrl",
                "--out",
                out,
                "--device",
                "cpu",
            ],
        ),  # fmt: skip
        {**COMMON, "counts_for_log": R, "duplicate_genes": R, **UNWRITABLE},
    ),
    EntryPoint(
        "`train.py` fine-tuning (`data.path`)",
        "counts",
        finetune_run,
        {
            **COMMON,
            "non_integer": R,
            "duplicate_genes": W,
            "duplicate_files": R,
            "ids_symbols_disagree": OK,
            "missing_column": R,
            "nan_labels": R,
            "single_class": R,
            **OUTPUTS,
        },  # fmt: skip
        key=LABEL,
        out_is_dir=True,
    ),
]

_REF = dict(device="cpu", baselines=[])
API_DATA = dict.fromkeys(("empty", "zero_genes", "nan", "inf", "negative", "wrong_type"), R)
API_ROWS = [
    EntryPoint(
        "`api.embed(adata)`",
        "counts",
        _api("embed", lambda f, x, out, ctx: f(x, FIXTURES, device="cpu")),
        {**API_DATA, "duplicate_genes": W, "ids_symbols_disagree": W},
        argument="adata",
    ),
    EntryPoint(
        "`api.reference_map(query)`",
        "counts",
        _api("reference_map", lambda f, x, out, ctx: f(x, ctx["reference_adata"], FIXTURES, LABEL, **_REF)),
        {**API_DATA, "duplicate_genes": W, "ids_symbols_disagree": W},
        argument="query",
    ),
    EntryPoint(
        "`api.reference_map(reference)`",
        "counts",
        _api("reference_map", lambda f, x, out, ctx: f(ctx["reference_adata"], x, FIXTURES, LABEL, **_REF)),
        {**API_DATA, "missing_path": R, "not_hdf5": R, "truncated": R, "duplicate_genes": W, "missing_column": R},
        key=LABEL,
        argument="reference",
    ),
    EntryPoint(
        "`api.finetune(adata)`",
        "counts",
        _api(
            "finetune",
            lambda f, x, out, ctx: f(
                x, label_key=LABEL, query_fraction=0.3, output_dir=out, baselines=[], overrides=FINETUNE
            ),
        ),  # fmt: skip
        {**API_DATA, "non_integer": R, "missing_column": R, "nan_labels": R, "single_class": R, **UNWRITABLE},
        key=LABEL,
        out_is_dir=True,
        argument="adata",
    ),
    EntryPoint(
        "`api.build_corpus(inputs)`",
        "counts",
        _api("build_corpus", lambda f, x, out, ctx: f([x, x] if ctx["fault"] == "duplicate_files" else [x], out)),
        {
            **API_DATA,
            "missing_path": R,
            "not_hdf5": R,
            "truncated": R,
            "non_integer": R,
            "duplicate_genes": R,
            "duplicate_files": R,
            "disk_full": SHARED,
            "out_unwritable": R,
        },  # fmt: skip
        out_is_dir=True,
        argument="adata_0|inputs[0]",
    ),
]

ENTRY_POINTS = SCRIPT_ROWS + API_ROWS

PRETRAIN_ROW = EntryPoint(
    "`train.py` pretraining (`data.corpus_dir`)",
    "counts",
    pretrain_run,
    dict.fromkeys(("missing_path", "not_a_corpus", "corrupt_shard", "edited_vocab"), R),
    out_is_dir=True,
)


def as_input(fault: str, path: Path, entry: EntryPoint):
    """What the entry point is given: the file, or for the API the AnnData read from it (a list for ``wrong_type``;
    the path itself for faults about the file, or ``duplicate_files``)."""
    if entry.argument is None or fault in ("missing_path", "not_hdf5", "truncated", "duplicate_files"):
        return path
    if fault == "wrong_type":
        return [1, 2]
    import anndata as ad

    return ad.read_h5ad(path)


__all__ = ["ENTRY_POINTS", "PRETRAIN_ROW", "EntryPoint", "UserInputError", "as_input"]
