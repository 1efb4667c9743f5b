"""Rollouts: sample responses, score them, and turn them into PPO experience.

The "collect" half of a PPO step is three calls, which the trainer's loop makes in this order:

1. :func:`sample_responses`: one response per prompt row from the policy (the loop repeats each
   prompt ``num_samples_per_prompt`` times in a row for ``rloo``/``grpo``)
   (:func:`rlhf.train.generation.sample`: chat template, prompts cut from the left and left-padded, KV
   cache, ``do_sample=True, top_k=0, top_p=1``, temperature, fixed response budget, everything
   after the first EOS padded and masked; docs/ppo.md #2-#6), then the no-grad forward passes over
   ``prompt + response``: the policy's old log-probs and entropy at the *same* temperature (#5),
   the reference's log-probs at that temperature, from the frozen SFT copy or, with LoRA, the same
   model with every adapter disabled (#12), and the critic's per-token values (one of
   :mod:`rlhf.ppo.critic`'s kinds, #18, #32; zeros when the estimator has no critic);
2. :func:`score_responses`: the reward model's score of ``prompt + response`` read at the last
   real token, which is the EOS (#8); normalised with the mean/std the reward stage measured on
   SFT demonstrations, optionally clipped (#10); a fixed penalty subtracted when a response has
   no EOS within the budget (#11);
3. :func:`compute_advantages`: per-token rewards ``-beta * KL_t`` with the score added at the EOS
   index (#13, #14), then the estimator (:mod:`rlhf.ppo.advantages`): GAE (#16) with advantages
   whitened over valid tokens of the global batch (#17), or RLOO / GRPO over each prompt's group
   of responses, their sequence advantage on every token (#31).

The reward model reads the *token ids the policy produced* (no decode/re-encode round trip) when
both share a tokenizer, which is the case for a reward model initialised from the SFT policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from rlhf.data import conversation, demo
from rlhf.errors import UserError
from rlhf.ppo import advantages as A
from rlhf.ppo import loss as L
from rlhf.ppo.critic import ValueModel, keep_requires_grad, zero_value_head
from rlhf.ppo.reward_adapter import RewardAdapterModel
from rlhf.train import generation, models


def check_special_tokens(tokenizer, where: str = "policy tokenizer") -> None:
    """docs/ppo.md #1, enforced again at the PPO boundary: pad must exist and differ from EOS."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"the {where} has no EOS token", hint="use a tokenizer with an end-of-turn token")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"the {where} uses EOS as its pad token (or has none)",
                        hint="EOS would be masked as padding; load it with rlhf.train.models.load_tokenizer")
    if tokenizer.padding_side != "left":
        raise UserError(f"the {where} pads on the {tokenizer.padding_side}; generation needs left padding")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself; None stays None)."""
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------- batches


@dataclass
class Experience:
    """One rollout batch on one rank, with everything the PPO update needs. Per-token tensors are (B, R)."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor               # per-token KL estimate (the configured estimator)
    rewards: torch.Tensor          # -beta * kl + score at the EOS index
    non_score_rewards: torch.Tensor
    advantages: torch.Tensor       # whitened
    returns: torch.Tensor
    entropy: torch.Tensor
    scores: torch.Tensor           # (B,) normalised reward-model score, penalty included
    raw_scores: torch.Tensor       # (B,) reward-model score as the model outputs it
    has_eos: torch.Tensor          # (B,) bool
    texts: list[str]
    prompts: list[conversation.Messages]

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of rows ``idx`` (a minibatch), without the text fields."""
        return {f.name: getattr(self, f.name)[idx] for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}


def trim(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
         response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``prompt + response`` ids and mask without columns that are padding in every row.

    Left padding of the prompts is cut down to the longest prompt of these rows and right padding
    of the responses to the longest response. Returns ``(ids, mask, query_len, response_len)``; the
    per-token tensors of these rows are then sliced to ``[:, :response_len]``.
    """
    valid_cols = query_mask.bool().any(0)
    start = int(valid_cols.float().argmax()) if bool(valid_cols.any()) else query_mask.shape[1] - 1
    r_len = max(int(response_mask.sum(1).max()), 1)
    ids = torch.cat([query_ids[:, start:], response_ids[:, :r_len]], 1)
    mask = torch.cat([query_mask[:, start:], response_mask[:, :r_len]], 1)
    return ids, mask, query_ids.shape[1] - start, r_len


