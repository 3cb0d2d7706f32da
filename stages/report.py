"""Stage 9, report: one comparison report of every method in ``train.methods`` and every ``external`` one.

Reads each method's evaluation (``artifacts/eval/<m>/``), profile, training outputs and the
cross-validation summary, runs the leakage check over ``splits.json`` and writes
``reports/report.html`` (self-contained: inline CSS, figures embedded as base64 PNG, renders offline),
``reports/report.md`` with its figures in ``reports/figures/``, ``reports/leakage.csv`` and the
machine-readable ``reports/report.json``. See ``polypflow/report/`` for the sections.
"""

from __future__ import annotations

import logging
import shutil

from polypflow.data import leakage
from polypflow.settings.config import Params
from polypflow.io import atomic_path, write_bytes, write_json, write_text
from polypflow.data.images import read_facts, read_splits
from polypflow.io import read_json
from polypflow.settings.layout import method_layout
from polypflow.report import build, load_methods, to_html, to_markdown
from stages._cli import main, parser, project_params

log = logging.getLogger(__name__)
FIGURES = "figures"


def run(params: Params) -> dict:
    """Build the report of ``train.methods`` and ``external``; write HTML, Markdown (+ figures), leakage.csv,
    report.json."""
    methods = load_methods(params)
    cv_path = method_layout(params, params.crossval.method).crossval_summary
    crossval = read_json(cv_path) if cv_path.exists() else None
    splits, facts = read_splits(params), read_facts(params)
    pairs, leak_summary = leakage.check(splits, facts, params.report.leakage_max_distance)
    report = build(params, methods, crossval, (pairs, leak_summary), facts, splits)
    out = params.paths.reports
    write_text(out / "report.html", to_html(report))
    markdown, figures = to_markdown(report, FIGURES)
    shutil.rmtree(out / FIGURES, ignore_errors=True)  # no stale figures of an earlier report
    for path, data in figures.items():
        write_bytes(out / path, data)
    write_text(out / "report.md", markdown)
    with atomic_path(out / "leakage.csv", suffix=".csv") as tmp:
        pairs.to_csv(tmp, index=False)
    write_json(out / "report.json", {**report.facts, "leakage": leak_summary})
    log.info("report of %s -> %s (%d figures, %d near-duplicate pairs)", ", ".join(m.name for m in methods),
             out / "report.html", len(figures), leak_summary["pairs"])
    return report.facts


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    main(lambda: run(project_params(args.params)))
