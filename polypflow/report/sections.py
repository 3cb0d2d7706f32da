"""The report's sections: the prose around the tables and figures, and :func:`build`, which assembles them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from polypflow.settings.config import Params
from polypflow.evaluate.seg_metrics import MODEL_DICE
from polypflow.evaluate.stability import FILM
from polypflow.data.boxes import kvasir_agreement
from polypflow.data.images import by_image_key
from polypflow.report import figures as fig
from polypflow.report import tables
from polypflow.report.load import MethodResults, load_paper_figures

Block = tuple  # ("text", str) | ("table", DataFrame, caption) | ("figure", name, png bytes, caption)


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    boxed: bool = False  # drawn as a framed box (the one-screen summary)

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


SCHEMES = {
    "pranet": "the PraNet protocol exactly (test = the authors' lists; train = every other image of those datasets), "
              "as PraNet, IC-PolypSeg and SANet report on it. It is not leakage-safe: ClinicDB test frames have "
              "video-sequence mates in training, as in the papers",
    "pranet_grouped": "the PraNet protocol's sizes with whole video sequences and exact duplicates on one side "
                      "(leakage-safe; no paper reports on it)",
    "70_15_15": "70/15/15 per dataset, whole sequences on one side (seeded)",
    "80_10_10": "80/10/10 per dataset, whole sequences on one side (seeded)",
}


def protocol_text(splits: dict) -> str:
    """Which protocol every figure of this report is on, and where validation came from."""
    tests = ", ".join(f"{d} {len(k)}" + (" (unseen)" if d in splits.get("unseen", []) else "")
                      for d, k in splits["test"].items())
    scheme = splits["scheme"]
    return (f"Protocol: split scheme '{scheme}': {SCHEMES.get(scheme, scheme)}. Test images: {tests}. Training: "
            f"{len(splits['train'])} images; validation for epoch selection: {len(splits['val'])} images held out of "
            "the training side by whole sequences (the papers select on the test set; no test image is used here "
            "for any choice).")


def summary_section(methods: list[MethodResults], splits: dict, cfg, seed: int) -> Section:
    """The one-screen summary: champion, each method's Dice per test set with its interval, published baselines."""
    section = Section("Summary", boxed=True)
    holder = tables.champion(methods)
    best = []
    for dataset in fig.datasets_of(methods):
        scored = [(m.summary[dataset][MODEL_DICE], m.label) for m in methods if dataset in m.summary]
        if scored:
            best.append(f"{dataset}: {max(scored)[1]} ({max(scored)[0]:.3f})")
    section.text((f"Champion (registry alias 'champion'): {holder[0]} ({holder[1]}). " if holder else
                  "No registered champion. ") + "Highest mDice per test set: " + "; ".join(best) + ". "
                 + protocol_text(splits))
    external = [m.label for m in methods if m.external]
    caption = (f"mDice per test set at each method's threshold, with its {cfg.confidence:.0%} bootstrap interval over "
               f"images ({cfg.n_boot} resamples)" + (f"; black: published maps ({', '.join(external)}), scored by the "
                                                     "same code on the same images" if external else "") + ".")
    section.figure("summary", fig.summary_figure(methods, cfg.n_boot, seed, cfg.confidence), caption)
    section.table(tables.summary_table(methods, fig.datasets_of(methods), cfg.n_boot, seed, cfg.confidence),
                  "mDice [95% interval] per test set, parameters and ONNX Runtime latency (batch 1, own input size)")
    return section


