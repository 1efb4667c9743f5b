"""The PPO loop: collect a batch of rollouts, then a few epochs of clipped updates, repeat.

Per step (``total_steps`` of them), on every rank:

1. take this rank's slice of the next global batch of training prompts (a seeded permutation per
   pass over the prompts, so the data position is a function of the step and survives a restart);
2. :func:`rlhf.ppo.rollout.make_experience`: sample, score, KL-penalised rewards, GAE, whitening;
3. ``ppo_epochs`` passes over the batch in shuffled minibatches; each minibatch is one optimizer
   step (gradient accumulation over micro-batches, each weighted by its share of the minibatch's
   valid tokens, so the step is that of the whole minibatch), loss = clipped policy loss +
   ``vf_coef`` x clipped value loss, back-propagated per model (policy, then critic: only one
   model's activations alive at a time); gradients clipped per model (policy, critic); AdamW with
   eps 1e-5 and one lr-schedule step per PPO step (checklist 20, 23);
4. the KL controller sees the batch's mean sequence KL (fixed beta, or adaptive towards
   ``kl_target``; checklist 15);
5. metrics through :mod:`rlhf.mlops.tracking` and a progress line (25); a checkpoint every
   ``checkpoint_every`` steps (:mod:`rlhf.ppo.checkpoint`).

Models: the policy starts from the SFT policy (full fine-tuning, or a fresh LoRA adapter on the
merged SFT weights); the reference is a frozen copy of the SFT policy or, with LoRA, the same model
with the adapter disabled (no second copy); the critic is initialised from the reward model (or
the SFT backbone with a zero value head); dropout is off in all four (checklist 12, 18, 22).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from rlhf.config import ModelConfig, PPOConfig
from rlhf.errors import ConfigError, UserError
from rlhf.io import atomic_dir, read_manifest, write_json, write_manifest
from rlhf.mlops import tracking
from rlhf.ppo import checkpoint as ckpt
from rlhf.ppo import distributed as D
from rlhf.ppo import loss as L
from rlhf.ppo.rollout import (
    RewardNorm,
    RolloutSettings,
    ValueModel,
    check_special_tokens,
    experience_stats,
    make_experience,
    trim,
    unwrap,
    zero_value_head,
)
from rlhf.train import generation, models
from rlhf.train.loop import fmt_duration, make_scheduler, set_seed

log = logging.getLogger("rlhf")

# Metrics that depend on wall-clock time (everything else is deterministic for a fixed seed on CPU).
TIMING_METRICS = ("episodes_per_s", "tokens_per_s", "gen_share", "step_seconds")


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

    def __init__(self, prompts: list[str], seed: int):
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

    def take(self, start: int, n: int) -> list[str]:
        out = []
        for pos in range(start, start + n):
            epoch, i = divmod(pos, len(self.prompts))
            out.append(self.prompts[self._order(epoch)[i]])
        return out


# ----------------------------------------------------------------------------- models


def train_prompts(dataset: str | Path) -> list[str]:
    """The training prompts. Read with pyarrow alone when possible: pandas costs ~80 MB of RSS per rank."""
    path = Path(dataset) / "prompts" / "train.parquet"
    if path.is_file():
        import pyarrow.parquet as pq

        # ParquetFile.read, not read_table: the latter imports pandas to parse the file's pandas metadata
        return pq.ParquetFile(path).read(columns=["prompt"]).column("prompt").to_pylist()
    from rlhf.data.prepare import load_split  # raises the usual "run the prepare stage first" error

    return load_split(dataset, "prompts", "train")["prompt"].tolist()


def load_models(sft_model: str | Path, reward_model: str | Path, cfg: PPOConfig, model_cfg: ModelConfig,
                reward_norm: RewardNorm):
    """Policy (trainable), reference (frozen copy, or None with LoRA), critic, reward model, tokenizers."""
    plain = model_cfg.model_copy(update={"lora": False})
    # The SFT weights, merged if the SFT stage saved an adapter: the PPO adapter starts on top of them.
    policy, tok = models.load_policy(sft_model, plain, for_training=True)
    if model_cfg.lora:
        from peft import get_peft_model

        policy = get_peft_model(policy, models._lora_config(model_cfg, "CAUSAL_LM"))
        for pc in policy.peft_config.values():  # where the adapter's base lives when saved unmerged
            pc.base_model_name_or_path = str(Path(sft_model).resolve())
        ref = None  # the reference is the policy with its adapter disabled (checklist 12)
    else:
        ref, _ = models.load_policy(sft_model, plain, for_training=False)
    models.disable_dropout(policy)
    policy.train()

    rm, rm_tok = models.load_reward_model(reward_model, plain, for_training=False)
    if cfg.critic_init == "reward":
        critic_base, _ = models.load_reward_model(reward_model, model_cfg, for_training=True)
        critic = ValueModel(critic_base, shift=reward_norm.mean, scale=reward_norm.std)
    else:
        critic_base, _ = models.load_reward_model(sft_model, model_cfg, for_training=True, init_from_causal=True)
        critic = ValueModel(critic_base)
        zero_value_head(critic)
    critic.to(next(policy.parameters()).device)
    models.disable_dropout(critic)
    critic.train()
    for t in (tok, rm_tok):
        check_special_tokens(t)
    return policy, ref, critic, rm, tok, rm_tok


def make_optimizer(policy, critic, cfg: PPOConfig) -> torch.optim.Optimizer:
    """AdamW (eps 1e-5), one param group per model; the multi-tensor ("foreach") update, also on CPU."""
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr},
              {"params": [p for p in critic.parameters() if p.requires_grad], "lr": cfg.critic_lr or cfg.lr}]
    return torch.optim.AdamW(groups, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, foreach=True)


def make_lr_schedule(opt, cfg: PPOConfig):
    if cfg.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return make_scheduler(opt, cfg.total_steps, cfg.warmup_ratio, kind=cfg.lr_schedule)


# ----------------------------------------------------------------------------- the update


def policy_minibatch_loss(policy, mb: dict[str, torch.Tensor], cfg: PPOConfig,
                          trimmed=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy's part of a micro-batch's loss (clipped surrogate, minus the entropy bonus if any)."""
    ids, mask, q_len, r_len = trimmed or trim(mb["query_ids"], mb["query_mask"], mb["response_ids"],
                                              mb["response_mask"])
    r_mask = mb["response_mask"][:, :r_len]
    logits = generation.response_logits(policy, ids, mask, q_len, cfg.temperature)
    if cfg.entropy_coef:
        logprobs, entropy = generation.logprobs_and_entropy(logits, mb["response_ids"][:, :r_len])
    else:
        logprobs = generation.logprobs_from_logits(logits, mb["response_ids"][:, :r_len])
    del logits
    pg_loss, stats = L.policy_loss(logprobs, mb["logprobs"][:, :r_len], mb["advantages"][:, :r_len], r_mask,
                                   cfg.clip_eps)
    if cfg.entropy_coef:
        pg_loss = pg_loss - cfg.entropy_coef * L.masked_mean(entropy, r_mask)
    return pg_loss, stats


