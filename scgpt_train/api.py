"""Python API for notebooks: AnnData in, AnnData out, over the same code paths as the command lines.

- :func:`embed` -> ``scripts/embed.py`` (``scgpt_train.inference.embed_h5ad``): the input with
  ``obsm["X_scgpt"]``.
- :func:`finetune` -> ``train.py experiment=finetune_annotation|finetune_integration`` (``scgpt_train.pipeline.run``):
  (fine-tuned model, predictions AnnData, metrics).
- :func:`reference_map` -> ``scripts/reference_map.py`` (``scgpt_train.tasks.reference_map.run_reference_map``):
  the query with the kNN cell types transferred from a reference (AnnData, h5ad or corpus), and the summary.
- :func:`build_corpus` -> ``scripts/build_corpus.py h5ad`` (gene identifiers resolved per input, then
  ``data_modules.store.convert.convert_sources``): the corpus, ready for ``train.py data=corpus``.

The AnnData objects are written to h5ad files in the run / a temporary directory (the data module and the
converters read files, as the command lines do); derived labels and splits (``query_key`` / ``query_values``, a
donor-wise hold-out) need no files of the user's. See ``docs/python_api.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad

from scgpt_train.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("annotation", "integration")
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError)  # what a refusal of an input raises below the API
NOT_OVERRIDABLE = {  # overrides the API cannot honour: it composes the config itself and reads the run's outputs
    "hydra": "the API runs without Hydra's launcher, so hydra.* settings (hydra.run.dir, ...) have no effect",
    "paths.output_dir": "the API reads the run's outputs from the directory it chose",
}


def _write(adata: ad.AnnData, path: Path, name: str) -> Path:
    from scgpt_train.evaluation.report import write_h5ad

    if not isinstance(adata, ad.AnnData):
        raise UserInputError(f"{name}: expected an AnnData, got {type(adata).__name__}")
    return write_h5ad(adata, path)


def _message(error: BaseException, files: Mapping[str, str]) -> str:
    """The error's message with the API's temporary input files named as the arguments they hold."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return _named(str(text), files)


def _named(text: str, files: Mapping[str, str]) -> str:
    for path, argument in sorted(files.items(), key=lambda kv: -len(kv[0])):  # full paths before bare names
        text = text.replace(path, f"the AnnData `{argument}`")
    return text


@contextlib.contextmanager
def _user_errors(files: Mapping[str | os.PathLike, str]):
    """Refusals of the inputs surface as :class:`UserInputError` (the project's own input errors keep their class,
    which derives from it), naming the AnnData arguments instead of the temporary files they were written to."""
    from hydra.errors import InstantiationException

    names: dict[str, str] = {}
    for path, argument in files.items():
        names[str(path)] = argument
        names[Path(path).name] = argument
    try:
        yield
    except InstantiationException as e:  # a data module refusing its input while Hydra builds it
        cause = e.__cause__
        if isinstance(cause, INPUT_ERRORS):
            raise _rebuilt(cause, names) from e
        raise
    except INPUT_ERRORS as e:
        raise _rebuilt(e, names) from e


def _rebuilt(error: BaseException, names: Mapping[str, str]) -> UserInputError:
    from data_modules.atomic import DiskFullError

    if isinstance(error, DiskFullError):  # its constructor takes the path, not a message
        return DiskFullError(_named(str(error.path), names), error)
    msg = _message(error, names)
    if isinstance(error, UserInputError):
        try:
            return type(error)(msg)
        except TypeError:  # a subclass with another constructor
            pass
    return UserInputError(msg)


