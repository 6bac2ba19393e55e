"""Download the paper's benchmark datasets and the whole-human checkpoint: resumable, sha256-recorded.

Each download goes to ``<file>.part`` and resumes with an HTTP ``Range`` request (a server answering 200
instead of 206 restarts it); a finished file is renamed into place and its sha256 recorded in
``<root>/checksums.json``. Later runs re-hash existing files and refuse a mismatch. Google Drive folders
are listed through their ``embeddedfolderview`` page; Drive's "can't scan for viruses" page is followed
through its confirm form. A mirror (``--mirror`` / ``$SCGPT_DOWNLOAD_MIRROR``) serves ``<mirror>/<name>/<file>``
instead of the public locations.
"""

from __future__ import annotations

import html
import os
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data_modules.atomic import atomic_path
from scgpt_train.resources import archives

CHUNK = 1 << 20
MANIFEST = "checksums.json"
GDRIVE_FILE_URL = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
GDRIVE_FOLDER_URL = "https://drive.google.com/embeddedfolderview?id={id}"
FIGSHARE_URL = "https://figshare.com/ndownloader/files/{id}"
DATAVERSE_URL = "https://dataverse.harvard.edu/api/access/datafile/{id}"
GEO_SUPPL = "https://ftp.ncbi.nlm.nih.gov/geo/series/{series}/suppl/{file}"
BMMC_CITE = "GSE194122_openproblems_neurips2021_cite_BMMC_processed.h5ad"
TENX_MULTIOME_URL = (
    "https://cf.10xgenomics.com/samples/cell-arc/2.0.0/pbmc_granulocyte_sorted_10k/"
    "pbmc_granulocyte_sorted_10k_filtered_feature_bc_matrix.h5"
)
PBMC_MULTIOME = "pbmc_granulocyte_sorted_10k.h5ad"  # what finetune_multiomic_pbmc_multiome reads
GEARS_FILE = "perturb_processed.h5ad"  # what the perturbation experiments read, extracted from each GEARS zip


class DownloadError(RuntimeError):
    pass


class ChecksumMismatch(DownloadError):
    pass


@dataclass(frozen=True)
class Entry:
    """One downloadable item: a set of files from one public location."""

    name: str
    kind: str  # gdrive_folder | gdrive_file | figshare | dataverse | scvi_pbmc | url (id = the URL)
    id: str | None
    files: tuple[str, ...]
    description: str = ""
    notes: dict = field(default_factory=dict)


