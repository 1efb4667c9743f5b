"""The stage table: one declaration per pipeline stage, and every door into the stages comes from it.

    prepare -> validate -> sft -> reward -> ppo -> evaluate -> register (only if the gate passed)

From each :class:`Stage` below:

* the CLI command ``rlhf <stage>`` (options, defaults, help: :mod:`rlhf.cli`);
* the step runner :func:`rlhf.pipeline.steps.run_stage` (which function, which inputs, which configs);
* the KFP component and its Kubernetes settings (``src/rlhf/pipeline/components.py`` is generated
  from this table; :mod:`rlhf.pipeline.dag` wires them);
* the DVC stage in ``dvc.yaml`` (generated; ``make codegen`` rewrites both, a test checks them).

A stage function is called as ``func(*required_inputs, out, *configs, **optional_inputs)``: the
required inputs in the order declared, the output path, then one config object per entry of
``sections`` (validated, resolved by :mod:`rlhf.config.resolve`), then the optional inputs by name.

This module imports nothing heavy: the CLI builds its help from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf.errors import ConfigError


@dataclass(frozen=True)
class Input:
    """A stage input. ``kind``: ``artifact`` (a KFP artifact produced by ``source``), ``raw`` (prepare's
    raw data: a path, a URL or a DVC data version) or ``champion`` (the registry's champion policy)."""

    name: str
    flags: tuple[str, ...]
    default: str
    help: str
    kfp_type: str = "Model"
    source: tuple[str, str] | None = None  # (stage, output) whose output this input is
    kind: str = "artifact"
    optional: bool = False


@dataclass(frozen=True)
class Output:
    """A stage's output artifact (a directory with a ``manifest.json``).

    ``file``: the output is one file inside the artifact directory (register's receipt); the CLI's
    ``--out`` then names that file.
    """

    name: str
    default: str
    help: str
    kfp_type: str = "Model"
    file: str | None = None
    kind: str = "policy"           # the ``kind`` its manifest records (what a previous output looks like)


@dataclass(frozen=True)
class Option:
    """A CLI option of one stage that is not an input (``rlhf evaluate --champion-from-registry``)."""

    name: str
    flags: tuple[str, ...]
    type: type
    default: Any
    help: str
    envvar: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    help: str                      # one line: the CLI help and the KFP component's description
    func: str                      # "module:function" of the stage function
    inputs: tuple[Input, ...]
    output: Output
    sections: tuple[str, ...]      # configs passed to the function, in its argument order
    code: tuple[str, ...]          # source paths the stage depends on (dvc.yaml deps)
    done: str | Callable[[str, dict[str, Any]], str]  # CLI line when it finished: template or function
    display: str = ""              # KFP display name
    timeout_s: int = 3600
    gpu: bool = False              # runs on a GPU node (training image, accelerator settings)
    cpu_request: tuple[str, str] | None = None  # (cpu, memory) of a CPU step
    cache: bool = True             # KFP caching (a cached stage's component takes no per-run argument)
    retries: bool = False          # back-off retries (steps that do I/O against remote services)
    report: bool = False           # has an HTML report (a KFP HTML output)
    returns_gate: bool = False     # the KFP component returns "passed"/"failed" (evaluate)
    reads: tuple[str, ...] = ()    # other config sections the stage reads (its knobs; dvc params)
    after: tuple[str, ...] = ()    # stages that must finish first without feeding an input
    multinode: bool = False        # with num_nodes > 1 runs as a Kubeflow Trainer job
    options: tuple[Option, ...] = ()
    dvc_cmd_extra: tuple[str, ...] = ()
    dvc_outs_cache: bool = True
    dvc_notes: tuple[str, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs if i.optional)

    @property
    def required_inputs(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if not i.optional)

    @property
    def config_sections(self) -> tuple[str, ...]:
        """Every section the stage reads: what its knobs may set and its DVC params."""
        return tuple(dict.fromkeys(self.sections + self.reads))

    def done_line(self, out: str, metrics: dict[str, Any]) -> str:
        return self.done(out, metrics) if callable(self.done) else self.done.format(out=out, **metrics)


# ------------------------------------------------------------------------------------------ inputs

DATASET = Input("dataset", ("--dataset",), "artifacts/dataset", "prepared dataset directory", "Dataset",
                ("prepare", "dataset"))
SFT = Input("sft", ("--sft", "--sft-model"), "artifacts/sft", "the SFT policy", source=("sft", "model"))
REWARD = Input("reward_model", ("--reward", "--reward-model"), "artifacts/reward", "reward model",
               source=("reward", "model"))
POLICY = Input("policy", ("--policy",), "artifacts/ppo", "candidate policy (the PPO policy)",
               source=("ppo", "model"))

TRAINING_SECTIONS = ("model",)
PY = "src/rlhf"


def _evaluate_done(out: str, m: dict[str, Any]) -> str:
    return f"evaluation in {out} (gate {'PASSED' if m.get('gate_passed') else 'FAILED'}, report {out}/report.html)"


def _register_done(out: str, r: dict[str, Any]) -> str:
    if not r.get("registered", True):
        return f"{r.get('model_name')}: not registered ({r.get('reason')})"
    state = f"champion -> v{r['version']}" if r.get("promoted") else \
        f"champion stays {('v' + str(r['champion'])) if r.get('champion') else 'unset'}"
    return (f"{r['model_name']} v{r['version']} ({'new' if r.get('created') else 'existing'}, "
            f"aliases: {', '.join(r.get('aliases') or []) or '-'}); {state}: {r.get('decision')}")


#: The pipeline, in order.
STAGES: tuple[Stage, ...] = (
    Stage("prepare", "Read raw data (JSONL, chat messages, HH-RLHF) into deduplicated Parquet train/eval splits.",
          "rlhf.data.prepare:prepare",
          inputs=(Input("raw", ("--raw",), "data/raw", "raw data: a JSONL/JSON file or a directory of them",
                        kind="raw"),),
          output=Output("dataset", "artifacts/dataset", "output dataset directory", "Dataset", kind="dataset"),
          sections=("prepare",), code=(f"{PY}/data/prepare.py",), done="prepared {out}",
          display="Prepare data", cpu_request=("1", "4Gi"), retries=True),
    Stage("validate", "Check the prepared dataset with Great Expectations; fail before training on any violation.",
          "rlhf.data.validate:validate", inputs=(DATASET,),
          output=Output("validation", "artifacts/validation", "where the report is written", "Artifact",
                        kind="validation-report"),
          sections=("validate",), code=(f"{PY}/data/validate.py",), done="validation passed, report in {out}",
          display="Validate data", cpu_request=("1", "4Gi"), report=True),
    Stage("sft", "Supervised fine-tuning of the policy on the demonstrations (loss on response tokens only).",
          "rlhf.train.sft:train_sft", inputs=(DATASET,),
          output=Output("model", "artifacts/sft", "output policy directory"),
          sections=("sft", "model"), code=(f"{PY}/train/sft.py", f"{PY}/train/loop.py", f"{PY}/train/models.py",
                                           f"{PY}/train/distributed.py", f"{PY}/train/precision.py",
                                           f"{PY}/train/checkpoint.py"),
          done="SFT policy written to {out}", display="Supervised fine-tuning", timeout_s=12 * 3600, gpu=True,
          cache=False, after=("validate",), multinode=True,
          dvc_notes=("checkpoints go to artifacts/sft.checkpoints (not an out: a killed run resumes from them)",)),
    Stage("reward", "Train the scalar reward model on the preference pairs (Bradley-Terry loss).",
          "rlhf.train.reward:train_reward",
          inputs=(DATASET, Input("sft", ("--sft",), "artifacts/sft", "SFT policy to initialise from",
                                 source=("sft", "model"))),
          output=Output("model", "artifacts/reward", "output reward-model directory", kind="reward-model"),
          sections=("reward", "model"),
          code=(f"{PY}/train/reward.py", f"{PY}/train/loop.py", f"{PY}/train/models.py",
                f"{PY}/train/distributed.py", f"{PY}/train/precision.py", f"{PY}/train/checkpoint.py"),
          done="reward model written to {out}", display="Reward model", timeout_s=12 * 3600, gpu=True,
          cache=False, multinode=True,
          dvc_notes=("checkpoints go to artifacts/reward.checkpoints (not an out: a killed run resumes from them)",)),
    Stage("ppo", "PPO against the reward model; resumes from <out>.checkpoints. Multi-GPU: torchrun -m rlhf.cli ppo.",
          "rlhf.ppo:train_ppo",
          inputs=(Input("dataset", ("--dataset",), "artifacts/dataset",
                        "prepared dataset directory (train prompts)", "Dataset", ("prepare", "dataset")),
                  Input("sft", ("--sft", "--sft-model"), "artifacts/sft",
                        "SFT policy to start from (and the KL reference)", source=("sft", "model")),
                  REWARD),
          output=Output("model", "artifacts/ppo", "output policy directory (+ critic/)"),
          sections=("ppo", "model"), code=(f"{PY}/ppo", f"{PY}/train/generation.py", f"{PY}/train/models.py",
                                           f"{PY}/train/distributed.py", f"{PY}/train/precision.py",
                                           f"{PY}/train/checkpoint.py"),
          done="PPO policy written to {out}", display="PPO", timeout_s=24 * 3600, gpu=True, cache=False,
          multinode=True,
          dvc_notes=("checkpoints go to artifacts/ppo.checkpoints (not an out: a killed run resumes from them)",)),
    Stage("evaluate", "Sample from the candidate, the SFT baseline (and champion); gold/RM/KL metrics, report, gate.",
          "rlhf.evaluate:evaluate",
          inputs=(DATASET, POLICY,
                  Input("baseline", ("--baseline",), "artifacts/sft", "baseline policy (the SFT policy)",
                        source=("sft", "model")),
                  Input("reward_model", ("--reward",), "artifacts/reward", "reward model",
                        source=("reward", "model")),
                  Input("champion", ("--champion",), "", "current champion policy directory, if any",
                        kind="champion", optional=True)),
          output=Output("evaluation", "artifacts/evaluation", "where metrics, report and gate go", "Artifact",
                        kind="evaluation"),
          sections=("evaluate", "model"), reads=("register",),
          code=(f"{PY}/evaluate.py", f"{PY}/curves.py", f"{PY}/ppo/snapshots.py", f"{PY}/train/generation.py"),
          done=_evaluate_done, display="Evaluate + gate", timeout_s=4 * 3600, gpu=True, report=True,
          returns_gate=True, cache=False,  # reads the registry's champion: the same inputs may mean another gate
          options=(Option("champion_from_registry", ("--champion-from-registry",), bool, False,
                          "compare with models:/<register.model_name>@champion when there is one (what "
                          "`dvc repro` does)"),),
          dvc_cmd_extra=("--champion-from-registry",),
          dvc_notes=("Compares with models:/<register.model_name>@champion when there is one (the gate then needs to",
                     "beat it). The champion lives in MLflow, not in a DVC dep: a new champion alone does not re-run",
                     "this stage (`dvc repro -f evaluate` does).")),
    Stage("register", "Register the policy (+ reward model) in MLflow: alias challenger; champion only if the gate passed.",
          "rlhf.pipeline.steps:register",
          inputs=(Input("policy", ("--policy",), "artifacts/ppo", "the evaluated policy", source=("ppo", "model")),
                  Input("reward_model", ("--reward",), "artifacts/reward", "its reward model",
                        source=("reward", "model")),
                  Input("evaluation", ("--evaluation",), "artifacts/evaluation",
                        "the evaluation (gate.json) of the policy", "Artifact", ("evaluate", "evaluation"))),
          output=Output("registration", "artifacts/registration.json", "receipt (JSON) of what happened",
                        "Artifact", file="registration.json", kind="registration"),
          sections=("register",), reads=("prepare", "validate", "model", "sft", "reward", "ppo", "evaluate"),
          code=(f"{PY}/mlops/registry.py",), done=_register_done, display="Register model (MLflow)",
          timeout_s=1800, cpu_request=("1", "4Gi"), cache=False, retries=True,
          options=(Option("pipeline_run_id", ("--pipeline-run-id",), str, None,
                          "retries with the same id never create a second version", "RLHF_PIPELINE_RUN_ID"),),
          dvc_outs_cache=False,
          dvc_notes=("Side effects live in MLflow (MLFLOW_TRACKING_URI, default ./mlflow.db); the receipt is the out.",
                     "Idempotent: re-running registers nothing new for the same policy (content hash tag).")),
)

STAGE_NAMES = tuple(s.name for s in STAGES)
TRAINING_STAGES = tuple(s.name for s in STAGES if s.multinode)
#: evaluate's ``champion`` input: fetch the current champion of the registered model from the registry
CHAMPION = "@champion"


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ConfigError(f"unknown stage '{name}'", hint=f"stages: {', '.join(STAGE_NAMES)}")


def _check_table() -> None:
    """Each input's source is an earlier stage's output; names are unique."""
    seen: dict[str, Stage] = {}
    for s in STAGES:
        for i in s.inputs:
            if i.source:
                src, out = i.source
                assert src in seen and seen[src].output.name == out, (s.name, i.name, i.source)
        for a in s.after:
            assert a in seen, (s.name, a)
        assert len(set(s.input_names)) == len(s.inputs), s.name
        seen[s.name] = s


_check_table()

__all__ = ["Input", "Output", "Option", "Stage", "STAGES", "STAGE_NAMES", "TRAINING_STAGES", "CHAMPION", "stage"]
