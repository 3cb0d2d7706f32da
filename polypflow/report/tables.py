"""The report's tables: results, the papers' figures beside ours (like with like), significance, cost, registry."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd

from polypflow.evaluate.seg_metrics import MODEL_DICE
from polypflow.report.load import MethodResults
from polypflow.evaluate.stats import bootstrap_ci, holm, paired_bootstrap


def result_columns(threshold: float) -> dict[str, str]:
    """summary key -> column title (toolbox figures marked "tb"); ``threshold`` is evaluate.threshold."""
    at = f"@{threshold:g}"
    return {
        "dice": f"mDice{at}", "iou": f"mIoU{at}", MODEL_DICE: "mDice@thr", "tb_dice": "meanDic (tb)",
        "tb_iou": "meanIoU (tb)", "max_dice": "maxDic (tb)", "mae": "MAE", "fnr": "FNR", "recall": "Sensitivity",
        "specificity": "Specificity", "precision": "Precision", "accuracy": "Accuracy", "auc": "AUC-ROC",
        "sm": "S-measure", "em_mean": "meanEm", "max_em": "maxEm", "wfm": "wF-measure",
    }


def scores_on(table: pd.DataFrame, dataset: str, column: str) -> pd.Series:
    """``column`` of a per-image table's rows on ``dataset``, indexed by image key (empty for an empty table)."""
    part = table[table["dataset"] == dataset] if len(table) else table
    return part.set_index("key")[column] if len(part) else pd.Series(dtype=float)


def dice_of(m: MethodResults, dataset: str) -> pd.Series:
    """Per-image Dice at the method's own threshold on ``dataset``, indexed by image key."""
    return scores_on(m.per_image, dataset, MODEL_DICE)


def results_table(methods: list[MethodResults], threshold: float, n_boot: int, seed: int,
                  confidence: float) -> pd.DataFrame:
    """One row per method × test set: n, protocol, mDice with its bootstrap CI, then every metric."""
    rows = []
    for m in methods:
        for dataset, s in m.summary.items():
            ci = bootstrap_ci(dice_of(m, dataset).to_numpy(), n_boot, seed, confidence)
            n = f"{s['n']} of {s['n'] + s['n_missing']}" if s.get("n_missing") else s["n"]
            rows.append({"method": m.label, "dataset": dataset, "protocol": s.get("protocol", "?"), "n": n,
                         "mDice@thr 95% CI": f"[{ci.low:.3f}, {ci.high:.3f}]",
                         **{title: s.get(key) for key, title in result_columns(threshold).items()}})
    return pd.DataFrame(rows)


def summary_table(methods: list[MethodResults], datasets: list[str], n_boot: int, seed: int,
                  confidence: float) -> pd.DataFrame:
    """The one-screen table: each method's mDice per test set with its interval, its size and latency."""
    rows = []
    for m in methods:
        row: dict[str, object] = {"method": m.label}
        for dataset in datasets:
            dice = dice_of(m, dataset)
            if len(dice):
                ci = bootstrap_ci(dice.to_numpy(), n_boot, seed, confidence)
                row[dataset] = f"{ci.mean:.3f} [{ci.low:.3f}, {ci.high:.3f}]"
            else:
                row[dataset] = "—"
        p = m.profile or {}
        row["params (M)"] = round(p["params"] / 1e6, 2) if p else None
        row["latency p50 ms (ORT)"] = (p.get("onnxruntime") or {}).get("p50_ms") if p else None
        rows.append(row)
    return pd.DataFrame(rows)


