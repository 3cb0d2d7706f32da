"""The one resolver of the MLflow store: ``--tracking-uri`` if given, else ``MLFLOW_TRACKING_URI``, else
``tracking.uri`` of the project's settings (relative paths from the project's folder)."""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import mlflow

from polypflow.settings.config import Params, ParamsError, find_project


def tracking_uri(params: Params | None, flag: str | None = None, root: Path | None = None) -> str:
    """The store's URI; a relative local store of ``params`` is taken from ``root`` when given."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if params is None:
        raise FileNotFoundError(f"no MLflow store: no params.yaml in {Path.cwd()} or above; "
                                "pass --tracking-uri or set MLFLOW_TRACKING_URI")
    uri = params.tracking.uri
    store = local_store(uri, root)
    return f"sqlite:///{store}" if root is not None and store is not None and uri.startswith("sqlite:///") else uri


def local_store(uri: str, root: Path | None = None) -> Path | None:
    """The file or folder of a local MLflow store URI (relative ones against ``root``); None for a server."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
    elif uri.startswith("file:"):
        path = Path(re.sub(r"^file:(//)?", "", uri))
    elif "://" not in uri:
        path = Path(uri)
    else:
        return None
    return path if path.is_absolute() or root is None else root / path


def check_store(uri: str) -> None:
    """A local SQLite store that exists must be a readable database: one line naming it and what to do, not an
    SQLAlchemy traceback (a truncated ``mlflow.db``, a ``tracking.uri`` pointing at some other file).

    Opened for writing (never created): a writer killed mid-transaction leaves a hot journal, which SQLite rolls
    back on the next writable open, as MLflow's own would; a read-only open cannot and calls that damage."""
    store = local_store(uri)
    if store is None or not uri.startswith("sqlite:///") or not store.is_file():
        return
    try:
        with sqlite3.connect(f"file:{store}?mode=rw", uri=True, timeout=2) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return  # another stage is committing to it: busy, not damaged (MLflow waits for its turn)
        problems = [str(exc)]
    if problems != ["ok"]:
        raise ParamsError(f"{store}: the MLflow store is not a readable SQLite database ({'; '.join(problems)[:200]}): "
                          "restore it from a copy, or point tracking.uri (infra.yaml) or MLFLOW_TRACKING_URI at a good "
                          "store")


def use_existing_store(flag: str | None, project: tuple[Path, Params] | None) -> str:
    """Point MLflow at the resolved store, which must exist: never create one (a typo would give an empty store)."""
    root, params = project if project is not None else (None, None)
    uri = tracking_uri(params, flag, root)
    store = local_store(uri)
    if store is not None and not store.exists():
        settings = root is not None and not (flag or os.environ.get("MLFLOW_TRACKING_URI"))
        where = f" (tracking.uri of {root / 'params.yaml'})" if settings else ""
        raise FileNotFoundError(f"no MLflow store at {store}{where}: train a model first (dvc repro), or pass "
                                "--tracking-uri")
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def nearest_project() -> tuple[Path, Params] | None:
    """The project (its folder and settings) around the current folder, else around this package."""
    return find_project(Path.cwd().resolve()) or find_project(Path(__file__).resolve().parent)
