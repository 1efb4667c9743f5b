"""Compile, submit and schedule the pipeline: a small client of the KFP v2beta1 REST API.

Endpoints used (and implemented by the contract test's fake server):

    GET  /apis/v2beta1/experiments?filter=...            find the experiment by name
    POST /apis/v2beta1/experiments                       create it
    POST /apis/v2beta1/runs                              submit a run (inline pipeline spec)
    GET  /apis/v2beta1/runs/{run_id}                     follow it (--wait)
    GET  /apis/v2beta1/recurringruns?experiment_id=...   find our schedule
    POST /apis/v2beta1/recurringruns                     create it
    DELETE /apis/v2beta1/recurringruns/{id}              replace a changed one

Authentication: ``Authorization: Bearer $KFP_TOKEN`` when the variable is set (multi-user
Kubeflow behind its ingress); standalone KFP needs none.

``schedule`` is idempotent: the recurring run is found by name in the experiment; if its cron,
parameters and pipeline (a hash in its description) are unchanged nothing happens, otherwise a new
one is created and the old one(s) deleted, so exactly one remains. Max concurrency 1, no catch-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

API = "/apis/v2beta1"
FINAL_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED", "ERROR"}
REGISTER_TASK = "register"
EVALUATE_TASK = "evaluate"


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
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "string_value": name}]})


@dataclass
class KfpClient:
    host: str
    token: str | None = None
    namespace: str | None = None
    timeout: float = 30.0

    def __post_init__(self):
        self.host = self.host.rstrip("/")
        if self.token is None:
            self.token = os.environ.get("KFP_TOKEN") or None

    # -- transport
    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> dict:
        url = self.host + path
        q = {k: v for k, v in (query or {}).items() if v not in (None, "")}
        if q:
            url += "?" + urllib.parse.urlencode(q)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read().decode() or "{}"
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            with_msg = ""
            try:
                with_msg = json.loads(detail).get("message") or json.loads(detail).get("error") or ""
            except ValueError:
                with_msg = detail.strip()
            raise KfpError(f"{method} {path}: HTTP {e.code} {with_msg}".rstrip()) from None
        except (urllib.error.URLError, OSError) as e:
            raise KfpError(f"cannot reach the KFP API at {self.host} ({getattr(e, 'reason', e)})") from None
        return json.loads(text)

    def _paged(self, path: str, key: str, query: dict[str, Any]) -> list[dict]:
        items, token = [], ""
        camel = "".join(w.capitalize() if i else w for i, w in enumerate(key.split("_")))
        while True:
            page = self.request("GET", path, query={**query, "page_size": 100, "page_token": token})
            items += page.get(key) or page.get(camel) or []
            token = page.get("next_page_token") or page.get("nextPageToken") or ""
            if not token:
                return items

    # -- experiments
    def ensure_experiment(self, name: str) -> str:
        found = [e for e in self._paged(f"{API}/experiments", "experiments",
                                        {"filter": name_filter(name), "namespace": self.namespace})
                 if e.get("display_name") == name]
        if found:
            return found[0]["experiment_id"]
        body = {"display_name": name, "description": "RLHF pipeline runs"}
        if self.namespace:
            body["namespace"] = self.namespace
        return self.request("POST", f"{API}/experiments", body)["experiment_id"]

    # -- runs
    def create_run(self, *, display_name: str, pipeline_spec: dict, parameters: dict[str, Any],
                   experiment_id: str, service_account: str | None = None, description: str = "") -> dict:
        body: dict[str, Any] = {"display_name": display_name, "description": description,
                                "experiment_id": experiment_id, "pipeline_spec": pipeline_spec,
                                "runtime_config": {"parameters": parameters}}
        if service_account:
            body["service_account"] = service_account
        return self.request("POST", f"{API}/runs", body)

    def get_run(self, run_id: str) -> dict:
        return self.request("GET", f"{API}/runs/{run_id}")

    def wait_run(self, run_id: str, *, poll_s: float = 30.0, timeout_s: float = 6 * 3600,
                 echo: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> dict:
        """Poll the run, printing run and task state changes, until it ends (or ``timeout_s``)."""
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
        return [r for r in self._paged(f"{API}/recurringruns", "recurring_runs",
                                       {"experiment_id": experiment_id, "filter": name_filter(name),
                                        "namespace": self.namespace})
                if r.get("display_name") == name]

    def create_recurring_run(self, body: dict[str, Any]) -> dict:
        return self.request("POST", f"{API}/recurringruns", body)

    def delete_recurring_run(self, recurring_run_id: str) -> None:
        self.request("DELETE", f"{API}/recurringruns/{recurring_run_id}")


def gate_from_run(run: dict) -> tuple[str, str]:
    """("passed" | "failed" | "unknown", why) from a finished run's task states."""
    tasks = {(t.get("display_name") or ""): t.get("state") for t in
             (run.get("run_details") or {}).get("task_details") or []}

    def state_of(prefix: str) -> str | None:
        for name, st in tasks.items():
            if name.lower().startswith(prefix):
                return st
        return None

    reg, ev = state_of(REGISTER_TASK), state_of(EVALUATE_TASK)
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


def submit(client: KfpClient, *, pipeline_spec: dict, parameters: dict[str, Any], experiment: str,
           run_name: str, service_account: str | None = None, wait: bool = False, poll_s: float = 30.0,
           timeout_s: float = 6 * 3600, echo: Callable[[str], None] = print) -> dict:
    exp = client.ensure_experiment(experiment)
    run = client.create_run(display_name=run_name, pipeline_spec=pipeline_spec, parameters=parameters,
                            experiment_id=exp, service_account=service_account,
                            description=f"submitted by rlhf submit; data revision "
                                        f"{parameters.get('data_revision', '')}")
    echo(f"submitted run {run.get('run_id')} ({run_name}) in experiment {experiment}: "
         f"{client.host}/#/runs/details/{run.get('run_id')}")
    if wait:
        run = client.wait_run(run["run_id"], poll_s=poll_s, timeout_s=timeout_s, echo=echo)
    return run


def schedule(client: KfpClient, *, pipeline_spec: dict, parameters: dict[str, Any], experiment: str,
             name: str, cron: str, service_account: str | None = None,
             echo: Callable[[str], None] = print) -> tuple[str, dict]:
    """Create or update the recurring run ``name``; returns ("created" | "updated" | "unchanged", run)."""
    exp = client.ensure_experiment(experiment)
    cron6 = kfp_cron(cron)
    description = f"rlhf schedule; pipeline {spec_hash(pipeline_spec)}"
    body: dict[str, Any] = {
        "display_name": name, "description": description, "experiment_id": exp,
        "pipeline_spec": pipeline_spec, "runtime_config": {"parameters": parameters},
        "trigger": {"cron_schedule": {"cron": cron6}}, "max_concurrency": "1", "no_catchup": True,
        "mode": "ENABLE"}
    if service_account:
        body["service_account"] = service_account
    if client.namespace:
        body["namespace"] = client.namespace
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
    created = client.create_recurring_run(body)
    for old in existing:
        client.delete_recurring_run(old["recurring_run_id"])
    action = "updated" if existing else "created"
    echo(f"recurring run {name} {action} ({cron6}, max concurrency 1, no catch-up): "
         f"{created.get('recurring_run_id')}")
    return action, created
