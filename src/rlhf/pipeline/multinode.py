"""Multi-node training from a pipeline step: build a Kubeflow Trainer job, launch it, wait for it.

With ``num_nodes > 1`` the pipeline's sft / reward / ppo steps are thin CPU launchers
(``rlhf.pipeline.components.*_multinode``) that call :func:`run_stage_job`:

1. the step's inputs (downloaded by KFP into the launcher pod) and the fully resolved stage config
   are copied to ``<scratch>/<kfp run id>/<stage>/`` in object storage (the DVC bucket by default);
2. a ``TrainJob`` (Kubeflow Trainer v2.3, ``trainer.kubeflow.org/v1alpha1``, runtime ``rlhf-torch``
   from ``k8s/components/trainer-runtime``) or a ``PyTorchJob`` (Training Operator v1) is created in
   the training namespace: N nodes x G GPUs, the step's resources and environment (ConfigMap/Secret
   *references*, never values); every node runs ``python -m rlhf.pipeline.jobs job`` which stages the inputs
   and runs ``torchrun <rendezvous> -m rlhf.cli <stage> ...``; node 0 uploads the output;
3. the launcher polls the job, printing condition and pod phase changes (the KFP step log), and
   fails the step when the job fails (with the failed pods' last log lines) or times out;
4. the job's output becomes the step's output artifact (so downstream steps do not change).

TrainJob fields (Trainer v2.3; the CRDs are vendored in ``k8s/crds/trainer-v2.3.0/`` and the tests
validate every job we build against them, unknown fields being errors):

* ``spec.trainer``: image, command/args, env, ``numNodes``, ``numProcPerNode`` (an integer: the
  ``auto`` string and ``mlPolicy.torch.numProcPerNode`` of v2.0 are gone) and ``resourcesPerNode``,
  which the Trainer merges key by key into the runtime's ``node`` container resources (so we set every
  key: cpu and memory requests and limits, the accelerator);
* ``spec.runtimePatches`` (v2.2+; ``podSpecOverrides`` and ``spec.labels`` were removed and the API
  server would silently prune them): one patch owned by manager ``rlhf.io/launcher`` that sets the
  ``node`` pods' labels, service account, node selector and tolerations;
* ``spec.activeDeadlineSeconds``: the controller fails the job at the step's timeout even if this
  launcher is gone.

Kubernetes client: the official ``kubernetes`` Python client (``CustomObjectsApi`` for the jobs,
``CoreV1Api`` for pods and logs), wrapped by :class:`KubeApi`. The Kubeflow SDK
(``kubeflow.trainer.TrainerClient``, 0.5) was considered and not used: its ``CustomTrainerContainer``
takes env as literal strings only (no ConfigMap/Secret references, so credentials would be copied into
the TrainJob), has no ``numProcPerNode``, sets resource requests equal to limits, reads the
``TrainingRuntime`` before every submission (one more permission for the pipeline's Role), cannot
create a PyTorchJob, and brings ``kubeflow-trainer-api``/``kubeflow-katib-api`` with a pinned
``kubernetes`` range. We build the manifest ourselves and check it against the CRDs instead.

Whatever ends the wait other than success (the job failed or timed out, an API error, SIGTERM from KFP
or Kubernetes stopping the launcher pod, Ctrl-C) deletes the job, so that no orphaned pods hold GPUs;
the failed pods' last log lines are printed first.

The spec builders are pure functions; the Kubernetes API is only touched through the ``api`` object
given to :func:`launch_and_wait` (a :class:`KubeApi` by default).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from rlhf.data.remote import S3_KEY_ENV, S3_SECRET

log = logging.getLogger("rlhf")

TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
KINDS = {"TrainJob": TRAINJOB, "PyTorchJob": PYTORCHJOB}
RUNTIME = "rlhf-torch"
#: the runtime's replicated job (and container) that the Trainer fills from ``spec.trainer``
TRAINER_NODE = "node"
#: owner of our entry in a TrainJob's ``spec.runtimePatches`` (the Trainer wants a domain-prefixed path)
PATCH_MANAGER = "rlhf.io/launcher"
SERVICE_ACCOUNT = "rlhf-pipeline"
CONFIG_MAP = "rlhf-config"
STORAGE_SECRET = S3_SECRET
CONFIG_MAP_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "DVC_REMOTE_URL",
                   "DVC_REMOTE_ENDPOINT_URL")
SECRET_KEYS = S3_KEY_ENV
#: the launcher's own environment that the job's pods inherit (lineage and tracking settings)
FORWARDED_ENV = ("KFP_RUN_ID", "RLHF_PARENT_RUN_ID", "RLHF_PIPELINE_RUN_ID", "RLHF_DATA_HASH", "RLHF_GIT_COMMIT", "RLHF_TRACKING",
                 "MLFLOW_EXPERIMENT_NAME", "RLHF_LOG_LEVEL")
POD_LABELS = {"app.kubernetes.io/part-of": "rlhf", "rlhf.io/pipeline-pod": "true"}
TRAINJOB_RENDEZVOUS = ["--nnodes=$(PET_NNODES)", "--nproc-per-node=$(PET_NPROC_PER_NODE)",
                       "--node-rank=$(PET_NODE_RANK)", "--master-addr=$(PET_MASTER_ADDR)",
                       "--master-port=$(PET_MASTER_PORT)"]
#: set by the Trainer's torch plugin; a TrainJob that sets them itself is rejected
TORCH_RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                      "PET_MASTER_PORT")


class JobFailed(RuntimeError):
    """The training job failed, was deleted, did not finish in time, or the launcher was stopped."""


def job_name(stage: str, run_id: str = "") -> str:
    """A unique RFC 1035 label: ``rlhf-<stage>-<run id prefix>-<random>`` (at most 63 characters)."""
    rid = re.sub(r"[^a-z0-9]", "", (run_id or "").lower())[:12]
    name = "-".join(p for p in ("rlhf", stage, rid, secrets.token_hex(3)) if p)
    return name[:63].rstrip("-")


def env_list(extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Pod env: ConfigMap and Secret keys as references, then forwarded/extra literal values."""
    from rlhf.mlops import access

    env: list[dict[str, Any]] = [
        {"name": k, "valueFrom": {"configMapKeyRef": {"name": CONFIG_MAP, "key": k, "optional": True}}}
        for k in CONFIG_MAP_KEYS]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": STORAGE_SECRET, "key": k}}} for k in SECRET_KEYS]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": access.PIPELINE_SECRET, "key": k}}}
            for k in access.CREDENTIAL_KEYS]
    literal = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    literal.update(extra or {})
    env += [{"name": k, "value": str(v)} for k, v in literal.items()]
    return env


