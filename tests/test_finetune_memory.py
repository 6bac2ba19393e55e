"""Own-data fine-tuning on a CPU (issue #27 item 3): the annotation recipe's memory layout and the epoch-time
estimate printed before training on a machine without a GPU."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from hydra import compose, initialize_config_dir

from data_modules.anndata_module import AnnDataModule
from scgpt_train.epoch_estimate import EpochTimeEstimate, estimate_epoch, estimate_line
from scgpt_train.model import ScGPT
from scgpt_train.module import ScGPTLitModule
from scgpt_train.objectives import CLSObjective

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"epoch time estimate on this CPU: ~(?P<value>[\d.]+) (?P<unit>s|min|h) per epoch \((?P<train>[\d,]+) training "
    r"\+ (?P<val>[\d,]+) validation cells at layout.max_seq_len=(?P<L>\d+); measured: (?P<n>\d+) training cells"
)


def test_annotation_recipe_steps_on_32_cells_in_micro_batches():
    """5-6 GB went to training activations of 32 cells x 3,001 tokens at once (~200 MB a cell in fp32) and to
    validation batches of 64: the recipe keeps the paper's 32 cells per optimizer step as micro-batches of 4."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=finetune_annotation", "pretrained=x.pt", "data.path=x.h5ad"])
    assert cfg.layout.max_seq_len == 3001  # the paper's layout stays the default
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 32
    assert cfg.data.batch_size <= 4 and cfg.data.val_batch_size <= 16
    for name in ("finetune_annotation_ms", "finetune_annotation_myeloid", "finetune_annotation_hpancreas"):
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            paper = compose("train", overrides=[f"experiment={name}"])
        assert paper.data.batch_size * paper.trainer.accumulate_grad_batches == 32


def toy_h5ad(path, n_cells: int = 90, n_genes: int = 30) -> str:
    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(0.8, (n_cells, n_genes)).astype(np.float32))
    obs = pd.DataFrame(
        {"cell_type": np.array(["T", "B", "NK"])[np.arange(n_cells) % 3]}, index=[f"c{i}" for i in range(n_cells)]
    )
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)])).write_h5ad(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("estimate")
    dm = AnnDataModule(toy_h5ad(out / "a.h5ad"), label_key="cell_type", batch_size=8)
    dm.setup()
    torch.manual_seed(0)
    net = ScGPT(
        vocab_size=len(dm.vocab), pad_token_id=dm.pad_id, d_model=16, n_heads=2, d_ff=32, n_layers=1, n_cls=dm.n_cls
    )
    module = ScGPTLitModule(net, {"cls": CLSObjective()}, optimizer=torch.optim.Adam)
    return dm, module


def test_estimate_is_measured_leaves_the_model_as_it_was_and_parses(setup):
    dm, module = setup
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.train()
    est = estimate_epoch(module, dm, 2)
    assert module.training and all(p.grad is None for p in module.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert (est["train_cells"], est["val_cells"], est["sample_cells"]) == (len(dm.indices("train")), 9, 2)
    m = LINE.search(estimate_line(est))
    assert m and int(m["L"]) == dm.layout.max_seq_len and int(m["n"]) == 2
    assert int(m["train"].replace(",", "")) == est["train_cells"]
    # the shorter layouts are suggested once an epoch is long; their cost follows the cells' real lengths
    long = {**est, "seconds": 3600.0, "max_seq_len": 3001, "shorter": {1201: 1500.0, 601: 700.0}}
    assert "layout.max_seq_len=1201 ~25 min, layout.max_seq_len=601 ~12 min per epoch" in estimate_line(long)
    lengths = dm.cell_lengths("train")
    assert lengths.max() <= dm.layout.max_seq_len and np.array_equal(
        lengths, np.minimum(np.diff(dm.store.rows(dm.indices("train")).indptr) + 1, dm.layout.max_seq_len)
    )


def test_the_estimate_line_is_printed_before_training_on_a_cpu(setup, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the estimate is for machines without a GPU")
    dm, module = setup
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        callbacks=[EpochTimeEstimate()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert LINE.search(capsys.readouterr().out)


def test_the_memory_benchmark_runs_the_recipe_and_reports_the_child_peak(small_pretrained, tmp_path, capsys):
    """``scripts/bench_finetune_memory.py`` end to end, at its smallest: the recipe's fine-tune in its own process
    on 60 of celltypist's real cells (the tiny pretrained model: short cells), its peak RSS from ``os.wait4`` and a
    finished run (the figures themselves: docs/benchmarks.md)."""
    import json
    import runpy

    main = runpy.run_path(str(ROOT / "scripts" / "bench_finetune_memory.py"))["main"]
    out = tmp_path / "bench"
    argv = ["--cells", "60", "--variants", "recipe", "--train-cells", "8", "--checkpoint", str(small_pretrained)]
    assert main([*argv, "--out", str(out), "--json", str(tmp_path / "m.json")]) == 0
    (row,) = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert row["variant"] == "recipe" and 100 < row["peak_rss_mb"] < 8192
    assert json.loads((out / "recipe" / "summary.json").read_text())["finished"] is True
    assert "| recipe | (the recipe) |" in capsys.readouterr().out
