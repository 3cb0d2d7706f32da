"""What the pipeline wrote for each method, read into :class:`MethodResults`; the papers' figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from polypflow.settings.config import Params
from polypflow.tasks import Task, task_of
from polypflow.tasks.segmentation import SegmentationTask
from polypflow.settings.layout import MethodLayout, method_layout


@dataclass
class MethodResults:
    """What the pipeline wrote for one method (absent optional parts are None/empty). ``external``: another
    method's published maps, scored by evaluate like ours (no training, profile or registry of ours)."""

    name: str
    arch: str | None
    summary: dict
    per_image: pd.DataFrame
    pr: pd.DataFrame
    sweep: pd.DataFrame
    cases: pd.DataFrame
    eval_dir: Path
    profile: dict | None
    train: dict
    run: dict  # registered.json: the register stage's run and registry decisions
    title: str = ""
    external: bool = False
    history: pd.DataFrame = field(default_factory=pd.DataFrame)  # per-epoch training curve (history.csv)
    stability: pd.DataFrame = field(default_factory=pd.DataFrame)  # per video sequence (stability.csv)
    int8: dict | None = None  # export's int8 check (int8/check.json): the task's score of both graphs
    plain: dict | None = None  # a TTA model's plain network (plain/check.json): applies or not, Dice of its graphs
    graph_scores: dict[str, pd.DataFrame] = field(default_factory=dict)  # graph -> per_image.csv of its export check

    @property
    def label(self) -> str:
        return self.title or self.name

    @property
    def task(self) -> type[Task]:
        """What the method predicts (published maps are masks)."""
        return SegmentationTask if self.external else task_of(self.arch)

    @property
    def detector(self) -> bool:
        """A method whose models predict boxes, not masks (its evaluation scored boxes)."""
        return not self.task.predicts_masks

    @property
    def threshold(self) -> float:
        return float(self.train.get("threshold", 0.5))

    @property
    def image_size(self) -> int | None:
        """The input size the model was trained and tested at (None for external maps)."""
        return (self.profile or {}).get("image_size") or self.train.get("image_size")


def read_json(path: Path) -> dict | None:
    return yaml.safe_load(path.read_text()) if path.exists() else None  # JSON is YAML


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"key": str}) if path.exists() else pd.DataFrame()


def read_evaluation(files: MethodLayout, stage: str) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """summary, per-image, PR, sweep and cases tables of one evaluation (which must exist)."""
    if not files.eval_summary.exists():
        raise FileNotFoundError(f"{files.eval_summary}: run `dvc repro {stage}@{files.method}` first")
    return (read_json(files.eval_summary), read_csv(files.eval_table("per_image")), read_csv(files.eval_table("pr")),
            read_csv(files.eval_table("sweep")), read_csv(files.cases))


def load_method(params: Params, method: str) -> MethodResults:
    """Read ``method``'s evaluation, profile, training and registry outputs; evaluation must exist."""
    files = method_layout(params, method)
    return MethodResults(method, params.method_arch(method)[0], *read_evaluation(files, "evaluate"), files.eval_dir,
                         read_json(files.profile), read_json(files.metrics) or {}, read_json(files.registered) or {},
                         history=read_csv(files.history), stability=read_csv(files.eval_table("stability")),
                         int8=read_json(files.int8_check), plain=read_json(files.plain_check),
                         graph_scores={graph: table for graph, path in (("shipped", files.int8_scores),
                                                                        ("plain", files.plain_scores))
                                       if len(table := read_csv(path))})


def load_external(params: Params, name: str) -> MethodResults:
    """Read the evaluation of external method ``name`` (``external.<name>`` of params)."""
    spec, files = params.external[name], method_layout(params, name)
    return MethodResults(name, spec.arch, *read_evaluation(files, "evaluate_external"), files.eval_dir, None,
                         {"threshold": spec.threshold}, {}, title=spec.title, external=True,
                         stability=read_csv(files.eval_table("stability")))


def load_methods(params: Params) -> list[MethodResults]:
    """Every method of ``train.methods``, then every ``external`` method, as evaluated."""
    return [*(load_method(params, m) for m in params.train.methods), *(load_external(params, e) for e in params.external)]


def load_paper_figures(path: Path) -> tuple[dict, pd.DataFrame]:
    doc = yaml.safe_load(Path(path).read_text())
    figures = pd.DataFrame(doc["figures"])
    for column, default in (("scope", "test"), ("std", np.nan), ("at_threshold", np.nan)):
        figures[column] = figures[column].fillna(default) if column in figures else default
    unknown = set(figures["paper"]) - set(doc["papers"])
    if unknown:
        raise ValueError(f"{path}: figures cite papers not listed under papers: {sorted(unknown)}")
    return doc["papers"], figures
