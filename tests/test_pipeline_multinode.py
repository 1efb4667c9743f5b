"""Multi-node training from a pipeline step: the Trainer job specs it builds, the wait loop, the job entry point.

No cluster here: every job the builders make is validated strictly against the CRDs vendored in
k8s/crds/ (Kubeflow Trainer v2.3 TrainJob, Training Operator v1.9 PyTorchJob; unknown fields are
errors, see tests/crd_schemas.py) and compared with the repository's templates in k8s/. The pod a
TrainJob gets (the runtime's pod template with the job's trainer fields and runtime patch applied, as
the Trainer merges them) and the PyTorchJob pod templates pass `kubernetes-validate --strict`. The
launcher's wait loop runs against a fake API object; ``KubeApi`` (the real ``kubernetes`` client)
against a local HTTP server that records the requests.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import crd_schemas
import pytest
import yaml
from conftest import ROOT

from rlhf.data import remote
from rlhf.pipeline import jobs, steps
from rlhf.pipeline import multinode as mn

GPU_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def load(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def spec_kwargs(**kw):
    base = dict(name=mn.job_name("ppo", "5f2c1d0e-aaaa-bbbb"), namespace="rlhf", stage="ppo",
                image="ghcr.io/rlhf-project/rlhf:0.1.0-cuda", num_nodes=3, gpus_per_node=8,
                scratch_url="s3://dvc/runs/abc/ppo", cpu="16", memory="128Gi", node_selector=GPU_SELECTOR,
                tolerations=[GPU_TOLERATION])
    base.update(kw)
    return base


def node_pod(job: dict, runtime: dict) -> tuple[dict, dict]:
    """(metadata, spec) of the pod the Trainer v2.3 makes for the ``node`` job from ``runtime`` and ``job``.

    As pkg/runtime/core/trainingruntime.go and the torch plugin do it: each runtime patch is a strategic
    merge into the JobSet spec (labels and nodeSelector maps merge, serviceAccountName and tolerations are
    replaced); ``resourcesPerNode`` merges key by key into the ``node`` container's resources;
    image/command/args replace, env is upserted by name after the runtime's.
    """
    rjobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    (rjob,) = [r for r in rjobs if r["name"] == mn.TRAINER_NODE]
    tpl = copy.deepcopy(rjob["template"]["spec"]["template"])
    meta, pod = tpl.setdefault("metadata", {}), tpl["spec"]
    for patch in job["spec"].get("runtimePatches", []):
        for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if rj["name"] != mn.TRAINER_NODE:
                continue
            ptpl = rj["template"]["spec"]["template"]
            meta.setdefault("labels", {}).update(ptpl.get("metadata", {}).get("labels", {}))
            for k, v in ptpl.get("spec", {}).items():
                pod[k] = {**pod.get(k, {}), **v} if k == "nodeSelector" else v
    trainer = job["spec"]["trainer"]
    (c,) = [c for c in pod["containers"] if c["name"] == mn.TRAINER_NODE]
    for k in ("image", "command", "args"):
        if k in trainer:
            c[k] = trainer[k]
    env = {e["name"]: e for e in c.get("env", [])}
    env.update({e["name"]: e for e in trainer.get("env", [])})
    c["env"] = list(env.values())
    res = c.setdefault("resources", {})
    for part, values in trainer.get("resourcesPerNode", {}).items():
        res[part] = {**res.get(part, {}), **values}
    return meta, pod


def test_job_names_are_rfc1035_labels():
    for stage, rid in (("ppo", "5f2c1d0e-aaaa-bbbb-cccc"), ("reward", ""), ("sft", "X" * 80)):
        name = mn.job_name(stage, rid)
        assert NAME.match(name) and len(name) <= 63, name
    assert mn.job_name("sft", "r") != mn.job_name("sft", "r")


@pytest.mark.parametrize("variant", [
    {},
    {"gpus_per_node": 0, "node_selector": {}, "tolerations": [], "active_deadline_s": 600},
    {"stage": "sft", "num_nodes": 2, "gpus_per_node": 4, "accelerator_type": "amd.com/gpu",
     "env": {"RLHF_LOG_LEVEL": "DEBUG"}},
])
def test_every_trainjob_we_build_passes_the_trainer_crd(variant, monkeypatch):
    monkeypatch.setenv("KFP_RUN_ID", "5f2c1d0e")
    job = mn.build_trainjob(**spec_kwargs(**variant))
    assert crd_schemas.violations(job) == []


def test_trainjob_reaches_the_pods_through_trainer_and_runtime_patches(monkeypatch):
    monkeypatch.setenv("KFP_RUN_ID", "5f2c1d0e")
    monkeypatch.setenv("RLHF_S3_SECRET_ACCESS_KEY", "must-not-leak")
    job = mn.build_trainjob(**spec_kwargs(active_deadline_s=3600))
    runtime = load("k8s/components/trainer-runtime/trainingruntime.yaml")
    assert job["spec"]["runtimeRef"] == {"name": runtime["metadata"]["name"],
                                         "apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime"}
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 8
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == mn.PATCH_MANAGER
    meta, pod = node_pod(job, runtime)
    # scheduling: exactly the pipeline's selector and tolerations (the runtime adds no selector of its own)
    assert pod["nodeSelector"] == GPU_SELECTOR and pod["tolerations"] == [GPU_TOLERATION]
    assert pod["serviceAccountName"] == "rlhf-pipeline"
    # labels the NetworkPolicies and dashboards select on
    wanted = {"rlhf.io/pipeline-pod": "true", "app.kubernetes.io/name": "rlhf-ppo", "rlhf.io/stage": "ppo"}
    assert wanted.items() <= meta["labels"].items()
    assert meta["labels"] == job["metadata"]["labels"] | {"rlhf.io/pipeline-pod": "true"}
    (c,) = pod["containers"]
    assert c["resources"] == {"requests": {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "8"},
                              "limits": {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "8"}}, \
        "every key of the runtime's resources is overridden by the job"
    cmd = c["command"] + c["args"]
    assert cmd[:6] == ["python", "-m", "rlhf.pipeline.jobs", "job", "--stage", "ppo"]
    for flag in ("--nnodes", "--nproc-per-node", "--node-rank", "--master-addr", "--master-port"):
        assert any(a.startswith(flag + "=$(PET_") for a in cmd), flag  # set by the Trainer on every node
    # env: ConfigMap/Secret by reference (keys and the runtime's envFrom), lineage forwarded, no values
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "rlhf-config"
    assert env["RLHF_S3_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "rlhf-s3-pipeline",
                                                                             "key": "RLHF_S3_SECRET_ACCESS_KEY"}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "rlhf-mlflow-pipeline",
                                                                            "key": "MLFLOW_TRACKING_PASSWORD"}
    assert {"configMapRef": {"name": "rlhf-config"}} in c["envFrom"]
    assert env["KFP_RUN_ID"]["value"] == "5f2c1d0e" and env["HOME"]["value"] == "/tmp"
    assert not set(env) & set(mn.TORCH_RESERVED_ENV)
    assert "must-not-leak" not in json.dumps(job)
    assert NAME.match(job["metadata"]["name"]) and job["metadata"]["namespace"] == "rlhf"


def test_cpu_only_or_other_accelerator_jobs_inherit_no_gpu_from_the_runtime():
    from kubernetes.utils import parse_quantity

    runtime = load("k8s/components/trainer-runtime/trainingruntime.yaml")
    for kw, accel in (({"gpus_per_node": 0}, None), ({"accelerator_type": "amd.com/gpu"}, "amd.com/gpu"),
                      ({"cpu": "2", "memory": "8Gi"}, "nvidia.com/gpu")):
        job = mn.build_trainjob(**spec_kwargs(**kw))
        _, pod = node_pod(job, runtime)
        res = pod["containers"][0]["resources"]
        gpu_keys = {k for part in res.values() for k in part if "gpu" in k}
        assert gpu_keys == ({accel} if accel else set()), (kw, res)
        for k, v in res["requests"].items():  # the API server rejects a request above its limit
            assert parse_quantity(v) <= parse_quantity(res["limits"].get(k, v)), (kw, k, res)
        assert job["spec"]["trainer"]["numProcPerNode"] == max(kw.get("gpus_per_node", 8), 1)


def test_trainjob_template_is_what_the_builder_makes():
    template = load("k8s/jobs/trainjob-ppo.yaml")
    tpl = template["spec"]["trainer"]
    gpus = int(tpl["resourcesPerNode"]["limits"]["nvidia.com/gpu"])
    req = tpl["resourcesPerNode"]["requests"]
    job = mn.build_trainjob(**spec_kwargs(name=template["metadata"]["name"], num_nodes=tpl["numNodes"],
                                          gpus_per_node=gpus, cpu=req["cpu"], memory=req["memory"],
                                          image=tpl["image"],
                                          active_deadline_s=template["spec"]["activeDeadlineSeconds"]))
    assert crd_schemas.violations(template) == []
    assert (job["apiVersion"], job["kind"]) == (template["apiVersion"], template["kind"])
    for key in ("runtimeRef", "runtimePatches", "activeDeadlineSeconds"):
        assert job["spec"][key] == template["spec"][key], key
    trainer = job["spec"]["trainer"]
    for key in ("image", "command", "numNodes", "numProcPerNode", "resourcesPerNode"):
        assert trainer[key] == tpl[key], key
    assert tpl["args"][:3] == trainer["args"][:3]
    assert tpl["args"][tpl["args"].index("--"):] == trainer["args"][trainer["args"].index("--"):]
    assert template["metadata"]["labels"].items() <= job["metadata"]["labels"].items()


def test_trainjob_env_the_trainer_reserves_is_refused():
    with pytest.raises(ValueError, match="PET_NNODES"):
        mn.build_trainjob(**spec_kwargs(env={"PET_NNODES": "4"}))


def test_pytorchjob_matches_the_crd_and_the_repository_template():
    job = mn.build_pytorchjob(**spec_kwargs(active_deadline_s=3600))
    template = load("k8s/jobs/pytorchjob-ppo.yaml")
    assert crd_schemas.violations(job) == [] and crd_schemas.violations(template) == []
    assert (job["apiVersion"], job["kind"]) == (template["apiVersion"], template["kind"])
    assert set(job["spec"]) == set(template["spec"]) == {"runPolicy", "pytorchReplicaSpecs"}
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 3600
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for rtype, r in replicas.items():
        assert r["restartPolicy"] == "Never"
        pod = r["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch", "the training operator requires this container name"
        cmd = c["command"] + c["args"]
        assert "--nnodes=3" in cmd and "--nproc-per-node=8" in cmd and "--node-rank=$(RANK)" in cmd
        assert "--master-addr=$(MASTER_ADDR)" in cmd and "--master-port=$(MASTER_PORT)" in cmd
        assert pod["nodeSelector"] == GPU_SELECTOR and GPU_TOLERATION in pod["tolerations"]
        assert pod["serviceAccountName"] == "rlhf-pipeline"
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        tpl_pod = template["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]
        tpl_c = tpl_pod["containers"][0]
        tpl_env = {e["name"]: e.get("value") for e in tpl_c["env"]}
        assert (tpl_c["command"], tpl_c["args"][:3]) == (c["command"], c["args"][:3]), "same entry point"
        flags = [a.replace("$(RLHF_NUM_NODES)", "3").replace("$(RLHF_NPROC_PER_NODE)", "8")
                 for a in tpl_c["args"][tpl_c["args"].index("--"):]]
        assert flags == c["args"][c["args"].index("--"):], "same torchrun flags"
        assert {"RLHF_NUM_NODES", "RLHF_NPROC_PER_NODE"} <= set(tpl_env)
        assert pod["securityContext"] == tpl_pod["securityContext"]
        assert c["securityContext"] == tpl_pod["containers"][0]["securityContext"]


@pytest.mark.skipif(not (Path(sys.executable).parent / "kubernetes-validate").exists(),
                    reason="kubernetes-validate (the k8s extra) is not installed")
def test_job_pods_pass_strict_kubernetes_validation(tmp_path):
    pj = mn.build_pytorchjob(**spec_kwargs())
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"pytorchjob-{k.lower()}"},
             "spec": r["template"]["spec"]} for k, r in pj["spec"]["pytorchReplicaSpecs"].items()]
    runtime = load("k8s/components/trainer-runtime/trainingruntime.yaml")
    for i, kw in enumerate(({}, {"gpus_per_node": 0, "node_selector": {}, "tolerations": []})):
        meta, spec = node_pod(mn.build_trainjob(**spec_kwargs(**kw)), runtime)
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": {**meta, "name": f"trainjob-node-{i}"},
                     "spec": spec})
    f = tmp_path / "pods.yaml"
    f.write_text(yaml.safe_dump_all(pods))
    res = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "-k", "1.37.0",
                          str(f)], capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "ERROR" not in out and "WARN" not in out, out


def test_single_node_or_bad_kind_is_refused():
    with pytest.raises(ValueError, match="num_nodes >= 2"):
        mn.build_trainjob(**spec_kwargs(num_nodes=1))
    with pytest.raises(ValueError, match="TrainJob or PyTorchJob"):
        mn.build_job("MPIJob", **spec_kwargs())


class FakeApi:
    """Kubernetes as far as the launcher sees it: the job goes through ``states``, one per poll.

    A state may also be an exception (raised by ``get``) or a callable (called by ``get``: a signal, say).
    """

    def __init__(self, states, on_create=None):
        self.states, self.created, self.deleted, self.polls, self.on_create = list(states), [], [], 0, on_create

    def create(self, obj):
        self.created.append(obj)
        if self.on_create:
            self.on_create(obj)

    def _state(self, i):
        return self.states[min(i, len(self.states) - 1)]

    def get(self, kind, ns, name):
        st = self._state(self.polls)
        self.polls += 1
        if isinstance(st, BaseException):
            raise st
        if callable(st):
            st()
            st = "running"
        conds = {"running": [{"type": "Created", "status": "True", "reason": "JobSetCreated"}],
                 "done": [{"type": "Created", "status": "True", "reason": "JobSetCreated"},
                          {"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "ok"}],
                 "failed": [{"type": "Failed", "status": "True", "reason": "JobSetFailed", "message": "node-1 OOM"}]}
        return {**self.created[-1], "status": {"conditions": conds[st]}}

    def pods(self, ns, selector):
        st = self._state(self.polls - 1)
        phase = {"done": "Succeeded", "failed": "Failed"}.get(st if isinstance(st, str) else "", "Running")
        return [{"name": "job-node-0-0", "phase": phase, "reason": ""}]

    def logs(self, ns, pod, tail=40):
        return "RuntimeError: CUDA out of memory"

    def delete(self, kind, ns, name):
        self.deleted.append(name)


def test_wait_streams_status_and_succeeds():
    lines = []
    job = mn.build_trainjob(**spec_kwargs())
    api = FakeApi(["running", "running", "done"])
    mn.launch_and_wait(job, api, poll_s=0, echo=lines.append)
    text = "\n".join(lines)
    assert "created TrainJob" in text and "Created=True JobSetCreated" in text
    assert "pod job-node-0-0: Running" in text and "Complete=True" in text and text.endswith("succeeded")
    assert api.deleted == [], "a succeeded job is left to the Trainer"


def test_wait_fails_the_step_and_deletes_the_job_when_it_fails_or_times_out():
    lines = []
    api = FakeApi(["running", "failed"])
    with pytest.raises(mn.JobFailed, match="failed: JobSetFailed: node-1 OOM"):
        mn.launch_and_wait(mn.build_trainjob(**spec_kwargs()), api, poll_s=0, echo=lines.append)
    assert any("CUDA out of memory" in line for line in lines), "the failed pod's last lines are shown"
    assert api.deleted == [api.created[0]["metadata"]["name"]], "a failed job is deleted (no pod keeps a GPU)"
    first = {word: next(i for i, x in enumerate(lines) if word in x) for word in ("CUDA", "deleted")}
    assert first["CUDA"] < first["deleted"], "logs are read before the pods go"
    api, t = FakeApi(["running"]), [0.0]
    with pytest.raises(mn.JobFailed, match="did not finish within 10 s"):
        mn.launch_and_wait(mn.build_pytorchjob(**spec_kwargs()), api, poll_s=4, timeout_s=10, echo=lambda s: None,
                           clock=lambda: t[0], sleep=lambda s: t.__setitem__(0, t[0] + s))
    assert api.deleted, "a timed-out job is deleted"
    assert mn.job_state({"kind": "PyTorchJob", "status": {"conditions": [
        {"type": "Succeeded", "status": "True"}]}})[0] == "Succeeded"


def test_a_stopped_launcher_deletes_its_job():
    """SIGTERM (KFP/Kubernetes stopping the launcher pod), Ctrl-C or an API error: no orphaned job."""
    received = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))  # pytest survives
    try:
        api, t = FakeApi(["running", lambda: os.kill(os.getpid(), signal.SIGTERM), "running"]), [0.0]
        with pytest.raises(mn.JobFailed, match="launcher got SIGTERM"):
            mn.launch_and_wait(mn.build_trainjob(**spec_kwargs()), api, poll_s=1, timeout_s=5,
                               echo=lambda s: None, clock=lambda: t[0],
                               sleep=lambda s: t.__setitem__(0, t[0] + s))
        assert api.deleted == [api.created[0]["metadata"]["name"]] and not received
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM], "the previous SIGTERM handler is back"
    finally:
        signal.signal(signal.SIGTERM, original)

    for exc in (KeyboardInterrupt(), RuntimeError("apiserver: 500 Internal Server Error")):
        api = FakeApi(["running", exc])
        with pytest.raises(type(exc)):
            mn.launch_and_wait(mn.build_trainjob(**spec_kwargs()), api, poll_s=0, echo=lambda s: None)
        assert len(api.deleted) == 1, exc

    class Gone(Exception):
        status = 404

    class Undeletable(FakeApi):
        def delete(self, kind, ns, name):
            raise RuntimeError("forbidden")

    lines = []
    api = Undeletable(["running", Gone()])
    with pytest.raises(mn.JobFailed, match="disappeared"):  # the wait's reason stays the error
        mn.launch_and_wait(mn.build_trainjob(**spec_kwargs()), api, poll_s=0, echo=lines.append)
    assert "could not delete TrainJob" in lines[-1]
    assert "kubectl delete trainjobs.trainer.kubeflow.org -n rlhf" in lines[-1], "how to clean up by hand"


class _Recorder(BaseHTTPRequestHandler):
    """A stand-in API server on 127.0.0.1 that records each request and answers with a minimal object."""

    requests: list = []

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        type(self).requests.append((self.command, self.path, body))
        if self.path.endswith("/log?tailLines=40"):
            payload, ctype = b"last line", "text/plain"
        elif "/pods" in self.path:
            payload, ctype = json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
                {"metadata": {"name": "p-0"}, "status": {"phase": "Running"}}]}).encode(), "application/json"
        else:
            payload, ctype = json.dumps(body or {"kind": "TrainJob", "metadata": {"name": "j"}}).encode(), \
                "application/json"
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args):
        pass


def test_kube_api_speaks_the_kubernetes_api_through_the_official_client():
    from kubernetes import client

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.requests = []
    try:
        cfg = client.Configuration(host=f"http://127.0.0.1:{server.server_port}")
        api = mn.KubeApi(client.ApiClient(cfg))
        job = mn.build_trainjob(**spec_kwargs(name="rlhf-ppo-abc"))
        api.create(job)
        api.get("TrainJob", "rlhf", "rlhf-ppo-abc")
        pods = api.pods("rlhf", mn.pod_selector(job))
        logs = api.logs("rlhf", "p-0")
        api.delete("PyTorchJob", "rlhf", "rlhf-ppo-abc")
    finally:
        server.shutdown()
    base = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/rlhf/trainjobs"
    (post, get, list_pods, log, delete) = _Recorder.requests
    assert post == ("POST", base, job)
    assert get[:2] == ("GET", f"{base}/rlhf-ppo-abc")
    assert list_pods[:2] == ("GET", "/api/v1/namespaces/rlhf/pods"
                                    "?labelSelector=jobset.sigs.k8s.io%2Fjobset-name%3Drlhf-ppo-abc")
    assert log[:2] == ("GET", "/api/v1/namespaces/rlhf/pods/p-0/log?tailLines=40")
    assert delete[0] == "DELETE"
    assert delete[1].startswith("/apis/kubeflow.org/v1/namespaces/rlhf/pytorchjobs/rlhf-ppo-abc")
    assert delete[2] == {"propagationPolicy": "Background"} or "propagationPolicy=Background" in delete[1]
    assert pods == [{"name": "p-0", "phase": "Running", "reason": ""}] and logs == "last line"


def test_run_stage_job_stages_data_and_takes_the_jobs_output(tmp_path, monkeypatch):
    """The launcher body end to end with a local 'object store' and a fake cluster."""
    from kfp.dsl import Dataset, Metrics, Model

    monkeypatch.setenv("RLHF_TRACKING", "off")
    inputs = {}
    for k in ("dataset", "sft", "reward_model"):
        d = tmp_path / "in" / k
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"kind": k}))
        inputs[k] = (Dataset if k == "dataset" else Model)(name=k, uri=str(d))
    scratch = tmp_path / "store"

    def node0_uploads(obj):  # what rank 0 of the job does at the end: <scratch>/output
        url = obj["spec"]["trainer"]["args"][obj["spec"]["trainer"]["args"].index("--scratch") + 1]
        for k in ("dataset", "sft", "reward_model"):
            assert (Path(url) / "inputs" / k / "manifest.json").exists()
        cfg = yaml.safe_load((Path(url) / "config" / "params.yaml").read_text())
        assert set(cfg) == {"model", "ppo"} and cfg["ppo"]["total_steps"] == 3 and cfg["model"]["name"] == "tiny"
        out = Path(url) / "output"
        out.mkdir(parents=True)
        (out / "manifest.json").write_text(json.dumps({"kind": "policy", "content_hash": "h",
                                                       "metrics": {"score": 0.5, "kl": 0.1}}))

    out, metrics = Model(name="model", uri=str(tmp_path / "out" / "model")), Metrics(name="m",
                                                                                      uri=str(tmp_path / "m"))
    api = FakeApi(["running", "done"], on_create=node0_uploads)
    mn.run_stage_job("ppo", inputs=inputs, out=out, metrics=metrics,
                     params_yaml=(ROOT / "params.yaml").read_text(), profile="tiny",
                     overrides={"ppo": {"total_steps": 3}}, run_id="run-9", num_nodes=2,
                     accelerator_type="nvidia.com/gpu", gpus_per_node=4, cpu="8", memory="64Gi",
                     node_selector=GPU_SELECTOR, tolerations=[GPU_TOLERATION], image="img:1", namespace="rlhf",
                     kind="TrainJob", scratch_url=str(scratch), timeout_s=600, api=api, poll_s=0)
    assert json.loads((Path(out.path) / "manifest.json").read_text())["kind"] == "policy"
    assert metrics.metadata == {"score": 0.5, "kl": 0.1}
    assert out.metadata["trainer_job"] == api.created[0]["metadata"]["name"]
    assert api.created[0]["spec"]["trainer"]["numNodes"] == 2
    assert str(scratch / "run-9" / "ppo") in api.created[0]["spec"]["trainer"]["args"]
    # the run's label: the exit handler deletes what a killed launcher left behind (rlhf.pipeline.finalize)
    assert api.created[0]["metadata"]["labels"][mn.RUN_LABEL] == "run-9"


def test_job_entry_point_runs_the_cli_under_torchrun_and_uploads_from_node_0(tmp_path, monkeypatch):
    """``python -m rlhf.pipeline.jobs job``: stage inputs, torchrun -m rlhf.cli <stage>, node 0 uploads."""
    scratch = tmp_path / "store"
    for k in ("dataset", "sft"):
        (scratch / "inputs" / k).mkdir(parents=True)
        (scratch / "inputs" / k / "manifest.json").write_text("{}")
    (scratch / "config").mkdir()
    (scratch / "config" / "params.yaml").write_text("model: {name: tiny}\n")
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"$@\" > \"$RLHF_TEST_ARGS\"\nwhile [ \"$1\" != --out ]; do shift; done\n"
                    "mkdir -p \"$2\" && echo '{\"kind\": \"reward-model\"}' > \"$2/manifest.json\"\n")
    fake.chmod(0o755)
    argfile = tmp_path / "args.txt"
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "RLHF_TEST_ARGS": str(argfile),
           "PET_NODE_RANK": "0", "RLHF_JOB_WORKDIR": str(tmp_path / "work"), "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-m", "rlhf.pipeline.jobs", "job", "--stage", "reward", "--scratch", str(scratch),
                          "--", "--nnodes=2", "--node-rank=0"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    args = argfile.read_text().split()
    work = tmp_path / "work"
    assert args == ["--nnodes=2", "--node-rank=0", "-m", "rlhf.cli", "reward", "--dataset",
                    str(work / "inputs/dataset"), "--sft", str(work / "inputs/sft"), "--out", str(work / "output"),
                    "--params", str(work / "config/params.yaml")]
    assert json.loads((scratch / "output" / "manifest.json").read_text())["kind"] == "reward-model"

    shutil.rmtree(scratch / "output")
    res = subprocess.run([sys.executable, "-m", "rlhf.pipeline.jobs", "job", "--stage", "reward", "--scratch", str(scratch)],
                         env={**env, "PET_NODE_RANK": "1"}, capture_output=True, text=True)
    assert res.returncode == 0 and not (scratch / "output").exists(), "only node 0 uploads"


def test_torchrun_flags_match_the_cli():
    """The job calls each stage with the CLI's own option names."""
    from typer.main import get_command

    from rlhf.cli import app

    cmd = get_command(app)
    for stage in steps.TRAINING_STAGES:
        args = jobs.torchrun_args(stage, {k: f"/in/{k}" for k in steps.stage(stage).input_names}, "/out", "/p.yaml", [])
        opts = {o for p in cmd.commands[stage].params for o in p.opts}
        assert all(a in opts for a in args if a.startswith("--")), (stage, args)


def test_copy_tree_through_an_fsspec_object_store(tmp_path):
    """The launcher and the job move directories through object storage with fsspec (memory:// here)."""
    src = tmp_path / "model"
    (src / "critic").mkdir(parents=True)
    (src / "manifest.json").write_text("{}")
    (src / "critic" / "weights.bin").write_bytes(b"\x00\x01")
    remote.copy_tree(str(src), "memory://bucket/runs/r1/ppo/output")
    back = tmp_path / "back"
    remote.copy_tree("memory://bucket/runs/r1/ppo/output", str(back))
    assert (back / "manifest.json").read_text() == "{}"
    assert (back / "critic" / "weights.bin").read_bytes() == b"\x00\x01"
    assert not (back / "output").exists(), "contents are copied, not the folder into itself"