REGISTRY: dict[str, Entry] = {
    e.name: e
    for e in [
        Entry(
            "scgpt_human",
            "gdrive_folder",
            "1oWh_-ZRdhtoGQ2Fw24HP41FgLoomVo-y",
            ("best_model.pt", "args.json", "vocab.json"),
            "whole-human scGPT checkpoint (33M cells); mirror: Hugging Face u-cellm/scGPT-whole-human",
        ),
        Entry(
            "ms",
            "gdrive_folder",
            "1Qd42YNabzyr2pWt9xoY4cVMTAxsNBt4v",
            ("c_data.h5ad", "filtered_ms_adata.h5ad"),
            "annotation: multiple sclerosis (reference c_data, query filtered_ms_adata)",
        ),
        Entry(
            "myeloid",
            "gdrive_folder",
            "1VbpApQufZq8efFGakW3y8QDDpY9MBoDS",
            ("reference_adata.h5ad", "query_adata.h5ad"),
            "annotation: myeloid (tumour-infiltrating)",
        ),
        Entry(
            "hpancreas",
            "gdrive_folder",
            "1s9XjcSiPC-FYV3VeHrEa7SeZetrthQVV",
            ("demo_train.h5ad", "demo_test.h5ad"),
            "annotation: human pancreas",
        ),
        Entry(
            "covid19",
            "gdrive_file",
            "1eD9LbxNJ35YUde3VtdVcjkwm-f4iyJ6x",
            ("covid19.h5ad",),
            "integration: COVID-19 (18 batches)",
        ),
        Entry(
            "perirhinal",
            "gdrive_file",
            "1rDAxDtvWx1GpJaNhlKBi71f8-psUNppE",
            ("perirhinal.h5ad",),
            "integration: perirhinal cortex (2 batches)",
        ),
        Entry("immune_human", "figshare", "25717328", ("immune_human.h5ad",), "GRN: Immune Human (scIB)"),
        *(
            Entry(
                name,
                "dataverse",
                datafile,
                (f"{name}.zip",),
                f"perturbation: {what} (GEARS processed data, Harvard Dataverse); {GEARS_FILE} is extracted",
                {"extract": GEARS_FILE},
            )
            for name, datafile, what in (
                ("adamson", "6154417", "Adamson (87 single perturbations)"),
                ("norman", "6154020", "Norman (131 pairs + 105 singles)"),
                ("replogle_k562_essential", "7458695", "Replogle K562 essential"),
                ("replogle_rpe1_essential", "7458694", "Replogle RPE1 essential"),
            )
        ),
        Entry(
            "bmmc_cite",
            "url",
            GEO_SUPPL.format(series="GSE194nnn/GSE194122", file=BMMC_CITE + ".gz"),
            (BMMC_CITE + ".gz",),
            "multi-omic: BMMC CITE-seq (RNA + 134 ADTs, 12 donors; NeurIPS 2021, GEO GSE194122); gunzipped beside it",
            {"gunzip": BMMC_CITE},
        ),
        Entry(
            "pbmc_multiome",
            "url",
            TENX_MULTIOME_URL,
            (Path(TENX_MULTIOME_URL).name,),
            "multi-omic: 10x Multiome PBMC (granulocyte-sorted 10k, RNA + ATAC); converted to an h5ad beside it",
            {"convert_10x_h5": PBMC_MULTIOME},
        ),
        Entry(
            "pbmc10k",
            "scvi_pbmc",
            None,
            ("pbmc10k.h5ad",),
            "integration: PBMC 10K via scvi-tools pbmc_dataset() (needs scvi-tools)",
        ),
    ]
}


# pure helpers (tested offline) ----------------------------------------------------------------
def parse_gdrive_folder(page: str) -> dict[str, str]:
    """{file name: file id} from a Drive ``embeddedfolderview`` page."""
    entries = re.findall(r'id="entry-([\w-]+)".*?class="flip-entry-title">([^<]*)<', page, flags=re.S)
    return {html.unescape(name).strip(): fid for fid, name in entries}


def parse_gdrive_confirm(page: str, base_url: str) -> str | None:
    """The real download URL behind Drive's virus-scan warning page (its form action + hidden inputs)."""
    form = re.search(r'<form[^>]*id="download-form"[^>]*action="([^"]+)"(.*?)</form>', page, flags=re.S)
    if form is None:
        form = re.search(r'<form[^>]*action="([^"]+)"(.*?)</form>', page, flags=re.S)
    if form is None:
        link = re.search(r'href="(/uc\?export=download[^"]+)"', page)
        return urllib.parse.urljoin(base_url, html.unescape(link.group(1))) if link else None
    action = urllib.parse.urljoin(base_url, html.unescape(form.group(1)))
    fields = re.findall(r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', form.group(2))
    return action + ("&" if "?" in action else "?") + urllib.parse.urlencode([(k, html.unescape(v)) for k, v in fields])


def parse_content_range_total(value: str | None) -> int | None:
    """Total size from a ``Content-Range: bytes a-b/total`` header."""
    m = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", value or "")
    return int(m.group(3)) if m and m.group(3) != "*" else None


# transfer --------------------------------------------------------------------------------------
def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": "scgpt-train-downloader"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def fetch(
    url: str,
    dest: str | os.PathLike,
    progress: bool = True,
    timeout: float = 60.0,
    html_handler: Callable[[str, str], str | None] | None = None,
    _depth: int = 0,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part`` (resumed with a Range request when present).

    ``html_handler(page, url)`` may turn an unexpected HTML answer into the real URL (Drive's warning page)."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    if urllib.parse.urlparse(url).scheme in ("", "file"):
        return _fetch_local(url, dest, part, start)
    try:
        resp = _open(url, start, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start > 0:  # the part already holds the whole file
            os.replace(part, dest)
            return dest
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: {e.reason} (no network? use --mirror or copy the file to {dest})") from None
    with resp:
        status = getattr(resp, "status", 200)
        ctype = resp.headers.get("Content-Type", "")
        if "text/html" in ctype and html_handler is not None and _depth < 3:
            page = resp.read(2 << 20).decode("utf-8", "replace")
            nxt = html_handler(page, url)
            if nxt is None:
                raise DownloadError(f"{url} answered an HTML page, not the file (quota exceeded or access denied?)")
            return fetch(nxt, dest, progress, timeout, html_handler, _depth + 1)
        resumed = status == 206 and start > 0
        total = parse_content_range_total(resp.headers.get("Content-Range")) if resumed else None
        if total is None:
            length = resp.headers.get("Content-Length")
            total = (int(length) + (start if resumed else 0)) if length else None
        mode = "ab" if resumed else "wb"
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=start if resumed else 0,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not progress,
            ) as bar,
        ):
            for block in iter(lambda: resp.read(CHUNK), b""):
                f.write(block)
                bar.update(len(block))
    if total is not None and part.stat().st_size != total:
        raise DownloadError(f"{url}: got {part.stat().st_size} of {total} bytes; run again to resume")
    os.replace(part, dest)
    return dest


def _fetch_local(url: str, dest: Path, part: Path, start: int) -> Path:
    src = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)) if url.startswith("file:") else Path(url)
    if not src.exists():
        raise DownloadError(f"{src} does not exist")
    with open(src, "rb") as fin, open(part, "ab" if start else "wb") as fout:
        fin.seek(start)
        for block in iter(lambda: fin.read(CHUNK), b""):
            fout.write(block)
    os.replace(part, dest)
    return dest