def value_minibatch_loss(critic, mb: dict[str, torch.Tensor], cfg: PPOConfig,
                         trimmed=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's part of a micro-batch's loss: ``vf_coef`` x the clipped value loss."""
    ids, mask, q_len, r_len = trimmed or trim(mb["query_ids"], mb["query_mask"], mb["response_ids"],
                                              mb["response_mask"])
    r_mask = mb["response_mask"][:, :r_len]
    values = critic(ids, mask)[:, q_len - 1 : -1]
    vf_loss, vf_stats = L.value_loss(values, mb["values"][:, :r_len], mb["returns"][:, :r_len], r_mask,
                                     cfg.vf_clip_eps)
    return cfg.vf_coef * vf_loss, vf_stats


def minibatch_loss(policy, critic, mb: dict[str, torch.Tensor], cfg: PPOConfig) -> tuple[torch.Tensor,
                                                                                         dict[str, torch.Tensor]]:
    """Loss and diagnostics of one micro-batch (rows of an :class:`Experience`, see ``Experience.select``).

    ``policy loss + vf_coef x value loss`` in one graph. :func:`ppo_update` does not use it: it
    back-propagates the two parts one after the other (same gradients, the two models share no
    parameters), so only one model's activations are alive at a time.
    """
    trimmed = trim(mb["query_ids"], mb["query_mask"], mb["response_ids"], mb["response_mask"])
    pg_loss, stats = policy_minibatch_loss(policy, mb, cfg, trimmed)
    vf_part, vf_stats = value_minibatch_loss(critic, mb, cfg, trimmed)
    total = pg_loss + vf_part
    return total, {**stats, **vf_stats, "loss": total.detach()}


def ppo_update(policy, critic, exp, cfg: PPOConfig, opt, step: int, info: D.DistInfo) -> dict[str, float]:
    """``ppo_epochs`` x ``num_minibatches`` optimizer steps on one batch; mean diagnostics (+ first minibatch)."""
    B = len(exp)
    mb_size = B // cfg.num_minibatches
    micro = cfg.micro_batch_size or mb_size
    n_micro = mb_size // micro
    device = exp.response_ids.device
    sums: dict[str, float] = defaultdict(float)
    n_updates = 0
    first: dict[str, float] = {}
    for epoch in range(cfg.ppo_epochs):
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + info.rank) * 10_007 + step * 101 + epoch)
        perm = torch.randperm(B, generator=gen)
        for m in range(cfg.num_minibatches):
            mb_idx = perm[m * mb_size : (m + 1) * mb_size]
            mb_tokens = float(exp.response_mask[mb_idx.to(device)].sum())
            mb_stats: dict[str, float] = defaultdict(float)
            for k in range(n_micro):
                idx = mb_idx[k * micro : (k + 1) * micro].to(device)
                mb = exp.select(idx)
                trimmed = trim(mb["query_ids"], mb["query_mask"], mb["response_ids"], mb["response_mask"])
                # Each micro-batch's masked means weighted by its share of the minibatch's valid tokens:
                # the accumulated gradient is that of the masked mean over the whole minibatch
                # (checklist 19), so micro_batch_size only trades memory for nothing (weight 1 when
                # the micro-batch is the minibatch).
                w = float(mb["response_mask"].sum()) / mb_tokens if mb_tokens > 0 else 1.0 / n_micro
                with D.no_sync([policy, critic], active=info.enabled and k < n_micro - 1):
                    # Policy, then critic: each backward frees its model's activations before the other
                    # model's forward, so the peak holds one model's activations, not both (the
                    # gradients are those of pg_loss + vf_coef * vf_loss: no shared parameters).
                    pg_loss, st = policy_minibatch_loss(policy, mb, cfg, trimmed)
                    (pg_loss * w).backward()
                    vf_part, vf_st = value_minibatch_loss(critic, mb, cfg, trimmed)
                    (vf_part * w).backward()
                st = {**st, **vf_st, "loss": pg_loss.detach() + vf_part.detach()}
                for key, v in st.items():
                    if key.endswith("_max"):
                        mb_stats[key] = max(mb_stats.get(key, float("-inf")), float(v))
                    else:
                        mb_stats[key] += float(v) * w
            mb_stats["grad_norm_policy"] = float(torch.nn.utils.clip_grad_norm_(
                [p for p in policy.parameters() if p.requires_grad], cfg.max_grad_norm))
            mb_stats["grad_norm_critic"] = float(torch.nn.utils.clip_grad_norm_(
                [p for p in critic.parameters() if p.requires_grad], cfg.max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not first:
                first = {"first_ratio_mean": mb_stats["ratio_mean"], "first_clip_frac": mb_stats["clip_frac"],
                         "first_approx_kl": mb_stats["approx_kl"]}
            for key, v in mb_stats.items():
                sums[key] += v
            n_updates += 1
    return {**{k: v / n_updates for k, v in sums.items()}, **first}


# ----------------------------------------------------------------------------- bookkeeping


def fingerprint(cfg: PPOConfig, model_cfg: ModelConfig, inputs: dict[str, str], world_size: int) -> str:
    """What makes two runs the same run (so a checkpoint of one may continue the other)."""
    ignore = {"checkpoint_every", "checkpoint_dir", "keep_checkpoints", "keep_checkpoints_on_success", "resume",
              "log_every"}
    c = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ignore}
    m = {k: v for k, v in model_cfg.model_dump(mode="json").items() if k not in ("cache_dir",)}
    blob = json.dumps({"ppo": c, "model": m, "inputs": inputs, "world_size": world_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _artifact_id(path: str | Path) -> str:
    try:
        return read_manifest(path).get("content_hash") or str(Path(path).resolve())
    except UserError:
        return str(Path(path).resolve())


def checkpoint_root(out: str | Path, cfg: PPOConfig) -> Path:
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir)
    out = Path(out)
    return out.parent / f"{out.name}.checkpoints"


def _step_metrics(sums: dict[str, float], upd: dict[str, float], beta: float, lr: float) -> dict[str, float]:
    n = max(sums["n"], 1.0)
    tokens = max(sums["tokens"], 1.0)
    m = {
        "score": sums["score"] / n,
        "score_norm": sums["score_norm"] / n,
        "gold": sums["gold"] / sums["gold_n"] if sums["gold_n"] else float("nan"),
        "kl": sums["kl"] / n,
        "kl_k1": sums["kl_k1"] / n,
        "non_score_reward": sums["non_score_reward"] / n,
        "entropy": sums["entropy_tok"] / tokens,
        "response_length": sums["response_length"] / n,
        "eos_rate": sums["eos"] / n,
        "value_mean": sums["value_tok"] / tokens,
        "return_mean": sums["return_tok"] / tokens,
        "beta": beta,
        "lr": lr,
    }
    m["total_reward"] = m["score_norm"] + m["non_score_reward"]
    m.update(upd)
    return m


def _progress_line(step: int, total: int, m: dict[str, float], eta: float) -> str:
    return (f"[ppo] step {step}/{total} score={m['score']:.3f} gold={m['gold']:.3f} kl={m['kl']:.3f} "
            f"beta={m['beta']:.4g} reward={m['total_reward']:.3f} pg={m['policy_loss']:.4f} "
            f"vf={m['value_loss']:.4f} clip={m['clip_frac']:.3f} approx_kl={m['approx_kl']:.4f} "
            f"ent={m['entropy']:.3f} len={m['response_length']:.1f} eos={m['eos_rate']:.2f} "
            f"ep/s={m['episodes_per_s']:.2f} tok/s={m['tokens_per_s']:,.0f} gen={m['gen_share']:.0%} "
            f"eta={fmt_duration(eta)}")


def summarize(history: list[dict[str, float]], world_size: int, cfg: PPOConfig) -> dict[str, Any]:
    """The manifest's metrics: the last step, the first step for comparison, and a last-10% window mean."""
    if not history:
        return {}
    last, first = history[-1], history[0]
    window = history[-max(1, len(history) // 10):]

    def wmean(key: str) -> float:
        xs = [h[key] for h in window if not math.isnan(h[key])]
        return sum(xs) / len(xs) if xs else float("nan")

    keys = ("score", "score_norm", "gold", "kl", "kl_k1", "non_score_reward", "total_reward", "entropy",
            "response_length", "eos_rate", "approx_kl", "clip_frac", "policy_loss", "value_loss", "beta")
    out: dict[str, Any] = {k: last[k] for k in keys}
    out.update({f"start_{k}": first[k] for k in ("score", "gold", "kl", "response_length", "eos_rate")})
    out.update({f"final_window_{k}": wmean(k) for k in ("score", "gold", "kl")})
    out.update({"steps": len(history), "episodes": len(history) * cfg.rollout_batch_size * world_size,
                "world_size": world_size, "kl_estimator": cfg.kl_estimator})
    return out


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
    set_seed(cfg.seed + info.rank)  # per-rank seeds (checklist 24): each rank samples differently
    read_manifest(sft_model, expect_kind="policy")
    rm_manifest = read_manifest(reward_model, expect_kind="reward-model")
    if model_cfg.lora and not cfg.merge_lora and (Path(sft_model) / models.ADAPTER_CONFIG).is_file():
        raise ConfigError("ppo.merge_lora false needs a merged SFT policy (the SFT artifact is an adapter)",
                          hint="set sft.merge_lora true, or ppo.merge_lora true")
    norm_stats = rm_manifest.get("reward_norm") or {"mean": 0.0, "std": 1.0}
    norm = RewardNorm(norm_stats["mean"], norm_stats["std"], cfg.score_clip) if cfg.normalize_reward \
        else RewardNorm(0.0, 1.0, cfg.score_clip)
    prompts = train_prompts(dataset)
    stream = PromptStream(prompts, cfg.seed)

    policy, ref, critic, rm, tok, rm_tok = load_models(sft_model, reward_model, cfg, model_cfg, norm)
    same_vocab = tok.get_vocab() == rm_tok.get_vocab()
    rm_max_len = int(rm_manifest.get("max_seq_len", 256))
    opt = make_optimizer(policy, critic, cfg)
    sched = make_lr_schedule(opt, cfg)
    kl_ctl = kl_controller(cfg)
    fp = fingerprint(cfg, model_cfg, {"dataset": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
                                      "sft": _artifact_id(sft_model), "reward": _artifact_id(reward_model)},
                     info.world_size)

    root = checkpoint_root(out, cfg)
    start_step, history = 0, []
    if info.is_main:
        if not cfg.resume and root.exists():
            shutil.rmtree(root)
        elif root.exists() and (n := ckpt.clear_stale(root, fp)):
            log.warning("[ppo] removed %d checkpoint(s) of another run (other config or inputs) from %s", n, root)
    D.barrier()
    found = ckpt.latest(root, fp) if cfg.resume else None
    if found is not None:
        ckpt.load_trainable_state(policy, found.weights("policy"))
        ckpt.load_trainable_state(critic, found.weights("critic"))
        trainer_state = found.trainer_state()
        opt.load_state_dict(trainer_state["optimizer"])
        sched.load_state_dict(trainer_state["scheduler"])
        kl_ctl.load_state_dict(found.state["kl_controller"])
        ckpt.restore_rng(found.state["rng"][info.rank])
        start_step, history = found.step, found.state["history"]
        log.info("[ppo] resuming from %s (step %d/%d)", found.path, start_step, cfg.total_steps)

    policy_t, critic_t = D.wrap(policy, info), D.wrap(critic, info)
    settings = RolloutSettings(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, max_prompt_len=cfg.max_prompt_len,
        generation_batch_size=cfg.generation_batch_size or cfg.rollout_batch_size,
        forward_batch_size=cfg.forward_batch_size, kl_estimator=cfg.kl_estimator,
        missing_eos_penalty=cfg.missing_eos_penalty, gamma=cfg.gamma, lam=cfg.lam,
        whiten_advantages=cfg.whiten_advantages, whiten_rewards=cfg.whiten_rewards)
    global_batch = cfg.rollout_batch_size * info.world_size
    all_reduce = D.all_reduce_sum if info.enabled else None

    run_ctx = tracking.stage_run("ppo", cfg, tags={"model": model_cfg.name, "world_size": info.world_size}) \
        if info.is_main else contextlib.nullcontext(tracking.Tracker(None))
    with run_ctx as tracker:
        tracker.log_params({"model": model_cfg.model_dump(mode="json")})
        if found is not None:
            tracker.set_tags({"resumed_from_step": start_step})
        session_start = time.perf_counter()
        log.info("[ppo] %d steps x %d prompts (%d rank(s)), %d PPO epochs x %d minibatch(es), "
                 "KL %s beta=%s%s, critic from %s", cfg.total_steps, global_batch, info.world_size,
                 cfg.ppo_epochs, cfg.num_minibatches, cfg.kl_estimator, cfg.kl_coef,
                 f" adaptive to {cfg.kl_target}" if cfg.adaptive_kl else "", cfg.critic_init)
        for step in range(start_step + 1, cfg.total_steps + 1):
            t0 = time.perf_counter()
            batch = stream.take((step - 1) * global_batch + info.rank * cfg.rollout_batch_size,
                                cfg.rollout_batch_size)
            scorer = None
            if not same_vocab:
                from rlhf.train.reward import score_texts

                def scorer(texts, _p=batch):
                    return score_texts(rm, rm_tok, _p, texts, rm_max_len, cfg.forward_batch_size)
            beta = kl_ctl.value
            exp, timing = make_experience(policy_t, ref, critic_t, rm, tok, batch, settings, beta, norm,
                                          all_reduce=all_reduce, texts_scorer=scorer)
            upd = ppo_update(policy_t, critic_t, exp, cfg, opt, step, info)
            lr = sched.get_last_lr()[0]
            sched.step()
            sums = D.sum_dict(experience_stats(exp), device=exp.response_ids.device)
            upd = {k: v / info.world_size for k, v in D.sum_dict(upd, device=exp.response_ids.device).items()}
            m = _step_metrics(sums, upd, beta, lr)
            kl_ctl.update(m["kl"], global_batch)
            seconds = time.perf_counter() - t0
            gen_s = D.sum_dict({"g": timing["gen_seconds"]})["g"] / info.world_size
            m.update({"episodes_per_s": global_batch / seconds, "tokens_per_s": sums["tokens"] / seconds,
                      "gen_share": gen_s / seconds, "step_seconds": seconds})
            history.append({k: v for k, v in m.items() if k not in TIMING_METRICS})
            tracker.log_metrics(m, step=step)
            done_here = step - start_step
            if step == 1 or step % cfg.log_every == 0 or step == cfg.total_steps:
                eta = (time.perf_counter() - session_start) / done_here * (cfg.total_steps - step)
                log.info(_progress_line(step, cfg.total_steps, m, eta))
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0) and step < cfg.total_steps:
                _save_checkpoint(root, step, policy, critic, opt, sched, kl_ctl, history, fp, cfg, info)
        in_sync = D.check_in_sync(policy, critic)
        metrics = summarize(history, info.world_size, cfg)
        metrics.update({"seconds": time.perf_counter() - session_start, "ranks_in_sync": int(in_sync),
                        "resumed_from_step": start_step})
        if not in_sync:
            raise RuntimeError("PPO ranks diverged: parameters differ across ranks")
        if info.is_main:
            tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))
                                 and not (isinstance(v, float) and math.isnan(v))})
            _write_output(out, policy, critic, tok, metrics, cfg, model_cfg, dataset, sft_model, reward_model,
                          tracker.run_id, norm)
            if not cfg.keep_checkpoints_on_success:
                shutil.rmtree(root, ignore_errors=True)
    D.barrier()
    log.info("[ppo] gold %.3f -> %.3f, score %.3f -> %.3f, KL %.3f (%s); policy in %s",
             metrics["start_gold"], metrics["gold"], metrics["start_score"], metrics["score"], metrics["kl"],
             cfg.kl_estimator, out)
    return metrics