def comparability(m: MethodResults, figure: pd.Series, paper: dict, ours: dict) -> list[str]:
    """Why a paper figure and ours are not like with like (empty: comparable). ``ours``: our split scheme,
    cross-validation protocol and profiling device."""
    reasons = []
    split = paper.get("split")
    if figure["scope"] == "crossval":
        reasons.append(f"protocol {split} vs ours {ours['crossval']}")
    elif figure["scope"] == "test" and split != ours["scheme"]:
        reasons.append(f"protocol {split or 'unstated'} vs ours {ours['scheme']}")
    if figure["scope"] != "profile" and paper.get("image_size") and m.image_size and paper["image_size"] != m.image_size:
        reasons.append(f"input {paper['image_size']} px vs ours {m.image_size} px")
    if figure["metric"] == "params_m" and "decoder only" in str(figure.get("variant", "")):
        reasons.append("the paper counts the decoder only; ours is the whole model")
    if figure["metric"] == "fps":
        device = (m.profile or {}).get("device_name") or (m.profile or {}).get("device") or "none"
        if paper.get("device") != device:
            reasons.append(f"device {paper.get('device') or 'unstated'} vs ours {device}")
    return reasons


def our_value(m: MethodResults, figure: pd.Series, crossval: dict | None) -> tuple[float | None, float | None]:
    """Our counterpart of one paper figure (and the toolbox's meanDic/meanIoU beside Dice/IoU)."""
    metric, dataset = figure["metric"], figure["dataset"]
    if figure["scope"] == "profile":
        p = m.profile or {}
        value = {"params_m": p.get("params", np.nan) / 1e6, "gmacs_352": p.get("macs_at_macs_image_size", np.nan) / 1e9,
                 "fps": (p.get("torch") or {}).get("fps")}.get(metric) if p else None
        return value, None
    if figure["scope"] == "crossval":
        ok = crossval is not None and crossval.get("method") == m.name and metric == "dice"
        return (crossval["dice_mean"], None) if ok else (None, None)
    s = m.summary.get(dataset)
    if s is None:
        return None, None
    if not pd.isna(figure["at_threshold"]) and len(m.sweep):
        at = m.sweep[(m.sweep["dataset"] == dataset) & np.isclose(m.sweep["threshold"], figure["at_threshold"])]
        return (float(at[metric].iloc[0]) if len(at) and metric in at else None), None
    if metric in ("dice", "iou"):  # the model's own threshold, as it ships; the toolbox's figure beside it
        return s.get(f"{metric}_at_method_threshold"), s.get(f"tb_{metric}")
    return s.get(metric), None


def comparison_table(methods: list[MethodResults], papers: dict, figures: pd.DataFrame, crossval: dict | None,
                     ours: dict) -> pd.DataFrame:
    """Every paper figure of each method's architecture with our value beside it. The difference is given
    only where the two are like with like (same protocol, input size, device); it is taken from the toolbox's
    figure where the paper's is one (``metric_source: toolbox``)."""
    rows = []
    for m in methods:
        for _, f in figures[figures["arch"] == m.arch].iterrows():
            paper = papers[f["paper"]]
            value, toolbox = our_value(m, f, crossval)
            reasons = comparability(m, f, paper, ours)
            same_kind = toolbox if paper.get("metric_source") == "toolbox" and toolbox is not None else value
            rows.append({"method": m.label, "paper": f["paper"], "variant": f["variant"],
                         "dataset": f["dataset"] if f["scope"] != "profile" else "—", "scope": f["scope"],
                         "metric": f["metric"], "paper value": f["reported"], "ours": value, "ours (tb)": toolbox,
                         "like with like": "yes" if not reasons else "no: " + "; ".join(reasons),
                         "ours − paper": None if reasons or same_kind is None else same_kind - f["value"]})
    return pd.DataFrame(rows)


def compared_pairs(methods: list[MethodResults],
                   pairs: Sequence[tuple[str, str]]) -> list[tuple[MethodResults, MethodResults]]:
    """The (A, B) pairs of the significance table: ``pairs`` whose two methods were both evaluated (every pair
    of our methods when ``pairs`` is empty), then each of our methods against each external one."""
    ours = [m for m in methods if not m.external]
    external = [m for m in methods if m.external]
    if not pairs:
        chosen = list(itertools.combinations(ours, 2))
    else:
        by_name = {m.name: m for m in methods}
        chosen = [(by_name[a], by_name[b]) for a, b in pairs if a in by_name and b in by_name]
    return chosen + [(m, e) for e in external for m in ours if (m, e) not in chosen]


