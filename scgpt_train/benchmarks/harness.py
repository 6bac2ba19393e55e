"""Benchmark harness: what every runner of ``scgpt_train/benchmarks/`` shares.

``scripts/benchmark.py benchmark=<name>`` calls :func:`run_benchmark`, which instantiates the runner that
``configs/benchmark/<name>.yaml`` names with ``_target_`` (``_partial_: true``) and calls it as
``runner(bench, seeds, out_dir, extra_overrides, compose)``. The harness imports no runner; runners import the
harness: the seed configs (:func:`seed_config`, :func:`run_seed`), torch thread pinning (:func:`pinned_threads`),
the method rows (:func:`method_metrics`, :func:`ours_rows`, :func:`results_table`), the demo checkpoint
(:func:`demo_checkpoint`), the rows from a pretrained checkpoint (full fine-tune / LoRA / frozen encoder:
:func:`run_pretrained_rows`, :func:`pretrained_rows_table`) and the report tail (:func:`write_report`)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from scgpt_train.demo_run import demo_checkpoint  # noqa: F401  (re-exported: runners import only the harness)
from scgpt_train.errors import UserInputError
from scgpt_train.evaluation.baselines import available_baselines
from scgpt_train.evaluation.report import markdown_table, mean_std, write_json, write_text

log = logging.getLogger(__name__)

COLUMNS = {
    "annotation": [
        ("accuracy", "accuracy"),
        ("precision", "macro precision"),
        ("recall", "macro recall"),
        ("macro_f1", "macro F1"),
    ],
    "integration": [
        ("avg_bio", "AvgBIO"),
        ("avg_batch", "AvgBATCH"),
        ("overall", "overall"),
        ("nmi", "NMI"),
        ("ari", "ARI"),
        ("asw_label", "ASW label"),
        ("asw_batch", "ASW batch"),
        ("graph_connectivity", "graph conn."),
    ],
}
METHOD_NAMES = {
    "scgpt": "scGPT fine-tuned",
    "l1_lr": "L1 logistic regression",
    "hvg_pca": "HVG + PCA",
    "harmony": "Harmony",
    "scvi": "scVI",
}

BENCHMARK_KEYS = ("benchmark", "seeds", "overrides", "paths", "hydra")  # configs/benchmark.yaml's own keys


def split_cli_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line arguments of ``scripts/benchmark.py`` -> (its own, train.py overrides for every seed).

    Keys of configs/benchmark.yaml (``benchmark=``, ``seeds=``, ``overrides=``, ``paths.*``, ``hydra.*``) and
    flags (``--cfg job``, ``-m``) stay with the benchmark; anything else (``data.path=ref.h5ad``,
    ``trainer=gpu``, ``pretrained=CKPT``) is a train.py override, as if written into ``overrides=[...]``."""
    own: list[str] = []
    train: list[str] = []
    flag_value = False
    for arg in args:
        if flag_value:  # the value of a flag such as --cfg job / --package
            own.append(arg)
            flag_value = False
            continue
        if arg.startswith("-"):
            own.append(arg)
            flag_value = arg in ("--cfg", "-c", "--package", "-p", "--info", "-i", "--config-name", "-cn")
            continue
        key = arg.lstrip("+~").split("=", 1)[0]
        root = key.split(".", 1)[0].split("/", 1)[0]
        (own if root in BENCHMARK_KEYS else train).append(arg)
    return own, train


def data_source_note(bench: Mapping, overrides: Sequence[str]) -> str:
    """The report's first line: the benchmark's own dataset, or its recipe on the data the overrides point at."""
    own = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") in ("data.path", "data.query_path")]
    if own:
        files = ", ".join(f"`{p}`" for p in own)
        return f"Benchmark `{bench['name']}`: its recipe on {files} (not its own data: {bench.get('dataset', '')})."
    return f"Benchmark `{bench['name']}`: {bench.get('dataset', '')}."


