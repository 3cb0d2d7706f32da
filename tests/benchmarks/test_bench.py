"""The benchmark in --quick mode on one tiny method: JSON schema, sane values, failures recorded not raised;
the paper timing trains the recipe profiles/paper.yaml sets."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from benchmarks import bench
from benchmarks.bench import inference, paper
from benchmarks.bench.common import Setup
from benchmarks.bench.report import paper_md
from polypflow.data.images import ImageSet
from polypflow.settings.config import Recipe
from polypflow.tasks.segmentation import SegmentationTask

PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "paper.yaml"


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()

    def broken_fp16(src, dst):
        raise RuntimeError("no fp16 today")

    mp.setattr(inference, "fp16_onnx", broken_fp16)  # one back-end fails: it must be recorded, not raised
    try:
        bench.run(["--quick", "--methods", "fcn", "--image-size", "64", "--batches", "1", "--iterations", "2",
                   "--skip-compile", "--out", str(out), "--data-root", str(out / "absent"), "--params", str(out / "none.yaml")])
    finally:
        mp.undo()
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_meta_and_probe(quick_result):
    result, _ = quick_result
    assert result["meta"]["device"] in ("cpu", "cuda") and result["meta"]["quick"] is True
    assert result["probe"]["peak_tflops"] > 0
    assert result["probe"]["fp32"]["tflops"] > 0


def test_inference_rows_are_sane(quick_result):
    result, _ = quick_result
    (model,) = result["models"]
    assert model["method"] == "fcn" and model["params"] > 0 and model["macs"] > 0 and model["ceiling_fps"] > 0
    rows = {r["backend"]: r for r in result["inference"]}
    assert {"eager_fp32", "amp_channels_last", "ort_cpu", "ort_cpu_fp16", "ort_cpu_int8"} <= set(rows)
    assert "compile" not in rows  # --skip-compile
    for name in ("eager_fp32", "amp_channels_last", "ort_cpu", "ort_cpu_int8"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["fps"] > 0
        assert row["speedup_vs_eager"] > 0 and row["fraction_of_ceiling"] > 0
    assert rows["eager_fp32"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert rows["ort_cpu_fp16"]["status"].startswith("failed: ") and "no fp16 today" in rows["ort_cpu_fp16"]["status"]


def test_training_data_and_report(quick_result):
    result, md = quick_result
    (train,) = result["training"]
    assert train["status"] == "ok" and train["images_per_s"] > 0
    assert train["recipe"] == "fallback" and train["optimizer"] == "adamw" and train["channels_last"] is True
    from polypflow.infer.device import bf16_pays
    assert train["amp"] == ("bf16" if bf16_pays(torch.device("cpu")) else "off")  # as the trainer trains here
    data = result["data"]
    assert data["source"].startswith("synthetic") and data["cache_build_images_per_s"] > 0
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in data["rows"])
    assert data["keeps_up"] and data["keeps_up"][0]["ratio"] > 0
    assert "ort_cpu_fp16" in md and "failed: " in md and "## Training throughput" in md
    assert any(t["target"].startswith("ORT CPU latency") for t in result["targets"]) or result["meta"]["device"] != "cpu"


def test_int8_model_is_quantised_and_close_to_fp32(tmp_path):
    import onnx
    import onnxruntime as ort

    from models import method_entry
    from polypflow.infer.onnx import export_onnx

    graph = inference.deployable("fcn", {**method_entry("fcn").test_kwargs, "pretrained": "none"})
    fp32 = export_onnx(graph, tmp_path / "fcn.onnx", 64, inference.OPSET, ("probability",))
    int8 = inference.int8_onnx(fp32, tmp_path / "fcn-int8.onnx", size=64)
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    outputs = [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
               for f in (fp32, int8)]
    fp32_out, int8_out = (o.ravel() for o in outputs)
    assert int8_out.shape == fp32_out.shape
    assert np.corrcoef(fp32_out, int8_out)[0, 1] > 0.9   # the untrained model's map varies little: compare shapes
    assert np.abs(int8_out - fp32_out).max() < 0.5 * np.ptp(fp32_out)


def profile_entry() -> tuple[dict, dict]:
    data = yaml.safe_load(PROFILE.read_text())
    return data, data["methods"][paper.PAPER_ENTRY]


@pytest.mark.quick
def test_paper_recipe_is_the_profiles_ic_polypseg_recipe():
    data, spec = profile_entry()
    settings = paper.paper_settings(PROFILE, None)
    expected = {**data["train"]["defaults"], **spec["recipe"]}  # as Params.recipe merges: defaults, then the entry
    recipe = settings.recipe.model_dump()
    assert {k: recipe[k] for k in expected} == expected
    assert set(settings.inherited) == set(recipe) - set(expected)
    assert settings.entry == "ic_polypseg_ef0" and settings.arch == "ic_polypseg"
    assert settings.kwargs == {**spec["model"], "pretrained": "none"} and settings.profile_model == spec["model"]


@pytest.mark.quick
def test_paper_recipe_takes_only_the_keys_the_profile_leaves_unset_from_params():
    base = Recipe(image_size=64, epochs=3, batch_size=2, optimizer="sgd", lr=0.5, weight_decay=0.0, scheduler="cosine",
                  loss="bce", augment="strong", normalize="half", early_stop_patience=1, amp=False)
    settings = paper.paper_settings(PROFILE, SimpleNamespace(train=SimpleNamespace(defaults=base)))
    data, spec = profile_entry()
    assert settings.recipe.normalize == "half" and settings.recipe.amp is False        # unset in the profile
    assert settings.recipe.epochs == data["train"]["defaults"]["epochs"] and settings.recipe.loss == spec["recipe"]["loss"]
    assert settings.inherited["normalize"] == "half" and settings.inherited_from == "params.yaml train.defaults"


@pytest.mark.quick
def test_paper_timing_fits_the_profiles_model_and_recipe(tmp_path, monkeypatch):
    seen = {}

    def fake_fit(model, recipe, train, val, device, checkpoint, seed, task, on_epoch):
        seen["recipe"], seen["task"] = recipe, task
        for epoch in range(recipe.epochs):
            on_epoch(epoch + 1, {})

    def fake_data(params, items, seed, size):
        seen["size"] = size
        make = lambda n: ImageSet([f"s/{i}" for i in range(n)], np.zeros((n, 8, 8, 3), np.uint8),  # noqa: E731
                                  np.zeros((n, 8, 8), np.uint8))
        return make(items), make(1), {"data": "fake", "train": 40, "val": 4}

    monkeypatch.setattr(paper, "fit", fake_fit)
    monkeypatch.setattr(paper, "paper_data", fake_data)
    monkeypatch.setattr(paper, "build_model", lambda arch, **kwargs: seen.update(arch=arch, kwargs=kwargs))
    setup = Setup(torch.device("cpu"), torch.bfloat16, 0, 1, "default", tmp_path)
    report = paper.bench_paper(None, PROFILE, 2, 4, setup)
    settings = paper.paper_settings(PROFILE, None)
    assert seen["recipe"].model_dump() == {**settings.recipe.model_dump(), "epochs": 2}
    assert isinstance(seen["task"], SegmentationTask) and seen["task"].recipe == seen["recipe"]  # trains what it times
    assert seen["size"] == settings.recipe.image_size and (seen["arch"], seen["kwargs"]) == (settings.arch, settings.kwargs)
    assert report["recipe"] == settings.recipe.model_dump() and report["epochs_full"] == settings.recipe.epochs
    assert report["settings"]["file"] == str(PROFILE) and report["settings"]["entry"] == "ic_polypseg_ef0"
    assert len(report["epoch_s"]) == 2 and report["full_epoch_s_estimate"] == pytest.approx(report["epoch_s"][-1] * 10)
    md = "\n".join(paper_md({"paper_ic_polypseg": report}))
    assert "`methods.ic_polypseg_ef0` of `" + str(PROFILE) + "`" in md and f"**{settings.recipe.epochs} epochs" in md


@pytest.mark.quick
def test_targets_are_judged_from_the_one_table():
    from benchmarks.bench.targets import evaluate_targets

    row = {"method": "ic_polypseg", "batch": 1, "backend": "compile", "status": "ok", "fps": 1200.0, "speedup_vs_eager": 2.5}
    result = {"meta": {"device": "cuda:0"}, "inference": [row], "paper_ic_polypseg": {"extrapolated_100_epochs_min": 9.0}}
    assert [(t["target"], t["met"]) for t in evaluate_targets(result)] == [
        ("EF0-class >= 1000 FPS at batch 1 on H100", True), ("EF0-class >= 3x PyTorch eager on H100", False),
        ("paper training of EF0 <= 10 min on H100", True)]
    cpu = {"meta": {"device": "cpu"}, "inference": [{**row, "backend": "ort_cpu_int8", "latency_vs_eager": 0.4}]}
    assert [(t["target"], t["met"]) for t in evaluate_targets(cpu)][-1] == (
        "ORT CPU int8 latency <= 0.5x eager (ic_polypseg, batch 1)", True)


@pytest.mark.quick
def test_synthetic_paper_data_has_the_protocols_sizes():
    assert paper.protocol_sizes(None) == {"train": 1305, "val": 145}  # PraNet: 900 + 550 train+val, 10 % val each
    split = SimpleNamespace(pranet_train={"kvasir": 100, "clinicdb": 50}, val_fraction_of_train=0.2)
    assert paper.protocol_sizes(SimpleNamespace(split=split)) == {"train": 120, "val": 30}
    train, val, report = paper.paper_data(None, 8, seed=0, size=32)
    assert (len(train.keys), len(val.keys), train.images.shape[1:]) == (8, 1, (32, 32, 3))
    assert report["data"].startswith("synthetic") and (report["train"], report["val"]) == (1305, 145)


def test_cpu_recipe_ablation_trains_through_the_plan_and_scores_validation_with_and_without_tta(
        tmp_path, synthetic_root, monkeypatch):
    """benchmarks.cpu_recipe on a synthetic project: one epoch with EMA, flip TTA of the selected weights, the
    threshold curve; the record names what was overridden and the raw weights' val Dice sits beside the EMA's."""
    from benchmarks import cpu_recipe
    from conftest import split_workdir

    split_workdir(tmp_path, synthetic_root, monkeypatch)
    cpu_recipe.main(["--name", "t", "--profile", "default", "--epochs", "1", "--set", "ema_decay=0.9",
                     "--model", "tta=hflip", "--out", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "t.json").read_text())
    assert record["overrides"] == {"recipe": {"ema_decay": 0.9, "epochs": 1}, "model": {"tta": "hflip"}}
    assert record["recipe"]["ema_decay"] == 0.9 and record["model"]["tta"] == "hflip"
    assert len(record["epoch_s"]) == len(record["history"]) == 1
    assert {"val_dice", "val_dice_raw"} <= record["history"][0].keys()
    assert set(record["val"]) == {"none", "hflip", "hvflip"}
    for figures in record["val"].values():
        assert 0 <= figures["dice_0.5"] <= figures["dice_best"] <= 1
        assert figures["dice_best"] == max(figures["curve"].values())
    with pytest.raises(SystemExit, match="key=value"):
        cpu_recipe.main(["--name", "u", "--profile", "default", "--epochs", "1", "--set", "ema_decay"])
