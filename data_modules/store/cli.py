"""Command lines behind ``scripts/build_corpus.py`` and ``scripts/corpus.py`` (the scripts only call ``main``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_modules.atomic import DiskFullError, atomic_path, is_disk_full
from data_modules.errors import UserInputError
from data_modules.store.census import CENSUS_OBS_COLUMNS, PAPER_CENSUS_VERSION, PAPER_FILTER, convert_census
from data_modules.store.checksums import set_checksums
from data_modules.store.convert import (
    DEFAULT_OBS_COLUMNS,
    Source,
    check_build_options,
    check_out_dir,
    convert_sources,
    open_reader,
    print_log,
    sources_from_paths,
)
from data_modules.store.format import CorpusFormatError
from data_modules.store.inspect import (
    corpus_info,
    parse_cell_range,
    to_anndata,
    unfinished_conversion,
    verify_corpus,
)
from data_modules.store.reader import Corpus
from data_modules.vocab import (
    GeneIdReport,
    GeneVocab,
    guess_gene_key,
    load_gene_table,
    resolve_gene_names,
    table_name,
    truncated_names,
)

EXIT_BAD_INPUT = 2
EXIT_VERIFY_FAILED = 1


# ---------------------------------------------------------------------------------------
# gene identifiers: every input brought to one key (symbols or Ensembl ids) before conversion


def resolve_input_genes(
    sources: list[Source],
    vocab: GeneVocab | None,
    table: dict[str, str] | None = None,
    table_label: str | None = None,
    log=print_log,
    prefer_column: bool = False,
    species: str | None = None,
) -> tuple[GeneVocab | None, dict[str, str] | None, list[dict]]:
    """Detect per input whether its genes are Ensembl ids or symbols and bring all to one key: the vocabulary's
    (``--vocab``), else symbols when any input uses them. An input in the other key is mapped through a var column
    of the right kind (gene_symbols, gene_names, feature_name / gene_ids, feature_id) or the id table (``--gene-table``,
    default the GENCODE v44 table shipped with celltypist); one whose genes cannot be mapped is refused, so two
    inputs that would never match are never joined. Returns (vocabulary: ``vocab``, or without one the union of the
    mapped names; the ``{input name: vocabulary token}`` table for the converter, None when no name changes and no
    table was given; one :class:`GeneIdReport` dict per input, ``source`` / ``name`` added)."""
    readers = [open_reader(s) for s in sources]
    try:
        keys = [guess_gene_key(r.genes) for r in readers]
        target = vocab.keyed_by if vocab is not None else ("symbol" if "symbol" in keys else keys[0])
        resolved, reports = [], []
        for src, reader in zip(sources, readers, strict=True):
            where = str(getattr(reader, "path", src.name))
            names, rep = resolve_gene_names(
                reader.var,
                target,
                src.gene_column,
                table=table,
                table_label=table_label,
                vocab=vocab,
                where=where,
                prefer_column=prefer_column,
                species=species,  # --species; other species than the vocabulary's map through orthologs
            )
            if rep.input_key != target and guess_gene_key(names) != target:
                kinds = {"ensembl": "Ensembl ids", "symbol": "gene symbols"}
                none_known = vocab is not None and not any(g in vocab for g in names)
                raise CorpusFormatError(
                    f"{where}: "
                    + (
                        f"none of its {len(names)} genes (e.g. {reader.genes[:3]}) is in the vocabulary (e.g. "
                        f"{vocab.genes[:3]}): "
                        if none_known
                        else ""
                    )
                    + f"its genes are {kinds[rep.input_key]} ({rep.source}) but "
                    + f"{'the vocabulary uses' if vocab is not None else 'the other inputs use'} {kinds[target]}, and "
                    f"{rep.method} maps only {rep.n_translated} of {rep.n_genes} (unknown to it: e.g. "
                    f"{rep.untranslated_examples[:3]}), so they would never match. Pass --gene-column with a var "
                    f"column holding {kinds[target]} (columns: {list(reader.var.columns)[:10]}), or --gene-table with "
                    "an id -> symbol table that covers these genes, or convert the inputs separately"
                )
            resolved.append(names)
            reports.append({"name": src.name, "path": where, **rep.as_dict()})
            notable = rep.method != "as stored" or rep.n_duplicates or rep.n_version_stripped or len(set(keys)) > 1
            notable = notable or (rep.species is not None and rep.species["species"] != rep.species["target"])
            if notable:
                log(f"{src.name}: {rep.summary()}")
            if vocab is not None:
                unknown = [g for g in names if g not in vocab]
                truncated = truncated_names(unknown, names, vocab)
                if truncated:
                    log(
                        f"note: {src.name}: {len(truncated)} gene names unknown to the vocabulary look truncated "
                        f"(e.g. {', '.join(truncated[:3])}): re-export the file with full gene names"
                    )
        changed = any(
            n != g for names, r in zip(resolved, readers, strict=True) for n, g in zip(names, r.genes, strict=True)
        )
        if not changed and table is None:
            return vocab, None, reports
        mapping: dict[str, str] = {}
        for names, reader in zip(resolved, readers, strict=True):
            for name, raw in zip(names, reader.genes, strict=True):
                if mapping.setdefault(raw, name) != name:
                    raise CorpusFormatError(
                        f"{getattr(reader, 'path', reader.name)}: gene {raw!r} maps to {name!r} here and to "
                        f"{mapping[raw]!r} in another input (their var columns disagree); convert the inputs "
                        "separately or pass --gene-table so one table maps all of them"
                    )
        if vocab is None:
            vocab = GeneVocab.from_genes(sorted(set(mapping.values())))
        return vocab, mapping, reports
    finally:
        for r in readers:
            r.close()


def gene_id_table(reports: list[dict]):
    """Rich table: per input, the key of its gene names and how they were brought to the vocabulary's."""
    from rich.table import Table

    t = Table(title="gene identifiers")
    for col in ("dataset", "genes read from", "key", "mapped to", "through", "mapped", "unknown to it", "duplicates"):
        t.add_column(col, overflow="fold")
    for r in reports:
        rep = GeneIdReport(**{k: v for k, v in r.items() if k not in ("name", "path")})
        t.add_row(
            str(r["name"]),
            rep.source,
            rep.input_key,
            rep.target_key,
            rep.method,
            f"{rep.n_translated:,}" if rep.method != "as stored" else "-",
            f"{rep.n_untranslated:,} {rep.untranslated_examples[:2]}" if rep.n_untranslated else "0",
            f"{rep.n_duplicates:,} {rep.duplicate_examples[:2]}" if rep.n_duplicates else "0",
        )
    return t


