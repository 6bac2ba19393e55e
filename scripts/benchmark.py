#!/usr/bin/env python
"""Fine-tune over several seeds, run the baselines, write the table with the paper's numbers beside ours.

    python scripts/benchmark.py benchmark=annotation_demo
    python scripts/benchmark.py benchmark=integration_demo seeds=[0]
    python scripts/benchmark.py benchmark=annotation_ms 'overrides=["trainer=gpu"]'

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

from scgpt_train.tasks.benchmark import run_benchmark  # noqa: E402


@hydra.main(config_path=str(ROOT / "configs"), config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    bench = OmegaConf.to_container(cfg.benchmark, resolve=True)
    extra = list(cfg.overrides) + [f"paths.cache_dir={cfg.paths.cache_dir}"]
    run_benchmark(bench, list(cfg.seeds), out_dir, extra)


if __name__ == "__main__":
    main()
