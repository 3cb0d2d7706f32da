"""Profiles are overlays run as DVC experiments: comments and hand edits survive, dvc exp show compares them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import synthetic_params, write_params
from polypflow.settings import profiles
from polypflow.settings.config import ParamsError, load_params


@pytest.mark.quick
def test_assignments_own_what_any_profile_sets():
    base = {"train": {"methods": ["a"], "defaults": {"lr": 1, "epochs": 3}}, "methods": {"a": {}, "b": {"x": 1}}}
    full = {"train": {"methods": ["a", "b"], "defaults": {"epochs": 6}}}
    paper = {"train": {"defaults": {"lr": 5}}, "methods": {"a": {"recipe": {"lr": 9}}, "c": {"x": 2}}}
    # choosing full: its values, the committed value of what only paper sets; what paper added is deleted where
    # the workspace holds it, at its first level the committed settings lack
    chosen = {("train", "methods"): ["a", "b"], ("train", "defaults", "epochs"): 6, ("train", "defaults", "lr"): 1}
    assert profiles.assignments(base, full, [paper], profiles.deep_merge(base, paper)) == (
        chosen, [("methods", "a", "recipe"), ("methods", "c")])
    assert profiles.assignments(base, full, [paper], base) == (chosen, [])  # nothing to delete
    assert profiles.assignments(base, paper, [full], profiles.deep_merge(base, full)) == ({
        ("train", "defaults", "lr"): 5, ("methods", "a", "recipe", "lr"): 9, ("methods", "c", "x"): 2,
        ("train", "methods"): ["a"], ("train", "defaults", "epochs"): 3}, [])
    assert profiles.assignments(base, {}, [full, paper], base)[0][("train", "defaults", "epochs")] == 3  # default


@pytest.mark.quick
def test_set_param_args_address_the_file_holding_the_section():
    args = profiles.set_param_args({("train", "methods"): ["a", "b"], ("methods", "a", "recipe", "lr"): 0.5,
                                    ("report", "pairs"): [["a", "b"]]}, [("methods", "c"), ("train", "x")])
    assert args == ["--set-param", "methods.yaml:~methods.c", "--set-param", "~train.x",
                    "--set-param", "methods.yaml:++methods.a.recipe.lr=0.5", "--set-param", "++report.pairs=[[a, b]]",
                    "--set-param", "++train.methods=[a, b]"]


@pytest.mark.quick
def test_a_profile_extends_another_overlay(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  defaults: {epochs: 12, image_size: 256}\n  temperatures: [1, 8]\n")
    (tmp_path / "child.yaml").write_text("# Child\nextends: base\ntrain:\n  defaults: {image_size: 352}\n")
    (tmp_path / "grandchild.yaml").write_text("extends: child\nmethods: {a: {recipe: {lr: 1}}}\n")
    assert profiles.read_profile(tmp_path, "child") == {
        "train": {"defaults": {"epochs": 12, "image_size": 352}, "temperatures": [1, 8]}}
    assert profiles.read_profile(tmp_path, "grandchild") == {
        "train": {"defaults": {"epochs": 12, "image_size": 352}, "temperatures": [1, 8]},
        "methods": {"a": {"recipe": {"lr": 1}}}}
    assert profiles.read_profile(tmp_path, "base") == {
        "train": {"defaults": {"epochs": 12, "image_size": 256}, "temperatures": [1, 8]}}  # the parent unchanged
    (tmp_path / "base.yaml").write_text("extends: grandchild\n")
    cycle = r"grandchild.yaml: extends: 'child' .*cycle \(child -> base -> grandchild -> child\)"
    with pytest.raises(ParamsError, match=cycle):
        profiles.read_profile(tmp_path, "child")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere\n")
    with pytest.raises(ParamsError, match="nowhere.yaml: no such profile"):
        profiles.read_profile(tmp_path, "orphan")


@pytest.fixture
def git_project(tmp_path, synthetic_root):
    """A git + DVC project over the synthetic data whose one stage echoes the settings a profile changes."""
    root = tmp_path / "proj"
    root.mkdir()
    write_params(root, synthetic_params(synthetic_root))
    text = (root / "params.yaml").read_text().replace("seed: 42", "seed: 42  # the seed, with its comment")
    (root / "params.yaml").write_text(text)
    (root / "profiles").mkdir()
    (root / "profiles" / "long.yaml").write_text("# Longer training\ntrain:\n  defaults: {epochs: 5}\n")
    (root / "profiles" / "wide.yaml").write_text("# Wider\ntrain:\n  defaults: {image_size: 96}\n")
    (root / "profiles" / "tuned.yaml").write_text("extends: long\nmethods:\n  unet: {recipe: {lr: 0.5}}\n")
    (root / "dvc.yaml").write_text(
        "vars: [methods.yaml, datasets.yaml, infra.yaml]\nstages:\n  show:\n"
        "    cmd: echo ${train.defaults.epochs} ${train.defaults.image_size} > shown.txt\n"
        "    params: [train.defaults, profile_name]\n    outs: [shown.txt]\n")
    run = lambda *cmd: subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "dvc")
    return root


def profile(root, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polypflow.settings.profiles", *args], cwd=root, capture_output=True, text=True)


@pytest.mark.slow
def test_a_profile_runs_as_a_dvc_experiment_keeping_comments_and_hand_edits(git_project):
    root = git_project
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("cases: 3", "cases: 5"))  # hand edit
    done = profile(root, "long")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (root / "shown.txt").read_text().split() == ["5", "64"]
    text = (root / "params.yaml").read_text()
    assert "# the seed, with its comment" in text and "cases: 5" in text and "profile_name: long" in text
    done = profile(root, "tuned")  # long's settings, plus a recipe the committed unet lacks
    assert done.returncode == 0, done.stdout + done.stderr
    assert (root / "shown.txt").read_text().split() == ["5", "64"]
    assert load_params(root / "params.yaml").recipe("unet").lr == 0.5
    done = profile(root, "wide")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (root / "shown.txt").read_text().split() == ["2", "96"]  # long's epochs back to the committed 2
    assert "recipe" not in yaml.safe_load((root / "methods.yaml").read_text())["methods"]["unet"]  # tuned's, gone
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root, capture_output=True,
                           text=True, check=True)
    names = {e["name"] for row in json.loads(shown.stdout) for e in row.get("experiments") or []}
    assert {"long", "tuned", "wide"} <= names
    assert profile(root, "default").returncode == 0
    params = load_params(root / "params.yaml")
    assert (params.profile_name, params.train.defaults.epochs, params.train.defaults.image_size) == ("default", 2, 64)
    assert params.evaluate.cases == 5


def test_a_profile_that_breaks_the_settings_is_refused_before_dvc_runs(git_project):
    (git_project / "profiles" / "bad.yaml").write_text("train:\n  defaults: {epochs: 0}\n")
    with pytest.raises(ParamsError, match="profile 'bad' gives invalid settings.*epochs"):
        profiles.command("bad", git_project / "params.yaml", [])
    done = profile(git_project, "nope")
    assert done.returncode != 0 and "no such profile" in done.stderr
    listing = profile(git_project, "--list").stdout
    assert "long: Longer training" in listing and "default:" in listing
    assert yaml.safe_load((git_project / "params.yaml").read_text())["profile_name"] == "default"