# ---------------------------------------------------------------------------------------
# build_corpus.py


def _common_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="corpus directory to create (or resume)")
    p.add_argument(
        "--vocab",
        type=Path,
        help="an existing vocabulary: vocab.json (flat {token: index}), an official checkpoint directory or a "
        "checkpoint of this project (.pt / .ckpt); default: the union of the inputs",
    )
    p.add_argument(
        "--min-genes", type=int, default=1, help="drop cells with fewer known genes (default 1: empty cells)"
    )
    p.add_argument("--shard-size", type=int, default=16384, help="cells per shard (default 16384)")
    p.add_argument("--chunk-size", type=int, default=2048, help="input rows read at a time (default 2048)")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--val-fraction", type=float, default=None, help="validation fraction, split by cell (default 0.003)"
    )
    g.add_argument("--val-datasets", nargs="+", help="hold out these whole datasets for validation")
    g.add_argument("--no-split", action="store_true", help="no validation split")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing corpus / unfinished conversion in --out; the new corpus is built in a temporary "
        "sibling directory and replaces the old one only once complete",
    )
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build_corpus.py", description="Build a sharded corpus from h5ad files or the CELLxGENE Census."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("h5ad", help="convert .h5ad files (or folders of them)")
    h.add_argument("inputs", nargs="+", type=Path, help=".h5ad files or folders holding them")
    h.add_argument(
        "--gene-column",
        action="append",
        metavar="[FILE=]COLUMN",
        help="var column with the gene names to match (default: var_names); FILE=COLUMN sets it for one input only "
        "(repeat the option when inputs differ). Per input, Ensembl ids and symbols are told apart; an input in the "
        "other key than the vocabulary's (without --vocab: symbols when any input uses them) is mapped through its "
        "own gene_symbols / gene_names / feature_name (or gene_ids / feature_id) column, else the id table",
    )
    h.add_argument(
        "--gene-table",
        type=Path,
        help="CSV/TSV Ensembl id -> symbol used to map inputs whose ids are not the vocabulary's (default: the "
        "GENCODE v44 table shipped with celltypist)",
    )
    h.add_argument("--gene-table-columns", nargs=2, default=["feature_id", "feature_name"], metavar=("KEY", "TOKEN"))
    h.add_argument(
        "--prefer-gene-column",
        action="store_true",
        help="an input with Ensembl ids and a symbol column that disagree (checked through the id table, a warning "
        "with examples): use the column's symbols (default: the ids decide)",
    )
    h.add_argument("--use-raw", action="store_true", help="read .raw.X / .raw.var instead of X / var")
    h.add_argument(
        "--species",
        help="the inputs' species (human, mouse, rhesus, cynomolgus, pig; default: detected per input from the gene "
        "names); with --vocab of another species, genes map through one-to-one orthologs (docs/corpus_format.md)",
    )
    h.add_argument("--layer", help="read layers[LAYER] (e.g. counts) instead of X")
    h.add_argument(
        "--obs-columns",
        nargs="*",
        default=None,
        help="obs columns to keep as codes, NAME or NAME=SOURCE_COLUMN "
        f"(default: {' '.join(DEFAULT_OBS_COLUMNS)}, 'unknown' where absent)",
    )
    h.add_argument("--allow-normalized", action="store_true", help="accept non-integer values (stored as float32)")
    h.add_argument(
        "--allow-duplicate-cells",
        action="store_true",
        help="do not warn about cell names repeated inside an input (the same file given twice is always refused)",
    )
    h.add_argument(
        "--duplicate-genes",
        choices=["error", "first"],
        default="error",
        help="duplicate gene names: fail (default) or keep the first column",
    )
    _common_build_args(h)
    c = sub.add_parser("census", help="query the CELLxGENE Census (paper's filter by default)")
    c.add_argument("--census-version", default=PAPER_CENSUS_VERSION)
    c.add_argument("--census-uri", help="open this SOMA collection instead of the released Census (tests, mirrors)")
    c.add_argument("--organism", default="homo_sapiens")
    c.add_argument("--value-filter", default=PAPER_FILTER, help=f"obs filter (default: {PAPER_FILTER!r})")
    c.add_argument("--gene-column", default="feature_name", choices=["feature_name", "feature_id"])
    c.add_argument("--obs-columns", nargs="*", default=list(CENSUS_OBS_COLUMNS))
    _common_build_args(c)
    return parser


