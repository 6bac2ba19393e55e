"""Multi-omic integration (issue #13): model builder (pretrained gene rows only), task (scIB metrics, baselines,
UMAPs, X_scgpt); the benchmark over variants and seeds is scgpt_train/benchmarks/multiomic.py.
The data side is ``data_modules/multiomic``."""

from scgpt_train.tasks.multiomic.model import build_multiomic_model, load_gene_rows
from scgpt_train.tasks.multiomic.task import MultiomicIntegrationTask

__all__ = ["MultiomicIntegrationTask", "build_multiomic_model", "load_gene_rows"]
