"""An imported official checkpoint continues training through train.py on a corpus built with its vocab."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, run_cmd, train_in_process


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The fixture imported as scripts/import_scgpt.py does, in this process (the script itself runs in
    tests/test_checkpoints.py and tests/test_embed.py)."""
    from scgpt_train.checkpoints import load_official, save_checkpoint

    out = tmp_path_factory.mktemp("imported") / "tiny.pt"
    model, vocab = load_official(FIXTURES, return_vocab=True)
    save_checkpoint(model, vocab, out)
    return out


@pytest.fixture(scope="module")
def corpus_with_fixture_vocab(tmp_path_factory):
    """celltypist's real raw counts, mapped onto the fixture's 120-gene vocabulary."""
    import anndata as ad

    from data_modules.demo import celltypist_adata
    from data_modules.store.convert import Source, convert_sources
    from data_modules.vocab import GeneVocab

    vocab = GeneVocab.from_json(FIXTURES / "vocab.json")
    adata = celltypist_adata()
    known = [g for g in adata.var_names if g in vocab]
    assert len(known) >= 20
    out = tmp_path_factory.mktemp("fixture_corpus") / "corpus"
    convert_sources(
        [Source("celltypist", ad.AnnData(adata[:, known].X, obs=adata.obs, var=adata[:, known].var))],
        out,
        vocab=vocab,
        obs_columns=["cell_type"],
        shard_size=128,
        split={"strategy": "cell", "seed": 0, "val_fraction": 0.1},
    )
    return out


def test_vocab_from_checkpoint_reads_every_format(imported):
    from data_modules.vocab import GeneVocab

    official = GeneVocab.from_checkpoint(FIXTURES)
    assert len(official) == 123 and official.pad_id == 120
    assert GeneVocab.from_checkpoint(imported).token_to_id == official.token_to_id


def test_finetune_from_imported_checkpoint(imported, corpus_with_fixture_vocab, tmp_path):
    run_cmd(
        [
            "train.py",
            "data=corpus",
            "model=from_official",
            f"pretrained={imported}",
            f"paths.corpus={corpus_with_fixture_vocab}",
            "data.num_workers=0",
            "data.batch_size=8",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["model"]["d_model"] == 32 and len(ckpt["vocab"]) == 123
    # the stored (non-zero, frozen) <pad> row of the official embedding survives fine-tuning untouched
    official = torch.load(FIXTURES / "best_model.pt", map_location="cpu", weights_only=False)
    pad_row = official["encoder.embedding.weight"][120]
    ours = ckpt["state_dict"]["model.gene_encoder.embedding.weight"][120]
    assert pad_row.abs().sum() > 0 and torch.equal(ours, pad_row)


def test_vocab_mismatch_is_refused_with_a_clear_message(imported, demo_corpus, tmp_path):
    """In-process: the refusal is raised while the run is built, before any training."""
    with pytest.raises(Exception, match="with the checkpoint's vocabulary"):
        train_in_process(
            ["model=from_official", f"pretrained={imported}", f"paths.cache_dir={demo_corpus.parent}"], tmp_path
        )
    assert not (tmp_path / "checkpoints").exists()
