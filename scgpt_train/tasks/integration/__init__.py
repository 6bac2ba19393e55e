"""Batch integration: the embedding fine-tune's evaluation after fit (:mod:`.task`)."""

from scgpt_train.tasks.integration.task import IntegrationTask, raw_counts

__all__ = ["IntegrationTask", "raw_counts"]
