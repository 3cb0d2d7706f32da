"""predict CLI with an ONNX file, a checkpoint and an MLflow registry URI (throwaway sqlite store); promotion."""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from torch import nn

from models import build_model
from polypflow.data.images import NORMALIZATION
from polypflow.deploy import predict, serving
from polypflow.deploy.load import load_predictor
from polypflow.infer.predictor import Predictor, SizeLimits
from polypflow.settings.config import Promotion, load_params
from polypflow.tasks.segmentation import SegmentationTask
from polypflow.track import registry
from polypflow.track.runs import VAL_SCORES_ARTIFACT
from polypflow.track.uri import nearest_project
from polypflow.train.checkpoint import save_trained
from tests.conftest import REPO

SIZE = 32
VALIDATE = load_params(REPO / "params.yaml").validate_
LIMITS = SizeLimits(VALIDATE.min_side, VALIDATE.max_side)  # validate.min_side/max_side: 64/4096
KWARGS = {"encoder": "test_efficientnet", "pretrained": "none", "decoder_channels": [16, 16, 8, 8, 8]}
META = {"arch": "unet", "model_kwargs": KWARGS, "image_size": 64, "mean": list(NORMALIZATION["imagenet"][0]),
        "std": list(NORMALIZATION["imagenet"][1]), "threshold": 0.45}


def red_detector_weights() -> tuple[np.ndarray, np.ndarray]:
    """logit = 20 * (R - G) - 2: red polyp pixels -> ~1, grey background -> ~0.12."""
    return np.array([20.0, -20.0, 0.0], np.float32).reshape(1, 3, 1, 1), np.array([-2.0], np.float32)


def write_onnx(path) -> None:
    w, b = red_detector_weights()
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logit"]), helper.make_node("Sigmoid", ["logit"], ["probability"])],
        "red", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()), helper.make_tensor("b", TensorProto.FLOAT, b.shape, b)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@functools.cache
def tiny_unet() -> nn.Module:
    """The test UNet (seeded, untrained): what the MLflow models and checkpoints of these tests hold."""
    torch.manual_seed(0)
    return build_model("unet", **KWARGS).eval()


def reference(threshold: float) -> Predictor:
    """The tiny UNet's predictor, straight from the module (no file, no store)."""
    return SegmentationTask.predictor(tiny_unet(), META, threshold)


@pytest.fixture
def images(tmp_path):
    """Two grey 64×80 frames (validate.min_side is 64) with a red square; the expected masks."""
    folder, expected = tmp_path / "in", {}
    folder.mkdir()
    for i, (y, x) in enumerate([(10, 10), (30, 40)]):
        image = np.full((64, 80, 3), 128, np.uint8)
        image[y:y + 20, x:x + 20] = (220, 40, 40)
        Image.fromarray(image).save(folder / f"frame{i}.png")
        mask = np.zeros((64, 80), bool)
        mask[y:y + 20, x:x + 20] = True
        expected[f"frame{i}"] = mask
    (folder / "notes.txt").write_text("not an image")
    return folder, expected


def check_outputs(out, expected) -> None:
    for stem, mask in expected.items():
        written = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert written.shape == mask.shape and set(np.unique(written)) <= {0, 255}
        agreement = ((written > 0) == mask).mean()
        assert agreement > 0.95, agreement  # edges blur through the 32-px model size
        overlay = np.asarray(Image.open(out / "overlays" / f"{stem}.png"))
        assert overlay.shape == (*mask.shape, 3)
    table = pd.read_csv(out / "predictions.csv")
    assert list(table["image"]) == ["frame0.png", "frame1.png"]


def check_model_outputs(out, folder, threshold: float) -> None:
    """What the tiny UNet predicts at ``threshold`` for each frame of ``folder``, written by the CLI."""
    predictor = reference(threshold)
    for path in sorted(folder.glob("*.png")):
        image = np.asarray(Image.open(path).convert("RGB"))
        expected = predictor.keep(predictor.predict([image])[0])
        written = np.asarray(Image.open(out / "masks" / path.name))
        np.testing.assert_array_equal(written, expected.astype(np.uint8) * 255)
        assert np.asarray(Image.open(out / "overlays" / path.name)).shape == image.shape
    table = pd.read_csv(out / "predictions.csv")
    assert list(table["image"]) == ["frame0.png", "frame1.png"]


