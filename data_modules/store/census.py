"""CELLxGENE Census -> corpus, with the paper's query, in resumable row partitions.

The query keeps ``organism`` cells whose obs pass ``value_filter`` (default: the scGPT
paper's ``disease == 'normal' and suspension_type != 'na'``). Their ``soma_joinid``s are
sorted and cut into partitions of ``chunk_size`` cells; each partition reads its obs rows
and its ``X/raw`` rows by coordinates. The corpus "dataset" column is the Census
``dataset_id``; ``source_row`` is the ``soma_joinid``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from data_modules.store.format import CorpusFormatError
from data_modules.store.sources import RawChunk, _labels
from data_modules.vocab import GeneVocab

PAPER_CENSUS_VERSION = "2023-05-08"
PAPER_FILTER = "disease == 'normal' and suspension_type != 'na'"
CENSUS_OBS_COLUMNS = ("cell_type", "tissue", "assay", "disease", "donor_id")


def open_census(census_version: str | None = PAPER_CENSUS_VERSION, uri: str | os.PathLike | None = None):
    """The Census root collection: a local/remote SOMA ``uri`` if given, else the released version."""
    if uri is not None:
        import tiledbsoma

        try:
            return tiledbsoma.open(str(uri))
        except Exception as e:
            raise CorpusFormatError(
                f"{uri}: cannot open it as a SOMA collection ({type(e).__name__}: {e}); "
                "pass the directory that holds census_data/"
            ) from None
    import cellxgene_census

    return cellxgene_census.open_soma(census_version=census_version)


class CensusReader:
    """Row partitions of the cells of one Census organism that pass ``value_filter``."""

    def __init__(
        self,
        census,
        organism: str = "homo_sapiens",
        value_filter: str = PAPER_FILTER,
        gene_column: str = "feature_name",
        dataset_column: str = "dataset_id",
        label: str = "census",
    ):
        self.census = census
        self.name = label
        self.source = label
        self.path = Path(label)
        self.organism, self.value_filter, self.dataset_column = organism, value_filter, dataset_column
        try:
            self.exp = census["census_data"][organism]
        except KeyError:
            raise CorpusFormatError(f"{label}: has no census_data/{organism}; check --organism") from None
        var = self.exp.ms["RNA"].var.read().concat().to_pandas()
        if gene_column not in var.columns:
            raise CorpusFormatError(
                f"{label}: ms/RNA/var has no column {gene_column!r} (columns: {list(var.columns)}); "
                "use --gene-column feature_name (symbols) or feature_id (Ensembl ids)"
            )
        n_var = int(var["soma_joinid"].max()) + 1
        genes = np.full(n_var, "", dtype=object)
        genes[var["soma_joinid"].to_numpy()] = var[gene_column].astype(str).to_numpy()
        self.genes = [str(g) for g in genes]
        self.gene_source = f"ms/RNA/var[{gene_column!r}]"
        self.var_table = (
            dict(zip(var["feature_id"].astype(str), var["feature_name"].astype(str), strict=True))
            if {"feature_id", "feature_name"} <= set(var.columns)
            else None
        )
        self.obs_columns = [f.name for f in self.exp.obs.schema]
        if dataset_column not in self.obs_columns:
            raise CorpusFormatError(f"{label}: obs has no column {dataset_column!r}")
        try:
            table = self.exp.obs.read(value_filter=value_filter, column_names=["soma_joinid", dataset_column]).concat()
        except Exception as e:
            raise CorpusFormatError(
                f"{label}: the obs filter {value_filter!r} failed ({e}); obs columns are {self.obs_columns}"
            ) from None
        order = np.argsort(table["soma_joinid"].to_numpy())
        self.joinids = table["soma_joinid"].to_numpy()[order]  # (n_rows,) sorted
        self.dataset_names = sorted(str(x) for x in set(_labels(table[dataset_column].to_numpy(zero_copy_only=False))))
        self.n_rows = len(self.joinids)
        if self.n_rows == 0:
            raise CorpusFormatError(f"{label}: no cell of {organism} passes the filter {value_filter!r}")

    def has_obs(self, column: str) -> bool:
        return column in self.obs_columns

    def fingerprint(self) -> dict:
        return {
            "census": self.source,
            "organism": self.organism,
            "value_filter": self.value_filter,
            "n_rows": self.n_rows,
            "first_last": [int(self.joinids[0]), int(self.joinids[-1])],
        }

    def read_chunk(self, lo: int, hi: int, obs_columns: list[str]) -> RawChunk:
        ids = self.joinids[lo:hi]  # (n,) sorted soma_joinids
        cols = ["soma_joinid", self.dataset_column, *[c for c in obs_columns if self.has_obs(c)]]
        obs = self.exp.obs.read(coords=(ids,), column_names=list(dict.fromkeys(cols))).concat().to_pandas()
        obs = obs.set_index("soma_joinid").loc[ids]
        xt = self.exp.ms["RNA"].X["raw"].read(coords=(ids, slice(None))).tables().concat()
        rows = np.searchsorted(ids, xt["soma_dim_0"].to_numpy())
        X = sp.csr_matrix(
            (xt["soma_data"].to_numpy(), (rows, xt["soma_dim_1"].to_numpy())), shape=(len(ids), len(self.genes))
        )
        X.sort_indices()
        labels = {
            c: _labels(obs[c].to_numpy()) if c in obs.columns else np.full(len(ids), "unknown") for c in obs_columns
        }
        return RawChunk(
            X=X,
            obs=labels,
            dataset=_labels(obs[self.dataset_column].to_numpy()),
            source_row=ids.astype(np.int64),
            cell_names=ids.astype(str),
        )

    def close(self) -> None:
        try:
            self.census.close()
        except Exception:
            pass


def convert_census(
    out: str | os.PathLike,
    census_version: str = PAPER_CENSUS_VERSION,
    uri: str | None = None,
    organism: str = "homo_sapiens",
    value_filter: str = PAPER_FILTER,
    vocab: GeneVocab | None = None,
    gene_column: str = "feature_name",
    obs_columns: Sequence[str] = CENSUS_OBS_COLUMNS,
    shard_size: int = 16384,
    chunk_size: int = 2048,
    min_genes: int = 1,
    split: dict | None = None,
    on_duplicate: str = "first",
    overwrite: bool = False,
    resume: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Build a corpus from the Census query (see module docstring); resumable like the h5ad path."""
    from data_modules.store.convert import BuildOptions, run_conversion

    label = f"census:{uri}" if uri is not None else f"census:{census_version}"
    reader = CensusReader(open_census(census_version, uri), organism, value_filter, gene_column, label=label)
    if vocab is None:
        vocab = GeneVocab.from_genes([g for g in reader.genes if g])
    gene_table = None
    if gene_column == "feature_id" and vocab.keyed_by == "symbol":
        gene_table = reader.var_table  # map by Ensembl id onto a symbol vocab through the Census var
    missing = [c for c in obs_columns if not reader.has_obs(c)]
    if missing:
        raise CorpusFormatError(f"{label}: obs has no columns {missing} (it has {reader.obs_columns})")
    params = {
        "kind": "census",
        "census_version": None if uri else census_version,
        "uri": str(uri) if uri else None,
        "gene_column": gene_column,
        **reader.fingerprint(),
    }
    build = BuildOptions(shard_size, chunk_size, min_genes, split, on_duplicate, overwrite, resume, log)
    return run_conversion(
        [reader],
        out,
        vocab,
        list(obs_columns),
        params,
        build,
        gene_table=gene_table,
        extra_manifest={
            "census": {
                "version": census_version if uri is None else None,
                "uri": str(uri) if uri else None,
                "organism": organism,
                "value_filter": value_filter,
            }
        },
    )
