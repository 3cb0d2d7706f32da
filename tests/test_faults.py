"""Survival under faults: a SIGKILLed training resumes to the uninterrupted result, a transient task
failure is retried, MLflow being down fails cleanly, a writer killed mid-write leaves the old file, and
the bad inputs not covered by test_validate/test_fetch are clear errors naming the file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import read_params, synthetic_params, write_params
from PIL import Image, ImageDraw
from services import free_port, stop

from polypflow.settings.config import load_params
from polypflow.data.fetch import SourceError
from polypflow.train.checkpoint import load_checkpoint, load_trained
from stages import ingest, split, train, validate
from polypflow.data.quality import ValidationFailed

MODEL = Path("artifacts/models/unet")
CHECKPOINT = Path("artifacts/checkpoints/unet/checkpoint.pt")


def dvc(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def set_params(project: Path, **train_defaults) -> None:
    params = read_params(project)
    params["train"]["defaults"].update(train_defaults)
    write_params(project, params)


def env_for(project: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow' / 'mlflow.db'}", **extra}


# --- (a) training killed mid-run --------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_result(project, tmp_path):
    set_params(project, epochs=4)
    assert dvc(project, "repro", "split").returncode == 0
    twin = shutil.copytree(project, tmp_path / "twin", symlinks=True)  # same data, params and DVC state
    uninterrupted = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train@unet"], cwd=twin, env=env_for(twin),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed = subprocess.Popen([sys.executable, "-m", "stages.train", "--method", "unet"], cwd=project,
                              env=env_for(project), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not CHECKPOINT.exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the checkpoint appears (atomically) when epoch 1 is complete
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=30) == -signal.SIGKILL
        assert uninterrupted.wait(timeout=300) == 0
    finally:
        stop(killed)
        stop(uninterrupted)
    assert 0 <= load_checkpoint(CHECKPOINT)["epoch"] < 3 and not (MODEL / "metrics.json").exists()

    resumed = dvc(project, "repro", "train@unet", env=env_for(project))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming" in resumed.stdout
    metrics, reference = (json.loads((root / MODEL / "metrics.json").read_text()) for root in (project, twin))
    assert metrics["val_dice"] == pytest.approx(reference["val_dice"], abs=1e-4)
    assert (metrics["best_epoch"], metrics["epochs_run"]) == (reference["best_epoch"], reference["epochs_run"]) == \
        (metrics["best_epoch"], 4)
    history, reference_history = (pd.read_csv(root / MODEL / "history.csv") for root in (project, twin))
    pd.testing.assert_frame_equal(history, reference_history, rtol=0, atol=1e-4)
    (model, _), (reference_model, _) = (load_trained(root / MODEL / "model.pt") for root in (project, twin))
    for (name, value), other in zip(model.state_dict().items(), reference_model.state_dict().values()):
        assert torch.allclose(value.float(), other.float(), rtol=0, atol=1e-4), name


# --- (b) a transient failure is retried by Prefect ----------------------------------------------------------

FLAKY_DVC = """import subprocess, sys
from pathlib import Path
attempts = Path(sys.argv[1])
attempts.write_text(str(int(attempts.read_text() or 0) + 1) if attempts.exists() else "1")
if attempts.read_text() == "1":
    sys.exit("transient: lost the connection to the data share")
sys.exit(subprocess.call([sys.executable, "-m", "dvc", *sys.argv[2:]]))
"""


@pytest.mark.slow
def test_transient_task_failure_is_retried(project, tmp_path, monkeypatch):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows import pipeline, sync

    wrapper, attempts = tmp_path / "flaky_dvc.py", tmp_path / "attempts"
    wrapper.write_text(FLAKY_DVC)
    monkeypatch.setattr(sync, "dvc_command", lambda: [sys.executable, str(wrapper), str(attempts)])
    repro = pipeline.dvc_repro.with_options(retries=1, retry_delay_seconds=0)

    @flow
    def ingest_flow(project_dir: str) -> str:
        return repro(project_dir, ["ingest"])

    with prefect_test_harness(server_startup_timeout=120):
        output = ingest_flow(str(project))
    assert "Running stage 'ingest'" in output
    assert attempts.read_text() == "3"  # failed once, put the last outputs back (dvc checkout), passed on the retry
    assert (project / "data" / "manifest.csv").exists()


# --- (c) MLflow server down ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_tracking_server_down_fails_clearly_and_keeps_outputs(project):
    set_params(project, epochs=1)
    assert dvc(project, "repro", "register@unet").returncode == 0
    before = {p: p.read_bytes() for p in [*sorted(MODEL.iterdir()), CHECKPOINT]}
    port = free_port()  # nothing listens on it
    env = env_for(project, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                  MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    start = time.monotonic()
    failed = subprocess.run([sys.executable, "-m", "stages.train", "--method", "unet", "--no-resume"], cwd=project,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert failed.returncode != 0
    assert f"127.0.0.1:{port}" in failed.stdout and "Connection refused" in failed.stdout, failed.stdout[-3000:]
    assert time.monotonic() - start < 120  # fails before training, not after it
    assert {p: p.read_bytes() for p in before} == before

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env_for(project)["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions("name = 'unet'")
    assert [v.version for v in versions] == [1]
    assert client.list_artifacts(versions[0].run_id)  # the registered model has its artifacts


def test_artifact_store_failure_registers_nothing(project, monkeypatch):
    """The server answers but the model upload fails: no model version, no run.json pointing at it."""
    from mlflow.exceptions import MlflowException

    set_params(project, epochs=1)
    params = load_params("params.yaml")
    ingest.run(params)
    validate.run(params)
    split.run(params)

    def unreachable_store(*args, **kwargs):
        raise MlflowException("artifact store unreachable")

    monkeypatch.setattr(train, "log_model", unreachable_store)
    with pytest.raises(MlflowException, match="artifact store unreachable"):
        train.run(params, "unet")
    from mlflow import MlflowClient

    assert MlflowClient().search_registered_models() == []
    assert not (MODEL / "run.json").exists() and not (MODEL / "metrics.json").exists()


# --- (d) every output is written atomically -------------------------------------------------------------------

CRASH = """import os, signal, sys
from polypflow import io
target, how = sys.argv[1], sys.argv[2]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if how.endswith("before_rename"):
    os.replace = die  # everything is written to the temporary file; the process dies before the rename
