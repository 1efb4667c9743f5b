"""The RLHF pipeline as a KFP v2 DAG.

    prepare -> validate -> [sft -> reward -> ppo] -> evaluate -> dsl.If(gate passed) -> register
                            single node: the stage components on a GPU pod each
                            num_nodes > 1: launchers of Kubeflow Trainer jobs (pipelines.multinode)

Per task: display name, CPU/memory requests, timeout, the ``rlhf-config`` ConfigMap and the
``rlhf-storage`` Secret as environment (MLflow URI, DVC remote, S3 credentials: never literals).
GPU tasks (sft, reward, ppo, evaluate): accelerator type and limit from pipeline parameters, the GPU
node selector and toleration (pipeline parameters, passed as JSON to kfp-kubernetes), ``/dev/shm``
as a memory-backed emptyDir. Caching is off for training and registration; retries with back-off
only on the steps that do I/O against remote services (prepare: DVC remote; register: MLflow).

``make_pipeline()`` builds the pipeline function for a pair of images; ``rlhf_pipeline`` is the one
for ``$RLHF_IMAGE`` / ``$RLHF_GPU_IMAGE`` (default ``ghcr.io/rlhf-project/rlhf:0.1.0``, ``...-cuda``).
"""


from pathlib import Path
from typing import Any

from kfp import dsl, kubernetes

from components import stages as comps

PIPELINE_NAME = "rlhf"
CONFIG_MAP = "rlhf-config"
STORAGE_SECRET = "rlhf-storage"
CONFIG_MAP_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "DVC_REMOTE_URL",
                   "DVC_REMOTE_ENDPOINT_URL", "RLHF_TRAINING_NAMESPACE")
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
POD_LABEL = ("rlhf.io/pipeline-pod", "true")
SHM_SIZE = "16Gi"

#: seconds; per stage
TIMEOUTS = {"prepare": 3600, "validate": 3600, "sft": 12 * 3600, "reward": 12 * 3600, "ppo": 24 * 3600,
            "evaluate": 4 * 3600, "register": 1800}
DISPLAY = {"prepare": "Prepare data", "validate": "Validate data", "sft": "Supervised fine-tuning",
           "reward": "Reward model", "ppo": "PPO", "evaluate": "Evaluate + gate",
           "register": "Register model (MLflow)"}
CPU_REQUESTS = {"prepare": ("1", "4Gi"), "validate": ("1", "4Gi"), "register": ("1", "4Gi")}
IO_STAGES = ("prepare", "register")
NO_CACHE = ("sft", "reward", "ppo", "register")
RETRY = {"num_retries": 3, "backoff_duration": "30s", "backoff_factor": 2.0, "backoff_max_duration": "600s"}


def params_text(text: str) -> str:
    """params.yaml as one line of JSON (valid YAML too) for the ``params_yaml`` parameter.

    One line because the KFP compiler copies parameter defaults into the YAML's header comment
    verbatim: a multi-line default would break the compiled file.
    """
    import json

    import yaml

    data = yaml.safe_load(text or "") or {}
    return json.dumps(data, sort_keys=False, separators=(",", ":"))


def default_params_yaml() -> str:
    """params.yaml of the working directory (or the repository), embedded as the default parameter."""
    for p in (Path("params.yaml"), Path(__file__).resolve().parents[1] / "params.yaml"):
        if p.exists():
            return params_text(p.read_text(encoding="utf-8"))
    return "{}"


def _common(task, stage: str, *, retries: bool) -> None:
    task.set_display_name(DISPLAY[stage])
    kubernetes.set_timeout(task, TIMEOUTS[stage])
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, {k: k for k in CONFIG_MAP_KEYS})
    kubernetes.use_secret_as_env(task, STORAGE_SECRET, {k: k for k in SECRET_KEYS})
    kubernetes.add_pod_label(task, *POD_LABEL)
    if stage in NO_CACHE:
        task.set_caching_options(False)
    if retries and stage in IO_STAGES:
        task.set_retry(**RETRY)
    if stage in CPU_REQUESTS:
        cpu, mem = CPU_REQUESTS[stage]
        task.set_cpu_request(cpu).set_memory_request(mem)


