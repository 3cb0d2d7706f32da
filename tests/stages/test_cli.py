"""The stages' shared command line: how a failing MLflow store reads."""

import mlflow
import pytest

from stages._cli import store_failure
from tests.services import free_port

pytestmark = pytest.mark.quick


def test_an_unreachable_server_says_so_however_long_the_url(monkeypatch):
    """urllib3 puts the socket error at the end of a message longer than one line may be: it must survive."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()  # nothing listens on it
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(mlflow.exceptions.MlflowException) as raised:
            mlflow.get_experiment_by_name("an-experiment-name-long-enough-to-push-the-reason-past-300-characters" * 2)
    finally:
        mlflow.set_tracking_uri(None)
    reason = store_failure(raised.value)
    assert "\n" not in reason and "Connection refused" in reason and f"127.0.0.1:{port}" in reason


def test_another_failure_keeps_its_first_line():
    assert store_failure(mlflow.exceptions.MlflowException("RESOURCE_DOES_NOT_EXIST: no model\ndetails")) == \
        "RESOURCE_DOES_NOT_EXIST: no model"
