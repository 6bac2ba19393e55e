"""Zero-shot reference mapping: embed a labelled reference and a query with one checkpoint, label every query
cell by a k-nearest-neighbour vote over the reference, and score it next to two simple baselines.

Embeddings go through the embedding code path of ``scripts/embed.py`` (:mod:`scgpt_train.tasks.embedding`):
the same input checks (:func:`check_input_layout`, :func:`unmapped_cells`), the same
:class:`~data_modules.anndata_module.AnnDataModule` (values as stored, the checkpoint's token layout, seeded
tie-breaking in binning and seeded gene sampling: ``default_rng([seed, first cell, batch size])`` per batch),
:func:`predict_cells`, then L2 normalization. A query embedded here equals ``embed.py --seed S`` on the same
file with the same ``--batch-size``.

kNN vote: the ``k`` (default 10) nearest reference cells by Euclidean distance between L2-normalized
embeddings (equivalently cosine); the label with most votes wins, ties go to the label whose voters are closer
in total (then to the first label). Reference cells without a label (NaN, or the corpus' "unknown") are not
indexed. Search runs on faiss (``faiss-cpu``) when it is importable, else on scikit-learn's exact brute-force
``NearestNeighbors``:

- ``flat``: exact search (``IndexFlatL2``); chosen for references of up to ``FLAT_MAX_CELLS`` (100,000) cells;
- ``ivfpq``: ``IndexIVFPQ`` for larger ones: ``nlist = clip(4 sqrt(n), 16, 4096)`` inverted lists trained by
  seeded k-means on a sample of at most ``IVF_TRAIN_MAX`` embeddings, ``m`` sub-quantizers of 8 bits (the
  largest divisor of d <= 64 leaving >= 8 dimensions each), ``nprobe = min(nlist, 64)``; memory ~ n (m + 8)
  bytes. Without faiss large references are searched exactly (n x d float32 in memory) with a warning.

Atlas mode: a reference given as a corpus directory (``scripts/build_corpus.py``) is embedded streaming, in
chunks of ``chunk_cells`` cells read with ``Corpus.read_cells`` (sparse rows only, never a dense cells x genes
matrix), with one progress bar. Each finished chunk is written atomically to ``<index dir>/chunks/`` and
recorded in ``<index dir>/journal.json``; a rerun of the same command skips finished chunks, and once the
index is built and saved a rerun reloads it. Peak memory: the model + one read block + one chunk of
embeddings + the index (flat: n x d x 4 bytes; IVF-PQ: its training sample + n (m + 8) bytes).

Baselines, on the same reference / query split: HVG+PCA kNN (log-normalized values of the genes the model
reads, ``n_hvg`` highly variable genes (scanpy "seurat" flavour) and a ``n_pcs``-component PCA fitted on the
reference, the query projected; the same k-NN vote) and L1 logistic regression (liblinear, C by stratified CV)
on those HVGs. With a corpus reference they use a seeded sample of at most ``baseline_max_cells`` reference
cells (contiguous runs of 64 cells at random offsets), so their memory stays bounded too.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from data_modules.atomic import atomic_path, write_json_atomic
from data_modules.vocab import GeneVocab
from scgpt_train.tasks.embedding import EmbedInputError, check_input_layout, predict_cells, unmapped_cells

log = logging.getLogger(__name__)

DEFAULT_K = 10
FLAT_MAX_CELLS = 100_000  # "auto": exact flat index up to this many reference cells, IVF-PQ above
IVF_TRAIN_MAX = 200_000  # embeddings sampled to train the IVF-PQ quantizers
DEFAULT_CHUNK_CELLS = 16_384  # atlas mode: cells per journalled chunk of embeddings
READ_BLOCK_CELLS = 2_048  # atlas mode: cells read from the corpus at once
BASELINE_MAX_CELLS = 20_000
BASELINES = ("hvg_pca_knn", "l1_lr")
UNASSIGNED = "unassigned"  # prediction of a query cell the model cannot read (no gene of the vocabulary)
CORPUS_UNKNOWN = "unknown"  # a corpus' label of a cell whose dataset lacks the column (store/format.py)
METHOD_NAMES = {"scgpt_knn": "scGPT zero-shot kNN", "hvg_pca_knn": "HVG + PCA kNN", "l1_lr": "L1 logistic regression"}


class ReferenceMapError(EmbedInputError):
    """A reference / query / option that reference mapping cannot use; the message names the file and key."""


# ---------------------------------------------------------------------------------------
# embeddings of an h5ad, in memory (the embed.py path without the file write)


@dataclass
class EmbeddedCells:
    """Cell embeddings of one h5ad and the values the model read."""

    path: str
    emb: np.ndarray  # (N, d) float32, L2-normalized; NaN rows for cells the model cannot read
    unmapped: np.ndarray  # (N,) bool: no expressed gene of the vocabulary
    expression: sp.csr_matrix  # (N, G) values as stored, over the model genes (vocab ids ``gene_ids``)
    gene_ids: np.ndarray  # (G,) int64 vocab id of each expression column
    value_type: dict  # data_modules.value_types report of the file's values
    gene_report: dict = field(default_factory=dict)


def load_model(checkpoint) -> tuple[torch.nn.Module, GeneVocab]:
    """(ScGPT, its vocabulary) of an official directory, an imported .pt or a Lightning .ckpt; refuses models
    that need batch labels (DSBN / batch embedding: not a zero-shot model)."""
    from scgpt_train.checkpoints import load_checkpoint

    if not Path(checkpoint).exists():
        raise ReferenceMapError(f"--checkpoint {checkpoint} does not exist")
    model, vocab = load_checkpoint(checkpoint)
    vocab = GeneVocab(vocab) if vocab else GeneVocab.from_checkpoint(checkpoint)
    cfg = model.config()
    if cfg.get("dsbn") or cfg.get("use_batch_labels"):
        raise ReferenceMapError(
            f"{checkpoint} uses batch labels (DSBN / batch embedding), so its embeddings depend on a batch id the "
            "reference and query do not share; map with a pretrained (zero-shot) checkpoint instead"
        )
    return model, vocab


def embed_adata(
    model,
    vocab: GeneVocab,
    checkpoint,
    path,
    adata=None,
    *,
    batch_size: int = 64,
    max_seq_len: int | None = None,
    gene_column: str | None = None,
    use_raw: bool = False,
    gene_table: str | None = None,
    cls_value: float | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    description: str = "embedding",
) -> EmbeddedCells:
    """Embed every cell of the h5ad ``path`` as ``embed_h5ad`` does (same checks, data module, seeds and
    normalization), returning the embeddings in memory instead of writing a file."""
    from torch.utils.data import DataLoader

    from data_modules.anndata_module import AnnDataModule

    if adata is None:
        adata = read_h5ad_checked(path, "--query")
    check_input_layout(adata, path, gene_column, use_raw, None)
    unmapped = unmapped_cells(adata, path, vocab, gene_column, use_raw, gene_table=gene_table)
    layout = model.layout if max_seq_len is None else model.layout.replace(max_seq_len=max_seq_len)
    dm = AnnDataModule(
        str(path),
        vocab=str(checkpoint),
        layout=layout,
        tokenizer={"cls_value": cls_value},
        preprocess={"gene_column": gene_column, "use_raw": use_raw, "gene_table": gene_table},
        val_fraction=0.0,
        batch_size=batch_size,
        seed=seed,
        model_outputs=(),
    )
    dm.setup()
    n_cells = len(dm.split)
    if n_cells != adata.n_obs:
        raise RuntimeError(f"{path}: the data module holds {n_cells} cells, the file {adata.n_obs}")
    if progress:
        print(f"{Path(path).name}: genes: {dm.gene_report.summary()}")
    mapped = np.flatnonzero(~unmapped)
    if len(mapped) < n_cells:
        msg = (
            f"{n_cells - len(mapped)} of {n_cells} cells of {path} express no gene of the checkpoint's vocabulary "
            f"(e.g. {[str(c) for c in adata.obs_names[unmapped][:5]]}); they get no embedding"
        )
        log.warning(msg)
        if progress:
            print(f"warning: {msg}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loader = dm.loader("all", masked=False, batch_size=batch_size)
    if len(mapped) < n_cells:
        loader = DataLoader(mapped.tolist(), batch_size=batch_size, collate_fn=loader.collate_fn)
    out = predict_cells(model, loader, n_cells, device=device, progress=progress, description=description)
    emb = l2_normalize(out["cell_emb"])
    return EmbeddedCells(
        path=str(path),
        emb=emb,
        unmapped=unmapped,
        expression=dm.expression("all"),
        gene_ids=np.asarray(dm.gene_ids, dtype=np.int64),
        value_type=dict(dm.value_reports[0]) if dm.value_reports else {},
        gene_report={k: v for k, v in dm.gene_report.as_dict().items() if v is not None},
    )


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (NaN rows stay NaN), float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def read_h5ad_checked(path, option: str):
    import anndata as ad

    if not Path(path).is_file():
        raise ReferenceMapError(f"{option} {path} does not exist (or is not a file); point it at an .h5ad file")
    try:
        return ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as e:
        raise ReferenceMapError(f"{option} {path} cannot be read as h5ad ({e}); re-export it") from None


def obs_labels(obs: pd.DataFrame, label_key: str, path, option: str) -> np.ndarray:
    """(N,) object array of labels as str, None where missing; raises naming the file and its columns."""
    if label_key not in obs.columns:
        cols = [str(c) for c in obs.columns]
        raise ReferenceMapError(
            f"{option} {path}: --label-key {label_key!r} is not an obs column (columns: {cols[:20]}"
            f"{' ...' if len(cols) > 20 else ''}); name the column holding the cell types"
        )
    s = obs[label_key]
    out = s.astype(str).to_numpy(dtype=object)
    out[s.isna().to_numpy()] = None
    return out


# ---------------------------------------------------------------------------------------
# the kNN index


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class IndexSpec:
    """What index to build: backend (faiss | sklearn), kind (flat | ivfpq) and the IVF-PQ parameters."""

    backend: str
    kind: str
    d: int
    nlist: int | None = None
    m: int | None = None
    nbits: int = 8
    nprobe: int | None = None
    seed: int = 0

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def pq_subquantizers(d: int) -> int:
    """Largest divisor m of d with m <= 64 and d / m >= 8 (1 when d < 16)."""
    best = 1
    for m in range(1, 65):
        if d % m == 0 and d // m >= 8:
            best = m
    return best


def choose_index(
    n: int, d: int, kind: str = "auto", backend: str = "auto", flat_max: int = FLAT_MAX_CELLS, seed: int = 0
) -> IndexSpec:
    """The index for ``n`` reference embeddings of dimension ``d`` (see the module docstring)."""
    if kind not in ("auto", "flat", "ivfpq"):
        raise ReferenceMapError(f"--index must be auto, flat or ivfpq, got {kind!r}")
    if backend not in ("auto", "faiss", "sklearn"):
        raise ReferenceMapError(f"--knn-backend must be auto, faiss or sklearn, got {backend!r}")
    have_faiss = faiss_available()
    if backend == "faiss" and not have_faiss:
        raise ReferenceMapError("--knn-backend faiss: faiss is not importable here; pip install faiss-cpu")
    if backend == "auto":
        backend = "faiss" if have_faiss else "sklearn"
    if kind == "auto":
        kind = "flat" if n <= flat_max else "ivfpq"
        if kind == "ivfpq" and backend == "sklearn":
            log.warning(
                "%d reference cells: IVF-PQ needs faiss (pip install faiss-cpu), which is not importable; searching "
                "exactly with scikit-learn (n x d float32 in memory)",
                n,
            )
            kind = "flat"
    if kind == "ivfpq" and backend == "sklearn":
        raise ReferenceMapError("--index ivfpq needs faiss (pip install faiss-cpu); use --index flat without it")
    if kind == "flat":
        return IndexSpec(backend, "flat", d, seed=seed)
    nlist = int(np.clip(4 * np.sqrt(n), 16, 4096))
    nlist = max(1, min(nlist, n // 39))  # faiss wants >= 39 training points per list
    n_train = min(n, IVF_TRAIN_MAX)
    nbits = int(np.clip(np.floor(np.log2(max(n_train / 39, 2))), 4, 8))  # 2**nbits centroids per sub-quantizer
    return IndexSpec(
        backend, "ivfpq", d, nlist=nlist, m=pq_subquantizers(d), nbits=nbits, nprobe=min(nlist, 64), seed=seed
    )


class KnnIndex:
    """k-NN search over L2-normalized embeddings; rows are added in chunks, ``labels`` / ``rows`` travel with it.

    ``rows[i]``: the reference cell (h5ad row or corpus cell id) of index row i; ``labels[i]``: its label code.
    """

    INDEX_META = "index.json"

    def __init__(self, spec: IndexSpec):
        self.spec = spec
        self._parts: list[np.ndarray] = []  # sklearn: vectors until finalize()
        self._nn = None
        self._faiss = None
        self.label_names: list[str] = []
        self.labels = np.zeros(0, dtype=np.int32)
        self.rows = np.zeros(0, dtype=np.int64)
        if spec.backend == "faiss":
            import faiss

            if spec.kind == "flat":
                self._faiss = faiss.IndexFlatL2(spec.d)
            else:
                quantizer = faiss.IndexFlatL2(spec.d)
                index = faiss.IndexIVFPQ(quantizer, spec.d, spec.nlist, spec.m, spec.nbits)
                index.cp.seed = int(spec.seed)
                index.pq.cp.seed = int(spec.seed)
                index.nprobe = int(spec.nprobe)
                self._quantizer = quantizer  # the IVF index does not own it from Python
                self._faiss = index

    @property
    def needs_training(self) -> bool:
        return self._faiss is not None and not self._faiss.is_trained

    @property
    def ntotal(self) -> int:
        if self._faiss is not None:
            return int(self._faiss.ntotal)
        return sum(len(p) for p in self._parts) if self._nn is None else int(self._vectors.shape[0])

    def train(self, x: np.ndarray) -> None:
        if self.needs_training:
            self._faiss.train(np.ascontiguousarray(x, dtype=np.float32))

    def add(self, x: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) == 0:
            return
        if self._faiss is not None:
            self._faiss.add(x)
        else:
            self._parts.append(x)
        self.labels = np.concatenate([self.labels, np.asarray(labels, dtype=np.int32)])
        self.rows = np.concatenate([self.rows, np.asarray(rows, dtype=np.int64)])

    def finalize(self) -> KnnIndex:
        if self._faiss is None and self._nn is None:
            from sklearn.neighbors import NearestNeighbors

            self._vectors = np.concatenate(self._parts) if self._parts else np.zeros((0, self.spec.d), np.float32)
            self._parts = []
            self._nn = NearestNeighbors(algorithm="brute", metric="euclidean").fit(self._vectors)
        if self.ntotal == 0:
            raise ReferenceMapError("the reference has no labelled cell the model could embed; nothing to index")
        return self

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances (n, k) Euclidean float32, index rows (n, k) int64; -1 / inf where fewer than k found)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        k = int(min(k, self.ntotal))
        if self._faiss is not None:
            d2, idx = self._faiss.search(q, k)
            dist = np.sqrt(np.maximum(d2, 0)).astype(np.float32)
            dist[idx < 0] = np.inf
            return dist, idx.astype(np.int64)
        dist, idx = self._nn.kneighbors(q, n_neighbors=k)
        return dist.astype(np.float32), idx.astype(np.int64)

    # persistence -----------------------------------------------------------------------
    def save(self, directory, extra: dict | None = None) -> Path:
        """Write the index, its labels and rows and ``index.json`` into ``directory`` (each file atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._faiss is not None:
            import faiss

            with atomic_path(directory / "index.faiss", ".faiss") as tmp:
                faiss.write_index(self._faiss, str(tmp))
            index_file = "index.faiss"
        else:
            with atomic_path(directory / "index_vectors.npy", ".npy") as tmp:
                np.save(tmp, self._vectors)
            index_file = "index_vectors.npy"
        for name, arr in (("index_labels.npy", self.labels), ("index_rows.npy", self.rows)):
            with atomic_path(directory / name, ".npy") as tmp:
                np.save(tmp, arr)
        meta = {
            "spec": self.spec.as_dict(),
            "index_file": index_file,
            "ntotal": self.ntotal,
            "label_names": list(self.label_names),
            **(extra or {}),
        }
        return write_json_atomic(directory / self.INDEX_META, meta, indent=1)

    @classmethod
    def load(cls, directory) -> tuple[KnnIndex, dict]:
        directory = Path(directory)
        meta_path = directory / cls.INDEX_META
        if not meta_path.exists():
            raise ReferenceMapError(f"{directory} holds no saved index ({cls.INDEX_META} is missing)")
        meta = json.loads(meta_path.read_text())
        spec = IndexSpec(**meta["spec"])
        obj = cls.__new__(cls)
        obj.spec, obj._parts, obj._nn, obj._faiss = spec, [], None, None
        if spec.backend == "faiss":
            import faiss

            obj._faiss = faiss.read_index(str(directory / meta["index_file"]))
            if spec.kind == "ivfpq":
                faiss.extract_index_ivf(obj._faiss).nprobe = int(spec.nprobe)
        else:
            from sklearn.neighbors import NearestNeighbors

            obj._vectors = np.load(directory / meta["index_file"])
            obj._nn = NearestNeighbors(algorithm="brute", metric="euclidean").fit(obj._vectors)
        obj.labels = np.load(directory / "index_labels.npy")
        obj.rows = np.load(directory / "index_rows.npy")
        obj.label_names = list(meta["label_names"])
        if obj.ntotal != len(obj.labels) or len(obj.rows) != len(obj.labels):
            raise ReferenceMapError(
                f"{directory}: the index holds {obj.ntotal} vectors but {len(obj.labels)} labels / {len(obj.rows)} "
                "rows; the directory is damaged, delete it and rerun"
            )
        return obj, meta


def knn_vote(
    neighbors: np.ndarray, distances: np.ndarray, labels: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted code (n,), share of the neighbours voting for it (n,)) from index rows ``neighbors`` (n, k)
    (-1 = none) and their ``distances``; ``labels`` (n_index,) codes. Ties: smaller summed distance, then the
    lower code. A row without any neighbour gets -1 and score 0."""
    n, k = neighbors.shape
    valid = neighbors >= 0
    codes = np.where(valid, labels[np.where(valid, neighbors, 0)], 0)
    rows = np.repeat(np.arange(n), k)
    votes = np.zeros((n, n_classes), dtype=np.float64)
    dist_sum = np.zeros((n, n_classes), dtype=np.float64)
    np.add.at(votes, (rows, codes.ravel()), valid.ravel().astype(np.float64))
    d = np.where(valid, distances, 0.0).astype(np.float64)
    np.add.at(dist_sum, (rows, codes.ravel()), d.ravel())
    scale = float(np.max(d, initial=0.0)) * k + 1.0
    key = votes - dist_sum / scale  # dist_sum / scale < 1: only breaks ties between equal vote counts
    key[votes == 0] = -np.inf
    pred = np.argmax(key, axis=1).astype(np.int64)
    n_valid = valid.sum(1)
    score = np.divide(votes[np.arange(n), pred], n_valid, out=np.zeros(n), where=n_valid > 0)
    pred[n_valid == 0] = -1
    return pred, score.astype(np.float32)


def build_index(
    emb: np.ndarray,
    label_codes: np.ndarray,
    label_names: Sequence[str],
    kind: str = "auto",
    backend: str = "auto",
    flat_max: int = FLAT_MAX_CELLS,
    seed: int = 0,
) -> KnnIndex:
    """An index over the rows of ``emb`` with a label (code >= 0) and a finite embedding."""
    keep = np.flatnonzero((np.asarray(label_codes) >= 0) & np.isfinite(emb).all(1))
    spec = choose_index(len(keep), emb.shape[1], kind, backend, flat_max, seed)
    index = KnnIndex(spec)
    index.label_names = list(label_names)
    if index.needs_training:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(keep, size=min(len(keep), IVF_TRAIN_MAX), replace=False))
        index.train(emb[sample])
    index.add(emb[keep], np.asarray(label_codes)[keep], keep)
    return index.finalize()


# ---------------------------------------------------------------------------------------
# atlas mode: a corpus reference, embedded streaming and resumably


def checkpoint_digest(checkpoint) -> str:
    """sha256 over the checkpoint's files (a directory: its best_model.pt, args.json and vocab.json)."""
    import hashlib

    from data_modules.store.format import file_sha256

    path = Path(checkpoint)
    files = [path] if path.is_file() else [p for p in (path / n for n in ("best_model.pt", "args.json", "vocab.json"))]
    h = hashlib.sha256()
    for f in files:
        if f.exists():
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
    return h.hexdigest()


def is_corpus(path) -> bool:
    from data_modules.store.format import MANIFEST_NAME

    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).exists()


