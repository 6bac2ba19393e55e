"""Attention GRN (scgpt_train/tasks/attention_grn/, scripts/attention_grn.py): last-layer scores of a tiny model
equal a naive full-matrix computation (rank normalization, head mean, settings), every cell counts (the official
first-cell bug), hypergeometric p-values on hand-computed counts, bad inputs refused by name, a run of the script
on real cells (scanpy's pbmc68k_reduced and the perturbation demo built from it), and the grn benchmark report."""

from __future__ import annotations

import importlib.util
from math import comb

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT
from scipy.stats import hypergeom, rankdata

from scgpt_train.tasks import attention_grn as ag


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(n_genes: int, norm_scheme: str = "post", n_conditions: int = 0, seed: int = 0):
    from scgpt_train.model import ScGPT

    torch.manual_seed(seed)
    model = ScGPT(
        n_genes + 3, n_genes, d_model=32, n_heads=4, d_ff=64, n_layers=2, norm_scheme=norm_scheme,
        n_conditions=n_conditions, decoder_style="affine" if n_conditions else "mlp",
    )  # fmt: skip
    return model.eval()


def random_inputs(n_cells: int, m: int, n_genes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(n_genes)[:m] for _ in range(n_cells)])
    return {
        "gene_ids": torch.from_numpy(ids.astype(np.int64)),
        "values": torch.from_numpy(rng.integers(0, 51, (n_cells, m)).astype(np.float32)),
        "pad_mask": torch.zeros(n_cells, m, dtype=torch.bool),
    }