@pytest.mark.quick
def test_predict_with_onnx(tmp_path, images):
    folder, expected = images
    model = tmp_path / "red.onnx"
    write_onnx(model)
    predict.main(["--model", str(model), "--input", str(folder), "--output", str(tmp_path / "out")])
    check_outputs(tmp_path / "out", expected)


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    yield experiment
    mlflow.set_tracking_uri(None)


def logged_model(experiment: str) -> tuple[str, str]:
    """The tiny UNet logged as the served model (a PolypModel, threshold 0.45) in a new run."""
    import mlflow

    with mlflow.start_run(experiment_id=experiment) as run:
        info = serving.log_model(tiny_unet(), META, LIMITS)
    return info.model_uri, run.info.run_id


def val(values) -> pd.Series:
    return pd.Series(values, index=[f"v/{i}" for i in range(len(values))], dtype=float)


def test_registry_promotion_and_predict_from_champion(tmp_path, images, store):
    from mlflow import MlflowClient

    client, rng = MlflowClient(), np.random.default_rng(0)
    base = rng.uniform(0.5, 0.9, 40)
    promotion, registered = Promotion(n_boot=500), []
    for scores_ in (base, base + rng.normal(0, 0.01, 40), base + 0.08):  # first, noise-level, clearly better
        uri, run_id = logged_model(store)
        table = val(scores_).rename("dice").rename_axis("key").reset_index()
        client.log_text(run_id, table.to_csv(index=False), VAL_SCORES_ARTIFACT)
        tags = {"threshold": 0.5, "image_size": 64, "onnx": f"runs:/{run_id}/onnx/model.onnx"}
        registered.append(registry.register(uri, "red", tags, float(scores_.mean()), val(scores_),
                                            f"runs:/{run_id}/{VAL_SCORES_ARTIFACT}", run_id,
                                            promotion=promotion, global_name="polyp-segmenter"))
    assert [r["champion"] for r in registered] == [True, False, True]
    assert [r["global"]["champion"] for r in registered] == [True, False, True]
    assert int(client.get_model_version_by_alias("red", "champion").version) == 3
    second = client.get_model_version("red", "2")
    assert second.tags["promotion.promote"] == "False" and "includes 0" in second.tags["promotion.reason"]
    run_tags = client.get_run(second.run_id).data.tags
    assert "promotion.method.ci_low" in run_tags and "promotion.global.promote" in run_tags
    glob = client.get_model_version_by_alias("polyp-segmenter", "champion")
    assert glob.tags["polypflow.method"] == "red" and glob.tags["onnx"].endswith("onnx/model.onnx")

    folder, _ = images
    predict.main(["--model", "models:/polyp-segmenter@champion", "--input", str(folder), "--output", str(tmp_path / "o")])
    check_model_outputs(tmp_path / "o", folder, 0.5)  # at the version's threshold tag, not the model's own 0.45
    task, predictor = load_predictor("models:/red/1")
    assert task is SegmentationTask and predictor.threshold == 0.5  # the version's threshold tag
    assert load_predictor("models:/red/1", threshold=0.3)[1].threshold == 0.3  # the caller's, before the tag


# --- a served (pyfunc) model through the CLI; user errors (issue 14, item 5) ----------------------------------

