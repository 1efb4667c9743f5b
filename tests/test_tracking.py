"""rlhf.mlops.tracking: parent/nested runs, lineage tags, redaction, fail-fast, metrics kept during an outage.

Real MLflow on a SQLite file in a temporary directory (no server; the HTTP server is exercised in
test_mlflow_server.py). No models are trained here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import run_cli

from rlhf.config import EvaluateConfig, ModelConfig
from rlhf.errors import UserError
from rlhf.mlops import tracking

SECRET = "hf_" + "S3cr3tT0kenValue" * 3


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tracking") / "mlflow.db"  # one database (migrations take seconds)


@pytest.fixture
def mlflow_sqlite(tracking_db, tmp_path, monkeypatch, request):
    """A SQLite store, an experiment of this test's own; the current directory is tmp (mlruns/, mlflow-unsent/)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tracking_db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", request.node.name)
    for k in ("RLHF_TRACKING", tracking.ENV_PARENT, tracking.ENV_PIPELINE, "KFP_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(tracking.ENV_DATA_HASH, "d41d8cd98f00b204e9800998ecf8427e.dir")
    monkeypatch.setenv("RLHF_PROFILE", "tiny")
    import mlflow

    return mlflow.MlflowClient(uri)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- redaction


@pytest.mark.parametrize("key", ["hf_token", "HF_TOKEN", "db.password", "aws_secret_access_key", "awsSecretAccessKey",
                                 "api_key", "apiKey", "openai.api-key", "MLFLOW_TRACKING_TOKEN", "client_secret",
                                 "credentials", "storage.access_key", "auth", "s3.secret", "dbPassword"])
def test_secret_keys_are_recognised(key):
    assert tracking.is_secret_key(key)


@pytest.mark.parametrize("key", ["max_new_tokens", "pad_token", "eos_token", "tokenizer", "tokens_per_s",
                                 "model.name", "lr", "kl_budget", "min_tokens", "lora_target_modules", "key_metrics"])
def test_ordinary_keys_are_kept(key):
    assert not tracking.is_secret_key(key)


def test_redact_masks_secret_keys_and_values():
    params = tracking.redact(tracking.flatten({
        "hf_token": SECRET,
        "storage": {"uri": "postgresql://mlflow:hunter2@db:5432/mlflow", "access_key": "AKIAABCDEFGHIJKLMNOP"},
        "endpoint": "https://s3.example.com/b?X-Amz-Signature=abcdef123&x=1",
        "note": f"token in a value {SECRET}",
        "header": "Bearer abcdefghijklmnop",
        "max_new_tokens": 48, "pad_token": "<|pad|>", "lr": 0.1, "empty_password": "",
    }))
    text = json.dumps(params)
    for s in (SECRET, "hunter2", "AKIAABCDEFGHIJKLMNOP", "abcdef123", "abcdefghijklmnop"):
        assert s not in text
    assert params["hf_token"] == "***"
    assert params["storage.uri"] == "postgresql://***@db:5432/mlflow"
    assert params["max_new_tokens"] == 48 and params["pad_token"] == "<|pad|>" and params["lr"] == 0.1
    assert params["empty_password"] == ""  # nothing to hide, and an empty value tells the reader it was unset


# ----------------------------------------------------------------------------- runs


def test_pipeline_run_nests_stage_runs_with_params_tags_and_step_metrics(mlflow_sqlite, tmp_path):
    client = mlflow_sqlite
    cfg = EvaluateConfig(max_new_tokens=17)
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# report\n")
    with tracking.pipeline_run("kfp-run-0001", config={"dataset": "d", "hf_token": SECRET}) as parent:
        import os

        assert os.environ[tracking.ENV_PARENT] == parent.run_id
        assert os.environ[tracking.ENV_PIPELINE] == "kfp-run-0001"
        with tracking.stage_run("sft", cfg, tags={"model": "tiny"}) as t:
            t.log_params({"model": ModelConfig().model_dump(mode="json"), "hub": {"token": SECRET}})
            for step in range(1, 4):
                t.log_metrics({"loss": 1.0 / step, "nan_is_skipped": float("nan")}, step=step)
            t.log_metrics({"eval_loss": 0.5})
            t.log_artifacts(report, "report")
            t.set_tags({"auth_token": SECRET, "note": f"see {SECRET}"})
            stage_id = t.run_id
    assert tracking.ENV_PARENT not in os.environ and tracking.ENV_PIPELINE not in os.environ  # restored

    prun, srun = client.get_run(parent.run_id), client.get_run(stage_id)
    assert prun.info.status == "FINISHED" and srun.info.status == "FINISHED"
    assert srun.data.tags["mlflow.parentRunId"] == parent.run_id
    for run in (prun, srun):
        tags = run.data.tags
        assert tags["pipeline_run_id"] == "kfp-run-0001"
        assert tags["data_hash"] == "d41d8cd98f00b204e9800998ecf8427e.dir"
        assert tags["profile"] == "tiny" and tags["host"] == socket.gethostname()
        assert len(tags["git_commit"]) == 40  # the package's checkout
    assert srun.data.tags["stage"] == "sft" and srun.data.tags["model"] == "tiny"
    assert srun.data.tags["auth_token"] == "***" and srun.data.tags["note"] == "see ***"
    assert srun.info.run_name == "sft"
    p = srun.data.params
    assert p["max_new_tokens"] == "17" and p["gate_metric"] == "gold" and p["model.name"] == "tiny"
    assert p["hub.token"] == "***" and prun.data.params["hf_token"] == "***"
    assert SECRET not in json.dumps([p, prun.data.params, srun.data.tags, prun.data.tags])
    assert [(m.step, m.value) for m in client.get_metric_history(stage_id, "loss")] == [(1, 1.0), (2, 0.5),
                                                                                      (3, 1 / 3)]
    assert "nan_is_skipped" not in srun.data.metrics and srun.data.metrics["eval_loss"] == 0.5
    assert [f.path for f in client.list_artifacts(stage_id, "report")] == ["report/report.md"]


def test_retried_pipeline_run_reuses_its_parent_and_failures_are_recorded(mlflow_sqlite):
    client = mlflow_sqlite
    with pytest.raises(RuntimeError):
        with tracking.pipeline_run("retry-me") as first:
            with tracking.stage_run("reward") as t:
                failed_stage = t.run_id
                raise RuntimeError("boom")
    assert client.get_run(failed_stage).info.status == "FAILED"
    assert client.get_run(first.run_id).info.status == "FAILED"
    with tracking.pipeline_run("retry-me") as second:  # the KFP retry: same pipeline run id
        with tracking.stage_run("reward") as t:
            ok_stage = t.run_id
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert client.get_run(ok_stage).data.tags["mlflow.parentRunId"] == first.run_id
    # steps in separate processes (KFP) attach with start/end_pipeline_run
    import os

    try:
        assert tracking.start_pipeline_run("retry-me") == first.run_id
        assert os.environ[tracking.ENV_PARENT] == first.run_id
        tracking.end_pipeline_run("FINISHED")
    finally:
        os.environ.pop(tracking.ENV_PARENT, None)
        os.environ.pop(tracking.ENV_PIPELINE, None)
    with pytest.raises(UserError, match="pipeline run id"):
        tracking.start_pipeline_run("bad' or 1=1")


def test_tracking_off_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLHF_TRACKING", "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never contacted
    with tracking.pipeline_run("x"), tracking.stage_run("sft", EvaluateConfig()) as t:
        t.log_metrics({"loss": 1.0}, step=1)
        t.set_tags({"a": 1})
        assert t.run_id is None
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- unreachable MLflow


def test_unreachable_server_fails_fast_with_one_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RLHF_TRACKING", raising=False)
    port = _free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:pw@127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        with tracking.stage_run("sft"):
            pytest.fail("the stage body must not run")
    assert time.monotonic() - t0 < 10
    msg = err.value.one_line()
    assert f"MLflow tracking server http://***@127.0.0.1:{port} is unreachable" in msg and "\n" not in msg
    assert "pw" not in msg.replace("http://***@", "")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql+psycopg2://u:secretpw@127.0.0.1:{port}/mlflow")
    with pytest.raises(UserError, match="database .* is unreachable") as err:
        tracking.check_reachable(tracking.tracking_uri())
    assert "secretpw" not in err.value.one_line()


def test_cli_reports_unreachable_server_in_one_line(tmp_path):
    port = _free_port()
    proc = run_cli("models", "list", cwd=tmp_path,
                   env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "RLHF_TRACKING": "on"}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"http://127.0.0.1:{port} is unreachable" in lines[0]
    assert "Traceback" not in proc.stderr


def test_unusable_tracking_stores_are_one_line_with_the_fix(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("not a directory\n")
    for uri, needle in ((f"file://{tmp_path}/mlruns", "is MLflow's file store, which MLflow 3 refuses"),
                        (str(tmp_path / "mlruns"), "is MLflow's file store"),
                        (f"sqlite:///{tmp_path}/afile/mlflow.db", f"{tmp_path}/afile is a file, not a directory"),
                        (f"sqlite:///{tmp_path}", "is a directory")):
        with pytest.raises(UserError, match="sqlite:///mlflow.db") as err:
            tracking.check_reachable(uri)
        assert needle in err.value.one_line()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-out is respected
    tracking.check_reachable(f"file://{tmp_path}/mlruns")


def test_a_stage_and_rlhf_run_refuse_an_unusable_tracking_uri_in_one_line(dataset, demo_raw, tmp_path):
    from conftest import ROOT

    (tmp_path / "afile").write_text("not a directory\n")
    for args, uri, needle in (
            (("validate", "--dataset", str(dataset), "--out", str(tmp_path / "validation")),
             f"file://{tmp_path}/mlruns", "MLflow's file store"),
            (("run", "--raw", str(demo_raw), "--params", str(ROOT / "params.yaml"), "--runs-dir", str(tmp_path / "runs")),
             f"sqlite:///{tmp_path}/afile/mlflow.db", "is a file, not a directory")):
        proc = run_cli(*args, cwd=tmp_path, env={"RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": uri,
                                                 "RLHF_PARENT_RUN_ID": "", "RLHF_PIPELINE_RUN_ID": ""}, timeout=300)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
        assert needle in errors[0] and "MLFLOW_TRACKING_URI" in errors[0], errors[0]
        assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "validation").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "runs").exists()  # rlhf run stopped before making its run directory


