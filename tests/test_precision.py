"""``--precision auto|fp32|bf16`` (scgpt_train/precision.py): auto picks bf16 only where the processor computes it
natively, detected from cpuinfo flags (real parsing of written cpuinfo files) or the GPU's support (mocked)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from scgpt_train.precision import PrecisionError, cpu_bf16_flags, resolve_precision

X86_NATIVE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
X86_PLAIN = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"


@pytest.fixture
def cpuinfo(tmp_path):
    def write(text: str):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return path

    return write


def test_auto_on_a_cpu_with_native_bf16_chooses_bf16(cpuinfo):
    p = resolve_precision("auto", "cpu", cpuinfo(X86_NATIVE))
    assert p.name == "bf16" and p.dtype == torch.bfloat16
    assert "avx512_bf16" in p.reason and "amx_bf16" in p.reason and p.reason.startswith("auto -> bf16")


def test_auto_never_chooses_bf16_without_native_support(cpuinfo, tmp_path):
    for info in (cpuinfo(X86_PLAIN), tmp_path / "unreadable"):
        p = resolve_precision("auto", "cpu", info)
        assert p.name == "fp32" and p.dtype is None and "no native bf16" in p.reason
    # an ARM CPU is read from its Features line; an x86 flag name there does not count
    arm = cpuinfo("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_bf16_flags(arm, machine="aarch64") == ["bf16"]
    assert cpu_bf16_flags(cpuinfo("Features\t: fp asimd avx512_bf16\n"), machine="aarch64") == []


def test_explicit_settings(cpuinfo, caplog):
    assert resolve_precision("fp32", "cpu", cpuinfo(X86_NATIVE)).name == "fp32"
    with caplog.at_level(logging.WARNING):
        p = resolve_precision("bf16", "cpu", cpuinfo(X86_PLAIN))
    assert p.name == "bf16" and "emulated" in caplog.text  # asked for: honoured, never silently
    with pytest.raises(PrecisionError, match="'fp16' is not one of"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_the_gpus_support(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert resolve_precision("auto", "cuda", "/nonexistent").name == expected


def test_autocast_runs_the_forward_in_the_chosen_dtype(cpuinfo):
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with resolve_precision("auto", "cpu", cpuinfo(X86_NATIVE)).autocast("cpu"):
        assert layer(x).dtype == torch.bfloat16
    with resolve_precision("auto", "cpu", cpuinfo(X86_PLAIN)).autocast("cpu"):
        assert layer(x).dtype == torch.float32


def test_trainer_cpu_bf16_fits_a_step_in_bf16_mixed_precision(demo_corpus, tmp_path):
    """trainer=cpu_bf16 composes to a CPU trainer with precision bf16-mixed, and Lightning fits a step with it."""
    from conftest import ROOT, demo_overrides, train_in_process
    from hydra import compose, initialize_config_dir

    overrides = demo_overrides(
        demo_corpus, "trainer=cpu_bf16", "model=demo_tiny", "layout.max_seq_len=65", "data.batch_size=8",
        "data.val_batch_size=8", "trainer.max_steps=1", "trainer.limit_val_batches=1", "data.num_workers=0",
    )  # fmt: skip
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "bf16-mixed"
    train_in_process(overrides, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 1
