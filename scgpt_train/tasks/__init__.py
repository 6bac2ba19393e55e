"""Fine-tuning tasks: what happens after fit (predictions, embeddings, metrics, baselines, figures)."""

from scgpt_train.tasks.annotation import AnnotationTask
from scgpt_train.tasks.integration import IntegrationTask

__all__ = ["AnnotationTask", "IntegrationTask"]
