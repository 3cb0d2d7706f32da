"""Atomic writes: a failing writer leaves the old file as it was and no temporary file behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from pathlib import Path

import pytest

from polypflow.io import atomic_path, sha256_file, sha256_stream, write_bytes, write_json, write_text

pytestmark = pytest.mark.quick


class WriterDied(RuntimeError):
    pass


def test_failing_writer_leaves_old_file_untouched(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old contents\n")
    with pytest.raises(WriterDied):
        with atomic_path(target, suffix=".json") as tmp:
            assert tmp != target and tmp.parent == target.parent and tmp.name.endswith(".json")
            tmp.write_text("half of the new")
            raise WriterDied
    assert target.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_failing_writer_creates_nothing_when_target_is_new(tmp_path):
    target = tmp_path / "sub" / "model.pt"
    with pytest.raises(WriterDied):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise WriterDied
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_success_replaces_target_and_cleans_up(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"  # parents are created
    for text in ("first", "second"):
        with atomic_path(target) as tmp:
            assert not target.exists() or target.read_text() != text  # invisible until the rename
            tmp.write_text(text)
        assert target.read_text() == text
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_writer_that_never_writes_still_replaces_with_empty_file(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with atomic_path(target):
        pass
    assert target.read_bytes() == b""


def test_written_files_get_the_usual_mode(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    write_text(tmp_path / "f.txt", "x")
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~umask


def test_write_helpers(tmp_path):
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    write_text(tmp_path / "t.txt", "héllo")
    write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2], "p": tmp_path})
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    text = (tmp_path / "j.json").read_text()
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')  # sorted keys
    assert json.loads(text) == {"a": [1, 2], "b": 1, "p": str(tmp_path)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_json_dying_mid_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "j.json"
    write_json(target, {"ok": True})
    real = Path.write_bytes

    def half_then_die(self: Path, data: bytes) -> int:
        real(self, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half_then_die)
    with pytest.raises(OSError, match="disk full"):
        write_json(target, {"ok": False, "padding": "x" * 100})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["j.json"]


def test_sha256(tmp_path):
    data = os.urandom(3 << 20)  # more than one read chunk
    (tmp_path / "d").write_bytes(data)
    assert sha256_file(tmp_path / "d") == hashlib.sha256(data).hexdigest()
    assert sha256_stream(io.BytesIO(b"")) == hashlib.sha256(b"").hexdigest()
