"""The commands written in README.md, docs/*.md and the config comments, and the workspace they run in, for
tests/test_docs_commands.py (issue #17 item 7).

The commands are collected from the files themselves, so a new documented command is tested without editing
this file. They run in order, in one interpreter separate from pytest's (``tests/helpers/run_commands.py``)
that starts at the session's first test and runs beside the other tests (``CommandsJob``), in one workspace
directory laid out as a user's would be
(``data/a.h5ad``, ``ref.h5ad``, ``path/to/scGPT_human/``, ... made from the official fixture's genes), with
``python`` / ``.venv/bin/python`` being this interpreter. Only the cost is cut:

- ``train.py`` runs are shortened (``trainer.max_steps`` scaled down 50x, at least 2; one epoch; two
  validation batches) and keep every override the document wrote;
- what needs a cluster, a GPU job or the paper's downloaded data (``srun``, the SLURM launcher,
  ``experiment=pretrain_33m``, a paper experiment without ``data.path=``) is composed with ``--cfg job``,
  which checks every override and config group it names;
- multi-seed ``benchmark.py`` runs and DDP runs are composed with ``--cfg job`` too (``tests/test_tasks.py``,
  ``tests/test_perturbation_task.py`` and ``tests/test_distributed.py`` run them for real);
- ``download_benchmarks.py`` fetches from a local mirror (``--mirror``) holding the official tiny checkpoint
  as ``scgpt_human``; the Census converter, which needs the internet, and commands with ``<placeholders>``
  run with ``--help``; ``make`` targets are CI's own commands and are not rerun here;
- ``bench_embed.py`` runs with ``--quick`` (a tiny model on 48 cells) and a 2,000-cell synthetic reference;
- ``[optional arguments]`` are left out, and illustrative names (``CKPT``, ``DIR``, ``immune_human.h5ad``,
  ``atlas/*.h5ad``, ``genes.txt``, ``sets.gmt``) are files of the workspace made for them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from helpers.mirror import write_10x_arc_h5, write_gzipped_h5ad

from data_modules.species import ortholog_map

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "official"

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAPER_EXPERIMENTS = re.compile(
    r"experiment=finetune_\w+_(ms|myeloid|hpancreas|covid19|pbmc10k|perirhinal|adamson|norman|replogle\w*|bmmc|pbmc_multiome|asap_mosaic)\b"
)
CLUSTER = re.compile(r"^srun |hydra/launcher=slurm|experiment=pretrain_33m")
PYTHON = re.compile(r"^(?:srun\s+)?(?:\.venv/bin/)?python(?:3(?:\.11)?)?\s")


def _join_continuations(lines: list[str]) -> list[str]:
    out, buf = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    return out


def _strip_comment(cmd: str) -> str:
    return re.sub(r"\s+#.*$", "", cmd).strip()


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every shell command in the docs' code blocks and in config comments."""
    found = []
    for path in DOC_FILES:
        in_block, block = False, []
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("```"):
                if in_block:
                    for cmd in _join_continuations(block):
                        cmd = _strip_comment(cmd.strip())
                        if PYTHON.match(cmd) or cmd.startswith(("make ", "srun ")):
                            found.append((path.relative_to(ROOT).as_posix(), cmd))
                in_block, block = not in_block, []
            elif in_block:
                block.append(line)
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        comments = [
            line.lstrip()[1:].strip() for line in path.read_text().splitlines() if line.lstrip().startswith("#")
        ]
        for cmd in _join_continuations(comments):
            cmd = _strip_comment(cmd)
            if PYTHON.match(cmd):
                found.append((path.relative_to(ROOT).as_posix(), cmd))
    return found


# paths the docs write for the user's own files, as this workspace has them
SUBSTITUTE = {"/ckpt/scGPT_human": "path/to/scGPT_human"}
# illustrative names (whole arguments, or the value of key=value) and the workspace's files that play them
PLACEHOLDERS = {"CKPT": "scgpt_human.pt", "DIR": "out_dir", "OUT.h5ad": "out.h5ad"}
SAFE = re.compile(r"^[\w./*=,:+~@%-]+$")  # left unquoted, so bash expands a glob such as data/*.h5ad


def _join(tokens: list[str]) -> str:
    return " ".join(t if SAFE.match(t) else shlex.quote(t) for t in tokens)


def _first_sweep_value(token: str) -> str:
    key, eq, value = token.partition("=")
    return f"{key}={value.split(',')[0]}" if eq and "," in value and "[" not in value else token


def _placeholder(token: str) -> str:
    key, eq, value = token.rpartition("=")
    return f"{key}{eq}{PLACEHOLDERS.get(value, value)}"


