"""Progress journal of an unfinished conversion, so a killed run continues where it stopped.

After every batch of completed shards the converter saves, atomically and in this order:
the shards, ``.journal/pending-<n_shards>.h5`` (cells read but not yet in a shard) and
``.journal/state.json`` (fingerprint of the arguments, input position, shard entries,
obs category tables, per-dataset statistics). A rerun with the same arguments reloads
that state, deletes shards the journal does not list and reads on from the position.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from data_modules.atomic import write_text_atomic
from data_modules.store.format import JOURNAL_DIR, SHARD_DIR, CorpusFormatError

STATE_NAME = "state.json"


def fingerprint(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def describe_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(keys) if keys else "(unknown)"


class Journal:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.dir = self.out / JOURNAL_DIR

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_NAME

    def exists(self) -> bool:
        return self.state_path.exists()

    def load(self, fp: str, params: dict) -> dict | None:
        """The saved state if it belongs to the same arguments; raises if it belongs to others."""
        if not self.exists():
            return None
        state = json.loads(self.state_path.read_text())
        if state["fingerprint"] != fp:
            raise CorpusFormatError(
                f"{self.out} holds an unfinished conversion started with different arguments "
                f"(differs in: {describe_difference(state.get('params', {}), params)}); rerun the original "
                "command to resume it, or pass --overwrite to discard it and start over"
            )
        return state

    def pending_path(self, state: dict) -> Path | None:
        name = state.get("pending")
        return self.dir / name if name else None

    def save(self, fp: str, params: dict, position: list[int], writer, stats: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"pending-{len(writer.shards):06d}.h5"
        writer.save_pending(self.dir / name)
        state = {
            "fingerprint": fp,
            "params": params,
            "position": position,
            "writer": writer.state(),
            "stats": stats,
            "pending": name,
        }
        write_text_atomic(self.state_path, json.dumps(state))
        for p in self.dir.glob("pending-*.h5"):
            if p.name != name:
                p.unlink()

    def start(self, fp: str, params: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def remove_unlisted_shards(out: Path, shards: list[dict]) -> list[str]:
    """Delete shard files (and temp files) that no completed step lists; check the listed ones exist."""
    listed = {s["path"] for s in shards}
    removed = []
    shard_dir = out / SHARD_DIR
    if shard_dir.exists():
        for p in shard_dir.iterdir():
            rel = f"{SHARD_DIR}/{p.name}"
            if rel not in listed:
                p.unlink()
                removed.append(rel)
    for s in shards:
        p = out / s["path"]
        if not p.exists() or p.stat().st_size != s["bytes"]:
            raise CorpusFormatError(
                f"{p}: the journal lists this shard as complete but it is missing or has the wrong size; "
                "the output directory was modified: pass --overwrite to start over"
            )
    return removed
