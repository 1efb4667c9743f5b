"""The critic options of PPO (ppo.critic: separate, adapter, shared) on the tiny model: the first minibatch
sees ratio 1 and no clipping, the rollout's values are the update's, the reference is the base with every
adapter off, the adapter critic needs LoRA, and a run resumed from a checkpoint ends bit-identically."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from rlhf.config import ModelConfig, PPOConfig
from rlhf.errors import ConfigError
from rlhf.io import sha256_file
from rlhf.ppo import critic as C
from rlhf.ppo import loss as L
from rlhf.ppo import train_ppo
from rlhf.ppo.rollout import (
    RewardNorm,
    RolloutSettings,
    compute_advantages,
    forward_logprobs,
    sample_responses,
    score_responses,
)
from rlhf.ppo.trainer import check_config, critic_values, load_models, model_inputs, policy_outputs
from rlhf.train import distributed as D
from rlhf.train import models

os.environ["RLHF_TRACKING"] = "off"


def _settings(cfg: PPOConfig) -> RolloutSettings:
    return RolloutSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           max_prompt_len=cfg.max_prompt_len, generation_batch_size=4, forward_batch_size=3,
                           kl_estimator=cfg.kl_estimator, missing_eos_penalty=cfg.missing_eos_penalty,
                           gamma=cfg.gamma, lam=cfg.lam, whiten_advantages=True, whiten_rewards=False)


def _lora(tiny_cfg) -> ModelConfig:
    return tiny_cfg.model_copy(update={"lora": True, "lora_r": 4, "lora_alpha": 8, "device": "cpu"})


@pytest.fixture(scope="module")
def prompts(dataset) -> list[str]:
    from rlhf.data.prepare import load_split

    return load_split(dataset, "prompts", "train")["prompt"].tolist()[:6]


def _perturb(policy, critic, seed: int = 0) -> None:
    """Move every adapter (LoRA B starts at 0) and the value head off their zero start: non-trivial checks."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n and p.requires_grad:  # the trained adapters (not a frozen reward adapter)
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for p in critic.head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("option, lora", [("adapter", True), ("shared", False), ("shared", True)])
def test_first_minibatch_has_ratio_one_no_clipping_and_the_rollout_values(sft_model, reward_model, tiny_cfg, prompts,
                                                                          option, lora):
    cfg = PPOConfig(max_new_tokens=16, critic=option)
    mc = _lora(tiny_cfg) if lora else tiny_cfg.model_copy(update={"device": "cpu"})
    policy, ref, critic, rm, tok, _ = load_models(sft_model, reward_model, cfg, mc, RewardNorm())
    assert isinstance(critic, C.AdapterValueModel if option == "adapter" else C.SharedValueModel)
    # the critic holds no model of its own: its parameters are a value head (+ the adapter inside the policy)
    assert sum(p.numel() for p in critic.parameters()) == policy.config.hidden_size + 1
    _perturb(policy, critic)
    torch.manual_seed(0)
    settings = _settings(cfg)
    samples = sample_responses(policy, ref, critic, tok, prompts, settings)
    scores, raw = score_responses(rm, samples, settings, RewardNorm())
    exp = compute_advantages(samples, scores, raw, settings, 0.05)
    assert exp.values.abs().sum() > 0  # a real value head, not the zero start

    mb = exp.select(torch.arange(len(exp)).flip(0))  # another order, other trimming
    inputs = model_inputs(mb)
    if option == "shared":  # the values come off the policy's own forward pass
        out = policy_outputs(policy, mb, inputs, cfg, critic)
        loss = L.ppo_loss(mb, cfg, **out)
    else:
        out = policy_outputs(policy, mb, inputs, cfg)
        out["values"] = critic_values(critic, inputs)
        loss = L.ppo_loss(mb, cfg, **out)
    r_len = out["values"].shape[1]
    assert torch.allclose(L.masked(out["values"], mb["response_mask"][:, :r_len]), mb["values"][:, :r_len], atol=1e-5)
    st = loss.stats
    assert st["ratio_mean"].item() == pytest.approx(1.0, abs=1e-5) and st["clip_frac"].item() == 0.0
    assert st["approx_kl"].item() < 1e-9 and st["value_clip_frac"].item() == 0.0
    loss.total.backward()
    # gradients reach the value head, and (adapter) the critic adapter but not through the policy's loss alone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.head.parameters())
    if option == "adapter":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.adapter_parameters())
        # the optimizer groups split the trainable parameters without overlap
        pol, cri = C.policy_parameters(policy, critic), C.critic_parameters(critic)
        assert not {id(p) for p in pol} & {id(p) for p in cri}
        assert len(pol) + len(cri) == len([p for p in policy.parameters() if p.requires_grad]) + 2


