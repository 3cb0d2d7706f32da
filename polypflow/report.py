"""The comparison report: every method × test set × metric beside the papers' figures, curves,
distributions, cases, Grad-CAM, model cost, cross-validation, significance and leakage.

:func:`build` reads what the pipeline wrote (``artifacts/eval``, ``profile``, ``models``, ``crossval``,
``splits.json``) and returns a :class:`Report`: sections of text, tables and figures. :func:`to_html`
renders one self-contained page (figures as base64 PNG, inline CSS, no script, no CDN);
:func:`to_markdown` renders the same sections with the figures as files beside it.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from polypflow.config import Params
from polypflow.metrics import MODEL_DICE
from polypflow.pipeline import by_image_key, method_arch, stage_dir
from polypflow.stats import bootstrap_ci, holm, paired_bootstrap

RESULT_COLUMNS = {  # summary key -> column title (toolbox figures marked "tb")
    "dice": "mDice@0.5", "iou": "mIoU@0.5", "dice_at_method_threshold": "mDice@thr", "tb_dice": "meanDic (tb)",
    "tb_iou": "meanIoU (tb)", "max_dice": "maxDic (tb)", "mae": "MAE", "fnr": "FNR", "recall": "Sensitivity",
    "specificity": "Specificity", "precision": "Precision", "accuracy": "Accuracy", "auc": "AUC-ROC",
    "sm": "S-measure", "em_mean": "meanEm", "max_em": "maxEm", "wfm": "wF-measure",
}
Block = tuple  # ("text", str) | ("table", DataFrame, caption) | ("figure", name, png bytes, caption)


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def text(self, value: str) -> Section:
        self.blocks.append(("text", value))
        return self

    def table(self, frame: pd.DataFrame, caption: str = "") -> Section:
        self.blocks.append(("table", frame, caption))
        return self

    def figure(self, name: str, png: bytes, caption: str) -> Section:
        self.blocks.append(("figure", name, png, caption))
        return self


@dataclass
class Report:
    title: str
    sections: list[Section]
    facts: dict  # machine-readable summary (report.json)


@dataclass
class MethodResults:
    """What the pipeline wrote for one method (absent optional parts are None/empty)."""

    name: str
    arch: str
    summary: dict
    per_image: pd.DataFrame
    pr: pd.DataFrame
    sweep: pd.DataFrame
    cases: pd.DataFrame
    eval_dir: Path
    profile: dict | None
    train: dict
    run: dict


def read_json(path: Path) -> dict | None:
    return yaml.safe_load(path.read_text()) if path.exists() else None  # JSON is YAML


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"key": str}) if path.exists() else pd.DataFrame()


def load_method(params: Params, method: str) -> MethodResults:
    """Read ``method``'s evaluation, profile and training outputs; evaluation must exist."""
    ev = stage_dir(params, "eval", method)
    if not (ev / "summary.json").exists():
        raise FileNotFoundError(f"{ev / 'summary.json'}: run `dvc repro evaluate@{method}` first")
    models = params.paths.artifacts / "models" / method
    return MethodResults(method, method_arch(params, method)[0], read_json(ev / "summary.json"),
                         read_csv(ev / "per_image.csv"), read_csv(ev / "pr.csv"), read_csv(ev / "sweep.csv"),
                         read_csv(ev / "cases" / "cases.csv"), ev,
                         read_json(stage_dir(params, "profile", method) / "profile.json"),
                         read_json(models / "metrics.json") or {}, read_json(models / "run.json") or {})


def load_paper_figures(path: Path) -> tuple[dict, pd.DataFrame]:
    doc = yaml.safe_load(Path(path).read_text())
    figures = pd.DataFrame(doc["figures"])
    for column, default in (("scope", "test"), ("std", np.nan), ("at_threshold", np.nan)):
        figures[column] = figures[column].fillna(default) if column in figures else default
    unknown = set(figures["paper"]) - set(doc["papers"])
    if unknown:
        raise ValueError(f"{path}: figures cite papers not listed under papers: {sorted(unknown)}")
    return doc["papers"], figures


