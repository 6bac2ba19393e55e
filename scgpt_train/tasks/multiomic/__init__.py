"""Multi-omic integration (issue #13): model builder (pretrained gene rows only), task (scIB metrics, baselines,
UMAPs, X_scgpt), benchmark over variants and seeds. The data side is ``data_modules/multiomic``."""

from scgpt_train.tasks.multiomic.model import build_multiomic_model, load_gene_rows
from scgpt_train.tasks.multiomic.task import MultiomicIntegrationTask

__all__ = ["MultiomicIntegrationTask", "build_multiomic_model", "load_gene_rows"]
