"""Shared test setup: offline wandb, single-threaded inductor, a session-wide demo corpus."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "scgpt_official_tiny"


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """The real demo corpus (pbmc68k_reduced + celltypist sample), built once per test session."""
    from data_modules.demo import build_demo_corpus

    cache = os.environ.get("SCGPT_CACHE")
    out = Path(cache) / "demo_corpus" if cache else tmp_path_factory.mktemp("demo") / "demo_corpus"
    return build_demo_corpus(out)


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