# ---------------------------------------------------------------------------------------------------------------
def embed(
    adata: ad.AnnData,
    checkpoint: str | os.PathLike,
    *,
    key: str = "X_scgpt",
    batch_key: str | None = None,
    gene_column: str | None = None,
    gene_table: str | os.PathLike | None = None,
    use_raw: bool = False,
    batch_size: int | None = None,
    max_seq_len: int | None = None,
    include_zero_genes: bool = False,
    normalize: bool = True,
    device: str | None = None,
    seed: int = 0,
    drop_unmapped_cells: bool = False,
    progress: bool = False,
    species: str | None = None,
    precision: str = "auto",
    max_tokens: int | None = None,
    prefer_gene_column: bool = False,
) -> ad.AnnData:
    """Cell embeddings of ``adata`` with ``checkpoint``, as ``scripts/embed.py``.

    Parameters
    ----------
    adata : AnnData
        The cells (X or ``.raw``: raw counts or log-normalized values; genes by symbol or Ensembl id).
    checkpoint : path-like
        An official scGPT directory, a file from ``scripts/import_scgpt.py`` or a Lightning .ckpt of this project.
    key : str
        The ``obsm`` key of the embeddings.
    batch_key : str, optional
        obs column with batch labels, for a checkpoint trained with batch labels (DSBN / batch embedding).
    gene_column, gene_table, use_raw
        How the genes are read: a var column with the names, an Ensembl id -> symbol table (default: the GENCODE
        v44 table shipped with celltypist), ``.raw`` instead of X.
    prefer_gene_column : bool
        An input with Ensembl ids and a symbol column that disagree uses the column (default: the ids decide), as
        ``--prefer-gene-column``.
    batch_size, max_tokens : int, optional
        Cells are sorted by length and packed into batches of at most ``max_tokens`` tokens (default: 4,096 on a CPU,
        16,384 on a GPU; ``inference_batches.default_max_tokens``) and ``batch_size`` cells (default: no cap).
    max_seq_len : int, optional
        Genes per cell + ``<cls>`` (default: the checkpoint's layout).
    include_zero_genes : bool
        Every mapped gene per cell, zeros included (the official ``include_zero_gene``).
    normalize : bool
        L2-normalize the embeddings (as the official tutorials use them).
    device : str, optional
        The torch device (default: CUDA when there is one).
    seed : int
        Seed of the tokenization draws (binning ties, gene sampling of longer cells).
    drop_unmapped_cells : bool
        Leave out cells that express no gene of the vocabulary (default: kept, with NaN embeddings).
    progress : bool
        Progress bars.
    species : str, optional
        The cells' species (default: detected from the gene names); another species than the checkpoint's maps
        through one-to-one orthologs (``data_modules/species.py``). ``finetune`` takes it as ``data.species=``.
    precision : str
        ``auto`` (bf16 autocast where the hardware computes bf16 natively, else fp32; the choice is logged and
        recorded in ``uns[f"{key}_precision"]``), ``fp32`` or ``bf16``.

    Returns
    -------
    AnnData
        The input (same obs_names, X untouched) with ``obsm[key]``, ``obs["scgpt_pred"]`` when the checkpoint has a
        classifier, and the gene mapping reports in ``uns``.

    Raises
    ------
    scgpt_train.errors.UserInputError
        (e.g. ``EmbedInputError``) for inputs it cannot embed.
    """
    from scgpt_train.inference import embed_h5ad

    with tempfile.TemporaryDirectory(prefix="scgpt_embed_") as tmp, _user_errors({Path(tmp) / "input.h5ad": "adata"}):
        src = _write(adata, Path(tmp) / "input.h5ad", "adata")
        out = embed_h5ad(
            checkpoint,
            src,
            Path(tmp) / "embedded.h5ad",
            key=key,
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            include_zero_genes=include_zero_genes,
            gene_column=gene_column,
            use_raw=use_raw,
            batch_key=batch_key,
            gene_table=None if gene_table is None else str(gene_table),
            normalize=normalize,
            device=device,
            seed=seed,
            progress=progress,
            drop_unmapped_cells=drop_unmapped_cells,
            species=species,
            precision=precision,
            max_tokens="auto" if max_tokens is None else max_tokens,
            prefer_gene_column=prefer_gene_column,
        )
        return ad.read_h5ad(out)