def _resources(gpus: int, accelerator_type: str, cpu: str, memory: str,
               cpu_limit: bool = False) -> dict[str, dict[str, str]]:
    req = {"cpu": str(cpu), "memory": str(memory)}
    lim = {"memory": str(memory)}
    if cpu_limit:
        lim["cpu"] = str(cpu)
    if gpus > 0:
        req[accelerator_type] = lim[accelerator_type] = str(gpus)
    return {"requests": req, "limits": lim}


#: label of every job a pipeline run starts (its value: :func:`run_label`), for the exit handler's clean-up
RUN_LABEL = "rlhf.io/pipeline-run"


def run_label(run_id: str) -> str:
    """A pipeline run id as a label value (at most 63 of ``[a-z0-9-]``, no leading/trailing dash)."""
    return re.sub(r"[^a-z0-9-]", "", (run_id or "").lower())[:63].strip("-") or "none"


def _pod_labels(stage: str) -> dict[str, str]:
    return {**POD_LABELS, "app.kubernetes.io/name": f"rlhf-{stage}", "rlhf.io/stage": stage}


def _check(num_nodes: int, gpus_per_node: int) -> None:
    if num_nodes < 2:
        raise ValueError(f"a multi-node job needs num_nodes >= 2, got {num_nodes}")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node must be >= 0, got {gpus_per_node}")


