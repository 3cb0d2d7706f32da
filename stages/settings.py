"""Stage 0, settings: every settings file loaded and checked before any stage runs, so that a settings error fails
``dvc repro`` before DVC removes a single output.

DVC deletes a stage's outputs before it runs the stage's command; a stage that only then found a typo in its
settings would leave its finished outputs gone. This stage depends on every settings file whole (params.yaml,
methods.yaml, datasets.yaml, infra.yaml: any key, known or not) and every other stage depends on its output, so
DVC runs it first: an unknown or misspelt key anywhere, a bad value, a builder argument or loss a method cannot
take, a ``device: cuda`` without CUDA, a ``split.test_lists`` folder that is not there, or a ``tracking.uri`` naming a file
that is no MLflow database ends the run with one
line naming the file and the key, while every output stays as it was. Its output,
``artifacts/settings/checked.json``, changes only with what was checked (the settings files' names and the
methods), never with a value, so a valid change re-runs exactly the stages that use the changed setting.
"""

from __future__ import annotations

import logging

from polypflow.io import write_json
from polypflow.settings.config import SETTINGS_FILES, Params
from polypflow.settings.layout import settings_record
from polypflow.tasks.plan import check_settings
from polypflow.track.uri import check_store, tracking_uri
from stages._cli import main, parser, project_params

log = logging.getLogger(__name__)


def run(params: Params) -> dict:
    """Check every setting a stage will use; write the record every stage depends on."""
    checked = check_settings(params)
    check_store(tracking_uri(params))
    record = {"checked": ["params.yaml", *SETTINGS_FILES]}  # never a value: a valid change re-runs only its users
    write_json(settings_record(params), record)
    log.info("settings checked: %s; methods %s", ", ".join(record["checked"]), ", ".join(checked))
    return record


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    main(lambda: run(project_params(args.params)))
