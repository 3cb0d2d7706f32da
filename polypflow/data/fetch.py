"""Dataset sources: where a dataset's files lie (a folder, a local archive or a URL), resume-safe HTTP download
with sha256 check, and traversal-safe archive extraction."""

from __future__ import annotations

import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from polypflow.io import sha256_file
from polypflow.settings.config import DatasetSpec

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class SourceError(RuntimeError):
    """A dataset source could not be fetched or unpacked; the message names the file or URL."""


def is_archive(path: Path) -> bool:
    """Whether ``path`` names an archive :func:`extract` unpacks (by its suffix)."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def resolve_source(key: str, spec: DatasetSpec, downloads: Path, root: Path = Path(".")) -> Path:
    """The local folder holding dataset ``key``: the source folder (under ``root``), or a downloaded/extracted
    archive (under ``downloads``)."""
    if spec.source.kind == "url":
        name = Path(spec.source.url.split("?")[0]).name or f"{key}.zip"
        archive = download(spec.source.url, downloads / name, spec.source.sha256)
        return extract(archive, downloads / key) / spec.source.subdir
    path = Path(root) / spec.source.path
    if not path.exists():
        raise SourceError(f"{path}: dataset {key} ({spec.name}) source does not exist")
    if path.is_file():
        if not is_archive(path):
            raise SourceError(f"{path}: dataset {key} source is a file but not a known archive type")
        return extract(path, downloads / key)
    return path


def download(url: str, target: Path, sha256: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``target``, resuming a partial ``target.part``; verify ``sha256``.

    The file only appears at ``target`` once complete and verified; a wrong checksum removes the partial
    download so that the next attempt starts clean.
    """
    if target.exists() and sha256_file(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if offset and response.status != 206:  # server ignored the range: start again
                offset = 0
            total = response.headers.get("Content-Length")
            total = int(total) + offset if total is not None else None
            with open(part, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=f"download {target.name}"
            ) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:  # 416 on resume: .part already holds the whole file; the checksum decides
            raise SourceError(f"{url}: download failed ({exc}); partial data kept in {part} for resume") from exc
    except OSError as exc:
        raise SourceError(f"{url}: download failed ({exc}); partial data kept in {part} for resume") from exc
    actual = sha256_file(part)
    if actual != sha256:
        part.unlink()
        raise SourceError(f"{url}: sha256 mismatch, expected {sha256}, got {actual}; download discarded")
    part.replace(target)
    return target


def _safe_member(archive: Path, name: str, dest: Path) -> Path:
    """Where ``name`` extracts to under ``dest``; refuse absolute paths and ``..`` components."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise SourceError(f"{archive}: refusing unsafe archive entry {name!r} (path traversal)")
    return dest.joinpath(*pure.parts)


def extract(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into ``dest`` (replaced atomically); refuse entries escaping ``dest``."""
    staging = dest.with_name(dest.name + ".extracting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, staging)
        else:
            _extract_tar(archive, staging)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise SourceError(f"{archive}: corrupt or truncated archive ({exc})") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    staging.replace(dest)
    return dest


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = [(info, _safe_member(archive, info.filename, dest)) for info in zf.infolist()]
        for info, target in members:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for member in members:
            _safe_member(archive, member.name, dest)
            if not (member.isfile() or member.isdir()):
                raise SourceError(f"{archive}: refusing archive entry {member.name!r} of a special type (link/device)")
        tf.extractall(dest, members=members, filter="data")
