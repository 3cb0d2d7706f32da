"""A segmenter shipped with flip TTA, EMA weights and a map temperature through the stages: what train@ validates, evaluate@ scores,
export@ writes to ONNX, predict draws and the registered model serves are the same TTA maps (issue 23: the figure a
user gets is the figure reported); its plain network is exported, scored and timed beside it."""

from __future__ import annotations

import base64
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_pair, split_workdir
from models.tta import FlipTTA, plain, temperature
from polypflow.data.images import load_image_set, read_facts, read_splits
from polypflow.deploy import predict
from polypflow.infer.onnx import onnx_session
from polypflow.infer.predictor import OnnxBackend, Predictor, SizeLimits
from polypflow.settings.layout import method_layout
from polypflow.tasks.segmentation import SegmentationTask, predict_probs
from polypflow.train.checkpoint import load_trained
from stages import evaluate, export, profile, register, train


def tta_and_ema(settings: dict) -> None:
    settings["methods"]["unet"]["model"]["tta"] = "hvflip"
    settings["train"]["defaults"]["ema_decay"] = 0.9
    settings["train"]["temperatures"] = [4.0]  # shipped whatever validation says: the path away from T = 1
    settings["profile"]["ort_sizes"] = [64]  # the grid, for the shipped graph and the plain network


@pytest.fixture
def params(tmp_path, synthetic_root, monkeypatch):
    return split_workdir(tmp_path, synthetic_root, monkeypatch, tta_and_ema)


def test_tta_and_ema_model_is_validated_evaluated_exported_predicted_and_served_alike(params, tmp_path):
    files = method_layout(params, "unet")
    train.run(params, "unet")
    assert "val_dice_raw" in pd.read_csv(files.history).columns
    model, meta = load_trained(files.model)
    assert isinstance(model, FlipTTA) and meta["model_kwargs"]["tta"] == "hvflip"
    assert meta["temperature"] == temperature(model) == 4.0 == json.loads(files.metrics.read_text())["temperature"]

    # evaluate@'s per-image Dice are those of the TTA maps, not of the plain network's
    evaluate.run(params, "unet")
    per_image = pd.read_csv(files.eval_table("per_image"))
    dataset, keys = next((d, k) for d, k in read_splits(params)["test"].items() if k)
    facts, task = read_facts(params), SegmentationTask(params)
    data = load_image_set(facts, keys, meta["image_size"], params.validate_.mask_threshold, params.paths.cache)
    maps = [predict_probs(m, data.images, meta["normalize"], torch.device("cpu")) for m in (model, plain(model))]
    with_tta, one_pass = task.dice_at_masks(keys, maps, params.evaluate.threshold, facts)
    scored = per_image[per_image["dataset"] == dataset].set_index("key").loc[keys, "dice"].to_numpy()
    np.testing.assert_allclose(scored, with_tta, atol=1e-6)
    assert np.abs(maps[0] - maps[1]).max() > 1e-3

    # the ONNX graph holds the flips; predict with it, with model.pt and the served model give the same masks
    report = export.run(params, "unet")
    assert report["max_abs_diff"] <= params.export.atol

    # beside it, the plain network (same weights, one pass): its fp32 and int8 graphs scored on every test set, timed
    bare = json.loads(files.plain_check.read_text())
    assert bare == report["plain"] and bare["applies"] and bare["shipped_tta"] == "hvflip" and bare["quantised"]
    assert bare["max_abs_diff"] <= params.export.atol and files.plain_onnx.exists() and files.plain_int8_onnx.exists()
    shipped = json.loads(files.int8_check.read_text())["test_sets"]
    assert set(bare["test_sets"]) == set(shipped)
    assert any(bare["test_sets"][d]["fp32"] != shipped[d]["fp32"] for d in shipped)  # not the TTA graph again
    graph = Predictor(OnnxBackend(onnx_session(files.plain_onnx)), meta["image_size"], 0.5)
    graph_maps = graph.predict_resized(data.images)
    np.testing.assert_allclose(graph_maps, maps[1], atol=1e-4)  # the plain network's maps
    per_image = pd.read_csv(files.plain_scores, dtype={"key": str})  # and their Dice, image by image
    scored = per_image[per_image["dataset"] == dataset].set_index("key").loc[keys, "fp32"].to_numpy()
    np.testing.assert_allclose(scored, task.dice_at_masks(keys, [graph_maps], meta["threshold"], facts)[0], atol=1e-9)
    assert scored.mean() == pytest.approx(bare["test_sets"][dataset]["fp32"])
    logged = mlflow.MlflowClient().get_run(json.loads(files.run_record("export").read_text())["run_id"])
    assert {f"plain_int8_{d}_dice" for d in shipped} <= set(logged.data.metrics)
    cost = profile.run(params, "unet")
    timed = {(r["graph"], r["precision"]) for r in cost["ort_grid"]}
    assert timed == {(g, p) for g in ("shipped", "plain") for p in ("fp32", "int8")}
    register.run(params, "unet")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        make_pair(700 + i, size=80)[0].save(frames / f"f{i}.png")
    limits = SizeLimits(params.validate_.min_side, params.validate_.max_side)
    tables = [predict.run(str(path), frames, tmp_path / f"out{n}", None, limits)[0]
              for n, path in enumerate((files.model, files.onnx))]
    np.testing.assert_allclose(tables[0]["polyp_fraction"], tables[1]["polyp_fraction"], atol=2e-3)
    served = mlflow.pyfunc.load_model("models:/unet@champion")
    encoded = base64.b64encode((frames / "f0.png").read_bytes()).decode()
    answer = served.predict(pd.DataFrame({"image": [encoded]}))
    assert answer["polyp_fraction"][0] == pytest.approx(tables[0]["polyp_fraction"][0], abs=1e-6)


def test_epochs_before_validate_from_are_logged_without_validation(tmp_path, synthetic_root, monkeypatch):
    """train@ with ``validate_from`` at the last epoch: history.csv keeps every epoch, the earlier ones with empty
    val_* cells, and the validated epoch is the one selected."""
    def late(settings: dict) -> None:
        tta_and_ema(settings)
        settings["methods"]["unet"].setdefault("recipe", {}).update(epochs=2, validate_from=2, early_stop_patience=1)
        settings["crossval"]["recipe"]["validate_from"] = 1  # crossval's 1-epoch recipe would refuse epoch 2

    params = split_workdir(tmp_path, synthetic_root, monkeypatch, late)
    files = method_layout(params, "unet")
    train.run(params, "unet")
    history = pd.read_csv(files.history)
    assert history["epoch"].tolist() == [1, 2] and history["train_loss"].notna().all()
    assert history["val_dice"].isna().tolist() == [True, False] == history["val_score"].isna().tolist()
    assert json.loads(files.metrics.read_text())["best_epoch"] == 2