def describe_data(run_dir: Path) -> list[str]:
    """Report lines on the data a fine-tune actually used, from its ``data_report.json`` (none if absent)."""
    path = Path(run_dir) / "data_report.json"
    if not path.is_file():
        return []
    rep = json.loads(path.read_text())
    files = ", ".join(f"`{p}`" for p in (rep.get("path"), rep.get("query_path")) if p)
    split = ", ".join(f"{k} {v:,}" for k, v in (rep.get("cells_per_split") or {}).items() if v)
    lines = [
        f"Data used: {files or 'see data_report.json'}; {rep.get('n_cells', 0):,} cells ({split}); "
        f"{rep.get('n_model_genes', 0):,} genes in the model; {len(rep.get('labels') or [])} labels"
        + (f", {len(rep['batches'])} batches" if rep.get("batches") else "")
        + "."
    ]
    for v in rep.get("values") or []:
        steps = ", ".join(v.get("steps") or []) or "used as stored"
        lines.append(f"Values of {v.get('source')}: {v.get('value_type')} ({v.get('evidence', '')}); {steps}.")
    lines += [f"Data warning: {w}" for w in rep.get("warnings") or []]
    return lines


def compose_train(overrides: Sequence[str]):
    """configs/train.yaml composed with ``overrides`` (Hydra's compose API, inside the caller's initialized
    config dir): how every benchmark runner builds a seed's run config unless given its own ``compose``."""
    from hydra import compose

    return compose(config_name="train", overrides=list(overrides))


def train_overrides(bench: Mapping, seed: int, seed_dir: Path, extra: Sequence[str]) -> list[str]:
    """Overrides of configs/train.yaml for one seed of ``bench``."""
    over = [
        f"experiment={bench['experiment']}",
        f"seed={seed}",
        f"paths.output_dir={seed_dir}",
        f"task.baselines=[{','.join(bench.get('baselines') or [])}]",
        "logger=csv",
    ]
    if bench["task"] == "annotation" and bench.get("l1_c_grid"):
        over.append(f"task.l1_c_grid=[{','.join(str(float(c)) for c in bench['l1_c_grid'])}]")
    return over + list(bench.get("train_overrides") or []) + list(extra)


def method_metrics(per_seed: list[dict[str, float]], method: str) -> dict[str, list[float]]:
    """{metric: [value per seed]} of ``method`` (scgpt = ``test/...``, baselines = ``baseline/<m>/...``)."""
    prefix = "test/" if method == "scgpt" else f"baseline/{method}/"
    out: dict[str, list[float]] = {}
    for metrics in per_seed:
        for key, value in metrics.items():
            if key.startswith(prefix):
                out.setdefault(key[len(prefix) :], []).append(float(value))
    return out


def ours_rows(
    per_seed: list[dict[str, float]],
    methods: Sequence[str],
    cols: Sequence[tuple[str, str]],
    names: Mapping[str, str],
    skip_reason: Callable[[str], str],
    n_seeds: int,
) -> tuple[list[list[str]], dict]:
    """Table rows of our runs of ``methods`` (mean ± std over seeds of each column; a method without numbers
    gets the row "ours (<skip_reason(method)>)") and the aggregated numbers {method: {metric: mean/std/values}}."""
    rows, summary = [], {}
    for method in methods:
        values = method_metrics(per_seed, method)
        name = names.get(method, method)
        if not values:
            reason = skip_reason(method)
            rows.append([name, f"ours ({reason})"] + ["-"] * len(cols))
            summary[method] = {"skipped": reason}
            continue
        summary[method] = {
            k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
            for k, v in values.items()
        }
        rows.append([name, f"ours ({n_seeds} seeds)"] + [mean_std(values.get(k, [])) for k, _ in cols])
    return rows, summary


def results_table(
    task: str, per_seed: list[dict[str, float]], baselines: Sequence[str], paper: Mapping | None, n_seeds: int
) -> tuple[str, dict]:
    """Markdown table (ours: mean ± std over seeds; paper rows where given) and the aggregated numbers."""
    cols = COLUMNS[task]
    header = ["method", "source"] + [title for _, title in cols]
    installed = available_baselines()

    def skip_reason(method: str) -> str:
        return "not installed" if installed.get(method) is False else "no result"

    methods = ["scgpt", *baselines]
    rows, summary = ours_rows(per_seed, methods, cols, METHOD_NAMES, skip_reason, n_seeds)
    legend = mark_collapsed(rows, per_seed, methods, summary)
    for method, numbers in (paper or {}).items():
        source = "paper" if method == "scgpt" else "paper / re-evaluation"
        rows.append(
            [METHOD_NAMES.get(method, method), source] + [f"{numbers[k]:.3f}" if k in numbers else "-" for k, _ in cols]
        )
    return markdown_table(header, rows) + legend, summary


