"""A detection method through the same stages as a segmenter: train@, evaluate@, export@, profile@, register@."""

from __future__ import annotations

import base64
import json

import onnx
import pandas as pd
import pytest

from conftest import REPO, make_pair, read_params, split_workdir, write_params
from polypflow.deploy import predict
from polypflow.infer.predictor import SizeLimits
from models import method_entry
from polypflow.settings.config import load_params
from polypflow.settings.layout import method_layout
from polypflow.tasks.graphs import graphs_at
from polypflow.train.checkpoint import load_trained
from stages import evaluate, export, profile, register, train
from stages import report as report_stage

DETECTOR = {"arch": "gfl_atss", "model": {**method_entry("gfl_atss").test_kwargs, "pretrained": "none"},
            "recipe": {"loss": "gfl", "epochs": 2}}


def with_detector(settings: dict) -> None:
    settings["methods"]["det"] = DETECTOR
    settings["train"]["methods"] = ["unet", "det"]
    settings["detection"]["min_box_area"] = 4
    settings["report"]["paper_figures"] = str(REPO / "references" / "paper_figures.yaml")


@pytest.fixture
def project(tmp_path, synthetic_root, monkeypatch):
    return split_workdir(tmp_path, synthetic_root, monkeypatch, with_detector)


def test_a_detector_trains_evaluates_exports_profiles_and_registers_through_the_stages(project, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    params, client, tables = project, MlflowClient(), []
    files = method_layout(params, "det")
    metrics = train.run(params, "det")
    assert set(metrics) >= {"val_ap50", "best_epoch", "threshold"} and "val_dice" not in metrics
    assert metrics["threshold"] == params.detection.match_score
    assert list(pd.read_csv(files.history).columns[:3]) == ["epoch", "train_loss", "val_ap50"]
    assert "val_score" in pd.read_csv(files.history).columns  # the task's selection score, what dvc.yaml plots
    assert list(pd.read_csv(files.val_scores).columns) == ["key", "f1"]

    summary = evaluate.run(params, "det")
    tested = {d for d, keys in json.loads(open(params.paths.splits).read())["test"].items() if keys}
    assert set(summary) == tested and "gamma" in tested  # the seen test parts and the unseen set
    for scores in summary.values():
        assert {"box_ap", "box_ap50", "box_ap75", "box_ar100", "f1", "n_boxes"} <= set(scores)
        assert scores["n_boxes"] >= scores["n"]  # every synthetic frame holds a polyp
        assert 0 <= scores["f1"] <= 1 and 0 <= scores["box_ap50"] <= 1  # every frame has a true box: AP is defined
    per_image = pd.read_csv(files.eval_table("per_image"))
    assert set(per_image.columns) >= {"key", "tp", "fp", "fn", "f1", "n_truth", "dataset", "protocol"}
    assert set(pd.read_csv(files.eval_table("pr")).columns) >= {"recall", "precision"}
    cases = pd.read_csv(files.cases)
    assert len(cases) and all((files.cases_dir / name).is_file() for name in cases["file"])

    report = export.run(params, "det")
    assert report["max_abs_diff"] <= params.export.atol and report["detections"]["same_count"]
    check = json.loads(files.int8_check.read_text())  # its int8 graph, scored by box F1 after the same NMS
    assert check == report["int8"] and check["quantised"] is True and check["score"] == "f1"
    assert check["metric"].startswith(f"box F1 at score {params.detection.match_score:g}")
    assert {n.op_type for n in onnx.load(str(files.int8_onnx)).graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert set(check["test_sets"]) == tested and check["budget"] == "export.int8_max_f1_drop"
    assert check["within_budget"] == (check["worst_drop"] <= params.export.int8_max_f1_drop)
    per_image = pd.read_csv(files.int8_scores, dtype={"key": str})
    for dataset, scores in check["test_sets"].items():
        part = per_image[per_image["dataset"] == dataset]
        assert len(part) == scores["n"] and part["int8"].mean() == pytest.approx(scores["int8"])
        # the fp32 graph on ONNX Runtime finds what the model found when evaluate@ scored it
        assert part["fp32"].mean() == pytest.approx(scores["fp32"]) == pytest.approx(summary[dataset]["f1"])
    logged = client.get_run(json.loads(files.run_record("export").read_text())["run_id"]).data.metrics
    assert {f"int8_{d}_f1" for d in tested} | {"int8_worst_f1_drop", "int8_within_budget"} <= set(logged)
    assert not any(name.endswith("_dice") for name in logged)
    cost = profile.run(params, "det")
    assert cost["params"] > 0 and cost["onnxruntime"]["p50_ms"] > 0
    model, meta = load_trained(files.model)  # profile@'s graphs at another size: the int8 one too
    at = graphs_at(params, "det", model, meta, 96, tmp_path / "graphs", check["weight_bits"])
    assert set(at) == {"fp32", "int8"}
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(at["int8"])).graph.node}

    record = register.run(params, "det")
    assert record["global"]["name"] == params.tracking.global_models["detection"] and record["champion"] is True
    version = client.get_model_version("det", "1")
    assert version.tags["task"] == "detection"
    assert "test_box_ap50.gamma" in version.tags
    row = client.get_run(record["run_id"]).data.metrics
    assert "val_ap50" in row and row["val_score"] == row["val_ap50"] and "test.gamma.dice" not in row

    # predict draws the boxes of the checkpoint and of the registered model alike; serving answers boxes
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        make_pair(900 + i, size=80)[0].save(frames / f"f{i}.png")
    limits = SizeLimits(params.validate_.min_side, params.validate_.max_side)
    for model in (str(files.model), "models:/det@champion"):
        out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
        table, skipped = predict.run(model, frames, out, 0.0, limits)
        assert not skipped and list(table.columns) == ["image", "boxes", "n_boxes", "max_score"]
        assert sorted(p.name for p in (out / "overlays").iterdir()) == ["f0.png", "f1.png", "f2.png"]
        assert all(len(json.loads(b)) == n for b, n in zip(table["boxes"], table["n_boxes"], strict=True))
        tables.append(table)
    assert tables[0]["boxes"].tolist() == tables[1]["boxes"].tolist()
    served = mlflow.pyfunc.load_model("models:/det@champion")
    encoded = base64.b64encode((frames / "f0.png").read_bytes()).decode()
    answer = served.predict(pd.DataFrame({"image": [encoded]}), params={"threshold": 0.0})
    assert json.loads(answer["boxes"][0]) == json.loads(tables[0]["boxes"][0])


    # the segmenter beside it: its mask's components scored as boxes by the same code, and both in the report
    train.run(params, "unet")
    seg = evaluate.run(params, "unet")
    for scores in seg.values():
        assert {"box_ap", "box_ap50", "box_ap75", "box_ar100"} <= set(scores)
        assert scores["box_ap50"] is None or 0 <= scores["box_ap50"] <= 1
        assert scores["box_ap"] is None or scores["box_ap"] <= scores["box_ap50"] + 1e-9
    for stage in (export, profile, register):
        stage.run(params, "unet")
    facts = report_stage.run(params)
    assert facts["methods"] == ["unet", "det"] and set(facts["mean_dice"]) == {f"unet.{d}" for d in seg}
    assert {f"det.{d}" for d in summary} | {f"unet.{d}" for d in seg} == set(facts["box_ap50"])
    html = (params.paths.reports / "report.html").read_text()
    assert "Detection: a dedicated detector" in html and "mask components" in html


def test_a_detector_with_a_segmentation_loss_is_refused_before_anything_is_trained(project, tmp_path):
    settings = read_params(tmp_path / "work")
    settings["methods"]["det"]["recipe"]["loss"] = "bce_dice"
    write_params(tmp_path / "work", settings)
    with pytest.raises(ValueError, match=r"methods\.det\.recipe\.loss.*'gfl'"):
        train.run(load_params("params.yaml"), "det")
    assert not method_layout(load_params("params.yaml"), "det").checkpoint.exists()
