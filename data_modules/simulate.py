"""Semi-synthetic single-cell corpora with known ground truth, drawn from a count model fitted to real cells.

The model (docs/simulation.md), fitted by :func:`fit_model` to celltypist's raw-count sample (559 real cells that
ship inside the celltypist package; ``data_modules.demo.celltypist_adata``):

1. **Genes**: the ``n_genes`` genes detected in most real cells (real symbols).
2. **Gene programs**: a Poisson (KL) non-negative factorization of the real cells' gene fractions,
   ``x_c / L_c ~ f_c @ H``: ``H`` (K, G) rows sum to 1 (a program = a distribution over genes), ``f_c`` (K,) the
   cell's program usage (sums to 1).
3. **Cell types**: k-means clusters of the real usages ``f_c``; a type's usage centroid ``u_t``, pulled towards the
   mean usage by ``type_separation`` (1 = the fitted centroids, 0 = all types alike; above 1 pushed away from it,
   an easier world: tests/test_transfer.py uses 1.5). Types differ in their mix of
   programs (hundreds of genes each), not in a marker gene. A cell of type t draws ``f ~ Dirichlet(precision * u_t)``;
   ``precision`` is fitted to the real clusters by moments (the within-type variability of usage).
4. **Tissues**: a tissue is a composition over types (Dirichlet(``composition_alpha``)) and a gene-wise shift,
   ``exp(N(0, tissue_shift_sd))`` on a random ``tissue_shift_fraction`` of the genes. The last ``n_novel_types``
   types occur only in the held-out tissue (the last one).
5. **Batches / donors**: ``batches_per_tissue`` per tissue, each a gene-wise multiplicative effect
   ``exp(N(0, batch_sd))`` and a depth factor ``exp(N(0, batch_depth_sd))``.
6. **Counts**: library size ``L ~ LogNormal`` fitted to the real cells' totals on the panel (times ``depth_scale``
   and the batch's depth factor), mean ``mu_g = L * p_g`` with ``p`` the renormalized product of 3-5, counts
   ``NB(mu_g, theta_g)`` (a Gamma-Poisson draw) with per-gene dispersions ``theta_g`` fitted by moments to the real
   cells' residuals around their own fitted means.

:func:`write_corpus` streams any number of cells of chosen tissues into the project's corpus format
(``data_modules.store.writer.CorpusWriter``) in chunks (memory independent of the corpus size), seeded, with the
ground truth in obs (``cell_type``, ``tissue``, ``batch``); :func:`simulate_adata` returns a small AnnData of raw
counts for fine-tuning; :func:`marginal_stats` compares simulated and real cells (genes / counts per cell,
mean-variance)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_modules.atomic import atomic_dir, atomic_path
from data_modules.errors import UserInputError
from data_modules.store.writer import CorpusWriter
from data_modules.value_rules import Rule, is_int, number, whole
from data_modules.vocab import GeneVocab

TISSUES = ("A", "B", "C", "D", "E", "F")
OBS_COLUMNS = ["cell_type", "tissue", "batch"]


class SimParamsError(UserInputError):
    """A simulation parameter out of its range, or a name ``SimParams`` does not have."""


@dataclass(frozen=True)
class SimParams:
    """Everything the simulation depends on (the fit and the world drawn from it); one seed for both. Every field
    is checked on construction (:class:`SimParamsError` names it)."""

    n_genes: int = 1000  # the most often detected real genes
    n_programs: int = 12  # K of the factorization
    n_types: int = 8  # k-means clusters of the real usages
    n_novel_types: int = 1  # types only in the held-out tissue (the last of TISSUES)
    type_separation: float = 1.0  # 1: fitted centroids; towards 0: every type has the mean usage; > 1: further apart
    precision: float | None = None  # Dirichlet precision of a cell's usage around its type's; None = fitted
    composition_alpha: float = 1.0  # Dirichlet concentration of a tissue's type composition
    tissue_shift_sd: float = 0.5
    tissue_shift_fraction: float = 0.1
    batches_per_tissue: int = 2
    batch_sd: float = 0.3
    batch_depth_sd: float = 0.3
    depth_scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        rules = {
            "n_genes": whole(2),
            "n_programs": whole(1),
            "n_types": whole(2),
            "n_novel_types": Rule(
                lambda v: is_int(v) and v >= 0 and (not is_int(self.n_types) or v < self.n_types),
                "a whole number >= 0 and below n_types",
            ),
            "type_separation": number(0),
            "precision": number(0, strict=True, nullable=True),
            "composition_alpha": number(0, strict=True),
            "tissue_shift_sd": number(0),
            "tissue_shift_fraction": number(0, maximum=1, inclusive_maximum=True),
            "batches_per_tissue": whole(1),
            "batch_sd": number(0),
            "batch_depth_sd": number(0),
            "depth_scale": number(0, strict=True),
            "seed": whole(0),
        }
        bad = [r for name, rule in rules.items() if (r := rule.refusal(name, getattr(self, name))) is not None]
        if bad:
            raise SimParamsError("simulation parameters refused: " + "; ".join(bad))

    @classmethod
    def from_mapping(cls, values: Mapping, where: str = "simulation") -> SimParams:
        """``SimParams(**values)``, refusing a name it does not have with one message naming ``where``."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise SimParamsError(f"{where} has no parameter(s) {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**dict(values))


