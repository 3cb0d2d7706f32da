"""The report's accuracy-vs-FPS chart: our fp32/int8 points, their Pareto front, published maps and CPU points."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from polypflow.report import figures, tables
from polypflow.report.load import MethodResults, load_paper_figures
from stages import report as report_stage
from tests.polypflow.report.test_report import crafted_project, with_published_maps

pytestmark = pytest.mark.quick


def grid(fp32: float, int8: float, size: int = 352, graph: str | None = None) -> list[dict]:
    """An ORT grid at ``size`` px with 1 and 2 threads (2 threads at the given FPS); rows without ``graph`` are the
    shipped graph's, as profiles written before the plain network was timed."""
    label = {"graph": graph} if graph else {}
    return [{**label, "precision": p, "size": size, "threads": t, "batch": 1, "p50_ms": 1e3 * t / (2 * f),
             "p95_ms": 1e3 / f, "fps": f * t / 2} for p, f in (("fp32", fp32), ("int8", int8)) for t in (1, 2)]


def export_check(dice: dict[str, float], int8: dict[str, float] | None) -> dict:
    """An export check (int8/check.json, plain/check.json) of graphs with fp32 ``dice`` and ``int8`` drops."""
    if not int8:
        return {"quantised": False, "reason": "declined"}
    return {"quantised": True, "test_sets": {d: {"n": 5, "fp32": v, "int8": v - int8[d]} for d, v in dice.items()}}


def results(name: str, dice: dict[str, float], ort: list[dict] | None, int8: dict[str, float] | None = None,
            external: bool = False, arch: str = "unet", plain: dict | None = None) -> MethodResults:
    return MethodResults(name, arch, {d: {"dice_at_method_threshold": v} for d, v in dice.items()}, pd.DataFrame(),
                         pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), Path("."),
                         {"image_size": 128, "ort_grid": ort} if ort else None, {"image_size": 128}, {},
                         external=external, int8=None if external else export_check(dice, int8), plain=plain)


def test_points_are_fp32_and_int8_at_the_largest_size_with_most_threads_and_the_front_is_the_undominated_ones():
    fast = results("fast", {"a": 0.70, "b": 0.60}, grid(40.0, 50.0) + grid(90.0, 99.0, size=256),
                   int8={"a": 0.01, "b": 0.03})
    slow_good = results("slow_good", {"a": 0.90, "b": 0.80}, grid(10.0, 12.0), int8={"a": 0.01, "b": 0.01})
    dominated = results("dominated", {"a": 0.60, "b": 0.50}, grid(30.0, 35.0), int8={"a": 0.0, "b": 0.0})
    pranet = results("pranet_published", {"a": 0.95, "b": 0.85}, None, external=True, arch="pranet")
    points = tables.pareto_points([fast, slow_good, dominated, pranet])
    assert tables.chart_setting([fast, slow_good]) == (352, 2)
    assert len(points) == 6 and set(points["size"]) == {352} and set(points["threads"]) == {2}
    row = points.set_index(["method", "precision"])
    assert row.loc[("fast", "fp32"), "FPS"] == 40.0 and row.loc[("fast", "int8"), "FPS"] == 50.0
    assert row.loc[("fast", "fp32"), "mean Dice"] == pytest.approx(0.65)
    assert row.loc[("fast", "int8"), "mean Dice"] == pytest.approx(0.63)  # the check's int8 Dice, mean over sets
    on_front = set(points.loc[points["front"] == "yes", "method"] + " " + points.loc[points["front"] == "yes", "precision"])
    assert on_front == {"fast fp32", "fast int8", "slow_good fp32", "slow_good int8"}  # 'dominated' is slower and worse


