"""What a PPO run reports, and the bookkeeping that reports it (docs/ppo.md #25).

* :class:`UpdateStats`: the diagnostics of one optimizer step, accumulated over its micro-batches;
  :func:`mean_update_stats` turns a PPO step's optimizer steps into the update's metrics;
* :func:`step_metrics`: one PPO step's metrics from the experience (summed over ranks) and the update;
* :class:`StepLog`: the loop's per-step bookkeeping: reduce over ranks, keep the history (for
  checkpoints and the manifest), send every step to MLflow, print the progress line;
* :func:`summarize`: the manifest's metrics at the end of the run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from rlhf.config import PPOConfig
from rlhf.ppo.rollout import Experience, experience_stats
from rlhf.train import distributed as D
from rlhf.train.loop import fmt_duration

log = logging.getLogger("rlhf")

# Metrics that depend on wall-clock time (everything else is deterministic for a fixed seed on CPU).
TIMING_METRICS = ("episodes_per_s", "tokens_per_s", "gen_share", "step_seconds")


# ----------------------------------------------------------------------------- the update's diagnostics


@dataclass
class UpdateStats:
    """One optimizer step (a minibatch): token-weighted means over its micro-batches (weights summing to 1),
    the largest ratio of any of them, and the gradient norms before clipping."""

    policy_loss: float = 0.0
    clip_frac: float = 0.0
    approx_kl: float = 0.0
    ratio_mean: float = 0.0
    ratio_max: float = -math.inf
    value_loss: float = 0.0
    value_clip_frac: float = 0.0
    loss: float = 0.0
    grad_norm_policy: float = 0.0
    grad_norm_critic: float = 0.0

    def add(self, stats: dict[str, torch.Tensor], weight: float) -> None:
        """Fold in one micro-batch's :func:`rlhf.ppo.loss.ppo_loss` stats (and its ``loss``)."""
        self.policy_loss += float(stats["policy_loss"]) * weight
        self.clip_frac += float(stats["clip_frac"]) * weight
        self.approx_kl += float(stats["approx_kl"]) * weight
        self.ratio_mean += float(stats["ratio_mean"]) * weight
        self.ratio_max = max(self.ratio_max, float(stats["ratio_max"]))
        self.value_loss += float(stats.get("value_loss", 0.0)) * weight  # 0 without a critic (rloo, grpo)
        self.value_clip_frac += float(stats.get("value_clip_frac", 0.0)) * weight
        self.loss += float(stats["loss"]) * weight


def mean_update_stats(steps: list[UpdateStats]) -> dict[str, float]:
    """The mean over a PPO step's optimizer steps, plus the first one's ratio, clip fraction and approx-KL
    (``first_*``: 1, 0 and 0 when rollout and update log-probs agree, docs/ppo.md #7)."""
    sums = dict.fromkeys(asdict(steps[0]), 0.0)
    for s in steps:
        for key, v in asdict(s).items():
            sums[key] += v
    first = steps[0]
    return {**{k: v / len(steps) for k, v in sums.items()}, "first_ratio_mean": first.ratio_mean,
            "first_clip_frac": first.clip_frac, "first_approx_kl": first.approx_kl}


# ----------------------------------------------------------------------------- per step


def step_metrics(sums: dict[str, float], upd: dict[str, float], beta: float, lr: float) -> dict[str, float]:
    """A step's metrics from :func:`rlhf.ppo.rollout.experience_stats` sums and the update's means."""
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


def progress_line(step: int, total: int, m: dict[str, float], eta: float) -> str:
    return (f"[ppo] step {step}/{total} score={m['score']:.3f} gold={m['gold']:.3f} kl={m['kl']:.3f} "
            f"beta={m['beta']:.4g} reward={m['total_reward']:.3f} pg={m['policy_loss']:.4f} "
            f"vf={m['value_loss']:.4f} clip={m['clip_frac']:.3f} approx_kl={m['approx_kl']:.4f} "
            f"ent={m['entropy']:.3f} len={m['response_length']:.1f} eos={m['eos_rate']:.2f} "
            f"ep/s={m['episodes_per_s']:.2f} tok/s={m['tokens_per_s']:,.0f} gen={m['gen_share']:.0%} "
            f"eta={fmt_duration(eta)}")


class StepLog:
    """The loop's bookkeeping: :meth:`begin` at the start of a step, :meth:`record` at its end.

    Every rank calls both (the metrics are reduced over ranks); only rank 0's tracker is a real
    MLflow run and only rank 0 logs at INFO level.
    """

    def __init__(self, tracker, cfg: PPOConfig, info: D.DistInfo, history: list[dict[str, float]],
                 start_step: int):
        self.tracker, self.cfg, self.info = tracker, cfg, info
        self.history, self.start_step = history, start_step
        self.session_start = self._t0 = time.perf_counter()

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def record(self, step: int, exp: Experience, upd: dict[str, float], beta: float, lr: float,
               gen_seconds: float) -> dict[str, float]:
        """The step's metrics, reduced over ranks, into the history, MLflow and the progress line."""
        world = self.info.world_size
        # one collective for everything, on the rank's device (docs/ppo.md #26)
        local = {**{f"exp.{k}": v for k, v in experience_stats(exp).items()},
                 **{f"upd.{k}": v for k, v in upd.items()}, "gen_seconds": gen_seconds}
        reduced = D.sum_dict(local)
        sums = {k[4:]: v for k, v in reduced.items() if k.startswith("exp.")}
        upd = {k[4:]: v / world for k, v in reduced.items() if k.startswith("upd.")}
        m = step_metrics(sums, upd, beta, lr)
        seconds = time.perf_counter() - self._t0
        gen_s = reduced["gen_seconds"] / world
        global_batch = self.cfg.rows_per_step * world  # episodes: responses, k per prompt
        m.update({"episodes_per_s": global_batch / seconds, "tokens_per_s": sums["tokens"] / seconds,
                  "gen_share": gen_s / seconds, "step_seconds": seconds})
        self.history.append({k: v for k, v in m.items() if k not in TIMING_METRICS})
        self.tracker.log_metrics(m, step=step)
        total = self.cfg.total_steps
        if step == 1 or step % self.cfg.log_every == 0 or step == total:
            eta = (time.perf_counter() - self.session_start) / (step - self.start_step) * (total - step)
            log.info(progress_line(step, total, m, eta))
        return m

    def summary(self, ranks_in_sync: bool) -> dict[str, Any]:
        """The run's metrics for the manifest (see :func:`summarize`), with its duration."""
        metrics = summarize(self.history, self.info.world_size, self.cfg)
        metrics.update({"seconds": time.perf_counter() - self.session_start,
                        "ranks_in_sync": int(ranks_in_sync), "resumed_from_step": self.start_step})
        return metrics


# ----------------------------------------------------------------------------- the run


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
    out.update({"steps": len(history), "episodes": len(history) * cfg.rows_per_step * world_size,
                "world_size": world_size, "kl_estimator": cfg.kl_estimator})
    return out


__all__ = ["TIMING_METRICS", "UpdateStats", "mean_update_stats", "step_metrics", "progress_line", "StepLog",
           "summarize"]
