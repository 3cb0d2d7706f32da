"""The one test-set loop: every test set of ``splits.json`` through a task's scoring, tagged seen or unseen,
written as one table each (``per_image``, ``pr``, ``sweep``, ``curves``) and one ``cases.csv``.

What a model predicts and how it is scored are the task's (``polypflow.tasks``); this loop only walks the test
sets: the in-domain test part of each split dataset (``seen``) and every unseen dataset (``unseen``, PraNet
protocol). Predictions are scored at the masks' original resolution, as the community's evaluation does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from polypflow.data.images import by_image_key
from polypflow.io import write_csv
from polypflow.settings.config import Evaluate
from polypflow.settings.layout import MethodLayout

log = logging.getLogger(__name__)
TABLES = ("per_image", "pr", "sweep", "curves", "stability")  # stability: a segmenter's, over video sequences
# (dataset, the keys listed) -> the keys predicted (an external method may lack some) and their outputs
Source = Callable[[str, list[str]], tuple[list[str], Sequence[Any]]]


@dataclass
class TestSetScores:
    """One test set scored by a task: its tables (untagged), its ``summary.json`` entry, its drawn cases and the
    line that reports it."""

    tables: dict[str, pd.DataFrame]
    summary: dict[str, Any]
    cases: list[dict] = field(default_factory=list)
    line: str = ""


Scorer = Callable[[str, list[str], Sequence[Any]], TestSetScores]


def sweep_thresholds(cfg: Evaluate) -> np.ndarray:
    """``evaluate.sweep``'s thresholds, ``evaluate.sweep_step`` apart."""
    low, high = cfg.sweep
    return np.round(np.arange(low, high + cfg.sweep_step / 2, cfg.sweep_step), 6)


def json_number(value: float | int) -> float | int | None:
    """Rounded for summary.json; NaN (e.g. AUC where every mask is empty) becomes null."""
    if isinstance(value, float):
        return round(value, 6) if np.isfinite(value) else None
    return value


def rows_of(facts: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return by_image_key(facts).loc[keys]


def mask_shapes(facts: pd.DataFrame, keys: list[str]) -> list[tuple[int, int]]:
    """(H, W) of each image's mask: the resolution everything is scored at."""
    rows = rows_of(facts, keys)
    return [(int(h), int(w)) for h, w in zip(rows["mask_height"], rows["mask_width"], strict=True)]


def workers() -> int:
    """Threads that score images at once: the cores this process may use (numpy's sort, OpenCV and SciPy's
    filters release the GIL; 2 threads score 2.3x faster than one on a 2-core machine, the same figures)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def evaluate_test_sets(source: Source, score: Scorer, splits: dict, files: MethodLayout,
                       case_columns: Sequence[str]) -> dict:
    """Score every test set ``source`` covers with ``score``; write the tables and ``cases.csv`` (nothing when no
    test set is covered); return ``summary`` by dataset."""
    unseen = set(splits.get("unseen", []))
    tables: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}
    summary, cases = {}, []
    for dataset, listed in splits["test"].items():
        keys, outputs = source(dataset, listed) if listed else ([], [])
        if not keys:
            continue
        protocol = "unseen" if dataset in unseen else "seen"
        scores = score(dataset, keys, outputs)
        for name, table in scores.tables.items():
            tables[name].append(table.assign(dataset=dataset, protocol=protocol))
        missing = {"n_missing": len(listed) - len(keys)} if len(keys) < len(listed) else {}
        summary[dataset] = {"protocol": protocol, **missing, **scores.summary}
        cases += scores.cases
        log.info("%s (%s): %s (n=%d%s)", dataset, protocol, scores.line, len(keys),
                 f", {len(listed) - len(keys)} without a prediction" if missing else "")
    if summary:
        for name, parts in tables.items():  # every table is written: a task without one writes it empty
            write_csv(files.eval_table(name), pd.concat(parts) if parts else pd.DataFrame(columns=["dataset", "protocol"]))
        write_csv(files.cases, pd.DataFrame(cases, columns=list(case_columns)))
    return summary
