"""Runs of one profile that differ only in their seed, side by side: is the recipe, not one seed of it, at a published
method's level?

    python -m benchmarks.seeds RUN RUN [RUN ...] [--method ic_polypseg_lite1] [--against pranet_published]

Each RUN is a checkout whose pipeline ran evaluate@ and export@ for ``--method`` and evaluate@ for ``--against`` (one
of ``external``: a published method's own maps, scored by our evaluator); its own ``params.yaml`` gives its seed and
where its artifacts are. The runs must share their profile and differ in seed. For each figure of the model (the
shipped map's toolbox meanDic and mDice from evaluate@; the exported graphs' mDice from export@'s ``per_image.csv``,
all at the model's threshold), it prints each run's value per test set, the runs' mean and sample s.d., the published
figure, and how many runs reach it. The published figure is the paper's for meanDic (``report.paper_figures``, the
rows of the maps' architecture) and the maps' own mDice for the others. Then the paired test: per image, the runs'
mean Dice (the images every run scored) minus the maps' Dice, a paired bootstrap over images with the report's
``n_boot``, ``confidence`` and seed, Holm over its rows: the recipe's expected Dice against the maps, with the
seed-to-seed spread averaged out rather than drawn once (the interval resamples images; the runs are averaged, not
resampled, so it does not widen for the seeds' own spread). Settings are the first run's. Prints markdown.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from polypflow.report.load import MethodResults, load_external, load_method, load_paper_figures
from polypflow.report.tables import EXPORTED_GRAPHS, dice_of, graph_dice, paired_table, scores_on
from polypflow.settings.config import Params, load_params

PerImage = Callable[[MethodResults, str], pd.Series]


@dataclass(frozen=True)
class Figure:
    label: str
    scores: PerImage  # the model's per-image scores on a test set, by image key (empty where not scored)
    published: str  # "paper": the paper's figure; "maps": the published maps' mDice, scored by our evaluator


def exported(graph: str, precision: str) -> Figure:
    return Figure(f"{graph} graph {precision}, mDice", lambda m, d: graph_dice(m, graph, precision, d), "maps")


FIGURES = (Figure("shipped, meanDic (toolbox)", lambda m, d: scores_on(m.per_image, d, "tb_dice"), "paper"),
           Figure("shipped, mDice", dice_of, "maps"),
           *(exported(graph, precision) for graph, precision in EXPORTED_GRAPHS))


@dataclass(frozen=True)
class Run:
    root: Path
    params: Params
    model: MethodResults
    maps: MethodResults


def under(root: Path, path: Path) -> Path:
    """A setting's path, relative ones read from checkout ``root``."""
    return path if path.is_absolute() else root / path


def load_run(root: Path, method: str, against: str) -> Run:
    """``root``'s settings, ``method``'s outputs and the ``against`` maps' evaluation, read from ``root``."""
    params = load_params(root / "params.yaml")
    if against not in params.external:
        known = sorted(params.external)
        raise ValueError(f"{root / 'params.yaml'}: no external method {against!r} (known: {known})")
    paths = params.paths.model_copy(update={"artifacts": under(root, params.paths.artifacts)})
    params = params.model_copy(update={"paths": paths})
    return Run(root, params, load_method(params, method), load_external(params, against))


def check_runs(runs: list[Run]) -> None:
    """One profile, one seed a run."""
    first, profile = runs[0], runs[0].params.profile_name
    for run in runs[1:]:
        if run.params.profile_name != profile:
            raise ValueError(f"{run.root / 'params.yaml'}: profile {run.params.profile_name!r}, but "
                             f"{first.root / 'params.yaml'} has {profile!r}: compare one profile's runs")
    seeds = [run.params.seed for run in runs]
    if len(set(seeds)) < len(seeds):
        given = ", ".join(f"{r.root}: {r.params.seed}" for r in runs)
        raise ValueError(f"runs share a seed ({given}): give each run its own")


