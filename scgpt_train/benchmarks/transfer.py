"""``benchmark=transfer_sim``: does pretraining transfer? Pretrain on N simulated cells, fine-tune on few labels of a
held-out tissue, beside the same model from scratch, zero-shot kNN and linear baselines (docs/simulation.md).

For each N of ``scales``: a corpus of N cells of tissues A..E (``data_modules.simulate.write_corpus``) and one
generative pretraining on it (``experiment=pretrain_transfer_sim``, ``pretrain_steps`` steps for every N: the same
compute, more distinct cells). For each seed: a fine-tuning file of the held-out tissue F (its own type proportions,
``n_novel_types`` types absent from pretraining; ``labelled_per_type`` labelled cells per type, ``n_query`` query
cells), fine-tuned with the same budget (``experiment=finetune_transfer_sim``, through ``pipeline.run``) from
scratch and from each checkpoint; zero-shot kNN on each checkpoint's embeddings; HVG+PCA + logistic regression with
the PCA fitted on the labelled cells and on the largest pretraining corpus; L1 logistic regression. Metric: macro F1
on the query cells; mean ± sd over seeds."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scgpt_train.benchmarks.harness import compose_train, run_seed, seed_config, write_report

log = logging.getLogger(__name__)

PRETRAIN_EXPERIMENT = "pretrain_transfer_sim"
BASELINE_NAMES = {
    "hvg_pca_lr_labelled": "HVG+PCA (fitted on the labelled cells) + LR",
    "hvg_pca_lr_corpus": "HVG+PCA (fitted on the pretraining corpus) + LR",
    "l1_lr": "L1 logistic regression",
}


def _cache_dir(extra: Sequence[str], out_dir: Path) -> Path:
    for o in extra:
        if o.startswith("paths.cache_dir="):
            return Path(o.split("=", 1)[1])
    return out_dir / "cache"


def sim_params(bench: Mapping):
    from data_modules.simulate import SimParams

    return SimParams.from_mapping(bench.get("simulation") or {}, "benchmark.simulation")


def finetune_file(model, bench: Mapping, seed: int, path: Path) -> Path:
    """The held-out tissue's cells for ``seed``: ``labelled_per_type`` cells of every type (obs role = labelled)
    and ``n_query`` others (role = query); raw counts."""
    from data_modules.simulate import TISSUES, simulate_adata
    from scgpt_train.evaluation.report import write_h5ad

    per_type, n_query = int(bench["labelled_per_type"]), int(bench["n_query"])
    rng = np.random.default_rng(seed)
    pool = simulate_adata(model, n_query + 40 * per_type * len(model.type_names), [TISSUES[-1]], seed=10_000 + seed)
    labels = pool.obs["cell_type"].astype(str).to_numpy()
    role = np.full(pool.n_obs, "", dtype=object)
    for t in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == t))
        if len(idx) <= per_type:
            raise ValueError(f"type {t} has only {len(idx)} cells in tissue F; raise n_query")
        role[idx[:per_type]] = "labelled"
    rest = np.flatnonzero(role == "")
    role[rng.choice(rest, min(n_query, len(rest)), replace=False)] = "query"
    pool.obs["role"] = role.astype(str)
    return write_h5ad(pool[role != ""].copy(), path)


def pretrain(bench: Mapping, corpus: Path, run_dir: Path, extra: Sequence[str], compose) -> tuple[Path, dict]:
    """One generative pretraining on ``corpus`` (reused when ``run_dir`` holds a finished one); its last checkpoint
    and the validation per-gene ratios of its summary."""
    import json

    summary = run_dir / "summary.json"
    done = summary.is_file() and json.loads(summary.read_text()).get("finished", True)
    if not done:
        over = [
            f"experiment={PRETRAIN_EXPERIMENT}",
            f"paths.corpus={corpus}",
            f"paths.output_dir={run_dir}",
            f"trainer.max_steps={int(bench['pretrain_steps'])}",
            f"trainer.val_check_interval={int(bench['pretrain_steps'])}",  # validated before and after: the ratio
            f"seed={int(bench.get('pretrain_seed', 0))}",
            "logger=csv",
            *[str(o) for o in bench.get("pretrain_overrides") or []],
            *[o for o in extra if o.startswith("paths.")],
        ]
        run_seed((compose or compose_train)(over))
    return run_dir / "checkpoints" / "last.ckpt", summary_ratios(summary)


def summary_ratios(summary: Path) -> dict[str, float]:
    """The validation per-gene ratios of a run's ``summary.json`` ({} when it has none)."""
    import json

    per_gene = (json.loads(summary.read_text()).get("val_per_gene") or {}) if summary.is_file() else {}
    return {k.split("/")[-1]: float(v) for k, v in per_gene.items()}


