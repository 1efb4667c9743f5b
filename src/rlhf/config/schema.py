"""Typed stage configs, loaded from ``params.yaml`` and validated at load time.

Each stage has one pydantic model; ``params.yaml`` has one section per stage
with the same field names (the CLI, KFP pipeline parameters and ``dvc.yaml``
all use these names). Unknown keys and bad values are reported as one line
naming the file, the key and what is expected.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: fields that change how a training run is checkpointed and logged, never what it computes: left out of
#: a checkpoint's run fingerprint and of what ``rlhf run --resume`` compares before reusing an output
RUN_ONLY_FIELDS = frozenset({"checkpoint_every", "checkpoint_dir", "keep_checkpoints", "keep_checkpoints_on_success",
                             "resume", "replace_stale_checkpoints", "log_every"})


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class PrepareConfig(StageConfig):
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of prompts held out for eval")
    split_salt: str = Field("rlhf-v1", description="salt of the prompt hash that assigns the split")
    max_line_bytes: int = Field(1 << 20, ge=1024, description="longest accepted input line / record")
    min_chars: int = Field(1, ge=1)
    on_invalid: Literal["fail", "skip"] = Field("fail", description="a malformed record stops prepare "
                                                "(fail) or is dropped and counted (skip)")
    max_invalid_fraction: float = Field(0.01, ge=0, le=1, description="with on_invalid: skip, fail anyway "
                                        "when more than this share of the records is malformed")


class ValidateConfig(StageConfig):
    min_rows: dict[str, int] = Field(
        default_factory=lambda: {"sft": 50, "preferences": 100, "prompts": 20},
        description="minimum train rows per dataset kind",
    )
    min_eval_rows: int = Field(5, ge=0)
    max_prompt_chars: int = Field(4000, ge=1)
    max_response_chars: int = Field(4000, ge=1)
    examples_per_failure: int = Field(5, ge=1, le=100)
    max_contradictory_fraction: float = Field(0.02, ge=0, le=1, description="largest share of preference "
                                              "pairs that also appear labelled the other way round")
    reject_control_strings: bool = Field(True, description="fail on text holding a chat-template control string "
                                         "such as <|im_end|> or [INST] (it is encoded as plain text either way)")


class ModelConfig(StageConfig):
    """Which model to load and how (used by sft, reward and ppo)."""

    name: str = Field("tiny", description="'tiny', 'smollm2-135m', a hub id, or a local HF model directory")
    cache_dir: str | None = Field(None, description="where converted/tiny models are cached "
                                  "(default $RLHF_CACHE or ~/.cache/rlhf)")
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lora: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | str = "all-linear"
    # tiny profile: a random-init Llama-style model and a BPE tokenizer trained on the data
    tiny_hidden: int = Field(64, ge=8)
    tiny_layers: int = Field(2, ge=1)
    tiny_heads: int = Field(4, ge=1)
    tiny_vocab: int = Field(1024, ge=300)
    seed: int = 0


class CheckpointSettings(StageConfig):
    """Checkpoints and resume of a training stage (SFT, reward, PPO: rlhf.train.checkpoint; docs/ppo.md
    "Checkpoints"). None of these change a result: they are RUN_ONLY_FIELDS."""

    checkpoint_every: int = Field(20, ge=0, description="checkpoint every N optimizer steps (0: never)")
    checkpoint_dir: str | None = Field(None, description="where checkpoints go (default <out>.checkpoints)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    keep_checkpoints_on_success: bool = Field(False, description="keep them after the final artifact is written")
    resume: bool = Field(True, description="continue from the newest valid checkpoint of the same run")
    replace_stale_checkpoints: bool = Field(
        False, description="delete checkpoints of another run (changed config, inputs or GPU count) found in the "
                           "checkpoint directory; false: stop with an error and keep them")


class TrainConfig(CheckpointSettings):
    """Optimisation settings shared by the supervised stages (sft, reward)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_seq_len: int = Field(256, ge=16)
    eval_max_rows: int = Field(256, ge=1, description="eval rows used for held-out metrics")
    log_every: int = Field(10, ge=1)
    seed: int = 0


