"""CorpusDataModule under a real Lightning Trainer: checkpointed mid-epoch resume is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers.corpora import make_stream_corpus, split_ids
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from data_modules.batch import Batch
from data_modules.datamodule import CorpusDataModule
from data_modules.store.format import CorpusFormatError
from data_modules.stream import StreamLoader


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_stream_corpus(tmp_path_factory.mktemp("dm") / "corpus")


def train_ids(corpus_dir: Path) -> np.ndarray:
    return split_ids(corpus_dir, "train")


TOK = {"layout": {"max_seq_len": 33, "n_bins": 51}, "gen_ratios": [0.25, 0.5, 0.75], "mlm_prob": None}


class Recorder(pl.LightningModule):
    """Trains one scalar; remembers the cells of every training batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[np.ndarray] = []

    def training_step(self, batch: Batch, batch_idx: int):
        assert isinstance(batch, Batch)
        self.seen.append(batch.cell_index.cpu().numpy().copy())
        return ((self.w - batch.target_values[~batch.pad_mask].mean()) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def datamodule(corpus_dir: Path, num_workers: int) -> CorpusDataModule:
    return CorpusDataModule(
        str(corpus_dir),
        OmegaConf.create(TOK),
        batch_size=16,
        num_workers=num_workers,
        block_size=40,
        buffer_blocks=3,
        seed=3,
        lanes=4,
    )


def fit(corpus_dir, tmp: Path, num_workers: int, ckpt_path=None, **trainer_kw) -> Recorder:
    model = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp),
        callbacks=[ModelCheckpoint(dirpath=str(tmp / "ckpt"), every_n_train_steps=25, save_top_k=-1)],
        **trainer_kw,
    )
    trainer.fit(model, datamodule=datamodule(corpus_dir, num_workers), ckpt_path=ckpt_path)
    return model


@pytest.mark.slow
def test_lightning_checkpoint_resume_mid_epoch_is_exact(corpus, tmp_path):
    reference = fit(corpus, tmp_path / "ref", num_workers=2, max_epochs=2).seen
    interrupted = fit(corpus, tmp_path / "run", num_workers=2, max_steps=25).seen  # checkpoint at step 25
    ckpt = tmp_path / "run" / "ckpt" / "epoch=0-step=25.ckpt"
    assert ckpt.exists()
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["cursor"]["rr_done"] == 25  # 25 trained batches, not 26 fetched ones
    resumed = fit(corpus, tmp_path / "run", num_workers=1, ckpt_path=str(ckpt), max_epochs=2).seen
    assert len(interrupted) == 25 and len(interrupted) + len(resumed) == len(reference)
    for a, b in zip(interrupted + resumed, reference, strict=True):
        np.testing.assert_array_equal(a, b)
    epoch_len = len(reference) // 2
    for epoch in (reference[:epoch_len], reference[epoch_len:]):
        np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), train_ids(corpus))
    assert not np.array_equal(np.concatenate(reference[:epoch_len]), np.concatenate(reference[epoch_len:]))


def test_properties_builder_and_loaders(corpus, tmp_path):
    built = []

    def builder(path: str) -> None:
        built.append(path)
        import shutil

        shutil.copytree(corpus, path)

    dm = CorpusDataModule(
        str(tmp_path / "new"),
        TOK,
        batch_size=8,
        val_batch_size=32,
        builder=builder,
        block_size=40,
        buffer_blocks=3,
        max_val_cells=50,
    )
    dm.prepare_data()
    dm.setup("fit")
    assert built == [str(tmp_path / "new")]
    assert dm.pad_id == dm.vocab.pad_id and dm.cls_id == dm.vocab.cls_id and dm.vocab_size == len(dm.vocab)
    assert dm.n_train_cells == len(train_ids(corpus)) and dm.n_val_cells == 50
    assert isinstance(dm.train_dataloader(), StreamLoader)
    val = [b for b in dm.val_dataloader()]
    assert sum(b.n_cells for b in val) == 50 and max(b.n_cells for b in val) <= 32
    assert (val[0].gene_ids[:, 0] == dm.cls_id).all()


def test_missing_corpus_without_builder_says_what_to_do(tmp_path):
    dm = CorpusDataModule(str(tmp_path / "nothing"), TOK)
    with pytest.raises(CorpusFormatError, match=r"data.corpus_dir=.*nothing does not exist.*build_corpus"):
        dm.prepare_data()