def results_sections(methods, papers, figures, crossval, params: Params, splits: dict) -> list[Section]:
    cfg, at = params.report, params.evaluate.threshold
    results = tables.results_table(methods, at, cfg.n_boot, params.seed, cfg.confidence)
    main = Section("Results: every method × test set × metric").text(
        f"Per image, then averaged over the test set, at the masks' original resolution. '@{at:g}': thresholded at "
        f"{at:g}; '@thr': at the method's own threshold (stored with the model: the Dice it ships with, and the one "
        "the intervals, box plots, cases and significance tests use); '(tb)': the community's evaluation toolbox "
        "(pysodmetrics; meanDic/meanIoU average 256 thresholds of the min-max normalised 8-bit map; maxDic/maxEm are "
        "the maximum of the image-averaged curve). 'seen' = the test part of a dataset that was trained on, 'unseen' "
        f"= a dataset never trained on. {protocol_text(splits)} The mDice@thr interval is a {cfg.confidence:.0%} "
        f"bootstrap interval over images ({cfg.n_boot} resamples). Published methods' maps are scored on the test "
        "images they cover ('n of N').").table(results, "Test-set means")
    ours = {"scheme": splits["scheme"],
            "crossval": f"{(crossval or {}).get('k', '?')}-fold over the {splits['scheme']} train + val images"}
    compare = tables.comparison_table(methods, papers, figures, crossval, ours)
    paper = Section("Beside the papers' figures").text(
        "Each figure a paper reported for the architecture of one of our methods (references/paper_figures.yaml, "
        "restated from METHODS.md), with ours beside it. 'like with like' says whether the two share the protocol "
        "(split scheme), the input size and, for speed, the device; 'ours − paper' is given only then, taken from "
        "the toolbox's meanDic where the paper's figure is the toolbox's. Every other row is context, not a "
        "replication verdict.")
    if len(compare):
        paper.table(compare, "Our value beside each reported figure")
    else:
        paper.text("No figure in references/paper_figures.yaml belongs to the architectures evaluated here "
                   f"({', '.join(sorted({str(m.arch) for m in methods}))}).")
    listing = pd.DataFrame([{"paper": k, "title": v["title"], "citation": v["citation"], "split": v.get("split"),
                             "input px": v.get("image_size"), "device": v.get("device"), "protocol": v["protocol"]}
                            for k, v in papers.items()])
    paper.table(listing, "Papers and their protocols")
    paper.table(figures[["paper", "arch", "variant", "dataset", "scope", "metric", "reported"]].fillna("—"),
                "Every reported figure")
    return [main, paper]


def case_figures(section: Section, m: MethodResults, score: Callable[[pd.Series], str]) -> None:
    """The best and worst cases evaluate drew for ``m`` (``cases/cases.csv``), captioned with ``score(case)``."""
    for _, c in m.cases.iterrows():
        path = m.eval_dir / "cases" / c["file"]
        if path.exists():
            section.figure(f"case_{m.name}_{Path(c['file']).stem}", path.read_bytes(),
                           f"{m.label} · {c['dataset']} · {c['kind']} {c['rank']}: {c['key']} ({score(c)})")


def curve_sections(methods: list[MethodResults], params: Params) -> list[Section]:
    low, high = params.evaluate.sweep
    curves = Section("Curves and distributions")
    if any(len(m.history) for m in methods):
        curves.figure("training", fig.training_figure(methods),
                      "Training curves (history.csv of each train@<method>; the same curves `dvc plots show` draws): "
                      "validation Dice per epoch at 0.5 (dotted: at the grid's best threshold, where the recipe "
                      "searches one) and training loss.")
    curves.figure("pr", fig.curve_figure(methods, "pr", "recall", "precision", "recall", "precision"),
                  "Precision-recall: image-averaged precision and recall at evenly spaced thresholds of the probability.")
    curves.figure("sweep", fig.curve_figure(methods, "sweep", "threshold", "dice", "threshold", "mean Dice", mark=True),
                  f"Threshold sweep: mean Dice for thresholds {low:g}..{high:g} (dotted: the method's threshold).")
    curves.figure("dice_distribution", fig.distribution_figure(methods),
                  "Per-image Dice at the method's threshold (box: quartiles, triangle: mean; dots: images).")
    cases = Section("Best and worst cases").text(
        "Per test set, the images with the highest and lowest Dice at the method's threshold: the image, then the "
        "prediction at that threshold in red (filled, with its outline) and the ground-truth outline in green.")
    for m in methods:
        case_figures(cases, m, lambda c: f"Dice {c['dice']:.3f}")
    gradcam = Section("Grad-CAM").text(
        "Panels written by evaluate: image | ground truth | prediction | Grad-CAM heatmap of the main map's "
        "predicted-polyp logits at the last conv layer feeding it (polypflow/evaluate/gradcam.py).")
    for m in methods:
        for path in sorted((m.eval_dir / "gradcam").glob("*.png")):
            gradcam.figure(f"gradcam_{m.name}_{path.stem}", path.read_bytes(), f"{m.name} · {path.stem}")
    return [curves, cases, gradcam]


