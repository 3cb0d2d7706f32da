"""The shared command line of every stage: ``python -m stages.<name> [--params FILE] [...]``."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from polypflow.settings.config import Params, ParamsError, load_params

log = logging.getLogger("polypflow")
# ends the one line of an error that the same input and settings will raise again: flows do not retry it
PERMANENT = "(a setting or input to fix: retrying will not help)"


def project_params(path: str | Path) -> Params:
    """Load ``path`` and work in its folder, the project: every relative path of the settings (data, artifacts,
    the MLflow store) then means the same from wherever the stage was started."""
    path = Path(path).resolve()
    if not path.exists():
        raise ParamsError(f"{path}: no such parameters file")
    os.chdir(path.parent)
    return load_params(path.name)


def parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(description or "").strip().splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (or the parent's death): unwinds like Ctrl-C, so an open MLflow run ends as KILLED."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


def die_with_parent() -> None:
    """SIGTERM this stage when the process that started it (``dvc repro``, a flow's task) dies, even by SIGKILL:
    a trainer left running alone would register work that DVC never records (Linux ``PR_SET_PDEATHSIG``)."""
    signal.signal(signal.SIGTERM, _terminate)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
        if os.getppid() == 1:  # the parent died before prctl took effect
            raise Terminated("the parent process is gone")


def main(body: Callable[[], object]) -> None:
    """Run a stage body; known user errors end with one readable line and exit status 1; Ctrl-C, SIGTERM and the
    parent's death end with one line (status 130) after the open MLflow run was ended as KILLED."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "alembic", "mlflow.store", "httpx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        die_with_parent()
        body()
    except KeyboardInterrupt as exc:
        log.error("interrupted (%s): stopped; the stage's MLflow run, if open, ended as KILLED; `dvc repro` resumes "
                  "from the last completed epoch", exc or "Ctrl-C")
        sys.exit(130)
    except (ParamsError, FileNotFoundError, ValueError, KeyError) as exc:  # a setting or an input to fix
        log.error("%s: %s %s", type(exc).__name__, exc, PERMANENT)
        sys.exit(2)
    except RuntimeError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        sys.exit(1)
    except Exception as exc:
        if not type(exc).__module__.startswith(("mlflow", "sqlalchemy")):
            raise
        log.error("MLflow store (%s): %s", os.environ.get("MLFLOW_TRACKING_URI", "tracking.uri of infra.yaml"),
                  store_failure(exc))
        sys.exit(1)


def store_failure(exc: Exception) -> str:
    """Why the MLflow store failed, in one line: an unreachable server's socket error (``[Errno 111] Connection
    refused``, buried at the end of urllib3's retry message) first, then the message's first line."""
    text = str(exc)
    socket_error = re.search(r"\[Errno -?\d+\][^\"')]*", text)
    first_line = text.splitlines()[0][:300] if text else type(exc).__name__
    return f"unreachable ({socket_error.group(0).strip()}): {first_line}" if socket_error else first_line


def method_main(doc: str | None, run: Callable[[Params, str], object]) -> None:
    """The command line of a per-method stage: ``python -m stages.<name> --method M [--params FILE]``."""
    p = parser(doc)
    p.add_argument("--method", required=True, help="a key of methods: (or external:, for evaluate) in params.yaml")
    args = p.parse_args()
    main(lambda: run(project_params(args.params), args.method))