def _split(args) -> dict:
    if args.no_split:
        return {"strategy": "none"}
    if args.val_datasets:
        return {"strategy": "dataset", "val_datasets": list(args.val_datasets)}
    return {
        "strategy": "cell",
        "seed": args.split_seed,
        "val_fraction": 0.003 if args.val_fraction is None else args.val_fraction,
    }


def _expand_inputs(paths: list[Path]) -> list[Path]:
    files = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.h5ad"))
            if not found:
                raise CorpusFormatError(f"{p}: folder holds no .h5ad file")
            files.extend(found)
        else:
            files.append(p)
    return files


def gene_columns_per_input(paths: list[Path], options: list[str]) -> list[str | None]:
    """The ``--gene-column`` of each input: ``COLUMN`` for all of them, ``FILE=COLUMN`` for the input whose path
    (as given, or its file name) is FILE. A FILE that names no input is refused with the inputs listed."""
    default: str | None = None
    per_file: dict[str, str] = {}
    for option in options:
        file, eq, column = option.rpartition("=")
        if not eq:
            default = column
        elif not column or not file:
            raise CorpusFormatError(f"--gene-column {option}: write COLUMN, or FILE=COLUMN for one input")
        else:
            per_file[file] = column
    names = [{str(p), Path(p).name} for p in paths]
    unmatched = [f for f in per_file if not any(f in n for n in names)]
    if unmatched:
        raise CorpusFormatError(
            f"--gene-column {unmatched[0]}=...: no input is {unmatched[0]!r} (inputs: {[str(p) for p in paths][:10]}); "
            "write FILE as the path given or its file name"
        )
    return [next((per_file[k] for k in sorted(n) if k in per_file), default) for n in names]


def _obs_columns(spec: list[str]) -> tuple[list[str], dict[str, str]]:
    names, mapping = [], {}
    for item in spec:
        name, _, src = item.partition("=")
        names.append(name)
        if src:
            mapping[name] = src
    return names, mapping


def _warnings_only(msg: str) -> None:
    if msg.startswith("warning:"):
        print_log(msg)


def disk_full_message(e: OSError, out: Path, staged: bool = False) -> str:
    path = e.path if isinstance(e, DiskFullError) else (getattr(e, "filename", None) or out)
    kept = (
        f"nothing was kept: the replacement being built was removed and {out} is as it was"
        if staged
        else f"the partly written file was removed; the shards completed so far stay in {out}, and rerunning the "
        f"same command resumes from them (delete {out} to drop them)"
    )
    return f"no space left on device while writing {path}: free space or choose another --out; {kept}"


