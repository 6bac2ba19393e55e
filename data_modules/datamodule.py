"""LightningDataModule over a corpus directory: the pretraining train and validation streams."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from data_modules.store.format import MANIFEST_NAME, CorpusFormatError
from data_modules.store.integrity import check_shard_files, verify_checksums
from data_modules.store.reader import Corpus
from data_modules.stream import CellStream, StreamLoader
from data_modules.tokenize import TokenizerConfig, TokenLayout
from data_modules.vocab import GeneVocab, VocabSizes

log = logging.getLogger(__name__)
MIN_VAL_CELLS = 50  # fewer validation cells than this: warn that validation cannot select checkpoints
# batches Lightning's fit loop fetches ahead of the step it trains on: its prefetching fetcher
# skips prefetching for loaders with a length (ours), so 0 (tests/test_datamodule.py checks it)
LIGHTNING_PREFETCH = 0


class CorpusDataModule(VocabSizes, pl.LightningDataModule):
    """Block-shuffled training stream and deterministic validation stream of ``Batch`` es.

    Plain constructor values only (Hydra). ``layout`` is the TokenLayout shared with the model (a dict or
    DictConfig); ``tokenizer`` holds the other TokenizerConfig fields (cls_value, gen_ratios, mlm_prob).
    The train dataloader is stateful: Lightning stores its position in checkpoints, and a resumed run
    (at any world size) continues the epoch exactly.

    ``packing``: batches in the packed layout (one (1, T) token stream with ``cu_seqlens``, no padding;
    ``data_modules.batch``), train and validation alike. ``max_tokens``: a token budget per training batch
    instead of ``batch_size`` (the cell count whose expected tokens fit it; see ``CellStream``); validation
    keeps ``val_batch_size``.

    Parameters
    ----------
    corpus_dir : str
        The corpus directory (``scripts/build_corpus.py --out``).
    tokenizer : TokenizerConfig or dict, optional
        The TokenizerConfig fields beside the layout (``cls_value``, ``gen_ratios``, ``mlm_prob``).
    layout : TokenLayout or dict, optional
        The TokenLayout shared with the model (max_seq_len, n_bins, value style, pad / mask values).
    batch_size, val_batch_size : int
        Cells per training batch (unless ``max_tokens``) and per validation batch (None: ``batch_size``).
    num_workers : int
        Loader worker processes (0: read in the training process).
    block_size, buffer_blocks : int
        Rows per shuffled block of a shard, and blocks per lane window (the shuffle buffer; ``data_modules.stream``).
    seed : int
        Seed of the epoch plans (block order, lanes, shuffles, tokenization draws).
    builder : callable, optional
        ``builder(corpus_dir)`` builds the corpus when the directory holds none (the demo).
    max_val_cells : int, optional
        Validate on at most this many cells of the validation split (None: all).
    lanes, bucket_batches : int
        Contiguous lanes the split is cut into (read round robin), and batches a window groups by length.
    pin_memory : bool
        Page-locked batches (faster copies to a GPU).
    prefetch_factor : int, optional
        Batches each worker prepares ahead (None: torch's default).
    verify : bool
        sha256 of every shard against the manifest before training (cached per shard).
    packing : bool
        Batches in the packed layout (see above).
    max_tokens : int, optional
        A token budget per training batch instead of ``batch_size``.
    """

    def __init__(
        self,
        corpus_dir: str,
        tokenizer: TokenizerConfig | dict | Any = None,
        layout: TokenLayout | dict | Any = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        block_size: int = 256,
        buffer_blocks: int = 16,
        seed: int = 0,
        builder: Callable[[str], Any] | None = None,
        max_val_cells: int | None = None,
        lanes: int = 8,
        bucket_batches: int = 8,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        verify: bool = False,
        packing: bool = False,
        max_tokens: int | None = None,
    ):
        super().__init__()
        self.corpus_dir = str(corpus_dir)
        self.tokenizer_config = TokenizerConfig.from_any(tokenizer, layout=layout)
        self.layout = self.tokenizer_config.layout
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.block_size, self.buffer_blocks, self.seed = int(block_size), int(buffer_blocks), int(seed)
        self.builder = builder
        self.max_val_cells = max_val_cells
        self.lanes, self.bucket_batches = int(lanes), int(bucket_batches)
        self.pin_memory, self.prefetch_factor = bool(pin_memory), prefetch_factor
        self.verify = bool(verify)
        self.packing = bool(packing)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.corpus: Corpus | None = None
        self.train_stream: CellStream | None = None
        self.val_stream: CellStream | None = None

    # lifecycle ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if (Path(self.corpus_dir) / MANIFEST_NAME).exists():
            return
        if self.builder is None:
            where = Path(self.corpus_dir)
            what = "does not exist" if not where.exists() else f"is not a corpus (it holds no {MANIFEST_NAME})"
            raise CorpusFormatError(
                f"data.corpus_dir={self.corpus_dir} {what}: point data.corpus_dir (paths.corpus) at a corpus, "
                "or build one first (`python scripts/build_corpus.py ... --out DIR`); nothing was trained"
            )
        self.builder(self.corpus_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is not None:  # idempotent: pipeline.build calls setup before the Trainer does
            return
        self.corpus = Corpus(self.corpus_dir)
        check_shard_files(self.corpus)  # cheap: existence and size of every shard, before any read
        if self.verify:
            hashed = verify_checksums(self.corpus)
            log.info("corpus %s: sha256 verified (%d shards hashed, the rest cached)", self.corpus_dir, hashed)
        common = dict(
            tokenizer=self.tokenizer_config,
            block_size=self.block_size,
            buffer_blocks=self.buffer_blocks,
            seed=self.seed,
            lanes=self.lanes,
            bucket_batches=self.bucket_batches,
            packing=self.packing,
        )
        self.train_stream = CellStream(
            self.corpus_dir, "train", self.batch_size, shuffle=True, max_tokens=self.max_tokens, **common
        )
        self.val_stream = CellStream(
            self.corpus_dir, "val", self.val_batch_size, shuffle=False, max_cells=self.max_val_cells, **common
        )
        if self.val_stream.n_cells < MIN_VAL_CELLS:
            log.warning(
                "corpus %s has %d validation cells (of %d): %s. Rebuild it with a larger --val-fraction "
                "(scripts/build_corpus.py ... --val-fraction 0.05) to select checkpoints on validation loss.",
                self.corpus_dir,
                self.val_stream.n_cells,
                self.corpus.n_cells,
                "no validation will run and no best checkpoint is chosen"
                if self.val_stream.n_cells == 0
                else "the validation loss is too noisy to select checkpoints on",
            )

    # what scgpt_train.pipeline reads --------------------------------------------------
    @property
    def vocab(self) -> GeneVocab:
        return self._corpus().vocab

    @property
    def n_train_cells(self) -> int:
        self.setup()
        return self.train_stream.n_cells

    @property
    def n_val_cells(self) -> int:
        self.setup()
        return self.val_stream.n_cells

    def _corpus(self) -> Corpus:
        if self.corpus is None:
            self.setup()
        return self.corpus

    # loaders --------------------------------------------------------------------------
    def _loader(self, stream: CellStream, lookahead: int) -> StreamLoader:
        return StreamLoader(
            stream,
            num_workers=self.num_workers,
            consumer_lookahead=lookahead,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
        )

    def train_dataloader(self) -> StreamLoader:
        self.setup()
        return self._loader(self.train_stream, LIGHTNING_PREFETCH)

    def val_dataloader(self) -> StreamLoader:
        self.setup()
        return self._loader(self.val_stream, 0)
