"""Building option dataclasses from whatever Hydra or a user passes."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_any(cls: type[T], cfg: Any, what: str) -> T:
    """``cls`` from an instance, a dict, an omegaconf DictConfig or None (defaults); unknown keys are
    refused with the list of valid ones (``what`` names the options in the message)."""
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    if not isinstance(cfg, dict):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid options: {sorted(known)}")
    return cls(**cfg)
