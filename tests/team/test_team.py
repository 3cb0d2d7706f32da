"""Team scale: hosts A and B share no folder, only an S3 store, a git remote and the MLflow tracking server.

Real services on 127.0.0.1, started once for this module: moto's S3 server (checking keys as AWS does), a bare
git repository, PostgreSQL behind ``mlflow server --app-name basic-auth`` whose artifacts are proxied to S3, a
Prefect server. Each host is a folder with its own HOME, PREFECT_HOME, checkout and DVC cache; what one host
gets from the other comes through those services. (Both read the synthetic raw images at one absolute path, as
hosts read a dataset mounted at the same place; results never go through it.)

The tests run as one scenario, in file order: (a) A runs the pipeline and pushes, B pulls; (b) B serves the
champion; (c) B's Prefect worker runs A's git-sourced deployment; (d) a fit fanned out to B's Dask worker; (e)
who may do what, and the faults.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
import yaml
from conftest import CODE, REPO, synthetic_params, write_params
from PIL import Image
from services import free_port, moto_s3, postgres_cluster, service, tail, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

DVC_BUCKET = "polypflow-dvc"  # the bucket of the committed .dvc/config (remote "team")
MLFLOW_BUCKET = "polypflow-mlflow"
SECRETS: list[str] = []  # every secret this module made up: no tracked file may contain one


def secret() -> str:
    SECRETS.append(secrets.token_urlsafe(18))
    return SECRETS[-1]


@dataclass
class Team:
    root: Path
    aws: dict[str, str]                 # AWS_* of the S3 store
    aws_read_only: dict[str, str]       # AWS_* of a key pair that may only read it
    tracking: str                       # the MLflow server's URL
    users: dict[str, str]               # MLflow user -> password (pipeline, reader)
    prefect_api: str
    git_remote: Path

    def env(self, host: str, user: str = "pipeline", **extra: str) -> dict[str, str]:
        """The environment of a process on ``host`` as ``user``: nothing of the test's own state leaks in."""
        home = self.root / host / "home"
        home.mkdir(parents=True, exist_ok=True)
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "PREFECT_", "DVC_"))}
        return {**keep, **self.aws, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"),
                "PREFECT_API_URL": self.prefect_api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "MLFLOW_TRACKING_URI": self.tracking, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": self.users.get(user, ""), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                # every artifact byte through the server (no presigned S3 URL), as for a host that cannot reach
                # the bucket; moto checking keys cannot verify presigned URLs anyway
                "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
                "GIT_AUTHOR_NAME": host, "GIT_AUTHOR_EMAIL": f"{host}@polypflow.test", "GIT_COMMITTER_NAME": host,
                "GIT_COMMITTER_EMAIL": f"{host}@polypflow.test", **extra}

    def run(self, host: str, cwd: Path, *cmd: str, user: str = "pipeline", check: bool = True,
            **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), cwd=cwd, env=self.env(host, user, **extra), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1800)
        if check:
            assert proc.returncode == 0, f"{' '.join(cmd)} on {host} failed:\n{proc.stdout[-5000:]}"
        return proc

    def dvc(self, host: str, cwd: Path, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(host, cwd, sys.executable, "-m", "dvc", *args, **kw)

    def git(self, host: str, cwd: Path, *args: str) -> str:
        return self.run(host, cwd, "git", *args).stdout.strip()


def mlflow_auth_server(root: Path, backend: str, aws: dict[str, str], users: dict[str, str]):
    """``mlflow server --app-name basic-auth`` on PostgreSQL, artifacts proxied to s3://MLFLOW_BUCKET; new users
    get READ by default; ``users`` are created by the admin."""
    admin = secret()
    config = root / "basic_auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
                      f"admin_username = admin\nadmin_password = {admin}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      "auth_cache_ttl_seconds = 60\n")  # one password hash per user a minute, not per request
    port, log = free_port(), root / "mlflow-server.log"
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_S3_ENDPOINT_URL": aws["AWS_ENDPOINT_URL"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secret(),
           **aws}
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", backend,
           "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    proc_cm = service(cmd, log, env=env)
    proc = proc_cm.__enter__()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log, timeout=180)
        for user, password in users.items():
            httpx.post(f"{url}/api/2.0/mlflow/users/create", json={"username": user, "password": password},
                       auth=("admin", admin), timeout=30).raise_for_status()
    except BaseException:
        proc_cm.__exit__(*sys.exc_info())
        raise
    return url, proc_cm


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    root = tmp_path_factory.mktemp("team")
    with moto_s3(root, [DVC_BUCKET, MLFLOW_BUCKET]) as (aws, aws_read_only), postgres_cluster(root) as backend:
        SECRETS.extend([aws["AWS_SECRET_ACCESS_KEY"], aws_read_only["AWS_SECRET_ACCESS_KEY"]])
        users = {"pipeline": secret(), "reader": secret()}
        tracking, server = mlflow_auth_server(root, backend, aws, users)
        prefect_port = free_port()
        prefect_env = {**os.environ, "PREFECT_HOME": str(root / "prefect-server"),
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        prefect = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                   str(prefect_port)]
        try:
            with service(prefect, root / "prefect-server.log", env=prefect_env) as proc:
                wait_http(f"http://127.0.0.1:{prefect_port}/api/health", proc, root / "prefect-server.log", 120)
                git_remote = root / "remote.git"
                subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(git_remote)], check=True)
                api = f"http://127.0.0.1:{prefect_port}/api"
                yield Team(root, aws, aws_read_only, tracking, users, api, git_remote)
        finally:
            server.__exit__(None, None, None)