def test_reference_is_the_base_with_every_adapter_off(sft_model, reward_model, tiny_cfg, prompts):
    cfg = PPOConfig(max_new_tokens=16, critic="adapter")
    policy, ref, critic, rm, tok, _ = load_models(sft_model, reward_model, cfg, _lora(tiny_cfg), RewardNorm())
    assert ref is None and set(policy.peft_config) == {"default", C.CRITIC_ADAPTER}
    _perturb(policy, critic)
    torch.manual_seed(0)
    samples = sample_responses(policy, None, critic, tok, prompts[:4], _settings(cfg))
    ro = samples.rollout
    sft, _ = models.load_policy(sft_model, tiny_cfg, for_training=False)
    expect, _ = forward_logprobs(sft, ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask,
                                 cfg.temperature, 8)
    assert torch.allclose(samples.ref_logprobs, expect, atol=1e-5)
    assert not torch.allclose(samples.logprobs, samples.ref_logprobs, atol=1e-4)
    # after the reference (all adapters off) and the critic (its adapter on), the policy is the policy again
    assert policy.active_adapter == "default"
    again, _ = forward_logprobs(policy, ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask,
                                cfg.temperature, 3)  # the rollout's forward_batch_size: the same batches
    assert torch.equal(again, samples.logprobs)
    # and both adapters are still trainable (peft freezes inactive adapters when switching)
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_adapter_critic_needs_lora_and_one_process():
    with pytest.raises(ConfigError, match="model.lora") as e:
        check_config(PPOConfig(critic="adapter"), ModelConfig(lora=False), D.DistInfo())
    assert "critic separate" in e.value.one_line()
    check_config(PPOConfig(critic="adapter"), ModelConfig(lora=True), D.DistInfo())
    check_config(PPOConfig(critic="shared"), ModelConfig(lora=False), D.DistInfo())
    # rloo / grpo have no critic: the critic option does not matter
    check_config(PPOConfig(critic="adapter", estimator="rloo", num_samples_per_prompt=2), ModelConfig(), D.DistInfo())


def _resume_matches(dataset, sft_model, reward_model, mc, cfg: PPOConfig, tmp_path, files: list[str]):
    """Run 3 steps with a checkpoint after each; then drop the newer checkpoint and the output and run again:
    it resumes from step 1 and must end with the same bytes and metrics."""
    out = tmp_path / "ppo"
    first = train_ppo(dataset, sft_model, reward_model, out, cfg, mc)
    ckpts = tmp_path / "ppo.checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001", "step-000002"]
    kept = tmp_path / "uninterrupted"
    shutil.move(out, kept)
    shutil.rmtree(ckpts / "step-000002")
    second = train_ppo(dataset, sft_model, reward_model, out, cfg, mc)
    assert second["resumed_from_step"] == 1 and first["resumed_from_step"] == 0
    for f in files:
        assert sha256_file(kept / f) == sha256_file(out / f), f
    for key in ("score", "kl", "policy_loss", "value_loss", "clip_frac", "approx_kl", "beta", "episodes"):
        assert first[key] == second[key], key
    return json.loads((out / "manifest.json").read_text())


def test_adapter_critic_resumes_bit_identically(dataset, sft_model, reward_model, tiny_cfg, tmp_path):
    mc = _lora(tiny_cfg)
    cfg = PPOConfig(total_steps=3, rollout_batch_size=4, num_minibatches=2, ppo_epochs=1, max_new_tokens=12,
                    lr=1e-3, checkpoint_every=1, keep_checkpoints_on_success=True, critic="adapter", seed=5)
    m = _resume_matches(dataset, sft_model, reward_model, mc, cfg, tmp_path,
                        ["model.safetensors", "critic/value_head.safetensors", "critic/adapter.safetensors"])
    assert m["config"]["critic"] == "adapter" and m["critic"] == "critic"
    ck = tmp_path / "ppo.checkpoints" / "step-000002" / "policy.safetensors"
    from safetensors.torch import load_file

    names = set(load_file(str(ck)))
    assert any(".critic." in n for n in names) and any(".default." in n for n in names)  # both adapters saved
    policy, _ = models.load_policy(tmp_path / "ppo", tiny_cfg, for_training=False)  # a plain merged policy
    assert not hasattr(policy, "peft_config")


# ----------------------------------------------------------------------------- ppo.reward adapter