def _concat_rollouts(parts: list[generation.Rollout], pad_id: int) -> generation.Rollout:
    """Join rollouts whose prompt widths differ (left-pad the narrower ones)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.query_ids.shape[1] for p in parts)

    def lpad(t: torch.Tensor, value: int) -> torch.Tensor:
        extra = width - t.shape[1]
        return t if extra == 0 else torch.cat([torch.full((t.shape[0], extra), value, dtype=t.dtype,
                                                          device=t.device), t], 1)

    return generation.Rollout(
        query_ids=torch.cat([lpad(p.query_ids, pad_id) for p in parts]),
        query_mask=torch.cat([lpad(p.query_mask, 0) for p in parts]),
        response_ids=torch.cat([p.response_ids for p in parts]),
        response_mask=torch.cat([p.response_mask for p in parts]),
        has_eos=torch.cat([p.has_eos for p in parts]),
        texts=[t for p in parts for t in p.texts],
    )


# ----------------------------------------------------------------------------- scoring


@dataclass
class RewardNorm:
    """docs/ppo.md #10: ``(score - mean) / std``, then optionally clipped to ``+-clip``."""

    mean: float = 0.0
    std: float = 1.0
    clip: float | None = None

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        s = (raw - self.mean) / max(self.std, 1e-6)
        return s.clamp(-self.clip, self.clip) if self.clip else s


def reference_context(policy: nn.Module, ref: nn.Module | None):
    """The model whose log-probs are the reference, as a context: the frozen copy, or (LoRA) the adapter off."""
    if ref is not None:
        return contextlib.nullcontext(ref)
    inner = unwrap(policy)
    if not hasattr(inner, "disable_adapter"):
        raise ValueError("no reference model given and the policy has no adapter to disable")

    @contextlib.contextmanager
    def adapter_off():  # every adapter off (the policy's and a critic adapter): the SFT weights
        with keep_requires_grad(inner), inner.disable_adapter():
            yield inner

    return adapter_off()


@torch.no_grad()
def score_rollout(reward_model: nn.Module, rollout: generation.Rollout, forward_batch_size: int,
                  texts_scorer: Callable[[list[str]], torch.Tensor] | None = None) -> torch.Tensor:
    """Raw reward-model scores, (B,), read at each row's last real token: the EOS (docs/ppo.md #8).

    The input is exactly ``prompt + response`` up to and including EOS; the padding after EOS has
    mask 0, so :func:`rlhf.train.models.reward_scores` reads the EOS position. ``texts_scorer`` is the
    fallback when the reward model has another tokenizer (decode, re-encode, score).
    """
    if texts_scorer is not None:
        return texts_scorer(rollout.texts)
    out = []
    for i in range(0, rollout.query_ids.shape[0], forward_batch_size):
        sl = slice(i, i + forward_batch_size)
        ids, mask, _, _ = trim(rollout.query_ids[sl], rollout.query_mask[sl], rollout.response_ids[sl],
                               rollout.response_mask[sl])
        # a reward adapter on the policy's base (ppo.reward adapter) scores itself; a reward model via its head
        out.append(reward_model(ids, mask) if isinstance(reward_model, RewardAdapterModel)
                   else models.reward_scores(reward_model, ids, mask))
    return torch.cat(out).float()


