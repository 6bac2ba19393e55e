"""One DDP rank of a stream test: joins a gloo process group, iterates the train stream with
real dataloader workers, optionally resumes from / saves a state, and writes what it yielded.

usage: python tests/helpers/stream_rank.py CONFIG_JSON RANK
CONFIG_JSON keys: corpus, world_size, port, num_workers, batch_size, block_size, buffer_blocks,
lanes, seed, out_dir, load_state (path or null), stop_after (batches or null), tokenizer (dict).
Writes out_dir/rank{RANK}.npz (cell_index per batch, batch lengths) and, on rank 0, the
loader state after stop_after batches as out_dir/state.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402

from data_modules.stream import CellStream, StreamLoader  # noqa: E402


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    rank = int(sys.argv[2])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg["port"]))
    dist.init_process_group("gloo", rank=rank, world_size=cfg["world_size"])
    stream = CellStream(
        cfg["corpus"],
        "train",
        cfg["batch_size"],
        tokenizer=cfg.get("tokenizer"),
        block_size=cfg["block_size"],
        buffer_blocks=cfg["buffer_blocks"],
        lanes=cfg["lanes"],
        seed=cfg["seed"],
    )
    loader = StreamLoader(stream, num_workers=cfg["num_workers"])
    if cfg.get("load_state"):
        loader.load_state_dict(json.loads(Path(cfg["load_state"]).read_text()))
    batches, stop = [], cfg.get("stop_after")
    for batch in loader:
        batches.append(batch.cell_index.numpy())
        if stop is not None and len(batches) == stop:
            break
    out = Path(cfg["out_dir"])
    if rank == 0 and stop is not None:
        (out / "state.json").write_text(json.dumps(loader.state_dict()))
    lengths = np.array([len(b) for b in batches], dtype=np.int64)
    cells = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    np.savez(out / f"rank{rank}.npz", cells=cells, lengths=lengths)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
