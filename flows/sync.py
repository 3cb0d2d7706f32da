"""What crosses a machine boundary: DVC run from the flows, the team's DVC remote, a worker's clone from git.

The flows run DVC only through :func:`dvc`. With ``team.dvc_sync`` (infra.yaml) they reproduce with
``--pull --allow-missing`` (DVC pulls the run-cache and the cached data of only the stages that must run, and
skips a stage whose data is merely absent here, such as ingest on a host without the raw sources) and end with
:func:`push`: ``dvc push --run-cache`` to DVC's default remote. A host that pulls that run-cache restores every
finished stage instead of running it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from polypflow.settings.config import Team


def dvc_command() -> list[str]:
    """``dvc`` from the interpreter's own environment (works without an activated venv)."""
    return [sys.executable, "-m", "dvc"]


def dvc(project_dir: Path | str, *args: str, merged: bool = True) -> subprocess.CompletedProcess:
    """``dvc <args>`` in ``project_dir``; its errors in its output when ``merged``, else apart (for ``--json``)."""
    return subprocess.run([*dvc_command(), *args], cwd=project_dir, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merged else subprocess.PIPE,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def repro_options(team: Team) -> list[str]:
    """``dvc repro``'s options for ``team``: pull what the stages to run need, and the run-cache, when syncing."""
    return ["--pull", "--allow-missing"] if team.dvc_sync else []


class PushFailed(RuntimeError):
    """``dvc push`` did not deliver everything; the message names what is not in the remote."""


def last_error(output: str) -> str:
    """DVC's own ``ERROR: ...`` (the reason; stderr may have joined it to a line of stdout), else the output's last
    line (its summary)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line[line.index("ERROR"):] for line in lines if "ERROR" in line]
    return (errors or lines or ["no output"])[-1]


def not_in_remote(project_dir: Path | str, targets: list[str]) -> list[str] | None:
    """The outputs of ``targets`` (all stages if empty) that the default remote lacks; None if it cannot be asked."""
    proc = dvc(project_dir, "status", "--cloud", "--json", *targets, merged=False)
    if proc.returncode != 0:
        return None
    try:
        status = json.loads(proc.stdout or "{}")
    except ValueError:
        return None
    return sorted(path for path, state in status.items() if state in ("new", "missing", "modified"))


def push(project_dir: Path | str, targets: list[str] = ()) -> str:
    """``dvc push --run-cache [--with-deps targets]`` to the default remote; DVC's summary line on success.

    On failure (an exit status other than 0, or an ``ERROR`` DVC printed while exiting 0, as it does when a
    run-cache entry fails to transfer) raise :class:`PushFailed` with DVC's reason and, asked of the remote
    afterwards, the outputs that did not arrive (all of them unconfirmed when the remote cannot be asked either).
    Nothing is reported as pushed that was not.
    """
    command = ["push", "--run-cache", *(["--with-deps", *targets] if targets else [])]
    proc = dvc(project_dir, *command)
    # DVC exits 0 and counts the files pushed even when a run-cache entry failed to transfer: it only says ERROR
    if proc.returncode == 0 and "ERROR" not in proc.stdout:
        return last_error(proc.stdout)  # DVC's summary: "N files pushed" or "Everything is up to date."
    missing = not_in_remote(project_dir, list(targets))
    if missing is None:
        what = "the remote could not be asked what arrived: every output pushed is unconfirmed"
    elif missing:
        what = f"not in the remote: {', '.join(missing)}"
    else:
        what = "every output is in the remote, but not every run-cache entry: another host would rerun those stages"
    raise PushFailed(f"dvc {' '.join(command)} in {project_dir} failed (exit {proc.returncode}): "
                     f"{last_error(proc.stdout)}; {what}")


def git(cwd: Path | str, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, text=True, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {cwd} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.rstrip()  # porcelain lines start with a space


def published_commit(project_dir: Path | str, git_remote: str) -> tuple[str, str]:
    """(URL of ``git_remote``, HEAD) for a worker to clone. The checkout must be clean but for dvc.lock (a worker
    fits what is committed, and its run-cache entry matches only the same code and settings; the flow's own
    repro may just have updated dvc.lock, whose stages the worker then restores from the pushed run-cache) and
    HEAD must be on the remote."""
    dirty = [line[3:] for line in git(project_dir, "status", "--porcelain", "--untracked-files=no").splitlines()
             if line[3:] != "dvc.lock"]
    if dirty:
        raise ValueError(f"{project_dir}: a worker fits the commit, but these tracked files differ from it: "
                         f"{', '.join(dirty)}; commit them and git push {git_remote}")
    url, commit = git(project_dir, "remote", "get-url", git_remote), git(project_dir, "rev-parse", "HEAD")
    git(project_dir, "fetch", "-q", git_remote)
    if not git(project_dir, "branch", "-r", "--contains", commit, "--list", f"{git_remote}/*"):
        raise ValueError(f"{project_dir}: commit {commit[:12]} is not on {git_remote} ({url}): git push {git_remote} "
                         "first, so a worker can clone it")
    return url, commit


def share_cache(checkout: Path | str, cache: str | None) -> None:
    """Make ``cache`` (``~`` expanded; None: keep the checkout's own) the DVC cache of ``checkout``, a clone the
    flows made: the clones on one host then pull each object once (DVC's shared cache, content-addressed)."""
    if cache is None:
        return
    proc = dvc(checkout, "cache", "dir", "--local", str(Path(cache).expanduser()))
    if proc.returncode != 0:
        raise RuntimeError(f"{checkout}: dvc cache dir {cache} failed: {last_error(proc.stdout)}")


def clone(url: str, commit: str, into: Path) -> Path:
    """A checkout of ``commit`` of ``url`` in ``into`` (a worker's own, sharing nothing with the flow's host)."""
    into.parent.mkdir(parents=True, exist_ok=True)
    git(into.parent, "clone", "-q", "--no-checkout", url, str(into))
    git(into, "checkout", "-q", "--detach", commit)
    return into