class SFTConfig(TrainConfig):
    merge_lora: bool = Field(True, description="save the policy merged (plain HF model) when LoRA is on")


class RewardConfig(TrainConfig):
    init_from: Literal["sft", "base"] = Field("sft", description="initialise the reward model from the SFT "
                                              "policy or from the base model")
    gold_pairs: int = Field(300, ge=0, description="fresh gold-labelled pairs for the agreement check")
    lr: float = Field(1e-4, gt=0)
    save_adapter: bool = Field(False, description="with model.lora, also save the LoRA adapter and score head "
                               "(in <out>/adapter) besides the merged model: what ppo.reward adapter loads")


class EvaluateConfig(StageConfig):
    n_prompts: int = Field(64, ge=1, description="eval prompts sampled per model")
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.7, gt=0)
    batch_size: int = Field(32, ge=1)
    seed: int = 1234
    n_samples_in_report: int = Field(12, ge=0)
    curve_prompts: int = Field(32, ge=0, description="eval prompts (the first ones) per point of the gold and "
                               "reward vs KL curve over the candidate's PPO snapshots; 0: no curve")
    # gate: the candidate must beat the baseline (and the champion, if any) by a margin, within a KL budget
    gate_metric: Literal["gold", "rm"] = "gold"
    gate_margin: float = Field(0.0, description="required improvement of the gate metric's mean")
    kl_budget: float = Field(20.0, gt=0, description="max mean sequence KL(candidate || SFT) in nats")
    # floors: an absolute bar besides beating the baseline and the champion (a first champion must clear it)
    min_gold: float | None = Field(None, description="the candidate's mean gold score must reach this (demo task "
                                   "only: gold is undefined on other data); null: no floor")
    min_reward: float | None = Field(None, description="the candidate's mean reward-model score must reach this")
    min_rm_accuracy: float | None = Field(None, ge=0, le=1, description="the reward model's held-out pairwise "
                                          "accuracy must reach this before anything can pass; null: no check")


