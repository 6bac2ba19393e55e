"""Atlas mode: a corpus reference, embedded streaming and resumably.

Atlas mode: a reference given as a corpus directory (``scripts/build_corpus.py``) is embedded streaming, in
chunks of ``chunk_cells`` cells read with ``Corpus.read_cells`` (sparse rows only, never a dense cells x genes
matrix), with one progress bar. Each finished chunk is written atomically to ``<index dir>/chunks/`` and
recorded in ``<index dir>/journal.json``; a rerun of the same command skips finished chunks, and once the
index is built and saved a rerun reloads it. Peak memory: the model + one read block + one chunk of
embeddings + the index (flat: n x d x 4 bytes; IVF-PQ: its training sample + n (m + 8) bytes).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from data_modules.atomic import atomic_path, write_json_atomic
from data_modules.vocab import GeneVocab
from scgpt_train.inference import BatchOptions, embed_cells, l2_normalize
from scgpt_train.inference_batches import SEED_GROUP, CellTokens
from scgpt_train.precision import resolve_precision
from scgpt_train.tasks.reference_map.common import (
    CORPUS_UNKNOWN,
    FLAT_MAX_CELLS,
    IVF_TRAIN_MAX,
    READ_BLOCK_CELLS,
    ReferenceMapError,
    ReferenceMapParams,
)
from scgpt_train.tasks.reference_map.index import KnnIndex, choose_index

log = logging.getLogger(__name__)


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

    Cells are tokenized with the checkpoint's layout (no generative split, no masking, ``cls_value``), float32
    values, in seed groups of 64 corpus cells (``default_rng([seed, 64 k, n])``) and embedded by
    :func:`~scgpt_train.inference.embed_cells` (sorted, packed, token budget, ``precision``): the same embeddings
    ``embed.py`` gives the same cells from an h5ad.
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
        params: ReferenceMapParams | None = None,
        **overrides,
    ):
        """``params``: batch_size, chunk_cells, max_seq_len, cls_value, seed, device, precision, progress, overwrite
        (``overrides`` replace single fields)."""
        from data_modules.store.reader import Corpus
        from data_modules.tokenize import Tokenizer, TokenizerConfig

        p = ReferenceMapParams.of(params, **overrides)
        self.model, self.vocab, self.checkpoint = model, vocab, checkpoint
        self.corpus = Corpus(corpus_path)
        self.corpus_path = Path(corpus_path)
        self.work_dir = Path(work_dir)
        self.label_key = label_key
        self.label_names = check_corpus_label(corpus_path, label_key)
        self.batch_size = p.batch_size
        # chunks hold whole seed groups, so a cell's tokens never depend on where a run stopped
        self.chunk_cells = max(SEED_GROUP, (int(p.chunk_cells) // SEED_GROUP) * SEED_GROUP)
        self.seed, self.progress = int(p.seed), p.progress
        self.device = p.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(p.precision, self.device)
        log.info("%s: precision: %s", corpus_path, self.precision.reason)
        if p.progress:
            print(f"{Path(corpus_path).name}: precision: {self.precision.reason}")
        layout = model.layout if p.max_seq_len is None else model.layout.replace(max_seq_len=p.max_seq_len)
        self.tokenizer = Tokenizer(
            TokenizerConfig(layout=layout, cls_value=p.cls_value, gen_ratios=None, mlm_prob=None),
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
            "tokens": f"seed groups of {SEED_GROUP} cells",
            "precision": self.precision.name,
            "chunk_cells": self.chunk_cells,
            "layout": layout.to_dict(),
            "cls_value": self.tokenizer.config.cls_value,
        }
        self.done = self._open_journal(p.overwrite)

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

        def read(a: int, b: int):  # cells lo + a .. lo + b of the corpus, read READ_BLOCK_CELLS at a time
            from data_modules.store.reader import CellBlock

            parts = []
            for b0 in range(lo + a, lo + b, READ_BLOCK_CELLS):
                block = self.corpus.read_cells(b0, min(b0 + READ_BLOCK_CELLS, lo + b))
                labels[b0 - lo : b0 - lo + len(block)] = block.obs[self.label_key]
                block.gene_ids = block.gene_ids.astype(np.int32, copy=False)
                # float32 like the AnnDataModule's rows: the binning kernels draw tie-breaks differently for
                # integer input, and the same cells must get the same bins from a corpus as from an h5ad
                block.counts = block.counts.astype(np.float32, copy=False)
                if self.lut is not None:
                    block = _remap_block(block, self.lut)
                empty[b0 - lo : b0 - lo + len(block)] = np.diff(block.indptr) == 0
                parts.append(block)
            shifts = np.cumsum([0] + [int(p.indptr[-1]) for p in parts[:-1]])
            return CellBlock(
                indptr=np.concatenate([[0]] + [p.indptr[1:] + s for p, s in zip(parts, shifts, strict=True)]),
                gene_ids=np.concatenate([p.gene_ids for p in parts]),
                counts=np.concatenate([p.counts for p in parts]),
                cell_index=np.arange(a, b, dtype=np.int64),
            )

        cells = CellTokens(read, hi - lo, self.tokenizer, seed=self.seed, first_cell=lo)
        out = embed_cells(
            self.model,
            cells,
            options=BatchOptions(max_cells=self.batch_size),
            precision=self.precision,
            device=self.device,
            progress=False,
        )
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
