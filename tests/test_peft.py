"""PEFT (peft=lora / ia3, scgpt_train/adapters.py): adapters on a pretrained model's projections, adapter-only
checkpoints bound to their base by sha256, merged export to the official layout, refusals, and the benchmarks'
rows from a pretrained checkpoint (full fine-tune / LoRA / frozen encoder: benchmarks/harness.run_pretrained_rows).

The base is conftest's ``small_pretrained`` (2 generative steps of the tiny model on pbmc68k_reduced's 256 most
detected genes); the fine-tunes are the annotation and perturbation demos (real pbmc68k cells) on its vocabulary,
one epoch of 2 batches: what is tested is the machinery, not the weights (docs/finetuning.md has the measured
LoRA / full fine-tune comparison). DDP and DeepSpeed with adapters: tests/test_distributed.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, train_in_process
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from scgpt_train import adapters
from scgpt_train.benchmarks.harness import BenchmarkConfigError, run_benchmark
from scgpt_train.checkpoints import export_official, load_checkpoint, load_official

VARIANTS = ["full", "lora", "frozen"]
SHORT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
         "validate_before_fit=false", "callbacks.progress_bar=null"]  # fmt: skip


def run_bench(name: str, seeds: list[int], out, extra: list[str], **pretrained_rows) -> dict:
    """``scripts/benchmark.py benchmark=<name>`` in this process without baselines, with ``pretrained_rows``
    fields set (as ``benchmark.pretrained_rows.<field>=`` would)."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        bench = OmegaConf.to_container(compose("benchmark", overrides=[f"benchmark={name}"]).benchmark, resolve=True)
        bench["baselines"] = []
        bench["pretrained_rows"].update(pretrained_rows)
        return run_benchmark(bench, seeds, out, extra)


@pytest.fixture(scope="module")
def annotation_rows(small_pretrained, tmp_path_factory):
    """benchmark=annotation_demo with its three pretrained rows from the small base, one seed: the from-scratch
    fine-tune, then full / LoRA / frozen-encoder fine-tunes of the same recipe from the base."""
    out = tmp_path_factory.mktemp("annotation_rows")
    extra = [*SHORT, "logger=none", "task.umap=false", "task.write_h5ad=false"]
    result = run_bench("annotation_demo", [0], out, extra, checkpoint=str(small_pretrained), variants=VARIANTS)
    return out, result


@pytest.fixture(scope="module")
def lora_run(annotation_rows):
    return annotation_rows[0] / "pretrained" / "lora" / "seed_0"


def test_benchmark_rows_full_lora_and_frozen_from_one_checkpoint(annotation_rows, small_pretrained):
    out, result = annotation_rows
    table = (out / "benchmark.md").read_text()
    assert "## From a pretrained checkpoint" in table and str(small_pretrained) in table
    for name in ("full fine-tune", "LoRA (peft=lora)", "frozen encoder (heads only)"):
        assert f"| {name} |" in table, name
    runs = {r["variant"]: r["runs"][0] for r in result["pretrained_rows"]}
    assert runs["full"]["trainable_params"] == runs["full"]["total_params"]
    assert runs["frozen"]["trainable_params"] < runs["lora"]["trainable_params"] < runs["full"]["trainable_params"]
    # LoRA adds its adapter weights to the model; the frozen encoder is the plain model with only its heads training
    assert runs["lora"]["total_params"] > runs["full"]["total_params"] == runs["frozen"]["total_params"]
    assert runs["lora"]["checkpoint_mb"] < runs["full"]["checkpoint_mb"]
    for run in runs.values():
        assert run["peak_memory_mb"] > 0 and run["fit_s_per_step"] > 0 and run["peak_memory_kind"]
        assert (out / "pretrained").is_dir()
    frozen = json.loads((out / "pretrained" / "frozen" / "seed_0" / "metrics.json").read_text())
    assert 0 <= frozen["metrics"]["test/macro_f1"] <= 1
    assert json.loads((out / "results.json").read_text())["pretrained_rows"][1]["variant"] == "lora"
    with pytest.raises(BenchmarkConfigError, match="'dora' is not one of"):
        run_bench("annotation_demo", [0], out / "refused", [], variants=["dora"])
    assert not (out / "refused").exists()  # refused before any run


