"""The GPU run (benchmarks/gpu_run) on the CPU: the entry point itself with ``--device cpu --smoke`` on a small
bundle of synthetic data (schema, the loss going down, every test set scored, what it imports travels), and the real
bundle from ../shared within the device tool's 64 MiB."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_dataset, read_params, synthetic_params, unless_present, write_params

from benchmarks.bench.paper import PAPER_PROFILE
from benchmarks.gpu_run import bundle
from benchmarks.gpu_run.train import TimeUp, WallClock, train_settings
from polypflow.settings.config import load_params
from benchmarks.gpu_run.report import JSON, MARKDOWN
from models.encoders import OFFLINE_WEIGHTS

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
# What the GPU image holds (device KINDS.md, "Python packages already there"), as far as the run's imports reach
GPU_IMAGE = {"torch", "torchvision", "timm", "numpy", "pandas", "pyyaml", "pillow", "opencv-python-headless",
             "scikit-image", "scikit-learn", "scipy", "onnx", "onnxruntime", "tqdm", "matplotlib", "torchmetrics",
             "lightning-utilities", "huggingface-hub", "safetensors", "packaging", "sympy", "mpmath", "triton",
             "pyarrow", "python-dateutil", "six", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing",
             "joblib", "threadpoolctl", "psutil", "protobuf", "ml-dtypes", "lazy-loader", "rich", "regex", "setuptools",
             "filelock", "idna", "charset-normalizer", "anyio", "h11", "sniffio", "narwhals", "cloudpickle",
             "colorama", "cuda-bindings", "cuda-pathfinder", "typing-extensions"}
# Imported here only if installed, by what the image has in its own version, or a shared namespace: not needed there
SOFT = {"google-auth",                  # the top-level "google" is protobuf's namespace (onnx) too
        "pydot",                        # torch.fx's graph drawer, when present
        "pytz",                         # pandas' optional time zones
        "h2", "hpack", "hyperframe"}    # this machine's huggingface-hub (the image has its own) speaks HTTP/2


def requirements(names: set[str]) -> set[str]:
    """``names`` and everything they require, transitively, by this machine's metadata."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" not in req:
                todo.append(req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0]
                            .split("~")[0].strip().lower().replace("_", "-"))
    return seen


@pytest.mark.quick
def test_training_settings_are_the_paper_profiles_lite0_recipe_and_methods_yaml_model():
    params = load_params(REPO / "params.yaml")
    profile = yaml.safe_load((REPO / PAPER_PROFILE).read_text())
    expected = {**profile["train"]["defaults"], **profile["methods"][bundle.TRAIN_ENTRY]["recipe"]}
    settings = train_settings(params, expected["image_size"], smoke=False)
    assert {k: settings.recipe.model_dump()[k] for k in expected} == expected
    assert (settings.arch, settings.kwargs) == params.method_arch(bundle.TRAIN_ENTRY)
    with pytest.raises(bundle.BundleError, match=r"bundle's images are 64 px.*rebuild it"):
        train_settings(params, 64, smoke=False)


@pytest.mark.quick
def test_wall_clock_stops_when_the_next_epoch_would_overrun():
    clock = WallClock(deadline=time.perf_counter() + 3600)
    clock(1, {})  # an epoch of a few microseconds: an hour holds many more
    clock.deadline = time.perf_counter()
    with pytest.raises(TimeUp):
        clock(2, {})
    assert len(clock.epoch_s) == 2


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A 64 px bundle of three synthetic datasets, then ``python -m benchmarks.gpu_run --device cpu --smoke`` on it
    exactly as the GPU command runs it (the bundle's weight package on PYTHONPATH)."""
    root = tmp_path_factory.mktemp("gpu_run")
    for name, n, seed, ext in (("alpha", 24, 1, ".jpg"), ("beta", 16, 2, ".png"), ("gamma", 10, 3, ".png")):
        make_dataset(root / "data" / name, n, seed=seed, image_ext=ext, mask_ext=ext)
    params = synthetic_params(root / "data")
    params["methods"][bundle.TRAIN_ENTRY] = read_params(REPO)["methods"][bundle.TRAIN_ENTRY]
    (root / "project").mkdir()
    params_path = write_params(root / "project", params)
    made = bundle.make_bundle(root / "bundle", params_path, size=64, wheels=False)
    env = {**os.environ, "PYTHONPATH": str(root / "bundle" / "site")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_run", "--device", "cpu", "--smoke", "--threads", "1",
                    "--minutes", "1", "--bundle", str(root / "bundle"), "--params", str(params_path),
                    "--out", str(root / "out")], cwd=REPO, env=env, check=True, timeout=300)
    seconds = time.perf_counter() - start
    return made, json.loads((root / "out" / JSON).read_text()), (root / "out" / MARKDOWN).read_text(), root, seconds


