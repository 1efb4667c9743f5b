"""Supervised training: model loading (:mod:`~rlhf.train.models`), the shared optimisation loop
(:mod:`~rlhf.train.loop`), SFT (:mod:`~rlhf.train.sft`), the reward model (:mod:`~rlhf.train.reward`) and
sampling (:mod:`~rlhf.train.generation`). PPO has its own package, :mod:`rlhf.ppo`."""
