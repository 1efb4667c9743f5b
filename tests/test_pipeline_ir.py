"""The compiled pipeline (what `rlhf compile` writes): assertions on the KFP IR and the Kubernetes platform spec."""

from __future__ import annotations

import pytest
import yaml
from conftest import run_cli

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


def all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the DAG and its sub-DAGs, by component name (comp-sft -> sft)."""
    out = {}
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    for dag in dags:
        for name, task in dag["tasks"].items():
            comp = task["componentRef"]["name"].removeprefix("comp-")
            if not comp.startswith("condition"):
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
    assert params["accelerator_limit"]["defaultValue"] == 1
    assert params["num_nodes"]["defaultValue"] == 1


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
        (sec,) = ex["secretAsEnv"]
        assert sec["secretName"] == "rlhf-storage"
        assert {k["envVar"] for k in sec["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert int(ex["activeDeadlineSeconds"]) > 0, name
        assert ex["podMetadata"]["labels"]["rlhf.io/pipeline-pod"] == "true"


def test_no_credentials_or_tracking_uri_literals_in_the_ir(compiled):
    _, _, text = compiled
    for needle in ("AKIA", "minio123", "sqlite:///", "http://mlflow"):
        assert needle not in text
    spec, _, _ = compiled
    for ex in spec["deploymentSpec"]["executors"].values():
        assert not ex["container"].get("env"), "settings come from the ConfigMap/Secret, not literals"


def test_caching_off_for_training_and_registration_retries_only_on_io(compiled):
    spec, _, _ = compiled
    tasks = all_tasks(spec)
    assert set(tasks) == {"prepare", "validate", "sft", "reward", "ppo", "evaluate", "register",
                          "sft-multinode", "reward-multinode", "ppo-multinode"}
    for comp, task in tasks.items():
        stage = comp.removesuffix("-multinode")
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (stage in ("prepare", "validate", "evaluate")), comp
        retry = task.get("retryPolicy")
        if stage in ("prepare", "register"):
            assert retry["maxRetryCount"] == 3 and retry["backoffDuration"] == "30s"
            assert retry["backoffFactor"] == 2.0 and retry["backoffMaxDuration"] == "600s"
        else:
            assert retry is None, comp
        assert task["taskInfo"]["name"][0].isupper(), "display names read well in the UI"


def test_register_runs_only_when_the_gate_passed(compiled):
    spec, _, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    (gate_name,) = [n for n, t in root.items() if "register" in
                    spec["components"][t["componentRef"]["name"]].get("dag", {}).get("tasks", {})]
    gate = root[gate_name]
    assert gate["taskInfo"]["name"] == "gate-passed"
    assert gate["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--evaluate-Output'] == 'passed'"
    assert "evaluate" in gate["dependentTasks"]
    # the condition reads the evaluate step's own output, a string it computes from gate.json
    assert spec["components"]["comp-evaluate"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == \
        "STRING"
    assert "register" not in root


def test_single_and_multi_node_branches(compiled):
    spec, _, _ = compiled
    branches = spec["components"]["comp-condition-branches-1"]["dag"]
    conds = {t["taskInfo"]["name"]: t["triggerPolicy"]["condition"] for t in branches["tasks"].values()}
    assert conds["single-node-training"] == "int(inputs.parameter_values['pipelinechannel--num_nodes']) <= 1"
    assert conds["multi-node-training"].startswith("!(")
    # downstream steps take whichever branch ran (dsl.OneOf)
    outs = branches["outputs"]["artifacts"]
    assert len(outs) == 3 and all(len(o["artifactSelectors"]) == 2 for o in outs.values())
    # sft waits for validation (through the branch group) even though it only reads the dataset
    assert "validate" in spec["root"]["dag"]["tasks"]["condition-branches-1"]["dependentTasks"]


def test_every_stage_reads_the_same_params_and_knobs(compiled):
    spec, _, _ = compiled
    for comp in ("prepare", "validate", "sft", "reward", "ppo", "evaluate", "register"):
        inputs = spec["components"][f"comp-{comp}"]["inputDefinitions"]["parameters"]
        assert {"params_yaml", "profile", "run_id", "overrides"} <= set(inputs), comp
    tasks = all_tasks(spec)
    run_id = tasks["sft"]["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"]
    assert run_id == "{{$.pipeline_job_uuid}}"
