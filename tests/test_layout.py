"""One layout: the files dvc.yaml declares for a method are the files polypflow.settings.layout names."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from polypflow.settings.config import load_params
from polypflow.settings.layout import method_layout

pytestmark = pytest.mark.quick


def stage_outs(repo, name: str) -> set[str]:
    stage = next(s for s in repo.index.stages if s.addressing == name)
    return {str(Path(o.def_path)) for o in stage.outs}


def test_dvc_yaml_declares_the_files_layout_names():
    from dvc.repo import Repo

    params = load_params(REPO / "params.yaml")
    method = params.train.methods[0]
    f = method_layout(params, method)
    rel = lambda *paths: {str(Path(p)) for p in paths}  # noqa: E731
    with Repo(str(REPO)) as repo:
        assert stage_outs(repo, f"train@{method}") == rel(f.model, f.run_record("train"), f.val_scores, f.metrics,
                                                          f.history)  # the resume checkpoint is scratch, not an output
        assert stage_outs(repo, f"evaluate@{method}") == rel(
            *(f.eval_table(t) for t in ("per_image", "stability", "curves", "pr", "sweep")), f.cases_dir, f.gradcam_dir,
            f.run_record("evaluate"), f.eval_summary)
        assert stage_outs(repo, f"export@{method}") == rel(f.onnx, f.int8_dir, f.plain_dir, f.run_record("export"),
                                                            f.parity)
        assert stage_outs(repo, f"profile@{method}") == rel(f.profile, f.run_record("profile"))
        assert stage_outs(repo, f"register@{method}") == rel(f.registered)
        cv = method_layout(params, params.crossval.method)
        assert stage_outs(repo, "crossval") == rel(cv.crossval_folds, cv.crossval_summary)
        for name in params.external:
            e = method_layout(params, name)
            assert stage_outs(repo, f"evaluate_external@{name}") == rel(
                *(e.eval_table(t) for t in ("per_image", "stability", "curves", "pr", "sweep")), e.cases_dir,
                e.run_record("evaluate"), e.eval_summary)


def test_every_stage_can_be_restored_from_the_run_cache():
    """Every output is cached and none persists: DVC saves every stage to the run-cache another host pulls."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        stuck = {f"{s.addressing}: {o.def_path}" for s in repo.index.stages for o in s.outs
                 if not o.use_cache or o.persist}
    assert not stuck
