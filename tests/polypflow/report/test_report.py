"""The report stage on crafted pipeline outputs: two methods, one clearly better; self-contained HTML."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, make_pair, synthetic_params
from polypflow.settings.config import Params
from polypflow.report import line_styles, load_method
from stages import report as report_stage

pytestmark = pytest.mark.quick


def write_eval(root, method: str, keys: dict[str, list[str]], shift: float, rng, below_half: float = 0.0) -> None:
    """``below_half``: how much lower the Dice at 0.5 is than at the method's own threshold (an under-confident
    model that ships with a searched threshold, as CRIS does)."""
    out = root / "artifacts" / "eval" / method
    (out / "cases").mkdir(parents=True)
    rows, summary, pr, sweep, cases = [], {}, [], [], []
    for dataset, ks in keys.items():
        dice = np.clip(rng.uniform(0.5, 0.8, len(ks)) + shift, 0, 1)
        at_half = np.clip(dice - below_half, 0, 1)
        part = pd.DataFrame({"key": ks, "dice": at_half, "iou": at_half / (2 - at_half), "dice_at_method_threshold": dice,
                             "tb_dice": dice - 0.02, "dataset": dataset, "protocol": "unseen" if dataset == "gamma" else "seen"})
        rows.append(part)
        summary[dataset] = {"n": len(ks), "protocol": part["protocol"][0], "dice": float(at_half.mean()),
                            "dice_at_method_threshold": float(dice.mean()), "iou": float(part["iou"].mean()),
                            "tb_dice": float(part["tb_dice"].mean()), "auc": None}
        t = np.linspace(0, 1, 5)
        pr.append(pd.DataFrame({"threshold": t, "precision": 0.5 + t / 2, "recall": 1 - t, "dataset": dataset}))
        sweep.append(pd.DataFrame({"threshold": [0.3, 0.5, 0.7], "dice": [0.6, 0.7, 0.65], "dataset": dataset}))
        Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(out / "cases" / f"{dataset}_best1.png")
        cases.append({"dataset": dataset, "kind": "best", "rank": 1, "key": ks[0], "dice": 0.9, "file": f"{dataset}_best1.png"})
    pd.concat(rows).to_csv(out / "per_image.csv", index=False)
    pd.concat(pr).to_csv(out / "pr.csv", index=False)
    pd.concat(sweep).to_csv(out / "sweep.csv", index=False)
    pd.DataFrame(cases).to_csv(out / "cases" / "cases.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "gradcam").mkdir()
    Image.fromarray(np.zeros((8, 32, 3), np.uint8)).save(out / "gradcam" / "panel.png")


def crafted_project(tmp_path, synthetic_root) -> Params:
    raw = synthetic_params(synthetic_root)
    raw["paths"] = {k: str(tmp_path / v) for k, v in raw["paths"].items()}
    raw["methods"]["better"] = {"arch": "unet", "model": raw["methods"]["unet"]["model"]}
    raw["train"]["methods"] = ["unet", "better"]
    raw["report"] = {"n_boot": 300, "paper_figures": str(REPO / "references" / "paper_figures.yaml")}
    params = Params.model_validate(raw)
    keys = {"alpha": [f"alpha/{i}" for i in range(1, 13)], "gamma": [f"gamma/{i}" for i in range(1, 9)]}
    facts, all_keys = [], {**keys, "beta": [f"beta/{i}" for i in range(1, 9)]}
    (tmp_path / "img").mkdir()
    for seed, key in enumerate(k for ks in all_keys.values() for k in ks):
        path = tmp_path / "img" / f"{key.replace('/', '_')}.png"
        make_pair(seed)[0].save(path)
        facts.append({"dataset": key.split("/")[0], "id": key.split("/")[1], "image_path": str(path)})
    params.paths.facts.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(facts).to_csv(params.paths.facts, index=False)
    params.paths.splits.write_text(json.dumps({"scheme": "pranet", "train": [f"beta/{i}" for i in range(1, 7)],
                                               "val": ["beta/7", "beta/8"], "test": keys, "unseen": ["gamma"]}))
    rng = np.random.default_rng(0)
    write_eval(tmp_path, "unet", keys, 0.0, rng)
    write_eval(tmp_path, "better", keys, 0.15, np.random.default_rng(0), below_half=0.5)
    cv = tmp_path / "artifacts" / "crossval" / "unet"
    cv.mkdir(parents=True)
    (cv / "summary.json").write_text(json.dumps({"method": "unet", "k": 2, "dice_mean": 0.7, "dice_std": 0.05, "folds": [0.66, 0.74]}))
    prof = tmp_path / "artifacts" / "profile" / "unet"
    prof.mkdir(parents=True)
    (prof / "profile.json").write_text(json.dumps({
        "params": 2.5e6, "macs_at_macs_image_size": 3e9, "macs_image_size": 352, "macs_at_image_size": 1e8, "image_size": 64,
        "batch_size": 1, "device": "cpu", "torch": {"p50_ms": 5.0, "p95_ms": 6.0, "fps": 200.0},
        "onnxruntime": {"p50_ms": 2.0, "p95_ms": 3.0, "fps": 500.0}}))
    return params


def test_report_stage(tmp_path, synthetic_root):
    params = crafted_project(tmp_path, synthetic_root)
    facts = report_stage.run(params)
    out = params.paths.reports
    page = (out / "report.html").read_text()
    assert "<table>" in page and "mDice@0.5" in page and "meanDic (tb)" in page
    assert page.count("data:image/png;base64,") >= 6  # PR, sweep, distribution, CV, cases, Grad-CAM
    assert "http://" not in page and "https://" not in page and "<script" not in page  # renders offline
    assert "unseen" in page and "U-Net" in page and "76.69 %" in page  # beside the papers' figures (arch unet)
    assert "td class='sig'" in page and "Cross-validation" in page and "Leakage check" in page
    # 'better' is 0.15 above 'unet' on every image of both test sets at its own threshold (0.35 below at 0.5):
    # both comparisons significant, in its favour, because models are compared as they ship
    assert facts["comparisons"] == 2 and facts["significant_pairs"] == 2
    assert "| alpha | unet | better | 12 | -0.1500 |" in (out / "report.md").read_text()
    mean_dice = json.loads((out / "report.json").read_text())["mean_dice"]
    assert mean_dice["better.alpha"] == pytest.approx(mean_dice["unet.alpha"] + 0.15, abs=0.01)
    markdown = (out / "report.md").read_text()
    assert "| method | dataset | protocol |" in markdown and "](figures/pr.png)" in markdown
    assert (out / "figures" / "pr.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["leakage"]["hashed"] == 28


def test_report_pairs_choose_the_comparisons(tmp_path, synthetic_root):
    params = crafted_project(tmp_path, synthetic_root)
    params = params.model_copy(update={"report": params.report.model_copy(update={"pairs": [("better", "unet"),
                                                                                           ("unet", "not_evaluated")]})})
    facts = report_stage.run(params)
    assert facts["comparisons"] == 2   # better vs unet on both test sets; the pair with an absent method is skipped
    page = (params.paths.reports / "report.html").read_text()
    assert "Pairs compared (report.pairs)" in page


def test_every_method_gets_its_own_line_style(tmp_path, synthetic_root):
    params = crafted_project(tmp_path, synthetic_root)
    method = load_method(params, "unet")
    many = [dataclasses.replace(method, name=f"m{i}") for i in range(23)]
    styles = line_styles(many)
    assert len({(tuple(s["color"]), s["ls"]) for s in styles.values()}) == 23


def with_published_maps(tmp_path, params: Params) -> Params:
    """An external method (published maps) scored on all of alpha and 6 of gamma's 8 images, better than unet."""
    from polypflow.settings.config import ExternalMethod

    keys = {"alpha": [f"alpha/{i}" for i in range(1, 13)], "gamma": [f"gamma/{i}" for i in range(1, 7)]}
    write_eval(tmp_path, "published", keys, 0.1, np.random.default_rng(0))
    summary_path = tmp_path / "artifacts" / "eval" / "published" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["gamma"]["n_missing"] = 2
    summary_path.write_text(json.dumps(summary))
    spec = ExternalMethod(title="PraNet (published maps)", arch="pranet", root=tmp_path, folders={})
    return params.model_copy(update={"external": {"published": spec}})


