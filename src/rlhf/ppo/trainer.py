"""The PPO loop: collect a batch of rollouts, then a few epochs of clipped updates, repeat.

:func:`run_steps` is the loop; per step (``total_steps`` of them), on every rank:

1. rollout: this rank's slice of the next global batch of training prompts (a seeded permutation
   per pass over the prompts, so the data position is a function of the step and survives a
   restart), ``num_samples_per_prompt`` sampled responses each (default 1; the ``k`` responses of
   a prompt are consecutive rows on the same rank), with the policy's and the reference's
   log-probs and the critic's values (:func:`rlhf.ppo.rollout.sample_responses`);
2. score: the reward model's normalised score, missing-EOS penalty included (``score_responses``);
3. advantages: KL-penalised per-token rewards, then the estimator: GAE and whitening, or RLOO /
   GRPO within each prompt's group (``compute_advantages``, :mod:`rlhf.ppo.advantages`);
4. update (:func:`ppo_update`): ``ppo_epochs`` passes over the batch in shuffled minibatches;
   each minibatch is one optimizer step (gradient accumulation over micro-batches, each weighted
   by its share of the minibatch's valid tokens, so the step is that of the whole minibatch) of
   :func:`rlhf.ppo.loss.ppo_loss`, back-propagated per model (policy, then critic: only one
   model's activations alive at a time; ``critic: shared``: one backward for both; no critic:
   the policy's part alone); gradients clipped per model (policy, critic); AdamW with
   eps 1e-5 and one lr-schedule step per PPO step (docs/ppo.md #20, #23);
5. the KL controller sees the batch's mean sequence KL (fixed beta, or adaptive towards
   ``kl_target``; #15); metrics through :mod:`rlhf.mlops.tracking` and a progress line
   (:class:`rlhf.ppo.metrics.StepLog`, #25); a checkpoint every ``checkpoint_every`` steps
   (:class:`rlhf.ppo.checkpoint.RunCheckpoints`).

Models: the policy starts from the SFT policy (full fine-tuning, or a fresh LoRA adapter on the
merged SFT weights); the reference is a frozen copy of the SFT policy or, with LoRA, the same model
with every adapter disabled (no second copy); the critic (:mod:`rlhf.ppo.critic`: ``separate``,
initialised from the reward model or the SFT backbone with a zero value head; ``adapter``;
``shared``; none for rloo/grpo); dropout is off in all four (#12, #18, #22, #32).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf.config import ModelConfig, PPOConfig
from rlhf.data import conversation
from rlhf.errors import ConfigError, UserError
from rlhf.io import atomic_dir, read_manifest, write_manifest
from rlhf.mlops import tracking
from rlhf.ppo import checkpoint as ckpt
from rlhf.ppo import critic as C
from rlhf.ppo import loss as L
from rlhf.ppo import snapshots as snap
from rlhf.ppo.metrics import StepLog, UpdateStats, mean_update_stats
from rlhf.ppo.reward_adapter import load_reward_adapter
from rlhf.ppo.rollout import (
    Experience,
    RewardNorm,
    RolloutSettings,
    check_special_tokens,
    compute_advantages,
    sample_responses,
    score_responses,
    trim,
    unwrap,
)
from rlhf.train import distributed as D
from rlhf.train import generation, models
from rlhf.train.loop import fused_adamw, make_scheduler, set_seed
from rlhf.train.precision import Precision, for_model

log = logging.getLogger("rlhf")


# ----------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, n_episodes: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_episodes: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon


def kl_controller(cfg: PPOConfig) -> FixedKLController:
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


# ----------------------------------------------------------------------------- data order


class PromptStream:
    """An endless stream of prompts: a seeded shuffle per pass; position ``p`` is always the same prompt."""

    def __init__(self, prompts: list[conversation.Messages], seed: int):
        if not prompts:
            raise UserError("the dataset has no training prompts", where="prompts/train.parquet")
        self.prompts, self.seed = prompts, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def take(self, start: int, n: int) -> list[conversation.Messages]:
        out = []
        for pos in range(start, start + n):
            epoch, i = divmod(pos, len(self.prompts))
            out.append(self.prompts[self._order(epoch)[i]])
        return out


# ----------------------------------------------------------------------------- models


def train_prompts(dataset: str | Path) -> list[conversation.Messages]:
    """The training prompts, each the conversation before the reply (``prompt_messages``; a dataset prepared
    without that column: ``prompt`` as one user turn). Read with pyarrow alone when possible: pandas costs
    ~80 MB of RSS per rank."""
    path = Path(dataset) / "prompts" / "train.parquet"
    if path.is_file():
        import pyarrow.parquet as pq

        # ParquetFile.read, not read_table: the latter imports pandas to parse the file's pandas metadata
        f = pq.ParquetFile(path)
        if "prompt_messages" in f.schema_arrow.names:
            return [conversation.as_messages(m) for m in f.read(columns=["prompt_messages"])
                    .column("prompt_messages").to_pylist()]
        return [conversation.as_messages(p) for p in f.read(columns=["prompt"]).column("prompt").to_pylist()]
    from rlhf.data.prepare import load_split, prompt_conversations  # the usual "run the prepare stage first"

    return prompt_conversations(load_split(dataset, "prompts", "train"))


def load_models(sft_model: str | Path, reward_model: str | Path, cfg: PPOConfig, model_cfg: ModelConfig,
                reward_norm: RewardNorm):
    """Policy (trainable), reference (frozen copy, or None with LoRA), critic (None without one: rloo,
    grpo; :func:`rlhf.ppo.critic.build_critic`), reward model, tokenizers."""
    plain = model_cfg.model_copy(update={"lora": False})
    # The SFT weights, merged if the SFT stage saved an adapter: the PPO adapter starts on top of them.
    policy, tok = models.load_policy(sft_model, plain, for_training=True)
    if model_cfg.lora:
        from peft import get_peft_model

        policy = get_peft_model(policy, models._lora_config(model_cfg, "CAUSAL_LM"))
        for pc in policy.peft_config.values():  # where the adapter's base lives when saved unmerged
            pc.base_model_name_or_path = str(Path(sft_model).resolve())
        ref = None  # the reference is the policy with its adapter disabled (docs/ppo.md #12)
    else:
        ref, _ = models.load_policy(sft_model, plain, for_training=False)
    models.disable_dropout(policy)
    policy.train()

    if cfg.reward == "adapter":  # a frozen third adapter on the same base (docs/ppo.md #32)
        rm, rm_tok = load_reward_adapter(policy, reward_model, sft_model)
    else:
        rm, rm_tok = models.load_reward_model(reward_model, plain, for_training=False)
    critic = C.build_critic(cfg, model_cfg, policy, sft_model, reward_model, reward_norm)
    for t in (tok, rm_tok):
        check_special_tokens(t)
    return policy, ref, critic, rm, tok, rm_tok


def make_optimizer(policy, critic, cfg: PPOConfig) -> torch.optim.Optimizer:
    """AdamW (eps 1e-5), one param group per model (the policy's alone without a critic); the fused update
    where torch has it (:func:`rlhf.train.loop.fused_adamw`), else the multi-tensor ("foreach") one."""
    groups = [{"params": C.policy_parameters(policy, critic), "lr": cfg.lr}]
    if critic is not None:
        groups.append({"params": C.critic_parameters(critic), "lr": cfg.critic_lr or cfg.lr})
    kind = fused_adamw([p for g in groups for p in g["params"]]) or {"foreach": True}
    return torch.optim.AdamW(groups, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, **kind)


def make_lr_schedule(opt, cfg: PPOConfig):
    if cfg.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return make_scheduler(opt, cfg.total_steps, cfg.warmup_ratio, kind=cfg.lr_schedule)


# ----------------------------------------------------------------------------- the update


def model_inputs(mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """A micro-batch's ``prompt + response`` ids and mask without all-padding columns (see :func:`trim`)."""
    return trim(mb["query_ids"], mb["query_mask"], mb["response_ids"], mb["response_mask"])


def policy_outputs(policy, mb: dict[str, torch.Tensor], inputs, cfg: PPOConfig,
                   shared_critic=None) -> dict[str, torch.Tensor]:
    """The policy's log-probs of the micro-batch's responses at the sampling temperature (docs/ppo.md #5), and
    their entropy when there is an entropy bonus: :func:`rlhf.ppo.loss.ppo_loss`'s keyword arguments.

    ``shared_critic`` (``critic: shared``): also the ``values`` its head reads off the same forward pass.
    """
    ids, mask, q_len, r_len = inputs
    if shared_critic is not None:
        logits, hidden = generation.response_logits(policy, ids, mask, q_len, cfg.temperature, with_hidden=True)
        out = {"values": shared_critic(hidden=hidden)[:, q_len - 1 : -1]}
    else:
        logits, out = generation.response_logits(policy, ids, mask, q_len, cfg.temperature), {}
    tokens = mb["response_ids"][:, :r_len]
    if cfg.entropy_coef:
        logprobs, entropy = generation.logprobs_and_entropy(logits, tokens)
        return {**out, "logprobs": logprobs, "entropy": entropy}
    return {**out, "logprobs": generation.logprobs_from_logits(logits, tokens)}


def critic_values(critic, inputs) -> torch.Tensor:
    """The critic's value of each response position (the state before the token is emitted): (B, R)."""
    ids, mask, q_len, _ = inputs
    return critic(ids, mask)[:, q_len - 1 : -1]


def backward_micro_batch(policy, critic, mb: dict[str, torch.Tensor], cfg: PPOConfig,
                         weight: float, precision: Precision | None = None) -> dict[str, torch.Tensor]:
    """Back-propagate ``weight`` x the micro-batch's PPO loss: the policy's part, then the critic's.

    Each backward frees its model's activations before the other model's forward, so the peak holds
    one model's activations, not both; the gradients are those of the total loss (the two models
    share no parameters). ``critic: shared``: one forward and one backward of the total; no critic
    (rloo, grpo): the policy's part alone. The forward passes run under ``precision``'s autocast
    (docs/ppo.md #27). Returns the loss's stats and the (unweighted) ``loss``.
    """
    precision = precision or Precision.off()
    inputs = model_inputs(mb)
    shared = critic if C.is_shared(critic) else None
    with precision.autocast():
        outputs = policy_outputs(policy, mb, inputs, cfg, shared)
    pg = L.ppo_loss(mb, cfg, **{k: v.float() for k, v in outputs.items()})
    precision.backward(pg.total * weight)
    if critic is None or shared is not None:  # nothing left, or the values were part of that one graph
        return {**pg.stats, "loss": pg.total.detach()}
    with precision.autocast():
        values = critic_values(critic, inputs)
    vf = L.ppo_loss(mb, cfg, values=values.float())
    precision.backward(vf.total * weight)
    return {**pg.stats, **vf.stats, "loss": pg.total.detach() + vf.total.detach()}


def minibatch_plan(n_rows: int, cfg: PPOConfig, step: int, rank: int) -> list[list[torch.Tensor]]:
    """The rows of every optimizer step of a PPO step, as lists of micro-batches.

    ``ppo_epochs`` shuffles of the batch, seeded by (seed, rank, step, epoch) so that a resumed run
    draws the same ones; each cut into ``num_minibatches`` minibatches of ``micro_batch_size`` rows.
    """
    mb_size = n_rows // cfg.num_minibatches
    micro = cfg.micro_batch_size or mb_size
    plan = []
    for epoch in range(cfg.ppo_epochs):
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + rank) * 10_007 + step * 101 + epoch)
        perm = torch.randperm(n_rows, generator=gen)
        plan += [list(perm[m * mb_size : (m + 1) * mb_size].split(micro)) for m in range(cfg.num_minibatches)]
    return plan


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip one model's gradients to ``max_norm``; their norm before clipping (0 for no parameters)."""
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0


