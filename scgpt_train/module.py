"""LightningModule: a weighted sum of swappable objectives around one ScGPT model.

Knows no file formats: it receives ``Batch`` objects from whichever DataModule is configured.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from data_modules.batch import Batch
from scgpt_train import adapters
from scgpt_train.objectives import total_loss
from scgpt_train.objectives.per_gene import PerGeneMean, per_gene_ratios

ALWAYS_ON_STEP = sys.maxsize  # objectives gated by step (e.g. the cell prompt) are fully on in validation


def freeze_parameters(net: nn.Module, embeddings: bool = False, layers: int = 0) -> list[str]:
    """Fine-tuning freeze: the input embeddings (gene, value, flag encoders) and/or the first ``layers``
    transformer layers get ``requires_grad=False``. Returns the frozen parameter names."""
    if layers < 0:
        raise ValueError(f"freeze.layers must be >= 0, got {layers}")
    n_layers = len(getattr(net, "layers", []))
    if layers > n_layers:
        raise ValueError(f"freeze.layers={layers} but the model has {n_layers} transformer layers")
    prefixes = [f"layers.{i}." for i in range(layers)]
    if embeddings:
        prefixes += ["gene_encoder.", "value_encoder.", "flag_encoder."]
    frozen = []
    for name, p in net.named_parameters():
        if any(name.startswith(pre) for pre in prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def fused_optimizer_kwargs(factory: Callable, device_type: str) -> dict:
    """``{"fused": True}`` when the parameters are on CUDA and the optimizer (a ``functools.partial`` of a torch
    optimizer such as Adam / AdamW) has a fused CUDA kernel and the config did not choose; else ``{}``."""
    if device_type != "cuda" or not isinstance(factory, functools.partial) or "fused" in factory.keywords:
        return {}
    cls = factory.func
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return {}
    return {"fused": True} if "fused" in inspect.signature(cls.__init__).parameters else {}


class ScGPTLitModule(pl.LightningModule):
    peft: dict | None = None  # set by scgpt_train.adapters.apply_peft (peft=lora / ia3)

    def __init__(
        self,
        net: nn.Module,
        objectives: Mapping[str, nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        scheduler_total_steps: int | None = None,
        lr: float | None = None,
        compile: bool = False,
        vocab: Mapping[str, int] | None = None,
        freeze: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if not objectives:
            raise ValueError("no objective configured: choose one with objective=generative (or mlm, cls, ...)")
        self.model = net
        self.objectives = nn.ModuleDict(dict(objectives))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_total_steps = scheduler_total_steps
        self.lr = lr
        self.compile = compile
        self.vocab = dict(vocab) if vocab is not None else None  # saved into every checkpoint
        self.frozen = freeze_parameters(net, **dict(freeze or {}))
        # The ScGPT constructor kwargs travel with every checkpoint so a .ckpt alone rebuilds the model.
        net_config = net.config() if hasattr(net, "config") else {}
        # each gene's mean target over the training positions: the baseline the validation losses are compared to
        self.per_gene = PerGeneMean(int(net_config.get("vocab_size") or 0))
        self.save_hyperparameters({"model": net_config, "objectives": sorted(objectives)})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.vocab is not None:
            checkpoint["vocab"] = self.vocab
        checkpoint["per_gene_mean"] = self.per_gene.state_dict()
        if self.peft:  # adapters + heads only, and the base checkpoint's path and sha256
            adapters.trim_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        adapters.check_resume(self, checkpoint)
        if self.vocab is None and checkpoint.get("vocab") is not None:
            self.vocab = dict(checkpoint["vocab"])
        if checkpoint.get("per_gene_mean") is not None:  # absent in checkpoints written before it existed
            self.per_gene.load_state_dict(checkpoint["per_gene_mean"])

    # forward --------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model(**batch.model_inputs())

    def compute_losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Every named loss term, plus ``loss``: the weighted sum that is optimized."""
        return total_loss(self.objectives, self.model, batch, self(batch), step)

    # steps ----------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        terms = self.compute_losses(batch, self.global_step)
        n = batch.n_cells
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in terms.items() if k != "loss"}, batch_size=n)
        for objective in self.objectives.values():
            where = objective.value_positions(batch)
            if where is not None:
                self.per_gene.update(batch.gene_ids, batch.target_values, where)
        return terms["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        outputs = self(batch)
        terms = total_loss(self.objectives, self.model, batch, outputs, ALWAYS_ON_STEP)
        n = batch.n_cells
        self.log("val/loss", terms["loss"], prog_bar=True, batch_size=n, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in terms.items() if k != "loss"}, batch_size=n, sync_dist=True)
        if not self.per_gene.empty:  # the same positions scored by each gene's training mean
            for name, objective in self.objectives.items():
                where = objective.value_positions(batch)
                if where is not None:
                    baseline = self.per_gene.loss(batch.gene_ids, batch.target_values, where)
                    self.log(f"val/{name}/per_gene_baseline", baseline, batch_size=n, sync_dist=True)
        if "cls_output" in outputs and batch.labels is not None:  # annotation: held-out accuracy
            known = batch.labels >= 0
            if bool(known.any()):
                acc = (outputs["cls_output"].argmax(-1)[known] == batch.labels[known]).float().mean()
                self.log("val/accuracy", acc, batch_size=int(known.sum()), sync_dist=True)
        return terms["loss"]

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:  # the epoch means are in callback_metrics by now
            for key, ratio in per_gene_ratios(self.trainer.callback_metrics).items():
                self.log(key, ratio)

    def predict_step(self, batch: Batch, batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per cell: ``cell_index``, ``cell_emb`` (B, d); with a classifier also ``probs`` (B, C), ``pred`` (B,)."""
        outputs = self(batch)
        # a copy: with <cls> pooling cell_emb is a view of the (B, L, d) encoder output; a caller that keeps every
        # batch's predictions (Lightning's trainer.predict) would keep each batch's whole encoder output alive
        out = {"cell_emb": outputs["cell_emb"].float().clone()}
        if batch.cell_index is not None:
            out["cell_index"] = batch.cell_index
        if "cls_output" in outputs:
            probs = outputs["cls_output"].float().softmax(-1)
            out["probs"], out["pred"] = probs, probs.argmax(-1)
        return out

    # optimization ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.compile and not getattr(self, "_compiled", False):
            self.model.compile()  # in place: state_dict keys stay unprefixed
            self._compiled = True

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        device_type = params[0].device.type if params else "cpu"
        optimizer = self.optimizer_factory(params=params, **fused_optimizer_kwargs(self.optimizer_factory, device_type))
        if self.scheduler_factory is None:
            return optimizer
        total = self.scheduler_total_steps or self._estimated_total_steps()
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _estimated_total_steps(self) -> int:
        est = self.trainer.estimated_stepping_batches
        if est is None or est == float("inf"):
            if self.trainer.max_steps and self.trainer.max_steps > 0:
                return int(self.trainer.max_steps)
            raise ValueError(
                "cannot size the lr schedule: the data stream has no length and trainer.max_steps is unset; "
                "set model.scheduler_total_steps or trainer.max_steps"
            )
        return int(est)
