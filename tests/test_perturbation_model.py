"""Perturbation model side (issue #12): the data module's batches (flags, all genes, flagged genes kept when
subsampling, pairing modes under a real Lightning trainer, split files), the official fixture's outputs through
our data path and prediction CLI, and clear errors on bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from conftest import FIXTURES as OFFICIAL

from data_modules.perturbation import PerturbationSplit
from data_modules.perturbation.datamodule import PerturbationDataModule
from data_modules.perturbation.gears_data import PerturbationDataError, to_gears_anndata
from data_modules.perturbation.inputs import (
    FLAG_PERTURBED,
    PerturbationInputError,
    make_batch,
    map_data_genes,
    select_columns,
)
from data_modules.vocab import GeneVocab
from scgpt_train.model import ScGPT
from scgpt_train.module import ScGPTLitModule
from scgpt_train.objectives import PerturbationMSEObjective
from scgpt_train.tasks.perturbation.predict import (
    PredictionInputError,
    condition_means_of,
    predict_conditions,
    predict_expression,
    read_controls,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = OFFICIAL / "perturbation"
TOL = 1e-5


# a small GEARS-format dataset --------------------------------------------------------------------------------------
def gears_file(path: Path, n_genes: int = 100, n_ctrl: int = 40, per_condition: int = 4, seed: int = 0) -> Path:
    """Log-normalized Poisson cells in GEARS layout: 12 singles, 10 pairs (planted knock-downs), ctrl."""
    rng = np.random.default_rng(seed)
    genes = np.array([f"G{i:03d}" for i in range(n_genes)])
    targets = genes[:12]
    singles = [f"{g}+ctrl" for g in targets]
    pairs = [f"{targets[i]}+{targets[j]}" for i, j in [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11),
                                                         (0, 2), (1, 3), (4, 6), (5, 7)]]  # fmt: skip
    conditions = ["ctrl"] * n_ctrl + [c for c in singles + pairs for _ in range(per_condition)]
    counts = rng.poisson(3.0, size=(len(conditions), n_genes)).astype(np.float64)
    index = {g: i for i, g in enumerate(genes)}
    for row, c in enumerate(conditions):
        for g in c.split("+"):
            if g != "ctrl":
                counts[row, index[g]] = 0.0
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    adata = to_gears_anndata(x, conditions, genes, "toy")
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return gears_file(tmp_path_factory.mktemp("pert") / "toy.h5ad")


def datamodule(path, **kw) -> PerturbationDataModule:
    kw.setdefault("layout", {"max_seq_len": 1537, "pad_value": 0.0})
    kw.setdefault("batch_size", 8)
    dm = PerturbationDataModule(str(path), **kw)
    dm.prepare_data()
    dm.setup()
    return dm


def flagged_of(dm, batch) -> list[set[int]]:
    """Per cell of a batch: the data columns its condition flags."""
    return [set(dm.condition_flags[int(c)].tolist()) for c in batch.obs["condition"]]


def batch_columns(dm, batch) -> np.ndarray:
    """Data columns of a batch's tokens (gene ids map back to columns: the toy vocab is the data's genes)."""
    col_of_id = {int(i): j for j, i in enumerate(dm.tokens.ids)}
    return np.asarray([col_of_id[int(i)] for i in batch.gene_ids[0]])


# batches -------------------------------------------------------------------------------------------------------------
def test_batches_hold_every_gene_flags_and_unbinned_values(toy):
    dm = datamodule(toy)
    batch = next(iter(dm.loader("test")))
    x = dm.x.toarray()
    assert batch.gene_ids.shape == (len(batch.cell_index), 100)  # all genes, no <cls>
    assert torch.equal(batch.gene_ids[0], torch.as_tensor(dm.tokens.ids))
    np.testing.assert_array_equal(batch.values.numpy(), x[batch.obs["control_index"].numpy()])  # log1p, not binned
    np.testing.assert_array_equal(batch.target_values.numpy(), x[batch.cell_index.numpy()])
    assert not batch.pad_mask.any()
    for i, flagged in enumerate(flagged_of(dm, batch)):
        assert set(np.flatnonzero(batch.condition_ids[i].numpy() == FLAG_PERTURBED).tolist()) == flagged
        assert 1 <= len(flagged) <= 2
    assert set(np.unique(batch.condition_ids.numpy())) <= {0, 1}
    assert dm.model_kwargs == {"n_conditions": 3, "condition_pad_id": 0}


def test_flagged_genes_always_kept_when_subsampling(toy):
    """30 of 100 genes per training batch: every flagged gene of every cell is among them (keep_perturbed_genes)."""
    dm = datamodule(toy, layout={"max_seq_len": 31, "pad_value": 0.0}, ctrl_identity=False)
    collate = dm.collate(subsample=True, seed=3)
    pairs = dm.pairing("train").pairs()
    items = list(zip(pairs.perturbed.tolist(), pairs.control.tolist(), strict=True))
    for start in range(0, len(items), 8):
        batch = collate(items[start : start + 8])
        cols = batch_columns(dm, batch)
        assert batch.gene_ids.shape[1] == 30 and len(set(cols.tolist())) == 30
        for i, flagged in enumerate(flagged_of(dm, batch)):
            assert flagged <= set(cols.tolist())
            on = set(cols[batch.condition_ids[i].numpy() == FLAG_PERTURBED].tolist())
            assert on == flagged
            np.testing.assert_array_equal(
                batch.values[i].numpy(), dm.x[int(batch.obs["control_index"][i])].toarray()[0, cols]
            )


def test_official_uniform_draw_drops_flagged_genes_reproducibly(toy):
    """keep_perturbed_genes=false is the tutorial's uniform subset: a flagged gene survives with probability
    max_genes / n_genes (30%), so ~70% of singles lose their perturbed gene; the same seed gives the same subsets."""
    dm = datamodule(toy, layout={"max_seq_len": 31, "pad_value": 0.0}, ctrl_identity=False, keep_perturbed_genes=False)
    pairs = dm.pairing("train").pairs()
    singles = [
        (p, c)
        for p, c in zip(pairs.perturbed, pairs.control, strict=True)
        if len(dm.condition_flags[dm.cell_codes[p]]) == 1
    ]
    collate = dm.collate(subsample=True, seed=11)
    kept = []
    for _ in range(150):
        batch = collate([(int(p), int(c)) for p, c in singles[:1]])
        kept.append(bool((batch.condition_ids == FLAG_PERTURBED).any()))
    assert 0.18 < np.mean(kept) < 0.42, np.mean(kept)  # binomial(150, 0.3): +- 4 sd
    again = dm.collate(subsample=True, seed=11)
    first = dm.collate(subsample=True, seed=11)
    for _ in range(5):
        item = [(int(p), int(c)) for p, c in singles[:3]]
        assert torch.equal(again(item).gene_ids, first(item).gene_ids)


def test_select_columns_rules():
    rng = np.random.default_rng(0)
    assert select_columns(10, None, np.array([3]), rng).tolist() == list(range(10))
    cols = select_columns(10, 4, np.array([7, 9]), rng)
    assert len(cols) == 4 and {7, 9} <= set(cols.tolist()) and list(cols) == sorted(cols)
    assert select_columns(10, None, np.array([8]), rng, True, np.array([1, 2])).tolist() == [1, 2, 8]
    assert select_columns(10, None, np.array([8]), rng, False, np.array([1, 2])).tolist() == [1, 2]
    with pytest.raises(PerturbationInputError, match="perturbs 3 different genes, more than max_genes=2"):
        select_columns(10, 2, np.array([1, 2, 3]), rng)


def test_unknown_genes_pad_mask_error_and_report(toy, tmp_path):
    """Genes outside a checkpoint's vocabulary: <pad> id (official, attended), masked, or refused - counted."""
    vocab = GeneVocab.from_genes([f"G{i:03d}" for i in range(90)])  # G090..G099 unknown
    vocab_path = tmp_path / "vocab.json"
    vocab.to_json(vocab_path)
    dm = datamodule(toy, vocab=str(vocab_path))
    report = dm.report()["genes"]
    assert report["n_not_in_vocab"] == 10 and report["not_in_vocab_examples"][0] == "G090"
    batch = next(iter(dm.loader("val")))
    assert (batch.gene_ids[:, 90:] == vocab.pad_id).all() and not batch.pad_mask.any()
    masked = datamodule(toy, vocab=str(vocab_path), unknown_genes="mask")
    mb = next(iter(masked.loader("val")))
    assert mb.pad_mask[:, 90:].all() and not mb.pad_mask[:, :90].any()
    assert (mb.condition_ids[:, 90:] == 0).all()
    with pytest.raises(PerturbationInputError, match=r"10 of 100 genes are not in the vocabulary.*G090"):
        datamodule(toy, vocab=str(vocab_path), unknown_genes="error")


