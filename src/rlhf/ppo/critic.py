"""The critic (value model) of ``estimator: gae``, one of three kinds (``PPOConfig.critic``; docs/ppo.md #18, #32).

Every kind is an ``nn.Module`` whose ``forward(input_ids, attention_mask)`` gives a value per
position, (B, T); the trainer reads it at the positions before each response token. What differs:

===========  ==============================================================  =============================
``critic``   the value model                                                 trainable, checkpointed
===========  ==============================================================  =============================
separate     :class:`ValueModel`: a model of its own (from the reward model  its weights (or its LoRA
             or the SFT backbone, ``critic_init``), head at every position   adapter) and its head
adapter      :class:`AdapterValueModel`: a second LoRA adapter (``critic``)  that adapter (saved with the
             on the policy's base + a value head; one base model in memory   policy's) and the head
shared       :class:`SharedValueModel`: a value head on the policy's own     the head (the body is the
             last hidden state; one forward/backward for both losses         policy's)
===========  ==============================================================  =============================

``adapter`` and ``shared`` start with a zero value head, like ``critic_init: value_head``.
:func:`build_critic` makes the configured one (``None`` for an estimator without a critic),
:func:`critic_parameters` / :func:`policy_parameters` split the trainable parameters between the
two optimizer groups (the ``adapter`` critic's LoRA weights live inside the policy module), and
:func:`save_critic` writes the critic part of the PPO artifact.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from rlhf.io import write_json
from rlhf.train import models

CRITIC_ADAPTER = "critic"  # the adapter name of ``critic: adapter`` (the policy's is peft's "default")


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------- separate


class ValueModel(nn.Module):
    """Per-token values from a sequence-classification model (its backbone + scalar head at every position).

    ``values = (head(h_t) - shift) / scale``: with the critic initialised from the reward model,
    ``shift``/``scale`` are the reward normalisation, so the critic starts on the same scale as the
    normalised scores it has to predict. With a zero-initialised head they are 0 and 1.
    """

    def __init__(self, seq_cls_model: nn.Module, shift: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.model = seq_cls_model
        self.register_buffer("shift", torch.tensor(float(shift)), persistent=False)
        self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=models.position_ids_from_mask(attention_mask),
                          use_cache=False).last_hidden_state
        head = models.score_head(self.model)
        values = head(hidden).squeeze(-1).float()
        return (values - self.shift) / self.scale


def zero_value_head(critic: ValueModel) -> None:
    head = models.score_head(critic.model)
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


# ----------------------------------------------------------------------------- on the policy's base


def value_head(policy: nn.Module) -> nn.Linear:
    """A zero-initialised ``hidden -> 1`` head, fp32, on the policy's device."""
    hidden = _unwrap(policy).config.hidden_size
    head = nn.Linear(hidden, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head.to(next(policy.parameters()).device)


@contextlib.contextmanager
def keep_requires_grad(model: nn.Module):
    """Undo peft's ``requires_grad`` changes on exit: ``set_adapter`` and ``disable_adapter`` freeze every
    adapter but the active one, which would freeze the other adapter's weights between its forwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def active_adapter(peft_model: nn.Module, name: str):
    """The peft model with adapter ``name`` active inside the block (the previous one after it)."""
    previous = peft_model.active_adapter
    with keep_requires_grad(peft_model):
        peft_model.set_adapter(name)
        try:
            yield peft_model
        finally:
            peft_model.set_adapter(previous)


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The backbone's last hidden state (B, T, H) (no LM head), with the explicit positions of docs/ppo.md #2."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, inner.base_model_prefix)
    return backbone(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=models.position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state


class AdapterValueModel(nn.Module):
    """``critic: adapter``: the policy's base model with the ``critic`` LoRA adapter, and a value head.

    The policy (a peft model) is referenced, not registered: this module's own parameters are the
    head; the adapter's weights are parameters of the policy module (see :func:`critic_parameters`).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.head = value_head(policy)
        self._policy = [policy]  # a list: not a registered submodule

    @property
    def policy(self) -> nn.Module:
        return self._policy[0]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.policy.named_parameters() if f".{CRITIC_ADAPTER}." in n]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with active_adapter(self.policy, CRITIC_ADAPTER):
            hidden = last_hidden(self.policy, input_ids, attention_mask)
        return self.head(hidden).squeeze(-1).float()


def add_critic_adapter(policy: nn.Module, model_cfg) -> None:
    """A second LoRA adapter on the peft policy (same rank/targets as the policy's), trainable, not active."""
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    policy.add_adapter(CRITIC_ADAPTER, models._lora_config(model_cfg, "CAUSAL_LM"))
    policy.set_adapter("default")
    for n, p in policy.named_parameters():  # both adapters train (peft freezes the inactive one)
        p.requires_grad_(n in trainable or f".{CRITIC_ADAPTER}." in n)