# entries ---------------------------------------------------------------------------------------
def gdrive_html_handler(page: str, url: str) -> str | None:
    return parse_gdrive_confirm(page, url)


def file_urls(entry: Entry, mirror: str | None = None, timeout: float = 60.0) -> dict[str, str]:
    """{file name: URL} of an entry (listing a Drive folder needs the network)."""
    if mirror:
        base = mirror.rstrip("/")
        return {f: f"{base}/{entry.name}/{f}" for f in entry.files}
    if entry.kind == "gdrive_file":
        return {entry.files[0]: GDRIVE_FILE_URL.format(id=entry.id)}
    if entry.kind == "figshare":
        return {entry.files[0]: FIGSHARE_URL.format(id=entry.id)}
    if entry.kind == "dataverse":
        return {entry.files[0]: DATAVERSE_URL.format(id=entry.id)}
    if entry.kind == "url":
        return {entry.files[0]: entry.id}
    if entry.kind == "gdrive_folder":
        url = GDRIVE_FOLDER_URL.format(id=entry.id)
        try:
            with _open(url, 0, timeout) as resp:
                listing = parse_gdrive_folder(resp.read().decode("utf-8", "replace"))
        except urllib.error.URLError as e:
            raise DownloadError(f"cannot list Google Drive folder {entry.id} ({e}); no network? use --mirror") from None
        missing = [f for f in entry.files if f not in listing]
        if missing:
            raise DownloadError(f"Google Drive folder {entry.id} lists {sorted(listing)}, not {missing}")
        return {f: GDRIVE_FILE_URL.format(id=listing[f]) for f in entry.files}
    raise DownloadError(f"{entry.name}: no URL for kind {entry.kind!r}")


def extract_member(archive: Path, name: str, dest: Path) -> Path:
    """Copy the one member of a zip archive whose file name is ``name`` (at any depth) to ``dest``, atomically."""
    return archives.extract_member(archive, name, dest, DownloadError, by_name=True)


