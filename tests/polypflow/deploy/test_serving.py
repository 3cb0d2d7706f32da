"""Serving the champion: the real `mlflow models serve` answers a frame with the mask `polypflow.deploy.predict` draws.

A tiny UNet is fitted for a few steps, logged by ``polypflow.deploy.serving.log_model`` and registered (alias ``champion``)
in a throwaway SQLite store; ``mlflow models serve -m models:/polyp-segmenter@champion --env-manager local``
runs on a free loopback port; each request format MLflow accepts is checked against the predict CLI on the
same files, and bad requests must get a 400 with the reason, not a 500 or a traceback.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from services import NO_PROXY, free_port, service, wait_http

from models import build_model
from polypflow.data.images import NORMALIZATION, to_tensor
from polypflow.deploy import predict
from polypflow.deploy.serving import log_model
from polypflow.infer.predictor import SizeLimits
from polypflow.settings.config import Promotion, load_params
from polypflow.track import registry
from polypflow.train.losses import build_loss
from tests.conftest import REPO, make_pair

pytestmark = pytest.mark.slow

KVASIR = REPO.parent / "shared" / "data" / "Kvasir-SEG" / "images"
KWARGS = {"encoder": "test_efficientnet", "pretrained": "none", "decoder_channels": [16, 16, 8, 8, 8]}
VALIDATE = load_params(REPO / "params.yaml").validate_
LIMITS = SizeLimits(VALIDATE.min_side, VALIDATE.max_side)  # validate.min_side/max_side: 64/4096


def tiny_trained_unet() -> torch.nn.Module:
    """The test UNet after a few steps on synthetic frames, so that its masks are neither empty nor full."""
    torch.manual_seed(0)
    model = build_model("unet", **KWARGS).train()
    pairs = [make_pair(s) for s in range(8)]
    x = to_tensor(np.stack([np.asarray(image) for image, _ in pairs]), "imagenet")
    y = torch.from_numpy(np.stack([np.asarray(mask) > 127 for _, mask in pairs])).float()[:, None]
    loss_fn, optimizer = build_loss("bce_dice"), torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return model.eval()


def frames(folder: Path) -> list[Path]:
    """A synthetic frame (96x80 PNG) and, where the data is present, one real Kvasir-SEG JPEG."""
    folder.mkdir()
    image, _ = make_pair(11, size=96)
    image.crop((0, 0, 96, 80)).save(folder / "synthetic.png")
    if KVASIR.is_dir():
        real = sorted(KVASIR.glob("*.jpg"))[0]
        (folder / real.name).write_bytes(real.read_bytes())
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> dict:
    """A store holding polyp-segmenter@champion; the predict CLI's outputs for the test frames."""
    import mlflow

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("serve", artifact_location=(root / "artifacts").as_uri())
    mean, std = NORMALIZATION["imagenet"]
    meta = {"method": "unet", "arch": "unet", "model_kwargs": KWARGS, "image_size": 64, "normalize": "imagenet",
            "mean": list(mean), "std": list(std), "threshold": 0.5, "val_dice": 0.5, "best_epoch": 1}
    with mlflow.start_run(experiment_id=experiment) as run:
        info = log_model(tiny_trained_unet(), meta, LIMITS)
    registry.register(info.model_uri, "unet", tags=meta, score=0.5, run_id=run.info.run_id,
                      promotion=Promotion(n_boot=100), global_name="polyp-segmenter")
    files = frames(root / "frames")
    predict.main(["--model", "models:/polyp-segmenter@champion", "--tracking-uri", uri, "--input",
                  str(root / "frames"), "--output", str(root / "predicted")])
    mlflow.set_tracking_uri(None)
    return {"uri": uri, "root": root, "files": files, "predicted": root / "predicted"}