def _pause_for_crash_tests() -> None:
    """Sleep ``$SCGPT_REFMAP_PAUSE_S`` seconds after each journalled chunk (lets tests kill a run mid-way)."""
    delay = float(os.environ.get("SCGPT_REFMAP_PAUSE_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def check_corpus_label(corpus_path, label_key: str) -> list[str]:
    """The label names of ``label_key`` in a corpus; raises naming the corpus and its stored columns."""
    from data_modules.store.reader import Corpus

    columns = Corpus(corpus_path).obs_columns
    if label_key not in columns:
        raise ReferenceMapError(
            f"--reference {corpus_path}: --label-key {label_key!r} is not an obs column of the corpus (stored "
            f"columns: {sorted(columns)}); rebuild it with --obs-columns {label_key} or name a stored column"
        )
    return list(columns[label_key])


class CorpusEmbedder:
    """Embeds the cells of a corpus with a model, chunk by chunk, into ``work_dir`` (journalled, resumable).

    Batches are cells ``[lo, lo + batch_size)`` of the corpus, tokenized with the checkpoint's layout
    (no generative split, no masking, ``cls_value``), float32 values and ``default_rng([seed, lo, n])``: the
    same tokens an :class:`AnnDataModule` makes of the same cells in the same batches.
    """

    JOURNAL = "journal.json"
    CHUNK_DIR = "chunks"

    def __init__(
        self,
        model,
        vocab: GeneVocab,
        checkpoint,
        corpus_path,
        work_dir,
        label_key: str,
        *,
        batch_size: int = 64,
        chunk_cells: int = DEFAULT_CHUNK_CELLS,
        max_seq_len: int | None = None,
        cls_value: float | None = None,
        seed: int = 0,
        device: str | None = None,
        progress: bool = True,
        overwrite: bool = False,
    ):
        from data_modules.store.reader import Corpus
        from data_modules.tokenize import Tokenizer, TokenizerConfig

        self.model, self.vocab, self.checkpoint = model, vocab, checkpoint
        self.corpus = Corpus(corpus_path)
        self.corpus_path = Path(corpus_path)
        self.work_dir = Path(work_dir)
        self.label_key = label_key
        self.label_names = check_corpus_label(corpus_path, label_key)
        self.batch_size = int(batch_size)
        # chunks hold whole batches, so a batch (and its seed) never depends on where a run stopped
        self.chunk_cells = max(self.batch_size, (int(chunk_cells) // self.batch_size) * self.batch_size)
        self.seed, self.progress = int(seed), progress
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        layout = model.layout if max_seq_len is None else model.layout.replace(max_seq_len=max_seq_len)
        self.tokenizer = Tokenizer(
            TokenizerConfig(layout=layout, cls_value=cls_value, gen_ratios=None, mlm_prob=None),
            vocab.pad_id,
            vocab.cls_id,
        )
        self.lut = self._gene_lut()
        self.n_cells = self.corpus.n_cells
        self.n_chunks = -(-self.n_cells // self.chunk_cells)
        self.params = {
            "checkpoint": str(Path(checkpoint).resolve()),
            "checkpoint_sha256": checkpoint_digest(checkpoint),
            "corpus": str(self.corpus_path.resolve()),
            "corpus_fingerprint": self.corpus.manifest.get("creation", {}).get("fingerprint"),
            "n_cells": self.n_cells,
            "nnz": self.corpus.manifest.get("nnz"),
            "label_key": label_key,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "chunk_cells": self.chunk_cells,
            "layout": layout.to_dict(),
            "cls_value": self.tokenizer.config.cls_value,
        }
        self.done = self._open_journal(overwrite)

    def _gene_lut(self) -> np.ndarray | None:
        """None when the corpus uses the checkpoint's vocabulary; else corpus id -> model id (-1 unknown)."""
        cv = self.corpus.vocab
        if cv.token_to_id == self.vocab.token_to_id:
            return None
        lut = self.vocab.map_genes(cv.id_to_token).ids
        if not (lut >= 0).any():
            raise ReferenceMapError(
                f"--reference {self.corpus_path}: none of the corpus' {len(cv.genes)} genes (e.g. {cv.genes[:3]}) is "
                f"in the checkpoint's vocabulary (e.g. {self.vocab.genes[:3]}); build the corpus with "
                f"--vocab {self.checkpoint}"
            )
        log.info("corpus vocabulary differs from the checkpoint's: %d of %d genes mapped", (lut >= 0).sum(), len(lut))
        return lut

    # journal ----------------------------------------------------------------------------
    @property
    def journal_path(self) -> Path:
        return self.work_dir / self.JOURNAL

    def chunk_path(self, c: int) -> Path:
        return self.work_dir / self.CHUNK_DIR / f"chunk-{c:06d}.npz"

    def _open_journal(self, overwrite: bool) -> set[int]:
        if self.journal_path.exists():
            state = json.loads(self.journal_path.read_text())
            if state.get("params") != self.params:
                if not overwrite:
                    old = state.get("params", {})
                    diff = sorted(k for k in set(old) | set(self.params) if old.get(k) != self.params.get(k))
                    raise ReferenceMapError(
                        f"--index-out {self.work_dir} holds reference embeddings made with other arguments ({diff}); "
                        "choose another --index-out or pass --overwrite to replace them"
                    )
                import shutil

                shutil.rmtree(self.work_dir / self.CHUNK_DIR, ignore_errors=True)
                for name in (self.JOURNAL, KnnIndex.INDEX_META):
                    (self.work_dir / name).unlink(missing_ok=True)
            else:
                for tmp in (self.work_dir / self.CHUNK_DIR).glob(".chunk-*"):  # a killed run's partial write
                    tmp.unlink(missing_ok=True)
                return {int(c) for c in state.get("done", []) if self.chunk_path(int(c)).exists()}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._save_journal(set())
        return set()

    def _save_journal(self, done: set[int]) -> None:
        write_json_atomic(
            self.journal_path,
            {
                "params": self.params,
                "n_chunks": self.n_chunks,
                "done": sorted(done),
                "complete": len(done) == self.n_chunks,
            },
            indent=1,
        )

    @property
    def complete(self) -> bool:
        return len(self.done) == self.n_chunks

    # embedding ----------------------------------------------------------------------------
    def embed_chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (m, d) float32 L2-normalized, NaN for cells without a model gene; label codes (m,) int32,
        -1 for the corpus' "unknown" label) of chunk ``c``."""
        lo, hi = c * self.chunk_cells, min((c + 1) * self.chunk_cells, self.n_cells)
        labels = np.empty(hi - lo, dtype=np.int32)
        empty = np.zeros(hi - lo, dtype=bool)

        def batches():  # cells lo:hi as Batches (cell_index relative to lo), read READ_BLOCK_CELLS at a time
            for b0 in range(lo, hi, READ_BLOCK_CELLS):
                block = self.corpus.read_cells(b0, min(b0 + READ_BLOCK_CELLS, hi))
                labels[b0 - lo : b0 - lo + len(block)] = block.obs[self.label_key]
                block.gene_ids = block.gene_ids.astype(np.int32, copy=False)
                # float32 like the AnnDataModule's rows: the binning kernels draw tie-breaks differently for
                # integer input, and the same cells must get the same bins from a corpus as from an h5ad
                block.counts = block.counts.astype(np.float32, copy=False)
                if self.lut is not None:
                    block = _remap_block(block, self.lut)
                empty[b0 - lo : b0 - lo + len(block)] = np.diff(block.indptr) == 0
                for s in range(0, len(block), self.batch_size):
                    rows = np.arange(s, min(s + self.batch_size, len(block)))
                    first = b0 + s
                    rng = np.random.default_rng([self.seed, int(first), len(rows)])
                    batch = self.tokenizer.pad(self.tokenizer.encode(block, rng, rows=rows))
                    batch.cell_index = torch.from_numpy(np.arange(first - lo, first - lo + len(rows), dtype=np.int64))
                    yield batch

        out = predict_cells(self.model, batches(), hi - lo, device=self.device, progress=False)
        emb = l2_normalize(out["cell_emb"])
        emb[empty] = np.nan
        return emb, self._known(labels)

    def _known(self, codes: np.ndarray) -> np.ndarray:
        """Label codes with the corpus' "unknown" label (a missing value) as -1."""
        codes = np.asarray(codes, dtype=np.int32).copy()
        if CORPUS_UNKNOWN in self.label_names:
            codes[codes == self.label_names.index(CORPUS_UNKNOWN)] = -1
        return codes

    def run(self) -> None:
        """Embed every chunk not done yet (one progress bar over all cells); journal after each chunk."""
        from tqdm.auto import tqdm

        todo = [c for c in range(self.n_chunks) if c not in self.done]
        if self.done and todo:
            msg = f"{self.work_dir}: resuming, {len(self.done)}/{self.n_chunks} chunks of reference embeddings done"
            log.info(msg)
            if self.progress:
                print(msg)
        if not todo:
            return
        self.model.to(self.device)
        n_done = sum(min(self.chunk_cells, self.n_cells - c * self.chunk_cells) for c in self.done)
        bar = tqdm(
            total=self.n_cells,
            initial=n_done,
            unit="cell",
            desc=f"embedding reference {self.corpus_path.name}",
            disable=not self.progress,
        )
        try:
            for c in todo:
                emb, labels = self.embed_chunk(c)
                with atomic_path(self.chunk_path(c), ".npz") as tmp:
                    np.savez(tmp, emb=emb, labels=labels)
                self.done.add(c)
                self._save_journal(self.done)
                bar.update(len(labels))
                _pause_for_crash_tests()
        finally:
            bar.close()

    def read_chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.chunk_path(c)) as z:
            return z["emb"], z["labels"]

    def build_index(
        self, kind: str = "auto", backend: str = "auto", flat_max: int = FLAT_MAX_CELLS
    ) -> tuple[KnnIndex, bool]:
        """The index over all embedded chunks: reloaded from ``work_dir`` when one with the same parameters is
        saved there (returns True), else built streaming (IVF-PQ trained on a seeded sample) and saved."""
        if not self.complete:
            raise RuntimeError(f"{self.work_dir}: {self.n_chunks - len(self.done)} chunks are not embedded yet")
        counts, valid_total = [], 0
        for c in range(self.n_chunks):
            emb, labels = self.read_chunk(c)
            ok = (labels >= 0) & np.isfinite(emb).all(1)
            counts.append(ok)
            valid_total += int(ok.sum())
        d = int(self.read_chunk(0)[0].shape[1])
        spec = choose_index(valid_total, d, kind, backend, flat_max, self.seed)
        meta_path = self.work_dir / KnnIndex.INDEX_META
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("spec") == spec.as_dict() and meta.get("embedding_params") == self.params:
                index, _ = KnnIndex.load(self.work_dir)
                return index, True
        index = KnnIndex(spec)
        index.label_names = self.label_names
        if index.needs_training:
            rng = np.random.default_rng(self.seed)
            pick = np.sort(rng.choice(valid_total, size=min(valid_total, IVF_TRAIN_MAX), replace=False))
            sample, seen = [], 0
            for c in range(self.n_chunks):
                ok = counts[c]
                n_ok = int(ok.sum())
                sel = pick[(pick >= seen) & (pick < seen + n_ok)] - seen
                if len(sel):
                    sample.append(self.read_chunk(c)[0][np.flatnonzero(ok)[sel]])
                seen += n_ok
            index.train(np.concatenate(sample))
            del sample
        for c in range(self.n_chunks):
            emb, labels = self.read_chunk(c)
            ok = np.flatnonzero(counts[c])
            index.add(emb[ok], labels[ok], ok + c * self.chunk_cells)
        index.finalize()
        index.save(self.work_dir, extra={"embedding_params": self.params, "label_key": self.label_key})
        return index, False

    def expression_sample(self, max_cells: int, seed: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        """(cells x vocabulary CSR of stored values, label codes, corpus cell ids) of a seeded sample of at most
        ``max_cells`` cells: contiguous runs of 64 cells at random offsets (bounded memory)."""
        run = 64
        n = self.n_cells
        if n <= max_cells:
            starts = np.arange(0, n, run)
        else:
            rng = np.random.default_rng(seed)
            starts = np.sort(rng.choice(np.arange(0, n, run), size=max(1, max_cells // run), replace=False))
        mats, codes, ids = [], [], []
        for s in starts:
            e = min(s + run, n)
            block = self.corpus.read_cells(int(s), int(e))
            gene_ids = block.gene_ids.astype(np.int64)
            if self.lut is not None:
                gene_ids = self.lut[gene_ids]
            keep = gene_ids >= 0
            rows = np.repeat(np.arange(len(block)), np.diff(block.indptr))
            mats.append(
                sp.csr_matrix(
                    (block.counts.astype(np.float32)[keep], (rows[keep], gene_ids[keep])),
                    shape=(len(block), len(self.vocab)),
                )
            )
            codes.append(self._known(block.obs[self.label_key]))
            ids.append(np.arange(s, e))
        return sp.vstack(mats, format="csr"), np.concatenate(codes), np.concatenate(ids)


def _remap_block(block, lut: np.ndarray):
    """The block with corpus gene ids mapped to model ids; entries of unknown genes dropped."""
    from data_modules.store.reader import CellBlock

    ids = lut[block.gene_ids.astype(np.int64)]
    keep = ids >= 0
    rows = np.repeat(np.arange(len(block)), np.diff(block.indptr))
    lengths = np.bincount(rows[keep], minlength=len(block))
    indptr = np.zeros(len(block) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return CellBlock(indptr, ids[keep].astype(np.int32), block.counts[keep], block.cell_index, block.obs)


# ---------------------------------------------------------------------------------------
# baselines on the same split


def log_normalized(x: sp.csr_matrix, source: str) -> sp.csr_matrix:
    """Log-normalized values (the annotation recipe's normalize_total 1e4 + log1p, through
    ``data_modules.value_types``: counts / other normalized values get both, log1p values are used as stored)."""
    from data_modules.value_types import apply_steps, detect_value_type, preprocessing_steps

    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    steps = preprocessing_steps(detect_value_type(x, source), 1e4, True)
    return apply_steps(x, steps).astype(np.float32)


def hvg_mask(x_ref_log: sp.csr_matrix, n_hvg: int) -> np.ndarray:
    """(G,) bool: the ``n_hvg`` most variable genes of the reference (scanpy "seurat" flavour on log values)."""
    import anndata as ad
    import scanpy as sc

    g = x_ref_log.shape[1]
    if n_hvg >= g:
        return np.ones(g, dtype=bool)
    probe = ad.AnnData(X=x_ref_log, var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))
    table = sc.pp.highly_variable_genes(probe, n_top_genes=n_hvg, flavor="seurat", inplace=False)
    return np.asarray(table["highly_variable"], dtype=bool)


def run_baselines(
    x_ref: sp.csr_matrix,
    y_ref: np.ndarray,
    x_query: sp.csr_matrix,
    baselines: Sequence[str] = BASELINES,
    k: int = DEFAULT_K,
    n_hvg: int = 2000,
    n_pcs: int = 50,
    l1_c_grid: Sequence[float] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict]:
    """Predicted labels of the query per baseline and what each used. ``x_ref`` / ``x_query``: log-normalized
    values over the same genes; ``y_ref``: str labels (no missing)."""
    from sklearn.decomposition import PCA

    from scgpt_train.tasks.baselines import PAPER_C_GRID, l1_logistic_regression

    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ReferenceMapError(f"--baselines are {BASELINES}, got {sorted(unknown)}")
    hvg = hvg_mask(x_ref, n_hvg)
    xr, xq = x_ref[:, hvg], x_query[:, hvg]
    preds, info = {}, {"n_hvg": int(hvg.sum()), "n_reference_cells": int(x_ref.shape[0])}
    names, y_codes = np.unique(np.asarray(y_ref).astype(str), return_inverse=True)
    if "hvg_pca_knn" in baselines:
        n = int(min(n_pcs, xr.shape[0] - 1, xr.shape[1]))
        pca = PCA(n_components=n, random_state=seed).fit(xr.toarray())
        zr, zq = pca.transform(xr.toarray()).astype(np.float32), pca.transform(xq.toarray()).astype(np.float32)
        spec = IndexSpec("sklearn", "flat", zr.shape[1], seed=seed)
        index = KnnIndex(spec)
        index.add(zr, y_codes, np.arange(len(zr)))
        index.finalize()
        dist, nb = index.search(zq, k)
        code, _ = knn_vote(nb, dist, index.labels, len(names))
        preds["hvg_pca_knn"] = names[code]
        info["hvg_pca_knn"] = {"n_pcs": n, "k": int(k), "pca_fit_on": "reference"}
    if "l1_lr" in baselines:
        grid = tuple(l1_c_grid) if l1_c_grid else PAPER_C_GRID
        if len(names) < 2:
            preds["l1_lr"] = np.full(xq.shape[0], names[0], dtype=object)
            info["l1_lr"] = {"C": None, "note": "one reference label"}
        else:
            pred, c = l1_logistic_regression(xr, y_ref, xq, grid, 5, seed)
            preds["l1_lr"] = np.asarray(pred, dtype=object)
            info["l1_lr"] = {"C": c, "c_grid": [float(v) for v in grid]}
    return preds, info


def align_genes(
    ref: sp.csr_matrix, ref_ids: np.ndarray, query: sp.csr_matrix, query_ids: np.ndarray
) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """The columns of both matrices for the vocabulary ids they share (in ascending id order)."""
    shared = np.intersect1d(ref_ids, query_ids)
    if len(shared) == 0:
        raise ReferenceMapError("the reference and the query share no gene of the checkpoint's vocabulary")
    r = np.searchsorted(ref_ids, shared) if np.all(np.diff(ref_ids) > 0) else _positions(ref_ids, shared)
    q = np.searchsorted(query_ids, shared) if np.all(np.diff(query_ids) > 0) else _positions(query_ids, shared)
    return ref[:, r].tocsr(), query[:, q].tocsr(), shared


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    pos = {int(v): i for i, v in enumerate(ids)}
    return np.array([pos[int(v)] for v in wanted], dtype=np.int64)


# ---------------------------------------------------------------------------------------
# the whole run


def _metrics(truth: np.ndarray, pred: np.ndarray) -> dict:
    from scgpt_train.tasks.metrics import classification_metrics

    has = np.array([t is not None for t in truth])
    m = classification_metrics(truth[has].astype(str), np.asarray(pred)[has].astype(str))
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "precision": m["precision"], "recall": m["recall"]}


def default_index_dir(out) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".h5ad") + ".reference_index")


def run_reference_map(
    checkpoint,
    reference,
    query,
    label_key: str,
    out,
    *,
    k: int = DEFAULT_K,
    index_out=None,
    index_kind: str = "auto",
    knn_backend: str = "auto",
    flat_max: int = FLAT_MAX_CELLS,
    batch_size: int = 64,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    max_seq_len: int | None = None,
    gene_column: str | None = None,
    use_raw: bool = False,
    gene_table: str | None = None,
    cls_value: float | None = None,
    seed: int = 0,
    device: str | None = None,
    baselines: Sequence[str] = BASELINES,
    n_hvg: int = 2000,
    n_pcs: int = 50,
    l1_c_grid: Sequence[float] | None = None,
    baseline_max_cells: int = BASELINE_MAX_CELLS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Map ``query`` onto ``reference`` (an h5ad, or a corpus directory: atlas mode) and write ``out``: the query
    AnnData (same obs_names, all genes) with ``obsm["X_scgpt"]``, the kNN predictions and distances in ``obs``,
    the neighbours in ``obsm`` and ``uns["reference_map"]`` (parameters, index, metrics). Returns that summary."""
    from scgpt_train.tasks.report import write_h5ad

    if k < 1:
        raise ReferenceMapError(f"--k must be >= 1, got {k}")
    atlas = is_corpus(reference)
    if not atlas and not Path(reference).is_file():
        raise ReferenceMapError(
            f"--reference {reference} is neither an .h5ad file nor a corpus directory (no manifest.json)"
        )
    t0 = time.perf_counter()
    q_adata = read_h5ad_checked(query, "--query")
    q_truth = obs_labels(q_adata.obs, label_key, query, "--query") if label_key in q_adata.obs.columns else None
    ref_adata = None
    if atlas:
        check_corpus_label(reference, label_key)
    else:
        ref_adata = read_h5ad_checked(reference, "--reference")
        ref_labels = obs_labels(ref_adata.obs, label_key, reference, "--reference")
    model, vocab = load_model(checkpoint)
    embed_kw = dict(
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        cls_value=cls_value,
        seed=seed,
        device=device,
        progress=progress,
    )
    file_kw = dict(gene_column=gene_column, use_raw=use_raw, gene_table=gene_table)
    # the query first: its input errors come before an hour of reference embedding
    q_emb = embed_adata(model, vocab, checkpoint, query, q_adata, description="embedding query", **embed_kw, **file_kw)
    summary: dict = {"reference": str(reference), "query": str(query), "label_key": label_key, "k": int(k)}
    index_reloaded = False
    if atlas:
        work_dir = Path(index_out) if index_out else default_index_dir(out)
        embedder = CorpusEmbedder(
            model,
            vocab,
            checkpoint,
            reference,
            work_dir,
            label_key,
            batch_size=batch_size,
            chunk_cells=chunk_cells,
            max_seq_len=max_seq_len,
            cls_value=cls_value,
            seed=seed,
            device=device,
            progress=progress,
            overwrite=overwrite,
        )
        t_emb = time.perf_counter()
        embedder.run()
        t_index = time.perf_counter()
        index, index_reloaded = embedder.build_index(index_kind, knn_backend, flat_max)
        summary["index_dir"] = str(work_dir)
        summary["reference_cells"] = embedder.n_cells
        summary["timings_s"] = {"embed_reference": t_index - t_emb, "index": time.perf_counter() - t_index}
    else:
        t_emb = time.perf_counter()
        r_emb = embed_adata(
            model, vocab, checkpoint, reference, ref_adata, description="embedding reference", **embed_kw, **file_kw
        )
        t_index = time.perf_counter()
        has = np.array([v is not None for v in ref_labels])
        names = sorted({str(v) for v in ref_labels[has]})
        codes = np.full(len(ref_labels), -1, dtype=np.int32)
        lookup = {n: i for i, n in enumerate(names)}
        codes[has] = [lookup[str(v)] for v in ref_labels[has]]
        index = build_index(r_emb.emb, codes, names, index_kind, knn_backend, flat_max, seed)
        summary["reference_cells"] = int(ref_adata.n_obs)
        summary["timings_s"] = {"embed_reference": t_index - t_emb, "index": time.perf_counter() - t_index}
        if index_out:
            index.save(index_out, extra={"label_key": label_key, "reference": str(reference)})
            summary["index_dir"] = str(index_out)
    summary["index"] = {**index.spec.as_dict(), "ntotal": index.ntotal, "reloaded": bool(index_reloaded)}

    # the vote
    t_q = time.perf_counter()
    ok = np.flatnonzero(~q_emb.unmapped)
    n_q = q_adata.n_obs
    k_eff = int(min(k, index.ntotal))
    dist = np.full((n_q, k_eff), np.nan, dtype=np.float32)
    nb_rows = np.full((n_q, k_eff), -1, dtype=np.int64)
    d_ok, nb_ok = index.search(q_emb.emb[ok], k_eff)
    code, score_ok = knn_vote(nb_ok, d_ok, index.labels, len(index.label_names))
    dist[ok] = d_ok
    nb_rows[ok] = np.where(nb_ok >= 0, index.rows[np.maximum(nb_ok, 0)], -1)
    names = np.asarray(index.label_names, dtype=object)
    pred = np.full(n_q, UNASSIGNED, dtype=object)
    pred[ok] = np.where(code >= 0, names[np.maximum(code, 0)], UNASSIGNED)
    score = np.zeros(n_q, dtype=np.float32)
    score[ok] = score_ok
    summary["timings_s"]["query_search"] = time.perf_counter() - t_q
    summary["n_query_cells"] = int(n_q)
    summary["n_query_unmapped"] = int(q_emb.unmapped.sum())

    out_adata = q_adata
    out_adata.obsm["X_scgpt"] = q_emb.emb
    out_adata.obsm["X_scgpt_knn_distances"] = dist
    out_adata.obsm["X_scgpt_knn_indices"] = nb_rows
    out_adata.obs["ref_pred"] = pd.Categorical(pred.astype(str))
    out_adata.obs["ref_pred_score"] = score
    finite = np.where(np.isfinite(dist), dist, np.nan)  # NaN: unmapped query cells and neighbours not found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows give NaN
        out_adata.obs["ref_knn_dist_min"] = np.nanmin(finite, axis=1).astype(np.float32)
        out_adata.obs["ref_knn_dist_mean"] = np.nanmean(finite, axis=1).astype(np.float32)

    # baselines on the same reference / query split
    methods = {"scgpt_knn": pred}
    if baselines:
        t_b = time.perf_counter()
        if atlas:
            x_ref_raw, ref_codes, _ = embedder.expression_sample(baseline_max_cells, seed)
            ref_ids = np.arange(len(vocab), dtype=np.int64)
            labelled = ref_codes >= 0
            x_ref_raw, y_ref = x_ref_raw[labelled], np.asarray(embedder.label_names, dtype=object)[ref_codes[labelled]]
        else:
            has = np.array([v is not None for v in ref_labels])
            sel = np.flatnonzero(has)
            if len(sel) > baseline_max_cells:
                sel = np.sort(np.random.default_rng(seed).choice(sel, baseline_max_cells, replace=False))
            x_ref_raw, y_ref = r_emb.expression[sel], ref_labels[sel].astype(str)
            ref_ids = r_emb.gene_ids
        xr, xq, shared = align_genes(x_ref_raw, ref_ids, q_emb.expression, q_emb.gene_ids)
        xr, xq = log_normalized(xr, "reference"), log_normalized(xq, "query")
        base_preds, base_info = run_baselines(xr, y_ref, xq, baselines, k, n_hvg, n_pcs, l1_c_grid, seed)
        base_info["n_shared_genes"] = int(len(shared))
        for name, p in base_preds.items():
            methods[name] = np.asarray(p, dtype=object)
            out_adata.obs[f"ref_pred_{name}"] = pd.Categorical(np.asarray(p).astype(str))
        summary["baselines"] = base_info
        summary["timings_s"]["baselines"] = time.perf_counter() - t_b
    if q_truth is not None:
        summary["metrics"] = {m: _metrics(q_truth, p) for m, p in methods.items()}
        ref_names = set(index.label_names)
        summary["query_only_labels"] = sorted({str(t) for t in q_truth if t is not None and str(t) not in ref_names})
    summary["timings_s"]["total"] = time.perf_counter() - t0
    summary["params"] = {
        "checkpoint": str(checkpoint),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "max_seq_len": int(max_seq_len or model.layout.max_seq_len),
        "embedding": "L2-normalized cell embeddings (embed.py path)",
        "vote": "majority of k nearest (Euclidean on L2-normalized); ties: smaller summed distance",
    }
    out_adata.uns["reference_map"] = _jsonable(summary)
    write_h5ad(out_adata, out)
    summary["out"] = str(out)
    return summary


def _jsonable(obj):
    """A copy of ``obj`` AnnData can store in ``uns`` (no None; numpy scalars as Python values)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj if v is not None]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def results_table(summary: dict) -> str:
    """Markdown table of the metrics per method (empty when the query has no labels)."""
    from scgpt_train.tasks.report import markdown_table

    metrics = summary.get("metrics") or {}
    rows = [
        [METHOD_NAMES.get(m, m), v["accuracy"], v["macro_f1"], v["precision"], v["recall"]] for m, v in metrics.items()
    ]
    return markdown_table(["method", "accuracy", "macro F1", "macro precision", "macro recall"], rows) if rows else ""


# ---------------------------------------------------------------------------------------
# benchmark=zeroshot_<dataset> (scripts/benchmark.py dispatches task "zeroshot" here)


def demo_checkpoint(min_steps: int = 300, root=None) -> Path:
    """The last checkpoint of the newest finished ``make train`` demo run (outputs/demo/runs/*, >= ``min_steps``)."""
    root = Path(root or os.environ.get("PROJECT_ROOT") or Path(__file__).resolve().parents[2])
    found = []
    for summary in (root / "outputs" / "demo" / "runs").glob("*/summary.json"):
        try:
            s = json.loads(summary.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        ckpt = Path(s.get("last_checkpoint") or "")
        if int(s.get("steps", 0)) >= min_steps and ckpt.is_file():
            found.append((summary.stat().st_mtime, ckpt))
    if not found:
        raise ReferenceMapError(
            f"no finished demo pretraining (>= {min_steps} steps) under {root / 'outputs/demo/runs'}: run `make train` "
            "first, or set checkpoint: in the benchmark config"
        )
    return max(found)[1]


def _demo_dataset(name: str):
    from data_modules.demo import pbmc68k_log_normalized

    if name != "pbmc68k":
        raise ReferenceMapError(f"benchmark data.builder must be 'pbmc68k', got {name!r}")
    return pbmc68k_log_normalized()


def run_zeroshot_benchmark(bench, seeds, out_dir, extra_overrides=(), compose=None) -> dict:
    """Zero-shot reference mapping over ``seeds``: for each seed a stratified reference / query split (from
    ``data.builder`` with ``data.query_fraction``; or the fixed ``data.reference`` / ``data.query`` files) and
    seeded embeddings, scGPT kNN beside HVG+PCA kNN and L1-LR; ``benchmark.md`` (mean ± std over seeds),
    ``results.json``, the first seed's confusion matrix and query UMAPs in ``out_dir``."""
    from data_modules.preprocess import stratified_split
    from scgpt_train.tasks.metrics import confusion_matrix
    from scgpt_train.tasks.report import (
        markdown_table,
        mean_std,
        plot_confusion,
        plot_umap,
        umap_coordinates,
        write_json,
        write_text,
    )

    if extra_overrides:
        log.warning("zero-shot benchmarks train nothing: overrides %s are ignored", list(extra_overrides))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(bench["checkpoint"]) if bench.get("checkpoint") else demo_checkpoint()
    data = dict(bench.get("data") or {})
    label_key = data.get("label_key", "cell_type")
    k = int(bench.get("k", DEFAULT_K))
    per_seed, figures = [], []
    t0 = time.perf_counter()
    for i, seed in enumerate(seeds):
        seed_dir = out_dir / f"seed_{seed}"
        if data.get("reference"):
            ref, query = Path(data["reference"]), Path(data["query"])
        else:
            from scgpt_train.tasks.report import write_h5ad

            cells = _demo_dataset(data.get("builder", "pbmc68k"))
            tr, te = stratified_split(
                cells.obs[label_key].astype(str).to_numpy(), data.get("query_fraction", 0.3), seed
            )
            ref, query = (
                write_h5ad(cells[tr].copy(), seed_dir / "reference.h5ad"),
                write_h5ad(cells[te].copy(), seed_dir / "query.h5ad"),
            )
        summary = run_reference_map(
            checkpoint,
            ref,
            query,
            label_key,
            seed_dir / "mapped.h5ad",
            k=k,
            seed=int(seed),
            batch_size=int(bench.get("batch_size", 64)),
            baselines=list(bench.get("baselines") or BASELINES),
            n_hvg=int(bench.get("n_hvg", 2000)),
            n_pcs=int(bench.get("n_pcs", 50)),
            l1_c_grid=bench.get("l1_c_grid"),
            progress=False,
        )
        per_seed.append(summary["metrics"])
        if i == 0:  # figures of the first seed
            import anndata as ad

            mapped = ad.read_h5ad(seed_dir / "mapped.h5ad")
            truth = mapped.obs[label_key].astype(str).to_numpy()
            pred = mapped.obs["ref_pred"].astype(str).to_numpy()
            cm, classes = confusion_matrix(truth, pred)
            figures.append(plot_confusion(cm, classes, out_dir / "confusion_matrix.png", "scGPT zero-shot kNN: query"))
            if bench.get("umap", True):
                coords = umap_coordinates(mapped.obsm["X_scgpt"], seed=int(seed))
                colors = {"cell type": truth, "kNN prediction": pred}
                figures.append(plot_umap(coords, colors, out_dir / "umap.png", "scGPT zero-shot, query"))
    methods = list(per_seed[0])
    rows = []
    agg = {}
    for m in methods:
        vals = {key: [s[m][key] for s in per_seed] for key in ("accuracy", "macro_f1", "precision", "recall")}
        agg[m] = {key: {"mean": float(np.mean(v)), "values": v} for key, v in vals.items()}
        rows.append([METHOD_NAMES.get(m, m), f"ours ({len(seeds)} seeds)"] + [mean_std(vals[c]) for c in vals])
    for m, numbers in (bench.get("paper") or {}).items():
        rows.append([METHOD_NAMES.get(m, m), "paper / re-evaluation"] + [numbers.get(c, "-") for c in agg[methods[0]]])
    table = markdown_table(["method", "source", "accuracy", "macro F1", "macro precision", "macro recall"], rows)
    notes = [
        f"Benchmark `{bench['name']}`: {bench.get('dataset', '')}.",
        f"Checkpoint `{checkpoint}` (zero-shot: no fine-tuning); L2-normalized cell embeddings, kNN vote k = {k}.",
        "Baselines on the same reference / query split: HVG+PCA kNN (PCA fitted on the reference) and L1 logistic "
        "regression on the same HVGs of the log-normalized genes the model reads.",
        f"Seeds {list(seeds)}: the split"
        + (" (fixed files: the seed changes only binning ties / gene sampling)" if data.get("reference") else "")
        + " and the embedding seed; ours = mean ± std over seeds. Wall time "
        f"{time.perf_counter() - t0:.0f} s.",
    ]
    text = (
        f"# {bench['name']}\n\n"
        + "\n".join(f"- {n}" for n in notes)
        + "\n\n"
        + table
        + "".join(f"\n![{Path(f).name}]({Path(f).name})\n" for f in figures)
    )
    write_text(text, out_dir / "benchmark.md")
    result = {
        "benchmark": dict(bench),
        "checkpoint": str(checkpoint),
        "seeds": list(seeds),
        "per_seed": per_seed,
        "summary": agg,
        "table": table,
    }
    write_json(result, out_dir / "results.json")
    print(text)
    return result
