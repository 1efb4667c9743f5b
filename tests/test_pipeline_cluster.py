"""What a real Kubeflow cluster needs of the pipeline, checked with real KFP local runs and real MLflow.

* caching: prepare and validate have the same cache key in two runs with the same inputs (kfp.local's
  own cache, which keys on component, image, command, arguments and env as the backend does);
* the exit handler: a run whose training step is killed outright (SIGKILL: its MLflow run stays
  RUNNING) ends with that run and the parent closed FAILED by the exit task;
* the cluster doors default to params.yaml's ``cluster_profile:`` (the pretrained model), ``rlhf run``
  to ``profile:`` (tiny);
* a GPU step that sees no GPU stops in one line.
"""


import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml
from conftest import ROOT, run_cli

from rlhf.config.resolve import resolve_profile
from rlhf.errors import UserError

# ----------------------------------------------------------------------------- caching


def test_prepare_and_validate_hit_the_cache_on_a_second_run_with_the_same_inputs(demo_raw, tmp_path, monkeypatch):
    """kfp.local's cache keys on the task's arguments as compiled; the backend's driver first resolves the
    runtime placeholders ({{$.pipeline_job_uuid}} -> the run id: backend/src/v2/driver/resolve.go at 2.17.0)
    and keys on that (driver/cache.go, GenerateCacheKey). The key here resolves it per run the same way,
    so a per-run argument on prepare or validate makes the second run miss, as it would on a cluster."""
    from kfp import dsl, local
    from kfp.local.cache import LocalCache

    from rlhf.config.resolve import params_text
    from rlhf.pipeline import dag

    monkeypatch.setenv("RLHF_TRACKING", "off")
    monkeypatch.delenv("RLHF_LOCAL_RUN", raising=False)
    c = dag.build("registry.example/rlhf:1")
    params = params_text((ROOT / "params.yaml").read_text())

    @dsl.pipeline(name="rlhf-data-steps")
    def data_steps(raw_data: str, data_hash: str = "", data_revision: str = "", params_yaml: str = "{}",
                   profile: str = "", overrides: dict = {}):  # noqa: B006 - KFP takes the default as is
        dag.data_steps(c, SimpleNamespace(raw_data=raw_data, data_hash=data_hash, data_revision=data_revision,
                                          params_yaml=params_yaml, profile=profile, overrides=overrides))

    run = {"id": ""}
    compute_key = LocalCache.compute_key

    def backend_key(self, component_name, image, full_command, arguments, *args, **kwargs):
        resolved = {k: v.replace(dsl.PIPELINE_JOB_ID_PLACEHOLDER, run["id"]) if isinstance(v, str) else v
                    for k, v in arguments.items()}
        return compute_key(self, component_name, image, full_command, resolved, *args, **kwargs)

    monkeypatch.setattr(LocalCache, "compute_key", backend_key)
    cache = tmp_path / "cache"
    for i in range(2):  # two pipeline runs: two pipeline job ids, the same inputs
        run["id"] = f"run-{i}"
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / f"root-{i}"),
                   enable_caching=True, cache_root=str(cache), raise_on_error=True)
        data_steps(raw_data=str(demo_raw), params_yaml=params, profile="tiny")
        entries = sorted(p.name for p in cache.glob("*.json"))
        if i == 0:
            first = entries
            assert len(first) == 2, first  # prepare and validate
    assert entries == first, "the second run found both steps in the cache (no new key)"


# ----------------------------------------------------------------------------- exit handler


