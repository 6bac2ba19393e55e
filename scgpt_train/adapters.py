"""Parameter-efficient fine-tuning (``peft=lora`` / ``peft=ia3``) through Hugging Face ``peft``.

Adapters go on the transformer's attention (``self_attn.qkv``, ``self_attn.out_proj``) and feed-forward
(``linear1``, ``linear2``) projections after the pretrained weights loaded; everything else the checkpoint provided
(embeddings, encoders, norms) is frozen, while the task heads (expression / MVC decoders, classifier, adversarial
discriminator) and any weight the checkpoint did not hold (a new batch encoder, DSBN) stay trainable.

``model.freeze`` combines as follows: ``freeze.layers=k`` leaves the first k transformer layers without adapters
(they stay frozen like the rest of the base); ``freeze.embeddings`` changes nothing (the base is frozen anyway).

Checkpoints of a PEFT run (``last.ckpt``, the best one) hold only the trainable weights (adapters, heads) and
``checkpoint["peft"]``: the adapter config and the base checkpoint's path and sha256. Loading one for inference
(``scgpt_train.checkpoints.load_checkpoint``: ``embed.py``, ``export_scgpt.py``, the API) rebuilds the base,
checks its sha256, applies the adapters and merges them into plain ``nn.Linear`` weights.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

from torch import nn

from scgpt_train.errors import UserInputError

log = logging.getLogger(__name__)

FORMAT = "scgpt_train/peft-v1"
STYLES = ("none", "lora", "ia3")
TARGETS = ("self_attn.qkv", "self_attn.out_proj", "linear1", "linear2")
# parameters of these ScGPT modules stay trainable under PEFT (the task heads)
HEADS = ("expr_decoder.", "mvc_decoder.", "cls_decoder.", "dab_decoder.")


class PeftConfigError(UserInputError):
    """A ``peft=`` setting that cannot be applied (no pretrained checkpoint, a conflicting freeze, a bad field)."""


class AdapterBaseError(UserInputError):
    """An adapter checkpoint whose base checkpoint is missing or is not the file the adapters were trained on."""


def checkpoint_sha256(path) -> str:
    """sha256 of a checkpoint file, or of a checkpoint directory (every file's relative path and bytes, sorted)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _style(cfg) -> str:
    style = str((cfg or {}).get("style", "none") or "none")
    if style not in STYLES:
        raise PeftConfigError(f"peft.style={style!r} is not one of {STYLES}; choose peft=lora, peft=ia3 or peft=none")
    return style


def target_modules(net: nn.Module, skip_layers: int = 0) -> list[str]:
    """Full names of the projections that get adapters: ``layers.<i>.<target>`` for i >= ``skip_layers``."""
    n_layers = len(getattr(net, "layers", []))
    return [f"layers.{i}.{t}" for i in range(skip_layers, n_layers) for t in TARGETS]


def make_peft_config(cfg: dict, targets: list[str]):
    """The ``peft`` library's config for ``cfg`` (the ``peft:`` node: style and its fields)."""
    from peft import IA3Config, LoraConfig

    style = _style(cfg)
    known = {"lora": {"style", "r", "alpha", "dropout", "lr_scale"}, "ia3": {"style", "lr_scale"}}[style]
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise PeftConfigError(f"peft={style}: unknown field(s) {unknown}; {style} takes {sorted(known)}")
    if style == "lora":
        return LoraConfig(
            r=int(cfg.get("r", 8)),
            lora_alpha=float(cfg.get("alpha", 16)),
            lora_dropout=float(cfg.get("dropout", 0.0)),
            target_modules=targets,
            bias="none",
        )
    return IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t.endswith("linear2")])


