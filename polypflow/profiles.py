"""Apply a settings profile: deep-merge ``profiles/<name>.yaml`` into params.yaml (validated, atomic).

``python -m polypflow.profiles paper`` switches to the published recipes; ``git checkout params.yaml``
returns to the default profile. Mappings merge key by key; lists and scalars are replaced.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from polypflow.config import Params, ParamsError
from polypflow.io import write_text


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply(profile: Path, params_path: Path) -> dict[str, Any]:
    """Merge ``profile`` into ``params_path``; validate the result before writing it."""
    base = yaml.safe_load(params_path.read_text())
    merged = deep_merge(base, yaml.safe_load(profile.read_text()) or {})
    try:
        Params.model_validate(merged)
    except ValueError as exc:
        raise ParamsError(f"{profile}: applying it to {params_path} gives invalid parameters: {exc}") from exc
    write_text(params_path, f"# {params_path.name} with profile {profile} applied\n" + yaml.safe_dump(merged, sort_keys=False))
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", help="a name in profiles/ (e.g. paper) or a YAML path")
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args()
    path = Path(args.profile) if args.profile.endswith(".yaml") else Path("profiles") / f"{args.profile}.yaml"
    apply(path, Path(args.params))
    print(f"applied {path} to {args.params}")


if __name__ == "__main__":
    main()
