"""The compiled pipeline (what `rlhf compile` writes): assertions on the KFP IR and the Kubernetes platform spec."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import ROOT, run_cli

GPU_TASKS = ("sft", "reward", "ppo", "evaluate")
TRAINING = ("sft", "reward", "ppo")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """`rlhf compile` as a user runs it: (pipeline spec, kubernetes platform spec, YAML text)."""
    out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    res = run_cli("compile", "--out", str(out), env={"RLHF_IMAGE": "registry.example/rlhf:9.9"})
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    spec, platform = list(yaml.safe_load_all(text))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], text


def dag_tasks(spec: dict) -> dict[str, dict]:
    """The tasks inside the exit handler (every task of the run but the exit task)."""
    return spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def branch_group(spec: dict, member: str) -> tuple[str, dict]:
    """(name, DAG) of the If/Else group whose branches run the task ``member``."""
    for name, comp in spec["components"].items():
        if name.startswith("comp-condition-branches-"):
            branches = [spec["components"][t["componentRef"]["name"]]["dag"]["tasks"]
                        for t in comp["dag"]["tasks"].values()]
            if any(member in b for b in branches):
                return name.removeprefix("comp-"), comp["dag"]
    raise KeyError(member)


def all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the DAG and its sub-DAGs, by component name (comp-sft -> sft)."""
    out = {}
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    for dag in dags:
        for name, task in dag["tasks"].items():
            comp = task["componentRef"]["name"].removeprefix("comp-")
            if not comp.startswith(("condition", "exit-handler")):
                out[comp] = task
    return out


def executor(spec: dict, comp: str) -> dict:
    label = spec["components"][f"comp-{comp}"]["executorLabel"]
    return spec["deploymentSpec"]["executors"][label]["container"]


def test_compiled_file_is_valid_yaml_with_one_line_params(compiled):
    spec, _, text = compiled
    assert spec["pipelineInfo"]["name"] == "rlhf"
    params = spec["root"]["inputDefinitions"]["parameters"]
    default = params["params_yaml"]["defaultValue"]
    assert "\n" not in default and yaml.safe_load(default)["profiles"]  # params.yaml, as one line of JSON
    lines = text.splitlines()
    body = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert body > 10 and lines[body] == "components:", "KFP's header comment (parameter defaults) stays a comment"


def test_images_are_configurable_and_nothing_is_installed_at_run_time(compiled):
    spec, _, _ = compiled
    for comp in ("prepare", "validate", "register", "sft-multinode"):
        assert executor(spec, comp)["image"] == "registry.example/rlhf:9.9"
    for comp in GPU_TASKS:
        assert executor(spec, comp)["image"] == "registry.example/rlhf:9.9-cuda"
    for comp in ("prepare", "sft", "register"):
        cmd = " ".join(executor(spec, comp)["command"])
        assert "pip install" not in cmd and "kfp.dsl.executor_main" in cmd


def test_gpu_tasks_request_accelerators_from_parameters(compiled):
    spec, _, _ = compiled
    for comp in GPU_TASKS:
        res = executor(spec, comp)["resources"]
        assert res["accelerator"]["resourceType"] == "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}"
        # training steps: the parameter (and as many torchrun processes); evaluation runs one process on one GPU
        assert res["accelerator"]["resourceCount"] == ("1" if comp == "evaluate" else
                                                       "{{$.inputs.parameters['pipelinechannel--accelerator_limit']}}")
        assert "train_memory" in res["resourceMemoryRequest"] and "train_cpu" in res["resourceCpuRequest"]
    for comp in ("prepare", "validate", "register", "sft-multinode", "ppo-multinode"):
        res = executor(spec, comp).get("resources", {})
        assert "accelerator" not in res, comp  # CPU steps, and the multi-node launchers, hold no GPU
        assert res.get("resourceMemoryRequest"), comp
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
    assert params["num_nodes"]["defaultValue"] == 1


def test_the_gpu_limit_is_a_string_parameter_as_the_kfp_driver_reads_it(compiled):
    """KFP's driver resolves the resourceCount placeholder with GetStringValue() (backend/src/v2/driver/
    resolve.go, resolvePodSpecInputRuntimeParameter): a NUMBER parameter reads as "" and no GPU limit is set."""
    spec, _, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["accelerator_limit"]["parameterType"] == "STRING" and params["accelerator_limit"]["defaultValue"] == "1"
    passing = {name: c["inputDefinitions"]["parameters"]["pipelinechannel--accelerator_limit"]["parameterType"]
               for name, c in spec["components"].items()
               if "pipelinechannel--accelerator_limit" in c.get("inputDefinitions", {}).get("parameters", {})}
    assert len(passing) >= 3 and set(passing.values()) == {"STRING"}, passing  # every DAG on the way
    for comp in ("sft-multinode", "reward-multinode", "ppo-multinode"):
        assert spec["components"][f"comp-{comp}"]["inputDefinitions"]["parameters"]["accelerator_limit"][
            "parameterType"] == "STRING", comp


