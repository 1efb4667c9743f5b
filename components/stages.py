"""One KFP component per pipeline stage; each is a few lines around :func:`rlhf.steps.run_component`.

The functions below are plain Python; :func:`build` turns them into lightweight KFP components for
a given image (``install_kfp_package=False`` and no ``packages_to_install``: the image has the
``rlhf`` package and kfp installed, so nothing is pip-installed when a step starts; the local runner
executes them in the current interpreter). Their bodies run in the step's container, so they may
only use imports made inside the body.

Inputs are named as the CLI names them (``dataset``, ``sft``, ``reward_model``, ``policy``, ...);
the knobs (``model_name``, ``lora``, ``max_steps``, ...) override ``params_yaml`` where they are
set: empty string, 0 or a negative number means "as in params.yaml".

The three ``*_multinode`` components are the thin launchers used when ``num_nodes > 1``: they run
on a CPU pod, start a Kubeflow Trainer job (``pipelines.multinode``) that runs the same stage under
``torchrun`` on every node, wait for it, and hand its output on as their own.
"""

import os
from dataclasses import dataclass
from typing import Any

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

DEFAULT_IMAGE = "ghcr.io/rlhf-project/rlhf:0.1.0"
DEFAULT_GPU_IMAGE = DEFAULT_IMAGE + "-cuda"


def default_images() -> tuple[str, str]:
    """(CPU image, GPU image) from ``$RLHF_IMAGE`` / ``$RLHF_GPU_IMAGE``."""
    image = os.environ.get("RLHF_IMAGE") or DEFAULT_IMAGE
    return image, os.environ.get("RLHF_GPU_IMAGE") or image + "-cuda"


# ----------------------------------------------------------------------------------- stage bodies


def prepare(raw_data: str, data_hash: str, data_revision: str, params_yaml: str, profile: str, run_id: str,
            overrides: dict, dataset: Output[Dataset], metrics: Output[Metrics]):
    """Read the raw data (a local path, or the DVC version data_hash) into Parquet train/eval splits."""
    import tempfile

    from rlhf import steps

    steps.setup_logging()
    with tempfile.TemporaryDirectory(prefix="rlhf-raw-") as tmp:
        raw = steps.resolve_raw(raw_data, data_hash, tmp)
        steps.run_component("prepare", inputs={"raw": raw}, out=dataset, metrics=metrics, params_yaml=params_yaml,
                            profile=profile, overrides=overrides, run_id=run_id, data_hash=data_hash,
                            data_revision=data_revision)


def validate(dataset: Input[Dataset], params_yaml: str, profile: str, run_id: str, overrides: dict,
             validation: Output[Artifact], report: Output[HTML], metrics: Output[Metrics]):
    """Check the prepared dataset (Great Expectations); any failed expectation stops the pipeline."""
    from rlhf import steps

    steps.run_component("validate", inputs={"dataset": dataset}, out=validation, metrics=metrics, html=report,
                        params_yaml=params_yaml, profile=profile, overrides=overrides, run_id=run_id)


def sft(dataset: Input[Dataset], params_yaml: str, profile: str, run_id: str, overrides: dict, model_name: str,
        lora: str, max_steps: int, model: Output[Model], metrics: Output[Metrics]):
    """Supervised fine-tuning of the policy on the demonstrations."""
    from rlhf import steps

    knobs = steps.knob_overrides("sft", model_name=model_name, lora=lora, max_steps=max_steps, overrides=overrides)
    steps.run_component("sft", inputs={"dataset": dataset}, out=model, metrics=metrics, params_yaml=params_yaml,
                        profile=profile, overrides=knobs, run_id=run_id)


def reward(dataset: Input[Dataset], sft: Input[Model], params_yaml: str, profile: str, run_id: str,
           overrides: dict, model_name: str, lora: str, max_steps: int, model: Output[Model],
           metrics: Output[Metrics]):
    """Train the scalar reward model on the preference pairs."""
    from rlhf import steps

    knobs = steps.knob_overrides("reward", model_name=model_name, lora=lora, max_steps=max_steps,
                                 overrides=overrides)
    steps.run_component("reward", inputs={"dataset": dataset, "sft": sft}, out=model, metrics=metrics,
                        params_yaml=params_yaml, profile=profile, overrides=knobs, run_id=run_id)