def test_predict_from_a_pyfunc_version_equals_its_checkpoint(tmp_path, images, store):
    import mlflow

    model, meta = tiny_unet(), META
    with mlflow.start_run(experiment_id=store) as run:
        info = serving.log_model(model, meta, LIMITS)
    registry.register(info.model_uri, "tiny", {"threshold": 0.45}, 0.5, run_id=run.info.run_id)
    save_trained(tmp_path / "model.pt", model, **meta)

    folder, _ = images
    predict.main(["--model", "models:/tiny@champion", "--input", str(folder), "--output", str(tmp_path / "o")])
    task, reference = load_predictor(str(tmp_path / "model.pt"))
    unwrapped = mlflow.pyfunc.load_model("models:/tiny@champion").unwrap_python_model()
    assert task is unwrapped.task is SegmentationTask
    assert reference.threshold == unwrapped.predictor.threshold == 0.45 and unwrapped.predictor.image_size == 64
    served = mlflow.pyfunc.load_model("models:/tiny@champion", model_config={"min_side": 32}).unwrap_python_model()
    assert served.limits == SizeLimits(32, 4096)  # what SERVING_MODEL_CONFIG does to `mlflow models serve`
    for path in sorted(folder.glob("*.png")):
        image = np.asarray(Image.open(path).convert("RGB"))
        expected = reference.predict([image])[0] >= 0.45
        written = np.asarray(Image.open(tmp_path / "o" / "masks" / path.name))
        np.testing.assert_array_equal(written, expected.astype(np.uint8) * 255)


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.quick
def test_bad_files_are_skipped_with_a_line_each_and_counted(tmp_path, images, caplog):
    folder, expected = images
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(folder / "dot.png")
    Image.fromarray(np.zeros((80, 80, 2), np.uint8), "LA").save(folder / "grey_alpha.png")
    model, out = tmp_path / "red.onnx", tmp_path / "out"
    write_onnx(model)
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--model", str(model), "--input", str(folder), "--output", str(out)])
    assert exit_.value.code == 3
    check_outputs(out, expected)  # the good frames are segmented and predictions.csv is written
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["frame0.png", "frame1.png"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left
    skipped = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records if "skipped" in r.getMessage()
               and r.levelno == logging.WARNING}
    assert "not a decodable image" in skipped[f"skipped {folder / 'broken.png'}"]
    assert "1x1 pixels: each side must be 64..4096" in skipped[f"skipped {folder / 'dot.png'}"]
    assert "expected 3 channels (RGB), found 2 (mode LA)" in skipped[f"skipped {folder / 'grey_alpha.png'}"]
    assert errors(caplog) == ["3 file(s) skipped: broken.png, dot.png, grey_alpha.png"]


def test_size_limits_can_be_set_on_the_command_line(tmp_path, images):
    folder, _ = images
    model, out = tmp_path / "red.onnx", tmp_path / "out"
    write_onnx(model)
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--model", str(model), "--input", str(folder), "--output", str(out), "--min-side", "72"])
    assert exit_.value.code == 3 and pd.read_csv(out / "predictions.csv").empty