COLLAPSE_MARKS = {
    "collapsed": ("†", "predictions collapsed to one class"),
    "no_better_than_majority": ("‡", "no better than always predicting the majority class"),
}


def mark_collapsed(rows: list[list[str]], per_seed: list[dict[str, float]], methods: Sequence[str], summary: dict):
    """Mark each metric of a method whose predictions collapsed / were no better than the majority class in some
    seed (the task's ``<method>/collapsed`` and ``no_better_than_majority`` flags); returns the table's legend and
    records the seeds in ``summary[method]["flags"]``."""
    legend = []
    for row, method in zip(rows, methods, strict=True):
        flags = method_metrics(per_seed, method)
        marks = []
        for key, (mark, text) in COLLAPSE_MARKS.items():
            hit = int(sum(v > 0 for v in flags.get(key, [])))
            if hit:
                marks.append(mark)
                summary[method].setdefault("flags", {})[key] = hit
                legend.append(f"{mark} {row[0]}: {text} in {hit} of {len(per_seed)} seeds")
        if marks:
            row[2:] = [f"{c} {''.join(marks)}" if c != "-" else c for c in row[2:]]
    return "".join(f"\n{line}\n" for line in legend)


def seed_config(
    bench: Mapping, seed: int, seed_dir: Path, extra: Sequence[str] = (), compose=None, more: Sequence[str] = ()
):
    """The train.py config of one seed: :func:`train_overrides` + ``more``, and ``data.split_seed=<seed>`` when
    the benchmark sets ``vary_split``, composed by ``compose`` (:func:`compose_train` by default)."""
    overrides = train_overrides(bench, seed, seed_dir, extra) + list(more)
    if bench.get("vary_split"):
        overrides.append(f"data.split_seed={seed}")
    log.info("benchmark %s: seed %s -> %s", bench["name"], seed, seed_dir)
    return (compose or compose_train)(overrides)


def run_seed(cfg) -> dict[str, float]:
    """One full train.py run (``pipeline.run``) of a seed's config; its final metrics as floats."""
    from scgpt_train.pipeline import run  # imported here: the pipeline pulls in Lightning, `--help` should not

    return {k: float(v) for k, v in run(cfg).items()}


@contextlib.contextmanager
def pinned_threads(n: int | None) -> Iterator[None]:
    """torch CPU threads set to ``n`` inside the block (None or 0: left as set), restored after."""
    import torch

    threads = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_report(
    out_dir: Path,
    title: str,
    notes: Sequence[str],
    body: str,
    result: Mapping,
    figures: Sequence[str] = (),
    file: str = "benchmark.md",
) -> str:
    """The report tail every runner shares: ``# title``, the notes as a list, ``body``, the figures as images;
    written to ``out_dir/file`` with ``result`` as ``out_dir/results.json``, printed, and returned."""
    text = (
        f"# {title}\n\n"
        + "\n".join(f"- {n}" for n in notes)
        + "\n\n"
        + body
        + "".join(f"\n![{f}]({f})\n" for f in figures)
    )
    write_text(text, Path(out_dir) / file)
    write_json(dict(result), Path(out_dir) / "results.json")
    print(text)
    return text


class BenchmarkConfigError(UserInputError):
    """A benchmark config that names no runner, or one that cannot be imported; the message names the key."""


