"""The mathematics of PPO for language models, in one file you can read top to bottom.

Shapes: ``B`` sequences in a batch, ``T`` response tokens per sequence (right-padded: a response
is ``mask == 1`` up to and including its EOS, then padding). Everything that is averaged is a
*masked* mean over valid response tokens (docs/ppo.md #19): padding never dilutes a loss or a metric.

The pieces, in the order a PPO step uses them:

1. :func:`kl_per_token`: the per-token KL estimate between the policy and the frozen reference,
   named ``k1`` (``log p - log q``, unbiased, can be negative per token) or ``k3``
   (``exp(log q - log p) - 1 - (log q - log p)``, unbiased and always >= 0) (docs/ppo.md #14).
2. :func:`token_rewards`: reward per token ``-beta * kl_t``, plus the (normalised) reward-model
   score added at the last valid token, i.e. the EOS index (docs/ppo.md #8, #13).
3. the advantages: :func:`rlhf.ppo.advantages.gae` (``gamma`` 1, ``lam`` 0.95, ``returns =
   advantages + values``; docs/ppo.md #16), or the critic-free ``rloo`` / ``grpo`` on groups of
   responses to one prompt (#31); all in :mod:`rlhf.ppo.advantages`.
4. :func:`masked_whiten`: advantages whitened over valid tokens only (17); across ranks when
   running distributed, so every rank uses the same statistics.
5. :func:`policy_loss`: the clipped surrogate with ``eps = 0.2`` (20), with its diagnostics:
   clip fraction, approximate KL ``0.5 * E[(log r)^2]`` and ratio mean.
6. :func:`value_loss`: the clipped value loss (eps 0.2), ``0.5 * max(unclipped, clipped)`` (18).
7. :func:`entropy_from_logits`: logged, not used as a bonus by default (21).
8. :func:`ppo_loss`: the loss the update minimises,
   ``policy_loss + vf_coef * value_loss - entropy_coef * entropy``, and its two models' parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from rlhf.ppo.advantages import gae

KLEstimator = Literal["k1", "k3"]


# ----------------------------------------------------------------------------- masked statistics


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with masked positions set to 0 (a select, not a product: garbage or inf there cannot leak)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return masked(x, mask).sum() if dim is None else masked(x, mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 when there are none)."""
    n = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / n.clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  all_reduce=None, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` with mean and (unbiased) variance over valid tokens; 0 on masked positions.

    ``all_reduce``: a function that sums a tensor across ranks in place (``None`` on one process), so
    that under DDP the statistics are those of the global batch. ``shift_mean=False`` keeps the mean
    (used for rewards, whose sign carries meaning).
    """
    x = masked(x, mask)
    stats = torch.stack([x.sum(), (x * x).sum(), mask.to(x.dtype).sum()]).double()
    if all_reduce is not None:
        all_reduce(stats)
    total, total_sq, n = stats.unbind()
    mean = total / n.clamp(min=1.0)
    var = (total_sq / n.clamp(min=1.0) - mean * mean).clamp(min=0.0)
    if n > 1:
        var = var * n / (n - 1)  # unbiased, as in the reference implementations
    mean, var = mean.to(x.dtype), var.to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return masked(out, mask)


# ----------------------------------------------------------------------------- KL and rewards


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy.

    ``k1 = log p - log q``; ``k3 = (q/p) - 1 - log(q/p)`` (Schulman, "Approximating KL divergence").
    Both are 0 exactly when the policy equals the reference.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (use 'k1' or 'k3')")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each right-padded row: the EOS, or the budget's last token."""
    return (mask.long().sum(1) - 1).clamp(min=0)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """Per-token rewards: ``-beta * kl`` on every valid token, plus the sequence score at its EOS index.

    Returns ``(rewards, non_score_rewards)``, both (B, T) and 0 on masked positions. The KL lives in
    the reward only (not also as a loss term: docs/ppo.md #13).
    """
    non_score = masked(-beta * kl, mask)
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, non_score


# ----------------------------------------------------------------------------- advantages

# The estimators (GAE, RLOO, GRPO) live in rlhf.ppo.advantages; gae is re-exported here for its old callers.


# ----------------------------------------------------------------------------- losses


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate ``-min(r A, clip(r, 1-eps, 1+eps) A)`` as a masked mean, with diagnostics."""
    log_ratio = masked(logprobs - old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio * log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": masked(ratio, mask).max(),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2)`` as a masked mean."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"value_loss": loss.detach(), "value_clip_frac": masked_mean((err_clipped > err).float(), mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the categorical distribution given by ``logits`` (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- the PPO loss


class LossCoefs(Protocol):
    """The coefficients :func:`ppo_loss` reads (a :class:`rlhf.config.PPOConfig` has them)."""

    clip_eps: float
    vf_clip_eps: float
    vf_coef: float
    entropy_coef: float


@dataclass
class PPOLoss:
    """A micro-batch's PPO loss: ``total`` and each model's part of it, with the diagnostics.

    ``policy`` (clipped surrogate - ``entropy_coef`` x entropy) is where the policy's gradient comes
    from, ``value`` (``vf_coef`` x clipped value loss) the critic's; ``None`` when that model's
    outputs were not given.
    """

    total: torch.Tensor
    policy: torch.Tensor | None
    value: torch.Tensor | None
    stats: dict[str, torch.Tensor]


def ppo_loss(rollout: Mapping[str, torch.Tensor], coefs: LossCoefs, *, logprobs: torch.Tensor | None = None,
             entropy: torch.Tensor | None = None, values: torch.Tensor | None = None) -> PPOLoss:
    """``policy_loss + vf_coef * value_loss - entropy_coef * entropy`` on rows of a rollout batch.

    ``rollout``: the batch's tensors of these rows as collected (``logprobs``, ``values``,
    ``advantages``, ``returns``, ``response_mask``; see ``Experience.select``); they are cut to the
    width of the model outputs. The outputs: the policy's ``logprobs`` (and ``entropy`` when
    ``entropy_coef`` > 0) and the critic's ``values``, (B, R) each.

    The two models share no parameters, so the loss splits into one part per model: called with only
    the policy's outputs it is the policy's part, with only ``values`` the critic's. The trainer
    back-propagates the parts one after the other (one model's activations alive at a time); the
    gradients are those of the total.
    """
    if logprobs is None and values is None:
        raise ValueError("ppo_loss needs the policy's logprobs, the critic's values, or both")
    policy = value = None
    stats: dict[str, torch.Tensor] = {}
    if logprobs is not None:
        r_len = logprobs.shape[1]
        mask = rollout["response_mask"][:, :r_len]
        policy, pg_stats = policy_loss(logprobs, rollout["logprobs"][:, :r_len],
                                       rollout["advantages"][:, :r_len], mask, coefs.clip_eps)
        if coefs.entropy_coef:
            if entropy is None:
                raise ValueError("entropy_coef > 0: ppo_loss needs the policy's entropy")
            policy = policy - coefs.entropy_coef * masked_mean(entropy, mask)
        stats.update(pg_stats)
    if values is not None:
        r_len = values.shape[1]
        vf_loss, vf_stats = value_loss(values, rollout["values"][:, :r_len], rollout["returns"][:, :r_len],
                                       rollout["response_mask"][:, :r_len], coefs.vf_clip_eps)
        value = coefs.vf_coef * vf_loss
        stats.update(vf_stats)
    total = value if policy is None else policy if value is None else policy + value
    return PPOLoss(total, policy, value, stats)


__all__ = ["masked", "masked_mean", "masked_sum", "masked_whiten", "kl_per_token", "last_token_index", "token_rewards",
           "gae", "policy_loss", "value_loss", "entropy_from_logits", "LossCoefs", "PPOLoss", "ppo_loss"]
