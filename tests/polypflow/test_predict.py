"""predict CLI with an ONNX file and with an MLflow registry URI (throwaway sqlite store); promotion."""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from torch import nn

from polypflow import predict, tracking
from polypflow.config import Promotion
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
    """Two grey 60×80 frames with a red square; the expected masks."""
    folder, expected = tmp_path / "in", {}
    folder.mkdir()
    for i, (y, x) in enumerate([(10, 10), (30, 40)]):
        image = np.full((60, 80, 3), 128, np.uint8)
        image[y:y + 20, x:x + 20] = (220, 40, 40)
        Image.fromarray(image).save(folder / f"frame{i}.png")
        mask = np.zeros((60, 80), bool)
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
        registered.append(tracking.register(uri, "red", {"threshold": 0.5, "image_size": SIZE}, float(scores_.mean()),
                                            val_scores=val(scores_), run_id=run_id, promotion=promotion,
                                            global_name="polyp-segmenter"))
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


# --- a served (pyfunc) model through the CLI ----------------------------------------------------------------

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
