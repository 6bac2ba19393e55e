"""Read access to a corpus directory: contiguous blocks of CSR rows, one HDF5 slice each."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from data_modules.store.format import FORMAT_VERSION, MANIFEST_NAME, VOCAB_NAME, CorpusFormatError
from data_modules.store.split import split_membership
from data_modules.vocab import GeneVocab


@dataclass
class CellBlock:
    """A set of cells in CSR form with their corpus ids and obs codes."""

    indptr: np.ndarray  # (n+1,) int64, starts at 0
    gene_ids: np.ndarray  # (nnz,) int32 vocab ids
    counts: np.ndarray  # (nnz,) stored dtype (uint16 / uint32 / float32 / float64); may differ per shard
    cell_index: np.ndarray  # (n,) int64 global cell ids
    obs: dict[str, np.ndarray] = field(default_factory=dict)  # column -> (n,) int32 codes

    def __len__(self) -> int:
        return len(self.cell_index)

    @property
    def nnz_per_cell(self) -> np.ndarray:  # (n,) int64
        return np.diff(self.indptr)

    def take(self, rows: np.ndarray) -> CellBlock:
        """The cells at ``rows`` (int positions or a bool mask), in that order."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        lengths = self.indptr[rows + 1] - self.indptr[rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # gather positions of every kept entry without a Python loop
        starts = np.repeat(self.indptr[rows], lengths)
        offsets = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1], lengths)
        pos = starts + offsets
        return CellBlock(
            indptr=indptr,
            gene_ids=self.gene_ids[pos],
            counts=self.counts[pos],
            cell_index=self.cell_index[rows],
            obs={k: v[rows] for k, v in self.obs.items()},
        )

    @staticmethod
    def concat(blocks: list[CellBlock]) -> CellBlock:
        if len(blocks) == 1:
            return blocks[0]
        lengths = np.concatenate([b.nnz_per_cell for b in blocks])
        indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        keys = blocks[0].obs.keys()
        return CellBlock(
            indptr=indptr,
            gene_ids=np.concatenate([b.gene_ids for b in blocks]),
            counts=np.concatenate([b.counts for b in blocks]),
            cell_index=np.concatenate([b.cell_index for b in blocks]),
            obs={k: np.concatenate([b.obs[k] for b in blocks]) for k in keys},
        )


class Corpus:
    """A corpus directory opened for reading.

    HDF5 handles are opened lazily in the process that reads (and reopened after a
    fork), so one ``Corpus`` can be handed to DataLoader workers.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_NAME
        if not manifest_path.exists():
            raise CorpusFormatError(
                f"{self.root} is not a corpus: {MANIFEST_NAME} is missing "
                "(build one with `python scripts/build_corpus.py h5ad ... --out DIR`)"
            )
        self.manifest = json.loads(manifest_path.read_text())
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise CorpusFormatError(
                f"{manifest_path}: format_version {version} is not supported (this code reads {FORMAT_VERSION})"
            )
        self.vocab = GeneVocab.from_json(self.root / self.manifest.get("vocab", {}).get("path", VOCAB_NAME))
        self.shards = self.manifest["shards"]
        counts = np.array([s["n_cells"] for s in self.shards], dtype=np.int64)
        self.shard_offsets = np.zeros(len(counts) + 1, dtype=np.int64)  # (n_shards+1,) first global id per shard
        np.cumsum(counts, out=self.shard_offsets[1:])
        self.obs_columns: dict[str, list[str]] = self.manifest.get("obs_columns", {})
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    # sizes ----------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        return int(self.shard_offsets[-1])

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def split(self) -> dict:
        return self.manifest.get("split", {"strategy": "none"})

    def shard_path(self, shard: int) -> Path:
        return self.root / self.shards[shard]["path"]

    # reading --------------------------------------------------------------------------
    def _file(self, shard: int) -> h5py.File:
        if os.getpid() != self._pid:  # forked into a worker: never share HDF5 handles
            self._handles = {}
            self._pid = os.getpid()
        f = self._handles.get(shard)
        if f is None:
            path = self.shard_path(shard)
            try:
                f = h5py.File(path, "r")
            except (OSError, FileNotFoundError) as e:
                raise CorpusFormatError(
                    f"cannot open shard {path} ({e}); run `python scripts/corpus.py verify {self.root}`"
                ) from None
            self._handles[shard] = f
        return f

    def read_block(self, shard: int, start: int, stop: int) -> CellBlock:
        """Cells ``start:stop`` (shard-local rows) of one shard: one contiguous read per array."""
        f = self._file(shard)
        n = int(self.shards[shard]["n_cells"])
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows {start}:{stop} are outside shard {shard} (0:{n})")
        indptr = f["indptr"][start : stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        obs = {k: f["obs"][k][start:stop] for k in f["obs"]} if "obs" in f else {}
        return CellBlock(
            indptr=indptr - lo,
            gene_ids=f["indices"][lo:hi].astype(np.int32, copy=False),  # stored uint16 when the vocab fits
            counts=f["data"][lo:hi],
            cell_index=np.arange(start, stop, dtype=np.int64) + self.shard_offsets[shard],
            obs=obs,
        )

    def read_source_rows(self, shard: int, start: int, stop: int) -> np.ndarray:
        """(stop-start,) int64 row of each cell in its input (h5ad row / Census soma_joinid)."""
        return self._file(shard)["source_row"][start:stop]

    def read_cells(self, start: int, stop: int) -> CellBlock:
        """Global cell ids ``start:stop``, possibly spanning shards."""
        if not 0 <= start < stop <= self.n_cells:
            raise IndexError(f"cells {start}:{stop} are outside 0:{self.n_cells}")
        blocks = []
        first = int(np.searchsorted(self.shard_offsets, start, side="right") - 1)
        for shard in range(first, self.n_shards):
            s0 = int(self.shard_offsets[shard])
            if s0 >= stop:
                break
            blocks.append(
                self.read_block(shard, max(start - s0, 0), min(stop, int(self.shard_offsets[shard + 1])) - s0)
            )
        if not blocks:
            raise IndexError(f"cells {start}:{stop} are outside 0:{self.n_cells}")
        return CellBlock.concat(blocks)

    def in_validation(self, block: CellBlock) -> np.ndarray:
        """(n,) bool: which cells of ``block`` are in the validation split."""
        return split_membership(self.split, block.cell_index, block.obs.get("dataset"))

    def close(self) -> None:
        for f in self._handles.values():
            try:
                f.close()
            except Exception:
                pass
        self._handles = {}

    def __getstate__(self):  # picklable for spawn-started workers: handles are reopened there
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __enter__(self) -> Corpus:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
