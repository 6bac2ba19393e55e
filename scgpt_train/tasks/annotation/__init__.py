"""Cell-type annotation: the classifier fine-tune's evaluation after fit (:mod:`.task`)."""

from scgpt_train.tasks.annotation.task import AnnotationTask, ValidationMacroF1, macro_f1_from_counts

__all__ = ["AnnotationTask", "ValidationMacroF1", "macro_f1_from_counts"]