@dataclass
class SimModel:
    """The fitted count model and the world drawn from it (types, tissues, batches)."""

    params: SimParams
    genes: list[str]
    programs: np.ndarray  # (K, G) rows sum to 1
    type_usage: np.ndarray  # (T, K) rows sum to 1, after type_separation
    precision: float
    theta: np.ndarray  # (G,) NB dispersion
    log_lib_mean: float
    log_lib_sd: float
    tissue_types: dict[str, np.ndarray]  # tissue -> (T,) composition
    tissue_shift: dict[str, np.ndarray]  # tissue -> (G,) multiplicative
    batch_effect: dict[str, np.ndarray]  # batch -> (G,) multiplicative
    batch_depth: dict[str, float]
    batch_tissue: dict[str, str]

    @property
    def type_names(self) -> list[str]:
        return [f"type_{i}" for i in range(len(self.type_usage))]

    def batches_of(self, tissue: str) -> list[str]:
        return [b for b, t in self.batch_tissue.items() if t == tissue]


def real_cells(n_genes: int) -> tuple[sp.csr_matrix, list[str]]:
    """celltypist's raw-count sample on its ``n_genes`` most often detected genes (cells with none dropped)."""
    from data_modules.demo import celltypist_adata

    adata = celltypist_adata()
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    detected = np.diff(x.tocsc().indptr)
    keep = np.sort(np.argsort(-detected, kind="stable")[:n_genes])
    x = x[:, keep].tocsr()
    x = x[np.asarray(x.sum(axis=1)).ravel() > 0]
    return x, [str(g) for g in adata.var_names[keep]]


def _dirichlet_precision(usage: np.ndarray, clusters: np.ndarray) -> float:
    """Moment estimate of the Dirichlet precision of usages around their cluster means (median over programs)."""
    estimates = []
    for c in np.unique(clusters):
        u = usage[clusters == c]
        if len(u) < 5:
            continue
        m, v = u.mean(0), u.var(0)
        ok = (v > 1e-8) & (m > 1e-3)
        estimates.extend((m[ok] * (1 - m[ok]) / v[ok] - 1).tolist())
    return float(np.clip(np.median(estimates), 1.0, 1000.0)) if estimates else 20.0


FIT_KEYS = ("genes", "programs", "usage", "clusters", "theta", "log_lib", "real_data", "real_indices", "real_indptr")
FIT_PARAMS = ("n_genes", "n_programs", "n_types", "seed")  # the fields the fit depends on