def gunzip_file(archive: Path, name: str, dest: Path) -> Path:
    """Decompress the gzip file ``archive`` to ``dest`` atomically (``name``: the file it holds)."""
    import gzip

    try:
        with gzip.open(archive, "rb") as src, atomic_path(dest) as tmp, open(tmp, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
    except (OSError, EOFError) as e:
        raise DownloadError(f"{archive} is not a complete gzip file ({e}); delete it and download again") from None
    return dest


def convert_10x_h5(archive: Path, name: str, dest: Path) -> Path:
    """A 10x Cell Ranger (ARC) ``filtered_feature_bc_matrix.h5`` as an h5ad with every feature type
    (``var["feature_types"]``: Gene Expression / Peaks / Antibody Capture), raw counts in X."""
    import scanpy as sc

    try:
        adata = sc.read_10x_h5(archive, gex_only=False)
    except (OSError, KeyError, ValueError) as e:
        raise DownloadError(f"{archive} is not a readable 10x h5 matrix ({e}); delete it and download again") from None
    adata.var_names_make_unique()
    with atomic_path(dest, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return dest


def build_scvi_pbmc(dest: Path) -> Path:
    """PBMC 10K from scvi-tools (``scvi.data.pbmc_dataset``), written as an h5ad."""
    try:
        import scvi
    except ImportError:
        raise DownloadError(
            "pbmc10k comes from scvi-tools' pbmc_dataset(), and scvi-tools is not installed "
            "(pip install scvi-tools), or copy a pbmc10k.h5ad into place"
        ) from None
    adata = scvi.data.pbmc_dataset(save_path=str(dest.parent / "scvi_raw"))
    with atomic_path(dest, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return dest


def record(manifest: archives.Manifest, path: Path, url: str) -> str:
    """Record a fetched file in ``checksums.json`` (sha256, size, where it came from, when) and save it."""
    digest = manifest.record(path, size=Path(path).stat().st_size, url=url, recorded=time.strftime("%Y-%m-%dT%H:%M:%S"))
    manifest.save()
    return digest


def download(
    names: list[str],
    root: str | os.PathLike,
    mirror: str | None = None,
    force: bool = False,
    verify_only: bool = False,
    progress: bool = True,
    log=print,
) -> dict[str, str]:
    """Fetch (or verify) every file of the named entries under ``root/<name>/``; {relative path: status}."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise KeyError(f"unknown dataset(s) {unknown}; choose from {sorted(REGISTRY)}")
    root = Path(root)
    manifest = archives.Manifest(root, MANIFEST)
    status: dict[str, str] = {}
    for name in names:
        entry = REGISTRY[name]
        targets = {f: root / name / f for f in entry.files}
        todo = {}
        for fname, dest in targets.items():
            if dest.exists() and not force:
                status[manifest.key(dest)] = manifest.verify(dest, ChecksumMismatch)
                sha = manifest.entries[manifest.key(dest)]["sha256"]
                log(f"{name}/{fname}: {status[manifest.key(dest)]} (sha256 {sha[:12]}…)")
            elif verify_only:
                status[f"{name}/{fname}"] = "missing"
                log(f"{name}/{fname}: missing")
            else:
                todo[fname] = dest
        if not todo:
            continue
        if entry.kind == "scvi_pbmc" and not mirror:
            for dest in todo.values():
                build_scvi_pbmc(dest)
                status[manifest.key(dest)] = "downloaded"
                record(manifest, dest, "scvi.data.pbmc_dataset()")
            continue
        urls = file_urls(entry, mirror)
        for fname, dest in todo.items():
            handler = gdrive_html_handler if entry.kind.startswith("gdrive") and not mirror else None
            fetch(urls[fname], dest, progress=progress, html_handler=handler)
            digest = record(manifest, dest, urls[fname])
            status[manifest.key(dest)] = "downloaded"
            log(f"{name}/{fname}: downloaded (sha256 {digest})")
    for name in names:  # files derived next to a download: GEARS zips' member, gunzipped / converted files
        entry = REGISTRY[name]
        how = next((k for k in ("extract", "gunzip", "convert_10x_h5") if entry.notes.get(k)), None)
        if how is None:
            continue
        member = entry.notes[how]
        archive, target = root / name / entry.files[0], root / name / member
        if not archive.exists() or (target.exists() and not force):
            if target.exists():
                status[manifest.key(target)] = manifest.verify(target, ChecksumMismatch)
            continue
        {"extract": extract_member, "gunzip": gunzip_file, "convert_10x_h5": convert_10x_h5}[how](
            archive, member, target
        )
        digest = record(manifest, target, f"extracted from {entry.files[0]}")
        status[manifest.key(target)] = "extracted"
        log(f"{name}/{member}: extracted (sha256 {digest})")
    return status
