"""Pretrain or fine-tune an scGPT model from a Hydra config.

python train.py                                   # the embedded demo (experiment=demo)
python train.py experiment=pretrain_33m paths.corpus=/data/census_corpus
python train.py ckpt_path=last hydra.run.dir=outputs/demo/runs/<run>   # resume a run
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from scgpt_train.pipeline import run  # noqa: E402


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from scgpt_train.adapters import AdapterBaseError, PeftConfigError

    try:
        metrics = run(cfg)
    except (PeftConfigError, AdapterBaseError) as e:  # a peft= setting that cannot apply: one message, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    value = metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
