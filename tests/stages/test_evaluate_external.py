"""evaluate@<external>: another method's own prediction maps scored exactly like our models' predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, stage_workdir, unless_present
from polypflow.settings.config import ExternalMethod, Params, load_params
from polypflow.tasks.segmentation import SegmentationTask
from stages import evaluate, ingest, split, validate

SHARED = REPO.parent / "shared"


def write_maps(root: Path, params: Params, splits: dict, dataset: str, skip: int = 0, shrink: bool = False) -> list[str]:
    """Perfect maps (the masks as 8-bit PNGs) of ``dataset``'s test images, the first ``skip`` left out."""
    facts = pd.read_csv(params.paths.facts, keep_default_na=False, dtype={"id": str}).set_index(["dataset", "id"])
    folder = root / dataset.upper()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key in splits["test"][dataset][skip:]:
        ident = key.split("/", 1)[1]
        mask = Image.open(facts.loc[(dataset, ident), "mask_path"]).convert("L")
        if shrink:  # toolbox maps may come at another resolution: evaluate resizes them to the mask's
            mask = mask.resize((mask.width // 2, mask.height // 2), Image.BILINEAR)
        mask.save(folder / f"{ident}.png")
        written.append(key)
    return written


def test_external_maps_are_scored_like_a_model(tmp_path, synthetic_root, monkeypatch):
    root = stage_workdir(tmp_path, synthetic_root, monkeypatch)
    params = load_params("params.yaml")
    ingest.run(params)
    validate.run(params)
    splits = split.run(params)
    maps = tmp_path / "published"
    alpha = write_maps(maps, params, splits, "alpha", skip=1)
    gamma = write_maps(maps, params, splits, "gamma", shrink=True)
    spec = ExternalMethod(title="Somebody (published maps)", root=maps, folders={"alpha": "ALPHA", "gamma": "GAMMA"})
    params = params.model_copy(update={"external": {"published": spec}})

    summary = evaluate.run(params, "published")

    assert sorted(summary) == ["alpha", "gamma"]  # beta has no folder: not scored
    assert summary["alpha"]["n"] == len(alpha) == len(splits["test"]["alpha"]) - 1
    assert summary["alpha"]["n_missing"] == 1 and "n_missing" not in summary["gamma"]
    assert summary["alpha"]["dice"] == pytest.approx(1.0)  # the mask itself as the map
    assert summary["gamma"]["dice"] > 0.9  # half resolution, resized back to the mask's
    assert summary["gamma"]["protocol"] == "unseen"
    out = root / "artifacts" / "eval" / "published"
    assert json.loads((out / "summary.json").read_text()) == summary
    per_image = pd.read_csv(out / "per_image.csv")
    assert sorted(per_image["key"]) == sorted(alpha + gamma)
    for name in ("pr.csv", "sweep.csv", "curves.csv", "cases/cases.csv"):
        assert (out / name).exists()

    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`polypflow.method` = 'published'")
    assert len(runs) == 1 and runs.iloc[0]["tags.polypflow.external"] == "Somebody (published maps)"
    assert runs.iloc[0]["metrics.test.alpha.dice"] == pytest.approx(1.0)


@pytest.mark.quick
def test_external_errors_name_the_file_or_setting(tmp_path, synthetic_root, monkeypatch):
    stage_workdir(tmp_path, synthetic_root, monkeypatch)
    params = load_params("params.yaml")
    ingest.run(params)
    validate.run(params)
    splits = split.run(params)
    maps = tmp_path / "published"
    spec = ExternalMethod(title="t", root=maps / "nowhere", folders={"gamma": "GAMMA"})
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder \(external\.pub\.root\)"):
        evaluate.run(params.model_copy(update={"external": {"pub": spec}}), "pub")
    (maps / "GAMMA").mkdir(parents=True)
    spec = spec.model_copy(update={"root": maps})
    with pytest.raises(ValueError, match="no map in .* matches a test image"):
        evaluate.run(params.model_copy(update={"external": {"pub": spec}}), "pub")
    broken = maps / "GAMMA" / f"{splits['test']['gamma'][0].split('/')[1]}.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=rf"{broken.name}: cannot decode prediction map"):
        evaluate.run(params.model_copy(update={"external": {"pub": spec}}), "pub")


@pytest.mark.quick
def test_an_external_name_may_not_be_a_method_name(synthetic_root):
    from conftest import synthetic_params

    raw = synthetic_params(synthetic_root)
    raw["external"] = {"unet": {"title": "t", "root": ".", "folders": {}}}
    with pytest.raises(ValueError, match=r"external names \['unet'\] are also keys of methods"):
        Params.model_validate(raw)


# --- PraNet's own published maps, scored by our code, against the paper ------------------------------------

PRANET_PAPER = {"kvasir": 0.898, "clinicdb": 0.899, "colondb": 0.709}  # mDice (toolbox meanDic), Fan et al. 2020


def real_test_facts(params: Params) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Mask paths of the PraNet protocol's test images in ../shared/data (no pipeline run needed)."""
    rows, test = [], {}
    lists = SHARED / "data" / "splits" / "pranet"
    for key in ("kvasir", "clinicdb", "colondb"):
        spec = params.ingest.datasets[key]
        masks = {p.stem: p for p in (SHARED / "data" / spec.source.path.name / spec.masks).iterdir()}
        listed = (lists / f"{key}_test.txt").read_text().split() if key != "colondb" else sorted(masks)
        rows += [{"dataset": key, "id": i, "mask_path": str(masks[i])} for i in listed]
        test[key] = [f"{key}/{i}" for i in listed]
    return pd.DataFrame(rows), test


@unless_present((SHARED / "references" / "pranet_maps").is_dir(), "../shared/references absent")
def test_pranet_published_maps_reproduce_the_papers_mean_dice():
    """Scored by the same code as our models, PraNet's maps give the paper's meanDic to within 0.01."""
    params = load_params(REPO / "params.yaml")
    spec = params.external["pranet_published"]
    spec = spec.model_copy(update={"root": SHARED / "references" / "pranet_maps"})
    facts, test = real_test_facts(params)
    maps = evaluate.external_maps(spec)
    for dataset, paper in PRANET_PAPER.items():
        keys, probs = maps(dataset, test[dataset])
        assert len(keys) == {"kvasir": 100, "clinicdb": 62, "colondb": 359}[dataset]
        _, summary = SegmentationTask(params).score_maps(keys, probs, spec.threshold, facts)
        assert summary["tb_dice"] == pytest.approx(paper, abs=0.01), dataset
