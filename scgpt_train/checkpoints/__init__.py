"""Official scGPT checkpoints in and out, and our own single-file checkpoint.

Official directory: ``best_model.pt`` (state_dict), ``args.json``, ``vocab.json``.
Our file: ``torch.save({"format": FORMAT, "model_config": ScGPT kwargs, "state_dict": ..., "vocab": {token: id}})``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from data_modules.atomic import atomic_path, write_json_atomic
from data_modules.errors import UserInputError
from scgpt_train.checkpoints.mapping import (
    ATTENTION_LAYOUTS,
    MappingReport,
    config_from_official,
    detect_attention_layout,
    official_args_from_config,
    official_state_dict_to_ours,
    ours_to_official,
    upgrade_config,
)
from scgpt_train.model import ScGPT

log = logging.getLogger(__name__)
FORMAT = "scgpt_train/model-v1"

__all__ = [
    "ATTENTION_LAYOUTS",
    "FORMAT",
    "MappingReport",
    "detect_attention_layout",
    "export_official",
    "load_checkpoint",
    "load_model",
    "load_into",
    "load_official",
    "official_state_dict_to_ours",
    "ours_to_official",
    "read_official",
    "save_checkpoint",
]


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _atomic_json(obj, path: Path) -> None:
    write_json_atomic(path, obj, indent=2)


def load_into(model: ScGPT, sd_ours: dict, source: str = "checkpoint") -> MappingReport:
    """Copy a state dict in our names into ``model``; refuse shape mismatches, report the rest."""
    own = model.state_dict()
    report = MappingReport()
    for key, value in sd_ours.items():
        if key not in own:
            report.ignored.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{source}: weight {key!r} has shape {tuple(value.shape)} but the model built from "
                f"its config expects {tuple(own[key].shape)}; the config (args.json / model_config) "
                f"does not describe these weights"
            )
    usable = {k: v for k, v in sd_ours.items() if k in own}
    result = model.load_state_dict(usable, strict=False)
    report.missing = list(result.missing_keys)
    return report


def read_official(path) -> tuple[dict, dict, dict]:
    """(state_dict, args, vocab) of an official checkpoint directory."""
    path = Path(path)
    files = {name: path / name for name in ("best_model.pt", "args.json", "vocab.json")}
    absent = [name for name, f in files.items() if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"{path} is not an official scGPT checkpoint directory: missing {', '.join(absent)}")
    sd = torch.load(files["best_model.pt"], map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    args = json.loads(files["args.json"].read_text())
    vocab = json.loads(files["vocab.json"].read_text())
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{files['vocab.json']}: token ids are not consecutive from 0")
    return sd, args, vocab


# ScGPT kwargs that fix the shapes of pretrained weights: a checkpoint's values win, a differing override is refused
# (new heads, dropout, pooling and the like may be set freely when fine-tuning)
ARCHITECTURE_KEYS = (
    "d_model",
    "n_heads",
    "d_ff",
    "n_layers",
    "norm_scheme",
    "layout",
    "decoder_style",
    "modality_style",
    "n_modalities",
    "n_conditions",
)


def apply_overrides(cfg: dict, overrides: dict, source) -> dict:
    """``cfg`` updated with ``overrides``; an override of an architecture field that differs from the
    checkpoint's value is refused, naming every such field (fine-tuning takes the architecture from the checkpoint)."""
    conflicts = {}
    for key in ARCHITECTURE_KEYS:
        if key not in overrides:
            continue
        given = overrides[key]
        if key == "layout":
            from data_modules.tokenize.layout import TokenLayout

            given = TokenLayout.from_any(given).to_dict()
        if given != cfg.get(key):
            conflicts[key] = (given, cfg.get(key))
    if conflicts:
        listed = ", ".join(f"model.net.{k}={a!r} (the checkpoint has {b!r})" for k, (a, b) in conflicts.items())
        drops = " ".join(f"~model.net.{k}" for k in conflicts)
        raise UserInputError(
            f"{source}: fine-tuning takes the architecture from the checkpoint, but the config overrides it: "
            f"{listed}. Remove these overrides (on the command line: {drops}; or from the experiment's model.net), "
            "or train a new model from scratch without pretrained="
        )
    return {**cfg, **overrides}


