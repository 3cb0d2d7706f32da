"""benchmarks.seeds on crafted checkouts: three seeds of one profile against published maps."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from benchmarks import seeds
from conftest import REPO, read_params, write_params
from polypflow.settings.layout import MethodLayout

pytestmark = pytest.mark.quick

METHOD, MAPS = "ic_polypseg_lite1", "pranet_published"
KEYS = {"kvasir": [f"kvasir/{i}" for i in range(10)], "clinicdb": [f"clinicdb/{i}" for i in range(8)]}


def write_eval(root, method: str, dice: dict[str, np.ndarray]) -> None:
    """evaluate@'s per-image table and summary: Dice ``dice``, toolbox meanDic 0.01 below it."""
    files = MethodLayout(root / "artifacts", method)
    files.eval_summary.parent.mkdir(parents=True)
    table = pd.concat([pd.DataFrame({"key": KEYS[d], "dataset": d, "dice": v, "dice_at_method_threshold": v,
                                     "tb_dice": v - 0.01}) for d, v in dice.items()])
    table.to_csv(files.eval_table("per_image"), index=False)
    means = table.groupby("dataset")[["dice", "dice_at_method_threshold", "tb_dice"]].mean()
    summary = {d: {"n": len(KEYS[d]), **row} for d, row in means.to_dict("index").items()}
    files.eval_summary.write_text(json.dumps(summary))


def write_graphs(path, fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True)
    pd.concat([pd.DataFrame({"dataset": d, "key": KEYS[d], "fp32": fp32[d], "int8": int8[d]}) for d in fp32]).to_csv(
        path, index=False)


def checkout(tmp_path, name: str, seed: int, offset: float, maps: dict[str, np.ndarray], exported: bool = True,
             profile: str = "cpu-realtime-all"):
    """A checkout whose model scores ``offset`` above the maps on every image (its plain int8 graph 2 × offset)."""
    root = tmp_path / name
    root.mkdir()
    settings = read_params(REPO)
    settings.update(seed=seed, profile_name=profile)
    write_params(root, settings)  # report.paper_figures stays relative: the checkout's own copy is read
    shutil.copytree(REPO / "references", root / "references")
    write_eval(root, MAPS, maps)
    ours = {d: v + offset for d, v in maps.items()}
    write_eval(root, METHOD, ours)
    if exported:
        files = MethodLayout(root / "artifacts", METHOD)
        write_graphs(files.int8_scores, ours, ours)
        write_graphs(files.plain_scores, ours, {d: v + 2 * offset for d, v in maps.items()})
    return root


@pytest.fixture
def maps():
    rng = np.random.default_rng(0)
    return {d: rng.uniform(0.6, 0.9, len(k)) for d, k in KEYS.items()}


def test_seeds_tables_and_the_seed_averaged_paired_test(tmp_path, maps, capsys):
    runs = [checkout(tmp_path, f"s{seed}", seed, offset, maps) for seed, offset in ((1, -0.01), (2, 0.02), (3, 0.05))]
    seeds.main([str(r) for r in runs])
    out = capsys.readouterr().out
    assert "# ic_polypseg_lite1, profile cpu-realtime-all, seeds 1, 2, 3" in out
    kvasir = maps["kvasir"].mean()
    # the shipped map's meanDic against the PraNet paper's own figure (0.898 on Kvasir; the seen sets first)
    assert "| shipped, meanDic (toolbox) | kvasir | clinicdb |" in out
    assert "| published (paper) | 0.8980 | 0.8990 |" in out
    assert f"| seed 2 | {kvasir + 0.02:.4f} |" in out
    assert f"| mean (s.d.) | {kvasir + 0.02:.4f} (0.0300) |" in out  # offsets -0.01, 0.02, 0.05: s.d. 0.03
    assert f"| published (maps) | {kvasir:.4f} |" in out
    assert "| runs at or above | 2 of 3 | 2 of 3 |" in out  # seeds 2 and 3 are above the maps on every image
    # per image, the three runs' mean is the maps + 0.02 (plain int8: + 0.04) on every image: no spread to resample
    assert "| kvasir    | shipped, mDice, mean of 3 seeds" in out
    lines = [line for line in out.splitlines() if "mean of 3 seeds" in line]
    assert len(lines) == 8  # shipped, shipped int8, plain fp32, plain int8 on two sets; meanDic has no maps row
    row = next(line for line in lines if "kvasir" in line and "plain graph int8" in line)
    assert [cell.strip() for cell in row.split("|")[3:7]] == ["PraNet (published maps)", "10", "0.0400", "0.0400"]


def test_a_run_without_exported_scores_leaves_its_graphs_out(tmp_path, maps, capsys):
    runs = [checkout(tmp_path, "a", 1, 0.01, maps), checkout(tmp_path, "b", 2, 0.01, maps, exported=False)]
    seeds.main([str(r) for r in runs])
    out = capsys.readouterr().out
    assert "| mean (s.d.) | – | – |" in out  # the graph tables: one run has no per_image.csv
    assert sum("mean of 2 seeds" in line for line in out.splitlines()) == 2  # the shipped map only, on two sets


def test_runs_must_be_seeds_of_one_profile(tmp_path, maps):
    one, same = checkout(tmp_path, "one", 1, 0.0, maps), checkout(tmp_path, "same", 1, 0.0, maps)
    with pytest.raises(ValueError, match="runs share a seed"):
        seeds.main([str(one), str(same)])
    other = checkout(tmp_path, "other", 2, 0.0, maps, profile="cpu-realtime")
    with pytest.raises(ValueError, match=r"other/params.yaml: profile 'cpu-realtime'"):
        seeds.main([str(one), str(other)])
    with pytest.raises(ValueError, match=r"one/params.yaml: no external method 'nobody'"):
        seeds.main([str(one), str(same), "--against", "nobody"])
    with pytest.raises(FileNotFoundError, match="summary.json"):
        seeds.main([str(one), str(tmp_path / "other"), "--method", "ic_polypseg_lite0"])