def runnable(cmd: str) -> str | None:
    """The command as this test runs it (see the module docstring), or None for ``make`` targets."""
    if cmd.startswith("make "):
        return None
    cmd = re.sub(r"\s\[[^\]]*\]", "", cmd)  # [optional arguments] are left out
    placeholder = bool(re.search(r"\strain\.py\s.*<[^>]*>", cmd))  # train.py key=<what to put here>
    if placeholder:
        cmd = re.sub(r"<[^>]*>", "placeholder", cmd)
    tokens = shlex.split(cmd)
    tokens = [t.replace("experiment=...", "experiment=finetune_annotation_demo") for t in tokens]
    for old, new in SUBSTITUTE.items():
        tokens = [t.replace(old, new) for t in tokens]
    tokens = [_placeholder(t) for t in tokens]
    if tokens[0] == "srun":
        tokens = tokens[1:]
    tokens[0] = "python"
    script = tokens[1]
    if any("<" in t and ">" in t for t in tokens) or (script.endswith("build_corpus.py") and "census" in tokens):
        return _join(["python", script, *(["census"] if "census" in tokens else []), "--help"])
    if script.endswith("download_benchmarks.py"):
        return _join([*tokens, "--mirror", "mirror", "--quiet"])
    if script == "train.py":
        # DDP ranks are real processes: tests/test_distributed.py runs them; here the command is composed
        composed = CLUSTER.search(cmd) or "trainer=ddp" in cmd or placeholder
        if composed or (PAPER_EXPERIMENTS.search(cmd) and "data.path=" not in cmd):
            if "--multirun" in tokens:  # --cfg job composes one job: the first value of every sweep
                tokens = [_first_sweep_value(t) for t in tokens if t != "--multirun"]
            return _join(tokens if "--cfg" in tokens else [*tokens, "--cfg", "job"])
        steps = 2
        for i, t in enumerate(tokens):
            if t.startswith("trainer.max_steps="):
                steps = max(2, int(t.split("=", 1)[1]) // 50)
                tokens[i] = f"trainer.max_steps={steps}"
        extra = [f"++trainer.max_steps={steps}", "++trainer.max_epochs=1", "++trainer.val_check_interval=1"]
        extra += ["++trainer.limit_train_batches=4", "++trainer.limit_val_batches=2", "callbacks.progress_bar=null"]
        if "experiment=finetune_" in cmd:
            extra += ["++task.umap=false"]
        return _join([*tokens, *extra])
    if script.endswith("benchmark.py"):  # multi-seed benchmarks: tests/test_tasks.py and others run them
        return _join([*tokens, "--cfg", "job"])
    if script.endswith("bench_embed.py"):  # --quick embedding (a tiny model, 48 cells) and a small reference
        sizes = {"--n-ref": "2000", "--n-query": "200"}
        tokens = [sizes.get(tokens[i - 1], t) if i else t for i, t in enumerate(tokens)]
        tokens += [a for key, value in sizes.items() if key not in tokens for a in (key, value)]
        tokens += [] if "--quick" in tokens else ["--quick"]
    return _join(tokens)


# ---------------------------------------------------------------------------------------------------------
# the workspace


def _h5ad(path: Path, genes: list[str], counts: bool, seed: int, n: int = 60, label_key: str = "cell_type") -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    labels = np.repeat(["T", "B", "NK"], n // 3)
    scale = 1.0 + 3.0 * (np.arange(len(genes))[None, :] % 3 == np.searchsorted(["B", "NK", "T"], labels)[:, None])
    x = rng.poisson(rng.gamma(0.8, 2.0, (n, len(genes))) * scale).astype(np.float32)
    if not counts:
        x = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    obs = pd.DataFrame(
        {label_key: labels, "batch": np.tile(["a", "b"], n // 2)}, index=[f"{path.stem}-{i}" for i in range(n)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame({"gene_name": genes}, index=genes)).write_h5ad(path)


def build_workspace(ws: Path, demo_corpus: Path) -> dict[str, str]:
    """Lay out ``ws`` as a user's directory (see the module docstring); returns the commands' environment."""
    for name in ("train.py", "configs", "scripts"):
        (ws / name).symlink_to(ROOT / name)
    bin_dir, venv_bin = ws / ".bin", ws / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    bin_dir.mkdir()
    for path in (bin_dir / "python", bin_dir / "python3", bin_dir / "python3.11", venv_bin / "python"):
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a wrapper keeps the venv (a link would not)
        path.chmod(0o755)
    genes = [g for g in json.loads((FIXTURES / "vocab.json").read_text()) if not g.startswith("<")]
    for i, name in enumerate(("data/a.h5ad", "data/b.h5ad", "cells.h5ad")):
        _h5ad(ws / name, genes, counts=True, seed=i)
    for i, name in enumerate(("ref.h5ad", "query.h5ad", "in.h5ad")):
        _h5ad(ws / name, genes, counts=False, seed=10 + i)
    _h5ad(ws / "immune_human.h5ad", genes, counts=False, seed=13, label_key="final_annotation")  # the GRN dataset
    orthologs = ortholog_map("human", "mouse").one_to_one  # mouse.h5ad: the fixture's genes as mouse symbols
    _h5ad(ws / "mouse.h5ad", [orthologs.get(g, g.capitalize()) for g in genes], counts=True, seed=14)
    for i, name in enumerate(("atlas/a.h5ad", "atlas/b.h5ad")):
        _h5ad(ws / name, genes, counts=True, seed=20 + i)
    (ws / "genes.txt").write_text("\n".join(genes[:40]) + "\n")
    (ws / "sets.gmt").write_text(
        "".join(f"SET_{i}\tdemo\t" + "\t".join(genes[i * 8 : i * 8 + 12]) + "\n" for i in range(6))
    )
    subdirs = lambda d, names: [n for n in names if (Path(d) / n).is_dir()]  # noqa: E731
    shutil.copytree(FIXTURES, ws / "path" / "to" / "scGPT_human", ignore=subdirs)
    mirror = ws / "mirror"
    from scgpt_train.resources.download import REGISTRY

    for entry in REGISTRY.values():  # the official tiny checkpoint as scgpt_human, stand-in bytes for the rest
        for file in entry.files:
            target = mirror / entry.name / file
            target.parent.mkdir(parents=True, exist_ok=True)
            if entry.name == "scgpt_human":
                shutil.copyfile(FIXTURES / file, target)
            elif entry.notes.get("gunzip"):
                write_gzipped_h5ad(target)
            elif entry.notes.get("convert_10x_h5"):
                write_10x_arc_h5(target)
            elif file.endswith(".zip"):
                with zipfile.ZipFile(target, "w") as zf:
                    zf.writestr(f"{entry.name}/{entry.notes['extract']}", f"{entry.name}\n")
            else:
                target.write_text(f"{entry.name}/{file}\n")
    cache = ws / ".cache"
    cache.mkdir()
    (cache / "demo_corpus").symlink_to(demo_corpus)
    for name in ("wheels", "sdists", "resources"):  # what `make setup` fetched from PyPI: not downloaded again
        (cache / name).mkdir()
        for archive in (ROOT / ".cache" / name).glob("*"):
            (cache / name / archive.name).symlink_to(archive)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SCGPT_CACHE": str(cache),
        "CORPUS": str(demo_corpus),
        "WANDB_MODE": "offline",
        "PYTHONPATH": str(ROOT),
        "PROJECT_ROOT": str(ws),  # run dirs (outputs/...) land in the workspace, not in the repository
        "HYDRA_FULL_ERROR": "1",
        # one thread: the commands run beside the rest of the suite (see CommandsJob)
        "OMP_NUM_THREADS": "1",
    }
    return env


def runs_to_check() -> tuple[list[str], dict[str, str]]:
    """The commands as they run (``runnable``), each once, in document order, and where each was written."""
    runs, where_of = [], {}
    for where, cmd in documented_commands():
        run = runnable(cmd)
        if run is None or run in where_of:  # make targets; a command documented twice runs once
            continue
        where_of[run] = f"{where}: {cmd}"
        runs.append(run)
    return runs, where_of


class CommandsJob:
    """The commands running in order in one separate interpreter (tests/helpers/run_commands.py) in workspace
    ``ws``. conftest starts it at the session's first test, so its ~2 minutes run beside the other tests on the
    second core (its commands use one thread); the test waits for it. It shares nothing writable with them: its
    run dirs, caches and outputs are under ``ws``, it reads the session's demo corpus, and it starts no
    distributed job (no port)."""

    def __init__(self, ws: Path, demo_corpus: Path):
        self.ws = ws
        env = build_workspace(ws, demo_corpus)
        self.runs, self.where_of = runs_to_check()
        (ws / "commands.json").write_text(json.dumps(self.runs))
        self.log = open(ws / "runner.log", "w+")  # closed by stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "helpers" / "run_commands.py"), "commands.json", "results.json"],
            cwd=ws,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait(self, timeout: float = 1500) -> tuple[int, str, list[dict]]:
        """(the runner's exit status, what it printed, the per-command results)."""
        code = self.proc.wait(timeout=timeout)
        self.log.seek(0)
        output = self.log.read()
        path = self.ws / "results.json"
        return code, output, json.loads(path.read_text()) if path.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