def _gpu(task, *, accelerator_type, accelerator_limit, cpu, memory, node_selector, tolerations) -> None:
    task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_limit)
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=SHM_SIZE)


def _job_timeout(stage: str) -> int:
    """A Trainer job's deadline: the launcher step's timeout less time to stage data in and out."""
    return TIMEOUTS[stage] - 900


def make_pipeline(image: str | None = None, gpu_image: str | None = None, *, params_yaml: str | None = None,
                  retries: bool = True):
    """The pipeline function for these images.

    ``params_yaml``: default of the parameter of the same name (default: ./params.yaml).
    ``retries``: back-off retries on the I/O steps; ``rlhf run`` turns them off (local files do not
    flake, and a deterministic error should be shown at once, not after minutes of back-off).
    """
    c = comps.build(image, gpu_image)
    default_params = default_params_yaml() if params_yaml is None else params_text(params_yaml)

    @dsl.pipeline(name=PIPELINE_NAME, description="RLHF: prepare -> validate -> SFT -> reward model -> PPO -> "
                  "evaluate -> register (gated on evaluation)")
    def rlhf_pipeline(
        data_revision: str = "",
        data_hash: str = "",
        raw_data: str = "",
        params_yaml: str = default_params,
        profile: str = "",
        overrides: dict = {},  # noqa: B006 - KFP needs a literal default
        model_name: str = "",
        lora: str = "",
        sft_max_steps: int = 0,
        reward_max_steps: int = 0,
        ppo_total_steps: int = 0,
        ppo_kl_coef: float = -1.0,
        registered_model_name: str = "",
        compare_champion: bool = True,
        accelerator_type: str = "nvidia.com/gpu",
        accelerator_limit: int = 1,
        num_nodes: int = 1,
        gpu_node_selector: dict = GPU_NODE_SELECTOR,
        gpu_tolerations: list = GPU_TOLERATIONS,
        train_cpu: str = "4",
        train_memory: str = "32Gi",
        training_image: str = c.gpu_image,
        training_namespace: str = "rlhf",
        job_kind: str = "TrainJob",
        scratch_url: str = "",
    ):
        """RLHF pipeline.

        Args:
            data_revision: git commit/tag of the data version (recorded as lineage).
            data_hash: DVC md5 of data/raw (data.dvc); the prepare step fetches it from DVC_REMOTE_URL.
            raw_data: a path or URL of raw data to use instead of the DVC version (local runs).
            params_yaml: the full params.yaml (default: the one this pipeline was compiled with).
            profile: params profile ('' = params.yaml's `profile:`, 'none' = the base sections).
            overrides: any config field, {section: {field: value}}.
            model_name: base model (model.name); '' = as in params.yaml.
            lora: 'true' / 'false' (model.lora); '' = as in params.yaml.
            sft_max_steps: sft.max_steps; 0 = as in params.yaml.
            reward_max_steps: reward.max_steps; 0 = as in params.yaml.
            ppo_total_steps: ppo.total_steps; 0 = as in params.yaml.
            ppo_kl_coef: ppo.kl_coef (beta); negative = as in params.yaml.
            registered_model_name: MLflow registered model name; '' = register.model_name or rlhf-policy.
            compare_champion: evaluate against the registry's current champion too.
            accelerator_type: GPU resource name of training/evaluation steps.
            accelerator_limit: GPUs per training/evaluation step (per node with num_nodes > 1).
            num_nodes: > 1 runs sft/reward/ppo as multi-node Kubeflow Trainer jobs.
            gpu_node_selector: node selector of GPU steps.
            gpu_tolerations: tolerations of GPU steps.
            train_cpu: CPU request of GPU steps.
            train_memory: memory request and limit of GPU steps.
            training_image: image of the multi-node training jobs' pods.
            training_namespace: namespace of the multi-node training jobs.
            job_kind: TrainJob (Kubeflow Trainer v2) or PyTorchJob (Training Operator v1).
            scratch_url: object-store prefix for multi-node job data ('' = $DVC_REMOTE_URL/runs).
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        base = {"params_yaml": params_yaml, "profile": profile, "run_id": run_id, "overrides": overrides}
        gpu = {"accelerator_type": accelerator_type, "accelerator_limit": accelerator_limit, "cpu": train_cpu,
               "memory": train_memory, "node_selector": gpu_node_selector, "tolerations": gpu_tolerations}
        launch = {"num_nodes": num_nodes, **gpu, "image": training_image, "namespace": training_namespace,
                  "job_kind": job_kind, "scratch_url": scratch_url}

        prep = c.prepare(raw_data=raw_data, data_hash=data_hash, data_revision=data_revision, **base)
        _common(prep, "prepare", retries=retries)
        val = c.validate(dataset=prep.outputs["dataset"], **base)
        _common(val, "validate", retries=retries)
        dataset = prep.outputs["dataset"]
        model = {"model_name": model_name, "lora": lora}

        with dsl.If(num_nodes <= 1, name="single-node-training"):
            sft1 = c.sft(dataset=dataset, max_steps=sft_max_steps, **model, **base).after(val)
            rew1 = c.reward(dataset=dataset, sft=sft1.outputs["model"], max_steps=reward_max_steps, **model, **base)
            ppo1 = c.ppo(dataset=dataset, sft=sft1.outputs["model"], reward_model=rew1.outputs["model"],
                         total_steps=ppo_total_steps, kl_coef=ppo_kl_coef, **model, **base)
            for stage, task in (("sft", sft1), ("reward", rew1), ("ppo", ppo1)):
                _common(task, stage, retries=retries)
                _gpu(task, accelerator_type=accelerator_type, accelerator_limit=accelerator_limit, cpu=train_cpu,
                     memory=train_memory, node_selector=gpu_node_selector, tolerations=gpu_tolerations)
        with dsl.Else(name="multi-node-training"):
            m = c.multinode
            sftn = m["sft"](dataset=dataset, max_steps=sft_max_steps, timeout_s=_job_timeout("sft"), **model,
                            **base, **launch).after(val)
            rewn = m["reward"](dataset=dataset, sft=sftn.outputs["model"], max_steps=reward_max_steps,
                               timeout_s=_job_timeout("reward"), **model, **base, **launch)
            ppon = m["ppo"](dataset=dataset, sft=sftn.outputs["model"], reward_model=rewn.outputs["model"],
                            total_steps=ppo_total_steps, kl_coef=ppo_kl_coef, timeout_s=_job_timeout("ppo"),
                            **model, **base, **launch)
            for stage, task in (("sft", sftn), ("reward", rewn), ("ppo", ppon)):
                _common(task, stage, retries=retries)
                task.set_display_name(f"{DISPLAY[stage]} (Trainer job, multi-node)")
                task.set_cpu_request("500m").set_memory_request("1Gi")
        sft_model = dsl.OneOf(sft1.outputs["model"], sftn.outputs["model"])
        reward_model = dsl.OneOf(rew1.outputs["model"], rewn.outputs["model"])
        policy = dsl.OneOf(ppo1.outputs["model"], ppon.outputs["model"])

        ev = c.evaluate(dataset=dataset, policy=policy, baseline=sft_model, reward_model=reward_model,
                        registered_model_name=registered_model_name, compare_champion=compare_champion, **model,
                        **base)
        _common(ev, "evaluate", retries=retries)
        _gpu(ev, accelerator_type=accelerator_type, accelerator_limit=accelerator_limit, cpu=train_cpu,
             memory=train_memory, node_selector=gpu_node_selector, tolerations=gpu_tolerations)

        with dsl.If(ev.outputs["Output"] == "passed", name="gate-passed"):
            reg = c.register(policy=policy, reward_model=reward_model, evaluation=ev.outputs["evaluation"],
                             registered_model_name=registered_model_name, data_hash=data_hash,
                             data_revision=data_revision, sft_max_steps=sft_max_steps,
                             reward_max_steps=reward_max_steps, ppo_total_steps=ppo_total_steps,
                             ppo_kl_coef=ppo_kl_coef, **model, **base)
            _common(reg, "register", retries=retries)

    return rlhf_pipeline


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
    import inspect

    sig = inspect.signature(make_pipeline(params_yaml="").pipeline_func)
    return {k: p.default for k, p in sig.parameters.items()}
