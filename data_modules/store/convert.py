"""Inputs -> corpus: chunked, validated, resumable conversion.

Readers (``sources.py``, ``census.py``) yield row chunks over their own genes; this module runs the
loop that maps genes onto the vocabulary, validates values, drops empty cells and keeps per-dataset
statistics (one chunk at a time: ``chunks.py``) and feeds :class:`CorpusWriter`. A journal
(``journal.py``) makes a killed run resumable; a bad input removes everything the run wrote. ``overwrite``
over an existing corpus (or unfinished conversion) builds the new one in a temporary sibling and swaps it
in only when complete.

Memory bound: one input chunk (``chunk_size`` rows as read, plus ~3 int/float arrays of its
nnz) + the writer's pending cells (< ``shard_size + chunk_size`` cells of ids and counts) +
one shard being assembled. It does not depend on the number of input cells.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from data_modules.atomic import atomic_dir
from data_modules.errors import check_writable
from data_modules.store.chunks import (
    STAT_KEYS,
    GeneReport,
    check_values,
    chunk_stats,
    map_reader_genes,
    merge_stats,
    prepare_chunk,
)
from data_modules.store.format import (
    JOURNAL_DIR,
    MANIFEST_NAME,
    SHARD_DIR,
    VERIFIED_CACHE,
    VOCAB_NAME,
    CorpusFormatError,
    file_sha256,
    index_dtype,
)
from data_modules.store.journal import Journal, fingerprint, remove_unlisted_shards
from data_modules.store.lock import exclusive_lock
from data_modules.store.sources import AnnDataReader, H5adReader
from data_modules.store.writer import CorpusWriter
from data_modules.vocab import GeneVocab

DEFAULT_OBS_COLUMNS = ("cell_type", "tissue", "assay", "disease", "donor_id")


@dataclass
class Source:
    """One input dataset: an AnnData (or h5ad path) and how to read it."""

    name: str
    adata: ad.AnnData | str | os.PathLike
    gene_column: str | None = None  # var column with gene symbols / ids; None = var_names
    use_raw: bool = False  # read .raw (X and var) instead of X
    obs_map: dict[str, str] | None = None  # corpus obs column -> this dataset's obs column
    layer: str | None = None  # read layers[layer] instead of X (e.g. "counts")


def open_reader(src: Source) -> H5adReader | AnnDataReader:
    kw = dict(gene_column=src.gene_column, use_raw=src.use_raw, layer=src.layer, obs_map=src.obs_map)
    if isinstance(src.adata, ad.AnnData):
        return AnnDataReader(src.adata, src.name, **kw)
    return H5adReader(src.adata, src.name, **kw)


def _open(src: Source):
    return open_reader(src)


def gene_union(sources: Sequence[Source]) -> list[str]:
    genes: set[str] = set()
    for src in sources:
        r = open_reader(src)
        genes.update(r.genes)
        r.close()
    return sorted(genes)


def sources_from_paths(paths: Sequence[str | os.PathLike], **kw) -> list[Source]:
    """One Source per h5ad path, named by file stem (made unique)."""
    sources, seen = [], {}
    for p in paths:
        stem = Path(p).name.removesuffix(".h5ad")
        seen[stem] = seen.get(stem, 0) + 1
        name = stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"
        sources.append(Source(name=name, adata=str(p), **kw))
    return sources


# ---------------------------------------------------------------------------------------
# the conversion loop


# what a corpus directory holds: its files, the journal, and the shard-checksum cache a training run keeps there
# (store/integrity.py's VERIFIED_CACHE); --overwrite replaces the directory only when it holds nothing else
CORPUS_ENTRIES = (MANIFEST_NAME, VOCAB_NAME, SHARD_DIR, JOURNAL_DIR, VERIFIED_CACHE)


def _clear_corpus_files(out: Path) -> None:
    for name in (MANIFEST_NAME, VOCAB_NAME):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / SHARD_DIR, ignore_errors=True)
    shutil.rmtree(out / JOURNAL_DIR, ignore_errors=True)


def check_out_dir(out: str | os.PathLike) -> None:
    """Raise unless ``out`` is a directory or can become one (it, or a folder above it, is not a regular file)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CorpusFormatError(
            f"--out {out} is an existing file, not a directory; --out names the corpus directory to create "
            "(or resume): choose another path, or move the file away"
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CorpusFormatError(
                    f"--out {out}: {parent} is a file, so no directory can be created below it; choose another --out"
                )
            break
    check_writable(out, "--out")  # a read-only or someone else's parent: named, not a bare PermissionError later


def check_build_options(shard_size: int, chunk_size: int, min_genes: int, split: dict | None) -> None:
    """Refuse option values no build can use, before anything is read or written (names the option)."""
    for option, value, least in (("--shard-size", shard_size, 1), ("--chunk-size", chunk_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise CorpusFormatError(f"{option} {value}: must be a whole number >= {least} (cells)")
    if isinstance(min_genes, bool) or not isinstance(min_genes, (int, np.integer)) or min_genes < 0:
        raise CorpusFormatError(f"--min-genes {min_genes}: must be a whole number >= 0")
    if split and split.get("strategy") == "cell":
        frac = split.get("val_fraction", 0.003)
        if not isinstance(frac, (int, float)) or not 0.0 <= float(frac) < 1.0:
            raise CorpusFormatError(f"--val-fraction {frac}: must be in [0, 1) (0 for no validation cells)")


def check_inputs(readers: list, allow_duplicate_cells: bool, log: Callable[[str], None]) -> None:
    """Refuse an input with no cells and the same input given twice (naming the file); warn about duplicate cell
    names inside an input (count, examples) unless ``allow_duplicate_cells``. Names repeated *across* inputs are
    not reported: barcodes such as ``AAACCTGAGAAGGCCT-1`` recur in every 10x sample."""
    seen: dict[object, str] = {}
    for r in readers:
        where = str(getattr(r, "path", r.name))
        if r.n_rows == 0:
            raise CorpusFormatError(f"{where}: holds 0 cells; remove it from the inputs")
        path = getattr(r, "path", None)
        adata = getattr(r, "adata", None)
        if adata is not None:
            key: object = ("anndata", id(adata))
        elif path is not None and Path(path).exists():
            st = Path(path).stat()
            key = ("file", st.st_dev, st.st_ino)
        else:
            continue
        if key in seen:
            raise CorpusFormatError(
                f"{where}: this input is given twice (also as {seen[key]}); every cell would be stored twice. "
                "Give each input once"
            )
        seen[key] = where
    if allow_duplicate_cells:
        return
    for r in readers:
        if not hasattr(r, "cell_names"):
            continue
        # 8 bytes a cell (a 64-bit hash of each name, read a million names at a time), not the names themselves
        step = 1 << 20
        hashes = np.concatenate(
            [pd.util.hash_array(r.cell_names(lo, min(lo + step, r.n_rows))) for lo in range(0, r.n_rows, step)]
        )
        repeated = np.flatnonzero(pd.Series(hashes).duplicated().to_numpy())
        if len(repeated):
            examples = list(dict.fromkeys(str(r.cell_names(int(i), int(i) + 1)[0]) for i in repeated[:20]))[:3]
            log(
                f"warning: {getattr(r, 'path', r.name)}: {len(repeated):,} cells have a name another cell of the file "
                f"already has (e.g. {examples}); the file may hold some cells twice. Converting anyway; pass "
                "--allow-duplicate-cells (allow_duplicate_cells=True) to silence this"
            )


def _replaces_existing(out: Path, overwrite: bool) -> bool:
    """True when ``overwrite`` must replace corpus content already in ``out`` (a finished corpus or an unfinished
    conversion). That replacement is built in a temporary sibling and swapped in at the end, so ``out`` must hold
    nothing but corpus files: anything else would be lost with it."""
    if not overwrite or not out.is_dir():
        return False
    names = {p.name for p in out.iterdir()}
    if not names & set(CORPUS_ENTRIES):
        return False  # nothing to replace: build in place
    foreign = sorted(names - set(CORPUS_ENTRIES))
    if foreign:
        raise CorpusFormatError(
            f"{out} holds a corpus and also files that are not part of it ({foreign[:5]}"
            f"{' ...' if len(foreign) > 5 else ''}); --overwrite replaces the whole directory, so move those "
            "files elsewhere first, or choose another --out"
        )
    return True


def _leftover_siblings(out: Path) -> list[Path]:
    """Temporary siblings of ``out`` (``atomic_dir``'s ``.<name>.*.tmp``) that a killed --overwrite run left."""
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.glob(f".{out.name}.*.tmp") if p.is_dir() and (p / JOURNAL_DIR).exists())


def _check_existing(out: Path, fp: str) -> dict | None:
    """The manifest of a corpus already built in ``out`` with the same arguments; raises for other arguments."""
    import json

    manifest_path = out / MANIFEST_NAME
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("creation", {}).get("fingerprint") == fp:
        return manifest
    raise CorpusFormatError(
        f"{out} already holds a corpus built with other arguments; choose another --out or pass "
        "--overwrite (overwrite=True) to replace it (it is kept until the new corpus is complete)"
    )


def _swap_in(out: Path, build: Callable[[Path], dict], log: Callable[[str], None]) -> dict:
    """``build`` a new corpus in a temporary sibling of ``out``; only once it is complete, move the old ``out``
    aside, rename the sibling to ``out`` and delete the old one. On any failure the sibling is removed and
    ``out`` is left as it was."""
    with atomic_dir(out, replace=True) as tmp:
        os.chmod(tmp, out.stat().st_mode & 0o7777)  # the replacement keeps the old directory's permissions
        log(f"{out}: building the replacement in {tmp}; {out} stays as it is until the new corpus is complete")
        return build(tmp)


@dataclass
class BuildOptions:
    """The options every corpus build takes, whatever its input (``convert_sources``, ``convert_census``)."""

    shard_size: int = 16384
    chunk_size: int = 2048
    min_genes: int = 1
    split: dict | None = None
    on_duplicate: str = "error"
    overwrite: bool = False
    resume: bool = True
    log: Callable[[str], None] | None = None


def run_conversion(
    readers: list,
    out: str | os.PathLike,
    vocab: GeneVocab,
    obs_columns: Sequence[str],
    params: dict,
    build: BuildOptions,
    *,
    allow_float: bool = False,
    gene_table: Mapping[str, str] | None = None,
    extra_manifest: dict | None = None,
    allow_duplicate_cells: bool = False,
) -> dict:
    """Convert ``readers`` into a corpus at ``out`` (see module docstring); returns the manifest.

    Without ``overwrite`` an unfinished conversion in ``out`` (same arguments) resumes in place. With
    ``overwrite`` over existing corpus content, the new corpus is built in a temporary sibling directory and
    swapped in only when complete: a failed build leaves ``out`` as it was.
    """
    out = Path(out)
    shard_size, chunk_size, min_genes, split = build.shard_size, build.chunk_size, build.min_genes, build.split
    on_duplicate, overwrite, resume = build.on_duplicate, build.overwrite, build.resume
    log = build.log or (lambda msg: None)
    obs_columns = [c for c in obs_columns if c != "dataset"]
    params = {
        **params,
        "vocab_sha256": _vocab_digest(vocab),
        "obs_columns": obs_columns,
        "shard_size": shard_size,
        "allow_float": allow_float,
        "min_genes": min_genes,
        "split": split,
        "on_duplicate": on_duplicate,
    }
    fp = fingerprint(params)
    try:
        check_build_options(shard_size, chunk_size, min_genes, split)
        check_out_dir(out)
        check_inputs(readers, allow_duplicate_cells, log)
        with exclusive_lock(out, "--out", log):
            options = dict(
                shard_size=shard_size,
                chunk_size=chunk_size,
                allow_float=allow_float,
                min_genes=min_genes,
                split=split,
                resume=resume,
                log=log,
                extra_manifest=extra_manifest,
            )
            manifest = _locked_conversion(
                readers, out, vocab, obs_columns, params, fp, gene_table, on_duplicate, overwrite, split, log, options
            )
    finally:
        for r in readers:
            r.close()
    log(f"{out}: {manifest['n_cells']} cells in {len(manifest['shards'])} shards")
    return manifest


def _locked_conversion(
    readers, out, vocab, obs_columns, params, fp, gene_table, on_duplicate, overwrite, split, log, options
) -> dict:
    """run_conversion's work while it holds the lock of ``out``: resume, reuse, build in place or swap in."""
    replace = _replaces_existing(out, overwrite)
    if not replace:
        done = _check_existing(out, fp) if not overwrite else None
        if done is not None:
            log(f"{out}: already complete (same arguments), nothing to do")
            return done
    luts, reports = [], []
    for r in readers:
        lut, rep = map_reader_genes(r, vocab, gene_table, on_duplicate)
        luts.append(lut)
        reports.append(rep)
    _check_split_request(split, readers)

    def build(target: Path, created_dir: bool) -> dict:
        return _convert_into(
            readers, target, vocab, obs_columns, params, fp, luts, reports, created_dir=created_dir, **options
        )

    if replace:
        for p in _leftover_siblings(out):
            log(f"note: {p} is left over from an interrupted --overwrite run of {out}; delete it to free its space")
        return _swap_in(out, lambda tmp: build(tmp, False), log)
    return build(out, not out.exists())


def _convert_into(
    readers: list,
    out: Path,
    vocab: GeneVocab,
    obs_columns: list[str],
    params: dict,
    fp: str,
    luts: list[np.ndarray],
    reports: list[GeneReport],
    *,
    shard_size: int,
    chunk_size: int,
    allow_float: bool,
    min_genes: int,
    split: dict | None,
    resume: bool,
    log: Callable[[str], None],
    extra_manifest: dict | None,
    created_dir: bool,
) -> dict:
    """The conversion loop, writing into ``out`` and resuming its journal; a bad input removes what it wrote."""
    journal = Journal(out)
    if not resume:
        journal.clear()
    state = journal.load(fp, params)
    writer = CorpusWriter(
        out,
        vocab,
        ["dataset", *obs_columns],
        shard_size=shard_size,
        allow_float=allow_float,
        creation={"fingerprint": fp, "params": params, "chunk_size": chunk_size},
    )
    stats: dict[str, dict] = {}
    position = [0, 0]
    id_dtype = index_dtype(len(vocab))
    if state is not None:
        writer.restore(state["writer"], journal.pending_path(state))
        stats, position = state["stats"], state["position"]
        log(f"{out}: resuming at input {position[0]} row {position[1]} ({len(writer.shards)} shards done)")
    remove_unlisted_shards(out, writer.shards)
    journal.start(fp, params)
    try:
        for ri in range(position[0], len(readers)):
            reader = readers[ri]
            start = position[1] if ri == position[0] else 0
            for lo in range(start, reader.n_rows, chunk_size):
                hi = min(lo + chunk_size, reader.n_rows)
                raw = reader.read_chunk(lo, hi, obs_columns)
                check_values(raw, reader, allow_float)
                cells = prepare_chunk(raw, luts[ri], min_genes)
                ds_codes = writer.codes("dataset", raw.dataset)
                labels = list(writer.categories["dataset"])
                merge_stats(stats, labels, chunk_stats(cells, ds_codes, len(labels)))
                obs = {"dataset": ds_codes[cells.keep]}
                for c in obs_columns:
                    obs[c] = writer.codes(c, raw.obs[c][cells.keep])
                flushed = writer.add_cells(
                    cells.indptr,
                    cells.gene_ids.astype(id_dtype),
                    cells.counts,
                    obs,
                    source_row=raw.source_row[cells.keep],
                    coded=True,
                )
                if flushed:
                    journal.save(fp, params, [ri, hi], writer, stats)
                    _pause_for_crash_tests()
                    log(
                        f"{len(writer.shards)} shards, {writer.n_cells_written} cells written "
                        f"(input {ri + 1}/{len(readers)}, row {hi}/{reader.n_rows})"
                    )
        writer.datasets = _dataset_entries(readers, reports, stats, obs_columns)
        manifest = writer.finish(
            split,
            extra={
                "sources": [_source_entry(r, rep) for r, rep in zip(readers, reports, strict=True)],
                **(extra_manifest or {}),
            },
        )
    except CorpusFormatError:
        _clear_corpus_files(out)  # a bad input leaves nothing partial behind
        if created_dir and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    journal.clear()
    return manifest


def _pause_for_crash_tests() -> None:
    """Sleep ``$SCGPT_CORPUS_PAUSE_S`` seconds after each journal save (lets tests kill -9 a run mid-way)."""
    delay = float(os.environ.get("SCGPT_CORPUS_PAUSE_S", "0") or 0)
    if delay > 0:
        import time

        time.sleep(delay)


def _vocab_digest(vocab: GeneVocab) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(vocab.token_to_id, sort_keys=True).encode()).hexdigest()


def _table_digest(table: Mapping[str, str] | None) -> str | None:
    import hashlib
    import json

    return None if table is None else hashlib.sha256(json.dumps(sorted(table.items())).encode()).hexdigest()


def _check_split_request(split: dict | None, readers: list) -> None:
    if not split or split.get("strategy") != "dataset":
        return
    known = set()
    for r in readers:
        known.update(getattr(r, "dataset_names", [r.name]))
    missing = [d for d in split.get("val_datasets", []) if d not in known]
    if missing or not split.get("val_datasets"):
        raise CorpusFormatError(
            f"--val-datasets {missing or '(none)'} name no input dataset; choose from {sorted(known)[:20]}"
        )


def _source_entry(reader, rep: GeneReport) -> dict:
    return {
        "name": reader.name,
        "source": reader.source,
        "gene_source": getattr(reader, "gene_source", None),
        "n_rows": reader.n_rows,
        **rep.as_dict(),
    }


def _dataset_entries(readers: list, reports: list[GeneReport], stats: dict, obs_columns: list[str]) -> list[dict]:
    """One entry per dataset label: counts, losses to unknown genes, and the gene report of its input."""
    entries = []
    for r, rep in zip(readers, reports, strict=True):
        for name in getattr(r, "dataset_names", [r.name]):
            s = stats.get(name, {k: 0 for k in STAT_KEYS})
            total = s["counts_total"]
            entries.append(
                {
                    "name": name,
                    "source": r.source,
                    **{k: s[k] for k in STAT_KEYS},
                    "fraction_counts_lost": (s["counts_lost_unknown_genes"] / total) if total else 0.0,
                    "n_cells_dropped_empty": s["n_cells_dropped"],
                    "obs_missing": [c for c in obs_columns if not r.has_obs(c)],
                    **rep.as_dict(),
                }
            )
    return entries


def convert_sources(
    sources: Sequence[Source],
    out: str | os.PathLike,
    vocab: GeneVocab | None = None,
    obs_columns: Sequence[str] = (),
    shard_size: int = 16384,
    chunk_size: int = 2048,
    allow_float: bool = False,
    min_genes: int = 1,
    split: dict | None = None,
    *,
    gene_table: Mapping[str, str] | None = None,
    overwrite: bool = False,
    resume: bool = True,
    require_obs: bool = True,
    on_duplicate: str = "error",
    log: Callable[[str], None] | None = None,
    allow_duplicate_cells: bool = False,
) -> dict:
    """Convert AnnData sources (objects or .h5ad paths) into a corpus at ``out``; returns the manifest.

    ``vocab=None`` builds the vocabulary from the union of the inputs' genes. ``require_obs``
    raises when a requested obs column exists in no input (a likely typo). ``allow_duplicate_cells`` silences
    the warning about cell names repeated inside an input.
    """
    check_build_options(shard_size, chunk_size, min_genes, split)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise CorpusFormatError(f"source names must be unique, got {names}")
    readers = [open_reader(s) for s in sources]
    for s, r in zip(
        sources, readers, strict=True
    ):  # the corpus' dataset column names the input: a file's own one is not kept
        if "dataset" in r.obs_columns and "dataset" not in r.obs_map.values():
            (log or print_log)(
                f"note: {getattr(r, 'path', s.name)}: its own obs column 'dataset' is not kept: the corpus' dataset "
                f"column holds the input's name ({s.name!r}); keep the file's column under another name with "
                "--obs-columns NAME=dataset"
            )
    if vocab is None:
        vocab = GeneVocab.from_genes(sorted({g for r in readers for g in r.genes}))
    if require_obs:
        for c in obs_columns:
            if c != "dataset" and not any(r.has_obs(c) for r in readers):
                raise CorpusFormatError(
                    f"obs column {c!r} exists in none of the inputs (e.g. {readers[0].path} has "
                    f"{readers[0].obs_columns[:15]}); fix --obs-columns or map it with NAME=SOURCE_COLUMN"
                )
    params = {
        "kind": "anndata",
        "sources": [
            {
                "name": s.name,
                "gene_column": s.gene_column,
                "use_raw": s.use_raw,
                "layer": s.layer,
                "obs_map": s.obs_map,
                **r.fingerprint(),
            }
            for s, r in zip(sources, readers, strict=True)
        ],
        "gene_table": _table_digest(gene_table),
    }
    build = BuildOptions(shard_size, chunk_size, min_genes, split, on_duplicate, overwrite, resume, log)
    return run_conversion(
        readers, out, vocab, list(obs_columns), params, build,
        allow_float=allow_float, gene_table=gene_table, allow_duplicate_cells=allow_duplicate_cells,
    )  # fmt: skip


def print_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


__all__ = [
    "Source",
    "convert_sources",
    "run_conversion",
    "BuildOptions",
    "gene_union",
    "sources_from_paths",
    "map_reader_genes",
    "DEFAULT_OBS_COLUMNS",
    "check_out_dir",
    "check_build_options",
    "file_sha256",
]