def significance_table(methods: list[MethodResults], n_boot: int, seed: int, confidence: float,
                       pairs: Sequence[tuple[str, str]] = ()) -> pd.DataFrame:
    """Paired bootstrap CI of the Dice difference of each compared pair (:func:`compared_pairs`) on every
    test set both were scored on, over the images both have."""
    compared = [(a.label, dice_of(a, dataset), b.label, dice_of(b, dataset), dataset)
                for a, b in compared_pairs(methods, pairs) for dataset in sorted(set(a.summary) & set(b.summary))]
    return paired_table(compared, n_boot, seed, confidence)


EXPORTED_GRAPHS = (("shipped", "int8"), ("plain", "fp32"), ("plain", "int8"))  # the shipped fp32 graph is evaluated


def graph_dice(m: MethodResults, graph: str, precision: str, dataset: str) -> pd.Series:
    """Per-image Dice of one of ``m``'s exported graphs (``graph``: shipped or plain; ``precision``: fp32 or int8) on
    ``dataset``, from export's per_image.csv, by image key (empty where export did not score that graph)."""
    return scores_on(m.graph_scores.get(graph, pd.DataFrame()), dataset, precision)


def graph_significance_table(methods: list[MethodResults], n_boot: int, seed: int, confidence: float) -> pd.DataFrame:
    """:func:`significance_table` for the graphs a user deploys beyond the evaluated one, against each published
    method's maps: each of our segmenters' int8 graph (a detector's per_image.csv holds box F1, not Dice) and, for a
    model shipped with test-time augmentation, its plain network in fp32 and int8 (:data:`EXPORTED_GRAPHS`), on every
    test set both were scored on."""
    external = [e for e in methods if e.external]
    compared = [(f"{m.label} ({graph} {precision})", dice, e.label, dice_of(e, dataset), dataset)
                for m in methods if not m.external and not m.detector for graph, precision in EXPORTED_GRAPHS
                for e in external for dataset in sorted(e.summary)
                if len(dice := graph_dice(m, graph, precision, dataset))]
    return paired_table(compared, n_boot, seed, confidence)


def paired_table(compared: list[tuple[str, pd.Series, str, pd.Series, str]], n_boot: int, seed: int,
                 confidence: float) -> pd.DataFrame:
    """One row per (label A, Dice A, label B, Dice B, test set): the paired bootstrap of A − B over the images both
    have, its p-value and the Holm adjustment over all rows."""
    rows = []
    for a, dice_a, b, dice_b, dataset in compared:
        ci = paired_bootstrap(dice_a, dice_b, n_boot, seed, confidence)
        rows.append({"dataset": dataset, "A": a, "B": b, "n paired": ci.n,
                     "mean Dice A − B": ci.mean, "CI low": ci.low, "CI high": ci.high, "p (bootstrap)": ci.p_value,
                     "significant": "yes" if ci.significant else "no"})
    table = pd.DataFrame(rows)
    if len(table):
        table.insert(len(table.columns) - 1, "p (Holm)", holm(table["p (bootstrap)"].to_numpy()))
    return table


def profile_table(methods: list[MethodResults]) -> pd.DataFrame:
    rows = []
    for m in methods:
        p = m.profile
        if not p:
            continue
        rows.append({"method": m.name, "params (M)": p["params"] / 1e6,
                     f"GMACs@{p.get('macs_image_size', 352)}": p["macs_at_macs_image_size"] / 1e9,
                     "GMACs@own size": p["macs_at_image_size"] / 1e9, "size": p["image_size"], "batch": p["batch_size"],
                     "device": p.get("device_name", p.get("device")),
                     "torch p50 ms": p["torch"]["p50_ms"], "torch p95 ms": p["torch"]["p95_ms"], "torch FPS": p["torch"]["fps"],
                     "ORT p50 ms": p["onnxruntime"]["p50_ms"], "ORT p95 ms": p["onnxruntime"]["p95_ms"],
                     "ORT FPS": p["onnxruntime"]["fps"]})
    return pd.DataFrame(rows)


