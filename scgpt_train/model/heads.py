"""Output heads: expression decoder, MVC/GEPC, classifier, adversarial discriminator, ECS."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mlp3(d_in: int, d_model: int) -> nn.Sequential:
    """Linear(d_in, d) - LeakyReLU - Linear(d, d) - LeakyReLU - Linear(d, 1)."""
    return nn.Sequential(
        nn.Linear(d_in, d_model), nn.LeakyReLU(), nn.Linear(d_model, d_model), nn.LeakyReLU(), nn.Linear(d_model, 1)
    )


class ExprDecoder(nn.Module):
    """Per-token value regression; optional twin MLP giving P(value > 0)."""

    def __init__(self, d_in: int, d_model: int, explicit_zero_prob: bool = False):
        super().__init__()
        self.fc = _mlp3(d_in, d_model)
        self.zero_logit = _mlp3(d_in, d_model) if explicit_zero_prob else None

    def forward(self, h) -> dict:  # h: (B, L, d_in)
        out = {"pred": self.fc(h).squeeze(-1)}  # (B, L)
        if self.zero_logit is not None:
            out["zero_probs"] = torch.sigmoid(self.zero_logit(h).squeeze(-1))
        return out


class AffineExprDecoder(nn.Module):
    """Perturbation decoder: pred = coeff(h) * input_value + bias(h)."""

    def __init__(self, d_in: int, d_model: int):
        super().__init__()
        self.coeff_decoder = ExprDecoder(d_in, d_model)
        self.bias_decoder = ExprDecoder(d_in, d_model)

    def forward(self, h, values) -> dict:  # h: (B, L, d_in); values: (B, L) input values
        coeff = self.coeff_decoder(h)["pred"]  # (B, L)
        bias = self.bias_decoder(h)["pred"]
        return {"pred": coeff * values + bias, "coeff": coeff, "bias": bias}


class MVCDecoder(nn.Module):
    """GEPC "inner product" decoder: pred_g = (W sigmoid(Q gene_emb_g)) . cell_emb."""

    def __init__(self, d_gene: int, d_cell: int, explicit_zero_prob: bool = False):
        super().__init__()
        self.gene2query = nn.Linear(d_gene, d_gene)
        self.W = nn.Linear(d_gene, d_cell, bias=False)
        self.W_zero_logit = nn.Linear(d_gene, d_cell) if explicit_zero_prob else None

    def forward(self, cell_emb, gene_embs, token_cell=None) -> dict:
        """cell_emb (B, d_cell); gene_embs (B, L, d_gene) -> pred (B, L).

        Packed batches: gene_embs (1, T, d_gene) and ``token_cell`` (T,), each token's cell -> pred (1, T).
        """
        query = torch.sigmoid(self.gene2query(gene_embs))  # (B, L, d_gene)
        if token_cell is not None:
            cell = cell_emb[token_cell][None]  # (1, T, d_cell): each token's own cell
            out = {"pred": (self.W(query) * cell).sum(-1)}
            if self.W_zero_logit is not None:
                out["zero_probs"] = torch.sigmoid((self.W_zero_logit(query) * cell).sum(-1))
            return out
        cell = cell_emb.unsqueeze(2)  # (B, d_cell, 1)
        out = {"pred": torch.bmm(self.W(query), cell).squeeze(2)}
        if self.W_zero_logit is not None:
            out["zero_probs"] = torch.sigmoid(torch.bmm(self.W_zero_logit(query), cell).squeeze(2))
        return out


class MLPClassifier(nn.Module):
    """(n_layers - 1) x [Linear, activation, LayerNorm] -> Linear(d, n_out)."""

    def __init__(self, d_model: int, n_out: int, n_layers: int = 3, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(n_layers - 1):
            blocks += [nn.Linear(d_model, d_model), activation(), nn.LayerNorm(d_model)]
        self.hidden = nn.Sequential(*blocks)
        self.out_layer = nn.Linear(d_model, n_out)

    def forward(self, x):  # (B, d) -> (B, n_out)
        return self.out_layer(self.hidden(x))


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambd: float):
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lambd * grad, None


def grad_reverse(x, lambd: float = 1.0):
    """Identity forward, gradient multiplied by -lambd backward."""
    return _GradReverse.apply(x, lambd)


class AdversarialDiscriminator(MLPClassifier):
    """Batch discriminator behind a gradient-reversal layer (DAR)."""

    def __init__(self, d_model: int, n_batches: int, n_layers: int = 3, lambd: float = 1.0):
        super().__init__(d_model, n_batches, n_layers, activation=nn.LeakyReLU)
        self.lambd = lambd

    def forward(self, x):
        return super().forward(grad_reverse(x, self.lambd))


def ecs_loss(cell_emb, threshold: float):
    """Elastic cell similarity: mean(1 - (relu(cos) - threshold)^2), diagonal zeroed."""
    c = F.normalize(cell_emb, p=2, dim=1)
    cos = c @ c.t()  # (B, B)
    cos = cos.masked_fill(torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device), 0.0)
    return torch.mean(1 - (F.relu(cos) - threshold) ** 2)
