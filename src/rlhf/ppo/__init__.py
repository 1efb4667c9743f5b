"""PPO for language models (the InstructGPT recipe). The choices, with their reasons: docs/ppo.md.

Read in this order: :mod:`rlhf.ppo.loss` (the maths), :mod:`rlhf.ppo.advantages` (the estimators),
:mod:`rlhf.ppo.critic` (the value models), :mod:`rlhf.ppo.rollout` (collecting and
scoring experience), :mod:`rlhf.ppo.trainer` (the loop), :mod:`rlhf.ppo.metrics` (what a run
reports), :mod:`rlhf.ppo.checkpoint` (save/resume), :mod:`rlhf.train.distributed` (torchrun/DDP, shared with SFT and reward).

Where each item of docs/ppo.md is decided (defaults in :class:`rlhf.config.PPOConfig`):

===  ========================================================================================
  1  pad != EOS: :func:`rlhf.train.models.load_tokenizer`, :func:`rollout.check_special_tokens`
  2  left padding, ``cumsum(mask) - 1`` positions: :mod:`rlhf.train.generation`, ``models.position_ids_from_mask``
  3  ``max_prompt_len`` (cut from the left), ``max_new_tokens``: ``generation.encode_prompts``, ``sample``
  4  ``do_sample=True, top_k=0, top_p=1``, ``temperature``: :func:`rlhf.train.generation.sample`
  5  one temperature for policy and reference: ``generation.response_logits``
  6  stop at the first EOS, mask after it: ``generation.truncate_after_eos``
  7  ratio 1 on the first minibatch: ``rollout.forward_logprobs``, ``trainer.policy_outputs``
  8  reward read at the EOS: ``rollout.score_rollout``, ``models.reward_scores``
  9  reward head init: ``models.init_score_head``
 10  score normalisation (``normalize_reward``, ``score_clip``): ``rollout.RewardNorm``
10b  reward inputs cut from the left, ties count half: :mod:`rlhf.train.reward`
 11  ``missing_eos_penalty``; ``eos_rate`` logged: ``rollout.score_responses``
 12  reference: frozen SFT copy, or every LoRA adapter disabled: ``rollout.reference_context``
 13  KL in the reward, score at the EOS: ``loss.token_rewards``
 14  ``kl_estimator`` (k1, k3); ``kl`` and ``kl_k1`` logged: ``loss.kl_per_token``
 15  fixed or adaptive beta: ``trainer.kl_controller``
 16  GAE (``gamma``, ``lam``): ``advantages.gae``
 17  whitening over the global batch: ``loss.masked_whiten``, ``rollout.compute_advantages``
 18  critic (``critic_init``), clipped value loss: ``critic.ValueModel``, ``loss.value_loss``
 19  masked means; token-weighted micro-batches: ``loss.masked_mean``, ``trainer.optimizer_step``
 20  clipped surrogate, epochs of shuffled minibatches: ``loss.ppo_loss``, ``trainer.ppo_update``
 21  ``entropy_coef`` (0): ``loss.ppo_loss``
 22  dropout off: ``models.disable_dropout``
 23  AdamW eps, lr schedule, clipping per model: ``trainer.make_optimizer``, ``trainer.optimizer_step``
 24  per-rank seeds, batch arithmetic: ``trainer._train``, ``PPOConfig._batch_arithmetic``
 25  per-step metrics: :mod:`rlhf.ppo.metrics`
 26  collectives on the rank's device: ``rlhf.train.distributed.collective_device``
 27  precision: :mod:`rlhf.train.precision`, ``models.weights_dtype`` (fp32 weights, bf16 autocast)
 28  explicit generation config: ``generation.sampling_config`` (nothing inherited)
 29  resume decided once: ``checkpoint.RunCheckpoints.decide`` (rank 0, broadcast)
 30  DDP gradient = global token mean: ``trainer.optimizer_step``, ``loop.train_steps``
 31  ``estimator`` (gae, rloo, grpo), ``num_samples_per_prompt``: :mod:`rlhf.ppo.advantages`, ``trainer.run_steps``
 32  ``critic`` (separate, adapter, shared): :mod:`rlhf.ppo.critic`, ``trainer.backward_micro_batch``;
     ``reward`` (separate, adapter): :mod:`rlhf.ppo.reward_adapter`
===  ========================================================================================
"""

from rlhf.ppo.trainer import train_ppo

__all__ = ["train_ppo"]
