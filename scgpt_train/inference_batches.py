"""The one batched embedding pass of every caller (``scripts/embed.py``, ``api.embed``, reference mapping, atlas mode):
cells tokenized in seeded groups, sorted by length, packed into batches capped by a token budget, the model in
``torch.inference_mode`` at the chosen precision (``scgpt_train/precision.py``), rows put back in the input's order.

Tokens. Cells ``[64 k, 64 k + 64)`` of the input (its row order) share one seeded random stream,
``default_rng([seed, 64 k, n])`` (tie-breaking in binning, gene sampling of cells longer than the layout): a cell's
tokens depend on the seed and its group, never on the batch size, the sorting or which other cells are embedded.
(These are the tokens the fine-tuning data module gives the same cells in batches of 64: ``CellCollate``.)

Batches. ``SORT_WINDOW`` cells at a time are tokenized, ordered by length (longest first) and cut into batches of at
most ``max_tokens`` tokens (packed: the cells' tokens; padded: cells x the batch's longest) and at most ``max_cells``
cells. ``max_tokens="auto"`` (the default) is ``CPU_MAX_TOKENS`` on a CPU and ``DEFAULT_MAX_TOKENS`` on a GPU: on a
CPU a smaller stream is faster, because its activations stay under glibc's largest mmap threshold (32 MiB) and are
reused from the heap instead of being mapped, page-faulted and unmapped each batch (51M model, bf16, 64 real cells,
2 idle cores: 4,096 tokens 7.6-8.2 s with ~0 minor page faults, 16,384 tokens 9.3-9.5 s with ~800,000; fp32 11.1-12.6
s vs 14.1-16.9 s). ``layout="packed"`` (the default) runs each batch as one (1, T) stream (``Tokenizer.pack`` /
``PackedCells``: no cell is padded); ``"padded"`` pads each batch to its longest cell (with ``sort=False`` and
``max_cells=64``: the official ``get_batch_cell_embeddings`` way, ``scripts/bench_embed.py``'s reference). A ScGPT
runs its encoder and cell pooling only (the expression / MVC decoders are not needed for an embedding), plus the
classifier when it has one.

Tokenization runs in the calling process, not in loader workers: making all batches of 559 real cells took 0.13 s
against 70-84 s for the demo model's pass over them (``scripts/bench_embed.py``, one thread, measured under load),
so a worker process has next to nothing to take off the model's cores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from data_modules.batch import Batch
from data_modules.store.reader import CellBlock
from data_modules.tokenize import Tokenizer, tokenize_with_zeros
from data_modules.tokenize.tokenizer import EncodedCells
from scgpt_train.precision import Precision, resolve_precision

log = logging.getLogger(__name__)

SEED_GROUP = 64  # cells [64 k, 64 k + 64) share one seeded random stream
SORT_WINDOW = 4096  # cells tokenized and sorted by length at a time (a multiple of SEED_GROUP)
DEFAULT_MAX_TOKENS = 16_384  # tokens per batch on a GPU
CPU_MAX_TOKENS = 4_096  # tokens per batch on a CPU (module doc)
LAYOUTS = ("packed", "padded")


def default_max_tokens(device: torch.device | str) -> int:
    """The token budget ``max_tokens="auto"`` means on ``device``: ``CPU_MAX_TOKENS`` on a CPU, else
    ``DEFAULT_MAX_TOKENS``."""
    return CPU_MAX_TOKENS if torch.device(device).type == "cpu" else DEFAULT_MAX_TOKENS


@dataclass(frozen=True)
class BatchOptions:
    """How cells are put into batches: ``max_tokens`` per batch (``"auto"``: :func:`default_max_tokens` of the
    device; None: no token cap), at most ``max_cells`` cells (None: no cap), ``layout`` packed | padded, ``sort`` by
    length (False: the input's order, as the official embedding runs)."""

    max_tokens: int | str | None = "auto"
    max_cells: int | None = None
    layout: str = "packed"
    sort: bool = True

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if isinstance(self.max_tokens, str) and self.max_tokens != "auto":
            raise ValueError(f"max_tokens must be a positive number, 'auto' or None, got {self.max_tokens!r}")
        token_cap = None if self.max_tokens == "auto" else self.max_tokens
        for name, value in (("max_tokens", token_cap), ("max_cells", self.max_cells)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be a positive number, got {value}")
        if self.max_tokens is None and self.max_cells is None:
            raise ValueError("give max_tokens, max_cells or both: a batch needs a limit")

    def on(self, device: torch.device | str) -> BatchOptions:
        """These options with ``max_tokens="auto"`` replaced by the budget for ``device``."""
        if self.max_tokens != "auto":
            return self
        return replace(self, max_tokens=default_max_tokens(device))


class CellTokens:
    """The cells of one input, tokenized for inference in seeded groups (module doc).

    ``read(lo, hi)``: a :class:`CellBlock` of cells ``lo..hi`` of the input (gene ids in the model's vocabulary,
    float32 values). ``dense_genes``: tokenize with every one of these genes (zeros as bin 0; ``include_zero_genes``)
    instead of the cell's expressed genes; they must be sorted ascending and hold every id ``read`` returns.
    ``first_cell``: the input row of cell 0 when these cells are a part of a larger input (a multiple of
    ``SEED_GROUP``): their seeds are the ones of their rows in the whole input.
    """

    def __init__(
        self,
        read: Callable[[int, int], CellBlock],
        n_cells: int,
        tokenizer: Tokenizer,
        seed: int = 0,
        dense_genes: np.ndarray | None = None,
        first_cell: int = 0,
    ):
        self.read, self.n_cells, self.tokenizer, self.seed = read, int(n_cells), tokenizer, int(seed)
        if first_cell % SEED_GROUP:
            raise ValueError(f"first_cell {first_cell} is not a multiple of the seed group ({SEED_GROUP} cells)")
        self.first_cell = int(first_cell)
        self.dense_genes = None if dense_genes is None else np.asarray(dense_genes, dtype=np.int64)
        if self.dense_genes is not None and np.any(np.diff(self.dense_genes) <= 0):
            raise ValueError("dense_genes must be sorted ascending without repeats")

    def encode(self, lo: int, hi: int) -> EncodedCells:
        """The tokens of cells ``lo..hi`` (``lo`` a multiple of ``SEED_GROUP``), ``cell_index`` = their rows."""
        if lo % SEED_GROUP:
            raise ValueError(f"cells are tokenized in groups of {SEED_GROUP}: start {lo} is not a multiple of it")
        block = self.read(lo, hi)
        parts = []
        for g0 in range(lo, hi, SEED_GROUP):
            g1 = min(g0 + SEED_GROUP, hi)
            a, b = int(block.indptr[g0 - lo]), int(block.indptr[g1 - lo])
            group = CellBlock(
                indptr=block.indptr[g0 - lo : g1 - lo + 1] - a,
                gene_ids=block.gene_ids[a:b],
                counts=block.counts[a:b],
                cell_index=np.arange(g0, g1, dtype=np.int64),
            )
            rng = np.random.default_rng([self.seed, self.first_cell + g0, g1 - g0])
            parts.append(self.tokenizer.encode(group, rng) if self.dense_genes is None else self._dense(group, rng))
        return concat_encoded(parts)

    def _dense(self, group: CellBlock, rng: np.random.Generator) -> EncodedCells:
        """Every gene of ``dense_genes`` for each cell (``tokenize_with_zeros``), as compact tokens."""
        import scipy.sparse as sp

        cols = np.searchsorted(self.dense_genes, group.gene_ids)
        x = sp.csr_matrix((group.counts, cols, group.indptr), shape=(len(group), len(self.dense_genes)))
        tok = self.tokenizer
        padded = tokenize_with_zeros(x, self.dense_genes, tok.config, tok.pad_id, tok.cls_id, rng)
        n, L = padded.gene_ids.shape
        return EncodedCells(
            offsets=np.arange(n + 1, dtype=np.int64) * (L - 1),
            genes=padded.gene_ids[:, 1:].numpy().ravel().astype(group.gene_ids.dtype),
            bins=padded.target_values[:, 1:].numpy().ravel().astype(tok._bin_dtype),
            flags=np.zeros(n * (L - 1), dtype=np.uint8),
            gen_ratio=None,
            cell_index=group.cell_index,
            obs={},
        )


def concat_encoded(parts: list[EncodedCells]) -> EncodedCells:
    """One :class:`EncodedCells` of ``parts`` one after the other (no generative split, no obs)."""
    if len(parts) == 1:
        return parts[0]
    shifts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
    offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True)])
    return EncodedCells(
        offsets=offsets,
        genes=np.concatenate([p.genes for p in parts]),
        bins=np.concatenate([p.bins for p in parts]),
        flags=np.concatenate([p.flags for p in parts]),
        gen_ratio=None,
        cell_index=np.concatenate([p.cell_index for p in parts]),
        obs={},
    )