# ---------------------------------------------------------------------------------------------------------------
def reference_map(
    query: ad.AnnData,
    reference: ad.AnnData | str | os.PathLike,
    checkpoint: str | os.PathLike,
    label_key: str = "cell_type",
    *,
    k: int = 10,
    baselines: Sequence[str] | None = None,
    gene_column: str | None = None,
    gene_table: str | os.PathLike | None = None,
    use_raw: bool = False,
    batch_size: int | None = None,
    seed: int = 0,
    device: str | None = None,
    precision: str = "auto",
    progress: bool = False,
    prefer_gene_column: bool = False,
    **options: Any,
) -> tuple[ad.AnnData, dict]:
    """Zero-shot reference mapping, as ``scripts/reference_map.py``: each query cell labelled by a
    ``k``-nearest-neighbour vote over the reference's ``label_key`` in ``checkpoint``'s cell-embedding space.

    Parameters
    ----------
    query : AnnData
        The cells to label.
    reference : AnnData, path-like
        The labelled reference: an AnnData, an h5ad path, or a corpus directory (atlas mode).
    checkpoint : path-like
        A zero-shot checkpoint (official directory, imported .pt, Lightning .ckpt).
    label_key : str
        The reference's obs column with the cell types (metrics when the query has it too).
    k, batch_size, seed, device, progress
        Neighbours per vote, the most cells per embedding batch (None: only the token budget), the seed, the torch
        device, progress bars.
    precision : str
        ``auto`` (bf16 autocast where the hardware computes bf16 natively, else fp32; logged), ``fp32`` or ``bf16``.
    baselines : sequence of str, optional
        None: the command line's (HVG+PCA kNN, L1-LR on the same split); () for none.
    gene_column, gene_table, use_raw
        How both inputs' genes are read: a var column with the names, an Ensembl id -> symbol table, ``.raw``.
    prefer_gene_column : bool
        With Ensembl ids in var_names and a symbol column beside them, the column's names win over the id table
        (``--prefer-gene-column``).
    **options
        Other :class:`~scgpt_train.tasks.reference_map.ReferenceMapParams` fields (``index_kind``, ``n_hvg``, ...)
        and ``index_out`` to keep the kNN index (default: a temporary directory).

    Returns
    -------
    (AnnData, dict)
        The query with ``obsm["X_scgpt"]``, the predictions / distances in ``obs`` and the neighbours in ``obsm``;
        the summary (metrics when the query carries ``label_key``).
    """
    from scgpt_train.tasks.reference_map import BASELINES, ReferenceMapParams, run_reference_map

    with tempfile.TemporaryDirectory(prefix="scgpt_refmap_") as tmp:
        tmp = Path(tmp)
        files = {tmp / "query.h5ad": "query"} | ({tmp / "reference.h5ad": "reference"} if _is_adata(reference) else {})
        with _user_errors(files):
            ref = _write(reference, tmp / "reference.h5ad", "reference") if _is_adata(reference) else reference
            index_out = options.pop("index_out", None)
            params = ReferenceMapParams(
                k=k,
                batch_size=batch_size,
                gene_column=gene_column,
                use_raw=use_raw,
                prefer_gene_column=prefer_gene_column,
                gene_table=None if gene_table is None else str(gene_table),
                seed=seed,
                device=device,
                precision=precision,
                baselines=BASELINES if baselines is None else tuple(baselines),
                progress=progress,
                **options,
            )
            query_path = str(_write(query, tmp / "query.h5ad", "query"))
            summary = run_reference_map(
                checkpoint, str(ref), query_path, label_key, tmp / "mapped.h5ad", params, index_out=index_out
            )
            return ad.read_h5ad(tmp / "mapped.h5ad"), summary


def _is_adata(x) -> bool:
    return isinstance(x, ad.AnnData)


