"""The k-NN index over reference embeddings and the vote.

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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_modules.atomic import atomic_path, write_json_atomic
from scgpt_train.tasks.reference_map.common import FLAT_MAX_CELLS, IVF_TRAIN_MAX, ReferenceMapError

log = logging.getLogger(__name__)


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