def build_trainjob(*, name: str, namespace: str, stage: str, image: str, num_nodes: int, gpus_per_node: int,
                   scratch_url: str, cpu: str = "4", memory: str = "32Gi",
                   accelerator_type: str = "nvidia.com/gpu", node_selector: dict[str, str] | None = None,
                   tolerations: list[dict[str, Any]] | None = None, env: dict[str, str] | None = None,
                   runtime: str = RUNTIME, service_account: str = SERVICE_ACCOUNT,
                   active_deadline_s: int | None = None) -> dict[str, Any]:
    """A ``trainer.kubeflow.org/v1alpha1`` TrainJob (Trainer v2.3) running ``stage`` on ``num_nodes`` nodes.

    The runtime supplies the pod template (non-root, /dev/shm, /tmp, the ConfigMap/Secret as envFrom);
    ``spec.trainer`` sets the image, the command, nodes x processes (one per GPU, at least one), the
    resources and the env; one ``runtimePatches`` entry sets the ``node`` pods' labels, service account,
    node selector and tolerations (the runtime has no node selector of its own, so the pipeline's
    selector decides where the pods go).
    """
    from rlhf.pipeline import jobs

    _check(num_nodes, gpus_per_node)
    reserved = sorted(set(env or {}) & set(TORCH_RESERVED_ENV))
    if reserved:
        raise ValueError(f"env must not set {', '.join(reserved)}: Kubeflow Trainer sets them on every node")
    cmd = jobs.job_command(stage, scratch_url, TRAINJOB_RENDEZVOUS)
    labels = _pod_labels(stage)
    pod_spec: dict[str, Any] = {"serviceAccountName": service_account}
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    patch = {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": TRAINER_NODE,
         "template": {"spec": {"template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec}}}}]}}}}
    spec: dict[str, Any] = {
        "runtimeRef": {"name": runtime, "apiGroup": TRAINJOB[0], "kind": "TrainingRuntime"},
        "trainer": {
            "image": image,
            "command": cmd[:3],
            "args": cmd[3:],
            "env": env_list({"RLHF_NUM_NODES": str(num_nodes), **(env or {})}),
            "numNodes": int(num_nodes),
            "numProcPerNode": max(int(gpus_per_node), 1),
            # merged key by key into the runtime's resources: set the cpu limit too (or the runtime's stays)
            "resourcesPerNode": _resources(gpus_per_node, accelerator_type, cpu, memory, cpu_limit=True),
        },
        "runtimePatches": [patch],
    }
    if active_deadline_s:
        spec["activeDeadlineSeconds"] = int(active_deadline_s)
    return {
        "apiVersion": f"{TRAINJOB[0]}/{TRAINJOB[1]}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec,
    }


def build_pytorchjob(*, name: str, namespace: str, stage: str, image: str, num_nodes: int, gpus_per_node: int,
                     scratch_url: str, cpu: str = "4", memory: str = "32Gi",
                     accelerator_type: str = "nvidia.com/gpu", node_selector: dict[str, str] | None = None,
                     tolerations: list[dict[str, Any]] | None = None, env: dict[str, str] | None = None,
                     service_account: str = SERVICE_ACCOUNT, shm_size: str = "16Gi",
                     active_deadline_s: int | None = None) -> dict[str, Any]:
    """A ``kubeflow.org/v1`` PyTorchJob: 1 Master + (num_nodes - 1) Workers, one pod per node."""
    from rlhf.pipeline import jobs

    _check(num_nodes, gpus_per_node)
    nproc = max(gpus_per_node, 1)
    rendezvous = [f"--nnodes={num_nodes}", f"--nproc-per-node={nproc}", "--node-rank=$(RANK)",
                  "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]
    cmd = jobs.job_command(stage, scratch_url, rendezvous)
    labels = _pod_labels(stage)
    pod_env = env_list({"RLHF_NUM_NODES": str(num_nodes), "RLHF_NPROC_PER_NODE": str(nproc),
                        "HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "HF_HOME": "/tmp/.cache/huggingface",
                        "RLHF_CACHE": "/tmp/rlhf-cache", **(env or {})})
    pod: dict[str, Any] = {
        "serviceAccountName": service_account,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "pytorch",  # the training operator looks for this container name
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": cmd[:3],
            "args": cmd[3:],
            "env": pod_env,
            "ports": [{"name": "pytorchjob-port", "containerPort": 23456}],
            "resources": _resources(gpus_per_node, accelerator_type, cpu, memory),
            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
        }],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
                    {"name": "tmp", "emptyDir": {}}],
    }
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = [dict(t) for t in tolerations]

    def replica(n: int) -> dict[str, Any]:
        return {"replicas": n, "restartPolicy": "Never",
                "template": {"metadata": {"labels": dict(labels)}, "spec": json.loads(json.dumps(pod))}}

    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": 0, "ttlSecondsAfterFinished": 86400}
    if active_deadline_s:
        run_policy["activeDeadlineSeconds"] = int(active_deadline_s)
    return {
        "apiVersion": f"{PYTORCHJOB[0]}/{PYTORCHJOB[1]}",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"runPolicy": run_policy,
                 "pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(num_nodes - 1)}},
    }


def build_job(kind: str, **kw) -> dict[str, Any]:
    if kind == "TrainJob":
        kw.pop("shm_size", None)  # /dev/shm comes from the runtime
        return build_trainjob(**kw)
    if kind == "PyTorchJob":
        return build_pytorchjob(**kw)
    raise ValueError(f"job_kind must be TrainJob or PyTorchJob, got {kind!r}")


# ------------------------------------------------------------------------------------------ status


def delete_run_jobs(run_id: str, namespace: str, api: Any = None,
                    echo: Callable[[str], None] = print) -> list[str]:
    """Delete every job of pipeline run ``run_id`` that did not succeed (the exit handler's clean-up).

    A launcher deletes its own job when it fails or is stopped; this catches the jobs whose launcher
    was killed outright (OOM, node loss, ``activeDeadlineSeconds``). Returns the deleted names.
    """
    api = api or KubeApi()
    deleted = []
    for kind in KINDS:
        try:
            found = api.jobs(kind, namespace, f"{RUN_LABEL}={run_label(run_id)}")
        except Exception as e:  # noqa: BLE001 - a kind whose CRD is not installed: nothing of it to delete
            log.debug("listing %s in %s: %s", kind, namespace, e)
            continue
        for obj in found:
            if job_state({"kind": kind, **obj})[0] != "Succeeded":
                _delete(api, kind, namespace, obj["metadata"]["name"], echo)
                deleted.append(obj["metadata"]["name"])
    return deleted


def job_state(obj: dict[str, Any]) -> tuple[str, str]:
    """("Succeeded" | "Failed" | "Running", message) of a TrainJob or PyTorchJob object."""
    kind = obj.get("kind", "TrainJob")
    done, failed = ("Complete", "Failed") if kind == "TrainJob" else ("Succeeded", "Failed")
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("status") != "True":
            continue
        msg = f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
        if c.get("type") == failed:
            return "Failed", msg
        if c.get("type") == done:
            return "Succeeded", msg
    return "Running", ""


def pod_selector(obj: dict[str, Any]) -> str:
    name = obj["metadata"]["name"]
    if obj.get("kind") == "PyTorchJob":
        return f"training.kubeflow.org/job-name={name}"
    return f"jobset.sigs.k8s.io/jobset-name={name}"


class KubeApi:
    """The few Kubernetes calls the launcher makes, through the official ``kubernetes`` client.

    ``api_client`` is a ``kubernetes.client.ApiClient``; by default the in-cluster configuration
    (the launcher pod's ServiceAccount), else ``~/.kube/config``.
    """

    def __init__(self, api_client: Any = None):
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def create(self, obj: dict[str, Any]) -> None:
        g, v, plural, _ = KINDS[obj["kind"]]
        self.custom.create_namespaced_custom_object(g, v, obj["metadata"]["namespace"], plural, obj)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        g, v, plural, _ = KINDS[kind]
        return self.custom.get_namespaced_custom_object(g, v, namespace, plural, name)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        g, v, plural, _ = KINDS[kind]
        self.custom.delete_namespaced_custom_object(g, v, namespace, plural, name,
                                                    propagation_policy="Background")

    def jobs(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        g, v, plural, _ = KINDS[kind]
        return self.custom.list_namespaced_custom_object(g, v, namespace, plural,
                                                         label_selector=selector).get("items") or []

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return [{"name": p.metadata.name, "phase": p.status.phase,
                 "reason": (p.status.reason or "")} for p in items]

    def logs(self, namespace: str, pod: str, tail: int = 40) -> str:
        return self.core.read_namespaced_pod_log(pod, namespace, tail_lines=tail)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM (KFP or Kubernetes stopping the launcher pod) into an exception, so ``finally`` runs."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def stop(signum, frame):
        raise JobFailed(f"the launcher got {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _delete(api: Any, kind: str, ns: str, name: str, echo: Callable[[str], None]) -> None:
    """Delete the job (its pods go with it); never raises, so the reason the wait ended stays the error."""
    try:
        api.delete(kind, ns, name)
        echo(f"[{name}] deleted {kind} {ns}/{name} (and its pods)")
    except Exception as e:  # noqa: BLE001 - the original error matters more; say how to clean up
        if getattr(e, "status", None) == 404:
            return
        echo(f"[{name}] could not delete {kind} {ns}/{name}: {e}; delete it by hand: "
             f"kubectl delete {KINDS[kind][2]}.{KINDS[kind][0]} -n {ns} {name}")


def launch_and_wait(obj: dict[str, Any], api: Any = None, *, poll_s: float = 15.0, timeout_s: float = 86400,
                    echo: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Create the job, stream its status until it ends; raise :class:`JobFailed` unless it succeeded.

    ``api`` has ``create/get/delete/pods/logs`` (:class:`KubeApi` by default). Unless the job
    succeeded, it is deleted before this returns: failed, timed out, API error, SIGTERM or Ctrl-C.
    """
    api = api or KubeApi()
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    api.create(obj)
    echo(f"[{name}] created {kind} in namespace {ns}: {obj_summary(obj)}")
    succeeded = False
    try:
        with _sigterm_raises():
            cur = _wait(api, kind, ns, name, poll_s=poll_s, timeout_s=timeout_s, echo=echo, clock=clock,
                        sleep=sleep)
        succeeded = True
        return cur
    finally:
        if not succeeded:
            _delete(api, kind, ns, name, echo)


def _wait(api: Any, kind: str, ns: str, name: str, *, poll_s: float, timeout_s: float,
          echo: Callable[[str], None], clock: Callable[[], float],
          sleep: Callable[[float], None]) -> dict[str, Any]:
    seen_conditions: set[tuple] = set()
    phases: dict[str, str] = {}
    deadline = clock() + timeout_s
    while True:
        try:
            cur = api.get(kind, ns, name)
        except Exception as e:  # noqa: BLE001 - a deleted job or an API error ends the wait, clearly
            if getattr(e, "status", None) == 404:
                raise JobFailed(f"{kind} {ns}/{name} disappeared (deleted?)") from None
            raise
        for c in (cur.get("status") or {}).get("conditions") or []:
            key = (c.get("type"), c.get("status"), c.get("reason"))
            if key not in seen_conditions:
                seen_conditions.add(key)
                echo(f"[{name}] {c.get('type')}={c.get('status')} {c.get('reason', '')} {c.get('message', '')}"
                     .rstrip())
        pods = api.pods(ns, pod_selector(cur))
        for p in pods:
            if phases.get(p["name"]) != p["phase"]:
                phases[p["name"]] = p["phase"]
                echo(f"[{name}] pod {p['name']}: {p['phase']} {p.get('reason', '')}".rstrip())
        state, msg = job_state(cur)
        if state == "Succeeded":
            echo(f"[{name}] succeeded")
            return cur
        if state == "Failed":
            for p in pods:
                if p["phase"] == "Failed":
                    try:
                        echo(f"[{name}] last lines of {p['name']}:\n{api.logs(ns, p['name'])}")
                    except Exception:  # noqa: BLE001 - logs are a courtesy
                        pass
            raise JobFailed(f"{kind} {ns}/{name} failed: {msg or 'no reason given'}")
        if clock() > deadline:
            raise JobFailed(f"{kind} {ns}/{name} did not finish within {timeout_s:.0f} s; deleted it")
        sleep(poll_s)


def obj_summary(obj: dict[str, Any]) -> str:
    if obj["kind"] == "TrainJob":
        t = obj["spec"]["trainer"]
        return f"{t['numNodes']} nodes x {t['numProcPerNode']} processes, image {t['image']}"
    r = obj["spec"]["pytorchReplicaSpecs"]
    c = r["Master"]["template"]["spec"]["containers"][0]
    return f"{1 + r['Worker']['replicas']} nodes, image {c['image']}"


# ------------------------------------------------------------------------------------------ step


def resolved_params(stage: str, run) -> dict:
    """A params.yaml whose sections are the stage's final configs (profile and overrides applied)."""
    from rlhf.pipeline.stages import stage as stage_spec

    return {section: run.section(section).model_dump(mode="json") for section in stage_spec(stage).sections}


def run_stage_job(stage: str, *, inputs: dict[str, Any], out: Any, metrics: Any, params_yaml: str, profile: str,
                  overrides: dict[str, dict[str, Any]] | None, run_id: str, num_nodes: int,
                  accelerator_type: str, gpus_per_node: int, cpu: str, memory: str,
                  node_selector: dict[str, str], tolerations: list[dict[str, Any]], image: str, namespace: str,
                  kind: str, scratch_url: str, timeout_s: int, api: Any = None, poll_s: float = 15.0) -> dict:
    """The body of a ``*_multinode`` component: stage data, run the job, take its output as ours."""
    from rlhf.config.resolve import RunConfig
    from rlhf.data.remote import copy_tree
    from rlhf.errors import ConfigError
    from rlhf.pipeline import steps

    steps.setup_logging()
    if run_id:
        os.environ.setdefault("KFP_RUN_ID", run_id)
    base = (scratch_url or (os.environ.get("DVC_REMOTE_URL", "").rstrip("/") + "/runs"
                            if os.environ.get("DVC_REMOTE_URL") else "")).rstrip("/")
    if not base:
        raise ConfigError("no scratch location for the multi-node job",
                          hint="set the pipeline parameter scratch_url or DVC_REMOTE_URL in rlhf-config")
    scratch = f"{base}/{run_id or 'run'}/{stage}"
    with tempfile.TemporaryDirectory(prefix=f"rlhf-{stage}-job-") as tmp:
        run = RunConfig.from_text(params_yaml or "{}", profile=profile or None, overrides=overrides)
        cfg_dir = Path(tmp) / "config"
        cfg_dir.mkdir()
        (cfg_dir / "params.yaml").write_text(yaml.safe_dump(resolved_params(stage, run), sort_keys=False))
        copy_tree(str(cfg_dir), f"{scratch}/config")
        for k, art in inputs.items():
            copy_tree(getattr(art, "path", art), f"{scratch}/inputs/{k}")
    with steps.parent_run(run_id):  # the job's stage run nests under the pipeline's MLflow run
        obj = build_job(kind, name=job_name(stage, run_id), namespace=namespace or "rlhf", stage=stage,
                        image=image, num_nodes=int(num_nodes), gpus_per_node=int(gpus_per_node),
                        scratch_url=scratch, cpu=cpu, memory=memory, accelerator_type=accelerator_type,
                        node_selector=node_selector, tolerations=tolerations, active_deadline_s=timeout_s)
        obj["metadata"]["labels"][RUN_LABEL] = run_label(run_id)  # found by the exit handler's clean-up
        launch_and_wait(obj, api, poll_s=poll_s, timeout_s=timeout_s)
    out_path = getattr(out, "path", out)
    copy_tree(f"{scratch}/output", out_path)
    manifest = json.loads((Path(out_path) / "manifest.json").read_text())
    if metrics is not None:
        for k, v in steps.numeric_metrics(manifest.get("metrics") or {}).items():
            metrics.log_metric(k, v)
    if hasattr(out, "metadata"):
        out.metadata.update({"kind": manifest.get("kind"), "content_hash": manifest.get("content_hash"),
                             "trainer_job": obj["metadata"]["name"], "num_nodes": int(num_nodes)})
    return manifest