def load_official(path, return_vocab: bool = False, **overrides):
    """Build a ScGPT from an official checkpoint directory (any of the three attention layouts).

    ``overrides`` replace config entries (e.g. ``dropout=0.1`` or ``n_cls=12`` to add a fresh classifier).
    The stored ``<pad>`` embedding row is kept as stored. Ignored / missing keys are logged and kept in
    ``model.load_report``.
    """
    sd, args, vocab = read_official(path)
    sd_ours, report = official_state_dict_to_ours(sd)
    cfg = apply_overrides(config_from_official(args, vocab, sd_ours), overrides, path)
    model = ScGPT(**cfg)
    load_report = load_into(model, sd_ours, source=str(Path(path) / "best_model.pt"))
    report.ignored += load_report.ignored
    report.missing = load_report.missing
    if report.ignored or report.missing:
        log.warning("load_official(%s): %s", path, report.summary())
    model.load_report = report
    return (model, vocab) if return_vocab else model


def export_official(model: ScGPT, vocab: dict, out_dir, args: dict | None = None, layout: str = "released") -> Path:
    """Write ``best_model.pt`` (official names, chosen attention layout), ``args.json``, ``vocab.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config()
    if len(vocab) != cfg["vocab_size"]:
        raise ValueError(f"vocab has {len(vocab)} tokens but the model's gene embedding has {cfg['vocab_size']} rows")
    sd, report = ours_to_official(model.state_dict(), layout)
    if report.ignored:
        log.warning("export_official: no official counterpart for %s", ", ".join(report.ignored))
    sd = {k: v.detach().clone().cpu() for k, v in sd.items()}
    _atomic_torch_save(sd, out_dir / "best_model.pt")
    _atomic_json(official_args_from_config(cfg, vocab, args), out_dir / "args.json")
    _atomic_json(dict(vocab), out_dir / "vocab.json")
    return out_dir


def save_checkpoint(model: ScGPT, vocab: dict | None, path) -> Path:
    """One torch file: {"format", "model_config", "state_dict", "vocab"}."""
    path = Path(path)
    obj = {
        "format": FORMAT,
        "model_config": model.config(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": dict(vocab) if vocab is not None else None,
    }
    _atomic_torch_save(obj, path)
    return path


def load_checkpoint(path, **overrides) -> tuple[ScGPT, dict | None]:
    """(model, vocab) from our single-file checkpoint, a Lightning .ckpt of the training module, or an
    official checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        return load_official(path, return_vocab=True, **overrides)
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        cfg, sd, vocab = dict(obj["model_config"]), obj["state_dict"], obj.get("vocab")
    elif isinstance(obj, dict) and "peft" in obj and "hyper_parameters" in obj:  # a peft= run: base + adapters
        from scgpt_train.adapters import adapter_base, merge_adapter_state

        hp = obj.get("hyper_parameters", {})
        base_path = adapter_base(path, obj["peft"])
        base_model, _ = load_checkpoint(base_path)
        model = ScGPT(**apply_overrides(upgrade_config(dict(hp["model"])), overrides, path))
        load_into(model, base_model.state_dict(), source=str(base_path))
        merge_adapter_state(path, model, obj)
        model.load_report = getattr(base_model, "load_report", None)
        vocab = hp.get("vocab") or obj.get("vocab")
        return model, (dict(vocab) if vocab is not None else None)
    elif isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj:  # Lightning
        hp = obj["hyper_parameters"]
        cfg = hp.get("model")
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: Lightning checkpoint without hyper_parameters['model'] (the ScGPT kwargs)")
        sd = {k[len("model.") :]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        vocab = hp.get("vocab")
        if vocab is None:
            vocab = obj.get("vocab")
    else:
        raise ValueError(f"{path}: not a scgpt_train checkpoint (expected format {FORMAT!r} or a Lightning .ckpt)")
    cfg = apply_overrides(upgrade_config(cfg), overrides, path)
    model = ScGPT(**cfg)
    report = load_into(model, sd, source=str(path))
    if report.missing or report.ignored:
        log.warning("load_checkpoint(%s): %s", path, report.summary())
    model.load_report = report
    return model, (dict(vocab) if vocab is not None else None)


def load_model(path, vocab_size: int | None = None, pad_token_id: int | None = None, **overrides) -> ScGPT:
    """Just the model from ``load_checkpoint`` (a Hydra ``_target_`` for ``net``); checks that the data's
    vocabulary size / pad id, when given, are the checkpoint's."""
    model, _ = load_checkpoint(path, **overrides)
    cfg = model.config()
    for name, given in (("vocab_size", vocab_size), ("pad_token_id", pad_token_id)):
        if given is not None and int(given) != cfg[name]:
            raise ValueError(
                f"{path}: the checkpoint has {name}={cfg[name]} but the data module gives {given}; build the data "
                f"with the checkpoint's vocabulary (scripts/build_corpus.py ... --vocab <checkpoint>/vocab.json, "
                f"or data.vocab={path} for AnnData fine-tuning)"
            )
    return model