def fit_counts(params: SimParams, cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The fit to the real cells (steps 1-3 and 6 of the module doc): gene symbols, programs (K, G), the real cells'
    usages (N, K) and clusters (N,), dispersions (G,), log library sizes (N,). With ``cache_dir`` it is kept in
    ``<cache_dir>/simulate_fit_<fields>.npz`` and reused (the fit takes ~20 s of CPU)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import NMF

    cache = None
    if cache_dir is not None:
        key = "_".join(f"{getattr(params, k)}" for k in FIT_PARAMS)
        cache = Path(cache_dir) / f"simulate_fit_{key}.npz"
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as f:
                return {k: f[k] for k in FIT_KEYS}
    x, genes = real_cells(params.n_genes)
    lib = np.asarray(x.sum(axis=1)).ravel()
    frac = sp.diags(1.0 / lib) @ x  # (N, G) gene fractions per cell
    nmf = NMF(
        params.n_programs, beta_loss="kullback-leibler", solver="mu", init="nndsvda", max_iter=200,
        random_state=params.seed,
    )  # fmt: skip
    w = nmf.fit_transform(frac * 1e3)
    h = nmf.components_
    scale = h.sum(1, keepdims=True)  # programs as gene distributions; usage carries their mass
    programs = h / scale
    usage = w * scale.T
    usage = usage / np.clip(usage.sum(1, keepdims=True), 1e-12, None)
    clusters = KMeans(params.n_types, n_init=4, random_state=params.seed).fit_predict(usage)
    mu = (usage @ programs) * lib[:, None]  # (N, G) each real cell's fitted mean
    excess = ((x.toarray() - mu) ** 2 - mu).sum(0)
    theta = np.clip((mu**2).sum(0) / np.clip(excess, 1e-9, None), 0.05, 100.0)
    fit = {
        "genes": np.asarray(genes, dtype=str),
        "programs": programs,
        "usage": usage,
        "clusters": clusters,
        "theta": theta,
        "log_lib": np.log(lib),
        "real_data": x.data.astype(np.float32),  # the real cells on the panel, for marginal_stats
        "real_indices": x.indices,
        "real_indptr": x.indptr,
    }
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache, ".npz") as tmp:
            np.savez(tmp, **fit)
    return fit


def fit_model(params: SimParams = SimParams(), cache_dir: str | os.PathLike | None = None) -> SimModel:
    """Fit the count model to the real cells (:func:`fit_counts`) and draw the world (types, tissues, batches) with
    ``params.seed``."""
    fit = fit_counts(params, cache_dir)
    usage, clusters, genes = fit["usage"], fit["clusters"], [str(g) for g in fit["genes"]]
    centroids = np.stack([usage[clusters == t].mean(0) for t in range(params.n_types)])
    fitted_precision = _dirichlet_precision(usage, clusters)
    s = float(params.type_separation)
    type_usage = np.clip((1 - s) * usage.mean(0) + s * centroids, 1e-4, None)
    type_usage /= type_usage.sum(1, keepdims=True)
    programs, theta, log_lib = fit["programs"], fit["theta"], fit["log_lib"]

    rng = np.random.default_rng(params.seed + 1)
    n_types, n_genes = params.n_types, len(genes)
    seen = np.ones(n_types, dtype=bool)
    seen[n_types - params.n_novel_types :] = False
    tissue_types, tissue_shift, batch_effect, batch_depth, batch_tissue = {}, {}, {}, {}, {}
    for i, tissue in enumerate(TISSUES):
        held_out = i == len(TISSUES) - 1
        comp = rng.dirichlet(np.full(n_types, params.composition_alpha))
        comp = np.where(seen | held_out, comp, 0.0)
        if held_out:  # every type present, the novel ones included
            comp = np.clip(comp, 0.05, None)
        tissue_types[tissue] = comp / comp.sum()
        shift = np.ones(n_genes)
        hit = rng.random(n_genes) < params.tissue_shift_fraction
        shift[hit] = np.exp(rng.normal(0.0, params.tissue_shift_sd, int(hit.sum())))
        tissue_shift[tissue] = shift
        for b in range(params.batches_per_tissue):
            name = f"{tissue}{b}"
            batch_effect[name] = np.exp(rng.normal(0.0, params.batch_sd, n_genes))
            batch_depth[name] = float(np.exp(rng.normal(0.0, params.batch_depth_sd)))
            batch_tissue[name] = tissue
    return SimModel(
        params=params,
        genes=genes,
        programs=programs,
        type_usage=type_usage,
        precision=float(params.precision or fitted_precision),
        theta=theta,
        log_lib_mean=float(log_lib.mean()),
        log_lib_sd=float(log_lib.std()),
        tissue_types=tissue_types,
        tissue_shift=tissue_shift,
        batch_effect=batch_effect,
        batch_depth=batch_depth,
        batch_tissue=batch_tissue,
    )


