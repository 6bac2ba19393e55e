"""Training objectives: each maps (model, batch, outputs, step) to named, unweighted loss terms.

The training module optimizes :func:`total_loss`: ``objective.weight * term`` summed over every term of every
configured objective (``name`` is the key an objective's terms are logged under when none is given).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from data_modules.batch import Batch
from scgpt_train.model.heads import ecs_loss

__all__ = [
    "CLSObjective",
    "DARObjective",
    "ECSObjective",
    "ExpressionMSEObjective",
    "GenerativeObjective",
    "MLMObjective",
    "Objective",
    "PerturbationMSEObjective",
    "ZeroProbObjective",
    "masked_mse",
    "masked_bernoulli_nll",
    "total_loss",
]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over masked positions of (pred - target)^2 / number of masked positions."""
    m = mask.to(pred.dtype)
    return ((pred - target.to(pred.dtype)) ** 2 * m).sum() / m.sum().clamp(min=1.0)


def masked_bernoulli_nll(
    prob_nonzero: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7
) -> torch.Tensor:
    """Bernoulli NLL of ``target > 0`` under P(non-zero) = ``prob_nonzero`` at masked positions."""
    p = prob_nonzero.clamp(eps, 1 - eps)
    is_nonzero = (target > 0).to(p.dtype)
    log_lik = is_nonzero * torch.log(p) + (1 - is_nonzero) * torch.log1p(-p)
    m = mask.to(p.dtype)
    return -(log_lik * m).sum() / m.sum().clamp(min=1.0)


def _require(outputs: dict, key: str, objective: str, hint: str) -> torch.Tensor:
    if key not in outputs:
        raise KeyError(f"{objective} needs model output {key!r}; build the model with {hint}")
    return outputs[key]


def _require_field(batch: Batch, name: str, objective: str) -> torch.Tensor:
    value = getattr(batch, name)
    if value is None:
        raise ValueError(f"{objective} needs batch.{name}; configure the data module to produce it")
    return value