def test_one_image_file_is_predicted_and_the_run_is_logged(tmp_path, images, caplog):
    folder, expected = images
    model, out = tmp_path / "red.onnx", tmp_path / "out"
    write_onnx(model)
    caplog.set_level(logging.INFO, logger="polypflow.deploy.predict")
    predict.main(["--model", str(model), "--input", str(folder / "frame1.png"), "--output", str(out)])
    assert list(pd.read_csv(out / "predictions.csv")["image"]) == ["frame1.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["frame1.png"]
    written = np.asarray(Image.open(out / "masks" / "frame1.png")) > 0
    assert (written == expected["frame1"]).mean() > 0.95
    assert any(r.getMessage().startswith(f"1 of 1 images predicted (segmentation) with {model} (threshold 0.500)")
               for r in caplog.records)


def test_inputs_with_the_same_stem_are_refused_naming_them_before_anything_is_written(tmp_path, images, caplog):
    folder, _ = images
    Image.open(folder / "frame0.png").convert("RGB").save(folder / "frame0.jpg")
    model, out = tmp_path / "red.onnx", tmp_path / "out"
    write_onnx(model)
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--model", str(model), "--input", str(folder), "--output", str(out)])
    assert exit_.value.code == 1 and not out.exists()
    assert errors(caplog) == [f"{folder}: inputs with the same name would write the same outputs: frame0.jpg and "
                              "frame0.png (rename or move one of each)"]


@pytest.mark.parametrize("threshold", ["0", "1", "1.5", "-0.1"])
def test_a_threshold_outside_the_segmenters_range_is_refused(tmp_path, images, caplog, threshold):
    folder, _ = images
    model, out = tmp_path / "red.onnx", tmp_path / "out"
    write_onnx(model)
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--model", str(model), "--input", str(folder), "--output", str(out), "--threshold", threshold])
    assert exit_.value.code == 1 and not out.exists()
    assert errors(caplog) == [f"threshold must be in (0, 1) (a pixel is polyp from this probability), got {float(threshold)}"]


def test_a_legacy_pytorch_flavour_model_is_refused_in_one_line(tmp_path, images, store, caplog):
    """Models logged before the one served model (a pickled torch module) are no longer loadable."""
    import mlflow

    with mlflow.start_run(experiment_id=store):
        info = mlflow.pytorch.log_model(nn.Sequential(nn.Conv2d(3, 1, 1)), name="model", pip_requirements=["torch"],
                                        serialization_format="pickle")
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--model", info.model_uri, "--input", str(images[0]), "--output", str(tmp_path / "o")])
    assert exit_.value.code == 1 and len(errors(caplog)) == 1 and not (tmp_path / "o").exists()


def registered_red(store_uri: str, artifacts) -> None:
    """``red`` version 1 (the tiny UNet, threshold tag 0.5) with alias champion in the store at ``store_uri``."""
    import mlflow

    mlflow.set_tracking_uri(store_uri)
    experiment = mlflow.create_experiment("t", artifact_location=artifacts.as_uri())
    uri, run_id = logged_model(experiment)
    registry.register(uri, "red", {"threshold": 0.5, "image_size": 64}, 0.5, run_id=run_id)
    mlflow.set_tracking_uri(None)


def project(tmp_path, with_store: bool):
    """A project folder whose settings keep the default tracking.uri (sqlite:///mlflow/mlflow.db, relative)."""
    from polypflow.settings.config import SETTINGS_FILES

    root = tmp_path / "project"
    (root / "sub" / "deeper").mkdir(parents=True)
    for name in ["params.yaml", *SETTINGS_FILES]:
        (root / name).write_text((REPO / name).read_text())
    assert load_params(root / "params.yaml").tracking.uri == "sqlite:///mlflow/mlflow.db"
    if with_store:
        (root / "mlflow").mkdir()
        registered_red(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", root / "mlflow" / "artifacts")
    return root


def test_the_store_is_found_from_a_subfolder_of_the_project(tmp_path, images, monkeypatch):
    root = project(tmp_path, with_store=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root / "sub" / "deeper")
    folder, _ = images
    predict.main(["--model", "models:/red@champion", "--input", str(folder), "--output", str(tmp_path / "o")])
    check_model_outputs(tmp_path / "o", folder, 0.5)
    assert not list((root / "sub").rglob("mlflow.db"))


def test_a_missing_store_is_one_line_and_nothing_is_created(tmp_path, images, monkeypatch, caplog):
    root = project(tmp_path, with_store=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root / "sub")
    folder, _ = images
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--model", "models:/red@champion", "--input", str(folder), "--output", str(tmp_path / "o")])
    assert exit_.value.code == 1
    assert errors(caplog) == [f"no MLflow store at {root / 'mlflow' / 'mlflow.db'} (tracking.uri of "
                              f"{root / 'params.yaml'}): train a model first (dvc repro), or pass --tracking-uri"]
    assert not list(root.rglob("mlflow.db")) and not (root / "mlflow").exists()


def test_outside_any_project_the_package_project_is_used(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert nearest_project()[0] == REPO


@pytest.mark.parametrize(("uri", "message"), [
    ("models:/blue@champion", "models:/blue@champion: no registered model 'blue' in sqlite:///{db} (registered: red)"),
    ("models:/red@best", "models:/red@best: model 'red' has no alias 'best' (aliases: champion)"),
    ("models:/red/7", "models:/red/7: model 'red' has no version 7 (versions: 1)"),
])
def test_a_missing_model_alias_or_version_is_one_clear_line(tmp_path, images, monkeypatch, caplog, uri, message):
    db = tmp_path / "mlflow.db"
    registered_red(f"sqlite:///{db}", tmp_path / "artifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    folder, _ = images
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--model", uri, "--input", str(folder), "--output", str(tmp_path / "o")])
    assert exit_.value.code == 1
    assert errors(caplog) == [message.format(db=db)]


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "nowhere/model.onnx", "--input", "{images}"], "--model nowhere/model.onnx: no such file"),
    (["--model", "x.pt", "--input", "no/such/folder"], "--input no/such/folder: no such file or folder"),
])
@pytest.mark.quick
def test_user_errors_are_one_line(tmp_path, images, caplog, args, message):
    with pytest.raises(SystemExit) as exit_:
        predict.main([a.format(images=images[0]) for a in args] + ["--output", str(tmp_path / "o")])
    assert exit_.value.code == 1 and errors(caplog) == [message]
