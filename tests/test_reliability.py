"""Issue 14's careless-user cases: changed source data is noticed, a typo never costs a checkpoint, kills leave no
ghosts (runs ended, trainer gone with its parent, nothing registered twice), Ctrl-C ends with one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_params, stage_workdir, write_params
from PIL import Image

from polypflow.settings.config import load_params
from stages import ingest, split, train, validate

CHECKPOINT = Path("artifacts/checkpoints/unet/checkpoint.pt")


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)


# --- 1. the source dataset is a DVC dependency of ingest -------------------------------------------------------


def test_a_changed_added_or_removed_source_file_reruns_ingest(project, synthetic_root, tmp_path):
    data = shutil.copytree(synthetic_root, tmp_path / "sources")
    params = read_params(project)
    params["ingest"]["root"] = str(data)
    write_params(project, params)
    assert dvc(project, "repro", "validate").returncode == 0
    assert "up to date" in dvc(project, "status", "ingest").stdout
    image = data / "gamma" / "images" / "3.png"
    pixels = Image.open(image).convert("RGB")
    pixels.putpixel((0, 0), (0, 0, 0))
    pixels.save(image)  # a "fixed" frame: same name, other content
    status = dvc(project, "status", "ingest").stdout
    assert "ingest" in status and "modified" in status and str(data) in status, status
    repro = dvc(project, "repro", "validate")
    assert "Running stage 'ingest'" in repro.stdout, repro.stdout[-2000:]
    (data / "gamma" / "images" / "9.png").unlink()
    (data / "gamma" / "masks" / "9.png").unlink()  # a pair removed
    assert "modified" in dvc(project, "status", "ingest").stdout


def test_a_source_path_outside_ingest_root_is_refused(synthetic_root, tmp_path):
    from conftest import synthetic_params
    from polypflow.settings.config import Params

    raw = synthetic_params(synthetic_root)
    raw["ingest"]["datasets"]["gamma"]["source"]["path"] = str(tmp_path)
    with pytest.raises(ValueError, match="relative to ingest.root"):
        Params.model_validate(raw)


# --- 2. a typo never costs a checkpoint ----------------------------------------------------------------------


@pytest.fixture
def one_epoch(tmp_path, synthetic_root, monkeypatch):
    root = stage_workdir(tmp_path, synthetic_root, monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    params = read_params(root)
    params["train"]["defaults"]["epochs"] = 1
    write_params(root, params)
    p = load_params("params.yaml")
    for stage in (ingest, validate, split):
        stage.run(p)
    train.run(p, "unet")
    return root


def edit(root: Path, change) -> None:
    params = read_params(root)
    change(params)
    write_params(root, params)


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p["train"]["defaults"].update(loss="bce_dicee"), "unknown loss 'bce_dicee'"),
    (lambda p: p["methods"]["unet"]["model"].update(encodr="x"), r"methods\.unet\.model: unknown argument\(s\) \['encodr'\]"),
    (lambda p: p["methods"]["unet"]["model"].update(encoder="no_such_encoder"), "no_such_encoder"),
], ids=["loss", "model kwarg", "encoder"])
def test_a_typo_fails_before_touching_the_checkpoint(one_epoch, change, message):
    before = CHECKPOINT.read_bytes()
    edit(one_epoch, change)
    with pytest.raises((ValueError, RuntimeError), match=message):
        train.run(load_params("params.yaml"), "unet")
    assert CHECKPOINT.read_bytes() == before
    assert [p.name for p in CHECKPOINT.parent.iterdir()] == ["checkpoint.pt"]


def test_a_checkpoint_of_other_settings_is_kept_until_the_new_run_has_an_epoch(one_epoch):
    before = CHECKPOINT.read_bytes()
    edit(one_epoch, lambda p: p["train"]["defaults"].update(lr=1e-4))
    from polypflow.train import engine as training

    def broken_epoch(*args, **kwargs):
        raise RuntimeError("power cut in the first epoch")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "train_epoch", broken_epoch)
        with pytest.raises(RuntimeError, match="power cut"):
            train.run(load_params("params.yaml"), "unet")
    aside = [p for p in CHECKPOINT.parent.iterdir() if p.name.startswith("checkpoint.pt.other-")]
    assert len(aside) == 1 and aside[0].read_bytes() == before and not CHECKPOINT.exists()
    train.run(load_params("params.yaml"), "unet")
    assert [p.name for p in CHECKPOINT.parent.iterdir()] == ["checkpoint.pt"]  # the new run's, the old one gone


# --- 4. kills leave no ghosts ----------------------------------------------------------------------------------


def stage_process(root: Path, *, via_parent: bool = False) -> subprocess.Popen:
    """`python -m stages.train` for a long run, directly or as the child of a parent process (as dvc starts it)."""
    cmd = [sys.executable, "-m", "stages.train", "--method", "unet", "--no-resume"]
    if via_parent:
        cmd = [sys.executable, "-c", f"import subprocess, sys; sys.exit(subprocess.call({cmd!r}))"]
    # Ctrl-C reaches the stage as at a terminal, even when the tests themselves run in the background (a shell's
    # `cmd &` starts them with SIGINT ignored, which their children inherit)
    return subprocess.Popen(cmd, cwd=root, env={**os.environ}, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def running_train_run(timeout: float = 300):
    """The RUNNING train run of unet, once the stage has opened it."""
    import mlflow

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="attributes.status = 'RUNNING' and tags.`polypflow.stage` = 'train'")
        if runs:
            return runs[0]
        time.sleep(1)
    raise AssertionError("the train stage never opened its MLflow run")


def status_of(run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient().get_run(run_id).info.status


@pytest.fixture
def long_training(one_epoch):
    edit(one_epoch, lambda p: p["train"]["defaults"].update(epochs=200, early_stop_patience=200))  # not done early
    return one_epoch


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_ends_the_run_killed_with_one_line(long_training, sig):
    proc = stage_process(long_training)
    run = running_train_run()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "Traceback" not in out and "interrupted" in out.splitlines()[-1], out[-2000:]
    assert status_of(run.info.run_id) == "KILLED"


@pytest.mark.slow
def test_the_trainer_dies_with_its_parent_and_a_sigkilled_run_is_ended_by_the_next(long_training):
    from polypflow.track import runs as tracking

    parent = stage_process(long_training, via_parent=True)
    run = running_train_run()
    trainer_pid = int(run.data.tags["polypflow.pid"])
    parent.kill()  # SIGKILL: dvc (or a flow) gone at once
    deadline = time.monotonic() + 120
    while tracking.pid_alive(trainer_pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not tracking.pid_alive(trainer_pid), "the trainer outlived its parent"
    assert status_of(run.info.run_id) == "KILLED"

    orphan = stage_process(long_training)
    orphaned = running_train_run()
    os.kill(orphan.pid, signal.SIGKILL)  # nothing can end this run itself
    orphan.wait(timeout=60)
    assert status_of(orphaned.info.run_id) == "RUNNING"
    with tracking.stage_run(load_params("params.yaml"), "train", "unet"):
        pass
    assert status_of(orphaned.info.run_id) == "KILLED"


# --- smaller: a missing or replaced MLflow store is found before the work ----------------------------------------


def test_a_missing_or_replaced_store_is_an_error_before_evaluating(one_epoch, monkeypatch):
    from polypflow.track.runs import StoreMismatch
    from stages import evaluate

    params = load_params("params.yaml")
    (one_epoch / "mlflow.db").rename(one_epoch / "elsewhere.db")
    with pytest.raises(StoreMismatch, match=r"no MLflow store at .*mlflow\.db.*run\.json names run"):
        evaluate.run(params, "unet")
    assert not (one_epoch / "mlflow.db").exists()  # not silently created afresh
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{one_epoch / 'fresh.db'}")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{one_epoch / 'fresh.db'}")
    mlflow.search_experiments()  # a store that exists but never saw this project's runs
    with pytest.raises(StoreMismatch, match="has no run .* which .*run.json names"):
        evaluate.run(params, "unet")
    assert not Path("artifacts/eval/unet/summary.json").exists()


def test_a_stage_started_elsewhere_works_in_its_project(one_epoch, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "stages.split", "--params", str(one_epoch / "params.yaml")],
                          cwd=elsewhere, text=True, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (one_epoch / "data" / "splits.json").exists() and not (elsewhere / "data").exists()


# --- issue 22: a settings error fails before DVC removes any output; an unknown key is an error ------------------


@pytest.mark.slow
@pytest.mark.parametrize("typo", ["epoch_in_train_defaults", "builder_argument", "top_level_key", "split_key"])
def test_a_settings_error_fails_before_any_output_is_removed(project, typo):
    assert dvc(project, "repro", "split").returncode == 0
    outputs = {p: p.read_bytes() for p in (project / "data").rglob("*") if p.is_file() and p.suffix in (".csv", ".json")}
    good = read_params(project)
    bad = read_params(project)
    method = bad["train"]["methods"][0]
    {"epoch_in_train_defaults": lambda: bad["train"]["defaults"].update(epoch=1),
     "builder_argument": lambda: bad["methods"][method].setdefault("model", {}).update(encoder_nmae="x"),
     "top_level_key": lambda: bad.update(trian={"defaults": {"epochs": 1}}),
     "split_key": lambda: bad["split"].update(sead=1)}[typo]()
    write_params(project, bad)
    repro = dvc(project, "repro")
    assert repro.returncode != 0, repro.stdout[-2000:]
    assert "Running stage 'settings'" in repro.stdout and "Running stage 'split'" not in repro.stdout, repro.stdout[-3000:]
    errors = [line for line in repro.stdout.splitlines() if " ERROR " in line and "stages" not in line]
    assert len(errors) == 1 and ("epoch" in errors[0] or "encoder_nmae" in errors[0] or "trian" in errors[0]
                                 or "sead" in errors[0]), repro.stdout[-2000:]
    assert "Traceback" not in repro.stdout
    assert {p: p.read_bytes() for p in outputs} == outputs  # nothing finished was removed or rewritten
    write_params(project, good)
    fixed = dvc(project, "repro", "split")  # the fixed setting costs one settings check, no stage's work
    assert fixed.returncode == 0 and "Stage 'split' didn't change, skipping" in fixed.stdout, fixed.stdout[-2000:]
    assert "Running stage 'split'" not in fixed.stdout and "Running stage 'ingest'" not in fixed.stdout