@torch.no_grad()
def forward_logprobs(model: nn.Module, query_ids, query_mask, response_ids, response_mask, temperature: float,
                     forward_batch_size: int, with_entropy: bool = False):
    """Per-token log-probs of the responses (and entropies) at ``temperature``: (B, R), 0 on padding."""
    B, R = response_ids.shape
    logprobs = torch.zeros((B, R), device=response_ids.device)
    entropy = torch.zeros((B, R), device=response_ids.device) if with_entropy else None
    for i in range(0, B, forward_batch_size):
        sl = slice(i, i + forward_batch_size)
        ids, mask, q_len, r_len = trim(query_ids[sl], query_mask[sl], response_ids[sl], response_mask[sl])
        logits = generation.response_logits(model, ids, mask, q_len, temperature)
        if entropy is not None:
            lp, ent = generation.logprobs_and_entropy(logits, response_ids[sl, :r_len])
            entropy[sl, :r_len] = L.masked(ent, response_mask[sl, :r_len])
        else:
            lp = generation.logprobs_from_logits(logits, response_ids[sl, :r_len])
        logprobs[sl, :r_len] = L.masked(lp, response_mask[sl, :r_len])
        del logits
    return logprobs, entropy


@torch.no_grad()
def forward_values(critic: nn.Module, query_ids, query_mask, response_ids, response_mask,
                   forward_batch_size: int) -> torch.Tensor:
    """The critic's value of each response position (the state before the token is emitted): (B, R)."""
    B, R = response_ids.shape
    values = torch.zeros((B, R), device=response_ids.device)
    for i in range(0, B, forward_batch_size):
        sl = slice(i, i + forward_batch_size)
        ids, mask, q_len, r_len = trim(query_ids[sl], query_mask[sl], response_ids[sl], response_mask[sl])
        v = critic(ids, mask)[:, q_len - 1 : -1]
        values[sl, :r_len] = L.masked(v, response_mask[sl, :r_len])
    return values


def gold_scores(prompts: list[str | conversation.Messages], texts: list[str]) -> list[float]:
    """The demo task's gold score per response (NaN for prompts that are not demo topics), on the prompt's text."""
    texts_of = [conversation.render(p) for p in prompts]
    return [demo.gold_score(p, t) if demo.topic_of(p) else float("nan") for p, t in zip(texts_of, texts)]


# ----------------------------------------------------------------------------- experience


@dataclass
class RolloutSettings:
    max_new_tokens: int
    temperature: float
    max_prompt_len: int
    generation_batch_size: int
    forward_batch_size: int
    kl_estimator: str
    missing_eos_penalty: float | None
    gamma: float
    lam: float
    whiten_advantages: bool
    whiten_rewards: bool
    estimator: str = "gae"        # rlhf.ppo.advantages: gae, rloo, grpo
    group_size: int = 1           # responses per prompt, consecutive rows (rloo, grpo)


@dataclass
class Samples:
    """Sampled responses and the no-grad forward passes over them (per-token: (B, R), 0 on padding)."""

    rollout: generation.Rollout
    prompts: list[conversation.Messages]
    logprobs: torch.Tensor       # the policy's, at sampling time: the "old" log-probs of the update
    entropy: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    gen_seconds: float           # time spent in generate


@torch.no_grad()
def sample_responses(policy: nn.Module, ref: nn.Module | None, critic: nn.Module | None, tokenizer,
                     prompts: list[conversation.Messages], s: RolloutSettings) -> Samples:
    """One response per prompt (a conversation), with the policy's and the reference's log-probs and the
    critic's values (zeros without a critic)."""
    import time

    gen_model = unwrap(policy)
    t0 = time.perf_counter()
    parts = [generation.sample(gen_model, tokenizer, prompts[i : i + s.generation_batch_size],
                               max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                               max_prompt_len=s.max_prompt_len)
             for i in range(0, len(prompts), s.generation_batch_size)]
    ro = _concat_rollouts(parts, tokenizer.pad_token_id)
    gen_seconds = time.perf_counter() - t0

    q_ids, q_mask, r_ids, r_mask = ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask
    logprobs, entropy = forward_logprobs(gen_model, q_ids, q_mask, r_ids, r_mask, s.temperature,
                                         s.forward_batch_size, with_entropy=True)
    with reference_context(policy, ref) as ref_model:
        ref_logprobs, _ = forward_logprobs(ref_model, q_ids, q_mask, r_ids, r_mask, s.temperature,
                                           s.forward_batch_size)
    values = forward_values(unwrap(critic), q_ids, q_mask, r_ids, r_mask, s.forward_batch_size) \
        if critic is not None else torch.zeros_like(logprobs)
    return Samples(ro, list(prompts), logprobs, entropy, ref_logprobs, values, gen_seconds)