def ppo(dataset: Input[Dataset], sft: Input[Model], reward_model: Input[Model], params_yaml: str, profile: str,
        run_id: str, overrides: dict, model_name: str, lora: str, total_steps: int, kl_coef: float,
        model: Output[Model], metrics: Output[Metrics]):
    """PPO of the SFT policy against the reward model, with a KL penalty to the SFT policy."""
    from rlhf import steps

    knobs = steps.knob_overrides("ppo", model_name=model_name, lora=lora, total_steps=total_steps,
                                 kl_coef=kl_coef, overrides=overrides)
    steps.run_component("ppo", inputs={"dataset": dataset, "sft": sft, "reward_model": reward_model}, out=model,
                        metrics=metrics, params_yaml=params_yaml, profile=profile, overrides=knobs, run_id=run_id)


def evaluate(dataset: Input[Dataset], policy: Input[Model], baseline: Input[Model], reward_model: Input[Model],
             params_yaml: str, profile: str, run_id: str, overrides: dict, model_name: str, lora: str,
             registered_model_name: str, compare_champion: bool, evaluation: Output[Artifact],
             report: Output[HTML], metrics: Output[Metrics]) -> str:
    """Candidate vs SFT baseline (and the registry's champion): metrics, report and the gate.

    Returns "passed" or "failed": the pipeline registers the policy only when the gate passed.
    """
    from rlhf import steps

    knobs = steps.knob_overrides("evaluate", model_name=model_name, lora=lora,
                                 registered_model_name=registered_model_name, overrides=overrides)
    steps.run_component("evaluate", inputs={"dataset": dataset, "policy": policy, "baseline": baseline,
                                            "reward_model": reward_model,
                                            "champion": steps.CHAMPION if compare_champion else None},
                        out=evaluation, metrics=metrics, html=report, params_yaml=params_yaml, profile=profile,
                        overrides=knobs, run_id=run_id)
    return steps.gate_decision(evaluation.path)


def register(policy: Input[Model], reward_model: Input[Model], evaluation: Input[Artifact], params_yaml: str,
             profile: str, run_id: str, overrides: dict, registered_model_name: str, data_hash: str,
             data_revision: str, registration: Output[Artifact], metrics: Output[Metrics], model_name: str = "",
             lora: str = "", sft_max_steps: int = 0, reward_max_steps: int = 0, ppo_total_steps: int = 0,
             ppo_kl_coef: float = -1.0):
    """Register the policy and reward model in MLflow; champion moves per the gate (idempotent on retry).

    Gets every knob of the run, so that the version records the configuration that was trained.
    """
    from rlhf import steps

    knobs = steps.pipeline_overrides(overrides, {
        "model_name": model_name, "lora": lora, "sft_max_steps": sft_max_steps, "reward_max_steps": reward_max_steps,
        "ppo_total_steps": ppo_total_steps, "ppo_kl_coef": ppo_kl_coef,
        "registered_model_name": registered_model_name})
    steps.run_component("register", inputs={"policy": policy, "reward_model": reward_model,
                                            "evaluation": evaluation},
                        out=registration, metrics=metrics, params_yaml=params_yaml, profile=profile, overrides=knobs,
                        run_id=run_id, data_hash=data_hash, data_revision=data_revision)


# ------------------------------------------------------------------------------- multi-node launchers


def sft_multinode(dataset: Input[Dataset], params_yaml: str, profile: str, run_id: str, overrides: dict,
                  model_name: str, lora: str, max_steps: int, num_nodes: int, accelerator_type: str,
                  accelerator_limit: int, cpu: str, memory: str, node_selector: dict, tolerations: list,
                  image: str, namespace: str, job_kind: str, scratch_url: str, timeout_s: int,
                  model: Output[Model], metrics: Output[Metrics]):
    """SFT on num_nodes nodes: a Kubeflow Trainer job running `torchrun -m rlhf.cli sft` (this step waits)."""
    import os
    import sys

    sys.path.insert(0, os.environ.get("RLHF_APP_DIR", "/app"))
    from pipelines import multinode
    from rlhf import steps

    knobs = steps.knob_overrides("sft", model_name=model_name, lora=lora, max_steps=max_steps, overrides=overrides)
    multinode.run_stage_job("sft", inputs={"dataset": dataset}, out=model, metrics=metrics,
                            params_yaml=params_yaml, profile=profile, overrides=knobs, run_id=run_id,
                            num_nodes=num_nodes, accelerator_type=accelerator_type,
                            gpus_per_node=accelerator_limit, cpu=cpu, memory=memory, node_selector=node_selector,
                            tolerations=tolerations, image=image, namespace=namespace, kind=job_kind,
                            scratch_url=scratch_url, timeout_s=timeout_s)


