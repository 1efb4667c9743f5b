"""Contract test of `rlhf submit` / `rlhf schedule` against a KFP v2beta1 API on loopback.

No KFP backend can run here, so the server below implements the endpoints ``kfp.Client`` calls, the
way the KFP API server answers them (the fields of the v2beta1 protos in snake_case, ``recurringRuns``
in list responses, int64 as strings, RFC 3339 times, pages with ``next_page_token``, ``filter`` as a
JSON Filter proto in either proto3 JSON spelling, google.rpc.Status errors), behind an ingress that
wants the bearer token (answering 401 in plain text, as Istio does). The SDK deserialises every answer
into its kfp_server_api models, and the server checks every request body it gets.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from conftest import ROOT, run_cli

TOKEN = "test-token-123"
API = "/apis/v2beta1"
DEFAULT_PAGE_SIZE = 20
NEVER = "1970-01-01T00:00:00Z"  # how the API shows an unset timestamp


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def int64(value) -> int:
    """A proto3 JSON int64: a number or a decimal string."""
    assert (isinstance(value, int) and not isinstance(value, bool)) or \
        (isinstance(value, str) and re.fullmatch(r"-?\d+", value)), f"not an int64: {value!r}"
    return int(value)


def name_predicate(query: dict) -> str:
    """The value of the one ``display_name EQUALS`` predicate of ``filter`` (enum as name or number,
    fields in snake_case or lowerCamelCase: proto3 JSON accepts both)."""
    (pred,) = json.loads(query["filter"][0])["predicates"]
    assert pred["operation"] in ("EQUALS", 1), pred
    assert pred["key"] == "display_name", pred
    value = pred.get("string_value", pred.get("stringValue"))
    assert isinstance(value, str), pred
    return value


def status(code: int, message: str) -> dict:
    return {"code": code, "message": message, "details": []}


class FakeKfp:
    def __init__(self):
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        self.recurring: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict | None]] = []
        self.queries: list[tuple[str, str, dict]] = []
        self.errors: list[str] = []
        self.run_outcome = "SUCCEEDED"
        self.gate = "passed"
        self.version = "2.17.0"  # the backend's tag_name in healthz (KFP's apiserver main.go)
        self.multi_user = False
        self.login_redirect = False  # without a token: 302 to a login page instead of 401
        self.allowed_namespaces = {"team-a"}  # multi-user: the namespaces the token's user may use
        self.max_page_size = 200  # the most items one page holds, whatever page_size asks

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

    def namespace_error(self, namespace: str | None) -> tuple[int, dict] | None:
        """Multi-user KFP: a namespace is required, and the user must be allowed in it."""
        if not self.multi_user:
            return None
        if not namespace:
            return 400, status(3, "Invalid input error: In multi-user mode, a namespace is required")
        if namespace not in self.allowed_namespaces:
            return 403, status(7, f"PermissionDenied: User 'user@example.com' is not authorized with reason: "
                                  f"(request: &ResourceAttributes{{Namespace:{namespace},Verb:list}})")
        return None

    def page(self, items: list[dict], query: dict, key: str) -> dict:
        size = min(int(query.get("page_size", ["0"])[0]) or DEFAULT_PAGE_SIZE, self.max_page_size)
        token = query.get("page_token", [""])[0]
        start = json.loads(base64.b64decode(token))["offset"] if token else 0
        doc = {key: items[start:start + size], "total_size": len(items)}
        if start + size < len(items):
            doc["next_page_token"] = base64.b64encode(json.dumps({"offset": start + size}).encode()).decode()
        return doc

    def handle(self, method: str, path: str, query: dict, body: dict | None,
               headers) -> tuple[int, dict | str]:
        self.requests.append((method, path, body))
        self.queries.append((method, path, query))
        if path == "/dex/auth":
            return 200, "<html><body>Log in to Your Account</body></html>"
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            if self.login_redirect:  # Kubeflow's oauth2-proxy sends anything without a token to Dex
                return 302, {"Location": "/dex/auth?client_id=kubeflow-oidc-authservice"}
            return 401, "Jwt verification fails"
        if path == f"{API}/healthz" and method == "GET":
            return 200, {"commit_sha": "0123abc", "tag_name": self.version, "multi_user": self.multi_user,
                         "pipeline_store": "database"}
        if path == f"{API}/experiments" and method == "GET":
            namespace = query.get("namespace", [""])[0]
            if err := self.namespace_error(namespace):
                return err
            name = name_predicate(query)
            found = [e for e in self.experiments.values()
                     if e["display_name"] == name and e.get("namespace", "") == namespace]
            return 200, self.page(found, query, "experiments")
        if path == f"{API}/experiments" and method == "POST":
            assert body["display_name"]
            namespace = body.get("namespace") or ""
            if err := self.namespace_error(namespace):
                return err
            if any(e["display_name"] == body["display_name"] and e.get("namespace", "") == namespace
                   for e in self.experiments.values()):
                return 409, status(6, f"Already exist error: experiment {body['display_name']} exists")
            eid = str(uuid.uuid4())
            self.experiments[eid] = {"experiment_id": eid, "display_name": body["display_name"],
                                     "description": body.get("description", ""), "created_at": now(),
                                     "storage_state": "AVAILABLE", "last_run_created_at": NEVER,
                                     **({"namespace": namespace} if namespace else {})}
            return 200, self.experiments[eid]
        if path == f"{API}/runs" and method == "POST":
            self.check_pipeline_spec(body)
            assert body["display_name"]
            rid = str(uuid.uuid4())
            self.runs[rid] = {**body, "run_id": rid, "storage_state": "AVAILABLE", "created_at": now(),
                              "scheduled_at": now(), "finished_at": NEVER, "state": "PENDING",
                              "state_history": [{"update_time": now(), "state": "PENDING"}]}
            self.experiments[body["experiment_id"]]["last_run_created_at"] = now()
            return 200, self.runs[rid]
        if (m := re.fullmatch(rf"{API}/runs/([\w-]+)", path)) and method == "GET":
            run = self.runs.get(m.group(1))
            if run is None:
                return 404, status(5, f"Failed to get run: ResourceNotFoundError: Run {m.group(1)} not found")
            rid = run["run_id"]
            n = self.polls[rid] = self.polls.get(rid, 0) + 1
            tasks = [("Prepare data", "SUCCEEDED"), ("condition-branches-1", "RUNNING")]
            if n >= 2:
                run["state"] = self.run_outcome
                final = "SUCCEEDED" if self.run_outcome == "SUCCEEDED" else "FAILED"
                passed = self.gate == "passed"
                tasks = [("Prepare data", "SUCCEEDED"), ("Evaluate + gate", final),
                         ("Register model (MLflow)", "SUCCEEDED" if passed and final == "SUCCEEDED" else "SKIPPED"),
                         ("Register challenger (gate failed)",
                          "SUCCEEDED" if not passed and final == "SUCCEEDED" else "SKIPPED")]
                run["finished_at"] = now()
            else:
                run["state"] = "RUNNING"
            details = [{"run_id": rid, "task_id": f"task-{i}", "display_name": name,
                        "create_time": run["created_at"], "start_time": run["created_at"], "end_time": NEVER,
                        "state": state}
                       for i, (name, state) in enumerate(tasks)]
            return 200, {**run, "run_details": {"pipeline_context_id": "1", "pipeline_run_context_id": "2",
                                                "task_details": details}}
        if path == f"{API}/recurringruns" and method == "GET":
            exp = query["experiment_id"][0]
            name = name_predicate(query)
            found = [r for r in self.recurring.values()
                     if r["experiment_id"] == exp and r["display_name"] == name]
            return 200, self.page(found, query, "recurringRuns")
        if path == f"{API}/recurringruns" and method == "POST":
            self.check_pipeline_spec(body)
            cron = body["trigger"]["cron_schedule"]["cron"]
            assert len(cron.split()) == 6, "KFP cron has a seconds field"
            assert int64(body["max_concurrency"]) == 1, "max concurrency 1"
            assert body["no_catchup"] is True and body["mode"] == "ENABLE"
            rid = str(uuid.uuid4())
            exp = self.experiments[body["experiment_id"]]
            self.recurring[rid] = {**body, "recurring_run_id": rid, "max_concurrency": "1",
                                   "created_at": now(), "updated_at": now(), "status": "ENABLED",
                                   **({"namespace": exp["namespace"]} if "namespace" in exp else {})}
            return 200, self.recurring[rid]
        if (m := re.fullmatch(rf"{API}/recurringruns/([\w-]+)", path)) and method == "DELETE":
            if self.recurring.pop(m.group(1), None) is None:
                return 404, status(5, f"Failed to delete recurring run {m.group(1)}: not found")
            return 200, {}
        return 404, status(5, f"Not Found: {method} {path}")


@pytest.fixture
def kfp_server():
    fake = FakeKfp()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method):
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            try:
                code, doc = fake.handle(method, url.path, parse_qs(url.query), body, self.headers)
            except (AssertionError, KeyError, ValueError) as e:  # a contract violation: 400, remembered
                fake.errors.append(f"{method} {url.path}: {e!r}")
                code, doc = 400, status(3, f"contract violation: {e!r}")
            if code == 302:
                self.send_response(code)
                self.send_header("Location", doc["Location"])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            text = isinstance(doc, str)
            data = (doc if text else json.dumps(doc)).encode()
            self.send_response(code)
            self.send_header("Content-Type", ("text/html" if doc.startswith("<") else "text/plain") if text
                             else "application/json")
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


def stderr_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def test_submit_errors_are_one_line(kfp_server, compiled):
    res = run_cli("submit", "--host", kfp_server.url, "--pipeline", str(compiled), env={**ENV, "KFP_TOKEN": "x"})
    assert res.returncode != 0 and "HTTP 401" in res.stderr and "Traceback" not in res.stderr
    assert len(stderr_lines(res)) == 1 and "$KFP_TOKEN" in res.stderr
    res = run_cli("submit", "--host", kfp_server.url, "--pipeline", str(compiled), "-p", "nope=1", env=ENV)
    assert res.returncode != 0 and "unknown pipeline parameter(s): nope" in res.stderr
    res = run_cli("submit", "--host", "http://127.0.0.1:9", "--pipeline", str(compiled), env=ENV)
    assert res.returncode != 0 and "cannot reach the KFP API" in res.stderr
    assert stderr_lines(res) == ["error: cannot reach the KFP API at http://127.0.0.1:9 (Failed to establish "
                                 "a new connection: [Errno 111] Connection refused)"]
    # with a namespace kfp.Client skips its health check; the version check (backend floor) still asks
    res = run_cli("schedule", "--host", kfp_server.url, "--pipeline", str(compiled), "--cron", "0 3 * * *",
                  "--namespace", "team-a", env={**ENV, "KFP_TOKEN": ""})
    assert res.returncode != 0 and len(stderr_lines(res)) == 1, res.stderr
    assert "health check (version): HTTP 401 Jwt verification fails" in res.stderr
    assert not kfp_server.runs and not kfp_server.recurring and not kfp_server.experiments


def test_a_redirect_to_the_login_page_is_reported_not_followed(kfp_server, compiled):
    kfp_server.login_redirect = True
    res = run_cli("submit", "--host", kfp_server.url, "--pipeline", str(compiled), "--namespace", "team-a",
                  env={**ENV, "KFP_TOKEN": ""})
    assert res.returncode != 0 and len(stderr_lines(res)) == 1, res.stderr
    assert "HTTP 302, redirected to /dex/auth" in res.stderr and "$KFP_TOKEN" in res.stderr
    assert [p for _, p, _ in kfp_server.requests] == ["/apis/v2beta1/healthz"]  # the login page untouched


def test_multi_user_kfp_needs_a_namespace_the_user_may_use(kfp_server, compiled):
    kfp_server.multi_user = True
    base = ("submit", "--host", kfp_server.url, "--pipeline", str(compiled))
    res = run_cli(*base, env=ENV)
    assert res.returncode != 0 and len(stderr_lines(res)) == 1, res.stderr
    assert "HTTP 400 Invalid input error: In multi-user mode, a namespace is required" in res.stderr
    res = run_cli(*base, "--namespace", "someone-else", env=ENV)
    assert res.returncode != 0 and len(stderr_lines(res)) == 1, res.stderr
    assert "HTTP 403 PermissionDenied" in res.stderr and "--namespace" in res.stderr
    res = run_cli(*base, "--namespace", "team-a", "--wait", "--poll", "0.05", env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gate passed" in res.stdout
    experiments = [(e["display_name"], e["namespace"]) for e in kfp_server.experiments.values()]
    assert experiments == [("rlhf", "team-a")]
    (run,) = kfp_server.runs.values()
    assert run["experiment_id"] in kfp_server.experiments and run["state"] == "SUCCEEDED"


def test_submit_wait_reports_a_failed_gate(kfp_server, tmp_path, compiled):
    kfp_server.gate = "failed"
    summary = tmp_path / "summary.md"
    res = run_cli("submit", "--host", kfp_server.url, "--pipeline", str(compiled), "--wait", "--poll", "0.05",
                  "--summary-file", str(summary), env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr  # the run succeeded; the gate kept the champion
    assert "gate failed: the evaluation gate failed; the policy was registered as challenger only" in res.stdout
    assert "Register model (MLflow): SKIPPED" in res.stdout
    assert "Register challenger (gate failed): SUCCEEDED" in res.stdout
    (run_id,) = kfp_server.runs
    assert kfp_server.polls[run_id] == 2  # followed until the run ended, then stopped
    assert "gate: **failed**" in summary.read_text()


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


def test_schedule_reads_every_page_and_leaves_one(kfp_server, compiled):
    args = ("schedule", "--host", kfp_server.url, "--pipeline", str(compiled), "--cron", "0 3 * * *",
            "--name", "nightly")
    assert run_cli(*args, env=ENV).returncode == 0
    (rr,) = kfp_server.recurring.values()
    for _ in range(2):  # duplicates, as two schedulers racing would leave them
        rid = str(uuid.uuid4())
        kfp_server.recurring[rid] = {**rr, "recurring_run_id": rid}
    kfp_server.max_page_size = 2
    res = run_cli(*args, env=ENV)
    assert res.returncode == 0 and "updated" in res.stdout, res.stderr
    assert len(kfp_server.recurring) == 1
    assert sum(1 for m, p, q in kfp_server.queries if m == "GET" and p.endswith("/recurringruns")
               and q.get("page_token")) == 1  # the second page was asked for
    assert sum(1 for m, *_ in kfp_server.requests if m == "DELETE") == 3

    with_sa = (*args, "--service-account", "rlhf-pipeline")
    res = run_cli(*with_sa, env=ENV)
    assert res.returncode == 0 and "updated" in res.stdout, res.stderr
    (rr,) = kfp_server.recurring.values()
    assert rr["service_account"] == "rlhf-pipeline" and rr["max_concurrency"] == "1"
    res = run_cli(*with_sa, env=ENV)
    assert res.returncode == 0 and "unchanged" in res.stdout, res.stderr
    assert list(kfp_server.recurring.values()) == [rr]


def test_a_silent_api_times_out_in_one_line():
    """A KFP endpoint that takes the connection and never answers: a KfpError after the timeout, no hang."""
    from rlhf.pipeline.kfp_client import KfpClient, KfpError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        host = f"http://127.0.0.1:{sock.getsockname()[1]}"
        outcome: list = []

        def call():
            try:
                KfpClient(host, token=TOKEN, namespace="team-a", timeout=0.2).ensure_experiment("rlhf")
            except KfpError as e:
                outcome.append(e)

        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(timeout=30)
        assert not t.is_alive(), "the client hung on a silent server"
    (err,) = outcome
    assert str(err) == f"cannot reach the KFP API at {host} (Read timed out. (read timeout=0.2))"


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_a_backend_older_than_the_floor_is_refused_in_one_line(kfp_server, compiled, command):
    """Artifact dsl.OneOf over dsl.If/dsl.Else picks the last branch before KFP 2.17.0 (kubeflow/pipelines#13436)."""
    kfp_server.version = "2.16.1"
    extra = ("--cron", "0 3 * * *", "--name", "nightly") if command == "schedule" else ()
    res = run_cli(command, "--host", kfp_server.url, "--pipeline", str(compiled), *extra, env=ENV)
    assert res.returncode != 0
    (line,) = stderr_lines(res)
    assert "is 2.16.1; this pipeline needs 2.17.0 or newer" in line and "13436" in line
    assert not kfp_server.runs and not kfp_server.recurring, "nothing was created"


def test_a_backend_that_reports_no_version_gets_a_warning_and_the_run(kfp_server, compiled):
    kfp_server.version = "unknown"  # a dev build of the API server (TAG_NAME unset)
    res = run_cli("submit", "--host", kfp_server.url, "--pipeline", str(compiled), env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "reports version 'unknown'; this pipeline needs 2.17.0 or newer" in res.stdout + res.stderr
    assert len(kfp_server.runs) == 1
