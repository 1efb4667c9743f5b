"""Secrets never printed: a password inside MLFLOW_TRACKING_URI appears in no line we or MLflow print."""

from __future__ import annotations

import logging

from conftest import run_cli
from test_mlflow_server import MlflowServer

from rlhf.redact import RedactingFilter, install_log_redaction

PASSWORD = "S3cretPassw0rd"


def test_a_password_in_the_tracking_uri_is_never_printed(dataset, tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path).start()
    try:
        uri = server.url.replace("http://", f"http://alice:{PASSWORD}@")
        env = {"RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "secrets"}
        res = run_cli("validate", "--dataset", str(dataset), "--out", str(tmp_path / "validation"), cwd=tmp_path,
                      env=env)
        printed = res.stdout + res.stderr
        assert res.returncode == 0, printed
        assert PASSWORD not in printed, printed
        import mlflow

        client = mlflow.MlflowClient(server.url)
        runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
        assert runs, "the stage was tracked on the server"
        assert all(PASSWORD not in str(r.data.params) + str(r.data.tags) for r in runs)
    finally:
        server.stop()


def test_log_records_are_redacted_on_every_handler(caplog):
    logger = logging.getLogger("rlhf.test-secrets")
    install_log_redaction()
    caplog.handler.addFilter(RedactingFilter())
    logger.warning("could not reach %s", f"http://alice:{PASSWORD}@mlflow.example:5000")
    logger.warning("token hf_%s in a message", "A" * 24)
    text = caplog.text
    assert PASSWORD not in text and "hf_" + "A" * 24 not in text
    assert "http://***@mlflow.example:5000" in text
