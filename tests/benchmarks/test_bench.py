"""The benchmark in --quick mode on one tiny method: JSON schema, sane values, failures recorded not raised."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()

    def broken_fp16(src, dst):
        raise RuntimeError("no fp16 today")

    mp.setattr(bench, "fp16_onnx", broken_fp16)  # one back-end fails: it must be recorded, not raised
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
    assert {"eager_fp32", "amp_channels_last", "ort_cpu", "ort_cpu_fp16"} <= set(rows)
    assert "compile" not in rows  # --skip-compile
    for name in ("eager_fp32", "amp_channels_last", "ort_cpu"):
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
    data = result["data"]
    assert data["source"].startswith("synthetic") and data["cache_build_images_per_s"] > 0
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in data["rows"])
    assert data["keeps_up"] and data["keeps_up"][0]["ratio"] > 0
    assert "ort_cpu_fp16" in md and "failed: " in md and "## Training throughput" in md
    assert any(t["target"].startswith("ORT CPU latency") for t in result["targets"]) or result["meta"]["device"] != "cpu"
