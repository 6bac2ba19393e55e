"""Read access to a corpus directory: contiguous blocks of CSR rows, one HDF5 slice each."""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import xxhash

from data_modules.store.format import (
    CHECKSUM,
    CHECKSUM_GROUP,
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
_TOLD_UNCHECKED: set[str] = set()  # corpora without per-block checksums already reported in this process
# HDF5 files a reading process keeps open, least recently used closed first: each open shard holds ~0.9 MB (HDF5's
# metadata, h5py objects, its checksum tables) and a file descriptor, so a loader worker that visits every shard of
# a 33M-cell corpus (~2,000 shards) would otherwise hold ~1.8 GB and ~2,000 descriptors (docs/data_pipeline.md)
MAX_OPEN_SHARDS = 128


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
    fork), so one ``Corpus`` can be handed to DataLoader workers; at most ``max_open_shards`` stay open (least
    recently used closed first), so a reader's memory and descriptors do not grow with the number of shards.
    """

    def __init__(self, root: str | os.PathLike, max_open_shards: int = MAX_OPEN_SHARDS):
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self.max_open_shards = int(max_open_shards)
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
        self._handles: OrderedDict[int, h5py.File] = OrderedDict()  # least recently used first
        self._digests: dict[tuple[int, str], tuple] = {}  # (shard, dataset) -> Corpus._dataset
        self._pid = os.getpid()
        unchecked = sum(1 for s in self.shards if s.get("checksums") != CHECKSUM)
        if unchecked and str(self.root.resolve()) not in _TOLD_UNCHECKED:  # once per corpus and process
            _TOLD_UNCHECKED.add(str(self.root.resolve()))
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
    def _own_handles(self) -> None:
        if os.getpid() != self._pid:  # forked into a worker: never share HDF5 handles (nor datasets opened on them)
            self._handles, self._digests = OrderedDict(), {}
            self._pid = os.getpid()

    def _file(self, shard: int) -> h5py.File:
        self._own_handles()
        f = self._handles.get(shard)
        if f is not None:
            self._handles.move_to_end(shard)
            return f
        path = self.shard_path(shard)
        try:
            f = h5py.File(path, "r")
        except (OSError, FileNotFoundError) as e:
            raise CorpusFormatError(
                f"cannot open shard {path} ({e}); run `python scripts/corpus.py verify {self.root}`"
            ) from None
        self._handles[shard] = f
        while len(self._handles) > self.max_open_shards:
            self._close_shard(next(iter(self._handles)))
        return f

    def _close_shard(self, shard: int) -> None:
        """Close one shard's file and forget what was looked up in it (datasets, checksum tables)."""
        f = self._handles.pop(shard)
        for key in [k for k in self._digests if k[0] == shard]:
            del self._digests[key]
        try:
            f.close()
        except Exception:
            pass

    @property
    def n_open_shards(self) -> int:
        """Shard files this process holds open now (at most ``max_open_shards``)."""
        self._own_handles()
        return len(self._handles)

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
        per-span array, no dtype conversion; gene ids stay in the stored dtype) when the span is aligned to
        the shard's 64-cell checksum blocks (the loader's always are), else through a buffer widened to them.
        Every block read is hashed and compared with its stored digest (format.CHECKSUM; shards written before
        checksums skip this), and the CSR structure of what was read is checked (monotonic ``indptr``, ids
        inside the vocabulary): a damaged shard raises :class:`CorpusFormatError` naming the shard and rows,
        never a bare ``IndexError`` or a silently wrong count later.
        """
        span_indptr, span_cells = [], []  # indptr of each span's rows, and of the whole checksum blocks they touch
        for shard, start, stop in spans:
            c0, c1 = self._cell_blocks(shard, start, stop)
            ipx = self._read(shard, INDPTR, c0, c1 + 1, (start, stop)).astype(np.int64)
            if len(ipx) != c1 - c0 + 1 or (len(ipx) > 1 and np.any(np.diff(ipx) < 0)) or (len(ipx) and ipx[0] < 0):
                self._damaged(shard, start, stop, f"{INDPTR} is not monotonic non-decreasing")
            span_indptr.append(ipx[start - c0 : stop - c0 + 1])
            span_cells.append((c0, ipx))
        span_nnz = np.array([int(ip[-1] - ip[0]) for ip in span_indptr], dtype=np.int64)
        first_entry = np.concatenate([[0], np.cumsum(span_nnz)])
        shards = [shard for shard, _, _ in spans]
        gene_ids = np.empty(int(first_entry[-1]), dtype=np.result_type(*[self._dataset(i, INDICES)[1] for i in shards]))
        counts = np.empty(int(first_entry[-1]), dtype=np.result_type(*[self._dataset(i, DATA)[1] for i in shards]))
        for (c0, ipx), to, n, (shard, start, stop) in zip(span_cells, first_entry[:-1], span_nnz, spans, strict=True):
            if not n:
                continue
            if int(ipx[-1]) > self._dataset(shard, INDICES)[2]:
                self._damaged(shard, start, stop, f"{INDPTR} points past the end of {INDICES}")
            to = int(to)
            self._read_entries(shard, INDICES, c0, ipx, (start, stop), gene_ids[to : to + n])
            self._read_entries(shard, DATA, c0, ipx, (start, stop), counts[to : to + n])
            ids = gene_ids[to : to + n]
            if ids.min() < 0 or ids.max() >= len(self.vocab):
                self._damaged(
                    shard, start, stop, f"gene id {int(ids.max())} is outside the vocabulary (0:{len(self.vocab)})"
                )
        indptr = np.concatenate(
            [[0]] + [ip[1:] - ip[0] + to for ip, to in zip(span_indptr, first_entry[:-1], strict=True)]
        )
        first_file = self._file(spans[0][0]) if spans else None  # (re)opened: other spans may have closed it
        obs_keys = list(first_file[OBS_GROUP]) if first_file is not None and OBS_GROUP in first_file else []
        obs = {
            k: np.concatenate(
                [self._read(shard, f"{OBS_GROUP}/{k}", start, stop, (start, stop)) for shard, start, stop in spans]
            )
            for k in obs_keys
        }
        block = CellBlock(
            indptr=indptr.astype(np.int64),
            gene_ids=gene_ids,
            counts=counts,
            cell_index=np.concatenate(
                [np.arange(start, stop, dtype=np.int64) + self.shard_offsets[shard] for shard, start, stop in spans]
            ),
            obs=obs,
        )
        first_row = np.concatenate([[0], np.cumsum([stop - start for _, start, stop in spans])])[:-1]
        return block, first_row

    def _dataset(self, shard: int, name: str) -> tuple[h5py.Dataset, np.dtype, int, tuple[int, np.ndarray] | None]:
        """(dataset ``name`` of ``shard``, its dtype, its length, (cells per block, digest per block) or None for a
        shard without checksums), looked up once per shard and process: h5py lookups cost more than small reads."""
        self._own_handles()
        key = (shard, name)
        meta = self._digests.get(key)
        if meta is None:
            f = self._file(shard)
            try:
                ds = f[name]
                sums = f.get(f"{CHECKSUM_GROUP}/{name}")
                meta = (ds, ds.dtype, ds.shape[0], None if sums is None else (int(sums.attrs["block"]), sums[:]))
            except (OSError, KeyError) as e:
                self._damaged(shard, 0, int(self.shards[shard]["n_cells"]), f"{name} or its checksum table: {e}")
            self._digests[key] = meta
        return meta

    def _block_digests(self, shard: int, name: str) -> tuple[int, np.ndarray] | None:
        return self._dataset(shard, name)[3]

    def _cell_blocks(self, shard: int, start: int, stop: int) -> tuple[int, int]:
        """The rows of the whole checksum blocks that rows ``start:stop`` touch (``start:stop`` itself for a
        shard without checksums; the loader's blocks are aligned to them, so it reads no extra row)."""
        sums = self._block_digests(shard, INDICES)
        if sums is None or stop <= start:
            return start, stop
        block = sums[0]
        return start // block * block, min(-(-stop // block) * block, int(self.shards[shard]["n_cells"]))

    def _read(self, shard: int, name: str, lo: int, hi: int, rows: tuple[int, int]) -> np.ndarray:
        """Elements ``lo:hi`` of a per-cell dataset (``indptr``, ``source_row``, ``obs/<column>``) of ``shard``,
        every block of elements they touch checked against its digest (format.CHECKSUM); a mismatch or an
        unreadable block raises naming the shard and the cell ``rows``."""
        ds, dtype, length, sums = self._dataset(shard, name)
        try:
            if sums is None or hi <= lo:
                return ds[lo:hi]
            block, digests = sums
            b0, b1 = lo // block, -(-hi // block)
            if b1 > len(digests):
                self._damaged(shard, *rows, f"{name} is longer than its checksum table")
            a0, a1 = b0 * block, min(b1 * block, length)
            buf = np.empty(a1 - a0, dtype=dtype)
            ds.read_direct(buf, source_sel=np.s_[a0:a1], dest_sel=np.s_[0 : a1 - a0])
        except OSError as e:
            self._damaged(shard, *rows, f"{name} cannot be read ({e})")
        for j in range(b0, b1):
            self._check_block(buf[j * block - a0 : (j + 1) * block - a0], digests[j], shard, name, j, rows)
        return buf[lo - a0 : hi - a0]

    def _read_entries(
        self, shard: int, name: str, c0: int, ipx: np.ndarray, rows: tuple[int, int], out: np.ndarray
    ) -> None:
        """The entries (``indices`` / ``data``) of cells ``rows`` into ``out``. ``ipx`` is ``indptr`` of rows
        ``c0:c0 + len(ipx) - 1``, the whole checksum blocks of cells around ``rows`` (see ``_cell_blocks``); each
        block's entries are checked against its digest. When ``rows`` is aligned to the blocks (the loader's
        reads), the entries are read straight into ``out`` and hashed there."""
        start, stop = rows
        lo, hi = int(ipx[start - c0]), int(ipx[stop - c0])
        e0, e1 = int(ipx[0]), int(ipx[-1])
        ds, dtype, _, sums = self._dataset(shard, name)
        try:
            if sums is None or (e0 == lo and e1 == hi and out.dtype == dtype):
                ds.read_direct(out, source_sel=np.s_[lo:hi], dest_sel=np.s_[0 : hi - lo])
                buf = out
            else:
                buf = np.empty(e1 - e0, dtype=dtype)
                ds.read_direct(buf, source_sel=np.s_[e0:e1], dest_sel=np.s_[0 : e1 - e0])
        except OSError as e:
            self._damaged(shard, start, stop, f"{name} cannot be read ({e})")
        if sums is not None:
            block, digests = sums
            c1 = c0 + len(ipx) - 1
            for j in range(c0 // block, -(-c1 // block)):
                a, b = int(ipx[j * block - c0]) - e0, int(ipx[min((j + 1) * block, c1) - c0]) - e0
                if j >= len(digests):
                    self._damaged(shard, start, stop, f"{name} is longer than its checksum table")
                self._check_block(buf[a:b], digests[j], shard, name, j, rows)
        if buf is not out:
            out[:] = buf[lo - e0 : hi - e0]

    def _check_block(self, values: np.ndarray, digest, shard: int, name: str, j: int, rows) -> None:
        if xxhash.xxh3_64_intdigest(memoryview(values).cast("B")) != int(digest):
            self._damaged(
                shard, *rows, f"block {j} of {name} fails its {CHECKSUM} checksum (corrupted bytes; read refused)"
            )

    def _damaged(self, shard: int, start: int, stop: int, what: str):
        raise CorpusFormatError(
            f"shard {self.shard_path(shard)} rows {start}:{stop}: {what}; the file is damaged. "
            f"Check it with `python scripts/corpus.py verify {self.root}` and rebuild the corpus."
        )

    def read_source_rows(self, shard: int, start: int, stop: int) -> np.ndarray:
        """(stop-start,) int64 row of each cell in its input (h5ad row / Census soma_joinid)."""
        return self._read(shard, SOURCE_ROW, start, stop, (start, stop))

    def cell_lengths(self, shard: int) -> np.ndarray:
        """(rows of the shard,) int64 non-zeros per cell, from its checked ``indptr`` alone (no gene data)."""
        n = int(self.shards[shard]["n_cells"])
        return np.diff(self._read(shard, INDPTR, 0, n + 1, (0, n)).astype(np.int64))

    def read_obs_codes(self, shard: int, column: str) -> np.ndarray:
        """(rows of the shard,) codes of one stored obs column (e.g. "dataset") of a whole shard."""
        group = self._file(shard)[OBS_GROUP]
        if column not in group:
            raise KeyError(f"{self.shard_path(shard)} stores no obs column {column!r} (stored: {sorted(group)})")
        n = int(self.shards[shard]["n_cells"])
        return self._read(shard, f"{OBS_GROUP}/{column}", 0, n, (0, n))

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
        self._own_handles()
        for shard in list(self._handles):
            self._close_shard(shard)

    def __getstate__(self):  # picklable for spawn-started workers: handles are reopened there
        state = self.__dict__.copy()
        state["_handles"], state["_digests"] = OrderedDict(), {}
        return state

    def __enter__(self) -> Corpus:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
