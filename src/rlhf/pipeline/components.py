"""KFP components, one per stage (and a launcher per multi-node stage).

GENERATED from the stage table (src/rlhf/pipeline/stages.py) by `make codegen`: do not edit.
Each body hands its arguments to :func:`rlhf.pipeline.steps.kfp_step` (or ``kfp_job``).
"""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output  # noqa: F401


def prepare(raw_data: str, data_hash: str, data_revision: str, params_yaml: str, profile: str,
            overrides: dict, dataset: Output[Dataset], metrics: Output[Metrics]):
    """Read raw data (JSONL, chat messages, HH-RLHF) into deduplicated Parquet train/eval splits."""
    from rlhf.pipeline import steps

    steps.kfp_step("prepare", locals())


def validate(dataset: Input[Dataset], params_yaml: str, profile: str, overrides: dict,
             validation: Output[Artifact], report: Output[HTML], metrics: Output[Metrics]):
    """Check the prepared dataset with Great Expectations; fail before training on any violation."""
    from rlhf.pipeline import steps

    steps.kfp_step("validate", locals())


def sft(dataset: Input[Dataset], params_yaml: str, profile: str, run_id: str, overrides: dict,
        model: Output[Model], metrics: Output[Metrics], model_name: str = '', lora: str = '',
        sft_max_steps: int = 0):
    """Supervised fine-tuning of the policy on the demonstrations (loss on response tokens only)."""
    from rlhf.pipeline import steps

    steps.kfp_step("sft", locals())


def reward(dataset: Input[Dataset], sft: Input[Model], params_yaml: str, profile: str, run_id: str,
           overrides: dict, model: Output[Model], metrics: Output[Metrics], model_name: str = '',
           lora: str = '', reward_max_steps: int = 0):
    """Train the scalar reward model on the preference pairs (Bradley-Terry loss)."""
    from rlhf.pipeline import steps

    steps.kfp_step("reward", locals())


def ppo(dataset: Input[Dataset], sft: Input[Model], reward_model: Input[Model], params_yaml: str,
        profile: str, run_id: str, overrides: dict, model: Output[Model], metrics: Output[Metrics],
        model_name: str = '', lora: str = '', ppo_total_steps: int = 0, ppo_kl_coef: float = -1.0):
    """PPO against the reward model; resumes from <out>.checkpoints. Multi-GPU: torchrun -m rlhf.cli ppo."""
    from rlhf.pipeline import steps

    steps.kfp_step("ppo", locals())


def evaluate(dataset: Input[Dataset], policy: Input[Model], baseline: Input[Model],
             reward_model: Input[Model], params_yaml: str, profile: str, run_id: str, overrides: dict,
             compare_champion: bool, evaluation: Output[Artifact], report: Output[HTML],
             metrics: Output[Metrics], model_name: str = '', lora: str = '', registered_model_name: str = '') -> str:
    """Sample from the candidate, the SFT baseline (and champion); gold/RM/KL metrics, report, gate."""
    from rlhf.pipeline import steps

    return steps.kfp_step("evaluate", locals())


def register(policy: Input[Model], reward_model: Input[Model], evaluation: Input[Artifact],
             params_yaml: str, profile: str, run_id: str, overrides: dict, data_hash: str,
             data_revision: str, registration: Output[Artifact], metrics: Output[Metrics],
             model_name: str = '', lora: str = '', sft_max_steps: int = 0, reward_max_steps: int = 0,
             ppo_total_steps: int = 0, ppo_kl_coef: float = -1.0, registered_model_name: str = ''):
    """Register the policy (+ reward model) in MLflow: alias challenger; champion only if the gate passed."""
    from rlhf.pipeline import steps

    steps.kfp_step("register", locals())


def sft_multinode(dataset: Input[Dataset], params_yaml: str, profile: str, run_id: str, overrides: dict,
                  num_nodes: int, accelerator_type: str, accelerator_limit: str, cpu: str, memory: str,
                  node_selector: dict, tolerations: list, image: str, namespace: str, job_kind: str,
                  scratch_url: str, timeout_s: int, model: Output[Model], metrics: Output[Metrics],
                  model_name: str = '', lora: str = '', sft_max_steps: int = 0):
    """Supervised fine-tuning on num_nodes nodes: a Kubeflow Trainer job running `torchrun -m rlhf.cli sft` (this step waits)."""
    from rlhf.pipeline import steps

    steps.kfp_job("sft", locals())


def reward_multinode(dataset: Input[Dataset], sft: Input[Model], params_yaml: str, profile: str,
                     run_id: str, overrides: dict, num_nodes: int, accelerator_type: str,
                     accelerator_limit: str, cpu: str, memory: str, node_selector: dict, tolerations: list,
                     image: str, namespace: str, job_kind: str, scratch_url: str, timeout_s: int,
                     model: Output[Model], metrics: Output[Metrics], model_name: str = '', lora: str = '',
                     reward_max_steps: int = 0):
    """Reward model on num_nodes nodes: a Kubeflow Trainer job running `torchrun -m rlhf.cli reward` (this step waits)."""
    from rlhf.pipeline import steps

    steps.kfp_job("reward", locals())


def ppo_multinode(dataset: Input[Dataset], sft: Input[Model], reward_model: Input[Model], params_yaml: str,
                  profile: str, run_id: str, overrides: dict, num_nodes: int, accelerator_type: str,
                  accelerator_limit: str, cpu: str, memory: str, node_selector: dict, tolerations: list,
                  image: str, namespace: str, job_kind: str, scratch_url: str, timeout_s: int,
                  model: Output[Model], metrics: Output[Metrics], model_name: str = '', lora: str = '',
                  ppo_total_steps: int = 0, ppo_kl_coef: float = -1.0):
    """PPO on num_nodes nodes: a Kubeflow Trainer job running `torchrun -m rlhf.cli ppo` (this step waits)."""
    from rlhf.pipeline import steps

    steps.kfp_job("ppo", locals())


STAGE_FUNCS = {"prepare": prepare, "validate": validate, "sft": sft, "reward": reward, "ppo": ppo, "evaluate": evaluate, "register": register}
MULTINODE_FUNCS = {"sft": sft_multinode, "reward": reward_multinode, "ppo": ppo_multinode}