def paper_figures(params: Params, root: Path, arch: str | None) -> dict[str, float]:
    """The paper's mDice of ``arch`` per test set, from ``report.paper_figures``: the architecture's own paper (its
    key is the arch's) where it gives one, else the first paper that restates it."""
    _, figures = load_paper_figures(under(root, params.report.paper_figures))
    rows = figures[(figures["arch"] == arch) & (figures["metric"] == "dice") & (figures["scope"] == "test")]
    rows = rows.assign(other=rows["paper"] != arch).sort_values("other", kind="stable")
    return rows.drop_duplicates("dataset").set_index("dataset")["value"].to_dict()


def published(runs: list[Run], figure: Figure, datasets: list[str]) -> dict[str, float]:
    if figure.published == "paper":
        figures = paper_figures(runs[0].params, runs[0].root, runs[0].maps.arch)
        return {d: figures[d] for d in datasets if d in figures}
    return {d: runs[0].maps.summary[d]["dice"] for d in datasets if d in runs[0].maps.summary}


def figure_table(runs: list[Run], figure: Figure, datasets: list[str]) -> str:
    """Each run's mean over each test set, the runs' mean (s.d.), the published figure and the runs reaching it."""
    values = {d: [float(s.mean()) if len(s := figure.scores(r.model, d)) else None for r in runs] for d in datasets}
    reference = published(runs, figure, datasets)
    head = f"| {figure.label} | " + " | ".join(datasets) + " |\n|---|" + "---:|" * len(datasets)
    lines = [f"| seed {r.params.seed} | " + " | ".join(cell(values[d][i]) for d in datasets) + " |"
             for i, r in enumerate(runs)]
    lines.append("| mean (s.d.) | " + " | ".join(spread(values[d]) for d in datasets) + " |")
    lines.append(f"| published ({figure.published}) | " + " | ".join(cell(reference.get(d)) for d in datasets) + " |")
    lines.append("| runs at or above | " + " | ".join(reached(values[d], reference.get(d)) for d in datasets) + " |")
    return "\n".join([head, *lines])


def cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def spread(values: list[float | None]) -> str:
    if None in values:
        return "–"
    return f"{statistics.mean(values):.4f} ({statistics.stdev(values):.4f})"


def reached(values: list[float | None], reference: float | None) -> str:
    if reference is None or None in values:
        return "–"
    return f"{sum(v >= reference for v in values)} of {len(values)}"


def seed_mean(runs: list[Run], scores: PerImage, dataset: str) -> pd.Series:
    """Per image, the runs' mean score, over the images every run scored (empty if a run scored none)."""
    table = pd.concat([scores(r.model, dataset) for r in runs], axis=1, join="inner")
    return table.mean(axis=1) if table.shape[1] == len(runs) else pd.Series(dtype=float)


def pooled_test(runs: list[Run], datasets: list[str]) -> pd.DataFrame:
    """The runs' per-image mean Dice minus the maps' Dice, per figure compared with the maps and test set."""
    maps = runs[0].maps
    compared = [(f"{f.label}, mean of {len(runs)} seeds", dice, maps.label, dice_of(maps, d), d)
                for f in FIGURES if f.published == "maps" for d in datasets
                if d in maps.summary and len(dice := seed_mean(runs, f.scores, d))]
    report = runs[0].params.report
    return paired_table(compared, report.n_boot, runs[0].params.seed, report.confidence)


def render(runs: list[Run]) -> str:
    split = runs[0].params.split
    datasets = [d for d in (*split.datasets, *split.unseen) if d in runs[0].model.summary]
    parts = [f"# {runs[0].model.name}, profile {runs[0].params.profile_name}, seeds "
             f"{', '.join(str(r.params.seed) for r in runs)}"]
    parts += [figure_table(runs, figure, datasets) for figure in FIGURES]
    test = pooled_test(runs, datasets)
    parts.append("## The runs' per-image mean against " + runs[0].maps.label)
    parts.append(test.to_markdown(index=False, floatfmt=".4f") if len(test) else "(no per-image scores to pair)")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="checkouts whose pipeline ran, one per seed")
    p.add_argument("--method", default="ic_polypseg_lite1")
    p.add_argument("--against", default="pranet_published", help="an external method of params.yaml")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give at least two runs")
    runs = [load_run(root, args.method, args.against) for root in args.runs]
    check_runs(runs)
    print(render(runs), end="")


if __name__ == "__main__":
    main()
