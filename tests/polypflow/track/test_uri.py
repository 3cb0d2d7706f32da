"""The one store resolver: a local SQLite store that is no readable database is one line naming it (issue 22.6)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys

import pytest

from polypflow.settings.config import ParamsError
from polypflow.track.uri import check_store

pytestmark = pytest.mark.quick


def sqlite_store(path):
    with sqlite3.connect(path) as db:
        db.execute("create table runs (id integer primary key, name text)")
        db.executemany("insert into runs (name) values (?)", [(f"run {i} " * 40,) for i in range(2000)])
    return path


def test_a_good_or_missing_store_passes(tmp_path):
    check_store(f"sqlite:///{sqlite_store(tmp_path / 'mlflow.db')}")
    check_store(f"sqlite:///{tmp_path / 'not-yet.db'}")  # created by the first stage that logs
    check_store("http://127.0.0.1:5000")  # a server: its own errors name its URL


KILLED_WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size=1")  # spill into the database file before the commit that never comes
db.execute("BEGIN IMMEDIATE")
db.executemany("insert into runs (name) values (?)", [("half-written " * 40,) for _ in range(2000)])
print("mid-transaction", flush=True)
time.sleep(120)
"""


def test_a_store_whose_writer_was_killed_mid_transaction_is_rolled_back_not_called_damaged(tmp_path):
    """A SIGKILLed training leaves mlflow.db-journal behind (test_faults' resume hit this): not damage."""
    store = sqlite_store(tmp_path / "mlflow.db")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "mid-transaction"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert (tmp_path / "mlflow.db-journal").stat().st_size > 0  # the hot journal a crash leaves
    check_store(f"sqlite:///{store}")
    with sqlite3.connect(store) as db:
        assert db.execute("select count(*) from runs").fetchone() == (2000,)  # the committed rows, no half of the rest
    assert not (tmp_path / "mlflow.db-journal").exists()


def test_a_store_another_stage_is_committing_to_is_busy_not_damaged(tmp_path):
    store = sqlite_store(tmp_path / "mlflow.db")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.replace("IMMEDIATE", "EXCLUSIVE"), str(store)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "mid-transaction"
        with pytest.raises(sqlite3.OperationalError, match="locked"):  # the lock is real ...
            sqlite3.connect(store, timeout=0).execute("select count(*) from runs").fetchone()
        check_store(f"sqlite:///{store}")  # ... and not called damage
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)


@pytest.mark.parametrize("damage", ["truncated", "not_a_database"])
def test_a_damaged_store_is_one_line_naming_it(tmp_path, damage):
    store = sqlite_store(tmp_path / "mlflow.db")
    if damage == "truncated":
        store.write_bytes(store.read_bytes()[: store.stat().st_size // 2])
    else:
        store.write_text("tracking: not a database\n" * 100)
    with pytest.raises(ParamsError, match=r"mlflow\.db: the MLflow store is not a readable SQLite database") as err:
        check_store(f"sqlite:///{store}")
    assert "\n" not in str(err.value) and "tracking.uri" in str(err.value)


def test_predict_with_a_damaged_store_says_so_in_one_line(tmp_path):
    store = sqlite_store(tmp_path / "mlflow.db")
    store.write_bytes(store.read_bytes()[: store.stat().st_size // 2])
    (tmp_path / "in").mkdir()
    run = subprocess.run([sys.executable, "-m", "polypflow.deploy.predict", "--model", "models:/polyp-segmenter@champion",
                          "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                          "--tracking-uri", f"sqlite:///{store}"], capture_output=True, text=True, timeout=300)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode == 1 and len(lines) == 1 and "not a readable SQLite database" in lines[0], lines[-20:]
