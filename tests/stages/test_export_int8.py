"""export@'s int8 graph and profile@'s fp32/int8 ORT grid on a tiny trained segmenter (a detector's: its stage test)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import numpy_helper

from conftest import REPO, float_weights, stage_workdir
from polypflow.settings.config import load_params
from polypflow.settings.layout import method_layout
from polypflow.tasks.graphs import graphs_at, int8_check
from polypflow.train.checkpoint import load_trained
from stages import export, ingest, profile, split, train, validate


@pytest.fixture
def trained(tmp_path, synthetic_root, monkeypatch):
    root = stage_workdir(tmp_path, synthetic_root, monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    params = load_params("params.yaml")
    params = params.model_copy(update={"train": params.train.model_copy(update={
        "defaults": params.train.defaults.model_copy(update={"epochs": 1})}),
        "profile": params.profile.model_copy(update={"ort_sizes": [64]})})  # the suite's other projects time no grid
    for stage in (ingest, validate, split):
        stage.run(params)
    train.run(params, "unet")
    return params


def test_export_writes_a_checked_int8_graph_and_profile_times_both_at_each_size(trained):
    from mlflow import MlflowClient

    params, files = trained, method_layout(trained, "unet")
    report = export.run(params, "unet")
    check = json.loads(files.int8_check.read_text())
    assert check == report["int8"] and check["quantised"] is True
    assert {n.op_type for n in onnx.load(str(files.int8_onnx)).graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    tested = {d for d, keys in json.loads(params.paths.splits.read_text())["test"].items() if keys}
    assert set(check["test_sets"]) == tested and check["calibration_images"] == params.export.int8_calibration_images
    for scores in check["test_sets"].values():
        assert 0 <= scores["int8"] <= 1 and scores["drop"] == pytest.approx(scores["fp32"] - scores["int8"])
    per_image = pd.read_csv(files.int8_scores, dtype={"key": str})  # each test image's Dice by each graph
    assert list(per_image.columns) == ["dataset", "key", "fp32", "int8"]
    test = json.loads(params.paths.splits.read_text())["test"]
    for dataset, scores in check["test_sets"].items():
        part = per_image[per_image["dataset"] == dataset]
        assert part["key"].tolist() == test[dataset] and len(part) == scores["n"]
        assert part["fp32"].mean() == pytest.approx(scores["fp32"]) and part["int8"].mean() == pytest.approx(scores["int8"])
    assert check["score"] == "dice" and check["budget"] == "export.int8_max_dice_drop"
    assert check["within_budget"] == (check["worst_drop"] <= params.export.int8_max_dice_drop)
    logged = MlflowClient().get_run(json.loads(files.run_record("export").read_text())["run_id"])
    assert {f"int8_{d}_dice" for d in tested} | {"int8_within_budget", "int8_worst_dice_drop"} <= set(logged.data.metrics)
    plain = json.loads(files.plain_check.read_text())  # no TTA: the shipped graphs are the plain network
    assert plain == report["plain"] and plain["applies"] is False and not files.plain_onnx.exists()
    assert not files.plain_scores.exists()
    assert not any(name.startswith("plain_") for name in logged.data.metrics)

    cost = profile.run(params, "unet")
    grid = {(r["graph"], r["precision"], r["size"], r["threads"]) for r in cost["ort_grid"]}
    cfg = params.profile
    assert grid == {("shipped", p, s, t) for p in ("fp32", "int8") for s in cfg.ort_sizes for t in cfg.ort_threads}
    for row in cost["ort_grid"]:
        assert set(row) == {"graph", "precision", "size", "threads", "batch", "p50_ms", "p95_ms", "fps"}
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["fps"] == pytest.approx(1e3 * row["batch"] / row["p50_ms"])
    assert json.loads(files.profile.read_text())["ort_grid"] == cost["ort_grid"]

    strict = params.model_copy(update={"export": params.export.model_copy(update={"atol": 1e-12})})
    with pytest.raises(RuntimeError, match="model.onnx: ONNX differs from PyTorch by .* > export.atol 1e-12"):
        export.run(strict, "unet")  # a graph over the tolerance is refused, naming its file ...
    assert json.loads(files.parity.read_text())["atol"] == 1e-12  # ... and what was measured is kept


def weight_range(graph) -> int:
    """The largest |int8 weight| of a QDQ graph: at most 64 when quantised in 7 bits, up to 127 in 8."""
    model = onnx.load(str(graph))
    return max(int(np.abs(numpy_helper.to_array(init)).max()) for init in model.graph.initializer
               if init.data_type == onnx.TensorProto.INT8)


def test_with_two_weight_ranges_the_one_dropping_least_on_validation_ships_and_profile_times_it(trained, tmp_path):
    params, files = trained, method_layout(trained, "unet")
    both = params.model_copy(update={"export": params.export.model_copy(update={"int8_weight_bits": [7, 8]})})
    check = export.run(both, "unet")["int8"]
    chosen = check["selection"]
    val = json.loads(params.paths.splits.read_text())["val"]
    assert chosen["on"] == "validation" and chosen["n"] == len(val) and set(chosen["candidates"]) == {"7", "8"}
    for scored in chosen["candidates"].values():
        assert scored["drop"] == pytest.approx(chosen["fp32"] - scored["int8"])
    drops = {int(bits): scored["drop"] for bits, scored in chosen["candidates"].items()}
    assert check["weight_bits"] == min(drops, key=drops.get) and str(check["weight_bits"]) in check["format"]
    assert json.loads(files.int8_check.read_text()) == check
    left = sorted(p.name for p in files.int8_dir.iterdir())
    assert left == ["check.json", "model.onnx", "per_image.csv"]  # no candidate left
    assert (weight_range(files.int8_onnx) <= 64) == (check["weight_bits"] == 7)  # the chosen graph is the one shipped

    model, meta = load_trained(files.model)
    for bits in (7, 8):  # the graphs profile@ times at other sizes are quantised in the range they are given ...
        at = graphs_at(both, "unet", model, meta, 64, tmp_path / f"{bits}bit", bits)
        assert (weight_range(at["int8"]) <= 64) == (bits == 7)
    assert profile.run(both, "unet")["ort_grid"]  # ... profile@ gives them the one export@ recorded ...
    stale = {k: v for k, v in check.items() if k != "weight_bits"}
    files.int8_check.write_text(json.dumps(stale))
    with pytest.raises(ValueError, match=r"int8/check.json: a quantised graph without weight_bits"):
        profile.run(both, "unet")  # ... and refuses a check.json that does not say which


def test_a_methods_float_modules_stay_float32_in_the_int8_graph_it_ships_and_the_ones_profile_times(trained, tmp_path):
    params, files, stem = trained, method_layout(trained, "unet"), "net.encoder.model.conv_stem"
    methods = {**params.methods, "unet": params.methods["unet"].model_copy(update={"int8_float_modules": [stem]})}
    mixed = params.model_copy(update={"methods": methods})
    check = export.run(mixed, "unet")["int8"]
    assert check["float_modules"] == [stem] and check["format"].endswith(f"; {stem} in float32")
    model, meta = load_trained(files.model)
    timed = graphs_at(mixed, "unet", model, meta, 64, tmp_path, check["weight_bits"])["int8"]
    for graph in (files.int8_onnx, timed):
        kept = float_weights(graph)
        assert len(kept) == 1 and f"{stem}." in kept[0]  # the stem's convolution, and only it
    assert float_weights(graphs_at(params, "unet", model, meta, 64, tmp_path / "all", 8)["int8"]) == []


@pytest.mark.quick
def test_an_int8_check_that_fails_leaves_no_earlier_graph_or_scores_to_pass_for_its_own(tmp_path):
    params = load_params(REPO / "params.yaml")
    dst, scores = tmp_path / "int8" / "model.onnx", tmp_path / "int8" / "per_image.csv"
    dst.parent.mkdir()
    dst.write_bytes(b"an earlier run's graph")
    scores.write_text("dataset,key,fp32,int8\n")
    with pytest.raises(FileNotFoundError):  # no fp32 graph to quantise
        int8_check(params, "ic_polypseg_lite0", {"arch": "ic_polypseg", "image_size": 64}, tmp_path / "none.onnx", dst,
                   scores)
    assert not dst.exists() and not scores.exists()