def test_smoke_trains_and_the_loss_goes_down(smoke):
    made, result, _, root, seconds = smoke
    t = result["training"]
    assert "status" not in t, t.get("status")
    assert t["epochs"] == len(t["history"]) == len(t["epoch_s"]) == 3  # --smoke: 3 epochs, well inside a minute
    assert t["history"][-1]["train_loss"] < t["history"][0]["train_loss"]
    assert t["train_images"] == made["train"] and t["val_images"] == made["val"]
    assert t["images_per_s"] > 0 and t["speeds"]["loader_images_per_s"] > 0 and t["speeds"]["step_images_per_s"] > 0
    assert t["recipe"]["optimizer"] == "adamw" and t["recipe"]["loss"] == "structure"  # the paper profile's recipe
    assert t["settings"]["model"] == {"encoder": "tf_efficientnet_lite0", "pretrained": "offline"}
    assert Path(t["settings"]["weights"]).is_relative_to(root / "bundle" / "site")  # the carried fp16 weights
    assert seconds < 60, f"the smoke run took {seconds:.0f} s"


def test_smoke_scores_every_test_set_with_the_projects_evaluation(smoke):
    made, result, markdown, _, _ = smoke
    scored = {k: v["n"] for k, v in result["test"].items()}
    assert scored == {k: n for k, n in made["test"].items() if n}  # every non-empty test set, every image
    for scores in result["test"].values():
        assert 0 <= scores["mdice"] <= 1 and 0 <= scores["meandic"] <= 1
        assert scores["mdice"] == scores["summary"]["dice"] and scores["meandic"] == scores["summary"]["tb_dice"]
    assert "### Test" in markdown and "### Training" in markdown and "### Speed" in markdown


def test_smoke_speed_rows(smoke):
    _, result, _, _, _ = smoke
    rows = result["speed"]["rows"]
    assert {r["method"] for r in rows} == {"ic_polypseg", "fcn"}
    for row in rows:
        if row["backend"] in ("eager_fp32", "amp_channels_last"):
            assert row["status"] == "ok" and row["fps"] > 0 and row["speedup_vs_eager"] > 0, row
        elif row["backend"] == "compile":
            assert row["status"].startswith("skipped: --smoke")
        else:  # the CPU build of onnxruntime has no CUDA or TensorRT provider: a row, not a crash
            assert row["backend"].startswith("ort_") and row["status"].startswith("not available")
    assert {r["batch"] for r in rows} == {1, 2}


def test_what_the_run_imports_is_on_the_gpu_or_travels(smoke):
    _, result, _, _, _ = smoke
    weights = {p.replace("_", "-") for p in OFFLINE_WEIGHTS.values()}
    travels = GPU_IMAGE | set(bundle.WHEELS) | weights
    missing = set(result["meta"]["distributions"]) - requirements(GPU_IMAGE) - travels - SOFT
    assert not missing, f"imported, neither on the GPU image nor in the bundle: {sorted(missing)}"


@unless_present(SHARED.is_dir(), "the real datasets (../shared/data) are not on this machine")
def test_the_real_bundle_fits_the_device_tools_64_mib(tmp_path):
    start = time.perf_counter()
    made = bundle.make_bundle(tmp_path / "bundle", REPO / "params.yaml")
    seconds = time.perf_counter() - start
    assert made["train"] + made["val"] == 1450 and made["test"] == {"kvasir": 100, "clinicdb": 62, "colondb": 380}
    assert made["image_size"] == 352
    travelling = bundle.travelling_bytes(REPO) + made["bundle_bytes"]
    assert travelling < bundle.TRAVEL_LIMIT, f"{travelling} bytes would travel"
    assert seconds < 90, f"building the bundle took {seconds:.0f} s"
    wheels = {w.split("-")[0].lower().replace("_", "-") for w in made["wheels"]}
    assert wheels == set(bundle.WHEELS)
    # the fp16 weights are the fp32 ones to fp16's precision
    (package,) = made["weights"]
    (fp16,) = (tmp_path / "bundle" / "site" / package / "models").glob("*.pth")
    (fp32,) = (Path(importlib.util.find_spec(package).origin).parent / "models").glob(fp16.name)
    half, full = torch.load(fp16, weights_only=True), torch.load(fp32, weights_only=True)
    assert list(half) == list(full)
    for key, tensor in full.items():
        assert torch.allclose(half[key].float(), tensor.float(), rtol=1e-3, atol=1e-4), key