# pairing and splits --------------------------------------------------------------------------------------------------
class RecordPairs(pl.Callback):
    def __init__(self):
        self.epochs: list[list[tuple[int, int]]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.epochs[-1] += list(zip(batch.cell_index.tolist(), batch.obs["control_index"].tolist(), strict=True))


def tiny_module(dm) -> ScGPTLitModule:
    torch.manual_seed(0)
    net = ScGPT(
        vocab_size=dm.vocab_size, pad_token_id=dm.pad_id, d_model=16, n_heads=2, d_ff=32, n_layers=1, dropout=0.0,
        layout=dm.layout, use_generative=False, use_mvc=False, decoder_style="affine", **dm.model_kwargs,
    )  # fmt: skip
    return ScGPTLitModule(
        net, {"perturb": PerturbationMSEObjective()}, optimizer=lambda params: torch.optim.Adam(params, lr=1e-3)
    )


def fit_pairs(dm, tmp_path, epochs=3) -> list[dict[int, int]]:
    rec = RecordPairs()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[rec], default_root_dir=tmp_path, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(tiny_module(dm), datamodule=dm)
    return [dict(e) for e in rec.epochs]


def test_fixed_pairing_is_the_same_every_epoch_under_a_trainer(toy, tmp_path):
    dm = datamodule(toy, pairing_mode="fixed")
    epochs = fit_pairs(dm, tmp_path)
    assert len(epochs) == 3 and epochs[0] == epochs[1] == epochs[2]
    assert len(epochs[0]) == len(dm.pairing("train"))


def test_redraw_pairing_changes_every_epoch_under_a_trainer(toy, tmp_path):
    dm = datamodule(toy, pairing_mode="redraw")
    epochs = fit_pairs(dm, tmp_path)
    fixed = dict(
        zip(*[a.tolist() for a in (lambda p: (p.perturbed, p.control))(dm.pairing("train").pairs(0))], strict=True)
    )
    assert epochs[0] == fixed  # epoch 0 of redraw is the fixed pairing
    assert epochs[0] != epochs[1] != epochs[2]
    assert set(epochs[0]) == set(epochs[1])  # the same perturbed cells, other controls


def test_ctrl_identity_pairs_on_and_off(toy):
    on = datamodule(toy, ctrl_identity=True).report()["pairing"]
    off = datamodule(toy, ctrl_identity=False).report()["pairing"]
    assert on["identity_fraction"] > 0.2 and off["identity_fraction"] == 0.0
    assert on["n_train_pairs"] - off["n_train_pairs"] == 40  # the 40 ctrl cells, paired with themselves
    dm = datamodule(toy, ctrl_identity=True)
    pairs = dm.pairing("train").pairs()
    ident = pairs.perturbed == pairs.control
    assert (dm.data.cell_conditions[pairs.perturbed[ident]] == "ctrl").all()


def test_eval_pairs_cover_each_perturbed_cell_once(toy):
    dm = datamodule(toy)
    for split in ("val", "test"):
        pairs = dm.pairing(split).pairs()
        cells = dm.cells(split)
        assert sorted(pairs.perturbed.tolist()) == sorted(cells.tolist())
        assert (dm.data.cell_conditions[pairs.control] == "ctrl").all()


def test_split_written_to_the_run_dir_and_reloaded(toy, tmp_path):
    out = tmp_path / "run" / "split.json"
    dm = datamodule(toy, split_seed=2, split_out=str(out))
    saved = PerturbationSplit.load(out)
    assert saved == dm.split and saved.seed == 2
    assert json.loads(out.read_text())["format"] == "gears_simulation_split"
    again = datamodule(toy, split_path=str(out), split_seed=5)  # the file wins over split_seed
    assert again.split == dm.split
    assert set(dm.split_conditions("train")) & set(dm.split_conditions("test")) == set()


# bad inputs --------------------------------------------------------------------------------------------------------
def test_bad_inputs_are_named(toy, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.h5ad does not exist"):
        datamodule(tmp_path / "missing.h5ad")
    a = ad.read_h5ad(toy)
    no_ctrl = a[a.obs["condition"] != "ctrl"].copy()
    no_ctrl.uns = {}
    no_ctrl.write_h5ad(tmp_path / "noctrl.h5ad")
    with pytest.raises(PerturbationDataError, match=r"noctrl.h5ad: no 'ctrl' cells"):
        datamodule(tmp_path / "noctrl.h5ad")
    absent = a.copy()
    absent.obs["condition"] = absent.obs["condition"].astype(str).replace({"G000+ctrl": "NOPE+ctrl"})
    absent.uns = {}
    absent.write_h5ad(tmp_path / "absent.h5ad")
    with pytest.raises(PerturbationDataError, match=r"gene 'NOPE' of condition 'NOPE\+ctrl'.*absent.h5ad"):
        datamodule(tmp_path / "absent.h5ad")
    raw = a.copy()
    raw.X = sp.csr_matrix(np.random.default_rng(0).poisson(20.0, size=raw.shape).astype(np.float32))
    raw.uns = {}
    raw.write_h5ad(tmp_path / "raw.h5ad")
    with pytest.raises(PerturbationDataError, match=r"raw.h5ad: X looks like raw counts"):
        datamodule(tmp_path / "raw.h5ad")
    with pytest.raises(ValueError, match="pairing_mode must be 'fixed' or 'redraw'"):
        PerturbationDataModule(str(toy), pairing_mode="sometimes")
    with pytest.raises(ValueError, match="include_zero_genes must be one of"):
        PerturbationDataModule(str(toy), include_zero_genes="some")
    other = tmp_path / "other_split.json"
    PerturbationSplit(train=["ctrl"], val=[], test=[], test_subgroup={}, val_subgroup={}, seed=0).save(other)
    with pytest.raises(PerturbationInputError, match=r"assigns no split to 22 conditions.*made for other data"):
        datamodule(toy, split_path=str(other))


# the official fixture ------------------------------------------------------------------------------------------------
def _npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def official():
    from scgpt_train.checkpoints import load_official

    return load_official(FIXTURES).eval(), GeneVocab.from_json(FIXTURES / "vocab.json")


@pytest.fixture(scope="module")
def fixture_h5ad(tmp_path_factory) -> Path:
    """The fixture's cells as GEARS data: perturbed cells 0-2 (targets), then the 4 control cells."""
    inp = _npz(FIXTURES / "inputs.npz")
    genes = inp["dataset_genes"].astype(str)
    conditions = list(inp["pert_conditions"][:3].astype(str)) + ["ctrl"] * 4
    x = np.concatenate([inp["target_values"][:3], inp["ctrl_values"]])
    obs = pd.DataFrame({"condition": conditions, "cell_type": "fixture"}, index=[f"cell{i}" for i in range(7)])
    path = tmp_path_factory.mktemp("fixture") / "fixture_gears.h5ad"
    ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame({"gene_name": genes}, index=genes)).write_h5ad(path)
    return path


def test_fixture_forward_through_our_inputs_equals_pred_perturb(official):
    """Flags as condition tokens through the affine decoder, every gene, the unknown gene as <pad>: the official
    pred_perturb(include_zero_gene='all') within 1e-5."""
    model, vocab = official
    inp, exp = _npz(FIXTURES / "inputs.npz"), _npz(FIXTURES / "expected.npz")
    tokens = map_data_genes(inp["dataset_genes"], vocab)
    assert tokens.n_unknown == 1 and tokens.unknown_genes == [str(inp["dataset_genes"][13])]
    np.testing.assert_array_equal(tokens.ids, inp["dataset_gene_ids"])
    x = inp["pert_x"].reshape(4, 20, 2)
    flags = [np.flatnonzero(f) for f in x[..., 1]]
    batch = make_batch(x[..., 0], flags, tokens)
    np.testing.assert_array_equal(batch.condition_ids.numpy(), x[..., 1].astype(np.int64))
    with torch.no_grad():
        out = model(**batch.model_inputs())
    assert np.abs(out["mlm_output"].numpy() - exp["pred_perturb"]).max() < TOL
    pred = predict_expression(model, x[..., 0], flags, tokens, include_zero_genes="all")
    assert np.abs(pred - exp["pred_perturb"]).max() < TOL


def test_fixture_batchwise_official_drop_and_our_fix(official):
    """batch-wise: genes zero in every control of the batch are not read. The official run also drops the
    perturbed gene whose control expression is zero everywhere (reproduced with keep_perturbed_genes=False);
    keeping it changes that cell's prediction."""
    model, vocab = official
    inp, exp = _npz(FIXTURES / "inputs.npz"), _npz(FIXTURES / "expected.npz")
    tokens = map_data_genes(inp["dataset_genes"], vocab)
    x = inp["pert_x"].reshape(4, 20, 2)
    flags = [np.flatnonzero(f) for f in x[..., 1]]
    official_drop = predict_expression(model, x[..., 0], flags, tokens, 4, "batch-wise", keep_perturbed_genes=False)
    assert np.abs(official_drop - exp["pred_perturb_batchwise"]).max() < TOL
    kept = predict_expression(model, x[..., 0], flags, tokens, 4, "batch-wise", keep_perturbed_genes=True)
    zero_flagged = [j for f in flags for j in f if not x[:, j, 0].any()]
    assert zero_flagged, "the fixture perturbs a gene with zero control expression"
    assert np.abs(kept - exp["pred_perturb_batchwise"]).max() > 1e-3


def test_fixture_training_step_loss_through_the_data_module(official, fixture_h5ad):
    """The data module's batch (control input, flags, perturbed target, all genes) and the MSE objective give
    the tutorial's training-step loss and output within 1e-5."""
    from scgpt_train.checkpoints import load_official

    model, _ = official
    inp, exp = _npz(FIXTURES / "inputs.npz"), _npz(FIXTURES / "expected.npz")
    dm = datamodule(fixture_h5ad, vocab=str(FIXTURES))
    assert dm.report()["genes"]["n_not_in_vocab"] == 1
    batch = dm.collate(subsample=True, seed=0)([(0, 3), (1, 4), (2, 5), (6, 6)])  # the fixture's pairs
    np.testing.assert_array_equal(batch.gene_ids.numpy()[0], inp["dataset_gene_ids"])
    np.testing.assert_array_equal(batch.condition_ids.numpy(), inp["pert_flags"])
    np.testing.assert_allclose(batch.values.numpy(), inp["ctrl_values"])
    np.testing.assert_allclose(batch.target_values.numpy(), inp["target_values"])
    net = load_official(FIXTURES, **dm.model_kwargs)  # the data's flag embedding is the checkpoint's
    module = ScGPTLitModule(net, {"perturb": PerturbationMSEObjective()}, optimizer=torch.optim.Adam).train()
    outputs = module(batch)
    assert np.abs(outputs["mlm_output"].detach().numpy() - exp["train_mlm_output"]).max() < TOL
    loss = module.compute_losses(batch, step=0)["loss"]
    assert abs(loss.item() - float(exp["train_loss"])) < TOL
    del model


def test_fixture_pool_mean_through_the_library(official, fixture_h5ad):
    model, vocab = official
    exp = _npz(FIXTURES / "expected.npz")
    inp = _npz(FIXTURES / "inputs.npz")
    controls = read_controls(fixture_h5ad)
    assert len(controls.x) == 4 and controls.n_dropped_non_ctrl == 3
    pred = predict_conditions(model, vocab, controls, list(inp["predict_perts"].astype(str)), pool_size="all")
    means = condition_means_of(pred)
    assert list(means) == ["AADACL2-AS1+ctrl", "ABCF2+ABHD2"]
    for i, mean in enumerate(means.values()):
        assert np.abs(mean - exp["predict_pool_mean"][i]).max() < TOL


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "predict_perturbation.py"), *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip


