"""Multi-node training from a pipeline step: the Trainer job specs it builds, the wait loop, the job entry point.

No cluster here: specs are checked against the CRDs' structure (the TrainJob/TrainingRuntime
fields of Kubeflow Trainer v1alpha1, the PyTorchJob fields of the Training Operator v1), against
the repository's own templates in k8s/, and their pod templates against the Kubernetes schema
(`kubernetes-validate --strict`). The Kubernetes API is a fake.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from rlhf.data import remote
from rlhf.pipeline import jobs, steps
from rlhf.pipeline import multinode as mn

GPU_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# fields of the v1alpha1 CRDs (kubeflow/trainer api/.../trainjob_types.go)
TRAINJOB_SPEC = {"runtimeRef", "initializer", "trainer", "labels", "annotations", "podSpecOverrides", "suspend",
                 "managedBy"}
TRAINER_FIELDS = {"image", "command", "args", "env", "numNodes", "resourcesPerNode", "numProcPerNode"}
OVERRIDE_FIELDS = {"targetJobs", "containers", "initContainers", "volumes", "serviceAccountName", "nodeSelector",
                   "tolerations"}
PYTORCH_REPLICA = {"replicas", "template", "restartPolicy"}
RUN_POLICY = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
              "schedulingPolicy", "suspend", "managedBy"}
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


def test_job_names_are_rfc1035_labels():
    for stage, rid in (("ppo", "5f2c1d0e-aaaa-bbbb-cccc"), ("reward", ""), ("sft", "X" * 80)):
        name = mn.job_name(stage, rid)
        assert NAME.match(name) and len(name) <= 63, name
    assert mn.job_name("sft", "r") != mn.job_name("sft", "r")


def test_trainjob_matches_the_crd_and_the_repository_runtime(monkeypatch):
    monkeypatch.setenv("KFP_RUN_ID", "5f2c1d0e")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "must-not-leak")
    job = mn.build_trainjob(**spec_kwargs())
    template, runtime = load("k8s/jobs/trainjob-ppo.yaml"), load("k8s/components/trainer-runtime/trainingruntime.yaml")
    assert (job["apiVersion"], job["kind"]) == (template["apiVersion"], template["kind"])
    assert set(job["spec"]) <= TRAINJOB_SPEC
    assert job["spec"]["runtimeRef"] == template["spec"]["runtimeRef"]
    assert job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    trainer = job["spec"]["trainer"]
    assert set(trainer) <= TRAINER_FIELDS and set(template["spec"]["trainer"]) <= TRAINER_FIELDS
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 8
    res = trainer["resourcesPerNode"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "8"
    assert res["requests"]["memory"] == "128Gi" and res["requests"]["cpu"] == "16"
    cmd = trainer["command"] + trainer["args"]
    assert cmd[:5] == ["python", "-m", "rlhf.pipeline.jobs", "job", "--stage"] and cmd[5] == "ppo"
    # the repository's template runs the same entry point with the same torchrun flags
    tpl = template["spec"]["trainer"]
    assert (tpl["command"], tpl["args"][:3]) == (trainer["command"], trainer["args"][:3])
    assert tpl["args"][tpl["args"].index("--"):] == trainer["args"][trainer["args"].index("--"):]
    for flag in ("--nnodes", "--nproc-per-node", "--node-rank", "--master-addr", "--master-port"):
        assert any(a.startswith(flag + "=$(PET_") for a in cmd), flag  # set by the Trainer on every node
    # the overrides target a replicated job the runtime has, and forward selector/tolerations/identity
    (override,) = job["spec"]["podSpecOverrides"]
    assert set(override) <= OVERRIDE_FIELDS
    jobs = {rj["name"] for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    assert {t["name"] for t in override["targetJobs"]} <= jobs
    assert override["nodeSelector"] == GPU_SELECTOR and override["tolerations"] == [GPU_TOLERATION]
    assert override["serviceAccountName"] == "rlhf-pipeline"
    # env: ConfigMap/Secret by reference, lineage forwarded, no secret values
    env = {e["name"]: e for e in trainer["env"]}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "rlhf-config"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "rlhf-storage",
                                                                         "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["KFP_RUN_ID"]["value"] == "5f2c1d0e"
    assert "must-not-leak" not in json.dumps(job)
    assert NAME.match(job["metadata"]["name"]) and job["metadata"]["namespace"] == "rlhf"


def test_pytorchjob_matches_the_crd_and_the_repository_template():
    job = mn.build_pytorchjob(**spec_kwargs(active_deadline_s=3600))
    template = load("k8s/jobs/pytorchjob-ppo.yaml")
    assert (job["apiVersion"], job["kind"]) == (template["apiVersion"], template["kind"])
    assert set(job["spec"]) == set(template["spec"]) == {"runPolicy", "pytorchReplicaSpecs"}
    assert set(job["spec"]["runPolicy"]) <= RUN_POLICY and job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 3600
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for rtype, r in replicas.items():
        assert set(r) <= PYTORCH_REPLICA and r["restartPolicy"] == "Never"
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
def test_job_pod_templates_pass_strict_kubernetes_validation(tmp_path):
    pj = mn.build_pytorchjob(**spec_kwargs())
    tj = mn.build_trainjob(**spec_kwargs())
    t = tj["spec"]["trainer"]
    (o,) = tj["spec"]["podSpecOverrides"]
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"pytorchjob-{k.lower()}"},
             "spec": r["template"]["spec"]} for k, r in pj["spec"]["pytorchReplicaSpecs"].items()]
    pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "trainjob-node"}, "spec": {
        "serviceAccountName": o["serviceAccountName"], "nodeSelector": o["nodeSelector"],
        "tolerations": o["tolerations"], "containers": [{
            "name": "node", "image": t["image"], "command": t["command"], "args": t["args"], "env": t["env"],
            "resources": t["resourcesPerNode"]}]}})
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
    """Kubernetes as far as the launcher sees it: the job goes through ``states``, one per poll."""

    def __init__(self, states, on_create=None):
        self.states, self.created, self.deleted, self.polls, self.on_create = list(states), [], [], 0, on_create

    def create(self, obj):
        self.created.append(obj)
        if self.on_create:
            self.on_create(obj)

    def get(self, kind, ns, name):
        st = self.states[min(self.polls, len(self.states) - 1)]
        self.polls += 1
        conds = {"running": [{"type": "Created", "status": "True", "reason": "JobSetCreated"}],
                 "done": [{"type": "Created", "status": "True", "reason": "JobSetCreated"},
                          {"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "ok"}],
                 "failed": [{"type": "Failed", "status": "True", "reason": "JobSetFailed", "message": "node-1 OOM"}]}
        return {**self.created[-1], "status": {"conditions": conds[st]}}

    def pods(self, ns, selector):
        phase = {"running": "Running", "done": "Succeeded", "failed": "Failed"}[self.states[min(self.polls,
                                                                                               len(self.states)) - 1]]
        return [{"name": "job-node-0-0", "phase": phase, "reason": ""}]

    def logs(self, ns, pod, tail=40):
        return "RuntimeError: CUDA out of memory"

    def delete(self, kind, ns, name):
        self.deleted.append(name)


def test_wait_streams_status_and_succeeds():
    lines = []
    job = mn.build_trainjob(**spec_kwargs())
    mn.launch_and_wait(job, FakeApi(["running", "running", "done"]), poll_s=0, echo=lines.append)
    text = "\n".join(lines)
    assert "created TrainJob" in text and "Created=True JobSetCreated" in text
    assert "pod job-node-0-0: Running" in text and "Complete=True" in text and text.endswith("succeeded")


def test_wait_fails_the_step_when_the_job_fails_or_times_out():
    lines = []
    with pytest.raises(mn.JobFailed, match="failed: JobSetFailed: node-1 OOM"):
        mn.launch_and_wait(mn.build_trainjob(**spec_kwargs()), FakeApi(["running", "failed"]), poll_s=0,
                           echo=lines.append)
    assert any("CUDA out of memory" in line for line in lines), "the failed pod's last lines are shown"
    api, t = FakeApi(["running"]), [0.0]
    with pytest.raises(mn.JobFailed, match="did not finish within 10 s"):
        mn.launch_and_wait(mn.build_pytorchjob(**spec_kwargs()), api, poll_s=4, timeout_s=10, echo=lambda s: None,
                           clock=lambda: t[0], sleep=lambda s: t.__setitem__(0, t[0] + s))
    assert api.deleted, "a timed-out job is deleted"
    assert mn.job_state({"kind": "PyTorchJob", "status": {"conditions": [
        {"type": "Succeeded", "status": "True"}]}})[0] == "Succeeded"


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
