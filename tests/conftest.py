"""Shared test setup: offline wandb, single-threaded inductor, a session-wide demo corpus, one demo training
run that every test reading a finished run shares, and ways to run train.py (fresh interpreter or in-process)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
# The official-format fixtures (tiny checkpoints, inputs and the official code's outputs; tests/fixtures/official/
# README.md says what each file is and how it was made). The one place tests find them.
FIXTURES = ROOT / "tests" / "fixtures" / "official"

# The shared demo run (``demo_run``): 32 steps, validation before fit and at steps 15 and 30, periodic
# checkpoints at steps 10, 20 and 30, so the final step (32) is on neither interval and only SaveFinalStep writes
# it to last.ckpt. tests/test_fault_tolerance.py interrupts this same command at step 12 and checks that the
# resumed run reproduces its losses bit for bit. Measured on seeds 42 / 0 / 1 / 2 / 3 (2 CPU cores): validation
# loss at step 30 = 0.34 / 0.47 / 0.36 / 0.31 / 0.28 of the untrained one (tests/test_train.py asserts < 0.7;
# at 22 steps the worst seed reached only 0.64), about 25 s per run in-process on a quiet machine.
DEMO_RUN = [
    "trainer.max_steps=32",
    "trainer.val_check_interval=15",
    "trainer.log_every_n_steps=1",
    "callbacks.periodic_checkpoint.every_n_train_steps=10",
]
DEMO_RUN_STEPS = 32
DEMO_RUN_VAL_EVERY = 15
DEMO_RUN_PERIODIC_EVERY = 10


def demo_overrides(demo_corpus: Path, *extra: str) -> list[str]:
    """Overrides of the shared demo run; an ``extra`` override of a key in ``DEMO_RUN`` replaces it."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [f"paths.cache_dir={demo_corpus.parent}", *(o for o in DEMO_RUN if o.split("=", 1)[0] not in keys), *extra]


def demo_train_args(demo_corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    """``train.py`` arguments of the shared demo run in ``run_dir`` (see ``demo_overrides``)."""
    return ["train.py", f"hydra.run.dir={run_dir}", *demo_overrides(demo_corpus, *extra)]


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """The real demo corpus (pbmc68k_reduced + celltypist sample), built once per test session."""
    from data_modules.demo import build_demo_corpus

    cache = os.environ.get("SCGPT_CACHE")
    out = Path(cache) / "demo_corpus" if cache else tmp_path_factory.mktemp("demo") / "demo_corpus"
    return build_demo_corpus(out)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A small real corpus for tests about processes, not data (DDP, DeepSpeed, sweeps): pbmc68k_reduced's 700
    cells on its 256 most often detected genes, 15% of the cells for validation. Its vocabulary has ~260 tokens
    instead of the demo corpus's ~32,800, so each process builds its model, all-reduces its gradients and writes
    its checkpoints (~12 MB instead of ~58 MB) in a fraction of the time."""
    import numpy as np

    from data_modules.demo import pbmc68k_adata
    from data_modules.store.convert import Source, convert_sources

    adata = pbmc68k_adata()
    detected = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    adata = adata[:, np.sort(np.argsort(-detected, kind="stable")[:256])].copy()
    out = tmp_path_factory.mktemp("small") / "corpus"
    convert_sources(
        [Source("pbmc68k_small", adata)],
        out,
        obs_columns=["cell_type"],
        allow_float=True,
        shard_size=128,
        split={"strategy": "cell", "seed": 0, "val_fraction": 0.15},
    )
    return out


@pytest.fixture(scope="session")
def small_pretrained(small_corpus, tmp_path_factory) -> Path:
    """A pretrained checkpoint to fine-tune from where what is tested is the fine-tuning machinery (adapters,
    DDP / DeepSpeed with adapters), not the weights: 2 generative steps of the tiny demo model (model=demo_tiny:
    d 64, 2 layers) on small_corpus, whose vocabulary (pbmc68k_reduced's 256 most detected genes) the annotation
    and perturbation demos' cells map into."""
    run = tmp_path_factory.mktemp("small_pretrained")
    overrides = [f"data.corpus_dir={small_corpus}", "model=demo_tiny", "trainer.max_steps=2"]
    train_in_process([*overrides, "trainer.val_check_interval=2", "logger=none", "callbacks.progress_bar=null"], run)
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def demo_run(demo_corpus, tmp_path_factory) -> Path:
    """One finished ``python train.py`` demo run (``DEMO_RUN``), trained once per session. Tests only read it;
    a test that trains on from it works on a copy (``copy_run``). It is trained the way the zero-shot and GRN demos
    get their checkpoint on a fresh clone (``scgpt_train.demo_run.demo_checkpoint``: none found, so ``train.py``
    runs), in ``<root>/outputs/demo/runs/<time>/``."""
    from scgpt_train.demo_run import demo_checkpoint

    root = tmp_path_factory.mktemp("demo_root")
    checkpoint = demo_checkpoint(min_steps=DEMO_RUN_STEPS, root=root, train_overrides=demo_overrides(demo_corpus))
    return checkpoint.parent.parent


DOCS_TEST = "test_docs_commands.py::test_every_documented_command_runs"


@pytest.fixture(scope="session", autouse=True)
def docs_commands_job(request, tmp_path_factory):
    """The documented commands (tests/helpers/docs_commands.py: ~2 minutes in one interpreter of their own),
    started at the session's first test when DOCS_TEST is selected, so that they run beside the other tests;
    DOCS_TEST waits for their results. None when DOCS_TEST is not selected or the official fixtures are missing."""
    selected = any(item.nodeid.endswith(DOCS_TEST) for item in request.session.items)
    if not selected or not (FIXTURES / "best_model.pt").is_file():
        yield None
        return
    from helpers.docs_commands import CommandsJob

    job = CommandsJob(tmp_path_factory.mktemp("user"), request.getfixturevalue("demo_corpus"))
    yield job
    job.stop()


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a run dir to train on without changing the shared one."""
    shutil.copytree(run_dir, dest)
    return dest


def run_cmd(args: list[str], cwd: Path = ROOT, timeout: float = 600, env: dict | None = None):
    """Run a project entry point in a fresh interpreter; fail with its output on error."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def train_in_process(overrides: list[str], output_dir: Path) -> dict[str, float]:
    """What ``python train.py OVERRIDES hydra.run.dir=OUTPUT_DIR`` does, in this process: compose
    configs/train.yaml and call ``scgpt_train.pipeline.run`` (as scripts/benchmark.py does for each seed).
    For tests about what a run computes, not about the entry point: no interpreter start, and kernels that
    numba / jax compiled for an earlier run are reused. Returns the run's final metrics."""
    from hydra import compose, initialize_config_dir

    from scgpt_train.pipeline import run

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])
    environ = dict(os.environ)  # seed_everything and the launcher leave variables behind
    try:
        return run(cfg)
    finally:
        os.environ.clear()
        os.environ.update(environ)