def optimizer_step(policy, critic, exp: Experience, micro_batches: list[torch.Tensor], cfg: PPOConfig, opt,
                   info: D.DistInfo, precision: Precision | None = None) -> UpdateStats:
    """One minibatch: accumulate its micro-batches' gradients, clip them per model, one optimizer step."""
    precision = precision or Precision.off()
    device = exp.response_ids.device
    tokens = float(exp.response_mask[torch.cat(micro_batches).to(device)].sum())
    # Under DDP the gradient is the mean over the valid tokens of the *global* minibatch (docs/ppo.md #30):
    # each rank's share is scaled by world x its tokens / all ranks' tokens (DDP then averages the ranks).
    global_tokens = D.sum_dict({"tokens": tokens})["tokens"] if info.enabled else tokens
    rank_share = info.world_size * tokens / global_tokens if global_tokens > 0 else 1.0
    stats = UpdateStats()
    for k, rows in enumerate(micro_batches):
        mb = exp.select(rows.to(device))
        # Weighted by its share of the minibatch's valid tokens: the accumulated gradient is that of the
        # masked mean over the whole minibatch (docs/ppo.md #19), so micro_batch_size only trades memory
        # for nothing (weight 1 when the micro-batch is the minibatch).
        w = float(mb["response_mask"].sum()) / tokens if tokens > 0 else 1.0 / len(micro_batches)
        with D.no_sync([policy, critic], active=info.enabled and k < len(micro_batches) - 1):
            stats.add(backward_micro_batch(policy, critic, mb, cfg, w * rank_share, precision), w)
    precision.unscale(opt)
    stats.grad_norm_policy = clip_gradients(C.policy_parameters(policy, critic), cfg.max_grad_norm)
    stats.grad_norm_critic = clip_gradients(C.critic_parameters(critic), cfg.max_grad_norm)
    precision.step(opt)
    opt.zero_grad(set_to_none=True)
    return stats


