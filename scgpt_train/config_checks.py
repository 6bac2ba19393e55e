"""Types and ranges of the config values a user overrides most, checked before anything is built.

Without this, ``trainer.max_steps=abc`` fails deep inside Lightning with ``'<' not supported between 'str' and
'int'`` and ``model.net.d_model=-1`` with torch's ``negative dimension -1``, after the data module was set up. Each
rule names a dotted key; a key the composed config does not have is skipped (a data module without
``val_batch_size``, a model without ``n_heads``). Every bad value is reported in one ``ConfigValueError``.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from data_modules.value_rules import Rule, is_int, number, whole
from scgpt_train.errors import ConfigValueError
from scgpt_train.heap import MAX_THRESHOLD

_MISSING = object()


def batches_or_fraction(positive: bool = False, nullable: bool = True) -> Rule:
    """Lightning's ``val_check_interval`` / ``limit_*_batches``: a whole number of batches or a fraction of them
    (``positive``: 0 is not allowed either way)."""

    def check(v) -> bool:
        if is_int(v):
            return v >= (1 if positive else 0)
        return isinstance(v, float) and (0.0 < v if positive else 0.0 <= v) and v <= 1.0

    low = "> 0" if positive else ">= 0"
    return Rule(check, f"a whole number of batches {low} or a fraction {low} and <= 1.0", nullable)


RULES: dict[str, Rule] = {
    "seed": whole(0),
    "malloc_mmap_threshold": Rule(
        lambda v: is_int(v) and 0 <= v <= MAX_THRESHOLD,
        f"a whole number of bytes from 0 to {MAX_THRESHOLD} (32 MiB)",
        nullable=True,
    ),
    "trainer.max_steps": whole(-1),
    "trainer.max_epochs": whole(-1, nullable=True),
    "trainer.min_steps": whole(0, nullable=True),
    "trainer.log_every_n_steps": whole(1),
    "trainer.accumulate_grad_batches": whole(1),
    "trainer.check_val_every_n_epoch": whole(1, nullable=True),
    "trainer.num_sanity_val_steps": whole(-1),
    "trainer.val_check_interval": batches_or_fraction(positive=True),
    "trainer.limit_train_batches": batches_or_fraction(),
    "trainer.limit_val_batches": batches_or_fraction(),
    "trainer.gradient_clip_val": number(0.0, nullable=True),
    "data.batch_size": whole(1, nullable=True),
    "data.val_batch_size": whole(1, nullable=True),
    "data.max_tokens": whole(1, nullable=True),
    "data.num_workers": whole(0),
    "model.lr": number(0.0, strict=True),
    "model.optimizer.lr": number(0.0, strict=True),
    "model.optimizer.weight_decay": number(0.0),
    "model.net.d_model": whole(1),
    "model.net.n_heads": whole(1),
    "model.net.d_ff": whole(1),
    "model.net.n_layers": whole(1),
    "model.net.dropout": number(0.0, maximum=1.0, nullable=True),
    "model.net.attn_dropout": number(0.0, maximum=1.0, nullable=True),
    "layout.max_seq_len": whole(2),
    "layout.n_bins": whole(1),
    "callbacks.model_checkpoint.save_top_k": whole(-1),
    "callbacks.model_checkpoint.every_n_train_steps": whole(0, nullable=True),
    "callbacks.periodic_checkpoint.every_n_train_steps": whole(0, nullable=True),
    "callbacks.periodic_checkpoint.save_top_k": whole(-1),
}


def _value(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
    except Exception:  # an interpolation that cannot resolve here (${hydra:...} outside a Hydra run)
        return _MISSING


def check_config(cfg: DictConfig) -> None:
    """Raise ``ConfigValueError`` naming every key of ``RULES`` whose value has the wrong type or range."""
    problems = []
    for key, rule in RULES.items():
        value = _value(cfg, key)
        if value is not _MISSING and (refusal := rule.refusal(key, value)) is not None:
            problems.append(refusal)
    net = cfg.get("model", {}).get("net", {}) if isinstance(cfg.get("model"), DictConfig) else {}
    d_model, n_heads = _value(cfg, "model.net.d_model"), _value(cfg, "model.net.n_heads")
    if net and is_int(d_model) and is_int(n_heads) and d_model > 0 and n_heads > 0 and d_model % n_heads:
        problems.append(f"model.net.d_model={d_model} must be divisible by model.net.n_heads={n_heads}")
    if problems:
        raise ConfigValueError(
            "config value refused, nothing was built: " + "; ".join(problems) + ". Fix the override or the config."
        )