def sample_cells(
    model: SimModel, rng: np.random.Generator, n: int, tissues: list[str] | tuple[str, ...]
) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """``n`` cells (raw counts, CSR float32 (n, G)) of ``tissues`` (equal shares, then by composition / batch)."""
    unknown = [t for t in tissues if t not in model.tissue_types]
    if unknown:
        raise ValueError(f"unknown tissues {unknown}; the simulation has {list(model.tissue_types)}")
    tissue = np.asarray(tissues)[rng.integers(0, len(tissues), n)]
    ctype = np.empty(n, dtype=np.int64)
    batch = np.empty(n, dtype=object)
    for t in np.unique(tissue):  # sorted: a set of strings iterates in a per-process order
        at = np.flatnonzero(tissue == t)
        ctype[at] = rng.choice(len(model.type_usage), size=len(at), p=model.tissue_types[t])
        names = model.batches_of(t)
        batch[at] = np.asarray(names)[rng.integers(0, len(names), len(at))]
    usage = np.stack([rng.dirichlet(model.precision * model.type_usage[c]) for c in ctype])  # (n, K)
    profile = usage @ model.programs  # (n, G)
    profile *= np.stack([model.tissue_shift[t] * model.batch_effect[b] for t, b in zip(tissue, batch, strict=True)])
    profile /= profile.sum(1, keepdims=True)
    depth = np.array([model.batch_depth[b] for b in batch]) * model.params.depth_scale
    lib = np.exp(rng.normal(model.log_lib_mean, model.log_lib_sd, n)) * depth
    mu = profile * lib[:, None]
    theta = model.theta[None, :]
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)  # NB(mu, theta)
    obs = pd.DataFrame({"cell_type": np.asarray(model.type_names)[ctype], "tissue": tissue, "batch": batch.astype(str)})
    return sp.csr_matrix(counts), obs


def simulate_adata(model: SimModel, n: int, tissues, seed: int):
    """A small AnnData of ``n`` simulated cells of ``tissues`` (raw counts, var names = gene symbols)."""
    import anndata as ad

    x, obs = sample_cells(model, np.random.default_rng(seed), n, list(tissues))
    obs.index = [f"sim{seed}_{i}" for i in range(n)]
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=model.genes))


def write_corpus(
    model: SimModel,
    out: str | os.PathLike,
    n_cells: int,
    tissues=TISSUES[:-1],
    seed: int = 0,
    chunk_cells: int = 2048,
    shard_size: int = 16384,
    val_fraction: float = 0.02,
) -> Path:
    """Stream ``n_cells`` simulated cells of ``tissues`` into a corpus at ``out`` (built in a temporary directory and
    renamed; memory bounded by one chunk and one shard); obs: dataset (= batch), cell_type, tissue, batch."""
    out = Path(out)
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}")
    vocab = GeneVocab.from_genes(model.genes)
    ids = np.array([vocab[g] for g in model.genes], dtype=np.int32)
    rng = np.random.default_rng(seed)
    with atomic_dir(out, replace=True) as tmp:
        writer = CorpusWriter(
            tmp,
            vocab,
            ["dataset", *OBS_COLUMNS],
            shard_size=shard_size,
            creation={"simulation": {**asdict(model.params), "tissues": list(tissues), "seed": seed}},
        )
        done, per_batch = 0, {}
        while done < n_cells:
            m = min(chunk_cells, n_cells - done)
            x, obs = sample_cells(model, rng, m, list(tissues))
            x.eliminate_zeros()
            keep = np.diff(x.indptr) > 0  # a cell with no counts is not a cell
            x, obs = x[keep], obs[keep]
            labels = {"dataset": obs["batch"].to_numpy(), **{c: obs[c].to_numpy() for c in OBS_COLUMNS}}
            writer.add_cells(x.indptr, ids[x.indices], x.data, labels)
            for b, k in obs["batch"].value_counts().items():
                per_batch[b] = per_batch.get(b, 0) + int(k)
            done += m
        writer.datasets = [{"name": b, "source": "data_modules.simulate", "n_cells": k} for b, k in per_batch.items()]
        writer.finish({"strategy": "cell", "seed": seed, "val_fraction": val_fraction})
    return out