@contextlib.contextmanager
def store_outage(db: Path):
    """A real outage of the SQLite store: another connection holds its exclusive lock, so MLflow's writes fail
    (after MLflow's 20 s busy timeout) until the block ends."""
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        con.execute("ROLLBACK")
        con.close()


def wait_for_outage(t: tracking.Tracker, caplog, timeout: float = 120) -> None:
    """Until the tracker has seen a request fail (reading ``pending`` collects finished requests)."""
    deadline = time.monotonic() + timeout
    while "training goes on" not in caplog.text:
        assert time.monotonic() < deadline, "MLflow's request did not fail"
        time.sleep(0.5)
        t.pending  # noqa: B018


def test_metrics_are_buffered_during_an_outage_and_resent(mlflow_sqlite, tracking_db, monkeypatch, caplog):
    client = mlflow_sqlite
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="rlhf")
    with tracking.stage_run("ppo") as t:
        with store_outage(tracking_db):
            t0 = time.monotonic()
            t.log_metrics({"reward": 1.0}, step=1)  # must not raise: training goes on
            t.log_metrics({"reward": 2.0}, step=2)
            t.set_tags({"resumed_from_step": 0})
            assert time.monotonic() - t0 < 5  # nor wait for the store
            wait_for_outage(t, caplog)
            assert t.pending == 3
            assert "training goes on" in caplog.text
        t.log_metrics({"reward": 3.0}, step=3)  # the server is back: everything goes out
        assert t.flush() is None
        assert t.pending == 0
        run_id = t.run_id
    assert [m.value for m in client.get_metric_history(run_id, "reward")] == [1.0, 2.0, 3.0]
    assert client.get_run(run_id).data.tags["resumed_from_step"] == "0"
    assert "stores metrics again" in caplog.text