def _log_norm(x):
    from scgpt_train.evaluation.baselines import log_normalized

    return log_normalized(x, "counts")


def corpus_sample(corpus: Path, genes: Sequence[str], n: int):
    """The first ``n`` cells of ``corpus`` (written in random order) as a (n, len(genes)) CSR of counts."""
    import scipy.sparse as sp

    from data_modules.store.reader import Corpus
    from data_modules.vocab import GeneVocab

    c = Corpus(corpus)
    block = c.read_cells(0, min(n, c.n_cells))
    vocab = GeneVocab.from_json(Path(corpus) / "vocab.json")
    col = np.full(len(vocab), -1, dtype=np.int64)
    col[[vocab[g] for g in genes]] = np.arange(len(genes))
    x = sp.csr_matrix(
        (block.counts.astype(np.float32), col[block.gene_ids], block.indptr), shape=(len(block.indptr) - 1, len(genes))
    )
    return x


def linear_baselines(adata, corpus_x, bench: Mapping, seed: int) -> dict[str, dict]:
    """macro F1 / accuracy of the linear baselines on the query cells of ``adata``."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    from scgpt_train.evaluation.baselines import l1_logistic_regression
    from scgpt_train.evaluation.metrics import classification_metrics

    lab = (adata.obs["role"] == "labelled").to_numpy()
    y = adata.obs["cell_type"].astype(str).to_numpy()
    x = _log_norm(adata.X)
    xc = _log_norm(corpus_x)
    n_hvg, n_pcs = int(bench.get("n_hvg", 500)), int(bench.get("n_pcs", 20))
    out = {}
    for name, fit_on in (("hvg_pca_lr_labelled", x[lab]), ("hvg_pca_lr_corpus", xc)):
        var = np.asarray(fit_on.power(2).mean(0)).ravel() - np.asarray(fit_on.mean(0)).ravel() ** 2
        hvg = np.sort(np.argsort(-var)[:n_hvg])  # the most variable genes (log scale) of the cells PCA is fitted on
        k = int(min(n_pcs, fit_on.shape[0] - 1))
        pca = PCA(k, random_state=seed).fit(fit_on[:, hvg].toarray())
        z = pca.transform(x[:, hvg].toarray())
        clf = LogisticRegression(max_iter=2000, random_state=seed).fit(z[lab], y[lab])
        out[name] = classification_metrics(y[~lab], clf.predict(z[~lab]))
    pred, _ = l1_logistic_regression(
        x[lab], y[lab], x[~lab], c_grid=bench.get("l1_c_grid") or (0.1, 1.0, 10.0), seed=seed
    )
    out["l1_lr"] = classification_metrics(y[~lab], pred)
    return out


def zero_shot_knn(checkpoint: Path, path: Path, adata, k: int, seed: int) -> dict:
    """kNN vote (cosine, ``k`` neighbours) of the labelled cells on the query cells, on the checkpoint's embeddings."""
    from sklearn.neighbors import KNeighborsClassifier

    from scgpt_train.evaluation.metrics import classification_metrics
    from scgpt_train.tasks.reference_map.embed import embed_adata, load_model

    model, vocab = load_model(checkpoint)
    emb = embed_adata(model, vocab, checkpoint, path, adata, seed=seed, progress=False).emb
    lab = (adata.obs["role"] == "labelled").to_numpy()
    y = adata.obs["cell_type"].astype(str).to_numpy()
    knn = KNeighborsClassifier(n_neighbors=k).fit(emb[lab], y[lab])
    return classification_metrics(y[~lab], knn.predict(emb[~lab]))