def ort_grid_table(methods: list[MethodResults]) -> pd.DataFrame:
    """ONNX Runtime on the CPU, fp32 and int8, at each size and thread count of each method's profile (``ort_grid``):
    the shipped graph, and a TTA model's plain network (``graph``)."""
    rows = [{"method": m.label, "graph": r.get("graph", "shipped"), "precision": r["precision"], "size": r["size"],
             "threads": r["threads"], "batch": r["batch"], "p50 ms": r["p50_ms"], "p95 ms": r["p95_ms"],
             "FPS": r["fps"]}
            for m in methods for r in (m.profile or {}).get("ort_grid", [])]
    return pd.DataFrame(rows)


def mean_dice(m: MethodResults) -> float:
    """The unweighted mean over test sets of the mDice at the method's threshold."""
    return float(np.mean([s[MODEL_DICE] for s in m.summary.values()]))


def chart_setting(methods: list[MethodResults]) -> tuple[int, int] | None:
    """(size, threads) of the accuracy-vs-FPS chart: the largest size and most threads of the profiles' ORT grids."""
    grid = [r for m in methods for r in (m.profile or {}).get("ort_grid", [])]
    return (max(r["size"] for r in grid), max(r["threads"] for r in grid)) if grid else None


def check_dice(check: dict | None, graph: str) -> float | None:
    """Mean over the test sets of an export check's (``int8/check.json``, ``plain/check.json``) Dice of ``graph``
    (``fp32`` or ``int8``); None where the check has no such graph."""
    if not (check or {}).get("quantised"):  # a plain check that does not apply has no graphs
        return None
    return float(np.mean([s[graph] for s in check["test_sets"].values()]))


def pareto_points(methods: list[MethodResults]) -> pd.DataFrame:
    """Each segmenter of ours as fp32 and int8 points: ORT FPS at :func:`chart_setting` against mean Dice over the
    test sets (fp32: the evaluation's; int8: the export check's, both at the method's threshold at the masks'
    resolution, with the model at the size it was trained at: ``trained at``), and for a model shipped with
    test-time augmentation its plain network's two points too (``graph: plain``, Dice from plain/check.json);
    ``front``: on the Pareto front of these points (no other is at least as fast and as accurate)."""
    setting, rows = chart_setting(methods), []
    for m in (m for m in methods if not m.external and not m.detector and m.summary):
        dice = {("shipped", "fp32"): mean_dice(m), ("shipped", "int8"): check_dice(m.int8, "int8"),
                ("plain", "fp32"): check_dice(m.plain, "fp32"), ("plain", "int8"): check_dice(m.plain, "int8")}
        for r in (m.profile or {}).get("ort_grid", []):
            graph = (r.get("graph", "shipped"), r["precision"])
            if (r["size"], r["threads"]) == setting and dice.get(graph) is not None:
                rows.append({"method": m.label, "graph": graph[0], "precision": r["precision"],
                             "trained at": m.image_size, "size": r["size"], "threads": r["threads"], "FPS": r["fps"],
                             "mean Dice": dice[graph]})
    table = pd.DataFrame(rows, columns=["method", "graph", "precision", "trained at", "size", "threads", "FPS",
                                        "mean Dice"])
    fps, dice = table["FPS"].to_numpy(), table["mean Dice"].to_numpy()
    dominated = [bool(np.any((fps >= f) & (dice >= d) & ((fps > f) | (dice > d)))) for f, d in zip(fps, dice)]
    return table.assign(front=["no" if d else "yes" for d in dominated])


