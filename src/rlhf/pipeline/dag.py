"""The RLHF pipeline as a KFP v2 DAG.

    dsl.ExitHandler(finalize):
      prepare -> validate -> [sft -> reward -> ppo] -> evaluate -> dsl.If(gate passed):  register (may promote)
                              single node: the stage components on a GPU pod each     dsl.Else: register (challenger)
                              num_nodes > 1: launchers of Kubeflow Trainer jobs (rlhf.pipeline.multinode)

The components are generated from the stage table (:mod:`rlhf.pipeline.components`); this module
turns them into KFP components for a pair of images (:func:`build`), declares the pipeline's
parameters (:data:`RUN_PARAMETERS`, :data:`RESOURCE_PARAMETERS` and the config knobs of
:data:`rlhf.config.resolve.KNOBS`) and wires the DAG (:func:`make_pipeline`).

Per task, from the stage table: display name, CPU/memory requests, timeout, caching, retries; and
for every task the ``rlhf-config`` ConfigMap and the ``rlhf-s3-pipeline`` and ``rlhf-mlflow-pipeline`` Secrets
as environment (MLflow URI, DVC remote, the pipeline's own MinIO user under names KFP's launcher does not
read, the MLflow pipeline account: never literals; :mod:`rlhf.data.remote`, :mod:`rlhf.mlops.access`) and
the pod label ``rlhf.io/pipeline-pod`` the NetworkPolicies admit. GPU tasks (sft, reward, ppo, evaluate):
accelerator type and limit from pipeline parameters, the GPU node selector and toleration (pipeline
parameters, passed as JSON to kfp-kubernetes), ``/dev/shm`` as a memory-backed emptyDir, and
``RLHF_DEVICE=cuda``: a GPU step that sees no GPU stops at once (:func:`rlhf.pipeline.steps.check_device`).

What a real cluster needs, each checked by ``tests/test_pipeline_ir.py``:

* ``accelerator_limit`` is a *string* parameter: the KFP driver resolves a resource placeholder
  with ``GetStringValue()`` (``backend/src/v2/driver/resolve.go``), which is "" for a number, and
  then sets no GPU limit at all;
* the cached steps (prepare, validate) take no per-run argument, so the same inputs hit KFP's cache;
  their pods read the run id for MLflow from the pod label ``pipeline/runid`` (``KFP_RUN_ID``);
* every task sits in a ``dsl.ExitHandler`` whose exit task (:mod:`rlhf.pipeline.finalize`) closes
  the run's MLflow runs and deletes its Trainer jobs when the run did not succeed;
* candidates that fail the gate are registered too (alias ``challenger`` only, the gate as tags);
* the defaults are a cluster run: ``profile`` is params.yaml's ``cluster_profile:`` (the pretrained
  model), ``data_hash`` the md5 in ``data.dvc``.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kfp import dsl, kubernetes

from rlhf.config.resolve import KNOBS, cluster_profile, knobs_for, params_text, parse_yaml
from rlhf.data.remote import S3_KEY_ENV, S3_SECRET
from rlhf.mlops.access import CREDENTIAL_KEYS as MLFLOW_SECRET_KEYS
from rlhf.mlops.access import PIPELINE_SECRET as MLFLOW_SECRET
from rlhf.pipeline import components as generated
from rlhf.pipeline import exit_task
from rlhf.pipeline.stages import Stage, stage

PIPELINE_NAME = "rlhf"
DEFAULT_IMAGE = "ghcr.io/rlhf-project/rlhf:0.1.0"
DEFAULT_GPU_IMAGE = DEFAULT_IMAGE + "-cuda"
CONFIG_MAP = "rlhf-config"
STORAGE_SECRET = S3_SECRET
#: no AWS_* name: KFP's launcher in the same container reads those for its own artifact store
CONFIG_MAP_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "DVC_REMOTE_URL", "DVC_REMOTE_ENDPOINT_URL",
                   "RLHF_TRAINING_NAMESPACE")
SECRET_KEYS = S3_KEY_ENV
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
#: the pod label of our pipeline's pods, the only one the NetworkPolicies admit (k8s/base/networkpolicies.yaml);
#: never KFP's pipelines.kubeflow.org/v2_component, which every pipeline's pods carry
POD_LABEL = ("rlhf.io/pipeline-pod", "true")
#: the pod label KFP puts on every pod of a run (``util.LabelKeyWorkflowRunId``): the run id of a cached step
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"
#: the device of GPU steps on a cluster: no silent CPU fallback
GPU_DEVICE = "cuda"
REGISTER_CHALLENGER = "Register challenger (gate failed)"
FINALIZE_DISPLAY = "Finalize (close MLflow runs, delete jobs)"
SHM_SIZE = "16Gi"
RETRY = {"num_retries": 3, "backoff_duration": "30s", "backoff_factor": 2.0, "backoff_max_duration": "600s"}
#: seconds a multi-node launcher keeps for staging data in and out of its Trainer job
JOB_STAGING_S = 900


# ------------------------------------------------------------------------------------------ components


def default_images() -> tuple[str, str]:
    """(CPU image, GPU image) from ``$RLHF_IMAGE`` / ``$RLHF_GPU_IMAGE``."""
    image = os.environ.get("RLHF_IMAGE") or DEFAULT_IMAGE
    return image, os.environ.get("RLHF_GPU_IMAGE") or image + "-cuda"


@dataclass(frozen=True)
class Components:
    """The KFP components for one pair of images."""

    image: str
    gpu_image: str
    stages: dict[str, Any]
    multinode: dict[str, Any]
    finalize: Any = None

    def __getattr__(self, name: str) -> Any:
        try:
            return self.stages[name]
        except KeyError:
            raise AttributeError(name) from None


def build(image: str | None = None, gpu_image: str | None = None) -> Components:
    """KFP components of every stage: CPU stages on ``image``, GPU stages on ``gpu_image``.

    Lightweight components with ``install_kfp_package=False`` and no ``packages_to_install``: the
    image has the ``rlhf`` package and kfp installed, so nothing is pip-installed when a step starts.
    """
    if image:
        gpu_image = gpu_image or image + "-cuda"
    else:
        image, default_gpu = default_images()
        gpu_image = gpu_image or default_gpu

    def make(func, base_image):
        return dsl.component(func, base_image=base_image, install_kfp_package=False, packages_to_install=[])

    stages = {name: make(f, gpu_image if stage(name).gpu else image) for name, f in generated.STAGE_FUNCS.items()}
    launchers = {name: make(f, image) for name, f in generated.MULTINODE_FUNCS.items()}
    return Components(image=image, gpu_image=gpu_image, stages=stages, multinode=launchers,
                      finalize=make(exit_task.finalize, image))


# ------------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any
    help: str


#: what a run is about: data, configuration
RUN_PARAMETERS: tuple[Param, ...] = (
    Param("data_revision", str, "", "git commit/tag of the data version (recorded as lineage)."),
    Param("data_hash", str, "", "DVC md5 of data/raw (data.dvc); the prepare step fetches it from DVC_REMOTE_URL."),
    Param("raw_data", str, "", "a path or URL of raw data to use instead of the DVC version (local runs)."),
    Param("params_yaml", str, "{}", "the full params.yaml (default: the one this pipeline was compiled with)."),
    Param("profile", str, "", "params profile (default: params.yaml's `cluster_profile:`, the pretrained "
          "model; 'none' = the base sections)."),
    Param("overrides", dict, {}, "any config field, {section: {field: value}}."),
    Param("compare_champion", bool, True, "evaluate against the registry's current champion too."),
)
#: where and on what it runs
RESOURCE_PARAMETERS: tuple[Param, ...] = (
    Param("accelerator_type", str, "nvidia.com/gpu", "GPU resource name of training/evaluation steps."),
    Param("accelerator_limit", str, "1", "GPUs per training/evaluation step (per node with num_nodes > 1); a "
          "string, as the KFP driver reads resource placeholders."),
    Param("num_nodes", int, 1, "> 1 runs sft/reward/ppo as multi-node Kubeflow Trainer jobs."),
    Param("gpu_node_selector", dict, GPU_NODE_SELECTOR, "node selector of GPU steps."),
    Param("gpu_tolerations", list, GPU_TOLERATIONS, "tolerations of GPU steps."),
    Param("train_cpu", str, "4", "CPU request of GPU steps."),
    Param("train_memory", str, "32Gi", "memory request and limit of GPU steps."),
    Param("training_image", str, DEFAULT_GPU_IMAGE, "image of the multi-node training jobs' pods."),
    Param("training_namespace", str, "rlhf", "namespace of the multi-node training jobs."),
    Param("job_kind", str, "TrainJob", "TrainJob (Kubeflow Trainer v2) or PyTorchJob (Training Operator v1)."),
    Param("scratch_url", str, "", "object-store prefix for multi-node job data ('' = $DVC_REMOTE_URL/runs)."),
)


def parameters(*, params_yaml: str = "{}", training_image: str = DEFAULT_GPU_IMAGE,
               data_hash: str = "") -> tuple[Param, ...]:
    """Every pipeline parameter, in the order of the pipeline function's signature.

    The defaults make a cluster run: ``params_yaml`` as compiled, ``profile`` its
    ``cluster_profile:`` (:func:`rlhf.config.resolve.cluster_profile`), ``data_hash`` the data version.
    """
    knobs = tuple(Param(k.name, k.type, k.unset, k.help + ".") for k in KNOBS)
    defaults = {"params_yaml": params_yaml, "training_image": training_image, "data_hash": data_hash,
                "profile": cluster_profile(parse_yaml(params_yaml or "{}", "params_yaml"))}
    return tuple(Param(p.name, p.type, defaults.get(p.name, p.default), p.help)
                 for p in (*RUN_PARAMETERS, *knobs, *RESOURCE_PARAMETERS))


def default_data_hash() -> str:
    """The md5 in ``data.dvc`` (working directory, else the repository): the compiled ``data_hash``."""
    from rlhf.mlops import versioning

    for p in (Path("data.dvc"), Path(__file__).resolve().parents[3] / "data.dvc"):
        if p.exists():
            return versioning.data_hash(p)
    return ""


def default_params_yaml() -> str:
    """params.yaml of the working directory (or the repository), embedded as the default parameter."""
    for p in (Path("params.yaml"), Path(__file__).resolve().parents[3] / "params.yaml"):
        if p.exists():
            return params_text(p.read_text(encoding="utf-8"))
    return "{}"


# ------------------------------------------------------------------------------------------ tasks


def _common(task, s: Stage, *, retries: bool) -> None:
    task.set_display_name(s.display)
    if s.cache:  # no run_id argument (it would change every cache key): the run id from the pod's label
        kubernetes.use_field_path_as_env(task, "KFP_RUN_ID", RUN_ID_FIELD)
    kubernetes.set_timeout(task, s.timeout_s)
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, {k: k for k in CONFIG_MAP_KEYS})
    kubernetes.use_secret_as_env(task, STORAGE_SECRET, {k: k for k in SECRET_KEYS})
    kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {k: k for k in MLFLOW_SECRET_KEYS})
    kubernetes.add_pod_label(task, *POD_LABEL)
    if not s.cache:
        task.set_caching_options(False)
    if retries and s.retries:
        task.set_retry(**RETRY)
    if s.cpu_request:
        cpu, mem = s.cpu_request
        task.set_cpu_request(cpu).set_memory_request(mem)


def _gpu(task, p, device: str | None, limit: str | None = None) -> None:
    """GPU settings; a training step runs one process per GPU it gets (``steps.processes``)."""
    task.set_accelerator_type(p.accelerator_type).set_accelerator_limit(p.accelerator_limit if limit is None
                                                                       else limit)
    if device:
        task.set_env_variable("RLHF_DEVICE", device)
    task.set_cpu_request(p.train_cpu).set_memory_request(p.train_memory).set_memory_limit(p.train_memory)
    kubernetes.add_node_selector_json(task, p.gpu_node_selector)
    kubernetes.add_toleration_json(task, p.gpu_tolerations)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=SHM_SIZE)


def _args(name: str, p, **inputs) -> dict[str, Any]:
    """A task's arguments: its inputs, the run settings and the knobs its config sections use.

    Cached stages get no ``run_id``: a per-run argument would make every run a cache miss.
    """
    s = stage(name)
    args = {"params_yaml": p.params_yaml, "profile": p.profile, "overrides": p.overrides, **inputs}
    if not s.cache:
        args["run_id"] = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    args.update({k.name: getattr(p, k.name) for k in knobs_for(s.config_sections)})
    return args


def _launcher_args(name: str, p) -> dict[str, Any]:
    return {"num_nodes": p.num_nodes, "accelerator_type": p.accelerator_type,
            "accelerator_limit": p.accelerator_limit, "cpu": p.train_cpu, "memory": p.train_memory,
            "node_selector": p.gpu_node_selector, "tolerations": p.gpu_tolerations, "image": p.training_image,
            "namespace": p.training_namespace, "job_kind": p.job_kind, "scratch_url": p.scratch_url,
            "timeout_s": stage(name).timeout_s - JOB_STAGING_S}


def data_steps(c: Components, p, *, retries: bool = False):
    """The prepare and validate tasks (the cached part of the DAG): ``(prepare, validate)``."""
    prep = c.prepare(**_args("prepare", p, raw_data=p.raw_data, data_hash=p.data_hash,
                             data_revision=p.data_revision))
    val = c.validate(**_args("validate", p, dataset=prep.outputs["dataset"]))
    for name, task in (("prepare", prep), ("validate", val)):
        _common(task, stage(name), retries=retries)
    return prep, val


def _dag(c: Components, p, *, retries: bool, gpu_device: str | None, record_images: bool) -> None:
    """The pipeline's body: ``p`` holds the pipeline parameters by name."""
    final = c.finalize(run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, num_nodes=p.num_nodes,
                       training_namespace=p.training_namespace)
    final.set_display_name(FINALIZE_DISPLAY)
    final.set_caching_options(False)
    final.set_cpu_request("100m").set_memory_request("512Mi")
    kubernetes.use_config_map_as_env(final, CONFIG_MAP, {k: k for k in CONFIG_MAP_KEYS})
    kubernetes.use_secret_as_env(final, STORAGE_SECRET, {k: k for k in SECRET_KEYS})
    kubernetes.use_secret_as_env(final, MLFLOW_SECRET, {k: k for k in MLFLOW_SECRET_KEYS})
    kubernetes.add_pod_label(final, *POD_LABEL)
    kubernetes.set_timeout(final, 900)
    with dsl.ExitHandler(final, name="rlhf-run"):
        _body(c, p, retries=retries, gpu_device=gpu_device, record_images=record_images)


