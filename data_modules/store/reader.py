"""Read access to a corpus directory: contiguous blocks of CSR rows, one HDF5 slice each."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from data_modules.store.format import (
    CHECKSUM,
    DATA,
    FORMAT_VERSION,
    INDICES,
    INDPTR,
    MANIFEST_NAME,
    OBS_GROUP,
    SOURCE_ROW,
    VOCAB_NAME,
    CorpusFormatError,
)
from data_modules.store.split import split_membership
from data_modules.vocab import GeneVocab

log = logging.getLogger(__name__)


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
        unchecked = sum(1 for s in self.shards if s.get("checksums") != CHECKSUM)
        if unchecked:
            log.warning(
                "%s: %d of %d shards were written without per-block checksums, so a corrupted byte there is found "
                "only by data.verify=true; add them with `python scripts/corpus.py verify %s --write-checksums` "
                "(or rebuild the corpus)",
                self.root,
                unchecked,
                len(self.shards),
                self.root,
            )

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
        n = int(self.shards[shard]["n_cells"])
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows {start}:{stop} are outside shard {shard} (0:{n})")
        block, _ = self.read_spans([(shard, start, stop)])
        block.gene_ids = block.gene_ids.astype(np.int32, copy=False)  # stored uint16 when the vocab fits
        return block

    def read_spans(self, spans: list[tuple[int, int, int]]) -> tuple[CellBlock, np.ndarray]:
        """The rows of ``(shard, start, stop)`` spans as ONE CellBlock, and the first row of each span in it.

        Each HDF5 slice is read straight into its place in the block's arrays (``read_direct``: no
        per-span array, no dtype conversion; gene ids stay in the stored dtype). The CSR structure of
        what was read is checked (monotonic ``indptr``, ids inside the vocabulary): a damaged shard
        raises :class:`CorpusFormatError` naming the shard and rows, never a bare ``IndexError`` later.
        """
        files = [self._file(shard) for shard, _, _ in spans]  # this process's handles
        span_indptr = []
        for f, (shard, start, stop) in zip(files, spans):
            with self._checked(shard, start, stop):
                ip = f[INDPTR][start : stop + 1].astype(np.int64)
            if len(ip) != stop - start + 1 or (len(ip) > 1 and np.any(np.diff(ip) < 0)) or (len(ip) and ip[0] < 0):
                self._damaged(shard, start, stop, f"{INDPTR} is not monotonic non-decreasing")
            span_indptr.append(ip)
        span_nnz = np.array([int(ip[-1] - ip[0]) for ip in span_indptr], dtype=np.int64)
        first_entry = np.concatenate([[0], np.cumsum(span_nnz)])
        gene_ids = np.empty(int(first_entry[-1]), dtype=np.result_type(*[f[INDICES].dtype for f in files]))
        counts = np.empty(int(first_entry[-1]), dtype=np.result_type(*[f[DATA].dtype for f in files]))
        for f, ip, to, n, (shard, start, stop) in zip(files, span_indptr, first_entry, span_nnz, spans):
            if not n:
                continue
            if int(ip[-1]) > f[INDICES].shape[0]:
                self._damaged(shard, start, stop, f"{INDPTR} points past the end of {INDICES}")
            source, dest = np.s_[int(ip[0]) : int(ip[-1])], np.s_[int(to) : int(to + n)]
            with self._checked(shard, start, stop):
                f[INDICES].read_direct(gene_ids, source_sel=source, dest_sel=dest)
                f[DATA].read_direct(counts, source_sel=source, dest_sel=dest)
            ids = gene_ids[int(to) : int(to + n)]
            if ids.min() < 0 or ids.max() >= len(self.vocab):
                self._damaged(
                    shard, start, stop, f"gene id {int(ids.max())} is outside the vocabulary (0:{len(self.vocab)})"
                )
        indptr = np.concatenate([[0]] + [ip[1:] - ip[0] + to for ip, to in zip(span_indptr, first_entry)])
        obs_keys = list(files[0][OBS_GROUP]) if OBS_GROUP in files[0] else []
        obs = {k: [] for k in obs_keys}
        for f, (shard, start, stop) in zip(files, spans):
            with self._checked(shard, start, stop):
                for k in obs_keys:
                    obs[k].append(f[OBS_GROUP][k][start:stop])
        block = CellBlock(
            indptr=indptr.astype(np.int64),
            gene_ids=gene_ids,
            counts=counts,
            cell_index=np.concatenate(
                [np.arange(start, stop, dtype=np.int64) + self.shard_offsets[shard] for shard, start, stop in spans]
            ),
            obs={k: np.concatenate(v) for k, v in obs.items()},
        )
        first_row = np.concatenate([[0], np.cumsum([stop - start for _, start, stop in spans])])[:-1]
        return block, first_row

    @contextmanager
    def _checked(self, shard: int, start: int, stop: int) -> Iterator[None]:
        """HDF5 reads of ``shard`` rows ``start:stop``: a block failing its checksum (HDF5 raises a bare
        OSError "filter returned failure during read") becomes an error naming the shard and rows."""
        try:
            yield
        except OSError as e:
            what = (
                f"a stored block fails its {CHECKSUM} checksum (corrupted bytes)"
                if "filter returned failure" in str(e)
                else f"cannot be read ({e})"
            )
            self._damaged(shard, start, stop, what)

    def _damaged(self, shard: int, start: int, stop: int, what: str):
        raise CorpusFormatError(
            f"shard {self.shard_path(shard)} rows {start}:{stop}: {what}; the file is damaged. "
            f"Check it with `python scripts/corpus.py verify {self.root}` and rebuild the corpus."
        )

    def read_source_rows(self, shard: int, start: int, stop: int) -> np.ndarray:
        """(stop-start,) int64 row of each cell in its input (h5ad row / Census soma_joinid)."""
        with self._checked(shard, start, stop):
            return self._file(shard)[SOURCE_ROW][start:stop]

    def read_obs_codes(self, shard: int, column: str) -> np.ndarray:
        """(rows of the shard,) codes of one stored obs column (e.g. "dataset") of a whole shard."""
        group = self._file(shard)[OBS_GROUP]
        if column not in group:
            raise KeyError(f"{self.shard_path(shard)} stores no obs column {column!r} (stored: {sorted(group)})")
        with self._checked(shard, 0, int(self.shards[shard]["n_cells"])):
            return group[column][:]

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
