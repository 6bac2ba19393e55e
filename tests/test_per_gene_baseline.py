"""The pretraining-quality figure: validation GEP / GEPC against each gene's training mean (objectives/per_gene.py),
in metrics.csv, summary.json and every checkpoint."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from scgpt_train.objectives import masked_mse
from scgpt_train.objectives.per_gene import PerGeneMean, per_gene_ratios


def test_per_gene_mean_is_each_genes_training_mean():
    gene_ids = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]])  # (B=2, L=4); gene 4 is never a target
    target = torch.tensor([[1.0, 10.0, 5.0, 7.0], [3.0, 20.0, 9.0, 2.0]])
    where = torch.tensor([[True, True, True, False], [True, True, False, False]])
    pg = PerGeneMean(vocab_size=6)
    pg.update(gene_ids, target, where)
    overall = (1 + 10 + 5 + 3 + 20) / 5
    predicted = pg.predict(torch.tensor([[0, 1, 2, 3, 5]]))
    assert torch.allclose(predicted, torch.tensor([[2.0, 15.0, 5.0, overall, overall]]))
    # the loss is the model's masked MSE formula with the per-gene means as the prediction
    expected = masked_mse(torch.tensor([[2.0, 15.0, 5.0, overall]] * 2), target, where)
    assert torch.allclose(pg.loss(gene_ids, target, where), expected)
    restored = PerGeneMean()  # no size given: grows to the ids it sees, and a state round trip is exact
    restored.load_state_dict(pg.state_dict())
    assert torch.equal(restored.predict(gene_ids), pg.predict(gene_ids))
    grown = PerGeneMean()
    grown.update(gene_ids, target, where)
    assert torch.equal(grown.predict(gene_ids), pg.predict(gene_ids))


def test_a_gene_identity_model_scores_one():
    metrics = {
        "val/generative/gep": torch.tensor(208.0),
        "val/generative/gepc": torch.tensor(104.0),
        "val/generative/per_gene_baseline": torch.tensor(208.0),
        "val/loss": torch.tensor(312.0),
        "val/cls/cls": torch.tensor(1.0),  # no baseline for this objective: no ratio
    }
    assert per_gene_ratios(metrics) == {
        "val/generative/gep_vs_per_gene": 1.0,
        "val/generative/gepc_vs_per_gene": 0.5,
    }


def test_demo_run_reports_the_per_gene_baseline(demo_run):
    rows = list(csv.DictReader((demo_run / "csv" / "metrics.csv").open()))
    val = [r for r in rows if r.get("val/generative/per_gene_baseline")]
    assert val, "no validation row with the per-gene baseline"
    last = val[-1]
    gep, base = float(last["val/generative/gep"]), float(last["val/generative/per_gene_baseline"])
    assert base > 0 and float(last["val/generative/gep_vs_per_gene"]) == pytest.approx(gep / base, rel=1e-5)
    summary = json.loads((demo_run / "summary.json").read_text())["val_per_gene"]
    assert summary["val/generative/gep_vs_per_gene"] == pytest.approx(gep / base, rel=1e-5)
    ckpt = torch.load(demo_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert float(ckpt["per_gene_mean"]["counts"].sum()) > 0  # the running means travel with the checkpoint