def ppo_update(policy, critic, exp: Experience, cfg: PPOConfig, opt, step: int,
               info: D.DistInfo, precision: Precision | None = None) -> dict[str, float]:
    """``ppo_epochs`` x ``num_minibatches`` optimizer steps on one batch: mean diagnostics (+ the first's)."""
    plan = minibatch_plan(len(exp), cfg, step, info.rank)
    return mean_update_stats([optimizer_step(policy, critic, exp, micro_batches, cfg, opt, info, precision)
                              for micro_batches in plan])


# ----------------------------------------------------------------------------- the loop


@dataclass
class PPORun:
    """What the loop works with; built by :func:`_setup`. ``policy`` and ``critic`` as trained (wrapped in
    DistributedDataParallel when distributed: :func:`unwrap` them for checkpoints and the artifact)."""

    cfg: PPOConfig
    info: D.DistInfo
    policy: nn.Module
    critic: nn.Module | None     # None: the estimator has no critic (rloo, grpo)
    ref: nn.Module | None
    reward_model: nn.Module
    tokenizer: Any
    rm_tokenizer: Any | None     # None: the reward model reads the policy's token ids
    rm_max_len: int
    norm: RewardNorm
    prompts: PromptStream
    settings: RolloutSettings
    opt: torch.optim.Optimizer
    sched: Any
    kl_ctl: FixedKLController
    start_step: int              # the checkpoint resumed from (0: a fresh run)
    history: list[dict[str, float]]
    precision: Precision = field(default_factory=Precision.off)  # autocast dtype, fp16 grad scaler

    def texts_scorer(self, prompts: list[conversation.Messages]):
        """For a reward model with another tokenizer: score decoded responses (decode, re-encode, score)."""
        if self.rm_tokenizer is None:
            return None
        from rlhf.train.reward import score_texts

        return lambda texts: score_texts(self.reward_model, self.rm_tokenizer, prompts, texts,
                                         self.rm_max_len, self.cfg.forward_batch_size)