def marginal_stats(x) -> dict[str, float]:
    """Genes per cell, counts per cell (median, 5th / 95th percentile), the fraction of zeros, and the slope of
    log variance on log mean over genes (mean-variance) of a (cells, genes) count matrix."""
    x = sp.csr_matrix(x, dtype=np.float64)
    genes = np.diff(x.indptr)
    counts = np.asarray(x.sum(axis=1)).ravel()
    mean = np.asarray(x.mean(axis=0)).ravel()
    var = np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2
    ok = (mean > 0) & (var > 0)
    slope = float(np.polyfit(np.log(mean[ok]), np.log(var[ok]), 1)[0])
    return {
        "genes_per_cell_median": float(np.median(genes)),
        "genes_per_cell_p5": float(np.percentile(genes, 5)),
        "genes_per_cell_p95": float(np.percentile(genes, 95)),
        "counts_per_cell_median": float(np.median(counts)),
        "counts_per_cell_p5": float(np.percentile(counts, 5)),
        "counts_per_cell_p95": float(np.percentile(counts, 95)),
        "zero_fraction": float(1.0 - x.nnz / (x.shape[0] * x.shape[1])),
        "mean_variance_slope": slope,
        "var_over_mean_median": float(np.median(var[ok] / mean[ok])),
    }


def compare_with_real(
    params: SimParams = SimParams(), n_cells: int = 2000, cache_dir: str | os.PathLike | None = None
) -> dict[str, dict[str, float]]:
    """{"real": :func:`marginal_stats` of the real cells on the panel, "simulated": of ``n_cells`` simulated cells
    of every tissue}."""
    fit = fit_counts(params, cache_dir)
    model = fit_model(params, cache_dir)
    n_genes = len(fit["genes"])
    x_real = sp.csr_matrix(
        (fit["real_data"], fit["real_indices"], fit["real_indptr"]), shape=(len(fit["real_indptr"]) - 1, n_genes)
    )
    x_sim, _ = sample_cells(model, np.random.default_rng(params.seed), n_cells, TISSUES)
    return {"real": marginal_stats(x_real), "simulated": marginal_stats(x_sim)}


STAT_ROWS = (
    ("genes per cell, median (5th-95th pct.)", "genes_per_cell"),
    ("counts per cell, median (5th-95th pct.)", "counts_per_cell"),
    ("fraction of zeros", "zero_fraction"),
    ("mean-variance: slope of log var on log mean over genes", "mean_variance_slope"),
    ("variance / mean, median over genes", "var_over_mean_median"),
)


def stats_table(stats: dict[str, dict[str, float]]) -> str:
    """The markdown table of :func:`compare_with_real` (docs/simulation.md)."""
    lines = ["| statistic | real cells | simulated cells |", "|---|---|---|"]
    for title, key in STAT_ROWS:
        cells = []
        for side in ("real", "simulated"):
            s = stats[side]
            if key in s:
                cells.append(f"{s[key]:.2f}")
            else:
                cells.append(f"{s[key + '_median']:,.0f} ({s[key + '_p5']:,.0f}-{s[key + '_p95']:,.0f})")
        lines.append(f"| {title} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """``python -m data_modules.simulate stats`` (or ``main(["stats"])``): the marginal statistics of simulated vs
    real cells, as a markdown table (docs/simulation.md)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m data_modules.simulate", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["stats"])
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--cache-dir", default=os.environ.get("SCGPT_CACHE", ".cache"))
    args = parser.parse_args(argv)
    print(stats_table(compare_with_real(SimParams(), args.n_cells, args.cache_dir)))


if __name__ == "__main__":
    main()
