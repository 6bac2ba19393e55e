"""Official checkpoints in and out: export -> re-import is bitwise identical; our file; Lightning .ckpt."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES

from scgpt_train.checkpoints import (
    export_official,
    load_checkpoint,
    load_official,
    official_state_dict_to_ours,
    ours_to_official,
    save_checkpoint,
)
from scgpt_train.model import ScGPT

ROOT = Path(__file__).resolve().parents[1]


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _vocab(n: int) -> dict:
    vocab = {f"G{i}": i for i in range(n - 3)}
    vocab.update({"<pad>": n - 3, "<cls>": n - 2, "<eoc>": n - 1})
    return vocab


@pytest.mark.parametrize("sub", ["", "integration", "perturbation", "multiomic"])
def test_import_then_export_reproduces_the_released_file(tmp_path, sub):
    src = FIXTURES / sub
    model, vocab = load_official(src, return_vocab=True)
    out = export_official(model, vocab, tmp_path / "exported", args=json.loads((src / "args.json").read_text()))
    original = torch.load(src / "best_model.pt", weights_only=True)
    exported = torch.load(out / "best_model.pt", weights_only=True)
    _assert_same_weights(exported, original)
    assert json.loads((out / "vocab.json").read_text()) == vocab
    again = load_official(out)
    _assert_same_weights(again.state_dict(), model.state_dict())
    assert again.config() == model.config()


@pytest.mark.parametrize("layout", ["released", "impl", "torch"])
def test_export_reimport_is_bitwise_identical(tmp_path, layout):
    torch.manual_seed(0)
    model = ScGPT(
        vocab_size=30,
        pad_token_id=27,
        d_model=16,
        n_heads=2,
        d_ff=24,
        n_layers=3,
        n_cls=4,
        explicit_zero_prob=True,
        use_batch_labels=True,
        num_batch_labels=3,
        dsbn=True,
        do_dab=True,
        norm_scheme="pre",
        cell_emb_style="avg-pool",
        layout={"value_style": "category", "pad_value": 51, "mask_value": 52},
    )
    out = export_official(model, _vocab(30), tmp_path / layout, layout=layout)
    sd = torch.load(out / "best_model.pt", weights_only=True)
    attn = [k for k in sd if ".self_attn." in k]
    marker = {"released": ".self_attn.Wqkv.", "impl": ".self_attn._impl.", "torch": ".self_attn.in_proj_"}[layout]
    assert any(marker in k for k in attn)
    again = load_official(out)
    assert again.config() == model.config()
    assert again.load_report.missing == [] and again.load_report.ignored == []
    _assert_same_weights(again.state_dict(), model.state_dict())


def test_mapping_round_trip_and_mixed_layouts():
    model = ScGPT(vocab_size=20, pad_token_id=17, d_model=8, n_heads=2, d_ff=8, n_layers=2)
    ours = model.state_dict()
    for layout in ("released", "impl", "torch"):
        official, report = ours_to_official(ours, layout)
        assert report.ignored == []
        back, report = official_state_dict_to_ours(official)
        assert report.ignored == [] and back.keys() == ours.keys()
    official, _ = ours_to_official(ours, "released")
    official["transformer_encoder.layers.0.self_attn.in_proj_weight"] = official[
        "transformer_encoder.layers.0.self_attn.Wqkv.weight"
    ]
    with pytest.raises(ValueError, match="map twice"):
        official_state_dict_to_ours(official)


def test_shape_mismatch_is_refused_and_extra_keys_listed(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES, bad, ignore=shutil.ignore_patterns("integration", "perturbation", "multiomic"))
    args = json.loads((bad / "args.json").read_text())
    args["d_hid"] = 128
    (bad / "args.json").write_text(json.dumps(args))
    with pytest.raises(ValueError, match=r"layers\.0\.linear1\.weight.*\(64, 32\).*\(128, 32\)"):
        load_official(bad)
    args["d_hid"] = 64
    (bad / "args.json").write_text(json.dumps(args))
    sd = torch.load(bad / "best_model.pt", weights_only=True)
    sd["cce_head.weight"] = torch.zeros(3)
    torch.save(sd, bad / "best_model.pt")
    model = load_official(bad, n_cls=7)  # a fresh classifier for fine-tuning
    assert model.load_report.ignored == ["cce_head.weight"]
    assert sorted(model.load_report.missing) == sorted(k for k in model.state_dict() if k.startswith("cls_decoder."))
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        (bad / "vocab.json").unlink()
        load_official(bad)


def test_import_script_writes_a_checkpoint_load_checkpoint_reads(tmp_path):
    out = tmp_path / "scgpt_tiny.pt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "import_scgpt.py"), str(FIXTURES / "integration"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "all keys matched" in proc.stdout
    model, vocab = load_checkpoint(out)
    official = load_official(FIXTURES / "integration")
    _assert_same_weights(model.state_dict(), official.state_dict())
    assert vocab == json.loads((FIXTURES / "integration" / "vocab.json").read_text())
    exported = tmp_path / "exported"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "export_scgpt.py"),
            str(out),
            "--out",
            str(exported),
            "--layout",
            "torch",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    _assert_same_weights(load_official(exported).state_dict(), official.state_dict())


def test_save_and_load_our_checkpoint(tmp_path):
    from scgpt_train.checkpoints import load_model

    model = ScGPT(vocab_size=20, pad_token_id=17, d_model=8, n_heads=2, d_ff=8, n_layers=1, n_cls=3)
    path = save_checkpoint(model, _vocab(20), tmp_path / "m.pt")
    again, vocab = load_checkpoint(path, dropout=0.0)
    assert vocab == _vocab(20) and again.config()["dropout"] == 0.0
    _assert_same_weights(again.state_dict(), model.state_dict())
    _assert_same_weights(load_model(path, vocab_size=20, pad_token_id=17).state_dict(), model.state_dict())
    with pytest.raises(ValueError, match="vocab_size=20 but the data module gives 25"):
        load_model(path, vocab_size=25)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file
    with pytest.raises(ValueError, match="not a scgpt_train checkpoint"):
        torch.save({"weights": 1}, tmp_path / "other.pt")
        load_checkpoint(tmp_path / "other.pt")


def test_load_checkpoint_reads_a_lightning_ckpt(tmp_path):
    import pytorch_lightning as pl

    from data_modules.batch import Batch
    from scgpt_train.module import ScGPTLitModule
    from scgpt_train.objectives import GenerativeObjective

    torch.manual_seed(0)
    net = ScGPT(vocab_size=20, pad_token_id=17, d_model=8, n_heads=2, d_ff=8, n_layers=1, dropout=0.0)
    module = ScGPTLitModule(
        net=net,
        objectives={"generative": GenerativeObjective(cell_prompt_after_steps=None)},
        optimizer=partial(torch.optim.Adam, lr=1e-2),
    )
    gene_ids = torch.randint(0, 17, (4, 6))
    gene_ids[:, 0] = 18
    values = torch.randint(0, 51, (4, 6)).float()
    gen_mask = torch.zeros(4, 6, dtype=torch.bool)
    gen_mask[:, 3:] = True
    batch = Batch(
        gene_ids=gene_ids,
        values=values,
        pad_mask=torch.zeros(4, 6, dtype=torch.bool),
        target_values=values,
        gen_mask=gen_mask,
    )
    loader = torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    model, vocab = load_checkpoint(ckpt)
    assert vocab is None
    assert model.config() == net.config()
    _assert_same_weights(model.state_dict(), net.state_dict())


@pytest.mark.parametrize("version", ["as-written", "flat-layout-keys"])
def test_a_checkpoint_written_before_scgpt_config_still_loads(tmp_path, version):
    """tests/fixtures/checkpoint_v1/model.pt was written by the code before ScGPTConfig (commit ccd2ca8): it loads,
    as written and with the token layout in the flat keys of the earliest configs, into the same model (config, and
    outputs on the stored inputs within 1e-5); saved again, it is the same file content."""
    import numpy as np

    from scgpt_train.model import ScGPTConfig

    fixture = ROOT / "tests" / "fixtures" / "checkpoint_v1"
    path = fixture / "model.pt"
    stored = torch.load(path, map_location="cpu", weights_only=False)
    if version == "flat-layout-keys":
        cfg = dict(stored["model_config"])
        layout = cfg.pop("layout")
        cfg.update(n_bins=layout["n_bins"], input_emb_style=layout["value_style"], pad_value=layout["pad_value"])
        cfg.update(mask_value=layout["mask_value"], layout={"max_seq_len": layout["max_seq_len"]})
        path = tmp_path / "flat.pt"
        torch.save({**stored, "model_config": cfg}, path)
    model, vocab = load_checkpoint(path)
    assert model.config() == stored["model_config"] and vocab == stored["vocab"]
    assert model.config() == ScGPTConfig(**stored["model_config"]).to_dict()
    x = np.load(fixture / "expected.npz")
    with torch.no_grad():
        out = model.eval()(
            torch.from_numpy(x["gene_ids"]), torch.from_numpy(x["values"]), torch.from_numpy(x["pad_mask"]),
            batch_labels=torch.from_numpy(x["batch_labels"]),
        )  # fmt: skip
    for key in ("cell_emb", "cls_output", "mlm_output"):  # float32 sums differ by ~1e-7 with torch's thread count
        np.testing.assert_allclose(out[key].numpy(), x[key], rtol=0, atol=1e-5)
    again = torch.load(save_checkpoint(model, vocab, tmp_path / "again.pt"), weights_only=False)
    assert again["model_config"] == stored["model_config"]
    _assert_same_weights(again["state_dict"], stored["state_dict"])