class PPOConfig(CheckpointSettings):
    """PPO on the policy against the reward model (the choices and their reasons: docs/ppo.md).

    Batch arithmetic (docs/ppo.md #24), per rank: ``rollout_batch_size`` prompts per step, split into
    ``num_minibatches`` minibatches (one optimizer step each) of micro-batches of
    ``micro_batch_size`` (gradient accumulation); ``ppo_epochs`` passes over the batch per step.
    The global batch is ``rollout_batch_size * world_size``.
    """

    total_steps: int = Field(60, ge=1, description="PPO steps (rollout + update) to run")
    rollout_batch_size: int = Field(32, ge=1, description="prompts sampled per step and rank")
    num_minibatches: int = Field(1, ge=1, description="minibatches (optimizer steps) per PPO epoch")
    micro_batch_size: int | None = Field(None, ge=1, description="rows per forward/backward (gradient "
                                         "accumulation, weighted by valid tokens: the same update as the "
                                         "whole minibatch at a lower peak memory); default: the whole minibatch")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    generation_batch_size: int | None = Field(None, ge=1, description="prompts per generate call "
                                              "(default: all of them)")
    forward_batch_size: int = Field(32, ge=1, description="rows per no-grad forward when scoring rollouts")
    max_prompt_len: int = Field(128, ge=8, description="prompt budget in tokens (cut from the left)")
    max_new_tokens: int = Field(40, ge=1, description="response budget in tokens")
    temperature: float = Field(0.7, gt=0, description="sampling temperature; also divides the logits of "
                               "policy and reference when computing log-probs")
    lr: float = Field(1e-5, gt=0, description="policy learning rate")
    critic_lr: float | None = Field(None, gt=0, description="critic learning rate (default: lr)")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="decay over total_steps (to 10% of the peak for linear/cosine)")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    adam_eps: float = Field(1e-5, gt=0, description="Adam epsilon (docs/ppo.md #23)")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping, per model")
    clip_eps: float = Field(0.2, gt=0, description="policy ratio clip")
    vf_clip_eps: float = Field(0.2, gt=0, description="value clip, around the rollout values")
    vf_coef: float = Field(0.1, ge=0, description="value loss coefficient")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus (off by default; entropy is logged)")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="per-token KL estimator in the reward")
    kl_coef: float = Field(0.05, ge=0, description="beta: fixed, or the initial value when adaptive")
    adaptive_kl: bool = Field(False, description="adapt beta towards kl_target (Ziegler et al. 2019)")
    kl_target: float = Field(6.0, gt=0, description="target summed sequence KL (nats) for adaptive beta")
    kl_horizon: int = Field(10000, ge=1, description="adaptive beta horizon, in episodes")
    normalize_reward: bool = Field(True, description="score -> (score - mean) / std with the reward "
                                   "model's reward_norm (SFT demonstrations)")
    score_clip: float | None = Field(None, gt=0, description="clip normalised scores to +-score_clip")
    missing_eos_penalty: float | None = Field(1.0, description="subtracted from the (normalised) score of a "
                                              "response without EOS within max_new_tokens; null: off")
    estimator: Literal["gae", "rloo", "grpo"] = Field(
        "gae", description="advantage estimator (docs/ppo.md #31): gae (per token, against the critic), rloo "
        "(leave-one-out baseline over the prompt's num_samples_per_prompt responses) or grpo (the reward "
        "standardised within that group); rloo and grpo use no critic")
    num_samples_per_prompt: int = Field(1, ge=1, description="responses sampled per prompt (k): a step's batch "
                                        "is rollout_batch_size x k rows; rloo and grpo need k >= 2")
    critic: Literal["separate", "adapter", "shared"] = Field(
        "separate", description="the value model of estimator gae (docs/ppo.md #32): separate (its own model, "
        "from critic_init), adapter (a second LoRA adapter + value head on the policy's base model; needs "
        "model.lora) or shared (a value head on the policy's own last hidden state, one backward for both "
        "losses); adapter and shared start with a zero value head (critic_init is for separate)")
    reward: Literal["separate", "adapter"] = Field(
        "separate", description="the reward model in PPO: separate (the reward stage's merged model) or adapter "
        "(its LoRA adapter + score head on the policy's base model, one base in memory; needs model.lora and a "
        "reward model trained with reward.save_adapter on the same SFT policy)")
    critic_init: Literal["reward", "value_head"] = Field(
        "reward", description="critic = the reward model, or the SFT backbone with a zero-initialised head "
        "(critic: separate)")
    merge_lora: bool = Field(True, description="save the policy merged (plain HF model) when LoRA is on")
    checkpoint_every: int = Field(10, ge=0, description="checkpoint every N steps (0: never)")
    log_every: int = Field(1, ge=1, description="progress line every N steps")
    snapshot_every: int = Field(12, ge=0, description="keep the policy's weights every N steps in <out>/snapshots "
                                "for evaluate's gold/reward-vs-KL curve (0: none; the output is the last point)")
    seed: int = 0

    @property
    def rows_per_step(self) -> int:
        """Rows (responses) of a step's batch on one rank: ``rollout_batch_size x num_samples_per_prompt``."""
        return self.rollout_batch_size * self.num_samples_per_prompt

    @property
    def uses_critic(self) -> bool:
        """Whether the estimator needs a value model (gae does; rloo and grpo do not)."""
        return self.estimator == "gae"

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> PPOConfig:
        if self.estimator in ("rloo", "grpo") and self.num_samples_per_prompt < 2:
            raise ValueError(f"estimator {self.estimator} compares the responses to one prompt: set "
                             f"num_samples_per_prompt to 2 or more (got {self.num_samples_per_prompt})")
        rows = self.rows_per_step
        what = "rollout_batch_size" if self.num_samples_per_prompt == 1 else \
            "rollout_batch_size x num_samples_per_prompt"
        if rows % self.num_minibatches:
            raise ValueError(f"{what} ({rows}) must be a multiple of num_minibatches ({self.num_minibatches})")
        mini = rows // self.num_minibatches
        if self.micro_batch_size is not None and mini % self.micro_batch_size:
            raise ValueError(f"the minibatch ({mini} = {what} / num_minibatches) must be a "
                             f"multiple of micro_batch_size ({self.micro_batch_size})")
        return self

    def check_model(self, model: ModelConfig) -> None:
        """The checks that need the model section too (the PPO stage calls it before loading anything)."""
        if self.uses_critic and self.critic == "adapter" and not model.lora:
            raise ValueError("ppo.critic adapter puts the critic on the policy's base model as a second LoRA "
                             "adapter, so it needs model.lora true; with full fine-tuning use critic separate "
                             "or shared")
        if self.reward == "adapter" and not model.lora:
            raise ValueError("ppo.reward adapter reads the reward model as a LoRA adapter on the policy's base "
                             "model, so it needs model.lora true; with full fine-tuning use reward separate")


