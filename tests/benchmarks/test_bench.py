"""The benchmark in --quick mode on one tiny method: JSON schema, sane values, failures recorded not raised."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench
from benchmarks.bench import inference


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
    import torch

    from polypflow.training import bf16_pays
    assert train["amp"] == ("bf16" if bf16_pays(torch.device("cpu")) else "off")  # as the trainer trains here
    data = result["data"]
    assert data["source"].startswith("synthetic") and data["cache_build_images_per_s"] > 0
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in data["rows"])
    assert data["keeps_up"] and data["keeps_up"][0]["ratio"] > 0
    assert "ort_cpu_fp16" in md and "failed: " in md and "## Training throughput" in md
    assert any(t["target"].startswith("ORT CPU latency") for t in result["targets"]) or result["meta"]["device"] != "cpu"


def test_int8_model_is_quantised_and_close_to_fp32(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from models import build_model, method_entry
    from polypflow.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build_model("fcn", **{**method_entry("fcn").test_kwargs, "pretrained": "none"}).eval()
    fp32 = export_onnx(model, tmp_path / "fcn.onnx", image_size=64)
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
