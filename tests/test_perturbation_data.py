"""Perturbation data foundations: condition names, GEARS reading and its checks, the simulation split,
control pairing, and the simulated demo dataset (issue #12)."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import types
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_modules.perturbation import (
    ConditionError,
    ControlPairing,
    PerturbationDataError,
    PerturbationSplit,
    condition_genes,
    from_anndata,
    normalize_condition,
    read_gears,
    sample_controls,
    simulation_split,
)
from data_modules.perturbation.gears_data import RANK_KEY, TOP20_KEY, to_gears_anndata, top_non_dropout


# condition names ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("ctrl", "ctrl"),
        ("ctrl+ctrl", "ctrl"),
        ("A+ctrl", "A+ctrl"),
        ("ctrl+A", "A+ctrl"),
        (" ctrl + A ", "A+ctrl"),
        ("B+A", "A+B"),
        ("A+B", "A+B"),
        ("KRT8", "KRT8+ctrl"),
    ],
)
def test_normalize_condition(raw, canonical):
    assert normalize_condition(raw) == canonical


def test_condition_genes():
    assert condition_genes("ctrl") == ()
    assert condition_genes("ctrl+ZBTB1") == ("ZBTB1",)
    assert condition_genes("ZBTB1+SAMD1") == ("SAMD1", "ZBTB1")


@pytest.mark.parametrize("bad", ["A+B+C", "", "A+", "+ctrl", "A+A", "A B+ctrl"])
def test_bad_condition_names_are_named(bad):
    with pytest.raises(ConditionError, match="condition"):
        normalize_condition(bad)
    if bad:
        with pytest.raises(ConditionError) as err:
            normalize_condition(bad)
        assert repr(bad) in str(err.value)


# the GEARS simulation split ------------------------------------------------------------------------------------
SPLIT_CONDITIONS = [
    "ctrl",
    *[f"{g}+ctrl" for g in "ABCEGH"],
    "ctrl+D",  # other spellings are normalized
    "F+ctrl",
    "A+B",
    "C+A",
    "B+C",
    "C+E",
    "E+G",
    "G+H",
    "A+D",
    "E+F",
    "D+F",
]


def test_simulation_split_hand_derived():
    """Derivation for seed 1 (numpy RandomState(1) permutations: of 8 -> 7 2 1 6 0 4 .., of 6 -> 2 1 4 0 3 5,
    of 4 -> 3 2 0 1). Pairs are drawn in the order of their spelling in the data, as GEARS sorts them: the data
    spells A+C as "C+A", which sorts after "B+C".

    Genes A..H sorted; int(8 * 0.75) = 6 train genes = positions 7 2 1 6 0 4 = H C B G A E; unseen D F.
    Test: unseen singles D, F; pairs with one train gene A+D, E+F (seen1); none D+F (seen0). Pairs with two train
    genes by spelling: A+B B+C C+A C+E E+G G+H; int(6 * 0.75) = 4 to train = positions 2 1 4 0 = C+A B+C E+G
    A+B; test seen2 = C+E G+H.
    Validation round on train (0.9 / 0.9): genes A B C E G H, int(6 * 0.9) = 5 train = positions 2 1 4 0 3 =
    C B G A E; unseen H -> H+ctrl is validation (unseen_single). Pairs A+B B+C C+A E+G all seen twice;
    int(4 * 0.9) = 3 train = positions 3 2 0 = E+G C+A A+B; B+C is validation (seen2).
    """
    split = simulation_split(SPLIT_CONDITIONS, seed=1)
    assert set(split.train) == {"A+ctrl", "B+ctrl", "C+ctrl", "E+ctrl", "G+ctrl", "A+B", "A+C", "E+G", "ctrl"}
    assert set(split.val) == {"B+C", "H+ctrl"}
    assert set(split.test) == {"A+D", "C+E", "D+F", "D+ctrl", "E+F", "F+ctrl", "G+H"}
    assert split.test_subgroup == {
        "combo_seen0": ["D+F"],
        "combo_seen1": ["A+D", "E+F"],
        "combo_seen2": ["C+E", "G+H"],
        "unseen_single": ["D+ctrl", "F+ctrl"],
    }
    assert split.val_subgroup == {
        "combo_seen0": [],
        "combo_seen1": [],
        "combo_seen2": ["B+C"],
        "unseen_single": ["H+ctrl"],
    }
    assert split.split_of("ctrl+D") == "test" and split.subgroup_of("C+B") == "combo_seen2"
    assert split.subgroup_of("C+A") is None and split.split_of("C+A") == "train"


def test_simulation_split_all_train_when_fractions_are_one():
    split = simulation_split(
        ["ctrl", "A+ctrl", "B+ctrl", "A+B"], seed=3, train_gene_set_size=1.0, combo_seen2_train_frac=1.0
    )
    assert split.test == []
    assert "ctrl" in split.train
    # validation keeps int(2 * 0.9) = 1 of the 2 genes: one single is unseen, the pair becomes seen1
    assert len(split.val_subgroup["unseen_single"]) == 1 and split.val_subgroup["combo_seen1"] == ["A+B"]


def test_split_partition_and_seeds():
    genes = [f"G{i}" for i in range(12)]
    conds = ["ctrl"] + [f"{g}+ctrl" for g in genes] + [f"{a}+{b}" for a, b in itertools.combinations(genes, 2)][::3]
    splits = [simulation_split(conds, seed=s) for s in (1, 2)]
    for s in splits:
        everything = s.train + s.val + s.test
        assert sorted(everything) == sorted(normalize_condition(c) for c in conds)  # a partition
        assert sorted(itertools.chain(*s.test_subgroup.values())) == sorted(s.test)
        assert sorted(itertools.chain(*s.val_subgroup.values())) == sorted(s.val)
    assert splits[0].test != splits[1].test
    assert simulation_split(conds, seed=1) == splits[0]  # seeded


def test_split_json_roundtrip(tmp_path):
    split = simulation_split(SPLIT_CONDITIONS, seed=1)
    path = split.save(tmp_path / "split.json")
    assert PerturbationSplit.load(path) == split
    labels = split.cell_splits(["ctrl", "ctrl+D", "C+B"])
    assert labels.tolist() == ["train", "test", "val"]
    with pytest.raises(KeyError, match="Z\\+ctrl"):
        split.cell_splits(["Z+ctrl"])
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="bad.json"):
        PerturbationSplit.load(tmp_path / "bad.json")


def test_split_merges_two_spellings_and_records_it():
    split = simulation_split(["ctrl", "A+ctrl", "ctrl+A", "B+ctrl", "A+B"], seed=1)
    assert split.merged_spellings == {"A+ctrl": ["A+ctrl", "ctrl+A"]}
    assert sum(c == "A+ctrl" for c in split.train + split.val + split.test) == 1


def _load_gears_data_utils(monkeypatch):
    """GEARS' own DataSplitter (cell-gears). Its utils module imports torch_geometric (not installed here) and
    dcor (11 s to import); the split code uses neither, so both are stubbed for this test when needed."""
    if importlib.util.find_spec("torch_geometric") is None:
        tg = types.ModuleType("torch_geometric")
        tg_data = types.ModuleType("torch_geometric.data")
        tg_data.Data = object
        monkeypatch.setitem(sys.modules, "torch_geometric", tg)
        monkeypatch.setitem(sys.modules, "torch_geometric.data", tg_data)
    if "dcor" not in sys.modules:
        dcor = types.ModuleType("dcor")
        dcor.distance_correlation = None
        monkeypatch.setitem(sys.modules, "dcor", dcor)
    root = Path(importlib.util.find_spec("gears").origin).parent
    pkg = types.ModuleType("gears")  # skip gears/__init__ (it imports the GNN model)
    pkg.__path__ = [str(root)]
    monkeypatch.setitem(sys.modules, "gears", pkg)
    for name in ("utils", "data_utils"):
        spec = importlib.util.spec_from_file_location(f"gears.{name}", root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, f"gears.{name}", module)
        spec.loader.exec_module(module)
    return sys.modules["gears.data_utils"]


@pytest.mark.skipif(importlib.util.find_spec("gears") is None, reason="cell-gears is not installed")
def test_simulation_split_equals_gears(monkeypatch):
    data_utils = _load_gears_data_utils(monkeypatch)
    rng = np.random.default_rng(0)
    for _ in range(25):
        genes = [f"G{i:02d}" for i in range(int(rng.integers(3, 16)))]
        singles = [f"{g}+ctrl" if rng.random() < 0.5 else f"ctrl+{g}" for g in genes if rng.random() < 0.8]
        pairs = [
            f"{a}+{b}" if rng.random() < 0.5 else f"{b}+{a}"
            for a, b in itertools.combinations(genes, 2)
            if rng.random() < 0.3
        ]
        conds = ["ctrl"] + [str(c) for c in rng.permutation(singles + pairs)]
        seed = int(rng.integers(0, 5))
        adata = ad.AnnData(np.zeros((len(conds), 1), np.float32), obs=pd.DataFrame({"condition": conds}))
        adata.obs_names = [str(i) for i in range(len(conds))]
        out, groups = data_utils.DataSplitter(adata, split_type="simulation").split_data(
            seed=seed, train_gene_set_size=0.75, combo_seen2_train_frac=0.75
        )
        theirs = {normalize_condition(c): s for c, s in zip(out.obs["condition"], out.obs["split"], strict=True)}
        ours = simulation_split(conds, seed=seed)
        assert theirs == ours.assignment()
        for key, ours_groups in (("test_subgroup", ours.test_subgroup), ("val_subgroup", ours.val_subgroup)):
            assert {k: sorted(normalize_condition(c) for c in v) for k, v in groups[key].items()} == ours_groups


# pairing --------------------------------------------------------------------------------------------------------
PAIR_CONDITIONS = ["ctrl", "A+ctrl", "ctrl", "A+B", "ctrl", "B+ctrl", "ctrl", "A+ctrl"]  # ctrl cells 0 2 4 6


def test_fixed_pairing_is_drawn_once():
    pairing = ControlPairing(PAIR_CONDITIONS, mode="fixed", seed=3)
    p0, p7 = pairing.pairs(0), pairing.pairs(7)
    np.testing.assert_array_equal(p0.control, p7.control)
    pert = p0.perturbed != p0.control
    assert set(p0.perturbed[pert]) == {1, 3, 5, 7}
    assert set(p0.control[pert]) <= {0, 2, 4, 6}
    again = ControlPairing(PAIR_CONDITIONS, mode="fixed", seed=3).pairs(0)
    np.testing.assert_array_equal(again.control, p0.control)


def test_redraw_pairing_changes_every_epoch_and_epoch0_is_fixed():
    conds = ["ctrl"] * 20 + ["A+ctrl"] * 30
    fixed = ControlPairing(conds, mode="fixed", seed=5)
    redraw = ControlPairing(conds, mode="redraw", seed=5)
    np.testing.assert_array_equal(redraw.pairs(0).control, fixed.pairs(0).control)
    assert not np.array_equal(redraw.pairs(1).control, redraw.pairs(2).control)
    np.testing.assert_array_equal(
        redraw.pairs(4).control, ControlPairing(conds, mode="redraw", seed=5).pairs(4).control
    )
    seen = {int(redraw.pairs(e).control[0]) for e in range(30)}  # one perturbed cell meets many controls
    assert len(seen) > 5


def test_ctrl_identity_pairs_on_and_off():
    on = ControlPairing(PAIR_CONDITIONS, ctrl_identity=True).pairs()
    ident = on.perturbed == on.control
    assert set(on.perturbed[ident]) == {0, 2, 4, 6} and on.identity_fraction == pytest.approx(0.5)
    assert all(on.conditions[ident] == "ctrl")
    off = ControlPairing(PAIR_CONDITIONS, ctrl_identity=False).pairs()
    assert len(off) == 4 and off.identity_fraction == 0.0
    assert "ctrl" not in set(off.conditions)


def test_pairing_subset_and_pool():
    pairing = ControlPairing(PAIR_CONDITIONS, cells=[1, 3, 4], control_pool=[0, 2], seed=1)
    pairs = pairing.pairs()
    assert sorted(pairs.perturbed.tolist()) == [1, 3, 4]
    assert set(pairs.control[pairs.perturbed != 4]) <= {0, 2}
    assert pairs.control[pairs.perturbed == 4].tolist() == [4]


def test_pairing_errors():
    with pytest.raises(ValueError, match="no 'ctrl' cells"):
        ControlPairing(["A+ctrl", "B+ctrl"])
    with pytest.raises(ValueError, match="not 'ctrl'"):
        ControlPairing(PAIR_CONDITIONS, control_pool=[0, 1])
    with pytest.raises(ValueError, match="mode"):
        ControlPairing(PAIR_CONDITIONS, mode="sometimes")


def test_sample_controls():
    pool = np.arange(10, 30)
    picked = sample_controls(pool, 5, seed=2)
    assert len(picked) == 5 and len(set(picked)) == 5 and set(picked) <= set(pool)
    assert np.all(np.diff(picked) > 0)
    np.testing.assert_array_equal(picked, sample_controls(pool, 5, seed=2))
    np.testing.assert_array_equal(sample_controls(pool, "all"), pool)
    with pytest.raises(ValueError, match="exceeds"):
        sample_controls(pool, 21)


# reading GEARS files --------------------------------------------------------------------------------------------
def _toy_adata(conditions=None, x=None, genes=("A", "B", "C", "D")) -> ad.AnnData:
    conditions = conditions or ["ctrl"] * 4 + ["A+ctrl"] * 3 + ["ctrl+B"] * 3 + ["B+A"] * 2
    rng = np.random.default_rng(0)
    if x is None:
        x = rng.uniform(1.0, 2.0, size=(len(conditions), len(genes)))
        x[np.asarray([c in ("A+ctrl", "B+A") for c in conditions]), 0] = 0.1  # A knocked down
    obs = pd.DataFrame({"condition": conditions, "cell_type": "K562"}, index=[f"c{i}" for i in range(len(conditions))])
    var = pd.DataFrame({"gene_name": list(genes)}, index=[f"ENSG{i}" for i in range(len(genes))])
    return ad.AnnData(X=sp.csr_matrix(np.asarray(x, dtype=np.float32)), obs=obs, var=var)


def test_read_gears_normalizes_and_computes_de(tmp_path):
    path = tmp_path / "perturb_processed.h5ad"
    _toy_adata().write_h5ad(path)
    data = read_gears(path)
    assert data.conditions == ["ctrl", "A+ctrl", "B+ctrl", "A+B"]
    assert data.raw_conditions == ["ctrl", "A+ctrl", "ctrl+B", "B+A"]
    assert data.de_source == "computed"
    assert data.top_de_20["A+ctrl"][0] == 0  # gene A, knocked down, is the top DE gene
    assert sorted(data.de_ranked["A+B"].tolist()) == [0, 1, 2, 3]
    x = data.adata.X.toarray()
    np.testing.assert_allclose(data.control_mean, x[:4].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(data.condition_means(["ctrl+B"])["B+ctrl"], x[7:10].mean(axis=0), rtol=1e-6)


def test_top_non_dropout_rule():
    # gene 0: mean 0 in the condition but expressed in ctrl -> a dropout, skipped; gene 2: zero in both -> kept
    ranked = np.array([0, 1, 2, 3])
    out = top_non_dropout(ranked, np.array([0.0, 1.0, 0.0, 2.0]), np.array([1.0, 1.0, 0.0, 0.0]), n=3)
    assert out.tolist() == [1, 2, 3]


def test_de_from_file_is_used():
    adata = to_gears_anndata(_toy_adata().X, _toy_adata().obs["condition"], ["A", "B", "C", "D"], "K562")
    assert set(adata.uns[TOP20_KEY]) == {"K562_A+ctrl_1+1", "K562_B+ctrl_1+1", "K562_A+B_1+1"}
    # a stored table that differs from what would be computed proves the file's table is read
    adata.uns[RANK_KEY]["K562_A+ctrl_1+1"] = np.array(["D", "C", "B", "A"])
    adata.uns[TOP20_KEY]["K562_A+ctrl_1+1"] = np.array(["D", "C"])
    data = from_anndata(adata)
    assert data.de_source == "file"
    assert data.top_de_20["A+ctrl"].tolist() == [3, 2]
    assert data.de_ranked["A+ctrl"].tolist() == [3, 2, 1, 0]


def test_condition_gene_absent_is_named(tmp_path):
    path = tmp_path / "bad_gene.h5ad"
    _toy_adata(conditions=["ctrl"] * 3 + ["A+ctrl"] * 2 + ["A+ZNF999"] * 2).write_h5ad(path)
    with pytest.raises(PerturbationDataError) as err:
        read_gears(path)
    msg = str(err.value)
    assert "'ZNF999'" in msg and "'A+ZNF999'" in msg and str(path) in msg


def test_no_ctrl_cells_is_named(tmp_path):
    path = tmp_path / "no_ctrl.h5ad"
    _toy_adata(conditions=["A+ctrl"] * 3 + ["B+ctrl"] * 3).write_h5ad(path)
    with pytest.raises(PerturbationDataError, match="no 'ctrl' cells") as err:
        read_gears(path)
    assert str(path) in str(err.value)


def test_raw_counts_refused(tmp_path):
    conditions = ["ctrl"] * 4 + ["A+ctrl"] * 4
    counts = np.random.default_rng(1).poisson(30, size=(8, 4)).astype(np.float32)
    path = tmp_path / "counts.h5ad"
    _toy_adata(conditions=conditions, x=counts).write_h5ad(path)
    with pytest.raises(PerturbationDataError, match="raw counts") as err:
        read_gears(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "values, match",
    [(-0.5, "negative"), (1e4 + 0.5, "too large")],
)
def test_other_non_log_data_refused(values, match):
    x = np.full((8, 4), 1.5, np.float32)
    x[0, 0] = values
    with pytest.raises(PerturbationDataError, match=match):
        from_anndata(_toy_adata(conditions=["ctrl"] * 4 + ["A+ctrl"] * 4, x=x), source="demo.h5ad")


def test_bad_condition_name_and_missing_columns_are_named():
    with pytest.raises(PerturbationDataError, match=r"'A\+B\+C'.*") as err:
        from_anndata(_toy_adata(conditions=["ctrl"] * 4 + ["A+B+C"] * 4), source="x.h5ad")
    assert "x.h5ad" in str(err.value)
    adata = _toy_adata()
    del adata.obs["cell_type"]
    with pytest.raises(PerturbationDataError, match="cell_type"):
        from_anndata(adata, source="x.h5ad")


def test_read_gears_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5ad"):
        read_gears(tmp_path / "nope.h5ad")


# the simulated demo ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    from data_modules.perturbation.demo import make_perturbation_demo

    return make_perturbation_demo()


def test_demo_layout_and_documentation(demo):
    from data_modules.perturbation.demo import DEMO_PARAMS, demo_spec

    spec = demo_spec(demo)
    assert demo.uns["simulated"]["is_simulated"] and "SIMULATED" in demo.uns["simulated"]["description"]
    assert demo.n_obs == 700 and demo.n_vars == DEMO_PARAMS["n_genes"]
    conds = set(demo.obs["condition"])
    assert len(spec["targets"]) == 20 and len([c for c in conds if c.endswith("+ctrl")]) == 20
    assert len([c for c in conds if "ctrl" not in c]) == DEMO_PARAMS["n_pairs"]
    assert {i["type"] for i in spec["interactions"].values()} == {"synergy", "buffering", "neomorphic"}
    for col in ("condition", "cell_type", "condition_name"):
        assert col in demo.obs
    assert "gene_name" in demo.var
    data = from_anndata(demo, source="demo")
    assert data.de_source == "file" and len(data.top_de_20) == 50


def test_demo_effects_are_planted(demo):
    from data_modules.perturbation.demo import condition_log_fold_change, demo_spec

    spec = demo_spec(demo)
    data = from_anndata(demo, source="demo")
    genes = data.gene_names
    ctrl = data.control_mean
    means = data.condition_means()
    index = {g: i for i, g in enumerate(genes)}
    for t in spec["targets"]:  # knock-down of every target in its single
        assert means[f"{t}+ctrl"][index[t]] < 0.8 * ctrl[index[t]]
    agree = []
    for c in spec["conditions"]:
        lfc = condition_log_fold_change(spec, c, genes)
        changed = lfc != 0
        agree.append(np.mean(np.sign(lfc[changed]) == np.sign((means[c] - ctrl)[changed])))
    assert np.mean(agree) > 0.75  # the planted programs show in the data's direction of change
    # a synergistic pair changes its program more than the sum of its singles' programs would at full strength
    pair = next(p for p, i in spec["interactions"].items() if i["type"] == "synergy")
    lfc_pair = condition_log_fold_change(spec, pair, genes)
    lfc_sum = sum(condition_log_fold_change(spec, f"{g}+ctrl", genes) for g in condition_genes(pair))
    np.testing.assert_allclose(lfc_pair, 2.0 * lfc_sum)


def test_demo_is_seeded_and_writes(tmp_path, demo):
    from data_modules.perturbation.demo import build_perturbation_demo

    path = build_perturbation_demo(tmp_path / "demo.h5ad")
    data = read_gears(path)
    np.testing.assert_array_equal(data.adata.X.toarray(), demo.X.toarray())
    assert data.conditions == list(dict.fromkeys(demo.obs["condition"]))


@pytest.mark.skipif(importlib.util.find_spec("gears") is None, reason="cell-gears is not installed")
def test_computed_de_equals_gears(monkeypatch, demo):
    """Our DE ranking and top-20 non-dropout genes equal GEARS' get_DE_genes + get_dropout_non_zero_genes."""
    data_utils = _load_gears_data_utils(monkeypatch)
    theirs = ad.AnnData(X=sp.csr_matrix(demo.X), obs=demo.obs[["condition", "cell_type"]].copy(), var=demo.var.copy())
    theirs = data_utils.get_dropout_non_zero_genes(data_utils.get_DE_genes(theirs, False))
    ours = from_anndata(ad.AnnData(X=demo.X, obs=demo.obs[["condition", "cell_type"]].copy(), var=demo.var.copy()))
    assert ours.de_source == "computed"
    to_condition = dict(zip(theirs.obs["condition_name"].astype(str), theirs.obs["condition"].astype(str), strict=True))
    names = ours.gene_names
    assert len(theirs.uns[TOP20_KEY]) == len(ours.top_de_20) == 50
    for key, genes in theirs.uns[TOP20_KEY].items():
        cond = to_condition[key]
        assert list(genes) == list(names[ours.top_de_20[cond]]), cond
        assert list(theirs.uns[RANK_KEY][key]) == list(names[ours.de_ranked[cond]]), cond