def build_main(argv: list[str] | None = None) -> int:
    """Run the command line of ``scripts/build_corpus.py`` (``h5ad INPUT... --out DIR`` or ``census --out DIR``).

    Parameters
    ----------
    argv : list of str, optional
        The command (``h5ad`` or ``census``), its inputs and options (``--out``, ``--vocab``, ``--obs-columns``, ...;
        ``--help``); None: ``sys.argv``.

    Returns
    -------
    int
        0, or 2 (``EXIT_BAD_INPUT``) for an input the build refuses or a full disk (the message on stderr names the
        file, gene or key and the fix; a resumable build keeps its finished shards).
    """
    args = build_parser().parse_args(argv)
    log = _warnings_only if args.quiet else print_log
    staged = False
    try:
        check_build_options(args.shard_size, args.chunk_size, args.min_genes, _split(args))  # before any write
        check_out_dir(args.out)  # before opening inputs (or the Census)
        staged = args.overwrite and args.out.is_dir() and any(args.out.iterdir())  # built in a sibling, swapped in
        vocab = GeneVocab.from_checkpoint(args.vocab) if args.vocab else None
        common = dict(
            vocab=vocab,
            shard_size=args.shard_size,
            chunk_size=args.chunk_size,
            min_genes=args.min_genes,
            split=_split(args),
            overwrite=args.overwrite,
            log=log,
        )
        if args.command == "h5ad":
            explicit = args.obs_columns is not None
            names, obs_map = _obs_columns(args.obs_columns if explicit else list(DEFAULT_OBS_COLUMNS))
            table = load_gene_table(args.gene_table, *args.gene_table_columns) if args.gene_table else None
            paths = _expand_inputs(args.inputs)
            columns = gene_columns_per_input(paths, args.gene_column or [])
            sources = sources_from_paths(paths, use_raw=args.use_raw, layer=args.layer, obs_map=obs_map or None)
            for source, column in zip(sources, columns, strict=True):
                source.gene_column = column
            label = table_name(args.gene_table) if args.gene_table else None
            common["vocab"], table, id_reports = resolve_input_genes(
                sources, vocab, table, label, log, prefer_column=args.prefer_gene_column, species=args.species
            )
            manifest = convert_sources(
                sources,
                args.out,
                obs_columns=names,
                allow_float=args.allow_normalized,
                gene_table=table,
                require_obs=explicit,
                on_duplicate=args.duplicate_genes,
                allow_duplicate_cells=args.allow_duplicate_cells,
                **common,
            )
        else:
            manifest = convert_census(
                args.out,
                census_version=args.census_version,
                uri=args.census_uri,
                organism=args.organism,
                value_filter=args.value_filter,
                gene_column=args.gene_column,
                obs_columns=args.obs_columns,
                **common,
            )
    except OSError as e:  # a full disk first: DiskFullError is a UserInputError too, with a generic message
        if not is_disk_full(e):
            if isinstance(e, UserInputError):
                print(f"error: {e}", file=sys.stderr)
                return EXIT_BAD_INPUT
            raise
        print(f"error: {disk_full_message(e, args.out, staged)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except UserInputError as e:  # CorpusFormatError, VocabError, LockHeldError, OutputPathError, ...
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.quiet:
        print_build_report(manifest, args.out)
        if args.command == "h5ad" and any(r["method"] != "as stored" or r["n_duplicates"] for r in id_reports):
            from rich.console import Console

            Console().print(gene_id_table(id_reports))
    return 0


# ---------------------------------------------------------------------------------------
# reports


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _dataset_table(datasets: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in (
        "dataset",
        "cells",
        "dropped (empty/min-genes)",
        "genes known/total",
        "unknown genes (e.g.)",
        "counts lost to unknown genes",
    ):
        t.add_column(col, overflow="fold")
    for d in datasets:
        t.add_row(
            str(d["name"]),
            f"{d['n_cells']:,}",
            f"{d['n_cells_dropped']:,}",
            f"{d['n_genes_known']:,}/{d['n_genes']:,}",
            f"{d['n_genes_unknown']:,} {d['unknown_genes_sample'][:3]}",
            f"{d['counts_lost_unknown_genes']:,.0f} ({100 * d['fraction_counts_lost']:.2f}%)",
        )
    return t


def print_build_report(manifest: dict, out: Path) -> None:
    from rich.console import Console

    console = Console()
    console.print(
        _dataset_table(
            manifest["datasets"], f"corpus {out}: {manifest['n_cells']:,} cells, {len(manifest['shards'])} shards"
        )
    )
    for d in manifest["datasets"]:
        if d.get("obs_missing"):
            console.print(f"note: {d['name']}: obs lacks {d['obs_missing']} (stored as 'unknown')")


def print_info(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"corpus {info['root']}", show_header=False)
    rows = [
        ("format version", info["format_version"]),
        ("cells", f"{info['n_cells']:,}"),
        ("genes (vocab size)", f"{info['n_genes']:,} ({info['vocab_size']:,})"),
        ("non-zeros", f"{info['nnz']:,}"),
        ("mean genes per cell", f"{info['mean_nnz_per_cell']:.1f}"),
        ("shards", info["n_shards"]),
        ("disk size", _human_bytes(info["disk_bytes"])),
        ("values", f"{info['counts']} {info['count_dtypes']}"),
        ("split", json.dumps({k: v for k, v in info["split"].items() if k != "val_dataset_codes"})),
        ("obs columns (categories)", ", ".join(f"{c} ({n})" for c, n in info["obs_columns"].items())),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    console.print(t)
    console.print(_dataset_table(info["datasets"], "datasets"))


# ---------------------------------------------------------------------------------------
# corpus.py


def corpus_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corpus.py", description="Inspect, verify and export a corpus.")
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="cells START:STOP as .h5ad")
    e.add_argument("root", type=Path)
    e.add_argument("--cells", default=":", help="global cell range START:STOP (default: all)")
    e.add_argument("--out", required=True, type=Path)
    e.add_argument(
        "--genes", choices=["all", "present"], default="all", help="var = every vocab gene or only those present"
    )
    v = sub.add_parser("verify", help="check every shard against the manifest (structure + sha256)")
    v.add_argument("root", type=Path)
    v.add_argument("--no-checksums", action="store_true", help="structure and sizes only")
    v.add_argument(
        "--write-checksums",
        action="store_true",
        help="first add per-block checksums to shards written without them (each shard's sha256 is checked "
        "before it is rewritten), then verify",
    )
    i = sub.add_parser("info", help="cells, genes, nnz, per-dataset counts, disk size")
    i.add_argument("root", type=Path)
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def corpus_main(argv: list[str] | None = None) -> int:
    """Run the command line of ``scripts/corpus.py`` (``info``, ``verify`` or ``export`` of a corpus DIR).

    Parameters
    ----------
    argv : list of str, optional
        The command, the corpus directory and its options (``--json``, ``--write-checksums``, ``--cells``, ``--out``,
        ...; ``--help``); None: ``sys.argv``.

    Returns
    -------
    int
        0; 1 (``EXIT_VERIFY_FAILED``) when ``verify`` finds the corpus damaged or unfinished; 2 (``EXIT_BAD_INPUT``)
        for an input refused (the message on stderr names the file and the fix).
    """
    args = corpus_parser().parse_args(argv)
    try:
        if args.command == "verify":
            if args.write_checksums and unfinished_conversion(args.root) is None:
                n = set_checksums(args.root, on=True, log=print_log)
                print(f"{args.root}: checksums written into {n} shard(s)", file=sys.stderr)
            report = verify_corpus(args.root, checksums=not args.no_checksums)
            if report.unfinished:  # not damaged: resumable; --overwrite would throw its progress away
                print(f"not a corpus yet: {report.problems[0]}", file=sys.stderr)
                print(f"{args.root}: unfinished conversion; rerun the same command to resume it", file=sys.stderr)
                return EXIT_VERIFY_FAILED
            for w in report.warnings:
                print(f"warning: {w}", file=sys.stderr)
            for p in report.problems:
                print(f"FAILED: {p}", file=sys.stderr)
            if not report.ok:
                print(
                    f"{args.root}: {len(report.problems)} problem(s); rebuild the named shards "
                    "(rerun build_corpus.py with --overwrite)",
                    file=sys.stderr,
                )
                return EXIT_VERIFY_FAILED
            print(f"{args.root}: OK ({report.n_shards_ok} shards verified)")
            return 0
        unfinished = unfinished_conversion(args.root)
        if unfinished is not None:
            raise CorpusFormatError(unfinished)
        if args.command == "info":
            info = corpus_info(args.root)
            if args.json:
                print(json.dumps(info, indent=1, default=str))
            else:
                print_info(info)
            return 0
        corpus = Corpus(args.root)
        start, stop = parse_cell_range(args.cells, corpus.n_cells)
        adata = to_anndata(corpus, start, stop, genes=args.genes)
        with atomic_path(args.out, suffix=".h5ad") as tmp:
            adata.write_h5ad(tmp)
        print(f"wrote {args.out}: {adata.n_obs} cells x {adata.n_vars} genes")
        return 0
    except UserInputError as e:  # CorpusFormatError, VocabError, LockHeldError, OutputPathError, ...
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