def run_steps(run: PPORun, book: StepLog, checkpoints: ckpt.RunCheckpoints,
              snapshots: snap.RunSnapshots | None = None) -> None:
    """The PPO loop, from the step after ``run.start_step`` to ``total_steps`` (every rank runs it)."""
    cfg, info = run.cfg, run.info
    global_prompts = cfg.rollout_batch_size * info.world_size
    all_reduce = D.all_reduce_sum if info.enabled else None  # whitening over the global batch
    for step in range(run.start_step + 1, cfg.total_steps + 1):
        book.begin()
        # rollout: this rank's prompts of the step, each repeated k = num_samples_per_prompt times in a row
        # (a prompt's group stays on this rank); a response per row; old and reference log-probs, values
        prompts = run.prompts.take((step - 1) * global_prompts + info.rank * cfg.rollout_batch_size,
                                   cfg.rollout_batch_size)
        prompts = [p for p in prompts for _ in range(cfg.num_samples_per_prompt)]
        with run.precision.autocast():  # the same compute dtype as the update's forward passes (#7, #27)
            samples = sample_responses(run.policy, run.ref, run.critic, run.tokenizer, prompts, run.settings)
            # score: the reward model at each response's EOS, normalised, minus the missing-EOS penalty
            scores, raw = score_responses(run.reward_model, samples, run.settings, run.norm,
                                          run.texts_scorer(prompts))
        # advantages: per-token rewards -beta * KL (+ the score at the EOS); GAE, whitened, or RLOO / GRPO
        beta = run.kl_ctl.value
        exp = compute_advantages(samples, scores, raw, run.settings, beta, all_reduce)
        # update: ppo_epochs passes over the batch in shuffled minibatches, one optimizer step each
        lr = run.sched.get_last_lr()[0]
        upd = ppo_update(run.policy, run.critic, exp, cfg, run.opt, step, info, run.precision)
        run.sched.step()
        # bookkeeping: metrics, beta from this batch's KL, now and then a checkpoint
        m = book.record(step, exp, upd, beta, lr, samples.gen_seconds)
        run.kl_ctl.update(m["kl"], cfg.rows_per_step * info.world_size)
        if snapshots is not None and snapshots.due(step):  # evaluate's curve; before the checkpoint it survives
            snapshots.save(step, unwrap(run.policy), m)
        if checkpoints.due(step):
            checkpoints.save(step, unwrap(run.policy), unwrap(run.critic), run.opt, run.sched, run.kl_ctl,
                             book.history)


