"""Contract test of `rlhf submit` / `rlhf schedule` against a fake KFP v2beta1 API on loopback.

No KFP backend can run here, so the server below implements the few endpoints the client uses,
the way the KFP API server answers them (snake_case JSON, ``filter`` as a JSON Filter proto,
``recurringRuns`` in list responses), and checks every request body it gets.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from conftest import ROOT, run_cli

TOKEN = "test-token-123"


class FakeKfp:
    def __init__(self):
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        self.recurring: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict | None]] = []
        self.errors: list[str] = []
        self.run_outcome = "SUCCEEDED"
        self.gate = "passed"

    # -- checks of request bodies (a failed check answers 400 and is recorded)
    def check_pipeline_spec(self, body: dict) -> None:
        ps = body["pipeline_spec"]
        assert set(ps) == {"pipeline_spec", "platform_spec"}, "IR + kubernetes platform spec, as kfp.Client sends"
        assert ps["pipeline_spec"]["pipelineInfo"]["name"] == "rlhf"
        assert "kubernetes" in ps["platform_spec"]["platforms"]
        declared = ps["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
        params = body["runtime_config"]["parameters"]
        unknown = set(params) - set(declared)
        assert not unknown, f"parameters the pipeline does not declare: {unknown}"
        for k in ("data_revision", "data_hash", "params_yaml"):
            assert k in params, k
        assert yaml.safe_load(params["params_yaml"])["model"], "params_yaml carries params.yaml"
        assert body["experiment_id"] in self.experiments

    def handle(self, method: str, path: str, query: dict, body: dict | None, headers) -> tuple[int, dict]:
        self.requests.append((method, path, body))
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, {"error": "missing or wrong bearer token", "code": 16}
        if path == "/apis/v2beta1/experiments" and method == "GET":
            pred = json.loads(query["filter"][0])["predicates"][0]
            assert pred == {"operation": "EQUALS", "key": "display_name", "string_value": pred["string_value"]}
            found = [e for e in self.experiments.values() if e["display_name"] == pred["string_value"]]
            return 200, {"experiments": found, "total_size": len(found)}
        if path == "/apis/v2beta1/experiments" and method == "POST":
            assert body["display_name"]
            eid = str(uuid.uuid4())
            self.experiments[eid] = {"experiment_id": eid, "display_name": body["display_name"]}
            return 200, self.experiments[eid]
        if path == "/apis/v2beta1/runs" and method == "POST":
            self.check_pipeline_spec(body)
            assert body["display_name"]
            rid = str(uuid.uuid4())
            self.runs[rid] = {**body, "run_id": rid, "state": "PENDING"}
            return 200, {k: v for k, v in self.runs[rid].items() if k != "pipeline_spec"}
        if m := re.fullmatch(r"/apis/v2beta1/runs/([\w-]+)", path):
            run = self.runs.get(m.group(1))
            if run is None:
                return 404, {"error": "run not found", "code": 5}
            n = self.polls[run["run_id"]] = self.polls.get(run["run_id"], 0) + 1
            tasks = [{"display_name": "Prepare data", "state": "SUCCEEDED"},
                     {"display_name": "condition-branches-1", "state": "RUNNING"}]
            if n >= 2:
                run["state"] = self.run_outcome
                final = "SUCCEEDED" if self.run_outcome == "SUCCEEDED" else "FAILED"
                tasks = [{"display_name": "Prepare data", "state": "SUCCEEDED"},
                         {"display_name": "Evaluate + gate", "state": final},
                         {"display_name": "Register model (MLflow)",
                          "state": "SUCCEEDED" if self.gate == "passed" and final == "SUCCEEDED" else "SKIPPED"}]
            else:
                run["state"] = "RUNNING"
            return 200, {**{k: v for k, v in run.items() if k != "pipeline_spec"},
                         "run_details": {"task_details": tasks}}
        if path == "/apis/v2beta1/recurringruns" and method == "GET":
            exp = query["experiment_id"][0]
            pred = json.loads(query["filter"][0])["predicates"][0]
            found = [r for r in self.recurring.values()
                     if r["experiment_id"] == exp and r["display_name"] == pred["string_value"]]
            return 200, {"recurringRuns": found, "total_size": len(found)}
        if path == "/apis/v2beta1/recurringruns" and method == "POST":
            self.check_pipeline_spec(body)
            cron = body["trigger"]["cron_schedule"]["cron"]
            assert len(cron.split()) == 6, "KFP cron has a seconds field"
            assert body["max_concurrency"] == "1" and body["no_catchup"] is True and body["mode"] == "ENABLE"
            rid = str(uuid.uuid4())
            self.recurring[rid] = {**body, "recurring_run_id": rid, "status": "ENABLED"}
            return 200, self.recurring[rid]
        if (m := re.fullmatch(r"/apis/v2beta1/recurringruns/([\w-]+)", path)) and method == "DELETE":
            if self.recurring.pop(m.group(1), None) is None:
                return 404, {"error": "not found", "code": 5}
            return 200, {}
        return 404, {"error": f"no route {method} {path}", "code": 5}


@pytest.fixture
def kfp_server():
    fake = FakeKfp()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method):
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            try:
                status, doc = fake.handle(method, url.path, parse_qs(url.query), body, self.headers)
            except AssertionError as e:  # a contract violation: answer 400 and remember it
                fake.errors.append(f"{method} {url.path}: {e}")
                status, doc = 400, {"error": f"contract violation: {e}", "code": 3}
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_DELETE(self):
            self._serve("DELETE")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    assert not fake.errors, fake.errors


ENV = {"KFP_TOKEN": TOKEN, "RLHF_TRACKING": "off"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "pipeline.yaml"
    assert run_cli("compile", "--out", str(out)).returncode == 0
    return out


def test_submit_wait_reports_the_gate(kfp_server, tmp_path, compiled):
    summary = tmp_path / "summary.md"
    res = run_cli("submit", "--host", kfp_server.url, "--pipeline", str(compiled), "--data-revision", "abc123",
                  "--wait", "--poll", "0.05", "-p", "sft_max_steps=7", "-p", "gpu_node_selector={pool: a100}",
                  "--set", "ppo.kl_coef=0.1", "--service-account", "rlhf-pipeline",
                  "--summary-file", str(summary), env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gate passed" in res.stdout and "SUCCEEDED" in res.stdout
    assert "Register model (MLflow): SUCCEEDED" in res.stdout  # task states are streamed
    (run,) = kfp_server.runs.values()
    params = run["runtime_config"]["parameters"]
    assert params["data_revision"] == "abc123"
    data_hash = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    assert params["data_hash"] == data_hash
    assert params["sft_max_steps"] == 7 and params["gpu_node_selector"] == {"pool": "a100"}
    assert params["overrides"] == {"ppo": {"kl_coef": 0.1}}
    assert run["service_account"] == "rlhf-pipeline"
    assert [e["display_name"] for e in kfp_server.experiments.values()] == ["rlhf"]
    md = summary.read_text()
    assert "gate: **passed**" in md and "abc123" in md
    assert TOKEN not in res.stdout + res.stderr + md


def test_submit_reuses_the_experiment_and_fails_when_the_run_fails(kfp_server, compiled):
    kfp_server.run_outcome = "FAILED"
    for _ in range(2):
        res = run_cli("submit", "--host", kfp_server.url, "--pipeline", str(compiled), "--wait", "--poll", "0.05",
                      env=ENV)
    assert res.returncode != 0
    assert "ended FAILED" in res.stderr and "Traceback" not in res.stderr
    assert len(kfp_server.experiments) == 1 and len(kfp_server.runs) == 2


def test_submit_errors_are_one_line(kfp_server, compiled):
    res = run_cli("submit", "--host", kfp_server.url, "--pipeline", str(compiled), env={**ENV, "KFP_TOKEN": "x"})
    assert res.returncode != 0 and "HTTP 401" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("submit", "--host", kfp_server.url, "--pipeline", str(compiled), "-p", "nope=1", env=ENV)
    assert res.returncode != 0 and "unknown pipeline parameter(s): nope" in res.stderr
    res = run_cli("submit", "--host", "http://127.0.0.1:9", "--pipeline", str(compiled), env=ENV)
    assert res.returncode != 0 and "cannot reach the KFP API" in res.stderr


def test_schedule_is_idempotent(kfp_server, compiled):
    args = ("schedule", "--host", kfp_server.url, "--pipeline", str(compiled), "--cron", "0 3 * * *",
            "--name", "nightly")
    first = run_cli(*args, env=ENV)
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout and "max concurrency 1, no catch-up" in first.stdout
    second = run_cli(*args, env=ENV)
    assert second.returncode == 0 and "unchanged" in second.stdout
    assert len(kfp_server.recurring) == 1
    (rr,) = kfp_server.recurring.values()
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    first_id = rr["recurring_run_id"]

    changed = run_cli("schedule", "--host", kfp_server.url, "--pipeline", str(compiled), "--cron",
                      "0 0 4 * * *", "--name", "nightly", env=ENV)
    assert changed.returncode == 0 and "updated" in changed.stdout
    (rr,) = kfp_server.recurring.values()
    assert rr["recurring_run_id"] != first_id and rr["trigger"]["cron_schedule"]["cron"] == "0 0 4 * * *"
    posts = [r for r in kfp_server.requests if r[0] == "POST" and r[1].endswith("/recurringruns")]
    deletes = [r for r in kfp_server.requests if r[0] == "DELETE"]
    assert len(posts) == 2 and len(deletes) == 1