def published_points(methods: list[MethodResults], papers: dict, figures: pd.DataFrame) -> pd.DataFrame:
    """What the chart draws beside our points: published maps scored here (mean Dice, no FPS of ours) and each
    paper measured on a CPU (``device_kind: cpu``) with a Dice and an FPS figure of one variant."""
    rows = [{"label": f"{m.label}: FPS not measured here", "FPS": np.nan, "mean Dice": mean_dice(m),
             "note": "maps scored here"} for m in methods if m.external and m.summary]
    cpu = figures[figures["paper"].map(lambda p: papers[p].get("device_kind") == "cpu")]
    for (paper, variant), part in cpu.groupby(["paper", "variant"], sort=False):
        value = dict(zip(part["metric"], part["value"]))
        if {"dice", "fps"} <= set(value):
            rows.append({"label": f"{variant} (published, not like-with-like)", "FPS": float(value["fps"]),
                         "mean Dice": float(value["dice"]), "note": papers[paper].get("device") or ""})
    return pd.DataFrame(rows, columns=["label", "FPS", "mean Dice", "note"])


def registry_table(methods: list[MethodResults]) -> pd.DataFrame:
    rows = []
    for m in methods:
        r = m.run
        for entry in (r, r.get("global") or {}):
            if not entry.get("version"):
                continue
            decision = entry.get("decision") or {}
            rows.append({"method": m.name, "registered model": entry.get("name", m.name), "version": entry["version"],
                         "champion at registration": "yes" if entry.get("champion") else "no",
                         "decision": decision.get("reason", ""),
                         m.task.metric_label: m.train.get(m.task.metric),
                         "threshold": m.train.get("threshold")})
    return pd.DataFrame(rows)


def champion(methods: list[MethodResults]) -> tuple[str, str] | None:
    """(method, "name vN") holding the global model's alias ``champion``: the alias moves only when a version is
    registered and wins, so the holder is the latest registered version that was made champion."""
    made = [(int(g["version"]), m.name, g.get("name", "")) for m in methods
            if isinstance(g := m.run.get("global"), dict) and g.get("version") and g.get("champion")]
    if not made:
        return None
    version, method, name = max(made)
    return method, f"{name} v{version}"


def interval(summary: dict, key: str, digits: int = 4) -> str:
    """``mean [low, high]`` of a stability figure in a test set's summary ('' when it has none)."""
    if summary.get(key) is None:
        return ""
    return f"{summary[key]:.{digits}f} [{summary[f'{key}_low']:.{digits}f}, {summary[f'{key}_high']:.{digits}f}]"


def stability_table(methods: list[MethodResults]) -> pd.DataFrame:
    """Per method and test set with video sequences: flicker and false alarms with their intervals over whole
    sequences, raw and with the model's smoothing (its weight; 'on' when it ships on)."""
    rows = []
    for m in methods:
        for dataset, s in m.summary.items():
            if "video_n_sequences" not in s:
                continue
            row = {"method": m.label, "test set": dataset, "sequences": s["video_n_sequences"],
                   "fragments": s["video_n_fragments"], "frames": s["video_n_frames"],
                   "flicker": interval(s, "video_flicker"), "false alarms": interval(s, "video_false_alarm_rate", 3),
                   "Dice": s.get("video_dice")}
            if "video_smoothed_n_sequences" in s:
                row.update({"smoothing w": f"{s['video_smoothing_ema']:g}" + (" (on)" if s["video_smoothing_on"] else " (off)"),
                            "flicker, smoothed": interval(s, "video_smoothed_flicker"),
                            "false alarms, smoothed": interval(s, "video_smoothed_false_alarm_rate", 3),
                            "Dice, smoothed": s.get("video_smoothed_dice")})
            rows.append(row)
    return pd.DataFrame(rows)


def sequence_table(methods: list[MethodResults]) -> pd.DataFrame:
    """Each test sequence's frames in the test set (the first method's stability.csv that has them)."""
    for m in methods:
        if len(m.stability):
            raw = m.stability[m.stability["variant"] == "raw"]
            return raw[["dataset", "sequence", "n_frames", "first_frame", "last_frame", "mean_gap", "fragment"]] \
                .rename(columns={"n_frames": "test frames", "mean_gap": "mean gap"}).reset_index(drop=True)
    return pd.DataFrame()
