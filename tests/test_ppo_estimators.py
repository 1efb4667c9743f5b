"""The advantage estimators (ppo.estimator: gae, rloo, grpo): hand-computed advantages for a group of
2 prompts x 3 responses, the batch the update trains on (KL in the reward, the score at the EOS, the
sequence advantage on every token), the config checks, the first minibatch of a critic-free batch,
short tiny runs with their outputs, and a resumed grpo run ending bit-identically."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from rlhf.config import PPOConfig, build
from rlhf.errors import ConfigError
from rlhf.io import sha256_file
from rlhf.ppo import advantages as A
from rlhf.ppo import loss as L
from rlhf.ppo import train_ppo
from rlhf.ppo.rollout import (
    RewardNorm,
    RolloutSettings,
    Samples,
    compute_advantages,
    sample_responses,
    score_responses,
)
from rlhf.ppo.trainer import load_models, model_inputs, policy_outputs, ppo_update
from rlhf.train import distributed as D
from rlhf.train.generation import Rollout

os.environ["RLHF_TRACKING"] = "off"

# 2 prompts x 3 responses: rows 0-2 answer prompt 0, rows 3-5 prompt 1
REWARDS = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])


def test_rloo_hand_computed():
    # baseline of row i: the mean of the other two rewards of its prompt
    # prompt 0: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5
    # prompt 1: 0 - (0+3)/2 = -1.5, 0 - (0+3)/2 = -1.5, 3 - (0+0)/2 = 3
    expected = torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    assert torch.allclose(A.rloo(REWARDS, 3), expected)
    # the same as k / (k - 1) * (r - group mean); with k = 2 it is the difference of the pair
    assert torch.allclose(A.rloo(torch.tensor([1.0, 4.0]), 2), torch.tensor([-3.0, 3.0]))


def test_grpo_hand_computed():
    # prompt 0: mean 3, deviations -2, -1, 3, unbiased variance (4 + 1 + 9) / 2 = 7
    # prompt 1: mean 1, deviations -1, -1, 2, unbiased variance (1 + 1 + 4) / 2 = 3
    s0, s1, eps = math.sqrt(7.0), math.sqrt(3.0), 1e-4
    expected = torch.tensor([-2 / (s0 + eps), -1 / (s0 + eps), 3 / (s0 + eps),
                             -1 / (s1 + eps), -1 / (s1 + eps), 2 / (s1 + eps)])
    assert torch.allclose(A.grpo(REWARDS, 3), expected, atol=1e-6)
    # a group of equal rewards has nothing to prefer: advantage 0, not NaN
    assert torch.equal(A.grpo(torch.tensor([2.0, 2.0, 2.0]), 3), torch.zeros(3))


def test_group_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="multiple of the group size"):
        A.rloo(REWARDS, 4)
    with pytest.raises(ValueError, match="k >= 2"):
        A.grpo(REWARDS, 1)


def _hand_samples() -> tuple[Samples, torch.Tensor]:
    """6 rows (2 prompts x 3), responses of 3, 2, 4, 1, 4, 2 tokens in a budget of 4; a known KL per token."""
    lengths = [3, 2, 4, 1, 4, 2]
    B, T = len(lengths), 4
    r_mask = torch.tensor([[1 if t < n else 0 for t in range(T)] for n in lengths])
    logprobs = -torch.arange(1, B * T + 1, dtype=torch.float32).view(B, T) / 10
    ref_logprobs = logprobs - 0.1 * (torch.arange(B)[:, None] + 1)  # k1 KL = 0.1 * (row + 1) per token
    logprobs, ref_logprobs = L.masked(logprobs, r_mask), L.masked(ref_logprobs, r_mask)
    ro = Rollout(query_ids=torch.ones(B, 2, dtype=torch.long), query_mask=torch.ones(B, 2, dtype=torch.long),
                 response_ids=torch.where(r_mask.bool(), 5, 0), response_mask=r_mask,
                 has_eos=torch.tensor([True, True, False, True, False, True]), texts=[""] * B)
    samples = Samples(ro, ["p0"] * 3 + ["p1"] * 3, logprobs, torch.zeros(B, T), ref_logprobs,
                      torch.zeros(B, T), 0.0)
    return samples, torch.tensor(lengths, dtype=torch.float32)


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_batch_puts_the_sequence_advantage_on_every_token(estimator):
    samples, lengths = _hand_samples()
    beta = 0.5
    settings = RolloutSettings(max_new_tokens=4, temperature=1.0, max_prompt_len=8, generation_batch_size=6,
                               forward_batch_size=6, kl_estimator="k1", missing_eos_penalty=1.0, gamma=1.0,
                               lam=0.95, whiten_advantages=True, whiten_rewards=False, estimator=estimator,
                               group_size=3)
    scores = REWARDS.clone()  # the normalised scores, penalty included (as score_responses returns them)
    exp = compute_advantages(samples, scores, scores, settings, beta)
    # the sequence reward: the score at the EOS minus beta x the summed per-token KL of the response
    kl_per_row = 0.1 * (torch.arange(6) + 1) * lengths
    seq = REWARDS - beta * kl_per_row
    assert torch.allclose(exp.rewards.sum(1), seq, atol=1e-6)
    rows = torch.arange(6)
    last = L.last_token_index(exp.response_mask)
    assert torch.allclose(exp.rewards[rows, last], REWARDS - beta * 0.1 * (rows + 1), atol=1e-6)  # score at the EOS
    expected = (A.rloo if estimator == "rloo" else A.grpo)(seq, 3)
    mask = exp.response_mask.bool()
    for i in range(6):
        assert torch.allclose(exp.advantages[i][mask[i]], expected[i].expand(int(lengths[i])), atol=1e-6)
        assert (exp.advantages[i][~mask[i]] == 0).all() and (exp.returns[i][~mask[i]] == 0).all()
        assert torch.allclose(exp.returns[i][mask[i]], seq[i].expand(int(lengths[i])), atol=1e-6)
    # not whitened over tokens: the group structure stays (rloo's advantages of a group sum to 0)
    if estimator == "rloo":
        assert torch.allclose(expected.view(2, 3).sum(1), torch.zeros(2), atol=1e-5)


def test_config_checks_samples_per_prompt():
    with pytest.raises(ConfigError, match="num_samples_per_prompt to 2 or more"):
        build(PPOConfig, {"estimator": "grpo"}, source="params.yaml", section="ppo")
    with pytest.raises(ConfigError, match="rollout_batch_size x num_samples_per_prompt"):
        build(PPOConfig, {"estimator": "rloo", "rollout_batch_size": 3, "num_samples_per_prompt": 3,
                          "num_minibatches": 2})
    cfg = build(PPOConfig, {"estimator": "rloo", "rollout_batch_size": 3, "num_samples_per_prompt": 4,
                            "num_minibatches": 2, "micro_batch_size": 3})
    assert cfg.rows_per_step == 12 and not cfg.uses_critic
    d = PPOConfig()
    assert (d.estimator, d.critic, d.num_samples_per_prompt, d.uses_critic) == ("gae", "separate", 1, True)


@pytest.fixture(scope="module")
def prompts(dataset) -> list[str]:
    from rlhf.data.prepare import load_split

    return load_split(dataset, "prompts", "train")["prompt"].tolist()[:3]


def test_critic_free_batch_first_minibatch_ratio_one(sft_model, reward_model, tiny_cfg, prompts):
    cfg = PPOConfig(max_new_tokens=16, estimator="grpo", num_samples_per_prompt=3, rollout_batch_size=3,
                    ppo_epochs=1)
    policy, ref, critic, rm, tok, _ = load_models(sft_model, reward_model, cfg,
                                                  tiny_cfg.model_copy(update={"device": "cpu"}), RewardNorm())
    assert critic is None
    settings = RolloutSettings(max_new_tokens=16, temperature=cfg.temperature, max_prompt_len=cfg.max_prompt_len,
                               generation_batch_size=9, forward_batch_size=4, kl_estimator="k1",
                               missing_eos_penalty=1.0, gamma=1.0, lam=0.95, whiten_advantages=True,
                               whiten_rewards=False, estimator="grpo", group_size=3)
    torch.manual_seed(0)
    rows = [p for p in prompts for _ in range(3)]
    samples = sample_responses(policy, ref, None, tok, rows, settings)
    assert (samples.values == 0).all()
    scores, raw = score_responses(rm, samples, settings, RewardNorm())
    exp = compute_advantages(samples, scores, raw, settings, 0.05)
    assert torch.allclose(exp.advantages.sum(1) / exp.response_mask.sum(1),
                          A.grpo(exp.rewards.sum(1), 3), atol=1e-5)
    mb = exp.select(torch.arange(len(exp)).flip(0))
    st = L.ppo_loss(mb, cfg, **policy_outputs(policy, mb, model_inputs(mb), cfg)).stats
    assert st["ratio_mean"].item() == pytest.approx(1.0, abs=1e-5) and st["clip_frac"].item() == 0.0
    # the update trains the policy alone: no value loss, no critic gradient
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    upd = ppo_update(policy, None, exp, cfg, opt, step=1, info=D.DistInfo())
    assert upd["first_ratio_mean"] == pytest.approx(1.0, abs=1e-5) and upd["first_clip_frac"] == 0.0
    assert upd["value_loss"] == 0.0 and upd["grad_norm_critic"] == 0.0 and upd["grad_norm_policy"] > 0


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_short_run_writes_the_usual_outputs_without_a_critic(dataset, sft_model, reward_model, tiny_cfg, tmp_path,
                                                             estimator):
    out = tmp_path / "ppo"
    cfg = PPOConfig(total_steps=2, rollout_batch_size=2, num_samples_per_prompt=3, num_minibatches=2,
                    ppo_epochs=1, max_new_tokens=12, lr=1e-4, checkpoint_every=1, estimator=estimator)
    metrics = train_ppo(dataset, sft_model, reward_model, out, cfg, tiny_cfg)
    for key in ("score", "kl", "total_reward", "approx_kl", "clip_frac", "policy_loss", "entropy",
                "response_length", "eos_rate", "gold", "beta"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert metrics["value_loss"] == 0.0
    assert metrics["steps"] == 2 and metrics["episodes"] == 2 * 2 * 3 and metrics["ranks_in_sync"] == 1
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "policy" and m["config"]["estimator"] == estimator and m["critic"] is None
    assert (out / "model.safetensors").exists() and not (out / "critic").exists()
    assert not (tmp_path / "ppo.checkpoints").exists()


def test_grpo_resumes_bit_identically(dataset, sft_model, reward_model, tiny_cfg, tmp_path):
    """3 steps with a checkpoint after each; drop the newer checkpoint and the output, run again: it resumes from
    step 1 and ends with the same weights and metrics."""
    cfg = PPOConfig(total_steps=3, rollout_batch_size=2, num_samples_per_prompt=2, num_minibatches=2, ppo_epochs=1,
                    max_new_tokens=12, lr=3e-4, checkpoint_every=1, keep_checkpoints_on_success=True,
                    estimator="grpo", adaptive_kl=True, seed=11)
    out, ckpts = tmp_path / "ppo", tmp_path / "ppo.checkpoints"
    first = train_ppo(dataset, sft_model, reward_model, out, cfg, tiny_cfg)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001", "step-000002"]
    assert not (ckpts / "step-000001" / "critic.safetensors").exists()  # no critic, nothing of it saved
    shutil.move(out, tmp_path / "uninterrupted")
    shutil.rmtree(ckpts / "step-000002")
    second = train_ppo(dataset, sft_model, reward_model, out, cfg, tiny_cfg)
    assert second["resumed_from_step"] == 1
    assert sha256_file(tmp_path / "uninterrupted" / "model.safetensors") == sha256_file(out / "model.safetensors")
    for key in ("score", "kl", "policy_loss", "clip_frac", "approx_kl", "beta", "gold"):
        assert first[key] == second[key] or (first[key] != first[key] and second[key] != second[key]), key


@pytest.mark.parametrize("ppo", [
    {"estimator": "grpo", "num_samples_per_prompt": 2},
    {"critic": "shared"},
], ids=["grpo", "critic-shared"])
def test_two_gloo_ranks_stay_in_sync(dataset, sft_model, reward_model, tiny_cfg, tmp_path, ppo):
    """Under torchrun (2 CPU processes, gloo): a prompt's group is sampled on one rank (each rank repeats its own
    prompts k times), a critic-free run and a shared-critic run end with identical parameters on both ranks."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from conftest import ROOT

    from rlhf.train import models

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"name": "tiny", "cache_dir": tiny_cfg.cache_dir, "device": "cpu"},
        "ppo": {"total_steps": 2, "rollout_batch_size": 2, "ppo_epochs": 1, "num_minibatches": 2,
                "max_new_tokens": 10, "lr": 3e-4, "checkpoint_every": 1, "seed": 3, **ppo}}))
    out = tmp_path / "ppo"
    env = {**os.environ, "RLHF_TRACKING": "off", "RLHF_PROFILE": "", "OMP_NUM_THREADS": "1",
           "RLHF_DIST_BACKEND": "gloo"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rlhf.cli", "ppo", "--dataset", str(dataset), "--sft", str(sft_model), "--reward", str(reward_model),
           "--out", str(out), "--params", str(params)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    k = ppo.get("num_samples_per_prompt", 1)
    assert m["world_size"] == 2 and m["ranks_in_sync"] == 1 and m["episodes"] == 2 * 2 * 2 * k
    policy, _ = models.load_policy(out, tiny_cfg, for_training=False)
    sft, _ = models.load_policy(sft_model, tiny_cfg, for_training=False)
    assert any(not torch.equal(v, sft.state_dict()[n]) for n, v in policy.state_dict().items())  # it trained
    assert (out / "critic").exists() == ("critic" in ppo)
