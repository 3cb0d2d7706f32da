"""Shared fixtures: tiny synthetic polyp datasets (64x64) and throwaway DVC projects that use them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
CODE = ("stages", "polypflow", "models", "flows", "references")  # references/: the report stage reads paper_figures.yaml
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(autouse=True)
def isolated_mlflow_uri():
    """MLflow keeps the tracking URI in a process global and copies it into os.environ: reset both after
    each test, so a test that pointed MLflow at its own (since stopped) server cannot leak into the next."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def make_pair(seed: int, size: int = 64) -> tuple[Image.Image, Image.Image]:
    """A colonoscopy-like frame: pinkish textured background, a redder elliptical polyp, and its mask."""
    rng = np.random.default_rng(seed)
    base = np.array([180, 110, 100]) + rng.normal(0, 12, (size, size, 3))
    mask = Image.new("L", (size, size), 0)
    cx, cy = rng.integers(size // 4, 3 * size // 4, 2)
    rx, ry = rng.integers(size // 8, size // 4, 2)
    ImageDraw.Draw(mask).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    inside = np.asarray(mask) > 0
    base[inside] = base[inside] * [1.15, 0.7, 0.6] + 20
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    return image, mask


def make_dataset(root: Path, n: int, seed: int = 0, image_ext: str = ".png", mask_ext: str = ".png") -> Path:
    """``root/images/<i>.<ext>`` and ``root/masks/<i>.<ext>`` for i = 1..n (numbered like ClinicDB)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        image, mask = make_pair(seed * 1000 + i)
        image.save(root / "images" / f"{i}{image_ext}")
        mask.save(root / "masks" / f"{i}{mask_ext}")
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Three small datasets: alpha (24, JPEG masks like Kvasir), beta (16, in 4 sequences), gamma (10)."""
    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(root / "alpha", 24, seed=1, image_ext=".jpg", mask_ext=".jpg")
    make_dataset(root / "beta", 16, seed=2)
    make_dataset(root / "gamma", 10, seed=3)
    return root


def synthetic_params(data_root: Path) -> dict:
    """The repository's params.yaml, shrunk to the synthetic data and tiny models."""
    params = read_params(REPO)
    params["ingest"]["root"] = str(data_root)
    params["ingest"]["datasets"] = {
        "alpha": {"name": "Alpha", "source": {"kind": "local", "path": "alpha"}},
        "beta": {"name": "Beta", "source": {"kind": "local", "path": "beta"},
                 "sequences": [[1, 4], [5, 8], [9, 12], [13, 16]]},
        "gamma": {"name": "Gamma", "source": {"kind": "local", "path": "gamma"}},
    }
    params["validate"].update(min_side=32, max_duplicate_fraction_within=0.0)
    params["split"].update(scheme="70_15_15", datasets=["alpha", "beta"], unseen=["gamma"], folds=2,
                           test_lists=str(data_root))  # a folder that exists (a DVC dependency of split)
    params["train"]["methods"] = ["unet"]
    params["train"]["defaults"].update(image_size=64, epochs=2, batch_size=4, max_train_items=None, lr=3e-3)
    params["methods"] = {"unet": {"model": {"encoder": "test_efficientnet", "pretrained": "none",
                                            "decoder_channels": [16, 16, 8, 8, 8]}}}
    params["crossval"] = {"method": "unet", "recipe": {"epochs": 1}}
    params["report"]["pairs"] = []  # the repository's pairs name its methods
    params["external"] = {}  # the repository's external maps are for its own datasets
    params["evaluate"].update(pr_points=5, batch_size=8)
    params["profile"].update(macs_image_size=64, warmup=1, iterations=2, ort_sizes=[], ort_threads=[1])  # grid: test_export_int8
    params["export"].update(int8_calibration_images=4)
    return params


def read_params(project: Path) -> dict:
    """A project's settings (params.yaml and the files beside it), merged into one dict."""
    from polypflow.settings.config import read_settings

    return read_settings(project / "params.yaml")[0]


def write_params(project: Path, params: dict) -> Path:
    """Write one merged settings dict as the project's params.yaml and the settings files beside it."""
    from polypflow.settings.config import split_settings

    for name, part in split_settings(params).items():
        (project / name).write_text(yaml.safe_dump(part, sort_keys=False))
    return project / "params.yaml"


def stage_workdir(tmp_path: Path, data_root: Path, monkeypatch) -> Path:
    """A project without DVC (a stage's ``run()`` needs only params.yaml and the cwd), over ``data_root``."""
    root = tmp_path / "work"
    root.mkdir()
    write_params(root, synthetic_params(data_root))
    monkeypatch.chdir(root)
    return root


def split_workdir(tmp_path: Path, data_root: Path, monkeypatch, change=None):
    """A :func:`stage_workdir` with its own MLflow store, its settings changed in place by ``change`` (a function of
    the merged settings dict) when given, then ingested, validated and split: what the stages after split need.
    Returns its settings (``Params``)."""
    from polypflow.settings.config import load_params
    from stages import ingest, split, validate

    root = stage_workdir(tmp_path, data_root, monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    if change is not None:
        settings = read_params(root)
        change(settings)
        write_params(root, settings)
    params = load_params("params.yaml")
    for stage in (ingest, validate, split):
        stage.run(params)
    return params


@pytest.fixture
def project(tmp_path, synthetic_root, monkeypatch) -> Path:
    """A fresh DVC project (no git): the repo's code and dvc.yaml, test params; the cwd is set to it."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for package in CODE:  # the stages' code is a DVC dependency, so the project carries a copy
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(root, synthetic_params(synthetic_root))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    monkeypatch.chdir(root)
    # dvc.yaml says `python`: the interpreter running the tests, as an activated venv would provide
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    return root


def placement(splits: dict) -> dict[str, str]:
    """key -> 'train' | 'val' | 'test'; fails if a key is listed twice."""
    listed = [(k, "train") for k in splits["train"]] + [(k, "val") for k in splits["val"]]
    listed += [(k, "test") for keys in splits["test"].values() for k in keys]
    place = dict(listed)
    assert len(place) == len(listed), "an image sits in more than one set"
    return place


IN_CI = os.environ.get("CI") == "true"  # .ci/run: every service and ../shared are there, so nothing may skip


def unless_present(present: bool, reason: str) -> pytest.MarkDecorator:
    """Skip where ``reason`` holds on a contributor's machine; under CI the test runs (and fails if it is absent):
    CI must not go green by skipping."""
    return pytest.mark.skipif(not present and not IN_CI, reason=reason)


def skip_or_fail(reason: str) -> None:
    """``pytest.skip`` on a contributor's machine, ``pytest.fail`` under CI (a missing service is a failure there)."""
    (pytest.fail if IN_CI else pytest.skip)(reason)


def conv_weights(graph: Path | str) -> dict[str, bool]:
    """Each Conv's weight in ONNX graph ``graph`` -> whether it reaches the Conv quantised (through a DequantizeLinear
    of int8 values) rather than as a float32 initializer; keyed by the float initializer's name or the int8 one's."""
    nodes = onnx.load(str(graph)).graph.node
    made_by = {out: node for node in nodes for out in node.output}
    weights = {}
    for node in (n for n in nodes if n.op_type == "Conv"):
        source = made_by.get(node.input[1])
        quantised = source is not None and source.op_type == "DequantizeLinear"
        weights[source.input[0] if quantised else node.input[1]] = quantised
    return weights


def float_weights(graph: Path | str) -> list[str]:
    """The Conv weights of ``graph`` left in float32 (:func:`conv_weights`)."""
    return [name for name, quantised in conv_weights(graph).items() if not quantised]