def test_gpu_steps_insist_on_cuda(compiled):
    """RLHF_DEVICE=cuda on the GPU steps only: a pod that got no GPU stops instead of training on CPU."""
    spec, _, _ = compiled
    for comp in GPU_TASKS:
        assert executor(spec, comp)["env"] == [{"name": "RLHF_DEVICE", "value": "cuda"}], comp
    for comp in ("prepare", "validate", "sft-multinode", "finalize"):
        assert not executor(spec, comp).get("env"), comp


def test_register_records_the_images_it_was_compiled_for(compiled):
    spec, _, _ = compiled
    for comp in ("register", "register-2"):
        env = {e["name"]: e["value"] for e in executor(spec, comp)["env"]}
        assert env == {"RLHF_PIPELINE_IMAGE": "registry.example/rlhf:9.9",
                       "RLHF_PIPELINE_GPU_IMAGE": "registry.example/rlhf:9.9-cuda"}, comp


def test_kubernetes_platform_spec(compiled):
    spec, k8s, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_node_selector"]["defaultValue"] == {"nvidia.com/gpu.present": "true"}
    assert params["gpu_tolerations"]["defaultValue"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for comp in GPU_TASKS:
        ex = k8s[f"exec-{comp}"]
        # a reference to the pipeline parameter (prefixed inside the training branch's sub-DAG)
        assert ex["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] in (
            "gpu_node_selector", "pipelinechannel--gpu_node_selector")
        assert ex["tolerations"][0]["tolerationJson"]["componentInputParameter"] in (
            "gpu_tolerations", "pipelinechannel--gpu_tolerations")
        assert {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi", "volumeName": "dshm"} in \
            ex["emptyDirMounts"]
    for comp in ("prepare", "validate", "register"):
        assert "nodeSelector" not in k8s[f"exec-{comp}"] and "tolerations" not in k8s[f"exec-{comp}"]
    for name, ex in k8s.items():
        (cm,) = ex["configMapAsEnv"]
        assert cm["configMapName"] == "rlhf-config"
        assert {"configMapKey": "MLFLOW_TRACKING_URI", "envVar": "MLFLOW_TRACKING_URI"} in cm["keyToEnv"]
        assert {"configMapKey": "DVC_REMOTE_URL", "envVar": "DVC_REMOTE_URL"} in cm["keyToEnv"]
        # the pipeline's own MinIO user (k8s/base/minio-buckets-job.yaml), under names that KFP's launcher in
        # the same container does not read for its artifact store (AWS_*, MINIO_*, OBJECTSTORECONFIG_*), and
        # the MLflow pipeline account (may register and promote), never literals
        secrets = {sec["secretName"]: {k["envVar"] for k in sec["keyToEnv"]} for sec in ex["secretAsEnv"]}
        assert secrets == {"rlhf-s3-pipeline": {"RLHF_S3_ACCESS_KEY_ID", "RLHF_S3_SECRET_ACCESS_KEY"},
                           "rlhf-mlflow-pipeline": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}}, name
        names = [k["envVar"] for sec in ex["secretAsEnv"] for k in sec["keyToEnv"]] + \
            [k["envVar"] for k in cm["keyToEnv"]] + [e["name"] for e in ex.get("env", [])]
        assert not [n for n in names if re.match(r"(AWS_|MINIO_|OBJECTSTORECONFIG_)", n)], (name, names)
        assert int(ex["activeDeadlineSeconds"]) > 0, name
        # the label the NetworkPolicies admit (k8s/base/networkpolicies.yaml), on every step's pod
        assert ex["podMetadata"]["labels"]["rlhf.io/pipeline-pod"] == "true"


def test_no_credentials_or_tracking_uri_literals_in_the_ir(compiled):
    _, _, text = compiled
    for needle in ("AKIA", "minio123", "sqlite:///", "http://mlflow"):
        assert needle not in text
    spec, _, _ = compiled
    for ex in spec["deploymentSpec"]["executors"].values():
        env = {e["name"] for e in ex["container"].get("env") or []}
        assert env <= {"RLHF_DEVICE", "RLHF_PIPELINE_IMAGE", "RLHF_PIPELINE_GPU_IMAGE"}, \
            "settings come from the ConfigMap/Secret, not literals"


def test_caching_off_for_training_and_registration_retries_only_on_io(compiled):
    spec, _, _ = compiled
    tasks = all_tasks(spec)
    assert set(tasks) == {"prepare", "validate", "sft", "reward", "ppo", "evaluate", "register", "register-2",
                          "sft-multinode", "reward-multinode", "ppo-multinode", "finalize"}
    for comp, task in tasks.items():
        stage = comp.removesuffix("-multinode").removesuffix("-2")
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (stage in ("prepare", "validate")), comp  # evaluate reads the registry's champion
        retry = task.get("retryPolicy")
        if stage in ("prepare", "register"):
            assert retry["maxRetryCount"] == 3 and retry["backoffDuration"] == "30s"
            assert retry["backoffFactor"] == 2.0 and retry["backoffMaxDuration"] == "600s"
        else:
            assert retry is None, comp
        assert task["taskInfo"]["name"][0].isupper(), "display names read well in the UI"


def test_candidates_are_registered_either_way_but_only_a_passed_gate_may_promote(compiled):
    spec, _, _ = compiled
    name, group = branch_group(spec, "register")
    assert name in dag_tasks(spec) and "evaluate" in dag_tasks(spec)[name]["dependentTasks"]
    branches = {t["taskInfo"]["name"]: t for t in group["tasks"].values()}
    passed, failed = branches["gate-passed"], branches["gate-failed"]
    assert passed["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--evaluate-Output'] == 'passed'"
    assert failed["triggerPolicy"]["condition"] == \
        "!(inputs.parameter_values['pipelinechannel--evaluate-Output'] == 'passed')"
    (reg,) = spec["components"][passed["componentRef"]["name"]]["dag"]["tasks"].values()
    (chal,) = spec["components"][failed["componentRef"]["name"]]["dag"]["tasks"].values()
    assert reg["taskInfo"]["name"] == "Register model (MLflow)"
    assert chal["taskInfo"]["name"] == "Register challenger (gate failed)"  # what `rlhf submit --wait` reads
    # the same component: the registry's promotion rule (gate.json, champion comparison) decides the aliases
    assert spec["components"][chal["componentRef"]["name"]]["executorLabel"] in ("exec-register", "exec-register-2")
    assert executor(spec, "register-2")["args"] == executor(spec, "register")["args"]
    # the condition reads the evaluate step's own output, a string it computes from gate.json
    assert spec["components"]["comp-evaluate"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == \
        "STRING"


def test_single_and_multi_node_branches(compiled):
    spec, _, _ = compiled
    name, branches = branch_group(spec, "sft")
    conds = {t["taskInfo"]["name"]: t["triggerPolicy"]["condition"] for t in branches["tasks"].values()}
    assert conds["single-node-training"] == "int(inputs.parameter_values['pipelinechannel--num_nodes']) <= 1"
    assert conds["multi-node-training"].startswith("!(")
    # downstream steps take whichever branch ran (dsl.OneOf)
    outs = branches["outputs"]["artifacts"]
    assert len(outs) == 3 and all(len(o["artifactSelectors"]) == 2 for o in outs.values())
    # sft waits for validation (through the branch group) even though it only reads the dataset
    assert "validate" in dag_tasks(spec)[name]["dependentTasks"]


def test_every_stage_reads_the_same_params_and_knobs(compiled):
    spec, _, _ = compiled
    for comp in ("prepare", "validate", "sft", "reward", "ppo", "evaluate", "register"):
        inputs = spec["components"][f"comp-{comp}"]["inputDefinitions"]["parameters"]
        assert {"params_yaml", "profile", "overrides"} <= set(inputs), comp
        assert ("run_id" in inputs) == (comp not in ("prepare", "validate")), comp
    tasks = all_tasks(spec)
    run_id = tasks["sft"]["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"]
    assert run_id == "{{$.pipeline_job_uuid}}"


def test_cached_steps_take_no_per_run_argument_and_read_the_run_id_from_the_pod(compiled):
    """A per-run argument (the run id) would change prepare's and validate's cache keys every run."""
    spec, k8s, _ = compiled
    tasks = all_tasks(spec)
    for comp in ("prepare", "validate"):
        text = str(tasks[comp]["inputs"])
        assert "pipeline_job_uuid" not in text and "pipeline_job_name" not in text, comp
        # MLflow still gets the run id: KFP labels every pod of a run with pipeline/runid
        assert {"name": "KFP_RUN_ID", "fieldPath": "metadata.labels['pipeline/runid']"} in \
            k8s[f"exec-{comp}"]["fieldPathAsEnv"]
    assert "pipeline_job_uuid" in str(tasks["sft"]["inputs"])  # uncached steps keep it (multi-node scratch, ...)


def test_an_exit_handler_closes_the_run_whatever_became_of_it(compiled):
    spec, k8s, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "finalize"}, "every task but the exit task is inside the handler"
    final = root["finalize"]
    assert final["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert final["inputs"]["parameters"]["status"]["taskFinalStatus"]["producerTask"] == "exit-handler-1"
    assert final["inputs"]["parameters"]["num_nodes"]["componentInputParameter"] == "num_nodes"
    assert final["cachingOptions"].get("enableCache", False) is False
    assert "fin.finalize(run_id, status.state" in " ".join(executor(spec, "finalize")["command"])
    assert executor(spec, "finalize")["image"] == "registry.example/rlhf:9.9"  # the CPU image
    assert k8s["exec-finalize"]["configMapAsEnv"][0]["configMapName"] == "rlhf-config"  # MLflow's URI


def test_cluster_defaults_are_a_cluster_run(compiled):
    """The compiled defaults (a run started from the KFP UI as it is) train the pretrained profile on the
    data version of data.dvc, while the laptop's `profile:` stays tiny."""
    spec, _, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert data["profile"] == "tiny" and data["cluster_profile"] == "smollm2"
    assert params["profile"]["defaultValue"] == "smollm2"
    assert params["data_hash"]["defaultValue"] == yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["md5"]
