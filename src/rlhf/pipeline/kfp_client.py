"""Compile, submit and schedule the pipeline on Kubeflow Pipelines with the KFP SDK's ``kfp.Client``.

The requests ``kfp.Client`` makes here (KFP v2beta1 REST API, served by the contract test too):

    GET  /apis/v2beta1/healthz                     on connecting without a namespace (multi-user check),
                                                   and by submit/schedule: the backend's version (``tag_name``)
    GET  /apis/v2beta1/experiments?filter=...      create_experiment: find the experiment by name,
    POST /apis/v2beta1/experiments                 or create it
    POST /apis/v2beta1/runs                        run_pipeline: a run of the compiled package (inline spec)
    GET  /apis/v2beta1/runs/{run_id}               get_run (``--wait`` polls it)
    GET  /apis/v2beta1/recurringruns?experiment_id=...&filter=...   list_recurring_runs: find our schedule
    POST /apis/v2beta1/recurringruns               create_recurring_run
    DELETE /apis/v2beta1/recurringruns/{id}        delete_recurring_run: replace a changed one

Authentication: ``$KFP_TOKEN`` as kfp.Client's ``existing_token`` (``Authorization: Bearer``, multi-user
Kubeflow behind its ingress); standalone KFP needs none. Every failure (unreachable, HTTP 401/403/404, a
package kfp cannot parse) is one :class:`KfpError` line.

``schedule`` is idempotent: the recurring run is found by name in the experiment; if its cron,
parameters, pipeline (a hash in its description) and service account are unchanged nothing happens,
otherwise a new one is created and the old one(s) deleted (the v2beta1 API has no update), so exactly
one remains. Max concurrency 1, no catch-up.

**Backend floor**: ``submit`` and ``schedule`` refuse a KFP backend older than :data:`MIN_BACKEND`
(2.17.0): before it, an artifact ``dsl.OneOf`` over ``dsl.If``/``dsl.Else`` resolves to the last
branch (kubeflow/pipelines#13436), so the default single-node run would fail at evaluate. The
version is the ``tag_name`` the API server's healthz answers (``kfp.Client``'s model drops that
field, so it is read from the raw answer); a server that reports none (``unknown``: a dev build)
gets a warning, not a refusal.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kfp
import kfp_server_api
import urllib3
import yaml
from google.protobuf import json_format

MIN_BACKEND = (2, 17, 0)
FINAL_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED", "ERROR"}
REGISTER_TASK = "register model"     # display names (rlhf.pipeline.stages / dag.REGISTER_CHALLENGER)
CHALLENGER_TASK = "register challenger"
EVALUATE_TASK = "evaluate"
PAGE_SIZE = 100


class KfpError(RuntimeError):
    """The KFP API refused a request or could not be reached (one line, with the status)."""


def load_pipeline_package(path: str | Path) -> dict[str, Any]:
    """The compiled YAML as the ``pipeline_spec`` of a run: ``{pipeline_spec, platform_spec}`` or the IR alone."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")) if d]
    if not docs or "pipelineInfo" not in docs[0]:
        raise KfpError(f"{path} is not a compiled KFP pipeline (no pipelineInfo)")
    platform: dict[str, Any] = {}
    for d in docs[1:]:
        platform.update(d)
    return {"pipeline_spec": docs[0], "platform_spec": platform} if platform else docs[0]


@contextlib.contextmanager
def package_file(pipeline_spec: dict[str, Any]) -> Iterator[Path]:
    """``pipeline_spec`` (as :func:`load_pipeline_package` returns it) as a package file for kfp.Client."""
    if "pipelineInfo" in pipeline_spec:
        docs = [pipeline_spec]
    else:
        docs = [pipeline_spec["pipeline_spec"]] + ([pipeline_spec["platform_spec"]]
                                                   if pipeline_spec.get("platform_spec") else [])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
        yield path


def spec_hash(pipeline_spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(pipeline_spec, sort_keys=True).encode()).hexdigest()[:16]


def kfp_cron(cron: str) -> str:
    """KFP's cron has a seconds field: a 5-field crontab gets ``0`` seconds prepended."""
    fields = cron.split()
    if len(fields) == 5:
        return "0 " + " ".join(fields)
    if len(fields) == 6:
        return " ".join(fields)
    raise KfpError(f"not a cron expression: {cron!r} (5 fields, or 6 with seconds first)")