def stability_section(methods: list[MethodResults], params: Params) -> Section:
    """Temporal stability per method over the test sets' video sequences, and each least stable sequence as a film."""
    video = params.video
    section = Section("Temporal stability").text(
        "Colonoscopy is video: a mask that flickers from frame to frame is unusable at the scope. For each pair of "
        "consecutive test frames of a video sequence, flicker = the fraction of the frame whose predicted label flips "
        "where the true label does not (changes the polyp's motion does not explain; 0.01: one pixel in a hundred), "
        "averaged per sequence. A false alarm is a frame whose "
        "prediction holds a region (>= detection.min_box_area px) touching no truth pixel. Figures are means over "
        f"sequences with a {params.report.confidence:.0%} bootstrap interval over sequences. A sequence with fewer "
        f"than {video.min_frames} test frames, or whose test frames lie more than {video.max_gap:g} frames apart on "
        "average, is a fragment: listed below, never aggregated (the PraNet protocol's ClinicDB test frames are such "
        "fragments). Smoothed: the moving average over frames chosen on the validation sequences (video.smoothing), "
        "applied along whole sequences; 'on' when the model ships it on, so that predict, serving and the per-image "
        "scores above use it.")
    table = tables.stability_table(methods)
    if not len(table):
        return section.text("No test set with video sequences was evaluated (datasets.yaml: sequences).")
    section.table(table, "Flicker and false-alarm rate per method and test set (whole sequences)")
    section.table(tables.sequence_table(methods), "Test frames per sequence")
    for m in methods:
        filmed = m.stability[m.stability["filmed"].astype(bool)] if "filmed" in m.stability else m.stability
        for _, row in filmed.iterrows() if "filmed" in m.stability else ():
            path = m.eval_dir / "cases" / FILM.format(dataset=row["dataset"])
            if path.exists():
                section.figure(f"film_{m.name}_{row['dataset']}", path.read_bytes(),
                               f"{m.label} · {row['dataset']} · least stable sequence {row['sequence']} "
                               f"(frames {row['first_frame']}-{row['last_frame']}, flicker {row['flicker']:.4f}, "
                               f"{row['variant']}): frames above, prediction (red) and truth outline (green) below.")
    return section


def cost_sections(methods: list[MethodResults], crossval: dict | None, papers: dict,
                  figures: pd.DataFrame) -> list[Section]:
    cost = Section("Model cost")
    table = tables.profile_table(methods)
    if len(table):
        cost.text("From artifacts/profile/<method>/profile.json: MACs by torch.utils.flop_counter, latency p50/p95 "
                  "and FPS on the device named, PyTorch vs ONNX Runtime (same input size and batch). A paper's FPS "
                  "comes from its own GPU: see 'like with like' above.").table(table)
        pareto_blocks(cost, methods, papers, figures)
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
        cv.figure("crossval", fig.cv_figure(crossval), "Held-out Dice per fold, mean ± std.")
    else:
        cv.text("No cross-validation summary found.")
    return [cost, cv]


