"""Pretrain or fine-tune an scGPT model from a Hydra config.

python train.py                                   # the embedded demo (experiment=demo)
python train.py experiment=pretrain_33m paths.corpus=/data/census_corpus
python train.py ckpt_path=last hydra.run.dir=outputs/demo/runs/<run>   # resume a run

Exit status: 0 finished; 2 a refused input (a config value, a file, a checkpoint, a run dir another job holds, a
full disk), printed as one message (HYDRA_FULL_ERROR=1 adds the traceback); 128 + the signal number (143 SIGTERM,
138 SIGUSR1) when a preemption stopped the run after saving its checkpoint: rerun the same command to resume.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from data_modules.atomic import exit_with  # noqa: E402
from scgpt_train.errors import RunInterrupted, find_user_input_error  # noqa: E402
from scgpt_train.pipeline import run  # noqa: E402
from scgpt_train.run_lock import check_run_dir  # noqa: E402


def refuse(error: BaseException) -> None:
    """Print a refusal as one message and exit 2 (with the traceback too under HYDRA_FULL_ERROR=1)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(error)
    print(f"error: {error}", file=sys.stderr)
    exit_with(2)  # sys.exit(2), without HDF5's crash at exit after a full disk (data_modules.atomic.exit_with)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except RunInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:
        if (refusal := find_user_input_error(e)) is None:
            raise
        refuse(refusal)
    value = metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None
    return None if value is None else float(value)


if __name__ == "__main__":
    try:  # before Hydra writes its records into a run dir it cannot write or another job is using
        check_run_dir(sys.argv[1:])
    except Exception as e:
        refuse(e)
    main()