def test_lora_trains_adapters_and_heads_only_and_stores_them_with_the_base_digest(lora_run, small_pretrained):
    summary = json.loads((lora_run / "summary.json").read_text())
    ckpt = torch.load(lora_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # trainable = the checkpoint's weights: adapters + heads (this tiny base's heads are a large share of it; on the
    # demo pretraining checkpoint LoRA trains ~2%, docs/finetuning.md)
    assert summary["trainable_params"] == sum(v.numel() for v in ckpt["state_dict"].values() if v.is_floating_point())
    record = ckpt["peft"]
    base = small_pretrained
    assert record["base"] == {"path": str(base.resolve()), "sha256": adapters.checkpoint_sha256(base)}
    base_model = load_checkpoint(base)[0]
    assert record["targets"] == adapters.target_modules(base_model)  # every layer's 4 projections
    # rank r beside each adapted projection: A (r x in) + B (out x r); nothing else is a LoRA weight
    r = record["config"]["r"]
    want = sum(r * (m.in_features + m.out_features) for m in map(base_model.get_submodule, record["targets"]))
    assert sum(v.numel() for k, v in ckpt["state_dict"].items() if ".lora_" in k) == want
    assert summary["trainable_params"] < summary["total_params"]
    keys = list(ckpt["state_dict"])
    assert any(".lora_A." in k for k in keys) and any(k.startswith("model.cls_decoder.") for k in keys)
    assert not any(".base_layer." in k or k.startswith("model.gene_encoder.") for k in keys)  # the base stays out
    full = torch.load(base, map_location="cpu", weights_only=False)
    assert sum(v.numel() for v in ckpt["state_dict"].values()) < 0.5 * sum(
        v.numel() for v in full["state_dict"].values()
    )
    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert metrics["selection"]["monitor"] == "val/macro_f1"


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch.model_inputs())
    return {k: out[k] for k in ("cell_emb", "cls_output")}


