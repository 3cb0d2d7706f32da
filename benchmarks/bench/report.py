"""The report: ``bench.json`` (every measurement, failures included) and ``bench.md`` (its tables), rewritten
after every section so a run stopped early keeps what it measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.bench.targets import evaluate_targets


def write(result: dict, out: Path) -> None:
    """Judge the targets, then write ``bench.json`` and ``bench.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    result["targets"] = evaluate_targets(result)
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "bench.md").write_text(markdown(result))


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Benchmark — {m['device_name']} ({m['device']}), {m['date']}", "",
             f"`{m['command']}`", "",
             f"torch {m['torch']} ({m['torch_threads']} threads), onnxruntime {m['onnxruntime']} "
             f"(providers: {', '.join(m['ort_providers'])}), AMP dtype {m['amp_dtype']}, "
             f"{m['warmup']} warm-up + {m['iterations']} timed iterations.", ""]
    if "probe" in result:
        p = result["probe"]
        lines += ["## GEMM probe (achievable matmul FLOP/s: best / median window)", "",
                  "| dtype | n | TFLOP/s best | TFLOP/s median |", "|---|---:|---:|---:|"]
        lines += [f"| {v['dtype']} | {v.get('n', '–')} | {fmt(v.get('tflops'), 3)} {v.get('status', '')}"
                  f"| {fmt(v.get('tflops_median'), 3)} |" for v in p.values() if isinstance(v, dict)]
        lines.append("")
    if "models" in result:
        lines += ["## Models at the benchmark size", "", "| method | params (M) | GMACs/image | ceiling FPS |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {i['method']} | {i['params'] / 1e6:.2f} | {i['macs'] / 1e9:.2f} | {fmt(i['ceiling_fps'], 0)} |"
                  for i in result["models"]]
        lines += ["", "## Inference (per batch; FPS = batch / p50)", "",
                  "| method | backend | batch | p50 ms | p95 ms | FPS | × eager | % of ceiling | status |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in result["inference"]:
            ceiling = r.get("fraction_of_ceiling")
            lines.append(f"| {r['method']} | {r['backend']} | {r['batch']} | {fmt(r.get('p50_ms'))} | {fmt(r.get('p95_ms'))} "
                         f"| {fmt(r.get('fps'), 1)} | {fmt(r.get('speedup_vs_eager'))} "
                         f"| {fmt(ceiling * 100 if ceiling is not None else None, 1)} | {r['status']} |")
        lines.append("")
    lines += training_md(result) + data_md(result) + paper_md(result) + targets_md(result)
    return "\n".join(lines) + "\n"


def training_md(result: dict) -> list[str]:
    if "training" not in result:
        return []
    lines = ["## Training throughput (the trainer's step: forward + loss + backward + optimiser step)", "",
             "| method | size | batch | images/s | step p50 ms | AMP | recipe | status |",
             "|---|---:|---:|---:|---:|---|---|---|"]
    lines += [f"| {r['method']} | {r['image_size']} | {r['batch']} | {fmt(r.get('images_per_s'))} | {fmt(r.get('p50_ms'))} "
              f"| {r.get('amp', '–')} | {recipe_md(r)} | {r['status']} |" for r in result["training"]]
    return [*lines, ""]


def recipe_md(row: dict) -> str:
    """Where a training row's recipe came from, and its optimiser and loss."""
    if "optimizer" not in row:
        return row.get("recipe", "–")
    layout = "channels-last" if row["channels_last"] else "NCHW"
    return f"{row['recipe']}: {row['optimizer']}, {row['loss']}, {layout}"


def data_md(result: dict) -> list[str]:
    if "data" not in result:
        return []
    d = result["data"]
    lines = [f"## Data loading ({d['source']}; {d['image_size']} px, batch {d['batch']})", "",
             f"Building the uint8 cache (decode + resize + write): {d['cache_build_images_per_s']:.1f} images/s; "
             f"reading it back: {d['cache_load_images_per_s']:.0f} images/s.", "",
             "| pipeline | images/s | status |", "|---|---:|---|"]
    lines += [f"| {r['pipeline']} | {fmt(r.get('images_per_s'), 1)} | {r['status']} |" for r in d["rows"]]
    if d.get("keeps_up"):
        lines += ["", "Loader vs training (best CPU loader with `basic` augmentation / training images/s):", "",
                  "| method | batch | training images/s | loader images/s | loader / training |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {k['method']} | {k['batch']} | {fmt(k['train_images_per_s'])} | {fmt(k['loader_images_per_s'], 1)} "
                  f"| {fmt(k['ratio'])} |" for k in d["keeps_up"]]
    return [*lines, ""]


def paper_md(result: dict) -> list[str]:
    if "paper_ic_polypseg" not in result:
        return []
    p = result["paper_ic_polypseg"]
    if "status" in p:
        return ["## Paper profile: IC-PolypSeg-EF0, PraNet protocol", "", p["status"], ""]
    r, src = p["recipe"], p["settings"]
    inherited = ", ".join(sorted(src["inherited"])) or "none"
    return [f"## Paper profile: IC-PolypSeg-EF0, PraNet protocol ({r['image_size']} px, batch {r['batch_size']}, "
            f"multiscale {r['multiscale']}, {r['epochs']} epochs)", "",
            f"Settings: `methods.{src['entry']}` of `{src['file']}` over that file's `train.defaults` "
            f"({src['arch']}, {r['optimizer']} lr {r['lr']:g}, {r['loss']} loss, augment {r['augment']}, "
            f"scheduler {r['scheduler']}); keys the profile leaves unset ({inherited}) from {src['inherited_from']}. "
            f"Built with {p['model']} instead of the profile's {src['profile_model']}: the timing does not depend "
            f"on the weights.",
            f"Data: {p['data']}; full train set {p['train']} images, val {p['val']}.",
            f"Timed {p['epochs_timed']} epoch(s) on {p['train_items_timed']} train + {p['val_items_timed']} val images "
            f"through `polypflow.train.engine.fit`: epoch times {', '.join(f'{s:.1f}' for s in p['epoch_s'])} s.",
            f"Estimated full epoch: {p['full_epoch_s_estimate']:.1f} s; **{p['epochs_full']} epochs ≈ "
            f"{p['extrapolated_100_epochs_min']:.1f} min** ({p['method_of_extrapolation']}).", ""]


def targets_md(result: dict) -> list[str]:
    if not result.get("targets"):
        return []
    lines = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['met']} |" for t in result["targets"]]
    return [*lines, ""]
