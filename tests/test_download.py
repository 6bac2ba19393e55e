"""Benchmark downloads, offline: a local HTTP server with Range support, file:// URLs, parsing, checksums."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import threading

import pytest
from conftest import ROOT, run_cmd

from scgpt_train.resources import download as dl


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path]``; honours ``Range: bytes=N-`` unless ``server.ignore_range``."""

    def do_GET(self):  # noqa: N802
        body = self.server.files.get(self.path)
        self.server.requests.append((self.path, self.headers.get("Range")))
        if body is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].rstrip("-")) if rng and not self.server.ignore_range else 0
        if start >= len(body) and rng:
            self.send_response(416)
            self.end_headers()
            return
        chunk = body[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Type", self.server.content_types.get(self.path, "application/octet-stream"))
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        self.wfile.write(chunk)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    srv.files, srv.requests, srv.content_types, srv.ignore_range = {}, [], {}, False
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv, path):
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def test_resumes_a_partial_download_with_a_range_request(server, tmp_path):
    body = bytes(range(256)) * 4000
    server.files["/f.bin"] = body
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(body[:300_000])  # an interrupted earlier run
    dl.fetch(url(server, "/f.bin"), dest, progress=False)
    assert dest.read_bytes() == body and not (tmp_path / "f.bin.part").exists()
    assert server.requests[-1] == ("/f.bin", "bytes=300000-")