if how.startswith("write_json"):
    io.write_json(target, {"new": list(range(1000))})
elif how.startswith("save_checkpoint"):
    import torch
    from polypflow.train import checkpoint as training
    training.save_checkpoint(target, epoch=7, model={"w": torch.ones(1000)})
elif how.startswith("csv"):
    import pandas as pd
    with io.atomic_path(target, suffix=".csv") as tmp:
        pd.DataFrame({"epoch": range(1000)}).to_csv(tmp, index=False)
else:  # killed half-way through writing its bytes
    with io.atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(b'{"half": '); f.flush(); die()
"""
OLD = {"json": b'{"old": true}\n', "pt": None, "csv": b"epoch\n1\n"}


@pytest.mark.parametrize("how", ["write_json_before_rename", "save_checkpoint_before_rename", "csv_before_rename",
                                 "atomic_path_mid_write"])
def test_writer_killed_mid_write_leaves_the_old_file(tmp_path, how):
    suffix = "pt" if how.startswith("save_checkpoint") else "csv" if how.startswith("csv") else "json"
    target = tmp_path / f"out.{suffix}"
    if suffix == "pt":
        from polypflow.train.checkpoint import save_checkpoint

        save_checkpoint(target, epoch=3, model={"w": torch.zeros(2)})
    else:
        target.write_bytes(OLD[suffix])
    old = target.read_bytes()
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    proc = subprocess.run([sys.executable, str(script), str(target), how], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert target.read_bytes() == old
    if suffix == "pt":
        assert load_checkpoint(target)["epoch"] == 3
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")]
    assert len(leftovers) == 1  # a hard kill leaves the hidden temporary file (never the target) behind


# --- bad inputs not covered by test_validate.py / test_fetch.py -------------------------------------------------


def huge_pair(data: Path) -> None:
    """A 5000x5000 frame (beyond validate.max_side 4096) with its mask."""
    mask = Image.new("L", (5000, 5000), 0)
    ImageDraw.Draw(mask).ellipse([1500, 1500, 3500, 3500], fill=255)
    Image.new("RGB", (5000, 5000), (180, 110, 100)).save(data / "gamma/images/11.png")
    mask.save(data / "gamma/masks/11.png")


def non_utf8_name(data: Path) -> None:
    for folder in ("images", "masks"):
        shutil.copyfile(data / "gamma" / folder / "1.png", os.fsencode(data / "gamma" / folder) + b"/caf\xe9.png")


class NotOurs:
    pass


def foreign_checkpoint(kind: str):
    def damage(data: Path) -> None:
        CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        torch.save(NotOurs() if kind == "pickled_object" else {"model": {"w": torch.zeros(1)}}, CHECKPOINT)
    return damage


BAD_INPUTS = [  # id, damage, the stage that must refuse it, error, the file named in the message
    ("huge_image_5000px", huge_pair, "validate", ValidationFailed, "data/raw/gamma/images/11.png"),
    ("non_utf8_file_name", non_utf8_name, "ingest", SourceError, "gamma/images/caf\\xe9.png"),
    ("checkpoint_pickled_object", foreign_checkpoint("pickled_object"), "train", ValueError, str(CHECKPOINT)),
    ("checkpoint_without_format_tag", foreign_checkpoint("state_dict"), "train", ValueError, str(CHECKPOINT)),
]


@pytest.fixture
def workdir(tmp_path, synthetic_root, monkeypatch) -> Path:
    """A stage working directory over a private copy of the synthetic data, free to damage."""
    data = shutil.copytree(synthetic_root, tmp_path / "data-source")
    root = tmp_path / "work"
    root.mkdir()
    write_params(root, synthetic_params(data))
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    return data


@pytest.mark.parametrize(("damage", "stage", "error", "named"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_error_naming_the_file(workdir, damage, stage, error, named):
    params = load_params("params.yaml")
    damage(workdir)
    steps = {"ingest": lambda: ingest.run(params), "validate": lambda: validate.run(params),
             "split": lambda: split.run(params), "train": lambda: train.run(params, "unet")}
    reached = []
    with pytest.raises(error) as err:
        for name, step in steps.items():
            reached.append(name)
            step()
    assert reached[-1] == stage, f"{stage} accepted the bad input; {reached[-1]} refused it"
    message = str(err.value)
    assert named in message, message
    if stage == "validate":
        for side in ("width", "height"):
            says = f"({side}): 1 failing:\n  {named}: expected a {side} of 32 to 4096 px (validate.min_side, "
            assert says + "validate.max_side), found 5000 px" in message, message