def test_merged_adapters_equal_the_adapted_model_and_export_to_the_official_layout(
    lora_run, small_pretrained, tmp_path
):
    """load_checkpoint merges the adapters; the merged model computes what the adapted one does, and the exported
    official directory (scripts/export_scgpt.py) reads back through load_official with the same outputs."""
    from scgpt_train.model import ScGPT

    path = lora_run / "checkpoints" / "last.ckpt"
    merged, vocab = load_checkpoint(path)
    assert not any(".lora_" in k or "base_layer" in k for k in merged.state_dict())
    # the adapted model, unmerged: base weights + peft layers + the checkpoint's adapters and heads
    obj = torch.load(path, map_location="cpu", weights_only=False)
    adapted = ScGPT(**merged.config())
    base, _ = load_checkpoint(small_pretrained)
    adapted.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("cls_")}, strict=False)
    adapters.inject(adapted, obj["peft"]["config"], obj["peft"]["skip_layers"])
    adapted.load_state_dict({k[6:]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}, strict=False)

    g = torch.Generator().manual_seed(0)
    n_genes = len(vocab) - 3
    gene_ids = torch.randint(0, n_genes, (4, 30), generator=g)
    gene_ids[:, 0] = vocab["<cls>"]
    values = torch.randint(0, 51, (4, 30), generator=g).float()
    values[:, 0] = -2.0
    pad = torch.zeros(4, 30, dtype=torch.bool)
    pad[1, 25:] = True

    class B:
        def model_inputs(self):
            return {"gene_ids": gene_ids, "values": values, "pad_mask": pad}

    want = _outputs(adapted, B())
    got = _outputs(merged, B())
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0)
    # the adapters changed the projections (LoRA's B starts at zero: two steps moved it)
    assert any(not torch.allclose(base.state_dict()[k], v) for k, v in merged.state_dict().items() if "qkv" in k)

    spec = importlib.util.spec_from_file_location("export_scgpt", ROOT / "scripts" / "export_scgpt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "exported"
    assert script.main([str(path), "--out", str(out)]) == 0
    official = load_official(out)
    for key, value in _outputs(official, B()).items():
        torch.testing.assert_close(value, want[key], atol=1e-5, rtol=0)
    export_official(merged, vocab, tmp_path / "again")  # the library call the script makes
    assert (tmp_path / "again" / "best_model.pt").is_file()


def test_adapter_checkpoint_refuses_a_base_that_changed(lora_run, tmp_path):
    obj = torch.load(lora_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    obj["peft"]["base"]["sha256"] = "0" * 64  # as if the base file had been retrained in place
    torch.save(obj, tmp_path / "moved.ckpt")
    with pytest.raises(adapters.AdapterBaseError, match="sha256"):
        load_checkpoint(tmp_path / "moved.ckpt")
    obj["peft"]["base"]["path"] = str(tmp_path / "gone.ckpt")
    torch.save(obj, tmp_path / "gone_base.ckpt")
    with pytest.raises(adapters.AdapterBaseError, match="does not exist"):
        load_checkpoint(tmp_path / "gone_base.ckpt")


def test_resume_refuses_another_peft_setting_or_base():
    class M:
        peft = {"config": {"style": "lora", "r": 8}, "targets": ["a"], "base": {"path": "b", "sha256": "1"}}

    adapters.check_resume(M(), {"peft": dict(M.peft)})
    with pytest.raises(adapters.PeftConfigError, match="does not"):
        adapters.check_resume(M(), {"state_dict": {}})
    with pytest.raises(adapters.AdapterBaseError, match="base"):
        adapters.check_resume(M(), {"peft": {**M.peft, "base": {"path": "c", "sha256": "2"}}})
    with pytest.raises(adapters.PeftConfigError, match="differ"):
        adapters.check_resume(M(), {"peft": {**M.peft, "config": {"style": "ia3"}}})


def test_peft_without_pretrained_exits_2_with_one_message(small_corpus, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            f"data.corpus_dir={small_corpus}",
            "peft=lora",
            "trainer.max_steps=2",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pretrained=" in proc.stderr and "Traceback" not in proc.stderr


def test_ia3_fine_tune_trains_scales_only_and_freeze_layers_skips_the_first(small_pretrained, tmp_path):
    base = small_pretrained
    overrides = ["experiment=finetune_annotation_demo", "model=from_official", f"pretrained={base}"]
    train_in_process([*overrides, f"data.vocab={base}", "peft=ia3", "++model.freeze.layers=1", "logger=none", *SHORT,
                      "task.umap=false", "task.write_h5ad=false"], tmp_path)  # fmt: skip
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ia3 = [k for k in ckpt["state_dict"] if ".ia3_l." in k]
    assert len(ia3) == len(ckpt["peft"]["targets"]) > 0
    # freeze.layers=1: no adapters in layer 0 (it stays frozen with the rest of the base), adapters on the others
    assert not any(t.startswith("layers.0.") for t in ckpt["peft"]["targets"])
    assert not any(k.startswith("model.layers.0.") for k in ckpt["state_dict"])
    model, _ = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert not any(".ia3_" in k for k in model.state_dict())


def test_perturbation_lora_row_trains_the_fresh_perturbation_parts(small_pretrained, tmp_path):
    """benchmark=perturbation_demo's LoRA row from the small base: the perturbation model takes only the encoder
    from the checkpoint; its fresh flag encoder and decoder must train beside the adapters (they were frozen when
    adapters read perturbation_model's load report as if nothing were fresh)."""
    extra = [*SHORT, "logger=none", "task.cell_eval=null", "task.write_h5ad=false", "task.figures=false"]
    result = run_bench("perturbation_demo", [1], tmp_path, extra, checkpoint=str(small_pretrained), variants=["lora"])
    assert "| LoRA (peft=lora) |" in (tmp_path / "report.md").read_text()
    run = tmp_path / "pretrained" / "lora" / "seed_1"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    stored = {k[len("model.") :] for k in ckpt["state_dict"]}
    model, _ = load_checkpoint(small_pretrained)
    fresh = {k for k in stored if k.split(".")[0] not in {n.split(".")[0] for n in model.state_dict()}}
    assert fresh, sorted(stored)  # weights the base has no module for (the flag encoder) are stored: they trained
    assert any(".lora_B." in k for k in stored) and not any(k.startswith("gene_encoder.") for k in stored)
    assert 0 < result["pretrained_rows"][0]["runs"][0]["trainable_params"]


def test_lr_scale_multiplies_the_optimizer_learning_rate_or_is_refused():
    import functools

    class M:
        optimizer_factory = functools.partial(torch.optim.Adam, lr=2e-3, weight_decay=0.0)
        lr = 2e-3

    m = M()
    adapters.scale_lr(m, {"style": "lora", "lr_scale": 2.5})
    opt = m.optimizer_factory(params=[torch.nn.Parameter(torch.zeros(1))])
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3) and m.lr == pytest.approx(5e-3)
    for bad in (0, -1, "fast"):
        with pytest.raises(adapters.PeftConfigError, match="lr_scale"):
            adapters.scale_lr(M(), {"style": "lora", "lr_scale": bad})