class Objective(nn.Module):
    """Base class. ``weight`` scales the sum of this objective's terms."""

    name = "objective"

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    def forward(self, model, batch: Batch, outputs: dict, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def value_positions(self, batch: Batch) -> torch.Tensor | None:
        """(B, L) bool: where this objective scores predicted expression values against ``target_values`` per gene
        (GEP / MLM); None for objectives that do not (classification, batch terms, perturbation)."""
        return None


class GenerativeObjective(Objective):
    """Generative pretraining: GEP (gene prompt) + GEPC + (after N steps) cell-prompt pass, on unknown genes."""

    name = "generative"

    def __init__(self, weight: float = 1.0, use_gepc: bool = True, cell_prompt_after_steps: int | None = 1000):
        super().__init__(weight)
        self.use_gepc = use_gepc
        self.cell_prompt_after_steps = cell_prompt_after_steps

    def value_positions(self, batch):
        return _require_field(batch, "gen_mask", "GenerativeObjective") & ~batch.pad_mask  # (B, L) unknown genes

    def forward(self, model, batch, outputs, step):
        unknown = self.value_positions(batch)  # (B, L)
        terms = {"gep": masked_mse(outputs["mlm_output"], batch.target_values, unknown)}
        if self.use_gepc:
            mvc = _require(outputs, "mvc_output", "GenerativeObjective(use_gepc=True)", "use_mvc=True")
            terms["gepc"] = masked_mse(mvc, batch.target_values, unknown)
        if self.cell_prompt_after_steps is not None and step >= self.cell_prompt_after_steps:
            prompted = model(**batch.model_inputs(), cell_prompt=outputs["cell_emb"].detach())
            terms["cell_prompt"] = masked_mse(prompted["mlm_output"], batch.target_values, unknown)
        return terms


class MLMObjective(Objective):
    """Masked-value regression on ``batch.mlm_mask`` (+ optional GEPC on the same positions)."""

    name = "mlm"

    def __init__(self, weight: float = 1.0, use_gepc: bool = False):
        super().__init__(weight)
        self.use_gepc = use_gepc

    def value_positions(self, batch):
        return _require_field(batch, "mlm_mask", "MLMObjective") & ~batch.pad_mask  # (B, L)

    def forward(self, model, batch, outputs, step):
        masked = self.value_positions(batch)
        terms = {"mlm": masked_mse(outputs["mlm_output"], batch.target_values, masked)}
        if self.use_gepc:
            mvc = _require(outputs, "mvc_output", "MLMObjective(use_gepc=True)", "use_mvc=True")
            terms["gepc"] = masked_mse(mvc, batch.target_values, masked)
        return terms


def _loss_positions(batch: Batch, positions: str) -> torch.Tensor:
    if positions == "auto":
        positions = "mlm" if batch.mlm_mask is not None else "gen" if batch.gen_mask is not None else "all"
    if positions == "mlm":
        return _require_field(batch, "mlm_mask", "ZeroProbObjective(positions='mlm')") & ~batch.pad_mask
    if positions == "gen":
        return _require_field(batch, "gen_mask", "ZeroProbObjective(positions='gen')") & ~batch.pad_mask
    if positions == "all":
        return ~batch.pad_mask
    raise ValueError(f"positions must be 'auto', 'mlm', 'gen' or 'all', got {positions!r}")


class ZeroProbObjective(Objective):
    """Bernoulli NLL of the explicit zero-probability heads (expression decoder, and MVC when present)."""

    name = "zero_prob"

    def __init__(self, weight: float = 1.0, positions: str = "auto", use_mvc: bool = True):
        super().__init__(weight)
        self.positions = positions
        self.use_mvc = use_mvc

    def forward(self, model, batch, outputs, step):
        where = _loss_positions(batch, self.positions)
        probs = _require(outputs, "mlm_zero_probs", "ZeroProbObjective", "explicit_zero_prob=True")
        terms = {"zero_prob": masked_bernoulli_nll(probs, batch.target_values, where)}
        if self.use_mvc and "mvc_zero_probs" in outputs:
            terms["mvc_zero_prob"] = masked_bernoulli_nll(outputs["mvc_zero_probs"], batch.target_values, where)
        return terms


class CLSObjective(Objective):
    """Cell-type cross-entropy on ``cls_output``; labels -1 are ignored."""

    name = "cls"

    def forward(self, model, batch, outputs, step):
        logits = _require(outputs, "cls_output", "CLSObjective", "n_cls > 0")
        labels = _require_field(batch, "labels", "CLSObjective")
        return {"cls": F.cross_entropy(logits, labels, ignore_index=-1)}


class ECSObjective(Objective):
    """Elastic cell similarity on ``cell_emb`` (threshold None = the model's ``ecs_threshold``)."""

    name = "ecs"

    def __init__(self, weight: float = 10.0, threshold: float | None = None):
        super().__init__(weight)
        self.threshold = threshold

    def forward(self, model, batch, outputs, step):
        threshold = model.ecs_threshold if self.threshold is None else self.threshold
        return {"ecs": ecs_loss(outputs["cell_emb"], threshold)}


class DARObjective(Objective):
    """Domain adaptation by reverse back-propagation: batch cross-entropy on ``dab_output``."""

    name = "dar"

    def forward(self, model, batch, outputs, step):
        logits = _require(outputs, "dab_output", "DARObjective", "do_dab=True and num_batch_labels")
        return {"dar": F.cross_entropy(logits, _require_field(batch, "batch_labels", "DARObjective"))}


class ExpressionMSEObjective(Objective):
    """MSE of the expression decoder on every non-pad, non-<cls> gene (perturbation prediction)."""

    name = "expr_mse"

    def forward(self, model, batch, outputs, step):
        where = ~batch.pad_mask
        if batch.packed:  # every cell's <cls> (its first token in the stream)
            where[0, batch.cu_seqlens[:-1].long()] = False
        else:
            where[:, 0] = False
        return {"expr_mse": masked_mse(outputs["mlm_output"], batch.target_values, where)}


class PerturbationMSEObjective(Objective):
    """MSE of the expression decoder on EVERY non-pad token, the first one included: perturbation batches have no
    ``<cls>`` (the official ``TransformerGenerator`` reads genes only), and the tutorial's loss is the masked MSE
    over all genes of the perturbed cell (``target_values``)."""

    name = "perturb_mse"

    def forward(self, model, batch, outputs, step):
        return {"perturb_mse": masked_mse(outputs["mlm_output"], batch.target_values, ~batch.pad_mask)}


def total_loss(
    objectives: Mapping[str, Objective], model, batch: Batch, outputs: dict, step: int
) -> dict[str, torch.Tensor]:
    """Every unweighted term as ``"<objective name>/<term>"``, plus ``"loss"``: the weighted sum that is optimized.

    The one place the objectives' losses are combined (the Lightning module trains on this)."""
    terms: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=batch.gene_ids.device)
    for name, objective in objectives.items():
        for term, value in objective(model, batch, outputs, step).items():
            terms[f"{name}/{term}"] = value
            total = total + objective.weight * value
    terms["loss"] = total
    return terms