def runner_of(bench: Mapping) -> Callable:
    """The runner ``bench`` names with ``_target_`` (Hydra's instantiate with ``_partial_``)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = bench.get("_target_")
    if not target:
        raise BenchmarkConfigError(
            f"benchmark {bench.get('name')!r} names no runner: add `_target_: scgpt_train.benchmarks.<family>.<run>` "
            "and `_partial_: true` to its configs/benchmark/<name>.yaml (see docs/architecture.md, add a benchmark)"
        )
    try:
        return instantiate({"_target_": target, "_partial_": True})
    except InstantiationException as e:
        raise BenchmarkConfigError(
            f"benchmark {bench.get('name')!r}: _target_ {target!r} cannot be loaded ({e}); name a function "
            "runner(bench, seeds, out_dir, extra_overrides, compose)"
        ) from e


def run_benchmark(
    bench: Mapping, seeds: Sequence[int], out_dir: Path, extra_overrides: Sequence[str] = (), compose=None
) -> dict:
    """Run the benchmark ``bench`` over ``seeds`` into ``out_dir`` through the runner its ``_target_`` names.

    ``extra_overrides`` are train.py overrides for every seed; ``compose(overrides) -> DictConfig`` composes
    configs/train.yaml (Hydra's compose API by default)."""
    return runner_of(bench)(bench, list(seeds), Path(out_dir), list(extra_overrides), compose)


# rows from a pretrained checkpoint: full fine-tune, LoRA, frozen encoder ------------------------------------------
PRETRAINED_VARIANTS = {
    "full": ("full fine-tune", ["peft=none"]),
    "lora": ("LoRA (peft=lora)", ["peft=lora"]),
    "frozen": ("frozen encoder (heads only)", ["peft=none", "++model.freeze.embeddings=true"]),
}


def _base_n_layers(checkpoint) -> int:
    from scgpt_train.checkpoints import load_checkpoint

    return int(load_checkpoint(Path(checkpoint))[0].config()["n_layers"])


def pretrained_variants(bench: Mapping) -> list[str]:
    """The variants ``bench["pretrained_rows"]["variants"]`` lists, checked (runners call this before any run)."""
    names = list((bench.get("pretrained_rows") or {}).get("variants") or [])
    for name in names:
        if name not in PRETRAINED_VARIANTS:
            raise BenchmarkConfigError(
                f"benchmark {bench.get('name')!r}: pretrained_rows.variants: {name!r} is not one of "
                f"{sorted(PRETRAINED_VARIANTS)} (full fine-tune, LoRA, frozen encoder)"
            )
    return names


def pretrained_variant_overrides(name: str, checkpoint, spec: Mapping) -> list[str]:
    """train.py overrides of one ``pretrained_rows`` variant: the family's way to start from ``checkpoint``
    (``spec["overrides"]``), the variant's own setting, then ``spec["extra"][name]`` (e.g. a LoRA learning rate)."""
    own = list(PRETRAINED_VARIANTS[name][1])
    if name == "frozen":  # every transformer layer and the embeddings frozen: only the task heads train
        own.append(f"++model.freeze.layers={_base_n_layers(checkpoint)}")
    base = [*(spec.get("overrides") or []), f"pretrained={checkpoint}", f"data.vocab={checkpoint}"]
    return base + own + list((spec.get("extra") or {}).get(name) or [])


@contextlib.contextmanager
def peak_memory() -> Iterator[dict]:
    """Peak memory of the block, in the yielded dict after it: ``peak_memory_mb`` and what was measured
    (``peak_memory_kind``): the CUDA caching allocator's peak when a GPU is used, else the process' peak resident
    set (Linux ``VmHWM``, reset at the start through ``/proc/self/clear_refs``; elsewhere the process' lifetime
    peak ``ru_maxrss``, which an earlier, larger run in the same process would hide)."""
    import re

    import torch

    out: dict = {}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = False
    if not cuda:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            pass
    try:
        yield out
    finally:
        if cuda:
            out.update(peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20, peak_memory_kind="CUDA allocated")
        elif reset:
            hwm = re.search(r"VmHWM:\s+(\d+)\s*kB", Path("/proc/self/status").read_text())
            out.update(peak_memory_mb=int(hwm.group(1)) / 1024, peak_memory_kind="peak RSS of the run")
        else:
            import resource

            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out.update(peak_memory_mb=kb / 1024, peak_memory_kind="peak RSS of the process (not reset)")


def run_pretrained_rows(
    bench: Mapping, seeds: Sequence[int], out_dir: Path, extra: Sequence[str] = (), compose=None
) -> list[dict]:
    """The ``pretrained_rows`` of ``bench``: for each variant in ``pretrained_rows.variants`` (full, lora, frozen)
    and each seed, the benchmark's fine-tune from ``pretrained_rows.checkpoint`` (null: the demo pretraining
    checkpoint, :func:`demo_checkpoint`) without baselines, into ``out_dir/<variant>/seed_<n>``. Per variant:
    name, checkpoint, per-seed metrics and, from each run's summary.json and checkpoint, trainable / total
    parameters, peak memory, fit seconds per step and the size of ``last.ckpt``. [] when no variant is listed."""
    spec = dict(bench.get("pretrained_rows") or {})
    names = pretrained_variants(bench)
    if not names:
        return []
    checkpoint = Path(spec["checkpoint"]) if spec.get("checkpoint") else demo_checkpoint()
    rows = []
    for name in names:
        more = [*pretrained_variant_overrides(name, checkpoint, spec), "task.baselines=[]"]
        row = {"variant": name, "checkpoint": str(checkpoint), "per_seed": [], "runs": []}
        for seed in seeds:
            seed_dir = Path(out_dir) / name / f"seed_{seed}"
            with peak_memory() as mem:
                row["per_seed"].append(run_seed(seed_config(bench, seed, seed_dir, extra, compose, more)))
            summary = json.loads((seed_dir / "summary.json").read_text())
            last = Path(summary.get("last_checkpoint") or seed_dir / "checkpoints" / "last.ckpt")
            files = [p for p in last.rglob("*") if p.is_file()] if last.is_dir() else [last]  # DeepSpeed: a dir
            size = sum(p.stat().st_size for p in files)
            row["runs"].append({
                "seed": seed, "trainable_params": summary.get("trainable_params"),
                "total_params": summary.get("total_params"), "checkpoint_mb": size / 2**20,
                "fit_s_per_step": summary["fit_seconds"] / max(int(summary.get("steps") or 0), 1), **mem,
            })  # fmt: skip
        rows.append(row)
    return rows


def pretrained_rows_table(rows: Sequence[Mapping], cols: Sequence[tuple[str, str]]) -> str:
    """Markdown table of :func:`run_pretrained_rows`: per variant the metrics ``cols`` (``test/<key>``, mean ± std
    over seeds), trainable / total parameters, ``last.ckpt`` size, peak memory and fit seconds per step (mean)."""
    header = ["variant", "trainable / total params", "checkpoint (MB)", "peak memory (MB)", "fit s / step"]
    header += [title for _, title in cols]
    body = []
    for row in rows:
        runs = row["runs"]
        trainable, total = runs[0]["trainable_params"], runs[0]["total_params"]
        share = f" ({100 * trainable / total:.1f}%)" if trainable and total else ""
        values = method_metrics(row["per_seed"], "scgpt")
        body.append(
            [PRETRAINED_VARIANTS[row["variant"]][0], f"{trainable:,} / {total:,}{share}"]
            + [mean_std([r[k] for r in runs]) for k in ("checkpoint_mb", "peak_memory_mb", "fit_s_per_step")]
            + [mean_std(values.get(k, [])) for k, _ in cols]
        )
    return markdown_table(header, body)


def pretrained_rows_notes(rows: Sequence[Mapping], n_seeds: int) -> list[str]:
    """The report lines that say what the pretrained rows are."""
    if not rows:
        return []
    kind = rows[0]["runs"][0].get("peak_memory_kind", "")
    return [
        f"Pretrained rows: the same fine-tune from `{rows[0]['checkpoint']}` (model=from_official), {n_seeds} seeds "
        "each (mean ± std): every weight trained (full), LoRA adapters on every layer's attention and feed-forward "
        "projections + the task heads (peft=lora, configs/peft/lora.yaml), or only the task heads (frozen "
        f"encoder). Peak memory: {kind}; fit s / step: the fit's wall time (validation included) / its steps."
    ]
