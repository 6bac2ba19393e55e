"""PEFT (peft=lora / ia3, scgpt_train/adapters.py): adapters on a pretrained model's projections, adapter-only
checkpoints bound to their base by sha256, merged export to the official layout, DDP with adapters, refusals.

The base is a short generative pretraining on conftest's small corpus (pbmc68k_reduced's 256 most detected genes);
the fine-tunes are the annotation demo (real pbmc68k cells) on that base's vocabulary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_cmd, train_in_process

from scgpt_train import adapters
from scgpt_train.checkpoints import export_official, load_checkpoint, load_official


@pytest.fixture(scope="module")
def base_ckpt(small_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("peft_base")
    train_in_process(
        [f"data.corpus_dir={small_corpus}", "trainer.max_steps=4", "trainer.val_check_interval=4", "logger=none"], run
    )
    return run / "checkpoints" / "last.ckpt"


def finetune_args(base, *extra: str) -> list[str]:
    return [
        "experiment=finetune_annotation_demo",
        "model=from_official",
        f"pretrained={base}",
        f"data.vocab={base}",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=4",
        "logger=none",
        *extra,
    ]


@pytest.fixture(scope="module")
def lora_run(base_ckpt, tmp_path_factory):
    run = tmp_path_factory.mktemp("peft_lora")
    train_in_process(finetune_args(base_ckpt, "peft=lora", "+model.freeze.layers=1"), run)
    return run


def test_lora_trains_adapters_and_heads_only_and_stores_them_with_the_base_digest(lora_run, base_ckpt):
    summary = json.loads((lora_run / "summary.json").read_text())
    ckpt = torch.load(lora_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # trainable = the checkpoint's weights: adapters + heads (this small base's heads are a large share of it; on the
    # demo pretraining checkpoint LoRA trains ~2%, docs/finetuning.md)
    assert summary["trainable_params"] == sum(v.numel() for v in ckpt["state_dict"].values() if v.is_floating_point())
    n_lora = sum(v.numel() for k, v in ckpt["state_dict"].items() if ".lora_" in k)
    assert 0 < n_lora < 0.1 * summary["total_params"] and summary["trainable_params"] < summary["total_params"] / 4
    record = ckpt["peft"]
    assert record["base"] == {"path": str(base_ckpt.resolve()), "sha256": adapters.checkpoint_sha256(base_ckpt)}
    # freeze.layers=1: no adapters in layer 0, adapters on every projection of the others
    assert record["targets"] and not any(t.startswith("layers.0.") for t in record["targets"])
    keys = list(ckpt["state_dict"])
    assert any(".lora_A." in k for k in keys) and any(k.startswith("model.cls_decoder.") for k in keys)
    assert not any(".base_layer." in k or k.startswith("model.gene_encoder.") for k in keys)  # the base stays out
    assert not any(k.startswith("model.layers.0.") for k in keys)
    full = torch.load(base_ckpt, map_location="cpu", weights_only=False)
    assert sum(v.numel() for v in ckpt["state_dict"].values()) < 0.25 * sum(
        v.numel() for v in full["state_dict"].values()
    )
    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert metrics["selection"]["monitor"] == "val/macro_f1"


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch.model_inputs())
    return {k: out[k] for k in ("cell_emb", "cls_output")}


def test_merged_adapters_equal_the_adapted_model_and_export_to_the_official_layout(lora_run, base_ckpt, tmp_path):
    """load_checkpoint merges the adapters; the merged model computes what the adapted one does, and the exported
    official directory (scripts/export_scgpt.py) reads back through load_official with the same outputs."""
    from scgpt_train.model import ScGPT

    path = lora_run / "checkpoints" / "last.ckpt"
    merged, vocab = load_checkpoint(path)
    assert not any(".lora_" in k or "base_layer" in k for k in merged.state_dict())
    # the adapted model, unmerged: base weights + peft layers + the checkpoint's adapters and heads
    obj = torch.load(path, map_location="cpu", weights_only=False)
    adapted = ScGPT(**merged.config())
    base, _ = load_checkpoint(base_ckpt)
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
    assert any(not torch.allclose(base.state_dict()[k], v) for k, v in merged.state_dict().items() if "qkv" in k)

    out = tmp_path / "exported"
    rc = subprocess.run(
        [sys.executable, "scripts/export_scgpt.py", str(path), "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert rc.returncode == 0, rc.stderr[-3000:]
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


def test_ia3_fine_tune_trains_scales_only(base_ckpt, tmp_path):
    train_in_process(finetune_args(base_ckpt, "peft=ia3"), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ia3 = [k for k in ckpt["state_dict"] if ".ia3_l." in k]
    assert len(ia3) == len(ckpt["peft"]["targets"]) > 0
    model, _ = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert not any(".ia3_" in k for k in model.state_dict())


@pytest.mark.slow
def test_ddp_with_lora_keeps_replicas_identical(small_corpus, base_ckpt, tmp_path):
    """Continued generative pretraining with LoRA over 2 gloo ranks: the adapters all-reduce like any weight."""
    run_cmd(
        [
            "train.py",
            "trainer=ddp_cpu",
            "model=from_official",
            f"pretrained={base_ckpt}",
            "peft=lora",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            f"data.corpus_dir={small_corpus}",
            f"hydra.run.dir={tmp_path}",
            "+callbacks.replica_check._target_=scgpt_train.fault_tolerance.ReplicaConsistencyCheck",
            "+callbacks.replica_check.path=${paths.output_dir}/replica_check.json",
        ]
    )
    assert json.loads((tmp_path / "replica_check.json").read_text())["identical"] is True
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["peft"]["config"]["style"] == "lora" and any(".lora_B." in k for k in ckpt["state_dict"])
    lora_b = [v for k, v in ckpt["state_dict"].items() if ".lora_B." in k]
    assert any(float(v.abs().max()) > 0 for v in lora_b)  # LoRA's B starts at zero: it trained
