#!/usr/bin/env python
"""Fine-tune over several seeds, run the baselines, write the table with the paper's numbers beside ours.

    python scripts/benchmark.py benchmark=annotation_demo
    python scripts/benchmark.py benchmark=integration_demo seeds=[0]
    python scripts/benchmark.py benchmark=annotation_ms trainer=gpu

configs/benchmark/<name>.yaml names its runner with ``_target_`` (``_partial_: true``); the harness
(``scgpt_train.benchmarks.harness.run_benchmark``) instantiates it and calls it. A config dir of your own joins
with ``hydra.searchpath=[file:///path/to/conf]`` (its ``benchmark/<name>.yaml``).

Arguments that are not keys of configs/benchmark.yaml (``data.path=ref.h5ad``, ``trainer=gpu``,
``pretrained=CKPT``) are train.py overrides for every seed (``split_cli_overrides``).

Everything lands under the Hydra run dir (hydra.run.dir=...): benchmark.md, results.json, figures, and one
full train.py run directory per seed (seed_<n>/).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from scgpt_train.benchmarks.harness import run_benchmark, split_cli_overrides  # noqa: E402
from scgpt_train.errors import find_user_input_error  # noqa: E402

sys.argv[1:], TRAIN_OVERRIDES = split_cli_overrides(sys.argv[1:])


@hydra.main(config_path=str(ROOT / "configs"), config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run the benchmark ``cfg.benchmark`` names over ``cfg.seeds`` into the Hydra run dir (report.md,
    results.json); exits with status 2 and one message when the benchmark's config or a user input is refused
    (a ``UserInputError``, also one raised inside a seed's train.py run).

    Parameters
    ----------
    cfg : DictConfig
        ``configs/benchmark.yaml`` as composed by Hydra from the command line: ``benchmark`` (the YAML of
        ``configs/benchmark/``, whose ``_target_`` is the runner), ``seeds``, ``overrides`` (train.py overrides for
        every run) and ``paths``.
    """
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    bench = OmegaConf.to_container(cfg.benchmark, resolve=True)
    extra = list(cfg.overrides) + TRAIN_OVERRIDES + [f"paths.cache_dir={cfg.paths.cache_dir}"]
    try:
        run_benchmark(bench, list(cfg.seeds), out_dir, extra)
    except Exception as e:
        if (refusal := find_user_input_error(e)) is None:
            raise
        print(f"error: {refusal}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