# ----------------------------------------------------------------------------- the stage


def train_ppo(dataset: str | Path, sft_model: str | Path, reward_model: str | Path, out: str | Path,
              cfg: PPOConfig | None = None, model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """Run PPO from the SFT policy against the reward model; write policy + critic + manifest to ``out``.

    Resumes from the newest valid checkpoint of the same run (``cfg.resume``). Under ``torchrun`` every
    rank calls this function; only rank 0 writes files and logs. Returns the metrics (every rank).
    """
    cfg, model_cfg = cfg or PPOConfig(), model_cfg or ModelConfig()
    info = D.setup()
    try:
        return _train(dataset, sft_model, reward_model, out, cfg, model_cfg, info)
    finally:
        D.teardown(info)


def _train(dataset, sft_model, reward_model, out, cfg: PPOConfig, model_cfg: ModelConfig,
           info: D.DistInfo) -> dict[str, Any]:
    set_seed(cfg.seed + info.rank)  # per-rank seeds (docs/ppo.md #24): each rank samples differently
    run, checkpoints = _setup(dataset, sft_model, reward_model, out, cfg, model_cfg, info)
    run_ctx = tracking.stage_run("ppo", cfg, tags={"model": model_cfg.name, "world_size": info.world_size}) \
        if info.is_main else contextlib.nullcontext(tracking.Tracker(None))
    with run_ctx as tracker:
        tracker.log_params({"model": model_cfg.model_dump(mode="json")})
        if run.start_step:
            tracker.set_tags({"resumed_from_step": run.start_step})
        book = StepLog(tracker, cfg, info, run.history, run.start_step)
        log.info("[ppo] %d steps x %d prompts (%d rank(s)), %d PPO epochs x %d minibatch(es), "
                 "KL %s beta=%s%s, %s", cfg.total_steps, cfg.rollout_batch_size * info.world_size,
                 info.world_size, cfg.ppo_epochs, cfg.num_minibatches, cfg.kl_estimator, cfg.kl_coef,
                 f" adaptive to {cfg.kl_target}" if cfg.adaptive_kl else "", _estimator_line(cfg))
        snapshots = snap.RunSnapshots(out, cfg, model_cfg, checkpoints.fingerprint, run.start_step, info)
        run_steps(run, book, checkpoints, snapshots)
        policy, critic = unwrap(run.policy), unwrap(run.critic)
        in_sync = D.check_in_sync(*[m for m in (policy, critic) if m is not None])
        metrics = book.summary(in_sync)
        if not in_sync:
            raise RuntimeError("PPO ranks diverged: parameters differ across ranks")
        if info.is_main:
            tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))
                                 and not (isinstance(v, float) and math.isnan(v))})
            _write_output(out, policy, critic, run.tokenizer, metrics, cfg, model_cfg, dataset, sft_model,
                          reward_model, tracker.run_id, run.norm,
                          publish=lambda tmp: snapshots.publish(tmp, book.history))
            checkpoints.remove()
    D.barrier()
    log.info("[ppo] gold %.3f -> %.3f, score %.3f -> %.3f, KL %.3f (%s); policy in %s",
             metrics["start_gold"], metrics["gold"], metrics["start_score"], metrics["score"], metrics["kl"],
             cfg.kl_estimator, out)
    return metrics