def _save_checkpoint(root, step, policy, critic, opt, sched, kl_ctl, history, fp, cfg, info) -> None:
    rng = D.gather_objects(ckpt.capture_rng())  # every rank's RNG, written by rank 0
    if info.is_main:
        t0 = time.perf_counter()
        path = ckpt.save(root, step,
                         weights={"policy": ckpt.trainable_state(policy), "critic": ckpt.trainable_state(critic)},
                         trainer={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                         state={"fingerprint": fp, "data_position": step * cfg.rollout_batch_size * info.world_size,
                                "kl_controller": kl_ctl.state_dict(), "rng": rng, "history": history,
                                "world_size": info.world_size},
                         keep=cfg.keep_checkpoints)
        log.info("[ppo] checkpoint %s (%.1fs)", path, time.perf_counter() - t0)
    D.barrier()


def _write_output(out, policy, critic, tok, metrics, cfg, model_cfg, dataset, sft_model, reward_model, run_id,
                  norm: RewardNorm) -> None:
    with atomic_dir(out) as tmp:
        models.save_model(unwrap(policy), tok, tmp, merge_lora=cfg.merge_lora)
        critic_dir = models.save_model(critic.model, tok, tmp / "critic", merge_lora=True)
        write_json(critic_dir / "value_norm.json", {"shift": float(critic.shift), "scale": float(critic.scale),
                                                    "init": cfg.critic_init})
        write_manifest(tmp, kind="policy", inputs={"dataset": dataset, "sft_model": sft_model,
                                                   "reward_model": reward_model},
                       config=cfg, metrics=metrics,
                       extra={"model": model_cfg.model_dump(mode="json"), "stage": "ppo", "mlflow_run_id": run_id,
                              "critic": "critic", "reward_norm": {"mean": norm.mean, "std": norm.std},
                              "lora_merged": bool(cfg.merge_lora or not model_cfg.lora)})


__all__ = ["train_ppo", "ppo_update", "minibatch_loss", "policy_minibatch_loss", "value_minibatch_loss",
           "load_models", "FixedKLController", "AdaptiveKLController", "kl_controller", "PromptStream", "fingerprint",
           "summarize", "checkpoint_root", "TIMING_METRICS"]