def test_predict_cli_pool_mean_equals_official_predict(fixture_h5ad, tmp_path, capsys):
    """scripts/predict_perturbation.py with the official checkpoint and --pool-size all: per-condition means equal
    the tutorial's predict() (fixture predict_pool_mean) within 1e-5; one row per (condition, pool cell). The
    seeded pool of 2 runs the script's main() in this process (``cli_main``: the same code without a second
    interpreter start)."""
    exp = _npz(FIXTURES / "expected.npz")
    out = tmp_path / "pred.h5ad"
    proc = run_cli("--checkpoint", FIXTURES, "--controls", fixture_h5ad, "--conditions", "AADACL2-AS1", "ABHD2+ABCF2",
                   "--pool-size", "all", "--seed", 3, "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pred = ad.read_h5ad(out)
    assert pred.n_obs == 8 and pred.n_vars == 20
    assert pred.obs["condition"].tolist() == ["AADACL2-AS1+ctrl"] * 4 + ["ABCF2+ABHD2"] * 4
    assert pred.obs["control_cell"].tolist()[:4] == ["cell3", "cell4", "cell5", "cell6"]
    info = pred.uns["perturbation_prediction"]
    assert info["pool_size"] == 4 and info["seed"] == 3 and info["n_genes_not_in_vocab"] == 1
    assert list(pred.var["gene_name"]) == list(_npz(FIXTURES / "inputs.npz")["dataset_genes"])
    means = condition_means_of(pred)
    for i, cond in enumerate(["AADACL2-AS1+ctrl", "ABCF2+ABHD2"]):
        assert np.abs(means[cond] - exp["predict_pool_mean"][i]).max() < TOL
    # a seeded pool of 2: the same seed, the same pool
    code, err = cli_main(capsys, "--checkpoint", FIXTURES, "--controls", fixture_h5ad, "--conditions", "ABAT+ctrl",
                         "--pool-size", 2, "--seed", 1, "--out", tmp_path / "two.h5ad")  # fmt: skip
    assert code == 0, err
    two = ad.read_h5ad(tmp_path / "two.h5ad")
    assert two.n_obs == 2 and two.uns["perturbation_prediction"]["pool_size"] == 2


def cli_main(capsys, *args) -> tuple[int, str]:
    """scripts/predict_perturbation.py's main() in this process: (exit status, stderr)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("predict_perturbation", ROOT / "scripts" / "predict_perturbation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_predict_cli_bad_inputs_are_named(fixture_h5ad, tmp_path, capsys):
    out = tmp_path / "x.h5ad"
    code, err = cli_main(capsys, "--checkpoint", FIXTURES, "--controls", fixture_h5ad, "--conditions", "NOTAGENE+ctrl",
                         "--out", out)  # fmt: skip
    assert code == 2 and "gene 'NOTAGENE' of condition 'NOTAGENE+ctrl'" in err
    assert "fixture_gears.h5ad" in err and not out.exists()
    code, err = cli_main(capsys, "--checkpoint", FIXTURES, "--controls", fixture_h5ad, "--conditions", "A+B+C",
                         "--out", out)  # fmt: skip
    assert code == 2 and "condition 'A+B+C'" in err
    code, err = cli_main(capsys, "--checkpoint", FIXTURES, "--controls", fixture_h5ad, "--conditions", "ABAT",
                         "--pool-size", 9, "--out", out)  # fmt: skip
    assert code == 2 and "pool size 9 exceeds the 4 control cells" in err
    a = ad.read_h5ad(fixture_h5ad)
    a.obs["condition"] = "ABAT+ctrl"
    a.write_h5ad(tmp_path / "noctrl.h5ad")
    code, err = cli_main(capsys, "--checkpoint", FIXTURES, "--controls", tmp_path / "noctrl.h5ad", "--conditions",
                         "ABAT", "--out", out)  # fmt: skip
    assert code == 2 and "noctrl.h5ad: no 'ctrl' cells" in err
    raw = ad.AnnData(
        sp.csr_matrix(np.random.default_rng(0).poisson(30.0, size=(5, 20)).astype(np.float32)), var=a.var.copy()
    )
    raw.write_h5ad(tmp_path / "raw.h5ad")
    code, err = cli_main(capsys, "--checkpoint", FIXTURES, "--controls", tmp_path / "raw.h5ad", "--conditions", "ABAT",
                         "--out", out)  # fmt: skip
    assert code == 2 and "raw.h5ad: X looks like raw counts" in err
    code, err = cli_main(capsys, "--checkpoint", tmp_path / "nothing", "--controls", fixture_h5ad, "--conditions",
                         "ABAT", "--out", out)  # fmt: skip
    assert code == 2 and "nothing does not exist" in err


def test_prediction_refuses_a_model_without_flags(fixture_h5ad):
    vocab = GeneVocab.from_genes(["A", "B"])
    model = ScGPT(vocab_size=len(vocab), pad_token_id=vocab.pad_id, d_model=8, n_heads=2, d_ff=8, n_layers=1)
    from scgpt_train.tasks.perturbation.predict import check_perturbation_model

    with pytest.raises(PredictionInputError, match="not a perturbation model"):
        check_perturbation_model(model, "model.pt")


def test_unknown_genes_as_new_learned_tokens(official, fixture_h5ad, tmp_path):
    """``unknown_genes=new``: the fixture gene the checkpoint lacks is appended as a new token; the vocabulary
    check accepts this extension (and only it); the model keeps the checkpoint's embedding rows bit for bit and
    the new row gets a gradient, i.e. it is learned."""
    from scgpt_train.pipeline import check_checkpoint_vocab
    from scgpt_train.tasks.perturbation.model import perturbation_model

    model, vocab = official
    dm = datamodule(fixture_h5ad, vocab=str(FIXTURES), unknown_genes="new")
    new_id = len(vocab)
    assert dm.extends_vocab and dm.vocab_size == new_id + 1 and dm.appended_genes == dm.tokens.unknown_genes
    assert dm.vocab.id_to_token[:new_id] == vocab.id_to_token
    batch = dm.collate(subsample=True, seed=0)([(0, 3), (1, 4), (2, 5), (6, 6)])
    assert (batch.gene_ids == new_id).any() and not (batch.gene_ids == dm.pad_id).any()
    check_checkpoint_vocab(FIXTURES, dm.vocab, resume=False, allow_extension=True)
    with pytest.raises(Exception, match="another vocabulary"):
        check_checkpoint_vocab(FIXTURES, dm.vocab, resume=False)
    shuffled = GeneVocab({**{t: i for i, t in enumerate(reversed(vocab.id_to_token))}, "NEW": new_id})
    with pytest.raises(Exception, match="another vocabulary"):  # not the checkpoint's tokens first: refused
        check_checkpoint_vocab(FIXTURES, shuffled, resume=False, allow_extension=True)
    net = perturbation_model(FIXTURES, vocab_size=dm.vocab_size, pad_token_id=dm.pad_id, layout=dm.layout,
                             **dm.model_kwargs)  # fmt: skip
    rows = net.gene_encoder.embedding.weight
    assert torch.equal(rows[:new_id], model.gene_encoder.embedding.weight)
    module = ScGPTLitModule(net, {"perturb": PerturbationMSEObjective()}, optimizer=torch.optim.Adam).train()
    module.compute_losses(batch, step=0)["loss"].backward()
    assert rows.grad[new_id].abs().sum() > 0