def test_a_server_ignoring_range_restarts_the_file(server, tmp_path):
    body = b"0123456789" * 1000
    server.files["/f.bin"], server.ignore_range = body, True
    (tmp_path / "f.bin.part").write_bytes(b"garbage")
    dl.fetch(url(server, "/f.bin"), tmp_path / "f.bin", progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body


def test_complete_part_answered_416_is_accepted(server, tmp_path):
    body = b"abc" * 100
    server.files["/f.bin"] = body
    (tmp_path / "f.bin.part").write_bytes(body)
    dl.fetch(url(server, "/f.bin"), tmp_path / "f.bin", progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body


def test_file_urls_resume_too(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 5000 + b"y" * 5000)
    (tmp_path / "out.bin.part").write_bytes(b"x" * 5000)
    dl.fetch(src.as_uri(), tmp_path / "out.bin", progress=False)
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()


def test_google_drive_warning_page_is_followed(server, tmp_path):
    body = b"h5ad-bytes" * 500
    server.files["/download?id=ABC&export=download&confirm=t&uuid=u-1"] = body
    page = (
        b'<html><body><form id="download-form" action="/download" method="get">'
        b'<input type="hidden" name="id" value="ABC"><input type="hidden" name="export" value="download">'
        b'<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-1">'
        b"</form></body></html>"
    )
    server.files["/start"] = page
    server.content_types["/start"] = "text/html; charset=utf-8"
    dl.fetch(url(server, "/start"), tmp_path / "x.h5ad", progress=False, html_handler=dl.gdrive_html_handler)
    assert (tmp_path / "x.h5ad").read_bytes() == body


def test_parse_google_drive_folder_listing():
    page = (
        '<div class="flip-entry" id="entry-1AbC_d-9" tabindex="0"><a href="https://drive.google.com/file/d/'
        '1AbC_d-9/view"><div class="flip-entry-title">c_data.h5ad</div></a></div>'
        '<div class="flip-entry" id="entry-2XyZ"><div class="flip-entry-title">filtered_ms_adata.h5ad</div></div>'
    )
    assert dl.parse_gdrive_folder(page) == {"c_data.h5ad": "1AbC_d-9", "filtered_ms_adata.h5ad": "2XyZ"}
    assert dl.parse_content_range_total("bytes 10-99/100") == 100
    assert dl.parse_content_range_total("bytes 10-99/*") is None


def test_registry_names_the_paper_locations():
    assert dl.REGISTRY["ms"].id == "1Qd42YNabzyr2pWt9xoY4cVMTAxsNBt4v"
    assert dl.REGISTRY["scgpt_human"].files == ("best_model.pt", "args.json", "vocab.json")
    assert dl.file_urls(dl.REGISTRY["immune_human"]) == {
        "immune_human.h5ad": "https://figshare.com/ndownloader/files/25717328"
    }
    assert "1eD9LbxNJ35YUde3VtdVcjkwm-f4iyJ6x" in dl.file_urls(dl.REGISTRY["covid19"])["covid19.h5ad"]


def download_main():
    """scripts/download_benchmarks.py's ``main(argv) -> exit code``, loaded in this process."""
    spec = importlib.util.spec_from_file_location("download_benchmarks", ROOT / "scripts" / "download_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_records_sha256_then_verifies_and_refuses_a_changed_file(server, tmp_path, capsys):
    """The first download runs the script as a program; the later runs call its main() in this process (the
    script imports torch and Lightning through scgpt_train.tasks: ~8 s of imports per interpreter)."""
    ref, query = b"reference" * 1000, b"query" * 2000
    server.files["/mirror/hpancreas/demo_train.h5ad"] = ref
    server.files["/mirror/hpancreas/demo_test.h5ad"] = query
    root = tmp_path / "bench"
    args = ["hpancreas", "--root", str(root), "--mirror", url(server, "/mirror"), "--quiet"]
    run_cmd(["scripts/download_benchmarks.py", *args])
    manifest = json.loads((root / "checksums.json").read_text())
    assert manifest["hpancreas/demo_train.h5ad"]["sha256"] == hashlib.sha256(ref).hexdigest()
    assert manifest["hpancreas/demo_test.h5ad"]["size"] == len(query)
    n_requests = len(server.requests)
    main = download_main()
    capsys.readouterr()
    assert main(args) == 0  # second run: verified, nothing fetched
    assert len(server.requests) == n_requests and "demo_train.h5ad: ok" in capsys.readouterr().out
    (root / "hpancreas" / "demo_test.h5ad").write_bytes(b"tampered")
    assert main(args) == 1
    assert "differs from the recorded" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0  # a forced download repairs it and re-records
    assert (root / "hpancreas" / "demo_test.h5ad").read_bytes() == query


def test_unknown_name_and_missing_network_are_clear(tmp_path):
    with pytest.raises(KeyError, match="unknown dataset"):
        dl.download(["nope"], tmp_path)
    with pytest.raises(dl.DownloadError, match="does not exist"):
        dl.fetch((tmp_path / "absent").as_uri(), tmp_path / "x", progress=False)
    status = dl.download(["ms"], tmp_path, verify_only=True, log=lambda *_: None)
    assert status == {"ms/c_data.h5ad": "missing", "ms/filtered_ms_adata.h5ad": "missing"}


def test_gears_dataverse_archive_is_fetched_extracted_and_checked(tmp_path):
    """The GEARS Perturb-seq zips (Harvard Dataverse ids in the registry): downloaded (here from a local mirror),
    perturb_processed.h5ad extracted beside the zip, both sha256 recorded on first download and checked after."""
    import zipfile

    assert dl.file_urls(dl.REGISTRY["norman"]) == {"norman.zip": dl.DATAVERSE_URL.format(id="6154020")}
    mirror = tmp_path / "mirror" / "adamson"
    mirror.mkdir(parents=True)
    with zipfile.ZipFile(mirror / "adamson.zip", "w") as zf:
        zf.writestr("adamson/perturb_processed.h5ad", b"GEARS processed cells")
        zf.writestr("adamson/cell_graphs.pkl", b"other")
    root = tmp_path / "benchmarks"
    status = dl.download(["adamson"], root, mirror=str(tmp_path / "mirror"), progress=False, log=lambda *_: None)
    assert status == {"adamson/adamson.zip": "downloaded", "adamson/perturb_processed.h5ad": "extracted"}
    assert (root / "adamson" / "perturb_processed.h5ad").read_bytes() == b"GEARS processed cells"
    recorded = json.loads((root / "checksums.json").read_text())
    expected = hashlib.sha256(b"GEARS processed cells").hexdigest()
    assert recorded["adamson/perturb_processed.h5ad"]["sha256"] == expected
    again = dl.download(["adamson"], root, mirror=str(tmp_path / "mirror"), progress=False, log=lambda *_: None)
    assert set(again.values()) == {"ok"}
    (root / "adamson" / "perturb_processed.h5ad").write_bytes(b"changed")
    with pytest.raises(dl.ChecksumMismatch, match="perturb_processed.h5ad"):
        dl.download(["adamson"], root, mirror=str(tmp_path / "mirror"), progress=False, log=lambda *_: None)


def test_one_extract_member_reads_wheels_and_sdists_and_one_manifest_both_record_files(tmp_path):
    """scgpt_train/resources/archives.py: the zip (wheel / GEARS zip) and tar (sdist) paths of extract_member,
    by member path and by file name, its errors, and a Manifest reading resources.json's ``files`` section."""
    import tarfile
    import zipfile

    from scgpt_train.resources.archives import Manifest, extract_member, file_sha256

    (tmp_path / "a.txt").write_text("alpha\n")
    with zipfile.ZipFile(tmp_path / "w.whl", "w") as z:
        z.write(tmp_path / "a.txt", "pkg/data/a.txt")
    with tarfile.open(tmp_path / "s.tar.gz", "w:gz") as t:
        t.add(tmp_path / "a.txt", "pkg-1.0/tests/a.txt")
    for archive, member, by_name in (("w.whl", "pkg/data/a.txt", False), ("s.tar.gz", "a.txt", True)):
        out = extract_member(tmp_path / archive, member, tmp_path / f"out_{archive}.txt", by_name=by_name)
        assert out.read_text() == "alpha\n"
    with pytest.raises(KeyError, match=r"w\.whl: expected one pkg/b\.txt inside, found none"):
        extract_member(tmp_path / "w.whl", "pkg/b.txt", tmp_path / "b.txt", KeyError)
    with pytest.raises(KeyError, match=r"a\.txt is not a readable tar archive"):
        extract_member(tmp_path / "a.txt", "x", tmp_path / "x.txt", KeyError)
    assert not (tmp_path / "b.txt").exists() and not (tmp_path / "x.txt").exists()

    old = {"files": {"a.txt": {"sha256": file_sha256(tmp_path / "a.txt"), "source": "s"}}}  # as fetch_* wrote it
    (tmp_path / "resources.json").write_text(json.dumps(old, indent=1))
    m = Manifest(tmp_path, "resources.json", section="files")
    assert m.is_current(tmp_path / "a.txt") and not m.is_current(tmp_path / "out_w.whl.txt")
    m.record(tmp_path / "out_w.whl.txt", source="w.whl")
    m.save()
    assert set(Manifest(tmp_path, "resources.json", "files").entries) == {"a.txt", "out_w.whl.txt"}
    links = tmp_path / "links"  # a cache whose files are links into another one (the docs-commands workspace)
    links.mkdir()
    (links / "a.txt").symlink_to(tmp_path / "a.txt")
    linked = Manifest(links, "resources.json", "files")
    linked.record(links / "a.txt", source="link")
    assert list(linked.entries) == ["a.txt"] and linked.is_current(links / "a.txt")
    (tmp_path / "a.txt").write_text("changed\n")
    with pytest.raises(KeyError, match="a.txt: sha256 .* differs from the recorded"):
        m.verify(tmp_path / "a.txt", KeyError)