def name_filter(name: str) -> str:
    """The API's ``filter`` (a JSON ``Filter`` proto) matching one display name."""
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "string_value": name}]})


def plain(value: Any) -> Any:
    """A kfp_server_api model as a plain dict: the API's snake_case fields, unset ones left out."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return value


class _TimedRest(kfp_server_api.rest.RESTClientObject):
    """The generated REST client, with a timeout for requests that bring none (kfp.Client's all)."""

    def __init__(self, configuration: kfp_server_api.Configuration, timeout: float):
        super().__init__(configuration)
        self.timeout = timeout

    def request(self, method, url, *args, _request_timeout=None, **kwargs):
        timeout = _request_timeout or (self.timeout, self.timeout)  # (connect, read)
        return super().request(method, url, *args, _request_timeout=timeout, **kwargs)


class _SdkClient(kfp.Client):
    """``kfp.Client`` that checks the health endpoint once, gives every request a timeout and does not
    retry a refused connection.

    On construction without a namespace kfp.Client asks ``/healthz`` whether KFP is multi-user,
    retrying an HTTP error 5 times 5 s apart and logging each traceback; here the first answer counts
    (the caller turns an error into one line). Its requests have no timeout (a server that accepts the
    connection and never answers hangs it); here each gets ``timeout`` s to connect and to read.
    urllib3 retries a failed connection 3 times, logging a warning each time; here a connection that
    cannot be made (wrong host or port) fails at once, while a broken read is still retried. A redirect
    is not followed but reported: an API endpoint that redirects sends a request without a valid token
    to a login page (Kubeflow's Dex), whose HTML kfp_server_api would read as an empty answer.
    """

    def __init__(self, *, timeout: float, **kwargs: Any):
        self._timeout = timeout
        with warnings.catch_warnings():  # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 ..."
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(**kwargs)
        api = self._run_api.api_client  # the one ApiClient behind all of kfp.Client's service APIs
        api.rest_client = _TimedRest(api.configuration, timeout)

    def _load_config(self, *args: Any, **kwargs: Any) -> kfp_server_api.Configuration:
        config = super()._load_config(*args, **kwargs)
        config.retries = urllib3.Retry(total=3, connect=0, redirect=0, raise_on_redirect=False,
                                       backoff_factor=0.5)
        return config

    def get_kfp_healthz(self, sleep_duration: int = 5) -> kfp_server_api.V2beta1GetHealthzResponse:
        return self._healthz_api.healthz_service_get_healthz(_request_timeout=(self._timeout, self._timeout))


class _KfpClientProgress(logging.Filter):
    """kfp.Client logs its progress on the root logger ("Creating experiment rlhf."): leave that out."""

    source = str(Path(kfp.client.client.__file__).parent)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.source)


@contextlib.contextmanager
def _quiet_sdk() -> Iterator[None]:
    """No prints (kfp.Client prints the links; submit echoes its own) and no progress logs from kfp.Client."""
    progress, root = _KfpClientProgress(), logging.getLogger()
    root.addFilter(progress)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(progress)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _api_message(body: Any) -> str:
    """The message of an error answer: google.rpc.Status JSON (``message``, older: ``error``) or text."""
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    body = (body or "").strip()
    try:
        doc = json.loads(body)
    except ValueError:
        return _short(body)
    if isinstance(doc, dict):
        return _short(str(doc.get("message") or doc.get("error") or ""))
    return _short(body)


def _unreachable_reason(e: Exception) -> str:
    reason = str(getattr(e, "reason", None) or e)
    # NewConnectionError("HTTPConnection(host=..., port=...): Failed to establish a new connection: ...")
    return _short(re.sub(r"^\S*Connection(Pool)?\([^)]*\): ", "", reason))


_STATUS_HINTS = {401: "set $KFP_TOKEN to a valid token for this endpoint",
                 403: "the token's user needs access to the namespace (--namespace)",
                 404: "check --host: the KFP API URL, e.g. https://<kubeflow host>/pipeline or "
                      "http://localhost:8080 for a port-forward of ml-pipeline-ui"}