def pareto_blocks(cost: Section, methods: list[MethodResults], papers: dict, figures: pd.DataFrame) -> None:
    """The ONNX Runtime grid (fp32/int8 × size × threads) and the accuracy-vs-FPS chart with its Pareto front."""
    grid, setting = tables.ort_grid_table(methods), tables.chart_setting(methods)
    if setting is None:
        return
    points, published = tables.pareto_points(methods), tables.published_points(methods, papers, figures)
    device = next((f" ({m.profile.get('device_name') or m.profile['device']})" for m in methods if m.profile), "")
    cost.table(grid, "ONNX Runtime on the CPU (profile.ort_sizes × profile.ort_threads): fp32 and int8 graphs rebuilt "
                     "from each checkpoint at each size; int8: static QDQ, calibrated on training images")
    cost.figure("pareto", fig.pareto_figure(points, published, f"ONNX Runtime FPS at {setting[0]} px, {setting[1]} "
                                                                 f"threads{device}"),
                f"Accuracy against speed: each segmenter's fp32 and int8 graph at {setting[0]} px with {setting[1]} "
                "threads (both shown, not the better of the two), a model shipped with test-time augmentation also "
                "without it (hollow: its plain network, same weights, one pass), Dice at the size it was trained at "
                "('trained at'); "
                "the dashed step is our Pareto front. Published maps scored here have no FPS of ours (dotted lines); "
                "a published CPU point (star) is not like with like: its own data, protocol and CPU.")
    cost.table(points, "The chart's points (int8 Dice from export's check, int8/check.json; the plain network's from "
                       "plain/check.json)")
    cost.table(published, "Beside them: published maps scored here, published CPU figures (references/paper_figures.yaml)")


def significance_section(methods: list[MethodResults], cfg, seed: int) -> tuple[Section, pd.DataFrame]:
    section = Section("Significance").text(
        f"Paired bootstrap of the per-image Dice difference (A − B) on the images both methods were scored on: "
        f"{cfg.n_boot} resamples (seed {seed}), {cfg.confidence:.0%} percentile interval; 'significant' = the "
        "interval excludes 0. The bootstrap p-value and its Holm adjustment over all rows are given beside it.")
    if cfg.pairs:
        section.text("Pairs compared (report.pairs): each paper's proposed method against its own baseline or "
                     "ablation, where both were evaluated; then each of our methods against each published method's "
                     "maps.")
    table = tables.significance_table(methods, cfg.n_boot, seed, cfg.confidence, cfg.pairs)
    if len(table):
        section.table(table)
    else:
        section.text("Only one method evaluated: no pairwise comparison (add methods to train.methods).")
    graphs = tables.graph_significance_table(methods, cfg.n_boot, seed, cfg.confidence)
    if len(graphs):
        section.text("The graphs a user deploys beyond the evaluated one, against each published method's maps by the "
                     "same test (Holm over these rows): each model's int8 graph and, for a model shipped with "
                     "test-time augmentation, its plain network (same weights, one pass) in fp32 and int8, the "
                     "real-time graphs of the accuracy-vs-FPS chart. Per-image Dice at the model's threshold at the "
                     "masks' resolution, from export's per_image.csv.")
        section.table(graphs, "Exported graphs against published maps (export/<method>/{int8,plain}/per_image.csv)")
    registry = tables.registry_table(methods)
    if len(registry):
        section.text("Model registry: the alias 'champion' of each registered model moved only when the paired "
                     "bootstrap on the validation images showed a significant Dice gain (tracking.promotion).")
        section.table(registry, "Registration decisions (from artifacts/registry/<method>/registered.json)")
    return section, table