def inject(net: nn.Module, cfg: dict, skip_layers: int = 0) -> list[str]:
    """Put ``cfg``'s adapters on ``net`` in place; returns the adapted module names. Leaves every base weight
    frozen (peft's doing) — the caller decides which other weights train."""
    from peft import inject_adapter_in_model

    targets = target_modules(net, skip_layers)
    if not targets:
        raise PeftConfigError(
            f"peft={_style(cfg)}: no transformer layer is left for adapters (the model has "
            f"{len(getattr(net, 'layers', []))} layers, freeze.layers={skip_layers})"
        )
    inject_adapter_in_model(make_peft_config(cfg, targets), net)
    return targets


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """``trainable_params`` / ``total_params`` of a module (for summary.json)."""
    params = list(module.parameters())
    return {
        "trainable_params": int(sum(p.numel() for p in params if p.requires_grad)),
        "total_params": int(sum(p.numel() for p in params)),
    }


def not_loaded(net: nn.Module) -> set[str]:
    """Weights of ``net`` that its checkpoint did not provide: ``load_report.missing`` of ``checkpoints.load_model``,
    or the ``"fresh"`` list of ``tasks.perturbation.model.perturbation_model`` (a new flag encoder, the decoder)."""
    report = getattr(net, "load_report", None)
    if isinstance(report, dict):
        return set(report.get("fresh") or [])
    return set(getattr(report, "missing", None) or [])


def scale_lr(module, cfg: dict) -> None:
    """``peft.lr_scale``: the run's learning rate (``model.lr``, the optimizer's ``lr``) times this factor for the
    adapters and heads (LoRA usually wants a higher learning rate than full fine-tuning of the same recipe)."""
    scale = cfg.get("lr_scale", 1.0)
    try:
        scale = float(1.0 if scale is None else scale)
    except (TypeError, ValueError):
        scale = -1.0
    if not scale > 0:
        raise PeftConfigError(f"peft.lr_scale={cfg.get('lr_scale')!r} must be a number > 0 (1 = model.lr as is)")
    factory = module.optimizer_factory
    if scale == 1.0 or not isinstance(factory, functools.partial) or "lr" not in factory.keywords:
        return
    lr = float(factory.keywords["lr"]) * scale
    module.optimizer_factory = functools.partial(factory, lr=lr)
    module.lr = lr
    log.info("peft=%s: learning rate %g = model.lr %g x peft.lr_scale %g", cfg["style"], lr, lr / scale, scale)


def apply_peft(module, peft_cfg, pretrained, freeze=None) -> dict | None:
    """Adapters on the Lightning module's model (``pipeline.build_modules`` calls this after the pretrained weights
    loaded). Returns the PEFT record stored in every checkpoint (None for ``peft=none``)."""
    cfg = dict(peft_cfg or {})
    style = _style(cfg)
    if style == "none":
        return None
    if not pretrained:
        raise PeftConfigError(
            f"peft={style} adapts a pretrained model, but no pretrained= checkpoint was given: adapters on a model "
            f"trained from scratch would leave its random weights frozen. Add model=from_official pretrained=CKPT "
            f"(and data.vocab=CKPT for AnnData), or drop peft={style} to train every weight"
        )
    freeze = dict(freeze or {})
    skip = int(freeze.get("layers", 0) or 0)
    net = module.model
    provided = set(net.state_dict()) - not_loaded(net)
    targets = inject(net, cfg, skip)
    for name, p in net.named_parameters():
        base_name = name.replace(".base_layer.", ".")
        if name.startswith(HEADS) or (base_name == name and name not in provided):
            p.requires_grad_(True)  # task heads and weights the checkpoint did not hold (e.g. a new batch encoder)
    module.strict_loading = False  # its checkpoints hold the trainable weights only
    scale_lr(module, cfg)
    record = {
        "format": FORMAT,
        "config": {k: (v if isinstance(v, int | float | str) else str(v)) for k, v in cfg.items()},
        "skip_layers": skip,
        "targets": targets,
        "base": {"path": str(Path(pretrained).resolve()), "sha256": checkpoint_sha256(pretrained)},
    }
    counts = parameter_counts(module)
    log.info(
        "peft=%s: %d modules adapted; %s of %s parameters trainable (%.2f%%)",
        style,
        len(targets),
        f"{counts['trainable_params']:,}",
        f"{counts['total_params']:,}",
        100 * counts["trainable_params"] / max(counts["total_params"], 1),
    )
    return record


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: ScGPTLitModule.on_save_checkpoint / on_load_checkpoint call these


