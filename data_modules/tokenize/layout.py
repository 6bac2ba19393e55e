"""The token layout: how a cell becomes (gene, value) tokens, shared by the data side and the model.

One frozen dataclass, one config node (``layout:`` in ``configs/train.yaml``). The tokenizer, the
AnnData path, the corpus stream, the model constructor and the official-checkpoint mapping all take
it, so the defaults below are the only place they are written.

Value styles:
  continuous: the bin index as a float through an MLP value encoder (the paper's pretraining).
  category: the bin index as an embedding id; ``pad_category`` at pads and ``<cls>``,
    ``mask_category`` at hidden (MLM-masked / generative-unknown) positions.
  scaling: the gene embedding scaled by the value (no value encoder).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from data_modules.config import dataclass_from_any
from data_modules.errors import UserInputError

VALUE_STYLES = ("continuous", "category", "scaling")
# fields a trained model depends on: a checkpoint and its data must agree on these
# (max_seq_len is not one: the model has no positional encoding)
MODEL_FIELDS = ("n_bins", "value_style", "pad_value", "mask_value")


@dataclass(frozen=True)
class TokenLayout:
    """How a cell becomes tokens; the data modules and the model read the same one (see the module docstring).

    Parameters
    ----------
    max_seq_len : int
        Tokens per cell including ``<cls>`` (1,201: 1,200 genes + ``<cls>``); longer cells keep a random subset.
    n_bins : int
        Expression bins, bin 0 = not expressed (>= 3).
    value_style : str
        ``continuous`` (bin as a float through the value encoder), ``category`` (bin as an embedding id) or
        ``scaling`` (the gene embedding scaled by the value).
    pad_value : float
        Input value at ``<pad>`` (and at ``<cls>`` in pretraining).
    mask_value : float
        Input value at MLM-masked positions.
    """

    max_seq_len: int = 1201  # tokens per cell INCLUDING <cls>: 1,200 genes + <cls>
    n_bins: int = 51  # expression bins (bin 0 = not expressed)
    value_style: str = "continuous"  # continuous | category | scaling
    pad_value: float = -2.0  # input value at <pad> (and <cls> in pretraining)
    mask_value: float = -1.0  # input value at MLM-masked positions

    def __post_init__(self):
        if self.value_style not in VALUE_STYLES:
            raise ValueError(f"layout.value_style must be one of {VALUE_STYLES}, got {self.value_style!r}")
        if int(self.max_seq_len) < 2:
            raise ValueError(f"layout.max_seq_len counts <cls> and must be >= 2, got {self.max_seq_len}")
        if int(self.n_bins) < 3:
            raise ValueError(f"layout.n_bins must be >= 3, got {self.n_bins}")
        object.__setattr__(self, "max_seq_len", int(self.max_seq_len))
        object.__setattr__(self, "n_bins", int(self.n_bins))
        object.__setattr__(self, "pad_value", float(self.pad_value))
        object.__setattr__(self, "mask_value", float(self.mask_value))

    @classmethod
    def from_any(cls, cfg: TokenLayout | dict | Any | None) -> TokenLayout:
        """A TokenLayout from an instance, a dict, a DictConfig or None (the defaults)."""
        return dataclass_from_any(cls, cfg, "layout")

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> TokenLayout:
        return TokenLayout(**{**self.to_dict(), **changes})

    # derived values (computed here and nowhere else) ------------------------------------------
    @property
    def max_genes(self) -> int:
        """Genes per cell: ``max_seq_len`` minus the ``<cls>`` token."""
        return self.max_seq_len - 1

    @property
    def pad_category(self) -> int:
        """Category id at <pad> and <cls> (value_style="category")."""
        return self.n_bins

    @property
    def mask_category(self) -> int:
        """Category id at hidden positions (value_style="category")."""
        return self.n_bins + 1

    @property
    def n_categories(self) -> int:
        """Rows of the category value embedding: the bins, pad and mask."""
        return self.n_bins + 2

    @property
    def input_pad(self) -> float:
        """What a <pad> (or an unread, generative-unknown) position holds in the model input."""
        return float(self.pad_category) if self.value_style == "category" else self.pad_value

    @property
    def input_mask(self) -> float:
        """What an MLM-masked position holds in the model input."""
        return float(self.mask_category) if self.value_style == "category" else self.mask_value

    # checks ---------------------------------------------------------------------------------
    def model_mismatch(self, other: TokenLayout) -> dict[str, tuple]:
        """``{field: (mine, other's)}`` for the fields a trained model depends on that differ."""
        return {f: (getattr(self, f), getattr(other, f)) for f in MODEL_FIELDS if getattr(self, f) != getattr(other, f)}

    def check_compatible(self, data_layout: TokenLayout, model_source: str = "the model") -> None:
        """Refuse data whose layout differs from this (a model's) layout on a field the model depends on."""
        diff = self.model_mismatch(data_layout)
        if diff:
            details = "; ".join(f"{k}: model {a!r}, data {b!r}" for k, (a, b) in diff.items())
            fixes = " ".join(f"layout.{k}={a}" for k, (a, _) in diff.items())
            raise UserInputError(
                f"token layout of {model_source} and of the data differ ({details}). "
                f"Set the data's layout to the model's ({fixes}) or train a new model."
            )


LAYOUT_FIELDS = tuple(f.name for f in fields(TokenLayout))