# ---------------------------------------------------------------- tables


def results_table(methods: list[MethodResults], n_boot: int, seed: int, confidence: float) -> pd.DataFrame:
    """One row per method × test set: n, protocol, mDice with its bootstrap CI, then every metric."""
    rows = []
    for m in methods:
        for dataset, s in m.summary.items():
            dice = m.per_image.loc[m.per_image["dataset"] == dataset, MODEL_DICE].to_numpy()
            ci = bootstrap_ci(dice, n_boot, seed, confidence)
            rows.append({"method": m.name, "dataset": dataset, "protocol": s.get("protocol", "?"), "n": s["n"],
                         "mDice@thr 95% CI": f"[{ci.low:.3f}, {ci.high:.3f}]",
                         **{title: s.get(key) for key, title in RESULT_COLUMNS.items()}})
    return pd.DataFrame(rows)


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


def comparison_table(methods: list[MethodResults], figures: pd.DataFrame, crossval: dict | None) -> pd.DataFrame:
    """Every paper figure of each method's architecture, with our value beside it."""
    rows = []
    for m in methods:
        for _, f in figures[figures["arch"] == m.arch].iterrows():
            ours, toolbox = our_value(m, f, crossval)
            rows.append({"method": m.name, "paper": f["paper"], "variant": f["variant"],
                         "dataset": f["dataset"] if f["scope"] != "profile" else "—", "scope": f["scope"],
                         "metric": f["metric"], "paper value": f["reported"], "ours": ours, "ours (tb)": toolbox,
                         "ours − paper": None if ours is None else ours - f["value"]})
    return pd.DataFrame(rows)


def compared_pairs(methods: list[MethodResults],
                   pairs: Sequence[tuple[str, str]]) -> list[tuple[MethodResults, MethodResults]]:
    """The (A, B) pairs of the significance table: ``pairs`` whose two methods were both evaluated, or every
    pair of ``methods`` when ``pairs`` is empty."""
    if not pairs:
        return list(itertools.combinations(methods, 2))
    by_name = {m.name: m for m in methods}
    return [(by_name[a], by_name[b]) for a, b in pairs if a in by_name and b in by_name]