def test_report_puts_published_maps_beside_our_models_on_one_screen(tmp_path, synthetic_root):
    params = with_published_maps(tmp_path, crafted_project(tmp_path, synthetic_root))
    facts = report_stage.run(params)
    assert facts["external"] == ["published"] and facts["scheme"] == "pranet"
    page = (params.paths.reports / "report.html").read_text()
    first = page.index("<h2")
    assert page[first:].startswith("<h2 id='s0'>Summary</h2>") and "class='summary'" in page[:first + 200]
    assert "PraNet (published maps)" in page[first:page.index("<h2 id='s1'")]  # in the summary's chart and table
    markdown = (params.paths.reports / "report.md").read_text()
    # each of our methods against the published maps, on the images both have (gamma: 6 of 8)
    assert "| gamma | unet | PraNet (published maps) | 6 |" in markdown
    assert "| alpha | better | PraNet (published maps) | 12 |" in markdown
    assert "6 of 8" in markdown  # the results table says the maps cover 6 of gamma's 8 test images
    # the PraNet paper's Kvasir figure is on the pranet protocol, like ours: compared; CRIS's UNet is not
    assert "protocol 70_15_15_per_dataset vs ours pranet" in markdown


def test_report_tests_the_exported_graphs_against_published_maps_image_by_image(tmp_path, synthetic_root):
    """export's per_image.csv of unet's int8 graph and of its plain network are paired with the published maps'
    per-image Dice like an evaluated model; 'better' has no such file and adds no row."""
    from polypflow.settings.layout import method_layout

    params = with_published_maps(tmp_path, crafted_project(tmp_path, synthetic_root))
    published = pd.read_csv(tmp_path / "artifacts" / "eval" / "published" / "per_image.csv")
    maps = published[["dataset", "key"]].assign(dice=published["dice_at_method_threshold"])
    files = method_layout(params, "unet")
    for path, fp32, int8 in ((files.int8_scores, 0.0, 0.0), (files.plain_scores, 0.05, -0.05)):
        path.parent.mkdir(parents=True, exist_ok=True)
        maps.assign(fp32=maps["dice"] + fp32, int8=maps["dice"] + int8).drop(columns="dice").to_csv(path, index=False)
    facts = report_stage.run(params)
    markdown = (params.paths.reports / "report.md").read_text()
    assert "Exported graphs against published maps" in markdown
    assert "| alpha | unet (plain fp32) | PraNet (published maps) | 12 | 0.0500 |" in markdown
    assert "| gamma | unet (plain int8) | PraNet (published maps) | 6 | -0.0500 |" in markdown
    assert "| alpha | unet (shipped int8) | PraNet (published maps) | 12 | 0.0000 |" in markdown
    assert "| unet (shipped fp32)" not in markdown and "| better (" not in markdown  # evaluated, or not exported
    assert facts["comparisons"] == 6  # the evaluated models' three pairs on two sets, counted as before


