"""Benchmark dispatch (scgpt_train/benchmarks/): every configs/benchmark/*.yaml names its runner with
``_target_``, scripts/benchmark.py runs whatever runner a config names, and a config without one is refused."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from hydra.utils import get_method

from scgpt_train.benchmarks.harness import BenchmarkConfigError, run_benchmark

BENCHMARKS = sorted((ROOT / "configs" / "benchmark").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_every_benchmark_names_an_importable_runner(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["_partial_"] is True, path
    runner = get_method(cfg["_target_"])
    assert runner.__module__.startswith("scgpt_train.benchmarks."), cfg["_target_"]
    params = list(inspect.signature(runner).parameters)
    assert params[:5] == ["bench", "seeds", "out_dir", "extra_overrides", "compose"], cfg["_target_"]


TOY_RUNNER = """
from scgpt_train.benchmarks.harness import write_report


def run(bench, seeds, out_dir, extra_overrides=(), compose=None):
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = "| seed | value |\\n| --- | --- |\\n" + "".join(f"| {s} | {s * bench['scale']} |\\n" for s in seeds)
    result = {"benchmark": dict(bench), "seeds": list(seeds), "extra": list(extra_overrides)}
    write_report(out_dir, bench["name"], [bench["dataset"]], rows, result)
    return result
"""


def test_a_toy_benchmark_runs_from_a_config_dir_without_code_changes(tmp_path):
    """Adding a benchmark = one YAML (+ a runner module for a new family): a toy config in a temporary config dir
    (on Hydra's search path) names a toy runner module (on PYTHONPATH); scripts/benchmark.py runs it."""
    (tmp_path / "conf" / "benchmark").mkdir(parents=True)
    (tmp_path / "conf" / "benchmark" / "toy.yaml").write_text(
        "name: toy\n_target_: toy_runner.run\n_partial_: true\ndataset: toy numbers\nseeds: [1, 2]\nscale: 10\n"
    )
    (tmp_path / "toy_runner.py").write_text(TOY_RUNNER)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    args = ["benchmark=toy", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.run.dir={out}", "trainer=cpu"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "benchmark.md").read_text()
    assert text.startswith("# toy\n\n- toy numbers\n\n| seed | value |") and "| 2 | 20 |" in text
    result = json.loads((out / "results.json").read_text())
    assert result["seeds"] == [1, 2] and "trainer=cpu" in result["extra"]  # a train.py override reaches the runner


def test_a_benchmark_without_a_runner_is_refused_with_the_key_to_add(tmp_path):
    with pytest.raises(BenchmarkConfigError, match=r"'toy' names no runner: add `_target_: scgpt_train\.benchmarks"):
        run_benchmark({"name": "toy", "task": "annotation"}, [0], tmp_path)
    with pytest.raises(BenchmarkConfigError, match="'toy': _target_ 'no_such_module.run' cannot be loaded"):
        run_benchmark({"name": "toy", "_target_": "no_such_module.run"}, [0], tmp_path)
    assert not any(Path(tmp_path).iterdir())


def test_a_refused_input_inside_a_runner_exits_2_with_one_message(tmp_path):
    """A UserInputError raised by a runner (here transfer_sim's simulation parameters, checked before anything is
    fitted or written) ends scripts/benchmark.py with exit 2 and one message naming the key, not a traceback."""
    out = tmp_path / "out"
    args = ["benchmark=transfer_sim", "+benchmark.simulation.type_seperation=2", f"hydra.run.dir={out}"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: benchmark.simulation has no parameter(s) ['type_seperation']" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "results.json").exists() and not (out / "corpora").exists()