def test_a_step_per_call_goes_out_in_a_few_rounds_and_every_value_is_stored(mlflow_sqlite):
    """A training loop logs every step; MLflow gets a round of requests at most every SEND_SECONDS (the first at
    once), and closing the run sends the rest: every step's value once, in order."""
    client = mlflow_sqlite
    with tracking.stage_run("sft") as t:
        rounds = []
        real = t.client.log_batch

        def counted(*args, **kwargs):
            rounds.append(len(kwargs.get("metrics") or []))
            return real(*args, **kwargs)

        t.client.log_batch = counted
        t0 = time.monotonic()
        for step in range(1, 201):
            t.log_metrics({"loss": 1.0 / step}, step=step)
        calls = len(rounds)
        run_id = t.run_id
    assert rounds[0] == 1  # the first value goes out at once
    assert calls <= 2 + (time.monotonic() - t0) / tracking.SEND_SECONDS, rounds
    assert len(rounds) < 20 and sum(rounds) == 200, rounds
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 201))


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_send_interval_is_one_line_before_a_run_exists(mlflow_sqlite, monkeypatch, request, value):
    from rlhf.errors import ConfigError

    monkeypatch.setenv(tracking.ENV_SEND_SECONDS, value)
    with pytest.raises(ConfigError, match=f"RLHF_MLFLOW_SEND_SECONDS='{value}' is not a number of seconds"):
        with tracking.stage_run("sft"):
            pass
    exp = mlflow_sqlite.get_experiment_by_name(request.node.name)
    assert exp is None or not mlflow_sqlite.search_runs([exp.experiment_id])