@dataclass
class KfpClient:
    """The KFP endpoint ``host``: a :class:`kfp.Client` made on first use, its errors as :class:`KfpError`."""

    host: str
    token: str | None = field(default=None, repr=False)
    namespace: str | None = None
    timeout: float = 30.0
    _sdk: kfp.Client | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.host = self.host.rstrip("/")
        if self.token is None:
            self.token = os.environ.get("KFP_TOKEN") or None

    @property
    def sdk(self) -> kfp.Client:
        if self._sdk is None:
            self._sdk = self.call("connect (health check)", _SdkClient, host=self.host,
                                  existing_token=self.token, namespace=self.namespace, timeout=self.timeout)
        return self._sdk

    def call(self, action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a kfp.Client call; its failures become one-line :class:`KfpError`."""
        try:
            with _quiet_sdk():
                return fn(*args, **kwargs)
        except kfp_server_api.ApiException as e:
            if not e.status:  # no HTTP answer (TLS failure)
                raise KfpError(f"cannot reach the KFP API at {self.host} ({_short(str(e.reason))})") from None
            if 300 <= e.status < 400:
                where = (e.headers or {}).get("Location") or "?"
                raise KfpError(f"KFP API at {self.host}: {action}: HTTP {e.status}, redirected to "
                               f"{_short(where, 120)} (a login page? set $KFP_TOKEN to a valid token; "
                               f"else use that URL as --host)") from None
            hint = _STATUS_HINTS.get(e.status)
            message = _api_message(e.body) or e.reason
            raise KfpError(f"KFP API at {self.host}: {action}: HTTP {e.status} {message}"
                           + (f" ({hint})" if hint else "")) from None
        except urllib3.exceptions.HTTPError as e:
            raise KfpError(f"cannot reach the KFP API at {self.host} ({_unreachable_reason(e)})") from None
        except json_format.ParseError as e:
            raise KfpError(f"{action}: the pipeline package is not a valid KFP pipeline spec "
                           f"({_short(str(e))})") from None
        except ValueError as e:  # kfp.Client's own checks, e.g. two experiments of one name
            raise KfpError(f"KFP API at {self.host}: {action}: {_short(str(e))}") from None

    # -- experiments
    def ensure_experiment(self, name: str) -> str:
        exp = self.call(f"find or create experiment {name!r}", self.sdk.create_experiment, name,
                        description="RLHF pipeline runs", namespace=self.namespace)
        if not getattr(exp, "experiment_id", None):
            raise KfpError(f"{self.host} answered without an experiment id: is it the KFP API (not a login "
                           f"page)?")
        return exp.experiment_id

    # -- runs
    def create_run(self, *, display_name: str, pipeline_spec: dict, parameters: dict[str, Any],
                   experiment_id: str, service_account: str | None = None) -> dict:
        with package_file(pipeline_spec) as path:
            return plain(self.call("create run", self.sdk.run_pipeline, experiment_id=experiment_id,
                                   job_name=display_name, pipeline_package_path=str(path), params=parameters,
                                   service_account=service_account))

    def get_run(self, run_id: str) -> dict:
        return plain(self.call(f"get run {run_id}", self.sdk.get_run, run_id))

    def wait_run(self, run_id: str, *, poll_s: float = 30.0, timeout_s: float = 6 * 3600,
                 echo: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> dict:
        """Poll the run, printing run and task state changes, until it ends (or ``timeout_s``).

        (kfp.Client.wait_for_run_completion polls silently; this one streams the states.)
        """
        deadline, last_state, tasks = clock() + timeout_s, None, {}
        while True:
            run = self.get_run(run_id)
            state = run.get("state") or "PENDING"
            if state != last_state:
                echo(f"run {run_id}: {state}")
                last_state = state
            for t in (run.get("run_details") or {}).get("task_details") or []:
                name, ts = t.get("display_name") or t.get("task_id"), t.get("state")
                if name and ts and tasks.get(name) != ts and not name.startswith(("condition", "root")):
                    tasks[name] = ts
                    echo(f"  {name}: {ts}")
            if state in FINAL_STATES:
                return run
            if clock() > deadline:
                raise KfpError(f"run {run_id} did not finish within {timeout_s:.0f} s (still {state})")
            sleep(poll_s)

    # -- recurring runs
    def recurring_runs(self, experiment_id: str, name: str) -> list[dict]:
        """The recurring runs called ``name`` in the experiment (every page of the answer)."""
        found, token = [], ""
        while True:
            page = self.call("list recurring runs", self.sdk.list_recurring_runs, page_token=token,
                             page_size=PAGE_SIZE, experiment_id=experiment_id, filter=name_filter(name))
            found += [plain(r) for r in page.recurring_runs or [] if r.display_name == name]
            token = page.next_page_token or ""
            if not token:
                return found

    def create_recurring_run(self, *, experiment_id: str, name: str, description: str, cron: str,
                             pipeline_spec: dict, parameters: dict[str, Any],
                             service_account: str | None = None) -> dict:
        """An enabled cron recurring run, max concurrency 1, no catch-up."""
        with package_file(pipeline_spec) as path:
            return plain(self.call(
                "create recurring run", self.sdk.create_recurring_run, experiment_id=experiment_id,
                job_name=name, description=description, cron_expression=cron, max_concurrency=1,
                no_catchup=True, params=parameters, pipeline_package_path=str(path), enabled=True,
                service_account=service_account))

    def delete_recurring_run(self, recurring_run_id: str) -> None:
        self.call(f"delete recurring run {recurring_run_id}", self.sdk.delete_recurring_run,
                  recurring_run_id=recurring_run_id)


def gate_from_run(run: dict) -> tuple[str, str]:
    """("passed" | "failed" | "unknown", why) from a finished run's task states."""
    tasks = {(t.get("display_name") or ""): t.get("state") for t in
             (run.get("run_details") or {}).get("task_details") or []}

    def state_of(prefix: str) -> str | None:
        for name, st in tasks.items():
            if name.lower().startswith(prefix):
                return st
        return None

    challenger, reg, ev = state_of(CHALLENGER_TASK), state_of(REGISTER_TASK), state_of(EVALUATE_TASK)
    if challenger == "SUCCEEDED":
        return "failed", "the evaluation gate failed; the policy was registered as challenger only, champion unchanged"
    if reg == "SUCCEEDED":
        return "passed", "the evaluation gate passed; the policy was registered (champion per the gate)"
    if ev == "SUCCEEDED" and reg in (None, "SKIPPED"):
        return "failed", "the evaluation gate failed; nothing was registered, champion unchanged"
    if run.get("state") != "SUCCEEDED":
        return "unknown", f"the run ended {run.get('state')}; champion unchanged"
    return "unknown", "no evaluate/register task states in the run details"


def summary_markdown(run: dict, host: str, gate: tuple[str, str], parameters: dict[str, Any]) -> str:
    rid = run.get("run_id", "?")
    lines = [f"### RLHF pipeline run `{run.get('display_name', rid)}`", "",
             f"* state: **{run.get('state')}**", f"* gate: **{gate[0]}**: {gate[1]}",
             f"* run: {host.rstrip('/')}/#/runs/details/{rid}",
             f"* data revision: `{parameters.get('data_revision', '')}`, data hash: "
             f"`{parameters.get('data_hash', '')}`"]
    tasks = (run.get("run_details") or {}).get("task_details") or []
    shown = [t for t in tasks if not (t.get("display_name") or "").startswith(("condition", "root"))]
    if shown:
        lines += ["", "| step | state |", "|---|---|"]
        lines += [f"| {t.get('display_name')} | {t.get('state')} |" for t in shown]
    return "\n".join(lines) + "\n"


def compiled_spec(pipeline_file: str | Path | None, *, image: str | None = None,
                  gpu_image: str | None = None, params_yaml: str | None = None) -> dict[str, Any]:
    """The run's pipeline spec: a given compiled file, or the pipeline compiled now."""
    if pipeline_file:
        return load_pipeline_package(pipeline_file)
    from rlhf.pipeline import dag as rlhf_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = rlhf_pipeline.compile_pipeline(Path(tmp) / "pipeline.yaml", image=image, gpu_image=gpu_image,
                                              params_yaml=params_yaml)
        return load_pipeline_package(path)


def backend_version(client: KfpClient) -> str:
    """The KFP backend's version as its healthz reports it (``tag_name``: ``2.17.0``, ``unknown``...)."""
    def get() -> Any:
        answer = client.sdk._healthz_api.healthz_service_get_healthz(
            _preload_content=False, _request_timeout=(client.timeout, client.timeout))
        return json.loads(answer.data or b"{}")

    doc = client.call("health check (version)", get)
    return str((doc if isinstance(doc, dict) else {}).get("tag_name") or "unknown")


def check_backend(client: KfpClient, echo: Callable[[str], None] = print) -> str:
    """Refuse a backend older than :data:`MIN_BACKEND` (one :class:`KfpError` line); returns its version."""
    version = backend_version(client)
    floor = ".".join(map(str, MIN_BACKEND))
    m = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", version)
    if not m:
        echo(f"warning: the KFP backend at {client.host} reports version {version!r}; this pipeline needs "
             f"{floor} or newer (artifact dsl.OneOf over dsl.If/dsl.Else)")
        return version
    if tuple(int(x) for x in m.groups()) < MIN_BACKEND:
        raise KfpError(f"KFP backend at {client.host} is {version}; this pipeline needs {floor} or newer "
                       f"(before it, artifact dsl.OneOf over dsl.If/dsl.Else picks the wrong branch, "
                       f"kubeflow/pipelines#13436; see docs/deploy.md)")
    return version


def submit(client: KfpClient, *, pipeline_spec: dict, parameters: dict[str, Any], experiment: str,
           run_name: str, service_account: str | None = None, wait: bool = False, poll_s: float = 30.0,
           timeout_s: float = 6 * 3600, echo: Callable[[str], None] = print) -> dict:
    """Create a run in ``experiment`` (made if missing); with ``wait``, follow it to its end."""
    check_backend(client, echo)
    exp = client.ensure_experiment(experiment)
    run = client.create_run(display_name=run_name, pipeline_spec=pipeline_spec, parameters=parameters,
                            experiment_id=exp, service_account=service_account)
    echo(f"submitted run {run.get('run_id')} ({run_name}) in experiment {experiment}: "
         f"{client.host}/#/runs/details/{run.get('run_id')}")
    if wait:
        run = client.wait_run(run["run_id"], poll_s=poll_s, timeout_s=timeout_s, echo=echo)
    return run


def schedule(client: KfpClient, *, pipeline_spec: dict, parameters: dict[str, Any], experiment: str,
             name: str, cron: str, service_account: str | None = None,
             echo: Callable[[str], None] = print) -> tuple[str, dict]:
    """Create or update the recurring run ``name``; returns ("created" | "updated" | "unchanged", run)."""
    cron6 = kfp_cron(cron)
    check_backend(client, echo)
    exp = client.ensure_experiment(experiment)
    description = f"rlhf schedule; pipeline {spec_hash(pipeline_spec)}"
    if service_account:  # the server may fill in its default account, so the one asked for is kept here
        description += f"; service account {service_account}"
    existing = client.recurring_runs(exp, name)

    def same(r: dict) -> bool:
        return (((r.get("trigger") or {}).get("cron_schedule") or {}).get("cron") == cron6
                and r.get("description") == description
                and ((r.get("runtime_config") or {}).get("parameters") or {}) == parameters
                and str(r.get("max_concurrency")) == "1" and bool(r.get("no_catchup"))
                and r.get("mode", "ENABLE") == "ENABLE")

    if len(existing) == 1 and same(existing[0]):
        echo(f"recurring run {name} unchanged ({cron6}): {existing[0].get('recurring_run_id')}")
        return "unchanged", existing[0]
    created = client.create_recurring_run(experiment_id=exp, name=name, description=description, cron=cron6,
                                          pipeline_spec=pipeline_spec, parameters=parameters,
                                          service_account=service_account)
    for old in existing:
        client.delete_recurring_run(old["recurring_run_id"])
    action = "updated" if existing else "created"
    echo(f"recurring run {name} {action} ({cron6}, max concurrency 1, no catch-up): "
         f"{created.get('recurring_run_id')}")
    return action, created
