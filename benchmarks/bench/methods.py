"""Which builder kwargs the benchmark builds a registered method with."""

from __future__ import annotations

from typing import Any

from models import method_entry


def method_kwargs(method: str, params: Any | None, quick: bool) -> dict:
    """Builder kwargs: tiny test variant (quick), else params.yaml ``methods:``, else registry defaults."""
    if quick:
        return {"pretrained": "none", **method_entry(method).test_kwargs}
    if params is not None:
        specs = params.methods
        match = specs.get(method) if method in specs and (specs[method].arch or method) == method else None
        match = match or next((s for k, s in specs.items() if (s.arch or k) == method), None)
        if match is not None:
            return {**match.model, "pretrained": "none"}
    return {"pretrained": "none"}