def _body(c: Components, p, *, retries: bool, gpu_device: str | None, record_images: bool) -> None:
    prep, val = data_steps(c, p, retries=retries)
    dataset = prep.outputs["dataset"]

    # training: one GPU pod per stage, or a Trainer job per stage on num_nodes nodes
    with dsl.If(p.num_nodes <= 1, name="single-node-training"):
        sft1 = c.sft(**_args("sft", p, dataset=dataset)).after(val)
        rew1 = c.reward(**_args("reward", p, dataset=dataset, sft=sft1.outputs["model"]))
        ppo1 = c.ppo(**_args("ppo", p, dataset=dataset, sft=sft1.outputs["model"],
                             reward_model=rew1.outputs["model"]))
        for task in (sft1, rew1, ppo1):
            _gpu(task, p, gpu_device)
    with dsl.Else(name="multi-node-training"):
        m = c.multinode
        sftn = m["sft"](**_args("sft", p, dataset=dataset), **_launcher_args("sft", p)).after(val)
        rewn = m["reward"](**_args("reward", p, dataset=dataset, sft=sftn.outputs["model"]),
                           **_launcher_args("reward", p))
        ppon = m["ppo"](**_args("ppo", p, dataset=dataset, sft=sftn.outputs["model"],
                                reward_model=rewn.outputs["model"]), **_launcher_args("ppo", p))
        for task in (sftn, rewn, ppon):
            task.set_cpu_request("500m").set_memory_request("1Gi")
    sft_model = dsl.OneOf(sft1.outputs["model"], sftn.outputs["model"])
    reward_model = dsl.OneOf(rew1.outputs["model"], rewn.outputs["model"])
    policy = dsl.OneOf(ppo1.outputs["model"], ppon.outputs["model"])

    # evaluation and the gate, then registration only if the gate passed
    ev = c.evaluate(**_args("evaluate", p, dataset=dataset, policy=policy, baseline=sft_model,
                            reward_model=reward_model, compare_champion=p.compare_champion))
    _gpu(ev, p, gpu_device, limit="1")  # evaluation runs one process: more GPUs would sit idle
    # registered either way (the registry is the audit trail); only the passed branch may move champion,
    # and the registry checks the gate again (rlhf.mlops.registry.promotion_decision)
    reg_args = _args("register", p, policy=policy, reward_model=reward_model, evaluation=ev.outputs["evaluation"],
                     data_hash=p.data_hash, data_revision=p.data_revision)
    with dsl.If(ev.outputs["Output"] == "passed", name="gate-passed"):
        reg = c.register(**reg_args)
    with dsl.Else(name="gate-failed"):
        challenger = c.register(**reg_args)

    for name, task in (("sft", sft1), ("reward", rew1), ("ppo", ppo1), ("evaluate", ev), ("register", reg),
                       ("register", challenger)):
        _common(task, stage(name), retries=retries)
    challenger.set_display_name(REGISTER_CHALLENGER)
    if record_images:  # the registry's lineage: which code trained it (rlhf.mlops.registry.image_lineage)
        for task in (reg, challenger):
            task.set_env_variable("RLHF_PIPELINE_IMAGE", c.image).set_env_variable("RLHF_PIPELINE_GPU_IMAGE",
                                                                                   c.gpu_image)
    for name, task in (("sft", sftn), ("reward", rewn), ("ppo", ppon)):
        _common(task, stage(name), retries=retries)
        task.set_display_name(f"{stage(name).display} (Trainer job, multi-node)")