class SharedValueModel(nn.Module):
    """``critic: shared``: a value head on the policy's own last hidden state.

    In the update the head reads the hidden state of the policy's forward pass (``critic(hidden=h)``),
    so one forward and one backward give both losses; ``critic(input_ids, attention_mask)`` (the
    rollout's values) runs the policy's backbone for it. Called through its own DDP wrapper under
    torchrun, so the head's gradient is all-reduced like the policy's.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.head = value_head(policy)
        self._policy = [policy]

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        if hidden is None:
            hidden = last_hidden(self._policy[0], input_ids, attention_mask)
        return self.head(hidden).squeeze(-1).float()


# ----------------------------------------------------------------------------- building and parameters


def build_critic(cfg, model_cfg, policy: nn.Module, sft_model: str | Path, reward_model: str | Path,
                 reward_norm) -> nn.Module | None:
    """The configured critic (``None`` when the estimator uses none), dropout off, in training mode."""
    if not cfg.uses_critic:
        return None
    if cfg.critic == "adapter":
        add_critic_adapter(policy, model_cfg)
        critic = AdapterValueModel(policy)
    elif cfg.critic == "shared":
        critic = SharedValueModel(policy)
    elif cfg.critic_init == "reward":
        critic_base, _ = models.load_reward_model(reward_model, model_cfg, for_training=True)
        critic = ValueModel(critic_base, shift=reward_norm.mean, scale=reward_norm.std)
    else:
        critic_base, _ = models.load_reward_model(sft_model, model_cfg, for_training=True, init_from_causal=True)
        critic = ValueModel(critic_base)
        zero_value_head(critic)
    critic.to(next(policy.parameters()).device)
    models.disable_dropout(critic)
    critic.train()
    return critic


def critic_parameters(critic: nn.Module | None) -> list[nn.Parameter]:
    """The critic's trainable parameters: its own, plus (``adapter``) its LoRA weights inside the policy."""
    if critic is None:
        return []
    inner = _unwrap(critic)
    own = [p for p in inner.parameters() if p.requires_grad]
    return own + (inner.adapter_parameters() if isinstance(inner, AdapterValueModel) else [])


def policy_parameters(policy: nn.Module, critic: nn.Module | None) -> list[nn.Parameter]:
    """The policy's trainable parameters, without the critic's (``adapter``: its LoRA weights)."""
    theirs = {id(p) for p in critic_parameters(critic)}
    return [p for p in policy.parameters() if p.requires_grad and id(p) not in theirs]


def is_shared(critic: nn.Module | None) -> bool:
    return isinstance(_unwrap(critic), SharedValueModel) if critic is not None else False


# ----------------------------------------------------------------------------- the artifact


def save_critic(critic: nn.Module | None, tokenizer, out_dir: Path, critic_init: str) -> Path | None:
    """Write the critic into ``out_dir`` (the artifact's ``critic/``); ``None`` when there is none.

    ``separate``: a plain sequence-classification model (merged) + ``value_norm.json``. ``adapter``:
    ``value_head.safetensors`` and the ``critic`` adapter's tensors in ``adapter.safetensors``
    (its base is the SFT policy). ``shared``: ``value_head.safetensors`` (its body is the policy).
    """
    critic = _unwrap(critic) if critic is not None else None
    if critic is None:
        return None
    if isinstance(critic, ValueModel):
        out = models.save_model(critic.model, tokenizer, out_dir, merge_lora=True)
        write_json(out / "value_norm.json", {"shift": float(critic.shift), "scale": float(critic.scale),
                                             "init": critic_init})
        return out
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in critic.head.state_dict().items()},
              str(out / "value_head.safetensors"))
    kind = "shared"
    if isinstance(critic, AdapterValueModel):
        kind = "adapter"
        tensors = {n: p.detach().cpu().contiguous() for n, p in critic.policy.named_parameters()
                   if f".{CRITIC_ADAPTER}." in n}
        save_file(tensors, str(out / "adapter.safetensors"))
    write_json(out / "value_norm.json", {"shift": 0.0, "scale": 1.0, "init": "value_head", "critic": kind})
    return out


def remove_other_adapters(policy: nn.Module) -> None:
    """Drop every adapter but the policy's own (``critic``, ``reward``) before saving it: the policy artifact is
    the policy alone (the run is over; the live model loses them)."""
    inner = _unwrap(policy)
    for name in [n for n in getattr(inner, "peft_config", {}) if n != "default"]:
        inner.delete_adapter(name)


__all__ = ["CRITIC_ADAPTER", "ValueModel", "zero_value_head", "AdapterValueModel", "SharedValueModel",
           "value_head", "last_hidden", "keep_requires_grad", "active_adapter", "add_critic_adapter", "build_critic",
           "critic_parameters", "policy_parameters", "is_shared", "save_critic", "remove_other_adapters"]