# ---------------------------------------------------------------------------------------------------------------
def _compose(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def finetune(
    adata: ad.AnnData,
    task: str = "annotation",
    label_key: str = "cell_type",
    checkpoint: str | os.PathLike | None = None,
    query: ad.AnnData | None = None,
    *,
    batch_key: str | None = None,
    query_key: str | None = None,
    query_values: Sequence[Any] | None = None,
    query_fraction: float | None = None,
    layer: str | None = None,
    gene_column: str | None = None,
    baselines: Sequence[str] | None = None,
    max_epochs: int | None = None,
    trainer: str = "auto",
    output_dir: str | os.PathLike | None = None,
    seed: int = 42,
    overrides: Sequence[str] = (),
) -> tuple[Any, ad.AnnData, dict[str, float]]:
    """Fine-tune on ``adata`` as ``train.py experiment=finetune_<task>`` does.

    Parameters
    ----------
    adata : AnnData
        The cells (the reference, or all cells for integration).
    task : str
        ``annotation`` (needs ``label_key``; query cells from ``query``, or ``query_key`` + ``query_values``, or a
        stratified ``query_fraction``) or ``integration`` (needs ``label_key`` and ``batch_key``).
    label_key, batch_key : str
        obs columns with the cell types / the batches.
    checkpoint : path-like, optional
        The pretrained model (official directory, imported .pt, or a .ckpt of this project); None trains the small
        ``model=demo`` scGPT from scratch on the data's genes.
    query : AnnData, optional
        The query cells (annotation).
    query_key, query_values, query_fraction
        The query split when there is no ``query``.
    layer : str, optional
        Read ``adata.layers[layer]`` instead of X (values are inspected and preprocessed as the recipe says).
    gene_column : str, optional
        The var column with the gene names.
    baselines : sequence of str, optional
        e.g. ["l1_lr"] (annotation) or ["hvg_pca", "harmony", "scvi"] (integration), on the same values.
    max_epochs : int, optional
        None: the recipe's.
    trainer : str
        ``auto`` (one GPU if torch sees one, else the CPU), ``cpu``, ``gpu``, ... (configs/trainer).
    output_dir : path-like, optional
        The run directory (inputs, checkpoints, predictions.h5ad, metrics.json, figures); default a new temporary
        directory, named in ``predictions.uns["scgpt_output_dir"]``.
    seed : int
        The run's seed.
    overrides : sequence of str
        Any other ``train.py`` override, e.g. ["model.lr=3e-4", "layout.max_seq_len=1201"]; ``hydra.*`` and
        ``paths.output_dir`` are refused (``output_dir=`` chooses the run directory).

    Returns
    -------
    (ScGPT, AnnData, dict)
        The fine-tuned model with the weights the task evaluated; the predictions (``predictions.h5ad``: the input
        cells, reference then query, with their obs_names, every gene in var order, X untouched, ``obs["split"]``,
        predictions, ``obsm["X_scgpt"]``, ``layers["preprocessed"]`` (what the model and baselines read),
        ``uns["scgpt_checkpoint"]`` naming the evaluated checkpoint); the metrics.

    Raises
    ------
    UserInputError
        (or one of the project's input errors, which derive from it) for inputs it cannot use, naming the
        argument (``adata``, ``query``, an override).
    """
    if task not in TASKS:
        raise UserInputError(f"task must be one of {TASKS}, got {task!r}")
    if task == "integration" and batch_key is None:
        raise UserInputError("task='integration' needs batch_key (the obs column holding the batches)")
    for override in overrides:
        key = str(override).lstrip("+~").split("=", 1)[0]
        for prefix, why in NOT_OVERRIDABLE.items():
            if key == prefix or key.startswith(prefix + "."):
                raise UserInputError(
                    f"finetune(overrides=[{override!r}]): {why}; choose the run directory with output_dir=..."
                )
    for name, frame in (("adata", adata), ("query", query)):
        if frame is not None:
            if not isinstance(frame, ad.AnnData):
                raise UserInputError(f"{name}: expected an AnnData, got {type(frame).__name__}")
            for key in (label_key, batch_key, query_key if name == "adata" else None):
                if key is not None and key not in frame.obs.columns:
                    raise UserInputError(f"{name}.obs has no column {key!r} (columns: {list(frame.obs.columns)[:15]})")
    from data_modules.errors import ensure_writable_dir

    created = output_dir is None or not Path(output_dir).exists()
    out = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix=f"scgpt_{task}_"))
    ensure_writable_dir(out, "output_dir")
    inputs = out / "inputs"
    files = {inputs / "reference.h5ad": "adata", inputs / "query.h5ad": "query"}
    try:
        with _user_errors(files):
            return _finetune(
                adata,
                task,
                label_key,
                checkpoint,
                query,
                out,
                batch_key=batch_key,
                query_key=query_key,
                query_values=query_values,
                query_fraction=query_fraction,
                layer=layer,
                gene_column=gene_column,
                baselines=baselines,
                max_epochs=max_epochs,
                trainer=trainer,
                seed=seed,
                overrides=overrides,
            )
    except UserInputError:
        if created:  # a refused run leaves no output directory of its own behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _finetune(
    adata,
    task,
    label_key,
    checkpoint,
    query,
    out: Path,
    *,
    batch_key,
    query_key,
    query_values,
    query_fraction,
    layer,
    gene_column,
    baselines,
    max_epochs,
    trainer,
    seed,
    overrides,
):
    """:func:`finetune` after its arguments were checked."""
    from omegaconf import OmegaConf, open_dict

    from scgpt_train.checkpoints import load_checkpoint
    from scgpt_train.pipeline import run

    inputs = out / "inputs"
    ref_path = _write(adata, inputs / "reference.h5ad", "adata")
    query_path = _write(query, inputs / "query.h5ad", "query") if query is not None else None

    groups = [f"experiment=finetune_{task}", f"trainer={trainer}"]
    if checkpoint is None:  # from scratch: the small demo model, the data's own genes
        groups += ["model=demo"]
    cfg = _compose(groups + list(overrides))
    values: dict[str, Any] = {
        "paths.output_dir": str(out),
        "seed": seed,
        "pretrained": None if checkpoint is None else str(checkpoint),
        "data.path": str(ref_path),
        "data.query_path": None if query_path is None else str(query_path),
        "data.label_key": label_key,
        "data.batch_key": batch_key,
        "data.query_key": query_key,
        "data.query_values": None if query_values is None else [str(v) for v in query_values],
        "data.query_fraction": query_fraction,
        "data.layer": layer,
        "data.preprocess.gene_column": gene_column,
        "data.num_workers": 0,
    }
    if checkpoint is None:
        values["data.vocab"] = None
        values["model.net.use_generative"] = False
        values["model.net.use_mvc"] = task == "integration"
    if baselines is not None:
        values["task.baselines"] = list(baselines)
    if max_epochs is not None:
        values["trainer.max_epochs"] = int(max_epochs)
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    with open_dict(cfg):
        for key, value in values.items():
            if key not in given:  # an explicit override wins
                OmegaConf.update(cfg, key, value, force_add=True)
    metrics = run(cfg)
    report = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    weights = report.get("best_checkpoint") or str(out / "checkpoints" / "last.ckpt")
    model, _ = load_checkpoint(weights)
    model.eval()
    predictions = ad.read_h5ad(out / "predictions.h5ad")
    predictions.uns["scgpt_checkpoint"] = str(weights)
    predictions.uns["scgpt_output_dir"] = str(out)
    return model, predictions, metrics