def leakage_section(pairs: pd.DataFrame, summary: dict, facts: pd.DataFrame, shown: int = 6) -> Section:
    section = Section("Leakage check").text(
        f"Near duplicates between the training side (train + val) and every test set of splits.json: dHash and "
        f"pHash (64 bits each) both within {summary['max_distance']} bits, over {summary['hashed']} images "
        "(polypflow/data/leakage.py). Under a leakage-safe scheme, exact duplicates and video-sequence mates are already "
        "kept on one side by split; under the exact PraNet protocol they are not, and this table shows how many.")
    section.table(pd.DataFrame([{"test set": k, "test images with a near duplicate in training": v}
                                for k, v in summary["test_images_with_near_duplicate"].items()]))
    if not len(pairs):
        return section.text("No near-duplicate pair found.")
    section.table(pairs, f"{len(pairs)} near-duplicate pairs (closest first)")
    paths = by_image_key(facts)["image_path"]
    for i, row in pairs.head(shown).iterrows():
        section.figure(f"leak_{i}", fig.thumbnail_pair([paths[row["test_key"]], paths[row["train_key"]]]),
                       f"test {row['test_key']} | {row['train_side']} {row['train_key']} "
                       f"(dHash {row['dhash_distance']}, pHash {row['phash_distance']})")
    return section