def trim_checkpoint(module, checkpoint: dict) -> None:
    """Keep only the trainable weights and the buffers in a PEFT run's checkpoint, and add its PEFT record."""
    keep = {n for n, p in module.named_parameters() if p.requires_grad} | {n for n, _ in module.named_buffers()}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    checkpoint["peft"] = dict(module.peft)


def check_resume(module, checkpoint: dict) -> None:
    """Refuse to resume a PEFT run from a checkpoint of another set-up (full fine-tune, other adapters, other base)."""
    mine, theirs = getattr(module, "peft", None), checkpoint.get("peft")
    if mine is None and theirs is None:
        return
    if mine is None or theirs is None:
        has, lacks = ("the checkpoint", "this run") if mine is None else ("this run", "the checkpoint")
        raise PeftConfigError(
            f"{has} uses adapters (peft=) but {lacks} does not: resuming would mix a full fine-tune with an adapter "
            "one. Rerun with the same peft= setting as the checkpoint, or start a new run dir"
        )
    if theirs["base"]["sha256"] != mine["base"]["sha256"]:
        raise AdapterBaseError(
            f"the checkpoint's adapters were trained on the base {theirs['base']['path']} (sha256 "
            f"{theirs['base']['sha256'][:12]}...) but pretrained= is {mine['base']['path']} (sha256 "
            f"{mine['base']['sha256'][:12]}...); use the same pretrained= checkpoint, or start a new run dir"
        )
    if (theirs["config"], theirs["targets"]) != (mine["config"], mine["targets"]):
        raise PeftConfigError(
            f"the checkpoint's adapters ({theirs['config']}, {len(theirs['targets'])} modules) differ from this run's "
            f"peft= ({mine['config']}, {len(mine['targets'])} modules); rerun with the checkpoint's peft= setting"
        )


# ---------------------------------------------------------------------------------------------------------------
# inference: an adapter checkpoint -> a plain ScGPT with the adapters merged


def merge_adapters(net: nn.Module) -> nn.Module:
    """Merge every peft adapter layer of ``net`` into its base ``nn.Linear`` and put that back in its place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(name, m) for name, m in net.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in adapted:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, layer.get_base_layer())
    return net


def adapter_base(path, record: dict) -> Path:
    """The base checkpoint a PEFT run's checkpoint (read from ``path``; ``record`` = its ``"peft"`` entry) was trained
    on: it must exist at the recorded path and have the recorded sha256."""
    base_path = Path(record["base"]["path"])
    if not base_path.exists():
        raise AdapterBaseError(
            f"{path}: its adapters need the base checkpoint {base_path}, which does not exist; put the base back "
            "there (the adapters only make sense on the exact weights they were trained on)"
        )
    digest = checkpoint_sha256(base_path)
    if digest != record["base"]["sha256"]:
        raise AdapterBaseError(
            f"{path}: the base checkpoint {base_path} has sha256 {digest[:12]}... but the adapters were trained on "
            f"one with sha256 {record['base']['sha256'][:12]}...: it is another file (retrained or replaced), so the "
            "adapters would be applied to the wrong weights. Restore the original base checkpoint"
        )
    return base_path


def merge_adapter_state(path, model: nn.Module, obj: dict) -> nn.Module:
    """Put the adapters of a PEFT run's checkpoint ``obj`` (read from ``path``) on ``model`` (the base weights
    already loaded), load the trained adapter and head weights, and merge the adapters into the projections."""
    record = obj["peft"]
    inject(model, record["config"], int(record.get("skip_layers", 0)))
    sd = {k[len("model.") :]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
    result = model.load_state_dict(sd, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: weights the adapted model does not have: {result.unexpected_keys[:5]}")
    adapter_keys = [k for k in model.state_dict() if ".lora_" in k or ".ia3_" in k]
    absent = [k for k in adapter_keys if k not in sd]
    if absent:
        raise ValueError(f"{path}: the adapter checkpoint lacks {len(absent)} adapter weights (e.g. {absent[:3]})")
    return merge_adapters(model)