@pytest.fixture(scope="module")
def lora_reward_model(dataset, sft_model, tiny_cfg, tmp_path_factory):
    """A reward model trained with LoRA on the session's SFT policy, its adapter saved beside the merged model."""
    from rlhf.config import RewardConfig
    from rlhf.train.reward import train_reward

    out = tmp_path_factory.mktemp("rm-lora") / "reward"
    train_reward(dataset, sft_model, out, RewardConfig(max_steps=30, batch_size=16, lr=1e-3, eval_max_rows=32,
                                                       gold_pairs=16, save_adapter=True), _lora(tiny_cfg))
    assert (out / "adapter" / models.ADAPTER_CONFIG).is_file() and (out / "model.safetensors").is_file()
    return out


def test_reward_adapter_scores_like_the_merged_reward_model(sft_model, lora_reward_model, tiny_cfg, prompts):
    from rlhf.ppo.reward_adapter import REWARD_ADAPTER, RewardAdapterModel
    from rlhf.ppo.rollout import score_rollout

    cfg = PPOConfig(max_new_tokens=16, critic="adapter", reward="adapter")
    policy, ref, critic, rm, tok, _ = load_models(sft_model, lora_reward_model, cfg, _lora(tiny_cfg), RewardNorm())
    assert isinstance(rm, RewardAdapterModel) and ref is None
    assert set(policy.peft_config) == {"default", C.CRITIC_ADAPTER, REWARD_ADAPTER}  # one base, three adapters
    reward_params = [p for n, p in policy.named_parameters() if f".{REWARD_ADAPTER}." in n]
    assert reward_params and not any(p.requires_grad for p in reward_params)  # frozen
    trained = {id(p) for p in C.policy_parameters(policy, critic) + C.critic_parameters(critic)}
    assert not any(id(p) in trained for p in reward_params)
    _perturb(policy, critic)
    torch.manual_seed(0)
    samples = sample_responses(policy, None, critic, tok, prompts, _settings(cfg))
    got = score_rollout(rm, samples.rollout, forward_batch_size=3)
    merged, _ = models.load_reward_model(lora_reward_model, tiny_cfg.model_copy(update={"device": "cpu"}),
                                         for_training=False)
    expect = score_rollout(merged, samples.rollout, forward_batch_size=3)
    assert torch.allclose(got, expect, atol=1e-4) and got.std() > 0
    # scoring leaves the policy the policy, its adapters trainable and the reward adapter frozen
    ro = samples.rollout
    again, _ = forward_logprobs(policy, ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask,
                                cfg.temperature, 3)
    assert torch.equal(again, samples.logprobs) and policy.active_adapter == "default"
    assert not any(p.requires_grad for p in reward_params)
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".default." in n or ".critic." in n)
    # the reference is still the base with every adapter off
    sft, _ = models.load_policy(sft_model, tiny_cfg, for_training=False)
    base_lp, _ = forward_logprobs(sft, ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask,
                                  cfg.temperature, 3)
    assert torch.allclose(samples.ref_logprobs, base_lp, atol=1e-5)


def test_reward_adapter_needs_lora_and_an_adapter(sft_model, reward_model, tiny_cfg):
    with pytest.raises(ConfigError, match="reward adapter .* needs model.lora"):
        check_config(PPOConfig(reward="adapter"), ModelConfig(lora=False), D.DistInfo())
    with pytest.raises(ConfigError, match="has no LoRA adapter") as e:  # the session's RM: full fine-tuning
        load_models(sft_model, reward_model, PPOConfig(reward="adapter"), _lora(tiny_cfg), RewardNorm())
    assert "reward.save_adapter" in e.value.one_line()


def test_one_base_run_with_critic_and_reward_adapters(dataset, sft_model, lora_reward_model, tiny_cfg, tmp_path):
    out = tmp_path / "ppo"
    cfg = PPOConfig(total_steps=2, rollout_batch_size=4, num_minibatches=2, ppo_epochs=1, max_new_tokens=12,
                    lr=1e-3, checkpoint_every=1, keep_checkpoints_on_success=True, critic="adapter",
                    reward="adapter", merge_lora=False)
    metrics = train_ppo(dataset, sft_model, lora_reward_model, out, cfg, _lora(tiny_cfg))
    assert metrics["steps"] == 2 and metrics["score"] == metrics["score"]
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "ppo.checkpoints" / "step-000001" / "policy.safetensors")))
    assert any(".critic." in n for n in names) and not any(".reward." in n for n in names)  # frozen: not saved
    # the policy artifact is the policy's adapter alone (no critic/reward adapter subfolders)
    assert (out / "adapter_config.json").is_file() and not (out / "reward").exists()
    assert (out / "critic" / "adapter.safetensors").is_file()
    policy, _ = models.load_policy(out, tiny_cfg, for_training=False)
    assert isinstance(policy, torch.nn.Module)
