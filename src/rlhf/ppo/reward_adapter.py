"""``ppo.reward: adapter``: the reward model as a frozen LoRA adapter + score head on the policy's base model.

With LoRA everywhere, policy, reference (every adapter off, docs/ppo.md #12), critic
(``critic: adapter``) and reward model are then one base model with three adapters: ``default``
(the policy, trained), ``critic`` (trained) and ``reward`` (frozen). The reward stage writes the
adapter it trained next to its merged model when ``reward.save_adapter`` is on (``<rm>/adapter``);
it must have been trained on the same SFT policy that PPO starts from (checked here), so that the
adapter sits on the very weights it was trained on. Its scores equal the merged reward model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from rlhf.errors import ConfigError
from rlhf.ppo.critic import active_adapter, last_hidden
from rlhf.train import models

REWARD_ADAPTER = "reward"


class RewardAdapterModel(nn.Module):
    """Scores (B,) of ``prompt + response`` read at the last real token (the EOS, #8), with the ``reward``
    adapter active; the score head is a frozen linear layer. The policy is referenced, not registered."""

    def __init__(self, policy: nn.Module, head: nn.Linear):
        super().__init__()
        self.head = head.requires_grad_(False)
        self._policy = [policy]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        policy = self._policy[0]
        with active_adapter(policy, REWARD_ADAPTER):
            hidden = last_hidden(policy, input_ids, attention_mask)
        last = (torch.arange(attention_mask.shape[1], device=attention_mask.device) * attention_mask.long()).argmax(-1)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()


def _same_artifact(a: str | Path, b: str | Path) -> bool:
    from rlhf.ppo.checkpoint import artifact_id

    return artifact_id(a) == artifact_id(b)


def load_reward_adapter(policy: nn.Module, reward_model: str | Path, sft_model: str | Path):
    """Add the reward stage's adapter to the (peft) policy as the frozen ``reward`` adapter: ``(model, tokenizer)``."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    adapter_dir = Path(reward_model) / "adapter"
    if not (adapter_dir / models.ADAPTER_CONFIG).is_file():
        raise ConfigError(f"ppo.reward adapter: the reward model {reward_model} has no LoRA adapter "
                          "(<reward model>/adapter)", where="params.yaml ppo.reward",
                          hint="train the reward model with model.lora true and reward.save_adapter true, "
                               "or use ppo.reward separate")
    base = models._adapter_base(adapter_dir)
    if not _same_artifact(base, sft_model):
        raise ConfigError(f"ppo.reward adapter: the reward adapter was trained on {base}, not on the SFT policy "
                          f"{sft_model} that PPO starts from", where="params.yaml ppo.reward",
                          hint="train the reward model from this SFT policy, or use ppo.reward separate")
    saved = json.loads((adapter_dir / models.ADAPTER_CONFIG).read_text())
    conf = LoraConfig(task_type="CAUSAL_LM", r=saved["r"], lora_alpha=saved["lora_alpha"], lora_dropout=0.0,
                      target_modules=saved["target_modules"], use_rslora=bool(saved.get("use_rslora")),
                      bias=saved.get("bias", "none"))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    policy.add_adapter(REWARD_ADAPTER, conf)
    policy.set_adapter("default")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora = {k: v for k, v in tensors.items() if "lora_" in k}
    result = set_peft_model_state_dict(policy, lora, adapter_name=REWARD_ADAPTER)
    loaded = sum(1 for n, _ in policy.named_parameters() if f".{REWARD_ADAPTER}." in n)
    if getattr(result, "unexpected_keys", None) or loaded != len(lora):
        raise ConfigError(f"ppo.reward adapter: the adapter in {adapter_dir} does not fit the policy's base model "
                          f"({loaded} adapter tensors placed, {len(lora)} saved)")
    for n, p in policy.named_parameters():  # the reward adapter is frozen; the others as they were
        p.requires_grad_(n in trainable)
    score = [v for k, v in tensors.items() if k.endswith("score.weight") or k.endswith("classifier.weight")]
    if len(score) != 1:
        raise ConfigError(f"ppo.reward adapter: no score head in {adapter_dir}/adapter_model.safetensors")
    head = nn.Linear(score[0].shape[1], 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(score[0])
    device = next(policy.parameters()).device
    return RewardAdapterModel(policy, head.to(device)).eval(), models.load_tokenizer(adapter_dir)


__all__ = ["REWARD_ADAPTER", "RewardAdapterModel", "load_reward_adapter"]