def fmt_ap(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def best_mask_boxes(methods: list[MethodResults]) -> str:
    """Per test set, the highest box AP50 of a segmenter's (or published maps') mask components, and whose."""
    parts = []
    for dataset in fig.datasets_of(methods):
        scored = [(m.summary[dataset]["box_ap50"], m.label) for m in methods
                  if m.summary.get(dataset, {}).get("box_ap50") is not None]
        if scored:
            value, label = max(scored)
            parts.append(f"{dataset} {value:.3f} ({label})")
    return "; ".join(parts) or "none scored"


BOX_METRICS = {"box_ap": "AP", "box_ap50": "AP50", "box_ap75": "AP75", "box_ar100": "AR100"}


def detection_table(methods: list[MethodResults]) -> pd.DataFrame:
    """COCO box metrics per test set: each detector's boxes, and each segmenter's mask components as boxes."""
    rows = []
    for m in methods:
        for dataset, s in m.summary.items():
            if "box_ap50" not in s:
                continue
            rows.append({"method": m.label, "boxes from": "detector" if m.detector else "mask components",
                         "test set": dataset, "protocol": s.get("protocol"), "n": s.get("n"),
                         **{label: s.get(key) for key, label in BOX_METRICS.items()}})
    return pd.DataFrame(rows)


def kvasir_boxes_section(params: Params) -> list[Block]:
    """Our boxes from Kvasir-SEG's masks against the boxes Kvasir-SEG ships (``kavsir_bboxes.json``), when the
    configured source folder has them."""
    for dataset in params.ingest.datasets.values():
        source = getattr(dataset.source, "path", None)
        folder = Path(params.ingest.root) / source if source is not None else None
        if folder is None or not (folder / "kavsir_bboxes.json").is_file():
            continue
        _, agreement = kvasir_agreement(folder, params.detection.min_box_area, params.validate_.mask_threshold)
        text = (f"Boxes from masks against {dataset.name}'s own boxes ({folder / 'kavsir_bboxes.json'}): "
                f"{agreement['ours']} boxes of ours, {agreement['theirs']} of theirs on {agreement['images']} images; "
                f"{agreement['fraction_theirs_matched']:.1%} of theirs matched at IoU >= 0.5, mean IoU "
                f"{agreement['mean_iou']:.3f} (min {agreement['min_iou']:.3f}); "
                f"{agreement['images_count_differs']} images with a different box count. Mean edge offset (ours − "
                "theirs, px): " + ", ".join(f"{e} {agreement[f'mean_offset_{e}']:+.2f}"
                                            for e in ("x1", "y1", "x2", "y2")) + ".")
        return [("text", text)]
    return []


def detection_sections(methods: list[MethodResults], params: Params) -> list[Section]:
    """Detection: COCO AP per test set for the detectors and for the segmenters' mask boxes, the detectors' PR
    curves and drawn cases, and how our boxes from masks agree with Kvasir-SEG's own."""
    table = detection_table(methods)
    if not len(table):
        return []
    cfg = params.detection
    section = Section("Detection: a dedicated detector against the boxes of a segmenter's mask").text(
        "COCO AP (IoU 0.50:0.95), AP50, AP75 and AR (100 detections) per test set, by torchmetrics' mean average "
        f"precision (pycocotools). Ground truth: one box per connected component of a mask of >= {cfg.min_box_area} "
        "pixels at the mask's resolution. 'detector': the detection method's boxes (score >= "
        f"{cfg.score_threshold:g}, NMS IoU {cfg.nms_iou:g}); 'mask components': each connected component of a "
        "segmenter's mask at its threshold, scored by its mean probability, through the same code.")
    section.table(table, "Box AP per method and test set")
    detectors = [m for m in methods if m.detector]
    if detectors:
        section.figure("detection_pr", fig.curve_figure(detectors, "pr", "recall", "precision", "recall",
                                                        "precision"),
                       "Detectors: COCO's interpolated precision-recall curve at IoU 0.5.")
        for m in detectors:
            case_figures(section, m, lambda c: f"box F1 {c['f1']:.2f}; truth green, boxes scoring >= "
                                               f"{cfg.match_score:g} red")
        registry = tables.registry_table(detectors)
        if len(registry):
            section.table(registry, "Detectors' registration (champion by a paired bootstrap of validation box F1)")
    section.blocks += kvasir_boxes_section(params)
    return [section]


def build(params: Params, methods: list[MethodResults], crossval: dict | None, leakage: tuple[pd.DataFrame, dict],
          facts: pd.DataFrame, splits: dict) -> Report:
    """All sections of the report for ``methods`` (``train.methods`` order, then the external ones); detectors
    have their own section, the others are about segmentation."""
    cfg = params.report
    every, methods = methods, [m for m in methods if not m.detector]
    papers, figures = load_paper_figures(cfg.paper_figures)
    overview = Section("Overview").text(
        f"Methods: {', '.join(f'{m.label} ({m.arch})' for m in methods)}. Test sets: "
        + ", ".join(f"{d} ({fig.m_protocol(methods, d)}, n={len(splits['test'][d])})" for d in fig.datasets_of(methods))
        + f". Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.")
    significance, sig_table = significance_section(methods, cfg, params.seed)
    pairs, leak_summary = leakage
    summary = summary_section(methods, splits, cfg, params.seed)
    detectors = [m for m in every if m.detector]
    if detectors:
        summary.text("Detection, box AP50 per test set (COCO; see 'Detection'): " + "; ".join(
            f"{m.label}: " + ", ".join(f"{d} {fmt_ap(s.get('box_ap50'))}" for d, s in m.summary.items())
            for m in detectors) + ". Best boxes from a segmenter's mask components: " + best_mask_boxes(methods) + ".")
    sections = [summary, overview,
                *results_sections(methods, papers, figures, crossval, params, splits),
                *curve_sections(methods, params), stability_section(methods, params), *detection_sections(every, params),
                *cost_sections(every, crossval, papers, figures), significance, leakage_section(pairs, leak_summary, facts)]
    facts_out = {"methods": [m.name for m in every if not m.external],
                 "external": [m.name for m in methods if m.external], "scheme": splits["scheme"],
                 "champion": (tables.champion(methods) or [None])[0],
                 "significant_pairs": int((sig_table.get("significant", pd.Series()) == "yes").sum()),
                 "comparisons": int(len(sig_table)), "leakage_pairs": int(leak_summary["pairs"]),
                 "mean_dice": {f"{m.name}.{d}": s[MODEL_DICE] for m in methods for d, s in m.summary.items()},
                 "box_ap50": {f"{m.name}.{d}": s["box_ap50"] for m in every for d, s in m.summary.items()
                              if "box_ap50" in s}}
    return Report("polypflow evaluation report", sections, facts_out)
