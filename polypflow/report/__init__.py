"""The comparison report: a one-screen summary, then every method × test set × metric beside the papers'
figures, curves, distributions, cases, Grad-CAM, model cost, cross-validation, significance and leakage.

By concern: :mod:`.load` reads what the pipeline wrote (``artifacts/eval``, ``profile``, ``models``,
``crossval``, ``splits.json``) into :class:`MethodResults`, our trained methods and the ``external`` methods
whose published maps evaluate scored; :mod:`.tables` and :mod:`.figures` turn them into tables and PNG
figures; :mod:`.sections` writes the prose around them and :func:`build` assembles a :class:`Report`;
:mod:`.render` renders one self-contained HTML page (figures as base64 PNG, inline CSS, no script, no CDN)
and the same sections as Markdown with the figures as files beside it.
"""

from polypflow.report.figures import line_styles
from polypflow.report.load import MethodResults, load_external, load_method, load_methods
from polypflow.report.render import to_html, to_markdown
from polypflow.report.sections import Report, Section, build

__all__ = ["MethodResults", "Report", "Section", "build", "line_styles", "load_external", "load_method",
           "load_methods", "to_html", "to_markdown"]