def reward_multinode(dataset: Input[Dataset], sft: Input[Model], params_yaml: str, profile: str, run_id: str,
                     overrides: dict, model_name: str, lora: str, max_steps: int, num_nodes: int,
                     accelerator_type: str, accelerator_limit: int, cpu: str, memory: str, node_selector: dict,
                     tolerations: list, image: str, namespace: str, job_kind: str, scratch_url: str,
                     timeout_s: int, model: Output[Model], metrics: Output[Metrics]):
    """Reward model on num_nodes nodes: a Trainer job running `torchrun -m rlhf.cli reward`."""
    import os
    import sys

    sys.path.insert(0, os.environ.get("RLHF_APP_DIR", "/app"))
    from pipelines import multinode
    from rlhf import steps

    knobs = steps.knob_overrides("reward", model_name=model_name, lora=lora, max_steps=max_steps,
                                 overrides=overrides)
    multinode.run_stage_job("reward", inputs={"dataset": dataset, "sft": sft}, out=model, metrics=metrics,
                            params_yaml=params_yaml, profile=profile, overrides=knobs, run_id=run_id,
                            num_nodes=num_nodes, accelerator_type=accelerator_type,
                            gpus_per_node=accelerator_limit, cpu=cpu, memory=memory, node_selector=node_selector,
                            tolerations=tolerations, image=image, namespace=namespace, kind=job_kind,
                            scratch_url=scratch_url, timeout_s=timeout_s)


def ppo_multinode(dataset: Input[Dataset], sft: Input[Model], reward_model: Input[Model], params_yaml: str,
                  profile: str, run_id: str, overrides: dict, model_name: str, lora: str, total_steps: int,
                  kl_coef: float, num_nodes: int, accelerator_type: str, accelerator_limit: int, cpu: str,
                  memory: str, node_selector: dict, tolerations: list, image: str, namespace: str,
                  job_kind: str, scratch_url: str, timeout_s: int, model: Output[Model],
                  metrics: Output[Metrics]):
    """PPO on num_nodes nodes: a Trainer job running `torchrun -m rlhf.cli ppo` (DDP across all GPUs)."""
    import os
    import sys

    sys.path.insert(0, os.environ.get("RLHF_APP_DIR", "/app"))
    from pipelines import multinode
    from rlhf import steps

    knobs = steps.knob_overrides("ppo", model_name=model_name, lora=lora, total_steps=total_steps,
                                 kl_coef=kl_coef, overrides=overrides)
    multinode.run_stage_job("ppo", inputs={"dataset": dataset, "sft": sft, "reward_model": reward_model},
                            out=model, metrics=metrics, params_yaml=params_yaml, profile=profile, overrides=knobs,
                            run_id=run_id, num_nodes=num_nodes, accelerator_type=accelerator_type,
                            gpus_per_node=accelerator_limit, cpu=cpu, memory=memory, node_selector=node_selector,
                            tolerations=tolerations, image=image, namespace=namespace, kind=job_kind,
                            scratch_url=scratch_url, timeout_s=timeout_s)


# ----------------------------------------------------------------------------------------- factory

STAGE_FUNCS = {"prepare": prepare, "validate": validate, "sft": sft, "reward": reward, "ppo": ppo,
               "evaluate": evaluate, "register": register}
MULTINODE_FUNCS = {"sft": sft_multinode, "reward": reward_multinode, "ppo": ppo_multinode}
GPU_STAGES = ("sft", "reward", "ppo", "evaluate")


@dataclass(frozen=True)
class Components:
    """The KFP components for one pair of images."""

    image: str
    gpu_image: str
    stages: dict[str, Any]
    multinode: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.stages[name]
        except KeyError:
            raise AttributeError(name) from None


def build(image: str | None = None, gpu_image: str | None = None) -> Components:
    """KFP components of every stage: CPU stages on ``image``, GPU stages on ``gpu_image``."""
    if image:
        gpu_image = gpu_image or image + "-cuda"
    else:
        image, default_gpu = default_images()
        gpu_image = gpu_image or default_gpu

    def make(func, base_image):
        return dsl.component(func, base_image=base_image, install_kfp_package=False, packages_to_install=[])

    stages = {name: make(f, gpu_image if name in GPU_STAGES else image) for name, f in STAGE_FUNCS.items()}
    launchers = {name: make(f, image) for name, f in MULTINODE_FUNCS.items()}
    return Components(image=image, gpu_image=gpu_image, stages=stages, multinode=launchers)
