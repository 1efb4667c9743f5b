"""PPO for language models (the InstructGPT recipe), following ../shared/PPO_CHECKLIST.md item by item.

Read in this order: :mod:`rlhf.ppo.loss` (the maths), :mod:`rlhf.ppo.rollout` (collecting and
scoring experience), :mod:`rlhf.ppo.trainer` (the loop), :mod:`rlhf.ppo.checkpoint` (save/resume),
:mod:`rlhf.ppo.distributed` (torchrun/DDP).

Where each checklist item is decided (defaults in :class:`rlhf.config.PPOConfig`):

==  ===========================================================================================
 1  pad != EOS: enforced by :func:`rlhf.train.models.load_tokenizer` and again by
    :func:`rollout.check_special_tokens` before training.
 2  prompts left-padded; forward passes use ``cumsum(mask) - 1`` positions; ``generate`` gets none.
 3  fixed budgets ``max_prompt_len`` (prompts cut from the left) and ``max_new_tokens``.
 4  ``do_sample=True, top_k=0, top_p=1.0``, ``temperature`` 0.7. ``min_new_tokens=1`` (an empty
    reply is never sampled); the log-probs still include EOS's mass at the first position.
 5  the same temperature divides the policy's and the reference's logits (rollout and training).
 6  generation stops at EOS; tokens after the first EOS are padding with mask 0.
 7  old log-probs come from a forward pass of the same function the update uses, so the first
    minibatch has ratio 1 and clip fraction 0 (a unit test; logged as ``first_ratio_mean``).
 8  the reward model reads ``prompt + response`` at its last real token: the EOS.
 9  reward head init std 1/sqrt(hidden+1), bias 0 (:func:`rlhf.train.models.init_score_head`).
10  scores normalised with the reward model's ``reward_norm`` (mean/std of its scores of SFT
    demonstrations); optional clip ``score_clip``.
11  ``missing_eos_penalty`` (1.0, in normalised units) subtracted when no EOS; EOS rate logged.
12  reference = frozen SFT copy in eval mode; with LoRA the policy with the adapter disabled.
13  KL as a per-token reward penalty ``-beta * kl_t``, score added at the EOS token; no KL loss term.
14  estimator named by ``kl_estimator`` (k1 default; k3 available); summed sequence KL logged as
    ``kl`` (and ``kl_k1`` always).
15  fixed beta 0.05 by default; ``adaptive_kl`` (Ziegler) towards ``kl_target``.
16  GAE gamma 1, lambda 0.95; returns = advantages + values.
17  advantages whitened over valid tokens of the global batch; reward whitening off by default.
18  critic initialised from the reward model (``critic_init: reward``; its output rescaled by the
    reward normalisation) or a zero-initialised head on the SFT backbone (``value_head``);
    clipped value loss, eps 0.2, coefficient 0.1.
19  every loss and metric is a masked mean over valid response tokens.
20  clipped surrogate eps 0.2, 4 PPO epochs, shuffled minibatches.
21  no entropy bonus (``entropy_coef`` 0); entropy logged.
22  dropout off in policy, reference, reward model and critic.
23  AdamW eps 1e-5; linear lr decay; gradient clipping per model at 1.0.
24  seed + rank per rank; batch arithmetic checked by the config.
25  per-step metrics: score, KL, non-score reward, total reward, approx-KL, clip fraction, value
    loss, policy loss, entropy, ratio mean, response length, EOS rate, episodes/s, tokens/s,
    generation share of step time (plus gold score on the demo task).
==  ===========================================================================================
"""

from rlhf.ppo.trainer import train_ppo

__all__ = ["train_ppo"]