def take_encoded(enc: EncodedCells, cells: np.ndarray) -> EncodedCells:
    """The cells at positions ``cells`` of ``enc``, in that order."""
    starts = enc.offsets[cells]
    lengths = enc.offsets[cells + 1] - starts
    offsets = np.zeros(len(cells) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    at = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])  # (T,) source token of each token
    return EncodedCells(
        offsets=offsets,
        genes=enc.genes[at],
        bins=enc.bins[at],
        flags=enc.flags[at],
        gen_ratio=enc.gen_ratio,
        cell_index=enc.cell_index[cells],
        obs={k: v[cells] for k, v in enc.obs.items()},
    )


def plan_batches(lengths: np.ndarray, options: BatchOptions) -> list[np.ndarray]:
    """Positions of the cells of each batch: by length, longest first (``options.sort``), else in the given order;
    a batch holds at most ``max_tokens`` tokens (packed: the sum of its cells' lengths; padded: cells x its longest
    cell; a longer cell alone is a batch of its own) and ``max_cells`` cells."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable") if options.sort else np.arange(len(lengths))
    if options.max_tokens == "auto":
        raise ValueError("max_tokens='auto' depends on the device: plan with BatchOptions.on(device)")
    budget = options.max_tokens or np.iinfo(np.int64).max
    cap = options.max_cells or len(lengths) or 1
    packed = options.layout == "packed"
    batches, start, tokens, longest = [], 0, 0, 0
    for i, cell in enumerate(order):
        n = int(lengths[cell])
        t, lg = (tokens + n, max(longest, n)) if i > start else (n, n)
        need = t if packed else lg * (i - start + 1)
        if i > start and (need > budget or i - start >= cap):
            batches.append(order[start:i])
            start, t, lg = i, n, n
        tokens, longest = t, lg
    if len(order):
        batches.append(order[start:])
    return batches


def cell_embeddings(model: nn.Module, batch: Batch, with_classifier: bool = False):
    """(B, d) cell embeddings of a ScGPT for a padded or packed batch: its embedding, encoder and cell pooling,
    without the decoders (what ``model(**batch.model_inputs())["cell_emb"]`` returns, at less cost); with
    ``with_classifier`` also the classifier's logits (B, C)."""
    from scgpt_train.model import ScGPT
    from scgpt_train.model.attention import PackedCells

    if not isinstance(model, ScGPT):  # another module: its own forward
        out = model(**batch.model_inputs())
        return (out["cell_emb"], out.get("cls_output")) if with_classifier else out["cell_emb"]
    if model.use_batch_labels and batch.batch_labels is None:
        raise ValueError("this model uses batch labels: pass batch_labels (B,) int64")
    packed = PackedCells(batch.cu_seqlens, batch.token_cell, batch.max_seqlen) if batch.packed else None
    x, _ = model.embed(
        batch.gene_ids, batch.values, batch.pad_mask, None, batch.batch_labels, batch.condition_ids,
        batch.modality_ids, None, packed,
    )  # fmt: skip
    h = model.encode(x, batch.pad_mask, None, packed)
    emb = model.cell_embedding(h, batch.values, batch.pad_mask, None, packed)
    if not with_classifier:
        return emb
    return emb, None if model.cls_decoder is None else model.cls_decoder(emb)