# ---------------------------------------------------------------------------------------------------------------
def build_corpus(
    inputs: Sequence[ad.AnnData | str | os.PathLike] | Mapping[str, ad.AnnData | str | os.PathLike],
    out: str | os.PathLike,
    *,
    vocab: str | os.PathLike | None = None,
    gene_column: str | None = None,
    gene_table: str | os.PathLike | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    obs_columns: Sequence[str] | None = None,
    allow_normalized: bool = False,
    val_fraction: float | None = 0.003,
    split_seed: int = 0,
    min_genes: int = 1,
    shard_size: int = 16384,
    chunk_size: int = 2048,
    duplicate_genes: str = "error",
    overwrite: bool = False,
    quiet: bool = True,
    prefer_gene_column: bool = False,
):
    """A sharded corpus at ``out`` from AnnData objects and / or h5ad paths, as ``scripts/build_corpus.py h5ad``:
    gene identifiers resolved per input (Ensembl ids vs symbols, one key for all; inputs that would never match
    are refused), values validated (raw counts unless ``allow_normalized``), resumable.

    Parameters
    ----------
    inputs : sequence or mapping
        AnnData objects and / or h5ad paths, or a ``{dataset name: AnnData or path}`` mapping.
    out : path-like
        The corpus directory.
    vocab : path-like, optional
        A vocab.json or checkpoint whose vocabulary to use (default: the union of the inputs' genes).
    gene_column, gene_table, layer, use_raw
        How each input's genes and values are read (a var column with the names, an Ensembl id -> symbol table,
        a layer instead of X, ``.raw``).
    prefer_gene_column : bool
        An input with Ensembl ids and a symbol column that disagree uses the column (default: the ids, through the
        id table; the disagreements are a warning either way).
    obs_columns : sequence of str, optional
        obs columns kept (``NAME=SOURCE`` maps a column).
    allow_normalized : bool
        Accept values that are not raw counts.
    val_fraction, split_seed : float, int
        The validation split's share (None: no validation split) and seed.
    min_genes, shard_size, chunk_size, duplicate_genes, overwrite, quiet
        Cells with fewer expressed genes are dropped; cells per shard / per written chunk; repeated gene names
        (``error`` | ``first``); replace an existing corpus; no progress lines.

    Returns
    -------
    Corpus
        :class:`data_modules.store.reader.Corpus`; ``corpus.gene_id_reports`` says how each input's genes were
        mapped.
    """
    for i, x in enumerate(inputs.values() if isinstance(inputs, Mapping) else inputs):
        if not isinstance(x, (ad.AnnData, str, os.PathLike)):
            raise UserInputError(f"inputs[{i}]: expected an AnnData or an h5ad path, got {type(x).__name__}")
    named = (
        list(inputs.items())
        if isinstance(inputs, Mapping)
        else [
            (Path(x).name.removesuffix(".h5ad") if not isinstance(x, ad.AnnData) else f"adata_{i}", x)
            for i, x in enumerate(inputs)
        ]
    )
    if not named:
        raise UserInputError("build_corpus needs at least one input (AnnData or h5ad path)")
    seen: dict[str, str] = {}
    for name, x in named:
        if not isinstance(x, ad.AnnData):
            key = os.path.realpath(x)
            if key in seen:
                raise UserInputError(
                    f"inputs: {x} is given twice (as {seen[key]!r} and {name!r}): every cell would be in the corpus "
                    "twice; give each input once"
                )
            seen[key] = name
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise UserInputError(f"input names must be unique (pass a {{name: input}} mapping), got {names}")
    with _user_errors({}):
        return _build_corpus(
            named,
            out,
            vocab=vocab,
            gene_column=gene_column,
            gene_table=gene_table,
            layer=layer,
            use_raw=use_raw,
            obs_columns=obs_columns,
            allow_normalized=allow_normalized,
            val_fraction=val_fraction,
            split_seed=split_seed,
            min_genes=min_genes,
            shard_size=shard_size,
            chunk_size=chunk_size,
            duplicate_genes=duplicate_genes,
            overwrite=overwrite,
            quiet=quiet,
            prefer_gene_column=prefer_gene_column,
        )


