"""PPO checkpoints: the PPO side of :mod:`rlhf.train.checkpoint` (the format, atomic writes, validation
and the resume decision live there, shared with SFT and the reward model).

A PPO checkpoint holds ``policy.safetensors`` and ``critic.safetensors`` (the trainable weights; with
LoRA the adapters and the value head; with ``critic: adapter`` / ``shared`` the critic file holds the value
head, its adapter being in the policy's file; no critic file for ``rloo`` / ``grpo``), the optimizer and lr-scheduler state, and in ``state.json``
the step, the data position, the KL controller, every rank's RNG states and the metric history.
:class:`RunCheckpoints` is the trainer's side: resume from the newest checkpoint of the same run
(:func:`fingerprint`), a checkpoint every ``ppo.checkpoint_every`` steps, removed after success.
"""

from __future__ import annotations

from rlhf.config import ModelConfig, PPOConfig
from rlhf.train import checkpoint as base
from rlhf.train import distributed as D
from rlhf.train.checkpoint import (  # noqa: F401 - the shared format, re-exported for PPO's callers
    MARKER,
    STATE,
    TRAINER,
    Checkpoint,
    artifact_id,
    capture_rng,
    checkpoint_root,
    clear_stale,
    latest,
    load_trainable_state,
    prune,
    restore_rng,
    save,
    stale,
    step_name,
    trainable_state,
    validate,
)


def fingerprint(cfg: PPOConfig, model_cfg: ModelConfig, inputs: dict[str, str], world_size: int) -> str:
    """What makes two PPO runs the same run (so a checkpoint of one may continue the other)."""
    return base.fingerprint("ppo", cfg, model_cfg, inputs, world_size)


class RunCheckpoints(base.RunCheckpoints):
    """The checkpoints of one PPO run under ``root``; every rank calls every method (rank 0 writes)."""

    def __init__(self, root, fingerprint: str, cfg: PPOConfig, info: D.DistInfo):
        super().__init__(root, fingerprint, cfg, info, stage="ppo", total_steps=cfg.total_steps)

    def resume(self, policy, critic, opt, sched, kl_ctl) -> tuple[int, list[dict[str, float]]]:
        """Load the checkpoint rank 0 chose into the given objects on every rank: ``(its step, its metric
        history)``; ``(0, [])`` when there is nothing to resume."""
        found = self.load()
        if found is None:
            return 0, []
        load_trainable_state(policy, found.weights("policy"))
        if critic is not None:
            load_trainable_state(critic, found.weights("critic"))
        trainer = found.trainer_state()
        opt.load_state_dict(trainer["optimizer"])
        sched.load_state_dict(trainer["scheduler"])
        kl_ctl.load_state_dict(found.state["kl_controller"])
        return found.step, found.state["history"]

    def save(self, step: int, policy, critic, opt, sched, kl_ctl, history: list[dict[str, float]]) -> None:
        """Checkpoint after ``step``: ``policy`` and ``critic`` (None: no critic) unwrapped (no DDP prefix in
        the names)."""
        self.write(step, {"policy": policy, **({"critic": critic} if critic is not None else {})},
                   {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                   {"data_position": step * self.cfg.rollout_batch_size * self.info.world_size,
                    "kl_controller": kl_ctl.state_dict(), "history": history})


__all__ = ["Checkpoint", "save", "latest", "validate", "prune", "stale", "clear_stale", "capture_rng", "restore_rng",
           "trainable_state", "load_trainable_state", "step_name", "fingerprint", "artifact_id",
           "checkpoint_root", "RunCheckpoints"]