def cell_outputs(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Per cell: ``cell_emb`` (B, d) float32 and, with a classifier, ``probs`` (B, C) / ``pred`` (B,)."""
    if hasattr(model, "predict_step"):  # the Lightning module
        out = model.predict_step(batch)
        out.pop("cell_index", None)
        return out
    emb, logits = cell_embeddings(model, batch, with_classifier=True)
    res = {"cell_emb": emb.float()}
    if logits is not None:
        probs = logits.float().softmax(-1)
        res["probs"], res["pred"] = probs, probs.argmax(-1)
    return res


def batches_of(
    cells: CellTokens, options: BatchOptions, wanted: np.ndarray | None = None, batch_labels: np.ndarray | None = None
) -> Iterator[Batch]:
    """The batches of every wanted cell (``wanted`` (N,) bool; None: all), window by window (module doc)."""
    tok = cells.tokenizer
    for lo in range(0, cells.n_cells, SORT_WINDOW):
        hi = min(lo + SORT_WINDOW, cells.n_cells)
        keep = np.arange(hi - lo) if wanted is None else np.flatnonzero(wanted[lo:hi])
        if len(keep) == 0:
            continue
        enc = cells.encode(lo, hi)
        lengths = np.diff(enc.offsets)[keep] + 1  # <cls> included
        for part in plan_batches(lengths, options):
            sub = take_encoded(enc, keep[part])
            batch = tok.pack(sub) if options.layout == "packed" else tok.pad(sub)
            if batch_labels is not None:
                batch.batch_labels = torch.from_numpy(np.asarray(batch_labels[sub.cell_index], dtype=np.int64))
            yield batch


def embed_cells(
    model: nn.Module,
    cells: CellTokens,
    *,
    options: BatchOptions | None = None,
    precision: str | Precision = "auto",
    device: torch.device | str | None = None,
    wanted: np.ndarray | None = None,
    batch_labels: np.ndarray | None = None,
    progress: bool = True,
    description: str = "embedding",
) -> dict[str, np.ndarray]:
    """Every wanted cell of ``cells`` through ``model`` (a ScGPT or the Lightning module) in eval and inference mode
    at ``precision``; rows in the input's order: ``cell_emb`` (N, d) float32, and ``probs`` / ``pred`` with a
    classifier. Cells not wanted stay NaN / -1."""
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else next(model.parameters()).device
    options = (options or BatchOptions()).on(device)
    prec = precision if isinstance(precision, Precision) else resolve_precision(precision, device)
    n_cells = cells.n_cells
    total = n_cells if wanted is None else int(np.count_nonzero(wanted))
    was_training = model.training
    model.eval()
    result: dict[str, np.ndarray] = {}
    bar = tqdm(total=total, desc=description, disable=not progress, unit="cell")
    try:
        with torch.inference_mode(), prec.autocast(device):
            for batch in batches_of(cells, options, wanted, batch_labels):
                rows = batch.cell_index.numpy()
                store_rows(result, cell_outputs(model, batch.to(device)), rows, n_cells)
                bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return result


def store_rows(result: dict[str, np.ndarray], out: dict[str, torch.Tensor], rows: np.ndarray, n_cells: int) -> None:
    """Write one batch's outputs (``out``: name -> (b, ...) tensor) into ``result``'s arrays of ``n_cells`` rows at
    ``rows``; an array is made on its first batch, NaN (floats) / -1 (integers) where no batch writes."""
    for key, value in out.items():
        v = value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
        if key not in result:
            fill = np.nan if v.dtype.kind == "f" else -1
            result[key] = np.full((n_cells, *v.shape[1:]), fill, dtype=v.dtype)
        result[key][rows] = v


def predict_cells(
    model: nn.Module,
    loader,
    n_cells: int,
    device: torch.device | str | None = None,
    progress: bool = True,
    description: str = "embedding",
) -> dict[str, np.ndarray]:
    """Run ``model`` (a ScGPT or the Lightning module) in eval and inference mode over ``loader`` (any iterable of
    ``Batch`` es); rows ordered by ``batch.cell_index`` into arrays of ``n_cells``: ``cell_emb`` (N, d), and
    ``probs`` / ``pred`` with a classifier. Cells the loader never yields stay NaN / -1. Embedding an input's cells
    goes through :func:`embed_cells` instead (sorted, packed, token budget, precision)."""
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    result: dict[str, np.ndarray] = {}
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc=description, disable=not progress, unit="batch"):
                rows = batch.cell_index.cpu().numpy()
                store_rows(result, cell_outputs(model, batch.to(device)), rows, n_cells)
    finally:
        model.train(was_training)
    return result


def anndata_cells(dm, seed: int = 0) -> CellTokens:
    """The cells of a set-up ``AnnDataModule`` (its preprocessed rows over the model's genes, in the file's order)
    as :class:`CellTokens` for :func:`embed_cells`, tokenized by its tokenizer without masking."""
    from data_modules.store.reader import CellBlock
    from data_modules.tokenize import Tokenizer

    def read(lo: int, hi: int) -> CellBlock:
        x = dm.store.rows(np.arange(lo, hi))  # (m, G) float32 CSR, sorted indices
        return CellBlock(
            indptr=x.indptr.astype(np.int64),
            gene_ids=dm.gene_ids[x.indices].astype(np.int32),
            counts=x.data.astype(np.float32),
            cell_index=np.arange(lo, hi, dtype=np.int64),
        )

    tokenizer = Tokenizer(dm.tokenizer_cfg.replace(mlm_prob=None), dm.pad_id, dm.cls_id)
    dense = np.asarray(dm.gene_ids, dtype=np.int64) if dm.include_zero_genes else None
    return CellTokens(read, len(dm.split), tokenizer, seed=seed, dense_genes=dense)
