"""Consolidate a sharded checkpoint into one file.

    python scripts/consolidate_checkpoint.py outputs/<task>/runs/<run>/checkpoints/last.ckpt --out model.ckpt

Accepts DeepSpeed ZeRO checkpoint directories (Lightning's deepspeed presets) and
torch.distributed.checkpoint directories (FSDP). The output loads with ``ckpt_path=``-style tools,
``scgpt_train.checkpoints.load_checkpoint`` and ``scripts/export_scgpt.py``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scgpt_train.checkpoints.consolidate import consolidate_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="sharded checkpoint directory")
    parser.add_argument("--out", required=True, help="output file")
    args = parser.parse_args()
    try:
        out = consolidate_checkpoint(args.checkpoint, args.out)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
