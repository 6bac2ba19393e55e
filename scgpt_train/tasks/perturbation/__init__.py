"""Perturbation-response and reverse-perturbation evaluation: metrics, baselines, retrieval scoring.

Model-independent: everything works on mean profiles / cell matrices (numpy), so the same code scores scGPT,
the baselines and any other method. Data loading, splits and pairing live in ``data_modules.perturbation``.
"""

from scgpt_train.tasks.perturbation import baselines, metrics, reverse

__all__ = ["baselines", "metrics", "reverse"]