def _build_corpus(
    named,
    out,
    *,
    vocab,
    gene_column,
    gene_table,
    layer,
    use_raw,
    obs_columns,
    allow_normalized,
    val_fraction,
    split_seed,
    min_genes,
    shard_size,
    chunk_size,
    duplicate_genes,
    overwrite,
    quiet,
    prefer_gene_column,
):
    """:func:`build_corpus` after its inputs were named."""
    from data_modules.store.cli import resolve_input_genes
    from data_modules.store.convert import DEFAULT_OBS_COLUMNS, Source, check_out_dir, convert_sources, print_log
    from data_modules.store.reader import Corpus
    from data_modules.vocab import GeneVocab, load_gene_table, table_name

    log = (lambda msg: None) if quiet else print_log
    check_out_dir(out)
    kw = dict(gene_column=gene_column, use_raw=use_raw, layer=layer)
    sources = [Source(name, x if isinstance(x, ad.AnnData) else str(x), **kw) for name, x in named]
    loaded = GeneVocab.from_checkpoint(vocab) if vocab is not None else None
    table = load_gene_table(gene_table) if gene_table is not None else None
    label = table_name(gene_table) if gene_table is not None else None
    loaded, table, reports = resolve_input_genes(sources, loaded, table, label, log, prefer_column=prefer_gene_column)
    explicit = obs_columns is not None
    convert_sources(
        sources,
        out,
        vocab=loaded,
        obs_columns=list(obs_columns if explicit else DEFAULT_OBS_COLUMNS),
        shard_size=shard_size,
        chunk_size=chunk_size,
        allow_float=allow_normalized,
        min_genes=min_genes,
        split={"strategy": "none"}
        if val_fraction is None
        else {"strategy": "cell", "seed": split_seed, "val_fraction": float(val_fraction)},
        gene_table=table,
        overwrite=overwrite,
        require_obs=explicit,
        on_duplicate=duplicate_genes,
        log=log,
    )
    corpus = Corpus(out)
    corpus.gene_id_reports = reports
    return corpus


__all__ = ["embed", "finetune", "reference_map", "build_corpus"]