def make_pipeline(image: str | None = None, gpu_image: str | None = None, *, params_yaml: str | None = None,
                  retries: bool = True, gpu_device: str | None = GPU_DEVICE, record_images: bool = True):
    """The pipeline function for these images.

    ``params_yaml``: default of the parameter of the same name (default: ./params.yaml).
    ``retries``: back-off retries on the I/O steps; ``rlhf run`` turns them off (local files do not
    flake, and a deterministic error should be shown at once, not after minutes of back-off).
    ``gpu_device``: ``RLHF_DEVICE`` of the GPU steps (``cuda``: no CPU fallback); ``rlhf run`` passes
    None (its steps run where they are, on the CPU of a laptop). ``record_images``: the register
    steps record the images as lineage (``rlhf run``'s subprocess steps do not run in them).
    """
    c = build(image, gpu_image)
    default_params = default_params_yaml() if params_yaml is None else params_text(params_yaml)
    params = parameters(params_yaml=default_params, training_image=c.gpu_image, data_hash=default_data_hash())

    def rlhf_pipeline(*args):
        _dag(c, SimpleNamespace(**dict(zip([q.name for q in params], args, strict=True))), retries=retries,
             gpu_device=gpu_device, record_images=record_images)

    rlhf_pipeline.__signature__ = inspect.Signature(
        [inspect.Parameter(q.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=q.default, annotation=q.type)
         for q in params])
    rlhf_pipeline.__doc__ = "RLHF pipeline.\n\nArgs:\n" + "".join(f"    {q.name}: {q.help}\n" for q in params)
    return dsl.pipeline(name=PIPELINE_NAME, description="RLHF: prepare -> validate -> SFT -> reward model -> PPO "
                        "-> evaluate -> register (gated on evaluation)")(rlhf_pipeline)


def compile_pipeline(out: str | Path, *, image: str | None = None, gpu_image: str | None = None,
                     params_yaml: str | None = None) -> Path:
    """Write the pipeline YAML (IR + Kubernetes platform spec): the deployable artifact."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(make_pipeline(image, gpu_image, params_yaml=params_yaml), str(out))
    return out


def pipeline_parameters() -> dict[str, Any]:
    """Name -> default of every pipeline parameter (for submit's validation and the parity test)."""
    return {q.name: q.default for q in parameters()}


def typed_parameters(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with a number given for a string parameter as a string (``-p accelerator_limit=2``:
    the command line parses it as YAML, KFP wants a string)."""
    types = {q.name: q.type for q in parameters()}
    return {k: str(v) if types.get(k) is str and isinstance(v, (int, float)) and not isinstance(v, bool) else v
            for k, v in values.items()}