class RegisterConfig(StageConfig):
    """Model registry (MLflow): names, promotion rules, and ``rlhf models`` defaults (see ``rlhf.mlops.registry``)."""

    model_name: str = Field("rlhf-policy", min_length=1, description="registered model name of the policy")
    reward_model_name: str = Field("rlhf-reward-model", min_length=1,
                                   description="registered model name of the reward model")
    register_reward_model: bool = Field(True, description="also register the reward model (deduplicated by content)")
    auto_promote: bool = Field(True, description="move 'champion' when the evaluate gate passed; false: only "
                               "'challenger' moves and promotion is manual (rlhf models promote)")
    require_champion_comparison: bool = Field(
        True, description="with a champion in place, promote only if the evaluation compared against that "
        "very champion (evaluate --champion)")
    cache_dir: str | None = Field(None, description="where champion_dir() downloads the champion policy "
                                  "(default $RLHF_CACHE/registry or ~/.cache/rlhf/registry)")
    key_metrics: list[str] = Field(
        default_factory=lambda: ["policy_gold_mean", "policy_rm_mean", "kl_to_baseline",
                                 "win_rate_gold_vs_baseline"],
        description="evaluation metrics shown by `rlhf models list`")
    history_length: int = Field(50, ge=2, description="champion versions remembered for rollback")
    max_new_tokens: int = Field(48, ge=1, description="`rlhf models generate`: response budget in tokens")
    temperature: float = Field(0.7, gt=0, description="`rlhf models generate`: sampling temperature")
    seed: int = 0


class FeedbackConfig(StageConfig):
    """The human feedback loop (``rlhf feedback``): labelling batches, the annotation app, export.

    Not a pipeline stage: nothing here is in the configuration fingerprint."""

    n_prompts: int = Field(32, ge=1, description="`rlhf feedback sample`: prompts per batch")
    max_new_tokens: int = Field(40, ge=1, description="response budget in tokens when sampling a batch")
    temperature: float = Field(0.7, gt=0, description="sampling temperature when sampling a batch")
    seed: int = Field(0, description="seed of the prompt draw and of the two samples (seed, seed + 1)")
    batches_dir: str = Field("feedback/batches", description="where `rlhf feedback sample` writes batches")
    store: str = Field("feedback/labels.db", description="the labels database (SQLite, WAL mode)")
    export_dir: str = Field("data/raw/feedback", description="where `rlhf feedback export` writes preference rows")
    host: str = Field("127.0.0.1", description="address the app binds to (0.0.0.0 only behind a proxy/NetworkPolicy)")
    port: int = Field(8008, ge=0, le=65535, description="port of the annotation app")
    overlap: int = Field(1, ge=1, le=10, description="labels per item (k > 1: k different annotators, for agreement)")
    max_body_bytes: int = Field(16384, ge=1024, description="largest request body the app accepts")
    max_reason_chars: int = Field(1000, ge=0, description="longest optional reason kept with a label")
    cookie_secure: bool = Field(False, description="mark the session cookie Secure (serve behind HTTPS)")


__all__ = ["StageConfig", "PrepareConfig", "ValidateConfig", "ModelConfig", "TrainConfig", "SFTConfig",
           "RewardConfig", "EvaluateConfig", "PPOConfig", "RegisterConfig", "FeedbackConfig"]