def settings(synthetic_root: Path, **team_settings) -> dict:
    params = synthetic_params(synthetic_root)
    params["schedule"].update(retries=1, retry_delay_s=0)
    params["fanout"]["enabled"] = False
    params["team"].update(dvc_sync=True, **team_settings)  # worker_cache: the repository's, under each HOME
    return params


def commit_and_push(team: Team, host: str, project: Path, message: str) -> str:
    team.git(host, project, "add", "-A")
    team.git(host, project, "commit", "-q", "--allow-empty", "-m", message)
    team.git(host, project, "push", "-q", "origin", "HEAD:main")
    return team.git(host, project, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def host_a(team, synthetic_root) -> Path:
    """A's checkout of a fresh project (the repository's code, the test settings), committed to the git remote."""
    project = team.root / "A" / "project"
    project.mkdir(parents=True)
    for name in [*CODE, "dvc.yaml", ".gitignore", ".dvcignore"]:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy(source, project / name)
    write_params(project, settings(synthetic_root))
    team.git("A", project, "init", "-q", "-b", "main")
    team.dvc("A", project, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", project / ".dvc" / "config")  # remote "team" = s3://polypflow-dvc/dvc
    team.git("A", project, "remote", "add", "origin", str(team.git_remote))
    commit_and_push(team, "A", project, "polypflow project")
    return project


def flow_result(output: str) -> dict:
    """What ``python -m flows.pipeline`` printed last: its result as JSON."""
    return json.JSONDecoder().raw_decode(output[output.rindex("\n{\n") + 1:])[0]


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def clone(team: Team, host: str, name: str) -> Path:
    checkout = team.root / host / name
    checkout.parent.mkdir(parents=True, exist_ok=True)
    team.git(host, checkout.parent, "clone", "-q", str(team.git_remote), name)
    return checkout


@pytest.fixture(scope="module")
def published(team, host_a) -> dict:
    """A runs the whole pipeline flow, which ends by pushing; A commits and pushes dvc.lock."""
    started = time.monotonic()
    flow = team.run("A", host_a, sys.executable, "-m", "flows.pipeline")
    result = flow_result(flow.stdout)
    commit = commit_and_push(team, "A", host_a, "results of the pipeline")
    return {"result": result, "commit": commit, "seconds": time.monotonic() - started}


def test_a_pushes_and_b_pulls_every_finished_stage(team, host_a, published):
    assert "files pushed" in published["result"]["pushed"] or "up to date" in published["result"]["pushed"]
    assert team.dvc("A", host_a, "status", "--cloud").stdout.strip() == "Cache and remote 'team' are in sync."

    started = time.monotonic()
    b = clone(team, "B", "project")
    pulled = team.dvc("B", b, "pull")
    pull_seconds = time.monotonic() - started
    assert team.dvc("B", b, "status").stdout.strip() == "Data and pipelines are up to date."
    repro = team.dvc("B", b, "repro")
    assert ran_stages(repro.stdout) == [], repro.stdout[-3000:]
    for output in ["artifacts/models/unet/model.pt", "artifacts/eval/unet/summary.json", "reports/report.html",
                   "artifacts/models/unet/metrics.json", "artifacts/crossval/unet/summary.json"]:
        assert (b / output).read_bytes() == (host_a / output).read_bytes(), output
    print(f"\nA: pipeline + push {published['seconds']:.0f} s; B: clone + dvc pull {pull_seconds:.1f} s "
          f"({pulled.stdout.strip().splitlines()[-1]}), {du(b / 'artifacts') + du(b / 'data')} bytes of outputs")


def network_bytes(lock: dict, stage: str) -> tuple[int, int]:
    """What a host that reproduces ``stage`` pulls (its dependencies that are other stages' outputs; code comes
    with git) and pushes (its outputs), in bytes, from ``dvc.lock``'s sizes."""
    outputs = {o["path"] for entry in lock.values() for o in entry.get("outs", [])}
    pulled = sum(d.get("size", 0) for d in lock[stage]["deps"] if d["path"] in outputs)
    return pulled, sum(o.get("size", 0) for o in lock[stage]["outs"])


def in_worker_cache(team: Team, host: str, lock: dict, stage: str, name: str) -> bool:
    """Whether ``stage``'s output ``name`` (as dvc.lock has it) is in ``host``'s shared DVC cache (team.worker_cache,
    ``~/.cache/polypflow/dvc`` under that host's HOME): the clones the flows made there pulled and fitted into it."""
    md5 = next(o["md5"] for o in lock[stage]["outs"] if o["path"].endswith(name))
    return (team.root / host / "home" / ".cache" / "polypflow" / "dvc" / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_b_serves_the_champion_as_a_predicts(team, host_a, published, synthetic_root):
    """B, with the read-only user and no checkout, predicts through the tracking server exactly as A does
    from its own model.pt."""
    images = synthetic_root / "gamma" / "images"
    predict = [sys.executable, "-m", "polypflow.deploy.predict", "--input", str(images)]
    elsewhere = team.root / "B" / "serving"
    elsewhere.mkdir(parents=True)
    started = time.monotonic()
    team.run("B", elsewhere, *predict, "--model", "models:/polyp-segmenter@champion", "--output", "out",
             "--min-side", "32", user="reader")  # no checkout here: no params.yaml to take the side limits from
    serve_seconds = time.monotonic() - started
    a_out = team.root / "A" / "out"
    team.run("A", host_a, *predict, "--model", "artifacts/models/unet/model.pt", "--output", str(a_out))
    masks = sorted((elsewhere / "out" / "masks").glob("*.png"))
    assert len(masks) == 10
    for mask in masks:
        assert np.array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(a_out / "masks" / mask.name)))
    print(f"\nB: predict through the tracking server, 10 frames, {serve_seconds:.1f} s")


def test_b_worker_runs_a_git_sourced_deployment_and_a_pulls_its_results(team, host_a, published):
    params = yaml.safe_load((host_a / "params.yaml").read_text())
    params["train"]["defaults"]["epochs"] = 3  # a change for B's worker to compute
    (host_a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_and_push(team, "A", host_a, "three epochs")
    deployed = team.run("A", host_a, sys.executable, "-m", "flows.deploy", "--from-git")
    assert "polypflow-nightly" in deployed.stdout

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: team.prefect_api}):
        flow_run = run_deployment("polypflow-pipeline/polypflow-nightly", parameters={"crossval": False}, timeout=0)
    work = team.root / "B" / "worker"
    work.mkdir(parents=True)
    log = team.root / "B" / "prefect-worker.log"
    worker = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu-pool", "--run-once", "--limit", "1"]
    with service(worker, log, env=team.env("B"), cwd=work) as proc:
        proc.wait(timeout=1500)
    with temporary_settings({PREFECT_API_URL: team.prefect_api}), get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
        deployment = client.read_deployment_by_name("polypflow-pipeline/polypflow-nightly")
    assert state.is_completed(), f"{state.type}: {state.message}\n{tail(log, 80)}"
    assert deployment.pull_steps[0]["prefect.deployments.steps.git_clone"]["repository"] == str(team.git_remote)
    assert not (work / "artifacts").exists()  # the flow run worked in its own clone

    started = time.monotonic()
    repro = team.dvc("A", host_a, "repro", "--pull", "register@unet")  # B's lock is not in git: its run-cache is
    assert ran_stages(repro.stdout) == [], repro.stdout[-3000:]  # restored from B's run-cache entries
    assert "Stage 'train@unet' is cached - skipping run" in repro.stdout
    history = (host_a / "artifacts" / "models" / "unet" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3  # B's three epochs
    lock = yaml.safe_load((host_a / "dvc.lock").read_text())["stages"]
    assert in_worker_cache(team, "B", lock, "train@unet", "model.pt")
    print(f"\nA: dvc repro --pull restoring B's results {time.monotonic() - started:.1f} s")
    commit_and_push(team, "A", host_a, "B's three-epoch results")


def test_a_fit_fanned_out_to_b_is_recorded_in_a_without_refitting(team, host_a, published):
    port = free_port()
    scheduler_log, worker_log = team.root / "dask-scheduler.log", team.root / "B" / "dask-worker.log"
    scheduler = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                 "--no-dashboard"]
    address = f"tcp://127.0.0.1:{port}"
    worker = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--resources", "GPU=1",
              "--name", "B-gpu0", "--no-dashboard", "--local-directory", str(team.root / "B" / "dask")]
    params = yaml.safe_load((host_a / "params.yaml").read_text())
    params["train"]["defaults"]["lr"] = 2e-3  # makes train@unet stale on A
    (host_a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    infra = yaml.safe_load((host_a / "infra.yaml").read_text())
    infra["fanout"].update(enabled=True, address=address)
    (host_a / "infra.yaml").write_text(yaml.safe_dump(infra, sort_keys=False))
    commit_and_push(team, "A", host_a, "fan out to the team's cluster")
    checkpoints = {p: p.stat().st_mtime_ns for p in (host_a / "artifacts" / "checkpoints").rglob("*")}

    try:
        with service(scheduler, scheduler_log, env=team.env("scheduler")), \
                service(worker, worker_log, env=team.env("B", CUDA_VISIBLE_DEVICES="0"), cwd=team.root / "B"):
            started = time.monotonic()
            flow = team.run("A", host_a, sys.executable, "-m", "flows.pipeline")
            seconds = time.monotonic() - started
        result = flow_result(flow.stdout)
        fits = sorted((f["name"], f["worker"]) for f in result["fanout"])  # the learning rate changes both
        assert fits == [("crossval", "B-gpu0"), ("train@unet", "B-gpu0")], tail(worker_log)
        assert {f["commit"] for f in result["fanout"]} == {team.git("A", host_a, "rev-parse", "HEAD")}
        lock = yaml.safe_load((host_a / "dvc.lock").read_text())["stages"]
        assert lock["train@unet"]["params"]["params.yaml"]["train.defaults"]["lr"] == 2e-3
        model = next(o for o in lock["train@unet"]["outs"] if o["path"].endswith("model.pt"))
        assert hashlib.md5((host_a / model["path"]).read_bytes()).hexdigest() == model["md5"]
        assert in_worker_cache(team, "B", lock, "train@unet", "model.pt")
        assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints  # A fitted nothing
        assert not {"train@unet", "crossval"} & set(ran_stages(flow.stdout)), flow.stdout[-3000:]
        assert team.dvc("A", host_a, "status").stdout.strip() == "Data and pipelines are up to date."
        fit = next(f for f in result["fanout"] if f["name"] == "train@unet")
        pulled, pushed = network_bytes(lock, "train@unet")
        print(f"\nA: flow with train@unet and crossval fanned out to B {seconds:.0f} s; train@unet on B "
              f"{fit['finished'] - fit['started']:.0f} s (clone, pull {pulled} bytes, fit, push {pushed} bytes: "
              f"{fit['pushed']})")
    finally:  # the cluster is gone: later tests run without fan-out
        infra["fanout"].update(enabled=False, address=None)
        (host_a / "infra.yaml").write_text(yaml.safe_dump(infra, sort_keys=False))
        commit_and_push(team, "A", host_a, "fan-out off")


# --- (e) who may do what, and the faults --------------------------------------------------------------------


def test_anonymous_reader_and_pipeline_rights(team, published):
    api = f"{team.tracking}/api/2.0/mlflow"
    assert httpx.get(f"{api}/experiments/get-by-name", params={"experiment_name": "polypflow"}).status_code == 401
    reader = ("reader", team.users["reader"])
    experiment = httpx.get(f"{api}/experiments/get-by-name", params={"experiment_name": "polypflow"}, auth=reader)
    assert experiment.status_code == 200
    experiment_id = experiment.json()["experiment"]["experiment_id"]
    champion = httpx.get(f"{api}/registered-models/alias", params={"name": "polyp-segmenter", "alias": "champion"},
                         auth=reader)
    assert champion.status_code == 200
    version = champion.json()["model_version"]
    runs = httpx.post(f"{api}/runs/search", json={"experiment_ids": [experiment_id]}, auth=reader)
    assert runs.status_code == 200 and runs.json()["runs"]
    writes = [("runs/create", {"experiment_id": experiment_id}),
              ("model-versions/create", {"name": "polyp-segmenter", "source": version["source"],
                                         "run_id": version["run_id"]}),
              ("registered-models/alias", {"name": "polyp-segmenter", "alias": "champion", "version": "1"})]
    for path, body in writes:
        refused = httpx.post(f"{api}/{path}", json=body, auth=reader)
        assert refused.status_code == 403, (path, refused.status_code, refused.text)
    wrong = httpx.get(f"{api}/experiments/get-by-name", params={"experiment_name": "polypflow"},
                      auth=("pipeline", "not-the-password"))
    assert wrong.status_code == 401


def test_a_wrong_password_fails_a_stage_in_one_line(team, host_a, published):
    proc = team.run("A", host_a, sys.executable, "-m", "stages.register", "--method", "unet", check=False,
                    MLFLOW_TRACKING_PASSWORD="not-the-password")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout and "401" in proc.stdout and team.tracking in proc.stdout, proc.stdout[-2000:]


def failure_reasons(output: str) -> list[str]:
    """The distinct one-line reasons a failed flow run gave: DVC's ``ERROR:`` lines and the push's failure."""
    lines = {line.strip() for line in output.splitlines()}
    return sorted(line for line in lines if line.startswith(("ERROR: ", "flows.sync.PushFailed: ")))


def new_evaluation(team: Team, host_a: Path, pr_points: int) -> None:
    """A changed setting whose new outputs A makes itself (``dvc repro``, no remote involved)."""
    params = yaml.safe_load((host_a / "params.yaml").read_text())
    params["evaluate"]["pr_points"] = pr_points
    (host_a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    team.dvc("A", host_a, "repro", "register@unet")


def test_a_push_refused_part_way_is_retried_then_fails_the_flow_naming_what_did_not_arrive(team, host_a, published):
    """Keys that may read but not write: the flow pulls, reproduces, then its push is refused; it is retried, and
    the flow run fails naming the outputs the remote lacks. Nothing is reported as pushed."""
    try:
        new_evaluation(team, host_a, 7)
        flow = team.run("A", host_a, sys.executable, "-m", "flows.pipeline", check=False, **team.aws_read_only)
        assert flow.returncode != 0, flow.stdout[-3000:]
        failed = [line for line in flow.stdout.splitlines() if "PushFailed: dvc push --run-cache" in line]
        assert failed and "not in the remote: " in failed[-1] and "artifacts/eval/unet/pr.csv" in failed[-1], \
            flow.stdout[-4000:]
        assert "Task run failed with exception: PushFailed(" in flow.stdout and "Retry 1/1 will start" in flow.stdout, \
            flow.stdout[-4000:]  # schedule.retries: 1
        assert "Finished in state Failed" in flow.stdout and "files pushed" not in flow.stdout, flow.stdout[-4000:]
        assert "artifacts/eval/unet/pr.csv" in team.dvc("A", host_a, "status", "--cloud").stdout
    finally:
        team.git("A", host_a, "checkout", "params.yaml")


@pytest.mark.parametrize("fault, env, config, reason", [
    ("unreachable endpoint", {"AWS_ENDPOINT_URL": "http://127.0.0.1:{dead}"}, None, "Could not connect to the endpoint"),
    ("wrong keys", {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, None, r"Forbidden.*\(403\)"),
    ("missing bucket", {}, "s3://polypflow-no-such-bucket/dvc", "NoSuchBucket|does not exist|Not Found|404"),
])
def test_a_remote_that_cannot_be_used_fails_the_flow_in_one_line(team, host_a, published, fault, env, config, reason):
    """The flow fails, after retries, with one line giving the reason: DVC's own, at the first pull, or the push's
    (a missing bucket: DVC reads the run-cache of a bucket that is not there as empty, so only the push meets it);
    nothing is reported as pushed and nothing finished is lost."""

    summary = host_a / "artifacts" / "eval" / "unet" / "summary.json"
    try:
        new_evaluation(team, host_a, 3 + len(fault))
        made = summary.read_bytes()
        if config:
            team.dvc("A", host_a, "remote", "modify", "--local", "team", "url", config)
        extra = {k: v.format(dead=free_port()) for k, v in env.items()}
        flow = team.run("A", host_a, sys.executable, "-m", "flows.pipeline", check=False, **extra)
        assert flow.returncode != 0 and "Finished in state Failed" in flow.stdout, flow.stdout[-3000:]
        errors = failure_reasons(flow.stdout)
        assert len(errors) == 1 and re.search(reason, errors[0]), errors or flow.stdout[-4000:]
        assert "files pushed" not in flow.stdout
        assert summary.read_bytes() == made
    finally:
        team.git("A", host_a, "checkout", "params.yaml")
        if config:
            team.dvc("A", host_a, "remote", "modify", "--local", "team", "url", "--unset")


def test_a_half_pushed_state_gives_dvc_s_error_not_a_wrong_model(team, host_a, published):
    c = clone(team, "C", "project")
    team.git("C", c, "checkout", "-q", published["commit"])  # a lock whose every output A pushed
    lock = yaml.safe_load((c / "dvc.lock").read_text())["stages"]["train@unet"]
    md5 = next(o["md5"] for o in lock["outs"] if o["path"].endswith("model.pt"))
    s3 = boto3.client("s3", endpoint_url=team.aws["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=team.aws["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=team.aws["AWS_SECRET_ACCESS_KEY"])
    key = f"dvc/files/md5/{md5[:2]}/{md5[2:]}"
    body = s3.get_object(Bucket=DVC_BUCKET, Key=key)["Body"].read()
    s3.delete_object(Bucket=DVC_BUCKET, Key=key)  # as if the push had stopped before this file
    try:
        pulled = team.dvc("C", c, "pull", check=False)
        assert pulled.returncode != 0 and "failed to pull data from the cloud" in pulled.stdout, pulled.stdout[-3000:]
        assert not (c / "artifacts" / "models" / "unet" / "model.pt").exists()
    finally:
        s3.put_object(Bucket=DVC_BUCKET, Key=key, Body=body)


def test_no_tracked_file_holds_a_secret_the_tests_used(team, host_a, published):
    for checkout in (REPO, host_a):
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=checkout, capture_output=True, check=True).stdout
        for name in filter(None, tracked.decode().split("\0")):
            path = checkout / name
            if path.is_file():
                text = path.read_bytes()
                assert not [s for s in SECRETS if s.encode() in text], f"{path} holds a secret"
    assert len(SECRETS) >= 5