def test_a_detectors_exported_graphs_are_not_paired_with_published_maps():
    """export's per_image.csv of a detector holds box F1, not Dice: a segmenter's int8 graph gets its row against
    the published maps, a detector's with the same file gets none."""
    from pathlib import Path

    from polypflow.report import tables
    from polypflow.report.load import MethodResults

    keys = ["alpha/1", "alpha/2", "alpha/3"]
    scores = pd.DataFrame({"dataset": "alpha", "key": keys, "fp32": [1.0, 0.5, 1.0], "int8": [1.0, 1.0, 0.0]})

    def method(name: str, arch: str | None, graph_scores: dict | None = None) -> MethodResults:
        per_image = pd.DataFrame({"dataset": "alpha", "key": keys, "dice_at_method_threshold": [0.5, 0.6, 0.7]})
        return MethodResults(name, arch, {"alpha": {"n": 3}}, per_image, pd.DataFrame(), pd.DataFrame(),
                             pd.DataFrame(), Path("."), None, {}, {}, external=arch is None,
                             graph_scores=graph_scores or {})

    methods = [method("seg", "unet", {"shipped": scores}), method("det", "gfl_atss", {"shipped": scores}),
               method("maps", None)]
    table = tables.graph_significance_table(methods, 100, 0, 0.95)
    assert table["A"].tolist() == ["seg (shipped int8)"] and table["B"].tolist() == ["maps"]