def _estimator_line(cfg: PPOConfig) -> str:
    if not cfg.uses_critic:
        return f"{cfg.estimator} over {cfg.num_samples_per_prompt} responses per prompt, no critic"
    samples = f", {cfg.num_samples_per_prompt} responses per prompt" if cfg.num_samples_per_prompt > 1 else ""
    if cfg.critic == "separate":
        return f"gae, critic from {cfg.critic_init}{samples}"
    return f"gae, critic {cfg.critic}{samples}"


def check_config(cfg: PPOConfig, model_cfg: ModelConfig, info: D.DistInfo) -> None:
    """The checks that need more than the ppo section: the model section, the process count."""
    try:
        cfg.check_model(model_cfg)
    except ValueError as e:
        raise ConfigError(str(e), where="params.yaml ppo") from None
    if info.enabled and (cfg.uses_critic and cfg.critic == "adapter" or cfg.reward == "adapter"):
        raise ConfigError("ppo.critic adapter and ppo.reward adapter run on one process only so far (their LoRA "
                          "weights live in the policy module, which DDP wraps for the policy's backward)",
                          hint="use critic separate or shared, reward separate under torchrun")


def _setup(dataset, sft_model, reward_model, out, cfg: PPOConfig, model_cfg: ModelConfig,
           info: D.DistInfo) -> tuple[PPORun, ckpt.RunCheckpoints]:
    """Check the inputs, load the models, build the optimizer and resume from a checkpoint if there is one."""
    check_config(cfg, model_cfg, info)
    read_manifest(sft_model, expect_kind="policy")
    rm_manifest = read_manifest(reward_model, expect_kind="reward-model")
    if model_cfg.lora and not cfg.merge_lora and (Path(sft_model) / models.ADAPTER_CONFIG).is_file():
        raise ConfigError("ppo.merge_lora false needs a merged SFT policy (the SFT artifact is an adapter)",
                          hint="set sft.merge_lora true, or ppo.merge_lora true")
    norm_stats = rm_manifest.get("reward_norm") or {"mean": 0.0, "std": 1.0}
    norm = RewardNorm(norm_stats["mean"], norm_stats["std"], cfg.score_clip) if cfg.normalize_reward \
        else RewardNorm(0.0, 1.0, cfg.score_clip)
    stream = PromptStream(train_prompts(dataset), cfg.seed)

    policy, ref, critic, rm, tok, rm_tok = load_models(sft_model, reward_model, cfg, model_cfg, norm)
    opt = make_optimizer(policy, critic, cfg)
    sched = make_lr_schedule(opt, cfg)
    kl_ctl = kl_controller(cfg)
    inputs = {"dataset": hashlib.sha256("\n".join(map(conversation.render, stream.prompts)).encode()).hexdigest()[:16],
              "sft": ckpt.artifact_id(sft_model), "reward": ckpt.artifact_id(reward_model)}
    fp = ckpt.fingerprint(cfg, model_cfg, inputs, info.world_size)
    checkpoints = ckpt.RunCheckpoints(ckpt.checkpoint_root(out, cfg), fp, cfg, info)
    start_step, history = checkpoints.resume(policy, critic, opt, sched, kl_ctl)

    settings = RolloutSettings(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, max_prompt_len=cfg.max_prompt_len,
        generation_batch_size=cfg.generation_batch_size or cfg.rows_per_step,
        forward_batch_size=cfg.forward_batch_size, kl_estimator=cfg.kl_estimator,
        missing_eos_penalty=cfg.missing_eos_penalty, gamma=cfg.gamma, lam=cfg.lam,
        whiten_advantages=cfg.whiten_advantages, whiten_rewards=cfg.whiten_rewards,
        estimator=cfg.estimator, group_size=cfg.num_samples_per_prompt)
    same_vocab = tok.get_vocab() == rm_tok.get_vocab()
    run = PPORun(cfg=cfg, info=info, policy=D.wrap(policy, info),
                 critic=D.wrap(critic, info) if critic is not None else None, ref=ref,
                 reward_model=rm, tokenizer=tok, rm_tokenizer=None if same_vocab else rm_tok,
                 rm_max_len=int(rm_manifest.get("max_seq_len", 256)), norm=norm,
                 prompts=stream, settings=settings, opt=opt, sched=sched, kl_ctl=kl_ctl,
                 start_step=start_step, history=history, precision=for_model(policy, model_cfg))
    return run, checkpoints


