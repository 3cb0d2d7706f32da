"""``gpu_run.json`` (everything measured, failures included) and ``gpu_run.md`` (tables ready for
benchmarks/RESULTS.md), both rewritten atomically after every section so a run killed at its limit keeps what it
finished."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench.report import fmt
from polypflow.io import write_text

JSON, MARKDOWN = "gpu_run.json", "gpu_run.md"
GOAL_FPS, GOAL_SPEEDUP = 1000.0, 3.0  # issue 25: the EF0-class model at batch 1
GOAL_METHOD = "ic_polypseg"


def write(result: dict, out: Path) -> None:
    result["goals"] = goals(result)
    write_text(out / JSON, json.dumps(result, indent=1, default=str) + "\n")
    write_text(out / MARKDOWN, markdown(result))


def goals(result: dict) -> list[dict]:
    """Test mDice against PraNet's published figure per set; the fastest batch-1 row of :data:`GOAL_METHOD`."""
    rows = []
    for dataset, scores in (result.get("test") or {}).items():
        target = result.get("published_pranet", {}).get(dataset)
        if target is not None:
            rows.append({"goal": f"{dataset} mDice >= PraNet's {target}", "measured": round(scores["mdice"], 4),
                         "met": scores["mdice"] >= target})
    speed = [r for r in (result.get("speed") or {}).get("rows", [])
             if r["method"] == GOAL_METHOD and r["batch"] == 1 and r["status"] == "ok"]
    if speed:
        best = max(speed, key=lambda r: r["fps"])
        rows.append({"goal": f"{GOAL_METHOD} batch 1 >= {GOAL_FPS:g} FPS and >= {GOAL_SPEEDUP:g}x eager",
                     "measured": f"{best['fps']:.0f} FPS, {best.get('speedup_vs_eager', 0):.2f}x ({best['backend']})",
                     "met": best["fps"] >= GOAL_FPS and best.get("speedup_vs_eager", 0) >= GOAL_SPEEDUP})
    return rows


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"## GPU run — {m['device_name']} ({m['device']}), {m['date']}", "", f"`{m['command']}`", "",
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']} (providers: {', '.join(m['ort_providers'])}), "
             f"Python {m['python']}; {m['elapsed_s']:.0f} s so far of a {m['deadline_s']:.0f} s deadline.", ""]
    lines += training_md(result) + test_md(result) + speed_md(result)
    if result.get("goals"):
        lines += ["### Goals", "", "| goal | measured | met |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {g['measured']} | {g['met']} |" for g in result["goals"]] + [""]
    return "\n".join(lines) + "\n"


def training_md(result: dict) -> list[str]:
    t = result.get("training")
    if not t:
        return []
    if "status" in t:
        return ["### Training", "", t["status"], ""]
    r, s = t["recipe"], t["settings"]
    lines = ["### Training", "",
             f"{s['arch']} {s['model']} from {s['source']['model']}; recipe {s['source']['recipe']}: {r['optimizer']} "
             f"lr {r['lr']:g} wd {r['weight_decay']:g}, {r['loss']} loss, batch {r['batch_size']}, {r['image_size']} px, "
             f"multiscale {r['multiscale']}, augment {r['augment']}, scheduler {r['scheduler']}, "
             f"{r['num_workers']} loader workers, AMP {t['speeds'].get('amp', '–')}.", "",
             "| epochs | stopped by | best epoch | best val Dice | train wall s | images/s (epochs, val + checkpoint "
             "included) | loader alone images/s | step alone images/s |", "|---:|---|---:|---:|---:|---:|---:|---:|",
             f"| {t['epochs']} / {t['epochs_max']} | {t['stopped_by']} | {t['best_epoch']} | {fmt(t['best_val_dice'], 4)} "
             f"| {fmt(t['train_wall_s'], 1)} | {fmt(t['images_per_s'], 1)} | {fmt(t['speeds'].get('loader_images_per_s'), 1)} "
             f"| {fmt(t['speeds'].get('step_images_per_s'), 1)} |", ""]
    if t.get("per_epoch"):
        e = t["per_epoch"]
        lines += [f"Per epoch ({t['train_images']} train images): measured {fmt(e['measured_s'])} s; the loader alone "
                  f"would take {fmt(e['loader_s'])} s, the GPU step alone {fmt(e['step_s'])} s.", ""]
    return lines


def test_md(result: dict) -> list[str]:
    if not result.get("test"):
        return []
    lines = ["### Test (the project's evaluation, at each mask's resolution)", "",
             "| test set | n | mDice @0.5 | meanDic (toolbox) | mIoU @0.5 | PraNet published mDice |",
             "|---|---:|---:|---:|---:|---:|"]
    for dataset, s in result["test"].items():
        if "status" in s:
            lines.append(f"| {dataset} | – | – | – | – | {s['status']} |")
            continue
        lines.append(f"| {dataset} | {s['n']} | {fmt(s['mdice'], 4)} | {fmt(s['meandic'], 4)} | {fmt(s['miou'], 4)} "
                     f"| {fmt(result.get('published_pranet', {}).get(dataset), 3)} |")
    return [*lines, ""]


def speed_md(result: dict) -> list[str]:
    speed = result.get("speed")
    if not speed:
        return []
    lines = ["### Speed (deployable graph, 352² unless noted; FPS = batch / p50)", "",
             "| method | backend | batch | p50 ms | FPS | × eager | first call s | status |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['method']} | {r['backend']} | {r['batch']} | {fmt(r.get('p50_ms'))} | {fmt(r.get('fps'), 1)} "
              f"| {fmt(r.get('speedup_vs_eager'))} | {fmt(r.get('first_call_s', r.get('setup_s')), 1)} "
              f"| {r['status'][:90]} |" for r in speed["rows"]]
    return [*lines, ""]