def test_a_tta_model_adds_its_plain_network_as_hollow_points_scored_by_its_own_check():
    plain = {"applies": True, "shipped_tta": "hvflip", **export_check({"a": 0.80, "b": 0.70}, {"a": 0.02, "b": 0.02})}
    tta = results("tta", {"a": 0.84, "b": 0.74}, grid(10.0, 20.0, graph="shipped") + grid(30.0, 60.0, graph="plain"),
                  int8={"a": 0.0, "b": 0.0}, plain=plain)
    untouched = results("no_tta", {"a": 0.5, "b": 0.5}, grid(35.0, 36.0), int8={"a": 0.0, "b": 0.0},
                        plain={"applies": False, "reason": "no test-time augmentation"})
    points = tables.pareto_points([tta, untouched]).set_index(["method", "graph", "precision"])
    assert len(points) == 6 and set(points.loc["no_tta"].index) == {("shipped", "fp32"), ("shipped", "int8")}
    assert points.loc[("tta", "plain", "fp32"), ["FPS", "mean Dice"]].tolist() == pytest.approx([30.0, 0.75])
    assert points.loc[("tta", "plain", "int8"), ["FPS", "mean Dice"]].tolist() == pytest.approx([60.0, 0.73])
    assert points.loc[("tta", "shipped", "fp32"), "mean Dice"] == pytest.approx(0.79)  # the evaluation's, with TTA
    assert points.loc[("tta", "plain", "int8"), "front"] == "yes"
    assert points.loc[("no_tta", "shipped", "fp32"), "front"] == "no"  # the plain int8 graph is faster and better
    assert set(tables.ort_grid_table([tta])["graph"]) == {"shipped", "plain"}
    none = pd.DataFrame(columns=["label", "FPS", "mean Dice", "note"])
    png = figures.pareto_figure(points.reset_index(), none, "FPS")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_published_points_mark_maps_without_our_fps_and_cpu_papers_as_not_like_with_like():
    papers, figs = load_paper_figures(REPO / "references" / "paper_figures.yaml")
    pranet = results("pranet_published", {"a": 0.9, "b": 0.7}, None, external=True, arch="pranet")
    published = tables.published_points([pranet], papers, figs)
    maps = published[published["FPS"].isna()]
    assert len(maps) == 1 and maps["mean Dice"].iloc[0] == pytest.approx(0.8)
    assert "FPS not measured here" in maps["label"].iloc[0]
    cpu = published[published["FPS"].notna()]
    assert list(cpu["FPS"]) == [30.0] and list(cpu["mean Dice"]) == [0.8]  # UltraSeg-130K, from the yaml, not code
    assert "UltraSeg-130K" in cpu["label"].iloc[0] and "not like-with-like" in cpu["label"].iloc[0]


def test_pareto_figure_draws_a_png():
    points = tables.pareto_points([results("m", {"a": 0.7}, grid(20.0, 25.0), int8={"a": 0.004})])
    published = pd.DataFrame([{"label": "maps", "FPS": np.nan, "mean Dice": 0.8, "note": ""},
                              {"label": "paper", "FPS": 30.0, "mean Dice": 0.8, "note": "cpu"}])
    png = figures.pareto_figure(points, published, "FPS at 352 px")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_draws_the_chart_and_its_points_table(tmp_path, synthetic_root):
    params = with_published_maps(tmp_path, crafted_project(tmp_path, synthetic_root))
    profile = params.paths.artifacts / "profile" / "unet" / "profile.json"
    profile.write_text(json.dumps({**json.loads(profile.read_text()), "ort_grid": grid(20.0, 24.0) + grid(40.0, 45.0, 256)}))
    check = params.paths.artifacts / "export" / "unet" / "int8" / "check.json"
    check.parent.mkdir(parents=True)
    summary = json.loads((params.paths.artifacts / "eval" / "unet" / "summary.json").read_text())
    check.write_text(json.dumps({"quantised": True, "test_sets": {
        d: {"n": s["n"], "fp32": s["dice_at_method_threshold"], "int8": s["dice_at_method_threshold"] - 0.002}
        for d, s in summary.items()}}))
    report_stage.run(params)
    markdown = (params.paths.reports / "report.md").read_text()
    assert "](figures/pareto.png)" in markdown and (params.paths.reports / "figures" / "pareto.png").stat().st_size > 5000
    assert "| unet | shipped | int8 | 64 | 352 | 2 | 24.0" in markdown  # 'better' has no profile: no point
    assert "| unet | shipped | fp32 | 64 | 256 | 2 | 40.0" not in markdown.split("The chart's points")[1]
    assert "PraNet (published maps): FPS not measured here" in markdown and "UltraSeg-130K" in markdown
