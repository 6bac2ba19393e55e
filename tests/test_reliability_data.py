"""Nothing trains on wrong data (issue #17 items 1 and 3): a corpus is checked when a run opens it, and a
checkpoint whose vocabulary differs from the data's is refused before the first step."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from helpers.corpora import make_stream_corpus

from data_modules.datamodule import CorpusDataModule
from data_modules.store.convert import Source, convert_sources
from data_modules.store.format import VERIFIED_CACHE, CorpusFormatError
from data_modules.store.reader import Corpus
from data_modules.vocab import GeneVocab, VocabError

KW = dict(tokenizer={"layout": {"max_seq_len": 33}}, batch_size=8, block_size=32, buffer_blocks=2)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return make_stream_corpus(tmp_path_factory.mktemp("integrity") / "corpus")


@pytest.fixture
def corpus_copy(corpus_dir, tmp_path) -> Path:
    root = tmp_path / "corpus"
    shutil.copytree(corpus_dir, root)
    return root


def _shard(root: Path, i: int = 1) -> Path:
    return Corpus(root).shard_path(i)


def test_missing_and_truncated_shards_are_named_at_setup(corpus_copy):
    shard = _shard(corpus_copy)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CorpusFormatError, match=rf"shard 1 .*{shard.name}.*truncated.*scripts/corpus.py verify"):
        CorpusDataModule(str(corpus_copy), **KW).setup()
    shard.unlink()
    with pytest.raises(CorpusFormatError, match=r"shard 1 .*the file is missing"):
        CorpusDataModule(str(corpus_copy), **KW).setup()


def test_verify_catches_flipped_bytes_and_caches_good_shards(corpus_copy):
    dm = CorpusDataModule(str(corpus_copy), verify=True, **KW)
    dm.setup()  # an intact corpus passes, and every shard is recorded
    cache = json.loads((corpus_copy / VERIFIED_CACHE).read_text())
    assert len(cache) == Corpus(corpus_copy).n_shards

    shard = _shard(corpus_copy, 2)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    CorpusDataModule(str(corpus_copy), **KW).setup()  # the cheap size check cannot see it ...
    with pytest.raises(CorpusFormatError, match=r"shard 2 .*sha256 differs.*scripts/corpus.py verify"):
        CorpusDataModule(str(corpus_copy), verify=True, **KW).setup()  # ... the checksum does, mtime changed

    # the shard repaired: only it is hashed again (the damaged one left the cache), then nothing is
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    from data_modules.store.integrity import verify_checksums

    assert verify_checksums(Corpus(corpus_copy)) == 1  # only the rewritten shard is hashed again
    assert verify_checksums(Corpus(corpus_copy)) == 0


def test_verify_where_the_cache_cannot_be_written_still_checks(corpus_copy, caplog):
    (corpus_copy / VERIFIED_CACHE).mkdir()  # the cache path cannot be written (as on a read-only corpus)
    CorpusDataModule(str(corpus_copy), verify=True, **KW).setup()
    assert "could not record verified shards" in caplog.text


def test_a_corpus_without_validation_cells_says_so(tmp_path, caplog):
    from helpers.corpora import _adata

    rng = np.random.default_rng(0)
    root = tmp_path / "noval"
    convert_sources([Source("a", _adata(rng, 120, 50, "a"))], root, split={"strategy": "cell", "val_fraction": 0.0})
    with caplog.at_level(logging.WARNING, logger="data_modules.datamodule"):
        CorpusDataModule(str(root), **KW).setup()
    assert "0 validation cells (of 120): no validation will run" in caplog.text
    assert "--val-fraction" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# vocabulary guard (item 1)


def _vocab_with(root: Path, swap: tuple[str, str] | None = None, extra: int = 0) -> GeneVocab:
    tokens = list(Corpus(root).vocab.token_to_id)
    if swap:
        i, j = tokens.index(swap[0]), tokens.index(swap[1])
        tokens[i], tokens[j] = tokens[j], tokens[i]
    tokens += [f"NEW{k}" for k in range(extra)]
    return GeneVocab({t: i for i, t in enumerate(tokens)})


def test_vocab_difference_counts_and_names_tokens(corpus_dir):
    data = Corpus(corpus_dir).vocab
    assert data.difference(data) is None
    swapped = _vocab_with(corpus_dir, swap=("G3", "G7"))
    text = swapped.difference(data)
    assert "2 of" in text and "'G7'" in text and "'G3'" in text  # same size, different tokens: caught
    grown = _vocab_with(corpus_dir, extra=3)
    assert "3 tokens" in grown.difference(data) and "NEW0" in grown.difference(data)


def _train_cfg(root: Path, out: Path, extra: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "experiment=demo",
                f"paths.corpus={root}",
                "data=corpus",
                "data.num_workers=0",
                "data.block_size=32",
                "data.batch_size=8",
                f"paths.output_dir={out}",
                "logger=none",
                "callbacks.progress_bar=null",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "validate_before_fit=false",
                *extra,
            ],
        )


def test_resume_onto_another_vocabulary_is_refused(corpus_dir, tmp_path):
    """A run dir trained on one corpus, resumed on a corpus of the same size whose tokens differ."""
    from scgpt_train.pipeline import run

    out = tmp_path / "run"
    run(_train_cfg(corpus_dir, out, []))
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    other = tmp_path / "other"
    shutil.copytree(corpus_dir, other)
    swapped = _vocab_with(corpus_dir, swap=("G3", "G7"))
    (other / "vocab.json").write_text(json.dumps(swapped.token_to_id))  # same size, genes swapped
    manifest = json.loads((other / "manifest.json").read_text())
    from data_modules.store.format import file_sha256

    manifest["vocab"]["sha256"] = file_sha256(other / "vocab.json")
    (other / "manifest.json").write_text(json.dumps(manifest))
    before = torch.load(ckpt, weights_only=False)["global_step"]
    with pytest.raises(VocabError, match=r"2 of .* tokens differ.*'G7'.*--vocab.*new run dir"):
        run(_train_cfg(other, out, ["trainer.max_steps=4"]))  # auto-resume
    with pytest.raises(VocabError, match=r"tokens differ"):
        run(_train_cfg(other, tmp_path / "elsewhere", [f"ckpt_path={ckpt}", "trainer.max_steps=4"]))
    assert torch.load(ckpt, weights_only=False)["global_step"] == before  # nothing trained, nothing written


def test_pretrained_with_another_vocabulary_is_refused(corpus_dir, tmp_path):
    """pretrained= an official checkpoint whose vocabulary is not the corpus': our message, not a state_dict one."""
    from scgpt_train.pipeline import build_modules

    if not (FIXTURES / "best_model.pt").is_file():
        pytest.skip(f"official fixtures not found at {FIXTURES}")
    cfg = _train_cfg(corpus_dir, tmp_path / "ft", ["model=from_official", f"pretrained={FIXTURES}"])
    with pytest.raises(VocabError, match=r"checkpoint .* vocabulary .* tokens.*--vocab"):
        build_modules(cfg)


