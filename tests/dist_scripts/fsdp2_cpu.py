"""FSDP (torch's fully_shard, FSDP2) on 2 CPU processes over gloo, with a sharded DCP checkpoint.

    python tests/dist_scripts/fsdp2_cpu.py OUT_DIR

Each rank trains the same ScGPT on different cells; afterwards every rank gathers the full state
dict and writes its digest, and the sharded checkpoint is saved with torch.distributed.checkpoint.
Lightning's FSDPStrategy refuses CPU accelerators, so this drives torch's FSDP directly.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def worker(rank: int, world: int, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from scgpt_train.model import ScGPT

    torch.manual_seed(0)  # same init on every rank
    model = ScGPT(vocab_size=100, pad_token_id=97, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)  # different cells per rank
    gene_ids = torch.randint(0, 97, (8, 12), generator=gen)
    values = torch.randint(1, 51, (8, 12), generator=gen).float()
    pad_mask = torch.zeros(8, 12, dtype=torch.bool)
    losses = []
    for _ in range(6):
        out_ = model(gene_ids, values, pad_mask)
        loss = ((out_["mlm_output"] - values) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # on every rank
    digest = float(sum(v.double().sum() for v in full.values()))
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=os.path.join(out, "dcp"))
    if rank == 0:
        torch.save(full, os.path.join(out, "full_state_dict.pt"))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"losses": losses, "digest": digest}))
    dist.barrier()
    dist.destroy_process_group()
    # Everything checked is on disk. Leave without interpreter finalization: one fresh-clone run had rank 1 abort
    # there ("terminate called without an active exception", SIGABRT) while gloo / FSDP2 worker threads were torn
    # down with the interpreter (pytorch/pytorch#179291 describes this shutdown race).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(worker, args=(2, out_dir, sys.argv[2] if len(sys.argv) > 2 else "29561"), nprocs=2)
