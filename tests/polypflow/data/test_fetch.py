"""Dataset sources: resumable, verified HTTP download against a local server; traversal-safe extraction."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_server import FileServer

from polypflow.data.fetch import SourceError, download, extract

pytestmark = pytest.mark.quick

PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        srv.files["data.bin"] = PAYLOAD
        yield srv


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def make_tar(path: Path, entries: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> Path:
    """``entries``: regular files; ``links``: name -> (tarfile type, link target)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return path


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# --- download -------------------------------------------------------------------------------------------


def test_download_verifies_and_places_the_file(server, tmp_path):
    target = tmp_path / "dl" / "data.bin"
    assert download(server.url("data.bin"), target, SHA) == target
    assert target.read_bytes() == PAYLOAD
    assert not target.with_name("data.bin.part").exists()
    assert server.ranges == [None]  # a fresh download asks for the whole file


def test_download_skips_a_verified_target(server, tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(PAYLOAD)
    download(server.url("data.bin"), target, SHA)
    assert server.ranges == []


def test_wrong_sha256_names_the_url_and_leaves_nothing(server, tmp_path):
    target = tmp_path / "data.bin"
    url = server.url("data.bin")
    with pytest.raises(SourceError, match="sha256 mismatch") as err:
        download(url, target, "0" * 64)
    assert url in str(err.value)
    assert not target.exists()
    assert not target.with_name("data.bin.part").exists()


def test_resume_requests_the_rest_and_verifies(server, tmp_path):
    target = tmp_path / "data.bin"
    half = len(PAYLOAD) // 2
    target.with_name("data.bin.part").write_bytes(PAYLOAD[:half])
    download(server.url("data.bin"), target, SHA)
    assert server.ranges == [f"bytes={half}-"]
    assert target.read_bytes() == PAYLOAD
    assert not target.with_name("data.bin.part").exists()


def test_resume_restarts_when_the_server_ignores_range(tmp_path):
    with FileServer(honour_range=False) as srv:
        srv.files["data.bin"] = PAYLOAD
        target = tmp_path / "data.bin"
        target.with_name("data.bin.part").write_bytes(PAYLOAD[:1000])
        download(srv.url("data.bin"), target, SHA)
    assert srv.ranges == ["bytes=1000-"]
    assert target.read_bytes() == PAYLOAD  # not the first 1000 bytes twice


def test_resume_of_a_complete_part_finishes(server, tmp_path):
    """Interrupted after the last byte, before the rename: the server answers 416 to ``bytes=<size>-``."""
    target = tmp_path / "data.bin"
    target.with_name("data.bin.part").write_bytes(PAYLOAD)
    download(server.url("data.bin"), target, SHA)
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]
    assert target.read_bytes() == PAYLOAD


def test_overlong_part_is_discarded_and_the_next_attempt_succeeds(server, tmp_path):
    target = tmp_path / "data.bin"
    part = target.with_name("data.bin.part")
    part.write_bytes(PAYLOAD + b"garbage")
    with pytest.raises(SourceError, match="sha256 mismatch"):
        download(server.url("data.bin"), target, SHA)
    assert not part.exists() and not target.exists()
    download(server.url("data.bin"), target, SHA)
    assert server.ranges == [f"bytes={len(PAYLOAD) + 7}-", None]
    assert target.read_bytes() == PAYLOAD


def test_unreachable_server_is_a_clear_error(tmp_path):
    with FileServer() as srv:
        url = srv.url("data.bin")
    target = tmp_path / "data.bin"
    with pytest.raises(SourceError, match="download failed") as err:
        download(url, target, SHA, timeout=5)
    assert url in str(err.value)
    assert not target.exists()


def test_missing_file_is_a_clear_error(server, tmp_path):
    url = server.url("absent.zip")
    with pytest.raises(SourceError, match="404") as err:
        download(url, tmp_path / "absent.zip", SHA)
    assert url in str(err.value)
    assert not (tmp_path / "absent.zip").exists()


# --- extract --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["../evil", "images/../../evil", "ABSOLUTE", "..\\evil", "C:/evil"])
def test_zip_traversal_is_refused(tmp_path, entry):
    if entry == "ABSOLUTE":
        entry = str(tmp_path / "abs_evil")
    archive = make_zip(tmp_path / "bad.zip", {"images/1.png": b"ok", entry: b"pwned"})
    dest = tmp_path / "out" / "ds"
    with pytest.raises(SourceError, match="unsafe archive entry") as err:
        extract(archive, dest)
    assert str(archive) in str(err.value) and repr(entry) in str(err.value)
    assert files_under(tmp_path) == {"bad.zip"}  # nothing written, inside dest or out of it
    assert not dest.exists() and not dest.with_name("ds.extracting").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE], ids=["symlink", "hardlink"])
def test_tar_link_entries_are_refused(tmp_path, kind):
    archive = make_tar(tmp_path / "bad.tar.gz", {"images/1.png": b"ok"}, {"images/2.png": (kind, "/etc/passwd")})
    dest = tmp_path / "ds"
    with pytest.raises(SourceError, match="special type") as err:
        extract(archive, dest)
    assert str(archive) in str(err.value) and "'images/2.png'" in str(err.value)
    assert not dest.exists() and not dest.with_name("ds.extracting").exists()


def test_tar_traversal_is_refused(tmp_path):
    archive = make_tar(tmp_path / "bad.tar.gz", {"../evil": b"pwned"})
    with pytest.raises(SourceError, match=r"unsafe archive entry '\.\./evil'"):
        extract(archive, tmp_path / "out" / "ds")
    assert files_under(tmp_path) == {"bad.tar.gz"}


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_truncated_archive_is_a_clear_error(tmp_path, suffix):
    entries = {f"images/{i}.png": os.urandom(20_000) for i in range(4)}
    good = (make_zip if suffix == ".zip" else make_tar)(tmp_path / f"good{suffix}", entries)
    archive = tmp_path / f"cut{suffix}"
    archive.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    dest = tmp_path / "ds"
    with pytest.raises(SourceError, match="corrupt or truncated") as err:
        extract(archive, dest)
    assert str(archive) in str(err.value)
    assert not dest.exists() and not dest.with_name("ds.extracting").exists()


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_good_archive_extracts_and_replaces_dest(tmp_path, suffix):
    entries = {"Set/images/1.png": b"image one", "Set/masks/1.png": b"mask one", "Set/README": b"hi"}
    archive = (make_zip if suffix == ".zip" else make_tar)(tmp_path / f"good{suffix}", entries)
    dest = tmp_path / "ds"
    (dest / "stale").mkdir(parents=True)
    (dest / "stale" / "old.png").write_bytes(b"from an earlier extraction")
    assert extract(archive, dest) == dest
    assert files_under(dest) == set(entries)
    assert all((dest / name).read_bytes() == data for name, data in entries.items())
    assert not dest.with_name("ds.extracting").exists()