def _write_output(out, policy, critic, tok, metrics, cfg, model_cfg, dataset, sft_model, reward_model, run_id,
                  norm: RewardNorm, publish=None) -> None:
    with atomic_dir(out) as tmp:
        published = publish(tmp) if publish else {}  # snapshots + per-step metrics (rlhf.ppo.snapshots)
        critic_dir = C.save_critic(critic, tok, tmp / "critic", cfg.critic_init)
        C.remove_other_adapters(policy)  # critic / reward adapter: the policy artifact is the policy alone
        models.save_model(unwrap(policy), tok, tmp, merge_lora=cfg.merge_lora)
        write_manifest(tmp, kind="policy", inputs={"dataset": dataset, "sft_model": sft_model,
                                                   "reward_model": reward_model},
                       config=cfg, metrics=metrics,
                       extra={"model": model_cfg.model_dump(mode="json"), "stage": "ppo", "mlflow_run_id": run_id,
                              "critic": "critic" if critic_dir else None, "reward_norm": {"mean": norm.mean, "std": norm.std},
                              "lora_merged": bool(cfg.merge_lora or not model_cfg.lora), **published})


__all__ = ["train_ppo", "run_steps", "PPORun", "ppo_update", "optimizer_step", "minibatch_plan",
           "backward_micro_batch", "policy_outputs", "critic_values", "model_inputs", "load_models",
           "make_optimizer", "FixedKLController", "AdaptiveKLController", "kl_controller", "PromptStream",
           "train_prompts"]
