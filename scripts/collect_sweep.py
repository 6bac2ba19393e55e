"""Gather a Hydra sweep into one table.

    python scripts/collect_sweep.py outputs/<task>/multiruns/<time> [--metrics val/loss ...] [--out PREFIX]

Writes PREFIX.csv and PREFIX.md (default: <sweep dir>/sweep_results) and prints the markdown table.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scgpt_train.sweeps import collect_sweep, to_markdown, write_sweep_tables  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir")
    parser.add_argument("--metrics", nargs="*", default=None, help="metric names to keep (default: all)")
    parser.add_argument("--out", default=None, help="output prefix (default: <sweep_dir>/sweep_results)")
    args = parser.parse_args()
    try:
        table = collect_sweep(args.sweep_dir, args.metrics)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    csv_path, md_path = write_sweep_tables(table, args.out or Path(args.sweep_dir) / "sweep_results")
    print(to_markdown(table))
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
