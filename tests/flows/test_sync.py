"""flows.sync on a small git + DVC repository with a directory remote: what a push reports, what a worker clones.
(The S3 store, the tracking server and two hosts: tests/team/test_team.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows import sync
from polypflow.settings.config import Team

pytestmark = pytest.mark.quick


def run(cwd: Path, *cmd: str) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git + DVC repository with one stage run, its remote a folder, its git remote a bare repository."""
    for name, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"}.items():
        monkeypatch.setenv(name, value)
    root, remote = tmp_path / "repo", tmp_path / "remote.git"
    root.mkdir()
    run(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(remote))
    run(root, "git", "init", "-q", "-b", "main")
    dvc = [sys.executable, "-m", "dvc"]
    run(root, *dvc, "init", "-q")
    run(root, *dvc, "remote", "add", "-d", "store", str(tmp_path / "store"))
    (root / "source.txt").write_text("polyp\n")
    run(root, *dvc, "stage", "add", "-q", "-n", "copy", "-d", "source.txt", "-o", "copied.txt",
        "cp source.txt copied.txt")
    run(root, *dvc, "repro", "-q")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "one stage")
    run(root, "git", "remote", "add", "origin", str(remote))
    return root


def test_repro_pulls_and_allows_missing_data_only_when_syncing():
    assert sync.repro_options(Team(dvc_sync=True)) == ["--pull", "--allow-missing"]
    assert sync.repro_options(Team()) == []


def test_a_push_reports_what_it_sent_and_the_remote_then_lacks_nothing(repo):
    assert sync.push(repo) == "2 files pushed"  # the output and the stage's run-cache entry
    assert sync.not_in_remote(repo, []) == []
    assert sync.not_in_remote(repo, ["copy"]) == []


def test_what_the_remote_lacks_is_named(repo):
    assert sync.not_in_remote(repo, []) == ["copied.txt"]
    sync.push(repo)
    assert sync.not_in_remote(repo, ["copy"]) == []


def test_a_push_whose_run_cache_entry_did_not_arrive_fails_saying_so(repo, tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "runs").write_text("a file where the run-cache's folder should be\n")
    with pytest.raises(sync.PushFailed, match=r"dvc push --run-cache in .*failed \(exit \d+\): ERROR.*; every output "
                                              r"is in the remote, but not every run-cache entry"):
        sync.push(repo)


def test_an_unreachable_remote_leaves_every_output_unconfirmed(repo, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the remote's folder should be\n")
    run(repo, sys.executable, "-m", "dvc", "remote", "modify", "store", "url", str(blocked))
    with pytest.raises(sync.PushFailed, match=r"failed \(exit \d+\): ERROR.*the remote could not be asked what "
                                              r"arrived: every output pushed is unconfirmed"):
        sync.push(repo, ["copy"])


def test_a_worker_clones_only_a_clean_pushed_commit(repo, tmp_path):
    with pytest.raises(ValueError, match="is not on origin.*git push origin first"):
        sync.published_commit(repo, "origin")
    run(repo, "git", "push", "-q", "origin", "main")
    url, commit = sync.published_commit(repo, "origin")
    assert url == str(tmp_path / "remote.git") and commit == run(repo, "git", "rev-parse", "HEAD").strip()

    (repo / "dvc.lock").write_text((repo / "dvc.lock").read_text() + "# the flow's own repro\n")
    assert sync.published_commit(repo, "origin") == (url, commit)  # a worker restores such stages from the run-cache
    (repo / "source.txt").write_text("changed\n")
    with pytest.raises(ValueError, match="these tracked files differ from it: source.txt; commit them"):
        sync.published_commit(repo, "origin")

    checkout = sync.clone(url, commit, tmp_path / "worker" / "checkout")
    assert (checkout / "source.txt").read_text() == "polyp\n"


def test_clones_on_one_host_share_one_cache_so_data_is_pulled_once(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run(repo, "git", "push", "-q", "origin", "main")
    sync.push(repo)
    url, commit = sync.published_commit(repo, "origin")
    first, second = (sync.clone(url, commit, tmp_path / name / "checkout") for name in ("first", "second"))
    for checkout in (first, second):
        sync.share_cache(checkout, "~/worker-cache")
    assert "1 file fetched" in sync.dvc(first, "pull").stdout
    pulled = sync.dvc(second, "pull").stdout
    assert "fetched" not in pulled and "1 file added" in pulled, pulled  # from the shared cache, none fetched
    assert (second / "copied.txt").read_text() == "polyp\n"
    assert any((tmp_path / "home" / "worker-cache" / "files" / "md5").rglob("*"))
    sync.share_cache(first, None)  # None changes nothing
    assert "worker-cache" in sync.dvc(first, "cache", "dir").stdout
