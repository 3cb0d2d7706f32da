"""predict CLI with an ONNX file and with an MLflow registry URI (throwaway sqlite store); promotion."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from torch import nn

from polypflow import predict, tracking
from polypflow.config import Promotion, load_params
from polypflow.onnx_export import ProbabilityHead

SIZE = 32


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


def torch_detector() -> nn.Module:
    """The same detector from stock modules; Unflatten makes ``model(x)[0]`` the N×1×H×W map."""
    conv = nn.Conv2d(3, 1, 1)
    w, b = red_detector_weights()
    conv.weight.data, conv.bias.data = torch.from_numpy(w), torch.from_numpy(b)
    return ProbabilityHead(nn.Sequential(conv, nn.Unflatten(0, (1, -1)))).eval()


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
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, SIZE, SIZE), "image")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, SIZE, SIZE), "probability")]))
    with mlflow.start_run(experiment_id=experiment) as run:
        info = mlflow.pytorch.log_model(torch_detector(), name="model", signature=signature,
                                        serialization_format="pickle", pip_requirements=["torch"])
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
        client.log_text(run_id, table.to_csv(index=False), tracking.VAL_SCORES_ARTIFACT)
        tags = {"threshold": 0.5, "image_size": SIZE, "onnx": f"runs:/{run_id}/onnx/model.onnx"}
        registered.append(tracking.register(uri, "red", tags, float(scores_.mean()), val(scores_),
                                            f"runs:/{run_id}/{tracking.VAL_SCORES_ARTIFACT}", run_id,
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

    folder, expected = images
    predict.main(["--model", "models:/polyp-segmenter@champion", "--input", str(folder), "--output", str(tmp_path / "o")])
    check_outputs(tmp_path / "o", expected)
    assert predict.load_segmenter("models:/red/1").threshold == 0.5  # the version's threshold tag


# --- a served (pyfunc) model through the CLI; user errors (issue 14, item 5) ----------------------------------

def test_predict_from_a_pyfunc_version_equals_its_checkpoint(tmp_path, images, store):
    from models import build_model
    from polypflow import serving
    from polypflow.inference import SizeLimits
    from polypflow.training import save_trained

    torch.manual_seed(0)
    kwargs = {"encoder": "test_efficientnet", "pretrained": "none", "decoder_channels": [16, 16, 8, 8, 8]}
    model = build_model("unet", **kwargs).eval()
    meta = {"arch": "unet", "model_kwargs": kwargs, "image_size": 64, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "threshold": 0.45}
    import mlflow

    with mlflow.start_run(experiment_id=store) as run:
        info = serving.log_model(model, meta)
    tracking.register(info.model_uri, "tiny", {"threshold": 0.45}, 0.5, run_id=run.info.run_id)
    save_trained(tmp_path / "model.pt", model, **meta)

    folder, _ = images
    predict.main(["--model", "models:/tiny@champion", "--input", str(folder), "--output", str(tmp_path / "o")])
    reference = predict.load_segmenter(str(tmp_path / "model.pt"))
    unwrapped = mlflow.pyfunc.load_model("models:/tiny@champion").unwrap_python_model().predictor
    assert reference.threshold == unwrapped.threshold == 0.45 and unwrapped.image_size == 64
    served = mlflow.pyfunc.load_model("models:/tiny@champion", model_config={"min_side": 32}).unwrap_python_model()
    assert served.limits == SizeLimits(32, 4096)  # what SERVING_MODEL_CONFIG does to `mlflow models serve`
    for path in sorted(folder.glob("*.png")):
        image = np.asarray(Image.open(path).convert("RGB"))
        expected = reference.predict([image])[0] >= 0.45
        written = np.asarray(Image.open(tmp_path / "o" / "masks" / path.name))
        np.testing.assert_array_equal(written, expected.astype(np.uint8) * 255)


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


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


def registered_red(store_uri: str, artifacts) -> None:
    """``red`` version 1 with alias champion in the store at ``store_uri``."""
    import mlflow

    mlflow.set_tracking_uri(store_uri)
    experiment = mlflow.create_experiment("t", artifact_location=artifacts.as_uri())
    uri, run_id = logged_model(experiment)
    tracking.register(uri, "red", {"threshold": 0.5, "image_size": SIZE}, 0.5, run_id=run_id)
    mlflow.set_tracking_uri(None)


def project(tmp_path, with_store: bool):
    """A project folder whose settings keep the default tracking.uri (sqlite:///mlflow/mlflow.db, relative)."""
    from polypflow.config import SETTINGS_FILES
    from tests.conftest import REPO

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
    folder, expected = images
    predict.main(["--model", "models:/red@champion", "--input", str(folder), "--output", str(tmp_path / "o")])
    check_outputs(tmp_path / "o", expected)
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
    from tests.conftest import REPO

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert predict.project_params()[0] == REPO


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
    (["--model", "x.pt", "--input", "no/such/folder"], "--input no/such/folder: no such folder"),
])
def test_user_errors_are_one_line(tmp_path, images, caplog, args, message):
    with pytest.raises(SystemExit) as exit_:
        predict.main([a.format(images=images[0]) for a in args] + ["--output", str(tmp_path / "o")])
    assert exit_.value.code == 1 and errors(caplog) == [message]