def test_metrics_left_unsent_at_the_end_are_saved_locally(mlflow_sqlite, tracking_db, tmp_path, caplog):
    client = mlflow_sqlite
    with tracking.stage_run("sft") as t:
        with store_outage(tracking_db):
            t.log_metrics({"loss": 0.25}, step=7)
            wait_for_outage(t, caplog)
        run_id = t.run_id
    # the store answers again when the stage ends, but the next retry is RETRY_SECONDS away: saved, not sent
    saved = tmp_path / "mlflow-unsent" / f"{run_id}.jsonl"
    rows = [json.loads(x) for x in saved.read_text().splitlines()]
    assert rows == [{"run_id": run_id, "key": "loss", "value": 0.25, "timestamp": rows[0]["timestamp"], "step": 7}]
    assert client.get_run(run_id).info.status == "FINISHED"  # closing the run is separate from the metrics
    assert "loss" not in client.get_run(run_id).data.metrics  # saved only because it was not stored


def test_unsent_values_are_resent_exactly_once_by_tracking_flush(mlflow_sqlite, tracking_db, tmp_path, caplog):
    client = mlflow_sqlite
    with tracking.stage_run("sft") as t:
        with store_outage(tracking_db):
            t.log_metrics({"loss": 0.25}, step=7)
            wait_for_outage(t, caplog)
        run_id = t.run_id
    saved = tmp_path / "mlflow-unsent" / f"{run_id}.jsonl"
    assert saved.exists() and "loss" not in client.get_run(run_id).data.metrics
    env = {"RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": f"sqlite:///{tracking_db}"}
    res = run_cli("tracking", "flush", cwd=tmp_path, env=env)
    assert res.returncode == 0 and "sent 1 value(s) from 1 file(s)" in res.stdout, res.stdout + res.stderr
    assert not saved.exists()
    assert [(m.value, m.step) for m in client.get_metric_history(run_id, "loss")] == [(0.25, 7)]
    again = run_cli("tracking", "flush", cwd=tmp_path, env=env)
    assert again.returncode == 0 and "sent 0 value(s)" in again.stdout
    assert len(client.get_metric_history(run_id, "loss")) == 1, "exactly once"


def test_a_damaged_unsent_file_is_kept_and_the_others_are_sent(mlflow_sqlite, tmp_path, caplog):
    client = mlflow_sqlite
    with tracking.stage_run("sft") as t:
        run_id = t.run_id
    unsent = tmp_path / "mlflow-unsent"
    unsent.mkdir()
    row = {"run_id": run_id, "key": "loss", "value": 0.5, "timestamp": 1, "step": 3}
    (unsent / "a.jsonl").write_text(json.dumps(row) + "\n")
    (unsent / "b.jsonl").write_text(json.dumps({**row, "step": 4}) + "\n" + '{"run_id": "x", "key": "lo')  # cut off
    assert tracking.resend_unsent() == {"rows": 1, "files": 1, "kept": 1}
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3]
    assert sorted(p.name for p in unsent.iterdir()) == ["b.jsonl"] and "b.jsonl kept: line 2" in caplog.text


def test_values_the_store_refuses_are_saved_at_once_and_the_rest_goes_on(mlflow_sqlite, tmp_path, caplog):
    client = mlflow_sqlite
    with tracking.stage_run("sft") as t:
        t.log_metrics({"bad name?": 1.0}, step=1)  # MLflow refuses the name: resending cannot help
        t.flush()
        t.log_metrics({"loss": 0.5}, step=2)
        run_id = t.run_id
    rows = [json.loads(x) for x in (tmp_path / "mlflow-unsent" / f"{run_id}.jsonl").read_text().splitlines()]
    assert [(r["key"], r["step"]) for r in rows] == [("bad name?", 1)]
    assert "MLflow refused them" in caplog.text and "training goes on" not in caplog.text
    assert client.get_run(run_id).data.metrics == {"loss": 0.5}


def test_default_uri_is_a_sqlite_file_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{Path(tmp_path / 'mlflow.db').resolve()}"
