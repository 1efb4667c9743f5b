"""Why on-policy feedback matters, measured: the reward model's agreement with the gold annotator on fresh
pairs sampled from the *current* policy.

A batch is exactly such a set of pairs (two samples of the champion per prompt). For every item
whose two responses have different gold scores (:func:`rlhf.data.demo.gold_score`), the reward
model agrees when it orders them the same way (a tie in reward counts one half). The loop measures
it on an unlabelled probe batch of the champion before the round (with the champion's reward
model) and after it (with the reward model of the version the round trained).
"""

from __future__ import annotations

from typing import Any

from rlhf.data import demo
from rlhf.errors import UserError


def load_reward_for(reg_cfg, policy_version: int):
    """``(model, tokenizer, reward version)`` of the reward model registered with a policy version."""
    import mlflow.transformers

    from rlhf.mlops import registry

    client = registry._connect()
    mv = registry._get_version(client, reg_cfg.model_name, policy_version)
    rv = (mv.tags or {}).get("reward_model_version") if mv is not None else None
    if not rv or rv == "None":
        raise UserError(f"{reg_cfg.model_name} v{policy_version} records no reward model version")
    comps = mlflow.transformers.load_model(f"models:/{reg_cfg.reward_model_name}/{rv}", return_type="components")
    model = comps["model"]
    model.eval()
    return model, comps["tokenizer"], int(rv)


def rm_gold_agreement(model, tokenizer, items: list[dict[str, Any]], max_len: int = 256) -> dict[str, Any]:
    """Agreement of the reward model with the gold score on the items' (response_a, response_b) pairs."""
    import torch

    from rlhf.train.reward import score_texts

    pairs = [it for it in items if demo.topic_of(it["prompt"]) and
             demo.gold_score(it["prompt"], it["response_a"]) != demo.gold_score(it["prompt"], it["response_b"])]
    if not pairs:
        return {"agreement": None, "n_pairs": 0}
    prompts = [it.get("prompt_messages") or it["prompt"] for it in pairs]  # the turns, where the item has them
    sa = score_texts(model, tokenizer, prompts, [it["response_a"] for it in pairs], max_len)
    sb = score_texts(model, tokenizer, prompts, [it["response_b"] for it in pairs], max_len)
    gold = torch.tensor([demo.gold_score(it["prompt"], it["response_a"]) - demo.gold_score(it["prompt"], it["response_b"])
                         for it in pairs])
    diff = sa - sb
    agree = ((torch.sign(diff) == torch.sign(gold)).float() + 0.5 * (diff == 0).float()).mean().item()
    return {"agreement": agree, "n_pairs": len(pairs)}


__all__ = ["rm_gold_agreement", "load_reward_for"]