def _step_processes(root: Path, task: str) -> list[psutil.Process]:
    """The KFP executor process(es) of ``task`` in the run under ``root``."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(root) in cmd and "executor_main" in cmd and f"/{task}/" in cmd and p.pid != os.getpid():
            found.append(p)
    return found


def test_the_exit_handler_closes_the_runs_of_a_step_that_was_killed(demo_raw, tmp_path):
    from test_interrupts import _runs, _start

    proc, lines = _start(demo_raw, tmp_path)  # `rlhf run`, sft training
    steps = _step_processes(tmp_path, "sft")
    assert steps, "the sft step runs as a child process"
    for p in steps:  # killed outright: it cannot end its own MLflow run (an OOM kill on a cluster)
        p.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=300)
    time.sleep(0.5)
    out = "".join(lines)
    assert rc != 0, out
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("interrupts")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    status = {n: r.info.status for n, r in runs.items()}
    assert status.get("sft") == "FAILED", (status, out)  # closed by the exit task, not left RUNNING
    parent = next(r for n, r in runs.items() if n.startswith("pipeline"))
    assert parent.info.status == "FAILED" and parent.data.tags["pipeline_state"] == "FAILED", status
    assert "RUNNING" not in _runs(tmp_path).values()
    logs = next((tmp_path / "runs").glob("*/logs"))
    assert any("[finalize] closed" in f.read_text() for f in logs.glob("finalize*.log")), sorted(logs.iterdir())


def test_finalize_changes_nothing_after_a_successful_run(tmp_path, monkeypatch):
    from rlhf.pipeline import finalize

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("RLHF_TRACKING", raising=False)
    assert finalize.finalize("run-1", "SUCCEEDED", num_nodes=4) == {"state": "SUCCEEDED", "closed_runs": [],
                                                                     "deleted_jobs": []}


# ----------------------------------------------------------------------------- defaults


def test_cluster_doors_default_to_the_pretrained_profile_and_rlhf_run_to_tiny(monkeypatch):
    from rlhf.mlops import retrain
    from rlhf.pipeline import dag, remote

    monkeypatch.delenv("RLHF_PROFILE", raising=False)
    monkeypatch.chdir(ROOT)
    params = ROOT / "params.yaml"
    assert resolve_profile(None, params) == "tiny"  # rlhf run, dvc repro, the stage commands
    assert resolve_profile(None, params, cluster=True) == "smollm2"
    # rlhf submit / schedule / retrain --host send the cluster profile explicitly ...
    values = remote.run_parameters(params, None, {"accelerator_limit": 2}, None, "abc", None)
    assert values["profile"] == "smollm2"
    assert values["accelerator_limit"] == "2", "a number for a string parameter is sent as a string"
    assert retrain.run_config(params, cluster=True)[0] == "smollm2" and retrain.run_config(params)[0] == "tiny"
    # ... and rlhf compile (a run started from the KFP UI with the defaults) compiles it in
    defaults = {q.name: q.default for q in dag.parameters(params_yaml=(params.read_text()))}
    assert defaults["profile"] == "smollm2"
    # an explicit choice wins everywhere
    monkeypatch.setenv("RLHF_PROFILE", "tiny")
    assert resolve_profile(None, params, cluster=True) == "tiny"
    assert remote.run_parameters(params, "none", None, None, "abc", None)["profile"] == "none"


def test_compile_writes_the_cluster_defaults(tmp_path):
    out = tmp_path / "p.yaml"
    env = {k: "" for k in ("RLHF_PROFILE",)}
    res = run_cli("compile", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    params = next(yaml.safe_load_all(out.read_text()))["root"]["inputDefinitions"]["parameters"]
    assert params["profile"]["defaultValue"] == "smollm2"


# ----------------------------------------------------------------------------- GPU steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_step_without_a_gpu_stops_in_one_line(monkeypatch):
    from rlhf.pipeline import steps

    monkeypatch.setenv(steps.DEVICE_ENV, "cuda")
    with pytest.raises(UserError) as err:
        steps.check_device("sft")
    line = err.value.one_line()
    assert "sft is a GPU step (RLHF_DEVICE=cuda) but this pod sees no CUDA device" in line and "\n" not in line
    assert steps.check_device("prepare") == {}  # CPU steps do not care
    monkeypatch.delenv(steps.DEVICE_ENV)
    assert steps.check_device("sft") == {}  # rlhf run: the laptop trains on what it has


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_step_with_a_gpu_trains_on_it(monkeypatch):
    from rlhf.pipeline import steps

    monkeypatch.setenv(steps.DEVICE_ENV, "cuda")
    assert steps.check_device("ppo") == {"model": {"device": "cuda"}}


# ----------------------------------------------------------------------------- Trainer jobs of a failed run


class _KubeApiServer(BaseHTTPRequestHandler):
    """The Kubernetes API on 127.0.0.1 as far as the clean-up sees it: TrainJobs of a run by label; no
    PyTorchJob CRD (404). Records every request."""

    requests: list = []

    def _send(self, code: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        type(self).requests.append(("GET", self.path))
        if self.path.startswith("/apis/trainer.kubeflow.org/v1alpha1/namespaces/rlhf/trainjobs?"):
            job = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob"}
            self._send(200, {"kind": "TrainJobList", "apiVersion": "trainer.kubeflow.org/v1alpha1", "items": [
                {**job, "metadata": {"name": "rlhf-sft-run42-aaaaaa"}, "status": {"conditions": [
                    {"type": "Complete", "status": "True", "reason": "JobSetCompleted"}]}},
                {**job, "metadata": {"name": "rlhf-reward-run42-bbbbbb"}, "status": {"conditions": [
                    {"type": "Created", "status": "True", "reason": "JobSetCreated"}]}}]})
        else:
            self._send(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404})

    def do_DELETE(self):  # noqa: N802
        type(self).requests.append(("DELETE", self.path))
        self._send(200, {"kind": "Status", "status": "Success"})

    def log_message(self, *args):
        pass


def test_a_failed_run_deletes_the_trainer_jobs_it_left_running():
    from kubernetes import client

    from rlhf.pipeline import finalize, multinode

    server = ThreadingHTTPServer(("127.0.0.1", 0), _KubeApiServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _KubeApiServer.requests = []
    try:
        api = multinode.KubeApi(client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{server.server_port}")))
        done = finalize.finalize("Run42", "FAILED", "Task sft failed.", num_nodes=2, namespace="rlhf", api=api)
    finally:
        server.shutdown()
    assert done["deleted_jobs"] == ["rlhf-reward-run42-bbbbbb"], done  # the succeeded job stays (its output)
    gets = [p for m, p in _KubeApiServer.requests if m == "GET"]
    assert all("labelSelector=rlhf.io%2Fpipeline-run%3Drun42" in p for p in gets), gets
    deletes = [p for m, p in _KubeApiServer.requests if m == "DELETE"]
    assert len(deletes) == 1 and deletes[0].startswith(
        "/apis/trainer.kubeflow.org/v1alpha1/namespaces/rlhf/trainjobs/rlhf-reward-run42-bbbbbb")



# ----------------------------------------------------------------------------- a gated-out candidate


def test_a_candidate_that_fails_the_gate_is_registered_as_challenger_only(demo_raw, tmp_path):
    """`rlhf run` (the same DAG as the cluster's) with a gate no policy can pass: the register step of the
    gate-failed branch records the candidate, alias challenger only, and champion stays unset."""
    import mlflow
    from conftest import quick_params

    params = quick_params(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "gated-out",
           "RLHF_CACHE": str(tmp_path / ".cache"), "RLHF_PROFILE": "", "RLHF_DATA_HASH": "",
           "RLHF_PARENT_RUN_ID": "", "RLHF_PIPELINE_RUN_ID": "", "KFP_RUN_ID": "", "OMP_NUM_THREADS": "1"}
    res = run_cli("run", "--raw", str(demo_raw), "--params", str(params), "--runs-dir", str(tmp_path / "runs"),
                  "-p", "ppo_total_steps=1", "--set", "evaluate.gate_margin=100", cwd=tmp_path, env=env,
                  timeout=900)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    assert "gate      FAILED" in out and "register  finished" in out
    assert "registry  rlhf-policy v1 (challenger): gate failed" in out, out
    client = mlflow.MlflowClient(uri)
    model = client.get_registered_model("rlhf-policy")
    assert {k: int(v) for k, v in model.aliases.items()} == {"challenger": 1}, "champion moves only on a pass"
    tags = client.get_model_version("rlhf-policy", "1").tags
    assert (tags["gate_passed"], tags["gate_decision"]) == ("false", "failed")
    assert tags["gate_reason"] and tags["not_promoted_reason"].startswith("gate failed")