@torch.no_grad()
def score_responses(reward_model: nn.Module, samples: Samples, s: RolloutSettings, norm: RewardNorm,
                    texts_scorer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, raw_scores)``, (B,) each: the normalised scores, missing-EOS penalty included, and the
    scores as the reward model outputs them."""
    ro = samples.rollout
    raw = score_rollout(reward_model, ro, s.forward_batch_size, texts_scorer).to(samples.values.device)
    scores = norm(raw)
    if s.missing_eos_penalty is not None:
        scores = torch.where(ro.has_eos.to(scores.device), scores, scores - s.missing_eos_penalty)
    return scores, raw


@torch.no_grad()
def compute_advantages(samples: Samples, scores: torch.Tensor, raw_scores: torch.Tensor, s: RolloutSettings,
                       beta: float, all_reduce=None) -> Experience:
    """KL-penalised per-token rewards and the estimator's advantages: the batch the update trains on.

    ``gae``: per token against the critic's values, whitened over the global batch (``whiten_advantages``).
    ``rloo`` / ``grpo``: on each response's sequence reward within its group of ``group_size``
    consecutive rows (all on this rank), put on every token of the response; ``returns`` is then
    the sequence reward (there is no critic to fit).
    """
    ro, r_mask = samples.rollout, samples.rollout.response_mask
    kl = L.masked(L.kl_per_token(samples.logprobs, samples.ref_logprobs, s.kl_estimator), r_mask)
    rewards, non_score = L.token_rewards(scores, kl, r_mask, beta)
    if s.whiten_rewards:
        rewards = L.masked_whiten(rewards, r_mask, shift_mean=False, all_reduce=all_reduce)
    if s.estimator == "gae":
        advantages, returns = A.gae(rewards, samples.values, r_mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = L.masked_whiten(advantages, r_mask, all_reduce=all_reduce)
    else:
        seq_rewards = A.sequence_rewards(rewards, r_mask)
        estimate = {"rloo": A.rloo, "grpo": A.grpo}[s.estimator]
        advantages = A.per_token(estimate(seq_rewards, s.group_size), r_mask)
        returns = A.per_token(seq_rewards, r_mask)
    return Experience(ro.query_ids, ro.query_mask, ro.response_ids, r_mask, samples.logprobs,
                      samples.ref_logprobs, samples.values, kl, rewards, non_score, advantages, returns,
                      samples.entropy, scores, raw_scores, ro.has_eos, ro.texts, samples.prompts)


def experience_stats(exp: Experience) -> dict[str, Any]:
    """Per-batch sums for the step metrics (summed across ranks, then divided by the counts)."""
    m = exp.response_mask.float()
    k1 = L.masked(exp.logprobs - exp.ref_logprobs, m).sum(1)
    gold = torch.tensor(gold_scores(exp.prompts, exp.texts), dtype=torch.float64)
    has_gold = ~torch.isnan(gold)
    return {
        "n": float(len(exp)),
        "tokens": float(m.sum()),
        "score": float(exp.raw_scores.sum()),
        "score_norm": float(exp.scores.sum()),
        "kl": float(exp.kl.sum()),              # summed over tokens, then averaged over sequences
        "kl_k1": float(k1.sum()),
        "non_score_reward": float(exp.non_score_rewards.sum()),
        "entropy_tok": float(L.masked_sum(exp.entropy, m)),
        "response_length": float(m.sum()),
        "eos": float(exp.has_eos.float().sum()),
        "value_tok": float(L.masked_sum(exp.values, m)),
        "return_tok": float(L.masked_sum(exp.returns, m)),
        "gold": float(gold[has_gold].sum()) if bool(has_gold.any()) else 0.0,
        "gold_n": float(has_gold.sum()),
    }


__all__ = ["ValueModel", "Experience", "RewardNorm", "RolloutSettings", "Samples", "sample_responses",
           "score_responses", "compute_advantages", "score_rollout",
           "forward_logprobs", "forward_values", "trim", "check_special_tokens", "reference_context",
           "zero_value_head", "experience_stats", "gold_scores", "unwrap"]
