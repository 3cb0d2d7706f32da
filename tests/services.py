"""Real services for slow tests (Prefect server, MLflow server, PostgreSQL, moto's S3): start, wait, always stop.

Each service is a subprocess in its own session, its output in a log file; ``stop`` ends that process
group (TERM, then KILL) so nothing a test started outlives it, even when the test fails.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from conftest import skip_or_fail

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # services are on loopback


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def stop(proc: subprocess.Popen, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """End ``proc`` and everything in its process group: ``sig``, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):  # the leader's stragglers too
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def service(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
            user: str | None = None, stop_signal: int = signal.SIGTERM) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in a new session with output to ``log``; stop its process group on exit."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, user=user,
                                start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc, sig=stop_signal)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError):
            with NO_PROXY.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout:.0f} s:\n{tail(log)}")


PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def pg_user() -> str | None:
    """Run PostgreSQL as ``postgres`` when we are root (it refuses root); as ourselves otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        skip_or_fail("running as root and there is no 'postgres' user to run the PostgreSQL server as")


@contextlib.contextmanager
def postgres_cluster(log_dir: Path) -> Iterator[str]:
    """A throwaway cluster on a free loopback port; yields the SQLAlchemy URI of its database ``mlflow``.
    Skipped (failed under CI) without the PostgreSQL server binaries (``.ci/run`` installs them)."""
    if not PG_BIN or not (Path(PG_BIN[-1]) / "initdb").exists():
        skip_or_fail("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin; apt-get install postgresql)")
    bin_dir, user = Path(PG_BIN[-1]), pg_user()
    root = Path(tempfile.mkdtemp(prefix="polypflow-pg-"))  # pytest's tmp folders are closed to other users
    try:
        if user:
            shutil.chown(root, user)
        data, port, log = root / "data", free_port(), log_dir / "postgres.log"
        run = lambda *cmd: subprocess.run(cmd, user=user, check=True, capture_output=True, text=True)  # noqa: E731
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "polypflow", "--auth=trust", "-E", "UTF8")
        server = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(root)]
        with service(server, log, user=user, stop_signal=signal.SIGINT) as proc:  # fast shutdown
            ready = [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "polypflow"]
            for _ in range(60):
                if proc.poll() is not None or subprocess.run(ready, capture_output=True).returncode == 0:
                    break
                time.sleep(0.5)
            assert proc.poll() is None, tail(log)
            run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "polypflow", "mlflow")
            yield f"postgresql://polypflow@127.0.0.1:{port}/mlflow"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def moto_s3(log_dir: Path, buckets: list[str]) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """moto's stand-alone S3 server on a free loopback port, checking keys as AWS does: an IAM user allowed
    ``s3:*`` and one allowed only to read, whose key pairs are the only ones accepted; ``buckets`` made. Yields the
    ``AWS_*`` variables that reach it (``AWS_ENDPOINT_URL``, the key pair, the region) as each user."""
    import boto3

    port, log = free_port(), log_dir / "moto.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "6"}  # the 6 IAM calls below; then every call is checked
    with service([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log, env=env) as proc:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, log, timeout=60)
        endpoint = f"http://127.0.0.1:{port}"
        anonymous = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "bootstrap",
                     "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", **anonymous)
        users = {}
        rights = {"writer": ["s3:*"], "reader": ["s3:Get*", "s3:List*", "s3:HeadObject", "s3:HeadBucket"]}
        for user, actions in rights.items():
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            users[user] = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=users["writer"]["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=users["writer"]["AWS_SECRET_ACCESS_KEY"])
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        yield users["writer"], users["reader"]
