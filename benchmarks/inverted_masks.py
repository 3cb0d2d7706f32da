"""Which rule tells an inverted mask from a real one, measured on every real mask (issue 22, item 9).

Every mask of the local datasets in datasets.yaml is binarised at ``validate.mask_threshold`` and measured
with validation's own facts (:func:`polypflow.data.quality.mask_facts`), and so is its inversion (the
complement after binarising). Each rule is counted twice: the real masks it flags (false positives) and
the inverted ones it flags (caught), alone and together with the ``mask_fraction`` check, which already
fails a mask beyond ``validate.max_mask_fraction``.

    python -m benchmarks.inverted_masks [--params params.yaml] [--workers 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from polypflow.data.ingest import files_by_stem
from polypflow.data.quality import likely_inverted, mask_facts
from polypflow.settings.config import Params, Validate, load_params

Rule = Callable[[pd.DataFrame, Validate], pd.Series]
SIDE_SWEEP = (0.01, 0.1, 0.2)  # other thresholds of the side rule, to show the margin either side of the setting


def _old_rule(facts: pd.DataFrame, cfg: Validate) -> pd.Series:
    """The rule before issue 22: over 50 % polyp along over 90 % of the edge (and within max_mask_fraction)."""
    mostly_polyp = facts["mask_fraction"].between(0.5, cfg.max_mask_fraction, inclusive="right")
    return mostly_polyp & (facts["border_fraction"] > 0.9)


def _edge_rule(facts: pd.DataFrame, cfg: Validate) -> pd.Series:
    return (facts["border_fraction"] > 0.5) & (facts["mask_fraction"] <= cfg.max_mask_fraction)


def _side_rule(threshold: float) -> Rule:
    return lambda facts, cfg: likely_inverted(facts, cfg.model_copy(update={"inverted_side_fraction": threshold}))


def rules(cfg: Validate) -> dict[str, Rule]:
    """Name -> rule; the first is the old one, the second the one validation runs."""
    side = cfg.inverted_side_fraction
    return {"old: > 50 % polyp along > 90 % of the edge": _old_rule,
            f"new: polyp along > {side:g} of each of the 4 sides": likely_inverted,
            "polyp along > 50 % of the edge": _edge_rule,
            **{f"polyp along > {t:g} of each of the 4 sides": _side_rule(t) for t in SIDE_SWEEP if t != side}}


def mask_paths(params: Params) -> list[tuple[str, Path]]:
    """(dataset, mask) for every mask of the local sources in datasets.yaml."""
    ingest = params.ingest
    return [(key, path) for key, spec in ingest.datasets.items() if spec.source.kind == "local"
            for path in files_by_stem(ingest.root / spec.source.path / spec.masks, ingest.image_extensions).values()]


def both_facts(args: tuple[str, Path, int, tuple[int, int]]) -> list[dict]:
    """The facts of one mask and of its inversion."""
    dataset, path, threshold, band = args
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L"))
    inverted = np.where(grey > threshold, 0, 255).astype(np.uint8)
    return [{"dataset": dataset, "mask": str(path), "inverted": flip, **mask_facts(g, threshold, band)}
            for flip, g in ((False, grey), (True, inverted))]


def measure(params: Params, workers: int) -> pd.DataFrame:
    cfg = params.validate_
    args = [(key, path, cfg.mask_threshold, cfg.ambiguous_band) for key, path in mask_paths(params)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return pd.DataFrame([row for pair in pool.map(both_facts, args, chunksize=16) for row in pair])


def table(facts: pd.DataFrame, cfg: Validate) -> pd.DataFrame:
    """Per rule: real masks flagged and inverted masks caught, by the rule and by the rule with mask_fraction."""
    out_of_range = ~facts["mask_fraction"].between(cfg.min_mask_fraction, cfg.max_mask_fraction)
    real, inverted = ~facts["inverted"], facts["inverted"]
    rows = []
    for name, rule in rules(cfg).items():
        flagged = rule(facts, cfg)
        rows.append({"rule": name, "real flagged (false positives)": int((flagged & real).sum()),
                     "inverted caught by the rule": int((flagged & inverted).sum()),
                     "inverted caught with mask_fraction": int(((flagged | out_of_range) & inverted).sum()),
                     "inverted passing validation": int((~(flagged | out_of_range) & inverted).sum())})
    return pd.DataFrame(rows).set_index("rule")


def margins(facts: pd.DataFrame) -> pd.DataFrame:
    """The closest real and inverted masks on each fact the rules use: the gap a threshold sits in."""
    rows = []
    for column in ("least_side_fraction", "border_fraction", "mask_fraction"):
        real, inverted = facts[~facts["inverted"]], facts[facts["inverted"]]
        top, bottom = real.loc[real[column].idxmax()], inverted.loc[inverted[column].idxmin()]
        rows.append({"fact": column, "real max": round(top[column], 4), "real mask": top["mask"],
                     "inverted min": round(bottom[column], 4), "inverted of": bottom["mask"]})
    return pd.DataFrame(rows).set_index("fact")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inverted_masks", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    params = load_params(args.params)
    start = time.perf_counter()
    facts = measure(params, args.workers)
    n = int((~facts["inverted"]).sum())
    print(f"{n} real masks ({facts[~facts['inverted']].groupby('dataset').size().to_dict()}) and their "
          f"{n} inversions, measured in {time.perf_counter() - start:.0f} s with {args.workers} workers\n")
    with pd.option_context("display.width", 200, "display.max_colwidth", 80):
        print(table(facts, params.validate_).to_string(), "\n")
        print(margins(facts).to_string())


if __name__ == "__main__":
    main()
