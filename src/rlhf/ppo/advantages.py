"""Advantage estimators, pure tensor functions (``PPOConfig.estimator``; docs/ppo.md #16, #31).

Shapes as in :mod:`rlhf.ppo.loss`: ``B`` rows, ``T`` right-padded response tokens. Every estimator
starts from the same per-token rewards (``-beta * kl_t``, plus the normalised score at the EOS
index: :func:`rlhf.ppo.loss.token_rewards`), so the KL penalty and the EOS scoring are shared.

* :func:`gae` (``estimator: gae``, the default): generalised advantage estimation against the
  critic's values, per token.
* :func:`rloo` (``estimator: rloo``, Ahmadian et al. 2024, "Back to Basics"): ``k`` responses per
  prompt; the baseline of response ``i`` is the mean of the *other* ``k - 1`` responses' rewards.
* :func:`grpo` (``estimator: grpo``, Shao et al. 2024, DeepSeekMath): ``k`` responses per prompt;
  the reward standardised within its group.

RLOO and GRPO need no critic. They work on one number per response, the sequence reward
:func:`sequence_rewards` (the sum of the per-token rewards: the score minus ``beta`` x the
sequence KL, ``gamma`` = 1), and the response's advantage is put on each of its tokens
(:func:`per_token`: outcome supervision).

Groups: rows ``g * k ... g * k + k - 1`` are the ``k`` responses of the ``g``-th prompt (the loop
repeats each prompt ``k`` times in a row, on one rank: ``trainer.run_steps``).
"""

from __future__ import annotations

import torch


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    ``V`` and ``A`` beyond the last valid token are 0 (the episode ends at EOS). Returns
    ``(advantages, returns)`` with ``returns = advantages + values``; both 0 on masked positions.
    """
    values = _masked(values, mask)
    rewards = _masked(rewards, mask)
    mask = mask.to(values.dtype)
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def sequence_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One reward per response, (B,): ``R_i = sum_t r_{i,t}`` = score_i - beta * sum_t kl_{i,t}."""
    return _masked(rewards, mask).sum(1)


def _groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    if rewards.dim() != 1 or k < 2 or rewards.shape[0] % k:
        raise ValueError(f"need (B,) rewards with B a multiple of the group size k >= 2 (B={tuple(rewards.shape)}, "
                         f"k={k})")
    return rewards.view(-1, k)


def rloo(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out: ``A_i = R_i - (sum_{j != i} R_j) / (k - 1)`` within each group of ``k``.

    Equivalently ``k / (k - 1) * (R_i - mean_group)``. ``rewards``: (B,) sequence rewards, groups of
    ``k`` consecutive rows; returns (B,).
    """
    g = _groups(rewards, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def grpo(rewards: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages: ``A_i = (R_i - mean_group) / (std_group + eps)``.

    ``std_group`` is the unbiased (``k - 1``) standard deviation of the group's ``k`` rewards, as in
    the reference implementations; ``eps`` keeps a group of equal rewards at advantage 0.
    ``rewards``: (B,) sequence rewards, groups of ``k`` consecutive rows; returns (B,).
    """
    g = _groups(rewards, k)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).reshape(-1)


def per_token(seq_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-response value (B,) on every valid token of its response: (B, T), 0 on padding."""
    return _masked(seq_values[:, None].expand(mask.shape), mask)


ESTIMATORS = ("gae", "rloo", "grpo")
NEEDS_CRITIC = {"gae": True, "rloo": False, "grpo": False}

__all__ = ["gae", "sequence_rewards", "rloo", "grpo", "per_token", "ESTIMATORS", "NEEDS_CRITIC"]