def _agg(values: list[float]) -> dict:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "values": values,
    }


def plot_curve(result: dict, path: Path) -> Path:
    from scgpt_train.evaluation.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = sorted(int(n) for n in result["pretrained"])
    for key, label, marker in (
        ("pretrained", "fine-tuned from pretrained", "o"),
        ("zero_shot_knn", "zero-shot kNN", "s"),
    ):
        means = [result[key][str(n)]["mean"] for n in ns]
        sds = [result[key][str(n)]["std"] for n in ns]
        ax.errorbar(ns, means, yerr=sds, marker=marker, capsize=3, label=label)
    ax.axhline(result["scratch"]["mean"], color="k", ls="--", label="fine-tuned from scratch")
    for i, (name, agg) in enumerate(result["baselines"].items()):
        ax.axhline(agg["mean"], color=f"C{i + 2}", ls=":", label=BASELINE_NAMES.get(name, name))
    ax.set_xscale("log")
    ax.set_xlabel("pretraining cells (N)")
    ax.set_ylabel("macro F1, held-out tissue (query)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def run_transfer_benchmark(
    bench: Mapping, seeds: Sequence[int], out_dir: Path, extra_overrides: Sequence[str] = (), compose=None
) -> dict:
    """Pretrain at every scale, then fine-tune / embed / fit baselines on the held-out tissue for every seed;
    ``benchmark.md``, ``results.json`` (with the ``transfer`` block) and ``transfer_curve.png`` in ``out_dir``."""
    import anndata as ad

    from data_modules.simulate import TISSUES, fit_model, write_corpus
    from scgpt_train.evaluation.report import markdown_table, mean_std

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = sim_params(bench)
    model = fit_model(params, _cache_dir(extra_overrides, out_dir))
    scales = [int(n) for n in bench["scales"]]
    checkpoints, per_gene, write_s, pretrain_s = {}, {}, {}, {}
    given = {int(n): Path(c) for n, c in (bench.get("checkpoints") or {}).items()}  # pretrained elsewhere
    own = {int(n): Path(c) for n, c in (bench.get("corpora") or {}).items()}  # corpora written elsewhere
    corpora = {n: own.get(n, out_dir / "corpora" / f"n{n}") for n in scales}
    for n in scales:
        t = time.perf_counter()
        if not (corpora[n] / "manifest.json").is_file():
            seed, chunk = int(bench.get("corpus_seed", 0)), int(bench.get("chunk_cells", 4096))
            write_corpus(model, corpora[n], n, TISSUES[:-1], seed=seed, chunk_cells=chunk)
        write_s[n], t = time.perf_counter() - t, time.perf_counter()
        if n in given:
            checkpoints[n], per_gene[n] = given[n], summary_ratios(given[n].parent.parent / "summary.json")
        else:
            run_dir = out_dir / "pretrain" / f"n{n}"
            checkpoints[n], per_gene[n] = pretrain(bench, corpora[n], run_dir, extra_overrides, compose)
        pretrain_s[n] = time.perf_counter() - t
        log.info("transfer_sim: N = %d: corpus %.0f s, pretraining %.0f s", n, write_s[n], pretrain_s[n])
    corpus_x = corpus_sample(corpora[max(scales)], model.genes, int(bench.get("pca_corpus_cells", 5000)))
    runs: dict[str, list[float]] = {}
    per_seed = []
    for seed in seeds:
        seed_dir = out_dir / f"seed_{seed}"
        path = finetune_file(model, bench, int(seed), seed_dir / "tissue_F.h5ad")
        adata = ad.read_h5ad(path)
        row = {"seed": int(seed)}
        more = [f"data.path={path}", "data.query_fraction=null", "data.query_key=role", "data.query_values=[query]"]
        row["scratch"] = run_seed(seed_config(bench, seed, seed_dir / "scratch", extra_overrides, compose, more))[
            "test/macro_f1"
        ]
        for n in scales:
            ckpt = checkpoints[n]
            pre = [*more, "model=from_official", f"pretrained={ckpt}", f"data.vocab={ckpt}"]
            row[f"pretrained/{n}"] = run_seed(
                seed_config(bench, seed, seed_dir / f"pretrained_n{n}", extra_overrides, compose, pre)
            )["test/macro_f1"]
            row[f"zero_shot_knn/{n}"] = zero_shot_knn(ckpt, path, adata, int(bench.get("k", 5)), int(seed))["macro_f1"]
        for name, m in linear_baselines(adata, corpus_x, bench, int(seed)).items():
            row[f"baseline/{name}"] = m["macro_f1"]
        per_seed.append(row)
        for key, value in row.items():
            if key != "seed":
                runs.setdefault(key, []).append(float(value))
    transfer = {
        "metric": "macro_f1",
        "scratch": _agg(runs["scratch"]),
        "pretrained": {str(n): _agg(runs[f"pretrained/{n}"]) for n in scales},
        "zero_shot_knn": {str(n): _agg(runs[f"zero_shot_knn/{n}"]) for n in scales},
        "baselines": {b: _agg(runs[f"baseline/{b}"]) for b in BASELINE_NAMES},
        "per_gene_ratio": {str(n): per_gene[n] for n in scales},
    }
    figure = plot_curve(transfer, out_dir / "transfer_curve.png")
    rows = [["fine-tuned from scratch", "-", mean_std(runs["scratch"]), "-"]]
    for n in scales:
        r = " / ".join(
            f"{per_gene[n][k]:.3f}" if k in per_gene[n] else "-" for k in ("gep_vs_per_gene", "gepc_vs_per_gene")
        )
        rows.append(["fine-tuned from pretrained", f"{n:,}", mean_std(runs[f"pretrained/{n}"]), r])
        rows.append(
            [f"zero-shot kNN (k = {int(bench.get('k', 5))})", f"{n:,}", mean_std(runs[f"zero_shot_knn/{n}"]), r]
        )
    for b, name in BASELINE_NAMES.items():
        rows.append([name, "-", mean_std(runs[f"baseline/{b}"]), "-"])
    table = markdown_table(["method", "pretraining cells", "macro F1 (query)", "GEP / GEPC vs per-gene"], rows)
    notes = [
        f"Benchmark `{bench['name']}`: {bench.get('dataset', '')}.",
        f"Simulation (data_modules/simulate.py, docs/simulation.md): {params}.",
        f"Pretraining: `train.py experiment={PRETRAIN_EXPERIMENT}`, {bench['pretrain_steps']} steps for every N "
        f"(same compute; more N = more distinct cells), overrides {list(bench.get('pretrain_overrides') or [])}; "
        "GEP / GEPC vs per-gene = its validation GEP and GEPC losses over the per-gene-mean predictor's (1.0 = gene "
        "identity only)."
        + ("".join(f" N = {n:,}: checkpoint given, `{c}` (not pretrained here)." for n, c in given.items())),
        f"Fine-tuning: `train.py experiment={bench['experiment']}` {list(bench.get('train_overrides') or [])}, "
        f"the same budget from scratch and from every checkpoint; {bench['labelled_per_type']} labelled cells per "
        f"type of tissue F, {bench['n_query']} query cells; seeds {list(seeds)} (each: its own tissue-F cells and "
        "fine-tune seed), mean ± sd.",
        "Wall time per N, writing the corpus (0 s: reused) / pretraining (0 s: reused or given): "
        + ", ".join(f"{n:,}: {write_s[n]:.0f} s / {pretrain_s[n]:.0f} s" for n in scales)
        + f"; whole benchmark {time.perf_counter() - t0:.0f} s.",
    ]
    result = {
        "benchmark": dict(bench),
        "seeds": list(seeds),
        "per_seed": per_seed,
        "transfer": {
            "metric": "macro_f1",
            "scratch": transfer["scratch"]["mean"],
            "pretrained": {k: v["mean"] for k, v in transfer["pretrained"].items()},
            "baselines": {k: v["mean"] for k, v in transfer["baselines"].items()}
            | {f"zero_shot_knn_{k}": v["mean"] for k, v in transfer["zero_shot_knn"].items()},
        },
        "summary": transfer,
        "table": table,
    }
    write_report(out_dir, bench["name"], notes, table, result, [figure.name])
    return result
