"""The issue's speed targets, in one place, judged only where this device can judge them."""

from __future__ import annotations

TARGETS = {
    "ef0_fps_batch1_h100": 1000.0,
    "ef0_speedup_vs_eager_h100": 3.0,
    "ort_cpu_latency_vs_eager_cpu": 0.5,
    "paper_training_minutes_h100": 10.0,
}


def evaluate_targets(result: dict) -> list[dict]:
    """One row (target, measured, met) per target the result can speak to; ``met`` is "n/a" off the target's device."""
    cuda, rows = result["meta"]["device"].startswith("cuda"), result.get("inference", [])
    ok = [r for r in rows if r["status"] == "ok"]
    out = inference_targets([r for r in ok if r["method"] == "ic_polypseg" and r["batch"] == 1], cuda)
    if not cuda:
        out += ort_cpu_targets(ok)
    paper = result.get("paper_ic_polypseg", {})
    if "extrapolated_100_epochs_min" in paper:
        minutes, limit = paper["extrapolated_100_epochs_min"], TARGETS["paper_training_minutes_h100"]
        out.append({"target": f"paper training of EF0 <= {limit:g} min on H100",
                    "measured": f"{minutes:.1f} min (extrapolated)", "met": minutes <= limit if cuda else "n/a"})
    return out


def inference_targets(ic_batch1: list[dict], cuda: bool) -> list[dict]:
    """EF0-class FPS and speed-up over eager at batch 1 (H100 targets), from the fastest back-end."""
    if not ic_batch1:
        return []
    best = max(ic_batch1, key=lambda r: r["fps"])
    where = "" if cuda else " (CPU run: the target is for H100)"
    fps, speedup = TARGETS["ef0_fps_batch1_h100"], TARGETS["ef0_speedup_vs_eager_h100"]
    return [{"target": f"EF0-class >= {fps:g} FPS at batch 1 on H100",
             "measured": f"{best['fps']:.1f} FPS ({best['backend']}){where}", "met": best["fps"] >= fps if cuda else "n/a"},
            {"target": f"EF0-class >= {speedup:g}x PyTorch eager on H100",
             "measured": f"{best.get('speedup_vs_eager', 0):.2f}x ({best['backend']}){where}",
             "met": best.get("speedup_vs_eager", 0) >= speedup if cuda else "n/a"}]


def ort_cpu_targets(ok: list[dict]) -> list[dict]:
    """ONNX Runtime on the CPU (fp32 and int8) at most this fraction of PyTorch eager's latency, per row."""
    limit, out = TARGETS["ort_cpu_latency_vs_eager_cpu"], []
    for r in (r for r in ok if r["backend"] in ("ort_cpu", "ort_cpu_int8") and "latency_vs_eager" in r):
        precision = " int8" if r["backend"] == "ort_cpu_int8" else ""
        out.append({"target": f"ORT CPU{precision} latency <= {limit:g}x eager ({r['method']}, batch {r['batch']})",
                    "measured": f"{r['latency_vs_eager']:.2f}x", "met": r["latency_vs_eager"] <= limit})
    return out
