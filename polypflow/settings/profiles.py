"""Profiles: named overlays of the settings, run as DVC experiments so ``dvc exp show`` compares them.

    python -m polypflow.settings.profiles --list              # the profiles and what each is for
    python -m polypflow.settings.profiles full                # dvc exp run --name full --set-param ... (in this workspace)
    python -m polypflow.settings.profiles full --dry-run      # print the dvc command only
    python -m polypflow.settings.profiles default             # the committed settings again (a profile with no overlay)

``profiles/<name>.yaml`` holds only what the profile changes (the default profile is the committed settings
themselves); ``extends: <profile>`` at its top builds it on another profile's overlay. Running a profile is
``dvc exp run`` with one ``--set-param`` per setting that any profile owns: the chosen profile's value where it
sets one, the committed value (git ``HEAD``) elsewhere, and a deletion of what only another profile added.
DVC edits the settings files in place, keeping every setting no profile owns, so a hand edit elsewhere
survives (it rewrites the flow-style lists it sets in block style); ``profile_name`` (params.yaml)
records which profile the workspace holds, and ``dvc exp show`` puts the experiments side by side. The merged
settings are validated before DVC runs anything.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pydantic import ValidationError

from polypflow.settings.config import SETTINGS_FILES, Params, ParamsError, describe, read_settings

DEFAULT = "default"
EXTENDS = "extends"  # a profile's key naming the profile it builds on
Path_ = tuple[str, ...]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def leaves(tree: dict[str, Any], prefix: Path_ = ()) -> list[Path_]:
    """Paths to every non-dict value (lists are values) of ``tree``."""
    out: list[Path_] = []
    for key, value in tree.items():
        path = (*prefix, str(key))
        out += leaves(value, path) if isinstance(value, dict) and value else [path]
    return out


def get(tree: dict[str, Any], path: Path_) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            raise KeyError(path)
        tree = tree[key]
    return tree


def has(tree: dict[str, Any], path: Path_) -> bool:
    try:
        get(tree, path)
        return True
    except KeyError:
        return False


def read_profile(folder: Path, name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Profile ``name``'s overlay; ``extends: <profile>`` at its top merges it over that profile's overlay."""
    if name == DEFAULT:
        return {}
    path = folder / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ParamsError(f"{path}: no such profile; known: {[DEFAULT, *known]}")
    overlay = yaml.safe_load(path.read_text()) or {}
    parent = overlay.pop(EXTENDS, None)
    if parent is None:
        return overlay
    if not isinstance(parent, str) or parent in (*seen, name):
        raise ParamsError(f"{path}: {EXTENDS}: {parent!r} must name another profile, without a cycle "
                          f"({' -> '.join((*seen, name, str(parent)))})")
    return deep_merge(read_profile(folder, parent, (*seen, name)), overlay)


def committed_settings(params_path: Path) -> dict[str, Any]:
    """The settings as committed (git HEAD), merged like :func:`read_settings`; the workspace's when not in git."""
    merged: dict[str, Any] = {}
    for name in [params_path.name, *SETTINGS_FILES]:
        file = params_path.parent / name
        shown = subprocess.run(["git", "show", f"HEAD:./{name}"], cwd=params_path.parent, capture_output=True, text=True)
        text = shown.stdout if shown.returncode == 0 else (file.read_text() if file.exists() else "")
        merged.update(yaml.safe_load(text) or {})
    return merged


def assignments(base: dict[str, Any], chosen: dict[str, Any], others: list[dict[str, Any]],
                current: dict[str, Any]) -> tuple[dict[Path_, Any], list[Path_]]:
    """What choosing a profile sets and deletes, over every setting any profile owns: the chosen overlay's value,
    else the committed one (``base``); a path neither holds (only another profile adds it) is deleted from the
    workspace's settings (``current``) at its first level that neither holds, so nothing of the profile run
    before survives (DVC merges a dict value into the one it replaces, so a reset cannot remove a key)."""
    target = deep_merge(base, chosen)
    values: dict[Path_, Any] = {}
    deletes: set[Path_] = set()
    for path in [*leaves(chosen), *(path for other in others for path in leaves(other))]:
        if has(target, path):
            values[path] = copy.deepcopy(get(target, path))
            continue
        first = next(path[:i] for i in range(1, len(path) + 1) if not has(target, path[:i]))
        if has(current, first):
            deletes.add(first)
    return values, sorted(deletes)


def set_param_args(values: dict[Path_, Any], deletes: Sequence[Path_] = ()) -> list[str]:
    """``dvc exp run`` ``--set-param`` arguments, each addressed to the settings file that holds its section:
    ``~path`` deletes, ``++path=value`` adds or overrides (Hydra's override grammar, which DVC applies)."""
    home = {key: f"{name}:" for name, keys in SETTINGS_FILES.items() for key in keys}
    args = []
    for path in deletes:
        args += ["--set-param", f"{home.get(path[0], '')}~{'.'.join(path)}"]
    for path, value in sorted(values.items()):
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        args += ["--set-param", f"{home.get(path[0], '')}++{'.'.join(path)}={text}"]
    return args


def command(name: str, params_path: Path, extra: list[str]) -> list[str]:
    """The ``dvc exp run`` that applies profile ``name``; the settings it leaves are validated first."""
    folder = params_path.parent / "profiles"
    chosen = read_profile(folder, name)
    others = [read_profile(folder, p.stem) for p in sorted(folder.glob("*.yaml")) if p.stem != name]
    current = read_settings(params_path)[0]
    values, deletes = assignments(committed_settings(params_path), chosen, others, current)
    values[("profile_name",)] = name
    preview = copy.deepcopy(current)
    for path in deletes:
        get(preview, path[:-1]).pop(path[-1])
    for path, value in values.items():
        node = preview
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = copy.deepcopy(value)
    try:
        Params.model_validate(preview)
    except ValidationError as exc:
        raise ParamsError(f"profile {name!r} gives invalid settings: {describe(exc)}") from exc
    return ["dvc", "exp", "run", "--name", name, *set_param_args(values, deletes), *extra]


def listing(folder: Path) -> str:
    lines = [f"{DEFAULT}: the committed settings (params.yaml and the files beside it)"]
    for path in sorted(folder.glob("*.yaml")):
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        lines.append(f"{path.stem}: {first}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", nargs="?", help=f"a name in profiles/ (or {DEFAULT})")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--list", action="store_true", help="list the profiles")
    p.add_argument("--dry-run", action="store_true", help="print the dvc command, run nothing")
    args, extra = p.parse_known_args()  # anything else goes to `dvc exp run` (e.g. --force, --queue)
    params_path = Path(args.params)
    if args.list or not args.profile:
        print(listing(params_path.parent / "profiles"))
        return
    try:
        cmd = command(args.profile, params_path, extra)
    except ParamsError as exc:
        sys.exit(f"error: {exc}")
    print(" ".join(f"'{a}'" if any(c in a for c in " []{}~") else a for a in cmd))
    if not args.dry_run:  # dvc of this interpreter's environment (no activated venv needed)
        sys.exit(subprocess.run([sys.executable, "-m", *cmd], cwd=params_path.parent).returncode)


if __name__ == "__main__":
    main()
