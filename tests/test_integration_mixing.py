"""Batch correction in the integration fine-tune mixes the two batches of the demo set (issue #7).

Two short CPU fine-tunes of ``finetune_integration_demo`` (avg-pool cell embedding) on the same cells, seed
and epochs, both without DAR: with domain-specific batch norm and without it. Scored by the task's scIB
metrics (``scgpt_train.evaluation.metrics.integration_metrics``), batch ASW and AvgBATCH must rise by a clear
margin while label ASW stays within a small tolerance (AvgBIO's Leiden-based terms are not reproducible
across machines, so it is reported, not asserted).

Both fine-tunes run in this process (``conftest.train_in_process``): the test is about what DSBN does to the
embedding, not about the entry point, and the second run reuses the metric kernels numba / jax compiled for
the first.

Measured at 3 epochs (this size), seeds 42 / 0 / 1 / 2 / 3, DSBN minus plain: batch ASW +0.159 / +0.186 / +0.174 /
+0.153 / +0.135, AvgBATCH +0.057 / +0.125 / +0.122 / +0.133 / +0.077 (its graph-connectivity half moves by up to
+-0.07 either way from seed to seed), label ASW -0.010 / -0.001 / -0.002 / -0.001 / -0.007. Seed 42 at 6 epochs:
+0.191, +0.074, -0.012. The asserted margins sit at about half the smallest gain seen (0.07 for batch ASW, 0.03
for AvgBATCH) and 5x the largest label-ASW drop (0.05), so another machine's float differences (which change the
trajectory like another seed would) stay inside them. The earlier 10-epoch version measured AvgBATCH +0.256 on
one machine but +0.050 on this one (it failed its 0.1 margin here after the HVG / model changes of issue #17).
About 11 s per fine-tune on 2 quiet cores, plus about 20 s of metric-kernel compilation once.
"""

from __future__ import annotations

import pytest
from conftest import train_in_process

EPOCHS = 3
COMMON = [
    "experiment=finetune_integration_demo",
    "seed=42",
    "task.baselines=[]",
    "task.umap=false",
    "task.write_h5ad=false",
    "callbacks.progress_bar=null",
    f"trainer.max_epochs={EPOCHS}",
]
NO_DAR = ["model.net.do_dab=false", "~objective.dar"]
MIN_GAIN = {"asw_batch": 0.07, "avg_batch": 0.03}  # asserted gains with DSBN (measured: >= 0.135, >= 0.057)
LABEL_TOLERANCE = 0.05  # asserted bound on the drop of asw_label with DSBN (measured: <= 0.010)


@pytest.fixture(scope="module")
def with_and_without(tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("integration_mixing")
    cache = f"paths.cache_dir={root / 'cache'}"  # the two-batch h5ad is built once, by the first run
    corrected = train_in_process([*COMMON, cache, *NO_DAR], root / "dsbn")
    plain = train_in_process([*COMMON, cache, *NO_DAR, "model.net.dsbn=false"], root / "plain")
    return corrected, plain


def test_batch_correction_improves_batch_mixing(with_and_without):
    corrected, plain = with_and_without
    for key, gain in MIN_GAIN.items():
        a, b = corrected[f"test/{key}"], plain[f"test/{key}"]
        assert a - b >= gain, f"{key} with DSBN {a:.3f} vs without {b:.3f}: expected a gain >= {gain}"


def test_batch_correction_keeps_label_separation(with_and_without):
    """Label ASW (a deterministic function of the embedding) must not drop. AvgBIO is not asserted: its NMI / ARI
    come from Leiden clusterings, which differ across machines and loads (a fresh clone measured AvgBIO 0.303 with
    DSBN vs 0.377 without, while this machine measured 0.369 vs 0.370); it is printed for the record."""
    corrected, plain = with_and_without
    a, b = corrected["test/asw_label"], plain["test/asw_label"]
    print(f"avg_bio with DSBN {corrected['test/avg_bio']:.3f} vs without {plain['test/avg_bio']:.3f}")
    assert b - a <= LABEL_TOLERANCE, f"asw_label with DSBN {a:.3f} vs without {b:.3f}: dropped by > {LABEL_TOLERANCE}"
