"""Ingest's pieces: video sequences from frame ranges, files paired by stem (the stage: tests/stages/test_ingest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from polypflow.data.fetch import SourceError
from polypflow.data.ingest import files_by_stem, sequence_of

pytestmark = pytest.mark.quick

EXTENSIONS = [".jpg", ".png"]


def test_sequence_of_uses_inclusive_ranges():
    ranges = [(1, 25), (26, 50)]
    assert [sequence_of(s, ranges) for s in ("1", "25", "26", "50", "51", "x7")] == [1, 1, 2, 2, None, None]
    assert sequence_of("3", []) is None


def test_files_by_stem_takes_the_listed_extensions_in_any_case(tmp_path: Path):
    for name in ("1.jpg", "2.PNG", "3.txt", "notes.md"):
        (tmp_path / name).write_bytes(b"x")
    assert files_by_stem(tmp_path, EXTENSIONS) == {"1": tmp_path / "1.jpg", "2": tmp_path / "2.PNG"}


def test_files_by_stem_refuses_two_files_of_one_stem_and_a_missing_folder(tmp_path: Path):
    for name in ("7.jpg", "7.png"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(SourceError, match=r"7\.png: two files share the stem '7' \(7\.jpg\)"):
        files_by_stem(tmp_path, EXTENSIONS)
    with pytest.raises(SourceError, match="expected folder is missing"):
        files_by_stem(tmp_path / "masks", EXTENSIONS)
