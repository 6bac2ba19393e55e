"""Multi-process training on CPU with real processes: DDP (gloo) inside a Hydra sweep, DeepSpeed ZeRO-2
through Lightning (CPUDeepSpeedStrategy), torch FSDP2, a submitit-local sweep, checkpoint consolidation. The runs
train on conftest's small corpus (~260-token vocabulary): what is tested is the processes, not the data."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cmd

REPLICA_CHECK = [
    "+callbacks.replica_check._target_=scgpt_train.fault_tolerance.ReplicaConsistencyCheck",
    "+callbacks.replica_check.path=${paths.output_dir}/replica_check.json",
]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train_on_two_ranks(
    trainer: str, out: Path, corpus: Path, *overrides: str, sweep: bool = False
) -> subprocess.CompletedProcess:
    """``python train.py trainer=TRAINER`` (2 CPU ranks) on ``corpus`` with the replica check, in run dir ``out``
    (with ``sweep``: a ``--multirun`` whose jobs are ``out/0``, ``out/1``, ...); every job's two ranks must end
    with identical weights. Returns the finished process. Torch's C++ extensions are built, if at all, into an
    empty ``OUT-torch_extensions`` (see ``extensions_built``), not into ~/.cache/torch_extensions."""
    where = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    proc = run_cmd(
        [
            "train.py",
            *(["--multirun"] if sweep else []),
            f"trainer={trainer}",
            *overrides,
            f"data.corpus_dir={corpus}",
            f"{where}={out}",
            *REPLICA_CHECK,
        ],
        env={"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions_dir(out))},
    )
    for job in sorted(p for p in out.iterdir() if p.is_dir() and p.name.isdigit()) if sweep else [out]:
        check = json.loads((job / "replica_check.json").read_text())
        assert check == {"world_size": 2, "identical": True, "digests": check["digests"]}, job
    return proc


def extensions_dir(out: Path) -> Path:
    return out.with_name(f"{out.name}-torch_extensions")


def extensions_built(out: Path) -> list[str]:
    """The C++ extensions (shared libraries) that the run in ``out`` compiled."""
    return sorted(p.name for p in extensions_dir(out).rglob("*.so"))


def consolidated(run_dir: Path, monkeypatch) -> Path:
    """A DeepSpeed run's sharded last.ckpt consolidated into one file, in this process (scripts/
    consolidate_checkpoint.py, a thin wrapper around the same function, runs on the FSDP checkpoint below)."""
    from scgpt_train.checkpoints.consolidate import consolidate_checkpoint

    sharded = run_dir / "checkpoints" / "last.ckpt"
    assert sharded.is_dir()  # ZeRO shards
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    return consolidate_checkpoint(sharded, run_dir / "consolidated.ckpt")


def test_ddp_sweep_two_jobs_two_ranks_identical_weights(small_corpus, tmp_path):
    """2 sweep jobs x 2 DDP ranks (gloo) with Hydra's basic launcher: the known trap (child ranks
    re-executing the whole sweep) must not happen, and both ranks end with identical weights."""
    overrides = ["trainer.max_steps=3", "trainer.val_check_interval=3", "seed=1,2"]
    proc = train_on_two_ranks("ddp_cpu", tmp_path, small_corpus, *overrides, sweep=True)  # replicas identical
    output = proc.stdout + proc.stderr
    assert output.count("Launching 2 jobs locally") == 1, "a child rank re-executed the sweep"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        summary = json.loads((tmp_path / job / "summary.json").read_text())
        assert summary["steps"] == 3 and summary["cells_seen"] == 3 * 16 * 2
    run_cmd(["scripts/collect_sweep.py", str(tmp_path)])
    table = (tmp_path / "sweep_results.csv").read_text().splitlines()
    assert len(table) == 3 and "seed" in table[0] and "val/loss" in table[0]


def test_deepspeed_zero2_on_cpu_trains_and_consolidates(small_corpus, tmp_path, monkeypatch):
    """Lightning + DeepSpeed ZeRO-2 on 2 CPU ranks (scgpt_train.strategies.CPUDeepSpeedStrategy: Lightning's
    own DeepSpeedStrategy refuses CPU); the sharded checkpoint consolidates into one loadable file. The
    consolidation runs in this process (scripts/consolidate_checkpoint.py, a thin wrapper around the same
    function, runs on the FSDP checkpoint below and refuses a plain file in the last test). DeepSpeed compiles
    nothing (CPUDeepSpeedStrategy skips the shared-memory all-reduce op that only tensor-parallel inference uses):
    no ~30 s build of deepspeed_shm_comm on a fresh machine, no build lock to be left behind by a kill."""
    train_on_two_ranks("deepspeed_cpu", tmp_path, small_corpus, "trainer.max_steps=4", "trainer.val_check_interval=4")
    assert extensions_built(tmp_path) == []
    sharded = tmp_path / "checkpoints" / "last.ckpt"
    assert sharded.is_dir() and len(list((sharded / "checkpoint").glob("*optim_states.pt"))) == 2  # ZeRO shards
    from scgpt_train.checkpoints import load_checkpoint

    out = consolidated(tmp_path, monkeypatch)

    model, vocab = load_checkpoint(out)
    assert model.load_report.missing == [] and len(vocab) == model.config()["vocab_size"]
    assert torch.load(out, map_location="cpu", weights_only=False)["global_step"] == 4


def test_fsdp2_on_cpu_shards_trains_and_consolidates(tmp_path):
    run_cmd(["tests/dist_scripts/fsdp2_cpu.py", str(tmp_path), free_port()])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # one model, sharded over two ranks
    for r in ranks:
        assert r["losses"][-1] < r["losses"][0]
    out = tmp_path / "consolidated.pt"
    run_cmd(["scripts/consolidate_checkpoint.py", str(tmp_path / "dcp"), "--out", str(out)])
    consolidated = torch.load(out, map_location="cpu", weights_only=False)["model"]
    full = torch.load(tmp_path / "full_state_dict.pt", map_location="cpu", weights_only=False)
    assert consolidated.keys() == full.keys() and all(torch.equal(consolidated[k], full[k]) for k in full)


def test_submitit_local_sweep_is_collected(small_corpus, tmp_path):
    run_cmd(
        [
            "train.py",
            "--multirun",
            "hydra/launcher=local",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "model.lr=1e-3,3e-4",
            f"data.corpus_dir={small_corpus}",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    proc = run_cmd(["scripts/collect_sweep.py", str(tmp_path), "--metrics", "val/loss", "train/loss"])
    assert "| job | model.lr |" in proc.stdout
    rows = (tmp_path / "sweep_results.csv").read_text().splitlines()
    assert len(rows) == 3
    header = rows[0].split(",")
    lrs = sorted(float(r.split(",")[header.index("model.lr")]) for r in rows[1:])
    assert lrs == [3e-4, 1e-3]


def test_consolidate_refuses_a_plain_file(tmp_path):
    plain = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(AssertionError, match="already a single-file checkpoint"):
        run_cmd(["scripts/consolidate_checkpoint.py", str(plain), "--out", str(tmp_path / "y")])
    assert ROOT.exists()


@pytest.mark.parametrize("trainer", ["ddp_cpu", "deepspeed_cpu"])
def test_lora_under_ddp_and_deepspeed_on_cpu_trains_and_its_adapter_checkpoint_loads(
    trainer, small_pretrained, small_corpus, tmp_path, monkeypatch
):
    """peft=lora over 2 gloo ranks, under DDP and under DeepSpeed ZeRO-2 (CPUDeepSpeedStrategy): continued
    generative training of conftest's small pretrained checkpoint for 2 steps. The adapters all-reduce like any
    weight (replicas identical), and the adapter checkpoint (DeepSpeed's consolidated first) loads through
    load_checkpoint: base read back by path + sha256, adapters merged, LoRA's B moved from its zero start."""
    from scgpt_train.checkpoints import load_checkpoint

    train_on_two_ranks(
        trainer,
        tmp_path,
        small_corpus,
        "model=from_official",
        f"pretrained={small_pretrained}",
        "peft=lora",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "+trainer.limit_val_batches=1",
        "validate_before_fit=false",
        "logger=none",
        "callbacks.progress_bar=null",
    )  # replicas identical
    last = tmp_path / "checkpoints" / "last.ckpt"
    if trainer == "deepspeed_cpu":
        last = consolidated(tmp_path, monkeypatch)
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["peft"]["config"]["style"] == "lora" and ckpt["global_step"] == 2
    lora_b = [v for k, v in ckpt["state_dict"].items() if ".lora_B." in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)  # LoRA's B starts at zero: it trained
    model, vocab = load_checkpoint(last)
    assert not any(".lora_" in k or "base_layer" in k for k in model.state_dict()) and len(vocab) > 250
