"""The shared command line of every stage: ``python -m stages.<name> [--params FILE] [...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from polypflow.config import Params, ParamsError, load_params

log = logging.getLogger("polypflow")


def parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(description or "").strip().splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    return p


def main(body: Callable[[], object]) -> None:
    """Run a stage body; known user errors end with one readable line and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "alembic", "mlflow.store", "httpx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        body()
    except (ParamsError, FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        sys.exit(1)
    except Exception as exc:
        if not type(exc).__module__.startswith("mlflow"):
            raise
        log.error("MLflow (%s): %s", os.environ.get("MLFLOW_TRACKING_URI", "tracking.uri of params"), exc)
        sys.exit(1)


def method_main(doc: str | None, run: Callable[[Params, str], object]) -> None:
    """The command line of a per-method stage: ``python -m stages.<name> --method M [--params FILE]``."""
    p = parser(doc)
    p.add_argument("--method", required=True, help="a key of methods: in params.yaml")
    args = p.parse_args()
    main(lambda: run(load_params(args.params), args.method))