def significance_table(methods: list[MethodResults], n_boot: int, seed: int, confidence: float,
                       pairs: Sequence[tuple[str, str]] = ()) -> pd.DataFrame:
    """Paired bootstrap CI of the Dice difference of each compared pair (:func:`compared_pairs`) on every
    test set both were scored on."""
    rows = []
    for a, b in compared_pairs(methods, pairs):
        for dataset in sorted(set(a.summary) & set(b.summary)):
            sa, sb = (m.per_image[m.per_image["dataset"] == dataset].set_index("key")[MODEL_DICE] for m in (a, b))
            ci = paired_bootstrap(sa, sb, n_boot, seed, confidence)
            rows.append({"dataset": dataset, "A": a.name, "B": b.name, "n paired": ci.n,
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


def registry_table(methods: list[MethodResults]) -> pd.DataFrame:
    rows = []
    for m in methods:
        r = m.run
        for scope, entry in (("method", r), ("global", r.get("global") or {})):
            if not entry.get("version"):
                continue
            decision = entry.get("decision") or {}
            rows.append({"method": m.name, "registered model": entry.get("name", m.name), "version": entry["version"],
                         "champion at registration": "yes" if entry.get("champion") else "no",
                         "decision": decision.get("reason", ""), "val Dice": m.train.get("val_dice"),
                         "threshold": m.train.get("threshold")})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- figures


def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _axes(n: int, width: float = 4.0, height: float = 3.4, stacked: bool = False):
    """``n`` panels side by side (or one above the other when ``stacked``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = (n, 1) if stacked else (1, n)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, list(axes.flat)


def line_styles(methods: list[MethodResults]) -> dict[str, dict]:
    """A distinct colour and dash per method, stable across figures (20 colours, then dashed, then dotted)."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors
    dashes = ["-", "--", ":", "-."]
    return {m.name: {"color": colours[i % len(colours)], "ls": dashes[i // len(colours) % len(dashes)]}
            for i, m in enumerate(methods)}


def datasets_of(methods: list[MethodResults]) -> list[str]:
    return sorted({d for m in methods for d in m.summary}, key=lambda d: (m_protocol(methods, d) == "unseen", d))


def m_protocol(methods: list[MethodResults], dataset: str) -> str:
    return next((m.summary[dataset].get("protocol", "?") for m in methods if dataset in m.summary), "?")


def curve_figure(methods: list[MethodResults], table: str, x: str, y: str, xlabel: str, ylabel: str,
                 mark: str | None = None) -> bytes:
    """One panel per test set, one line per method, from each method's ``pr``/``sweep`` table."""
    datasets, styles = datasets_of(methods), line_styles(methods)
    fig, axes = _axes(len(datasets))
    for ax, dataset in zip(axes, datasets, strict=True):
        for m in methods:
            frame = getattr(m, table)
            part = frame[frame["dataset"] == dataset] if len(frame) else frame
            if len(part):
                ax.plot(part[x], part[y], marker="o", markersize=3, lw=1.2, label=m.name, **styles[m.name])
            if mark and dataset in m.summary:
                ax.axvline(m.train.get("threshold", 0.5), color=styles[m.name]["color"], lw=0.8, ls=":")
        ax.set(title=f"{dataset} ({m_protocol(methods, dataset)})", xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(methods) <= 6:
        axes[-1].legend(handles, labels, fontsize=8)
    else:  # one legend for all panels, beside them
        fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   ncol=1 + len(methods) // 16)
    return png(fig)


def distribution_figure(methods: list[MethodResults]) -> bytes:
    """Per-image Dice at each method's threshold: a box per method in each test set, the images as dots."""
    datasets = datasets_of(methods)
    many = len(methods) > 4  # then one panel per row, wide enough for every method's box
    fig, axes = _axes(len(datasets), width=max(3.0, (0.5 if many else 1.2) * len(methods) + 1.5), stacked=many)
    rng = np.random.default_rng(0)
    for ax, dataset in zip(axes, datasets, strict=True):
        values = [m.per_image.loc[m.per_image["dataset"] == dataset, MODEL_DICE].to_numpy() for m in methods]
        ax.boxplot(values, showmeans=True, widths=0.5)
        ax.set_xticks(range(1, len(methods) + 1), [m.name for m in methods], rotation=60 if many else 20,
                      ha="right" if many else "center")
        for i, v in enumerate(values, 1):
            ax.scatter(i + rng.uniform(-0.18, 0.18, len(v)), v, s=5, alpha=0.35, color="tab:blue")
        ax.set(title=f"{dataset} ({m_protocol(methods, dataset)})", ylabel="Dice per image", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3, axis="y")
    return png(fig)


def cv_figure(crossval: dict) -> bytes:
    fig, (ax,) = _axes(1, width=4.5)
    folds = crossval["folds"]
    ax.bar(range(len(folds)), folds, color="tab:blue", alpha=0.7)
    ax.axhline(crossval["dice_mean"], color="black", lw=1, label=f"mean {crossval['dice_mean']:.3f}")
    ax.axhspan(crossval["dice_mean"] - crossval["dice_std"], crossval["dice_mean"] + crossval["dice_std"],
               color="grey", alpha=0.2, label=f"± std {crossval['dice_std']:.3f}")
    ax.set(xlabel="fold", ylabel="held-out Dice", title=f"{crossval['method']}: {crossval['k']}-fold CV",
           xticks=range(len(folds)), ylim=(0, 1))
    ax.legend(fontsize=8)
    return png(fig)


def thumbnail_pair(paths: Iterable[str], height: int = 160) -> bytes:
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            images.append(image.resize((round(image.width * height / image.height), height)))
    canvas = Image.new("RGB", (sum(i.width for i in images) + 8 * (len(images) - 1), height), "white")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width + 8
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- sections


def results_sections(methods, papers, figures, crossval, cfg, seed) -> list[Section]:
    results = results_table(methods, cfg.n_boot, seed, cfg.confidence)
    main = Section("Results: every method × test set × metric").text(
        "Per image, then averaged over the test set, at the masks' original resolution. '@0.5': thresholded at "
        "0.5; '@thr': at the method's own threshold (stored with the model: the Dice it ships with, and the one the "
        "intervals, box plots, cases and significance tests use); '(tb)': the community's evaluation toolbox (pysodmetrics; "
        "meanDic/meanIoU average 256 thresholds of the min-max normalised 8-bit map; maxDic/maxEm are the maximum "
        "of the image-averaged curve). Protocol: 'seen' = the test part of a dataset that was trained on, 'unseen' "
        f"= a dataset never trained on (PraNet protocol). The mDice@thr interval is a {cfg.confidence:.0%} bootstrap "
        f"interval over images ({cfg.n_boot} resamples).").table(results, "Test-set means")
    compare = comparison_table(methods, figures, crossval)
    paper = Section("Beside the papers' figures").text(
        "Each figure a paper reported for the architecture of one of our methods "
        "(references/paper_figures.yaml, restated from METHODS.md). Protocols, data and input sizes differ "
        "(see the paper list below): the difference is context, not a replication verdict. 'ours (tb)' is the "
        "toolbox's meanDic/meanIoU, the figure PraNet-protocol papers usually print.")
    if len(compare):
        paper.table(compare, "Our value beside each reported figure")
    else:
        paper.text("No figure in references/paper_figures.yaml belongs to the architectures evaluated here "
                   f"({', '.join(sorted({m.arch for m in methods}))}).")
    listing = pd.DataFrame([{"paper": k, "title": v["title"], "citation": v["citation"], "source": v["source"],
                             "protocol": v["protocol"]} for k, v in papers.items()])
    paper.table(listing, "Papers and their protocols")
    paper.table(figures[["paper", "arch", "variant", "dataset", "scope", "metric", "reported"]].fillna("—"),
                "Every reported figure")
    return [main, paper]


def curve_sections(methods: list[MethodResults]) -> list[Section]:
    curves = Section("Curves and distributions")
    curves.figure("pr", curve_figure(methods, "pr", "recall", "precision", "recall", "precision"),
                  "Precision-recall: image-averaged precision and recall at evenly spaced thresholds of the probability.")
    curves.figure("sweep", curve_figure(methods, "sweep", "threshold", "dice", "threshold", "mean Dice", mark="threshold"),
                  "Threshold sweep: mean Dice for thresholds 0.3..0.7 (dotted: the method's threshold).")
    curves.figure("dice_distribution", distribution_figure(methods),
                  "Per-image Dice at the method's threshold (box: quartiles, triangle: mean; dots: images).")
    cases = Section("Best and worst cases").text(
        "Per test set, the images with the highest and lowest Dice at the method's threshold: the image, then the "
        "prediction at that threshold in red "
        "(filled, with its outline) and the ground-truth outline in green.")
    for m in methods:
        for _, c in m.cases.iterrows():
            path = m.eval_dir / "cases" / c["file"]
            if path.exists():
                cases.figure(f"case_{m.name}_{Path(c['file']).stem}", path.read_bytes(),
                             f"{m.name} · {c['dataset']} · {c['kind']} {c['rank']}: {c['key']} (Dice {c['dice']:.3f})")
    gradcam = Section("Grad-CAM").text(
        "Panels written by evaluate: image | ground truth | prediction | Grad-CAM heatmap of the main map's "
        "predicted-polyp logits at the last conv layer feeding it (polypflow/gradcam.py).")
    for m in methods:
        for path in sorted((m.eval_dir / "gradcam").glob("*.png")):
            gradcam.figure(f"gradcam_{m.name}_{path.stem}", path.read_bytes(), f"{m.name} · {path.stem}")
    return [curves, cases, gradcam]


def cost_sections(methods: list[MethodResults], crossval: dict | None) -> list[Section]:
    cost = Section("Model cost")
    table = profile_table(methods)
    if len(table):
        cost.text("From artifacts/profile/<method>/profile.json: MACs by torch.utils.flop_counter, latency p50/p95 "
                  "and FPS on the device named, PyTorch vs ONNX Runtime (same input size and batch).").table(table)
    else:
        cost.text("No profile.json found (run `dvc repro profile@<method>`).")
    cv = Section("Cross-validation")
    if crossval:
        cv.text(f"{crossval['k']}-fold cross-validation of {crossval['method']} on the train + val pool of "
                "splits.json (grouped folds; no test image), with the crossval recipe; held-out Dice of each fold's "
                "last epoch.")
        cv.table(pd.DataFrame([{"method": crossval["method"], "k": crossval["k"], "Dice mean": crossval["dice_mean"],
                                "Dice std": crossval["dice_std"],
                                "folds": ", ".join(f"{v:.3f}" for v in crossval["folds"])}]))
        cv.figure("crossval", cv_figure(crossval), "Held-out Dice per fold, mean ± std.")
    else:
        cv.text("No cross-validation summary found.")
    return [cost, cv]


def significance_section(methods: list[MethodResults], cfg, seed: int) -> tuple[Section, pd.DataFrame]:
    section = Section("Significance").text(
        f"Paired bootstrap of the per-image Dice difference (A − B) on the images both methods were scored on: "
        f"{cfg.n_boot} resamples (seed {seed}), {cfg.confidence:.0%} percentile interval; 'significant' = the "
        "interval excludes 0. The bootstrap p-value and its Holm adjustment over all rows are given beside it.")
    if cfg.pairs:
        section.text("Pairs compared (report.pairs): each paper's proposed method against its own baseline or "
                     "ablation, where both were evaluated.")
    table = significance_table(methods, cfg.n_boot, seed, cfg.confidence, cfg.pairs)
    if len(table):
        section.table(table)
    else:
        section.text("Only one method evaluated: no pairwise comparison (add methods to train.methods).")
    registry = registry_table(methods)
    if len(registry):
        section.text("Model registry: the alias 'champion' of each registered model moved only when the paired "
                     "bootstrap on the validation images showed a significant Dice gain (tracking.promotion).")
        section.table(registry, "Registration decisions (from artifacts/models/<method>/run.json)")
    return section, table


def leakage_section(pairs: pd.DataFrame, summary: dict, facts: pd.DataFrame, shown: int = 6) -> Section:
    section = Section("Leakage check").text(
        f"Near duplicates between the training side (train + val) and every test set of splits.json: dHash and "
        f"pHash (64 bits each) both within {summary['max_distance']} bits, over {summary['hashed']} images "
        "(polypflow/leakage.py). Exact duplicates and video-sequence mates are already kept on one side by split.")
    section.table(pd.DataFrame([{"test set": k, "test images with a near duplicate in training": v}
                                for k, v in summary["test_images_with_near_duplicate"].items()]))
    if not len(pairs):
        return section.text("No near-duplicate pair found.")
    section.table(pairs, f"{len(pairs)} near-duplicate pairs (closest first)")
    paths = by_image_key(facts)["image_path"]
    for i, row in pairs.head(shown).iterrows():
        section.figure(f"leak_{i}", thumbnail_pair([paths[row["test_key"]], paths[row["train_key"]]]),
                       f"test {row['test_key']} | {row['train_side']} {row['train_key']} "
                       f"(dHash {row['dhash_distance']}, pHash {row['phash_distance']})")
    return section


def build(params: Params, methods: list[MethodResults], crossval: dict | None, leakage: tuple[pd.DataFrame, dict],
          facts: pd.DataFrame) -> Report:
    """All sections of the report for ``methods`` (in ``train.methods`` order)."""
    cfg = params.report
    papers, figures = load_paper_figures(cfg.paper_figures)
    overview = Section("Overview").text(
        f"Methods: {', '.join(f'{m.name} ({m.arch})' for m in methods)}. Test sets: "
        + ", ".join(f"{d} ({m_protocol(methods, d)}, n={next(m.summary[d]['n'] for m in methods if d in m.summary)})"
                    for d in datasets_of(methods)) + f". Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.")
    significance, sig_table = significance_section(methods, cfg, params.seed)
    pairs, leak_summary = leakage
    sections = [overview, *results_sections(methods, papers, figures, crossval, cfg, params.seed),
                *curve_sections(methods), *cost_sections(methods, crossval), significance,
                leakage_section(pairs, leak_summary, facts)]
    facts_out = {"methods": [m.name for m in methods], "significant_pairs": int((sig_table.get("significant", pd.Series()) == "yes").sum()),
                 "comparisons": int(len(sig_table)), "leakage_pairs": int(leak_summary["pairs"]),
                 "mean_dice": {f"{m.name}.{d}": s[MODEL_DICE] for m in methods for d, s in m.summary.items()}}
    return Report("polypflow evaluation report", sections, facts_out)


# ---------------------------------------------------------------- rendering


def fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def html_table(frame: pd.DataFrame, caption: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td class='{cell_class(c, v)}'>{html.escape(fmt(v))}</td>" for c, v in row.items())
                   + "</tr>" for _, row in frame.iterrows())
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<div class='scroll'><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def cell_class(column: str, value: object) -> str:
    if column == "significant":
        return "sig" if value == "yes" else "nonsig"
    return "num" if isinstance(value, (int, float, np.number)) else ""


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;
padding:0 1em;color:#222}h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1em}th,td{border:1px solid #ccc;padding:3px 6px}
th{background:#f0f0f0;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.sig{background:#d7f5d7;font-weight:bold}td.nonsig{color:#777}caption{text-align:left;font-weight:bold;
padding:4px 0}.scroll{overflow-x:auto}figure{display:inline-block;margin:0.5em;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:12px;color:#444;max-width:640px}
nav a{margin-right:1em}"""


def to_html(report: Report) -> str:
    """One self-contained page: inline CSS, figures as base64 PNG, no scripts."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(report.title)}</h1><nav>"]
    parts += [f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(report.sections)]
    parts.append("</nav>")
    for i, section in enumerate(report.sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if block[0] == "text":
                parts.append(f"<p>{html.escape(block[1])}</p>")
            elif block[0] == "table":
                parts.append(html_table(block[1], block[2]))
            else:
                data = base64.b64encode(block[2]).decode()
                parts.append(f"<figure><img alt='{html.escape(block[1])}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{html.escape(block[3])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def md_table(frame: pd.DataFrame, caption: str) -> str:
    cell = lambda v: fmt(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"**{caption}**", ""] if caption else []
    lines += ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(report: Report, figure_dir: str) -> tuple[str, dict[str, bytes]]:
    """Markdown of the same sections; figures are returned as ``{relative path: png}`` to write beside it."""
    lines, files = [f"# {report.title}", ""], {}
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if block[0] == "text":
                lines.append(block[1])
            elif block[0] == "table":
                lines.append(md_table(block[1], block[2]))
            else:
                path = f"{figure_dir}/{block[1]}.png"
                files[path] = block[2]
                lines.append(f"![{block[3]}]({path})  \n*{block[3]}*")
            lines.append("")
    return "\n".join(lines), files
