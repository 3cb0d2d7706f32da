"""Stage split: ingest -> validate -> split writes ``splits.json``, leakage-safe (schemes: tests/polypflow/data)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import placement, synthetic_params, write_params

from polypflow.settings.config import load_params
from stages import ingest, split, validate


def test_run_writes_splits_json_from_validated_facts(tmp_path, synthetic_root, monkeypatch):
    write_params(tmp_path, synthetic_params(synthetic_root))  # alpha + beta split 70/15/15, gamma unseen
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml")
    ingest.run(params)
    validate.run(params)
    splits = split.run(params)
    assert json.loads(Path("data/splits.json").read_text()) == splits
    place = placement(splits)
    assert len(place) == 24 + 16 + 10
    assert splits["test"]["gamma"] == sorted(f"gamma/{i}" for i in range(1, 11))
    beta_seq = {f"beta/{i}": (i - 1) // 4 for i in range(1, 17)}  # 4 sequences of 4 frames
    for seq in range(4):
        assert len({place[k] for k, s in beta_seq.items() if s == seq}) == 1
    assert set(splits["folds"]["assignment"].values()) == {0, 1}
