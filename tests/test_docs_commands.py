"""Every command written in README.md, docs/*.md and the config comments runs (issue #17 item 7).

How the commands are found, shortened and run, and the workspace they run in: tests/helpers/docs_commands.py.
"""

from __future__ import annotations

import pytest
from helpers.docs_commands import documented_commands, runnable


def test_commands_are_found():
    commands = documented_commands()
    where = {w for w, _ in commands}
    assert "README.md" in where and any(w.startswith("configs/") for w in where), where
    assert any("train.py" in c for _, c in commands) and any("scripts/embed.py" in c for _, c in commands)
    assert runnable("srun .venv/bin/python train.py experiment=pretrain_33m").endswith("--cfg job")
    assert "trainer.max_steps=4" in runnable(".venv/bin/python train.py trainer.max_steps=200")


def test_every_documented_command_runs(docs_commands_job):
    """The commands run in order in one separate interpreter (tests/helpers/run_commands.py), started at the
    session's first test (conftest.docs_commands_job); its per-command times are printed here (``pytest -s``) and
    the failures, with their tracebacks, fail this test."""
    if docs_commands_job is None:
        pytest.skip("official fixtures not found at tests/fixtures/official")
    runs, where_of = docs_commands_job.runs, docs_commands_job.where_of
    assert len(runs) >= 15, runs
    code, output, results = docs_commands_job.wait()
    print(output)
    assert code == 0 and len(results) == len(runs), (
        f"the command runner stopped after {len(results)} of {len(runs)} commands (exit {code}):\n{output[-6000:]}"
    )
    failures = [f"{where_of[r['run']]}\n  ran: {r['run']}\n  {r['problem']}" for r in results if r["problem"]]
    assert not failures, "\n\n".join(failures)
