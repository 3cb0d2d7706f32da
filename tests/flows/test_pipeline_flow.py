"""The Prefect flow drives the DVC stages in Prefect's local (ephemeral API) mode, with retries."""

from __future__ import annotations

import pytest
from prefect.testing.utilities import prefect_test_harness

from conftest import read_params, write_params

from flows.pipeline import PermanentFailure, dvc_repro, polypflow_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_runs_pipeline(project, prefect_api):
    result = polypflow_pipeline(project_dir=str(project), crossval=False)
    unet = result["methods"]["unet"]
    assert unet["test"]["gamma"]["n"] == 10
    assert unet["registry"]["champion"] is True and unet["registry"]["version"] == 1
    assert unet["profile"]["onnxruntime"]["fps"] > 0
    assert (project / "dvc.lock").exists()
    assert [(f["name"], f["device"]) for f in result["fanout"]] == [("train@unet", "0")]  # fitted on the Dask worker


def test_failing_target_is_retried_then_raises(project, prefect_api):
    flaky = dvc_repro.with_options(retries=1, retry_delay_seconds=0)
    state = flaky(str(project), ["no_such_stage"], return_state=True)
    assert state.is_failed()
    assert "no_such_stage" in str(state.result(raise_on_failure=False))
    assert attempts(state) == 2  # dvc's own error may be transient: retried once


def attempts(state) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_task_run(state.state_details.task_run_id).run_count


def test_a_refused_setting_is_not_retried_and_costs_no_finished_output(project, prefect_api):
    """Issue 22: an input only the stage can judge fails after DVC removed the stage's outputs; the flow puts the
    last ones back from the cache."""
    assert dvc_repro(str(project), ["split"])
    splits = (project / "data" / "splits.json").read_bytes()
    params = read_params(project)
    params["split"]["scheme"] = "pranet"  # its test lists are not in split.test_lists: a ValueError naming the file
    write_params(project, params)
    state = dvc_repro.with_options(retries=2, retry_delay_seconds=0)(str(project), ["split"], return_state=True)
    assert state.is_failed()
    with pytest.raises(PermanentFailure, match=r"\(the last outputs put back: dvc checkout\)(.|\n)*alpha_test.txt.*"
                                               "retrying will not help"):
        state.result()
    assert attempts(state) == 1
    assert (project / "data" / "splits.json").read_bytes() == splits


def test_unknown_method_is_rejected(project, prefect_api):
    with pytest.raises(ValueError, match="not in train.methods"):
        polypflow_pipeline(project_dir=str(project), methods=["pranet"])


@pytest.mark.quick
def test_an_unreachable_prefect_api_is_one_line_naming_it(tmp_path):
    """Issue 22, item 7: PREFECT_API_URL pointing at nothing gives one line naming the URL, not tracebacks."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    run = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=REPO, env=env, text=True, capture_output=True,
                         timeout=120)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode != 0
    assert len(lines) == 1 and "http://127.0.0.1:9/api" in lines[0] and "Traceback" not in lines[0], lines[-20:]