def test_check_run_reports_checkpoints_and_vocabulary(corpus_dir, tmp_path, capsys):
    """scripts/check_run.py: the resume point, corrupt files, and a corpus whose vocabulary differs (exit 1). The
    script runs once as a program; the other checks call its main() in this process (the same code, no start-up)."""
    import runpy
    import subprocess
    import sys

    from scgpt_train.pipeline import run

    out = tmp_path / "run"
    run(_train_cfg(corpus_dir, out, []))
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_run.py"
    good = subprocess.run(
        [sys.executable, str(script), str(out), "--corpus", str(corpus_dir)], capture_output=True, text=True
    )
    assert good.returncode == 0, good.stderr
    assert "resumes from" in good.stdout and "step 2)" in good.stdout and "the same" in good.stdout
    main = runpy.run_path(str(script))["main"]

    def check(*extra) -> tuple[int, str]:
        capsys.readouterr()
        code = main([str(out), *extra])
        return code, capsys.readouterr().out

    other = tmp_path / "other"
    from helpers.corpora import _adata

    convert_sources([Source("a", _adata(np.random.default_rng(1), 80, 40, "x"))], other)
    assert "VOCABULARY differs" in check("--corpus", str(other))[1]
    (out / "checkpoints" / "broken.ckpt").write_bytes(b"not a checkpoint")
    code, stdout = check()
    assert code == 1 and "CORRUPT" in stdout
    assert (out / "checkpoints" / "broken.ckpt").exists()  # read-only: nothing moved


def test_counts_with_a_few_fractional_values_are_refused_unless_declared():
    """Raw counts with one fractional value were read as log1p values (a silent wrong input): now type ``mixed``,
    refused naming the first such cell and gene, unless the user declares what the values are."""
    import scipy.sparse as sp

    from data_modules.value_types import ValueTypeError, declared_value_type, detect_value_type, preprocessing_steps

    x = np.random.default_rng(0).poisson(2.0, (40, 60)).astype(np.float32)
    x[:, 0] += 1
    x[17, 11] = 0.5
    cells, genes = [f"cell-{i}" for i in range(40)], [f"G{j}" for j in range(60)]
    rep = detect_value_type(sp.csr_matrix(x), "f.h5ad: X", cells, genes)
    assert rep.value_type == "mixed" and "0.5 at cell 'cell-17', gene 'G11'" in rep.evidence
    with pytest.raises(ValueTypeError, match=r"f.h5ad: X: looks like raw counts with values that are not whole"):
        preprocessing_steps(rep, 1e4, True)
    assert declared_value_type(sp.csr_matrix(x), "log1p", "f.h5ad: X").value_type == "log1p"  # the user says so
    with pytest.raises(ValueTypeError, match="value_type=counts but the values say otherwise"):
        declared_value_type(sp.csr_matrix(x), "counts", "f.h5ad: X")
    x[17, 11] = 1.0  # all whole numbers again: counts
    assert detect_value_type(sp.csr_matrix(x)).value_type == "counts"