@pytest.fixture(scope="module")
def server(champion) -> str:
    """``mlflow models serve`` of the champion on a free loopback port, stopped (process group) afterwards."""
    port, log = free_port(), champion["root"] / "serve.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/polyp-segmenter@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion["uri"],  # uvicorn from this venv, no pip at serve time
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with service(cmd, log, env=env, cwd=champion["root"]) as proc:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log, timeout=300)
        yield f"http://127.0.0.1:{port}"


def post(url: str, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def served_mask(prediction: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["mask"]))))


@pytest.mark.parametrize("form", ["dataframe_split", "dataframe_records", "inputs"])
def test_served_masks_equal_the_predict_cli(server, champion, form):
    files, table = champion["files"], pd.read_csv(champion["predicted"] / "predictions.csv").set_index("image")
    images = [b64(path.read_bytes()) for path in files]
    body = {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]},
            "dataframe_records": [{"image": image} for image in images],
            "inputs": {"image": images}}[form]
    status, answer = post(server, {form: body})
    assert status == 200, answer
    assert len(answer["predictions"]) == len(files) == (2 if KVASIR.is_dir() else 1)
    for path, prediction in zip(files, answer["predictions"], strict=True):
        mask = served_mask(prediction)
        expected = np.asarray(Image.open(champion["predicted"] / "masks" / f"{path.stem}.png"))
        assert mask.shape == expected.shape == np.asarray(Image.open(path)).shape[:2]
        assert set(np.unique(mask)) <= {0, 255} and 0 < (mask > 0).mean() < 1
        np.testing.assert_array_equal(mask, expected)  # pixel for pixel
        row = table.loc[path.name]  # the CSV keeps 17 significant digits
        assert prediction["polyp_fraction"] == pytest.approx(row["polyp_fraction"], rel=1e-12)
        assert prediction["max_probability"] == pytest.approx(row["max_probability"], rel=1e-12)


def test_threshold_param_and_data_url(server, champion):
    path = champion["files"][0]
    url = f"data:image/png;base64,{b64(path.read_bytes())}"
    fractions = []
    for threshold in (0.2, 0.8):
        status, answer = post(server, {"dataframe_records": [{"image": url}], "params": {"threshold": threshold}})
        assert status == 200, answer
        fractions.append(answer["predictions"][0]["polyp_fraction"])
    assert fractions[0] > fractions[1]


BAD = {
    "not base64": ({"dataframe_split": {"columns": ["image"], "data": [["%%% not base64 %%%"]]}}, "not base64"),
    "not an image": ({"dataframe_split": {"columns": ["image"], "data": [[b64(b"hello, world")]]}},
                     "not a decodable image"),
    "1x1 image": ({"dataframe_split": {"columns": ["image"], "data": [[b64(png(np.zeros((1, 1, 3), np.uint8)))]]}},
                  "1x1 pixels: each side must be 64..4096"),
    "2 channels": ({"dataframe_split": {"columns": ["image"],
                                        "data": [[b64(png(np.zeros((80, 80, 2), np.uint8), "LA"))]]}},
                   "expected 3 channels (RGB), found 2"),
    "missing column": ({"dataframe_split": {"columns": ["picture"], "data": [["abc"]]}},
                       "Model is missing inputs ['image']"),
    "second row bad": ({"dataframe_records": [{"image": b64(png(np.zeros((80, 80, 3), np.uint8)))},
                                              {"image": "abc"}]}, "row 1: not base64"),
    "bad threshold": ({"dataframe_split": {"columns": ["image"], "data": [["abc"]]}, "params": {"threshold": 1.5}},
                      "threshold must be in (0, 1)"),
    "no input key": ({"images": ["abc"]}, "The input must be a JSON dictionary with exactly one of the input fields"),
    "not JSON": (b"{not json", "Ensure that input is a valid JSON formatted string"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_400_with_the_reason(server, case):
    body, reason = BAD[case]
    status, answer = post(server, body)
    assert status == 400, answer
    assert reason in answer["message"], answer["message"]
    assert answer["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    assert "stack_trace" not in answer and "Traceback" not in answer["message"]