def naive_maps(model, inputs, softmax=False, rank=True) -> np.ndarray:
    """(B, M, M) per-cell head-mean maps from the full (B, H, M, M) score tensor of the last layer, its input
    captured by a forward pre-hook during an ordinary forward pass; ranks with scipy (ordinal: ties by position)."""
    captured = {}
    last = model.layers[-1]

    def grab(module, args):  # the last layer's input; returns None so the forward pass goes on unchanged
        captured["x"] = args[0].detach()

    handle = last.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    x = captured["x"]
    if last.pre_norm:
        x = last.norm1(x)
    b, m, d = x.shape
    h = last.self_attn.n_heads
    with torch.no_grad():
        qkv = (x.double() @ last.self_attn.qkv.weight.double().T + last.self_attn.qkv.bias.double()).view(
            b, m, 3, h, -1
        )
    q, k = qkv[:, :, 0].permute(0, 2, 1, 3), qkv[:, :, 1].permute(0, 2, 1, 3)
    s = (q @ k.transpose(-1, -2)).numpy()  # (B, H, M, M)
    if softmax:
        s = torch.softmax(torch.from_numpy(s) * (d // h) ** -0.5, dim=-1).numpy()
    if rank:
        r = np.apply_along_axis(lambda v: rankdata(v, method="ordinal") - 1, -1, s) / m
        s = np.apply_along_axis(lambda v: rankdata(v, method="ordinal") - 1, -2, r) / m
    return s.mean(1)


@pytest.mark.parametrize("norm_scheme", ["post", "pre"])
def test_scores_equal_a_naive_full_matrix_computation(norm_scheme):
    n_genes, m = 40, 17
    model = tiny_model(n_genes, norm_scheme)
    inputs = random_inputs(6, m, n_genes)
    conditions = ["ctrl", "ctrl", "A+ctrl", "ctrl", "A+ctrl", "A+ctrl"]
    naive = naive_maps(model, inputs)
    # batches of 4 then 2 cells: the accumulation crosses batches
    batches = [
        ({k: v[:4] for k, v in inputs.items()}, conditions[:4]),
        ({k: v[4:] for k, v in inputs.items()}, conditions[4:]),
    ]
    means = ag.condition_attention(model, batches, m)
    ctrl = np.array([c == "ctrl" for c in conditions])
    np.testing.assert_allclose(means.mean("ctrl"), naive[ctrl].mean(0), atol=1e-6)
    np.testing.assert_allclose(means.mean("A+ctrl"), naive[~ctrl].mean(0), atol=1e-6)
    assert means.counts == {"ctrl": 3, "A+ctrl": 3}
    # rank normalization: every row of the row-ranked matrix and every column of the result is a permutation
    r = ag.rank_normalize(np.random.default_rng(1).normal(size=(3, 9, 9)))
    assert np.all(np.sort(r * 9, axis=-2) == np.arange(9)[:, None])
    # settings: control / perturbed / difference columns of the source (offset 1: <cls> first)
    c_map, p_map = means.mean("ctrl"), means.mean("A+ctrl")
    for setting, want in (
        ("control", naive[ctrl].mean(0)[1:, 1 + 5]),
        ("perturbed", naive[~ctrl].mean(0)[1:, 1 + 5]),
        ("difference", naive[~ctrl].mean(0)[1:, 1 + 5] - naive[ctrl].mean(0)[1:, 1 + 5]),
    ):
        np.testing.assert_allclose(ag.attention_scores(c_map, p_map, 5, setting, offset=1), want, atol=1e-6)
    np.testing.assert_allclose(
        ag.attention_scores(c_map, p_map, 5, "control", offset=1, direction="row"), naive[ctrl].mean(0)[1 + 5, 1:],
        atol=1e-6,
    )  # fmt: skip


def test_maps_are_formed_a_few_heads_at_a_time():
    """The (M, M) work per step is bounded (max_bytes): one head per step gives the same maps as all at once."""
    q, k = torch.randn(2, 4, 50, 8), torch.randn(2, 4, 50, 8)
    whole = [m for _, m in ag.cell_maps(q, k)]
    one_head = [m for _, m in ag.cell_maps(q, k, max_bytes=1)]
    for a, b in zip(whole, one_head, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_softmax_and_unranked_options_match_the_naive_computation():
    n_genes, m = 30, 11
    model = tiny_model(n_genes)
    inputs = random_inputs(3, m, n_genes, seed=2)
    batches = [(inputs, ["all"] * 3)]
    raw = ag.condition_attention(model, batches, m, rank=False).mean("all")
    np.testing.assert_allclose(raw, naive_maps(model, inputs, rank=False).mean(0), rtol=1e-4, atol=1e-4)
    soft = ag.condition_attention(model, batches, m, softmax=True, rank=False).mean("all")
    np.testing.assert_allclose(soft, naive_maps(model, inputs, softmax=True, rank=False).mean(0), atol=1e-5)
    # softmax is monotone within a row: after rank normalization it changes nothing
    ranked = ag.condition_attention(model, batches, m).mean("all")
    np.testing.assert_array_equal(ag.condition_attention(model, batches, m, softmax=True).mean("all"), ranked)


def test_every_cell_counts_the_official_first_cell_bug_is_fixed():
    n_genes, m = 30, 9
    model = tiny_model(n_genes)
    inputs = random_inputs(5, m, n_genes, seed=3)
    conditions = ["a", "a", "b", "a", "c"]
    per_cell = naive_maps(model, inputs)
    ours = ag.condition_attention(model, [(inputs, conditions)], m)
    # the official loop: a condition's sum starts as zeros at its first cell, later cells are added, / all cells
    official, counts = {}, {}
    for cell_map, c in zip(per_cell, conditions, strict=True):
        counts[c] = counts.get(c, 0) + 1
        if c not in official:
            official[c] = np.zeros((m, m))
        else:
            official[c] += cell_map
    for c in ("a", "b", "c"):
        rows = [i for i, x in enumerate(conditions) if x == c]
        np.testing.assert_allclose(ours.mean(c), per_cell[rows].mean(0), atol=1e-6)  # every cell counts
    np.testing.assert_allclose(official["a"] / 3, per_cell[[1, 3]].sum(0) / 3)  # cell 0 lost
    assert not np.allclose(official["a"] / 3, ours.mean("a"), atol=1e-3)
    assert np.all(official["b"] == 0) and ours.mean("b").max() > 0  # a one-cell condition was all zeros


def test_hypergeometric_p_value_on_hand_computed_counts():
    # 20 candidate genes, 5 known targets, top 6 with 3 of them:
    # C(5,3)C(15,3) + C(5,4)C(15,2) + C(5,5)C(15,1) over C(20,6) = (4550 + 525 + 15) / 38760
    assert ag.hypergeom_p(3, 20, 5, 6) == pytest.approx(5090 / 38760, rel=1e-12)
    assert ag.hypergeom_p(3, 20, 5, 6) == pytest.approx(hypergeom.sf(2, 20, 5, 6), rel=1e-12)
    assert ag.hypergeom_p(0, 20, 5, 6) == 1.0
    assert ag.hypergeom_p(5, 20, 5, 6) == pytest.approx(comb(15, 1) / comb(20, 6), rel=1e-12)
    known = np.zeros(21, dtype=bool)
    known[[1, 2, 3, 10, 11]] = True
    cand = np.ones(21, dtype=bool)
    cand[0] = False  # the source
    scores = -np.arange(21, dtype=float)  # best first: genes 0, 1, 2, ...
    sel = ag.top_k(scores, cand, 6)
    assert sel.tolist() == [1, 2, 3, 4, 5, 6]
    stats = ag.overlap_stats(sel, known, cand)
    assert (stats["overlap"], stats["n_background"], stats["n_known_targets"], stats["k"]) == (3, 20, 5, 6)
    assert stats["p_hypergeom"] == pytest.approx(5090 / 38760, rel=1e-12) and stats["expected"] == pytest.approx(1.5)
    # the expression-matched random draws: seeded, matched per decile, mean near the hypergeometric mean
    expr = np.linspace(0, 1, 21)
    a = ag.random_matched_overlaps(sel, known, cand, expr, 4000, seed=0)
    np.testing.assert_array_equal(a, ag.random_matched_overlaps(sel, known, cand, expr, 4000, seed=0))
    assert a.min() >= 0 and a.max() <= 5
    # the 6 selected genes sit in the lowest 3 deciles (genes 1..6): random sets are drawn there too (targets 1-3)
    assert a.mean() == pytest.approx(3.0, abs=0.01)


# ---------------------------------------------------------------------------------------
# real cells


@pytest.fixture(scope="module")
def pbmc_case(tmp_path_factory):
    """Real cells (scanpy's pbmc68k_reduced, 700 PBMCs), a tiny model over their genes, a TF-target TSV."""
    from data_modules.demo import pbmc68k_log_normalized
    from data_modules.vocab import GeneVocab
    from scgpt_train.checkpoints import save_checkpoint

    d = tmp_path_factory.mktemp("grn")
    cells = pbmc68k_log_normalized()
    vocab = GeneVocab.from_genes(cells.var_names)
    for nc in (0, 3):
        torch.manual_seed(0)
        from scgpt_train.model import ScGPT

        model = ScGPT(len(vocab), vocab.pad_id, d_model=32, n_heads=4, d_ff=64, n_layers=2, n_conditions=nc,
                      decoder_style="affine" if nc else "mlp")  # fmt: skip
        save_checkpoint(model, vocab.token_to_id, d / f"tiny{nc}.pt")
    cells.write_h5ad(d / "pbmc.h5ad")
    return d, cells


def _script_main():
    spec = importlib.util.spec_from_file_location("attention_grn_script", ROOT / "scripts" / "attention_grn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_script_on_real_cells(pbmc_case, capsys):
    d, cells = pbmc_case
    mean = np.asarray(cells.X.mean(0)).ravel()
    panel = list(cells.var_names[np.argsort(-mean, kind="stable")[:60]])
    # a resource over the panel's genes: two sources with 6 and 4 targets, one target outside the data
    edges = [(panel[0], g) for g in panel[10:16]] + [(panel[1], g) for g in panel[20:24]] + [(panel[1], "NOT_A_GENE")]
    pd.DataFrame(edges, columns=["source", "target"]).to_csv(d / "tf.tsv", sep="\t", index=False)
    out = d / "out"
    args = ["--checkpoint", str(d / "tiny0.pt"), "--adata", str(d / "pbmc.h5ad"), "--tf-targets", str(d / "tf.tsv"),
            "--out", str(out), "--max-genes", "60", "--max-cells", "40", "--n-random", "200", "--top-k", "10",
            "--no-progress"]  # fmt: skip
    assert _script_main()(args) == 0
    text = capsys.readouterr().out
    assert "| control | scGPT attention | 2 |" in text and "peak RSS" in text
    table = pd.read_csv(out / "summary.tsv", sep="\t")
    att = table[table.method == "attention"].set_index("source")
    assert set(att.index) == {panel[0], panel[1]}
    assert att.loc[panel[0], "n_known_targets"] == 6 and att.loc[panel[1], "n_known_targets"] == 4
    assert (att["n_background"] == 59).all() and (att["k"] == 10).all()
    for r in att.itertuples():  # the reported p is the hypergeometric tail of the reported counts
        assert r.p_hypergeom == pytest.approx(
            hypergeom.sf(r.overlap - 1, 59, r.n_known_targets, 10) if r.overlap else 1.0
        )
    targets = pd.read_csv(out / "targets.tsv", sep="\t")
    assert set(targets.method) == {"attention", "coexpression"}
    assert (targets.groupby(["source", "method"]).size() == 10).all()
    assert not (targets.gene == targets.source).any()  # the source is never its own target
    for f in ("report.md", "summary.json", "grn_precision.png", "grn_network.png"):
        assert (out / f).exists(), f


def test_perturbation_settings_on_the_perturbation_demo(pbmc_case):
    """The perturbation demo (real pbmc68k cells, planted knock-downs and downstream programs): a perturbation
    model (flags) is read with flags, all three settings run, and the DE baseline finds the planted programs."""
    from data_modules.perturbation.demo import demo_spec, make_perturbation_demo

    d, _ = pbmc_case
    demo = make_perturbation_demo()
    spec = demo_spec(demo)
    sources = sorted(spec["programs"])[:2]
    rows = [(s, g) for s in sources for g in spec["programs"][s]["genes"]]
    pd.DataFrame(rows, columns=["source", "target"]).to_csv(d / "planted.tsv", sep="\t", index=False)
    s = ag.run_attention_grn(
        d / "tiny3.pt", demo, d / "planted.tsv", d / "pert", sources=sources, condition_key="condition",
        max_cells=60, n_random=100, top=12, progress=False,
    )  # fmt: skip
    assert s["input_style"] == "perturbation"
    assert s["perturbed_conditions"] == {g: f"{g}+ctrl" for g in sources}
    t = s["table"]
    assert set(t.setting) == {"control", "perturbed", "difference"}
    de = t[(t.method == "de") & (t.setting == "difference")]
    # 12 planted genes per source (|log fold change| >= 1): DE between 9 perturbed and 60 control cells finds most
    assert (de.overlap >= 6).all() and (de.p_hypergeom < 1e-3).all(), de
    att = t[t.method == "attention"]
    assert len(att) == 6 and att.p_random.between(0, 1).all()


def test_bad_inputs_are_refused_by_name(pbmc_case, capsys):
    d, cells = pbmc_case
    g = list(cells.var_names)
    edges = [(g[0], g[1]), (g[0], g[2]), (g[40], "NOT_A_GENE"), (g[40], g[100])]
    pd.DataFrame(edges, columns=["source", "target"]).to_csv(d / "bad.tsv", sep="\t", index=False)
    kw = dict(genes=g[:30], n_random=10, progress=False, max_cells=4)
    with pytest.raises(ag.GRNError, match="source gene 'NOPE' is not among the tested genes"):
        ag.run_attention_grn(d / "tiny0.pt", cells, d / "bad.tsv", d / "x", sources=["NOPE"], **kw)
    with pytest.raises(ag.GRNError, match=f"source gene '{g[3]}' is not a source"):
        ag.run_attention_grn(d / "tiny0.pt", cells, d / "bad.tsv", d / "x", sources=[g[3]], **kw)
    # g[40]'s known targets are not tested genes: the resource and the panel do not overlap for it
    with pytest.raises(ag.GRNError, match=f"none of the 2 known targets of '{g[40]}'"):
        ag.run_attention_grn(
            d / "tiny0.pt", cells, d / "bad.tsv", d / "x", sources=[g[40]], **{**kw, "genes": [*g[:30], g[40]]}
        )
    with pytest.raises(ag.GRNError, match="no gene of the panel .* is a source"):
        ag.run_attention_grn(d / "tiny0.pt", cells, d / "bad.tsv", d / "x", genes=g[5:30], n_random=10,
                             progress=False)  # fmt: skip
    with pytest.raises(ag.GRNError, match="--condition-key 'perturbation' is not an obs column"):
        ag.run_attention_grn(d / "tiny0.pt", cells, d / "bad.tsv", d / "x", condition_key="perturbation", **kw)
    with pytest.raises(ag.GRNError, match="no cell has condition == 'ctrl'"):
        c3 = cells.copy()
        c3.obs["condition"] = "x"
        ag.run_attention_grn(d / "tiny0.pt", c3, d / "bad.tsv", d / "x", condition_key="condition", **kw)
    rc = _script_main()(["--checkpoint", str(d / "tiny0.pt"), "--adata", str(d / "pbmc.h5ad"), "--tf-targets",
                         str(d / "missing.tsv"), "--out", str(d / "x")])  # fmt: skip
    assert rc == 2 and "--tf-targets" in capsys.readouterr().err


def test_grn_benchmark_report_on_a_short_setting(pbmc_case, tmp_path):
    """benchmark=grn_<dataset> on a shortened setting: gene programs (a GMT written here) and two attention-GRN
    parts (real pbmc68k cells with a TSV resource; the perturbation demo with its planted programs)."""
    from scgpt_train.benchmarks.harness import run_benchmark

    d, cells = pbmc_case
    g = list(cells.var_names)
    (tmp_path / "sets.gmt").write_text(
        "".join(f"SET{i}\tdesc\t" + "\t".join(g[i * 15 : i * 15 + 15]) + "\n" for i in range(8))
    )
    top = [g[i] for i in np.argsort(-np.asarray(cells.X.mean(0)).ravel(), kind="stable")[:80]]  # the 80-gene panel
    pd.DataFrame([(top[0], t) for t in top[1:9]], columns=["source", "target"]).to_csv(
        tmp_path / "tf.tsv", sep="\t", index=False
    )
    bench = {
        "name": "grn_short",
        "_target_": "scgpt_train.benchmarks.grn.run_grn_benchmark",
        "_partial_": True,
        "task": "grn",
        "dataset": "pbmc68k cells, shortened",
        "checkpoint": str(d / "tiny0.pt"),
        "gene_programs": {"data": "pbmc68k", "label_key": "cell_type", "gmt": [str(tmp_path / "sets.gmt")],
                          "resolutions": [1], "resolution": 1},
        "attention_grn": [
            {"name": "real", "data": "pbmc68k", "tf_targets": str(tmp_path / "tf.tsv"), "max_genes": 80,
             "max_cells": 20, "n_random": 100, "top": 10},
            {"name": "planted", "data": "perturbation_demo", "tf_targets": "planted", "condition_key": "condition",
             "sources": ["CD52", "CD53"], "max_cells": 20, "n_random": 100, "top": 12},
        ],
        "paper": {"attention GRN": "qualitative"},
    }  # fmt: skip
    result = run_benchmark(bench, [0], tmp_path / "bench")
    out = tmp_path / "bench"
    text = (out / "report.md").read_text()
    sections = ["## Gene-embedding programs", "## Attention GRN: real", "## Attention GRN: planted", "## The paper"]
    assert all(s in text for s in sections), text
    assert "| control | scGPT attention | 1 |" in text and "| difference | differential expression | 2 |" in text
    assert "![grn_precision](planted/grn_precision.png)" in text
    for f in ("gene_programs/report.md", "real/summary.tsv", "planted/grn_network.png", "results.json"):
        assert (out / f).exists(), f
    assert set(result["parts"]) == {"gene_programs", "real", "planted"}
    assert (out / "planted" / "planted_targets.tsv").read_text().count("\nCD52\t") == 12
