"""PPO with the tiny profile on real (briefly trained) SFT and reward models: rollouts, scoring, the
first update, LoRA reference, checkpoints, and the stage's outputs. No mocks."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rlhf.config import ModelConfig, PPOConfig
from rlhf.data.prepare import load_split
from rlhf.errors import UserError
from rlhf.ppo import checkpoint as ckpt
from rlhf.ppo import loss as L
from rlhf.ppo import train_ppo
from rlhf.ppo.rollout import (
    RewardNorm,
    RolloutSettings,
    check_special_tokens,
    compute_advantages,
    sample_responses,
    score_responses,
    score_rollout,
)
from rlhf.ppo.trainer import critic_values, load_models, model_inputs, policy_outputs, ppo_update
from rlhf.train import distributed as D
from rlhf.train import models

os.environ["RLHF_TRACKING"] = "off"


def _settings(cfg: PPOConfig) -> RolloutSettings:
    return RolloutSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           max_prompt_len=cfg.max_prompt_len, generation_batch_size=4,
                           forward_batch_size=3, kl_estimator=cfg.kl_estimator,
                           missing_eos_penalty=cfg.missing_eos_penalty, gamma=cfg.gamma, lam=cfg.lam,
                           whiten_advantages=True, whiten_rewards=False)


def make_experience(policy, ref, critic, rm, tok, prompts, settings, beta, norm):
    """The rollout half of a PPO step as the trainer's loop runs it: sample, score, advantages."""
    samples = sample_responses(policy, ref, critic, tok, prompts, settings)
    scores, raw = score_responses(rm, samples, settings, norm)
    return compute_advantages(samples, scores, raw, settings, beta)


def one_graph_loss(policy, critic, mb, cfg) -> L.PPOLoss:
    """The whole PPO loss of rows ``mb`` in one graph (the trainer back-propagates it one model at a time)."""
    inputs = model_inputs(mb)
    return L.ppo_loss(mb, cfg, **policy_outputs(policy, mb, inputs, cfg),
                      values=critic_values(critic, inputs))


@pytest.fixture(scope="module")
def prompts(dataset) -> list[str]:
    return load_split(dataset, "prompts", "train")["prompt"].tolist()[:8]


@pytest.fixture(scope="module")
def full_models(sft_model, reward_model, tiny_cfg):
    cfg = PPOConfig(max_new_tokens=24)
    norm = RewardNorm(**json.loads((reward_model / "manifest.json").read_text())["reward_norm"])
    return cfg, norm, load_models(sft_model, reward_model, cfg, tiny_cfg.model_copy(update={"device": "cpu"}), norm)


@pytest.fixture(scope="module")
def experience(full_models, prompts):
    cfg, norm, (policy, ref, critic, rm, tok, _) = full_models
    torch.manual_seed(0)
    return make_experience(policy, ref, critic, rm, tok, prompts, _settings(cfg), beta=0.05, norm=norm)


def test_models_for_ppo_have_dropout_off_and_the_right_roles(full_models):
    _, _, (policy, ref, critic, rm, tok, _) = full_models
    assert policy.training and not ref.training and not rm.training
    assert all(not p.requires_grad for p in ref.parameters()) and all(not p.requires_grad for p in rm.parameters())
    for m in (policy, ref, critic, rm):
        assert all(mod.p == 0 for mod in m.modules() if isinstance(mod, torch.nn.Dropout))
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"


def test_masks_cover_responses_up_to_eos_and_exclude_padding(experience, full_models):
    tok = full_models[2][4]
    exp = experience
    for i in range(len(exp)):
        mask = exp.response_mask[i].bool()
        valid = exp.response_ids[i][mask]
        if exp.has_eos[i]:
            assert valid[-1] == tok.eos_token_id and (valid[:-1] != tok.eos_token_id).all()
        assert (exp.response_ids[i][~mask] == tok.pad_token_id).all()
        # nothing after EOS or in padding carries log-prob, KL, value, advantage or return
        for t in (exp.logprobs, exp.ref_logprobs, exp.kl, exp.values, exp.advantages, exp.returns, exp.entropy):
            assert (t[i][~mask] == 0).all()
    assert (exp.query_mask[:, -1] == 1).all()  # prompts are left-padded: the last column is always real
    # whitened over valid tokens only
    adv = exp.advantages[exp.response_mask.bool()]
    assert adv.mean().abs().item() < 1e-5 and abs(adv.std().item() - 1) < 1e-3


def test_kl_is_zero_when_policy_equals_reference(experience):
    assert torch.equal(experience.logprobs, experience.ref_logprobs)
    assert (experience.kl == 0).all() and (experience.non_score_rewards == 0).all()


def test_score_is_added_at_the_eos_index(experience):
    exp = experience
    last = L.last_token_index(exp.response_mask)
    rows = torch.arange(len(exp))
    # with KL 0 the reward is the score at the EOS index and 0 everywhere else
    assert torch.allclose(exp.rewards[rows, last], exp.scores)
    rest = exp.rewards.clone()
    rest[rows, last] = 0
    assert (rest == 0).all()


def test_reward_model_reads_the_eos_token(experience, full_models):
    """Hand-check each row: the RM score of exactly ``prompt + response up to EOS`` (no padding)."""
    from rlhf.train.generation import Rollout

    _, norm, (_, _, _, rm, tok, _) = full_models
    exp = experience
    ro = Rollout(exp.query_ids, exp.query_mask, exp.response_ids, exp.response_mask, exp.has_eos, exp.texts)
    batch_scores = score_rollout(rm, ro, forward_batch_size=3)
    for i in range(len(exp)):
        ids = torch.cat([exp.query_ids[i][exp.query_mask[i].bool()], exp.response_ids[i][exp.response_mask[i].bool()]])
        alone = models.reward_scores(rm, ids[None], torch.ones(1, len(ids), dtype=torch.long))
        assert batch_scores[i].item() == pytest.approx(alone.item(), abs=1e-4)
        if exp.has_eos[i]:
            assert ids[-1] == tok.eos_token_id  # the position read is the EOS token
            # one token more would be read elsewhere: the score really is position-specific
            longer = torch.cat([ids, ids[-2:-1]])
            other = models.reward_scores(rm, longer[None], torch.ones(1, len(longer), dtype=torch.long))
            assert other.item() != pytest.approx(alone.item(), abs=1e-6)
    # normalisation and the missing-EOS penalty
    expected = norm(batch_scores) - (~exp.has_eos).float() * 1.0
    assert torch.allclose(exp.scores, expected, atol=1e-5)


def test_first_minibatch_has_ratio_one_and_no_clipping(experience, full_models):
    cfg, _, (policy, _, critic, _, _, _) = full_models
    mb = experience.select(torch.arange(len(experience)).flip(0))  # another order, other trimming
    loss = one_graph_loss(policy, critic, mb, cfg)
    st = loss.stats
    assert st["ratio_mean"].item() == pytest.approx(1.0, abs=1e-5)
    assert st["clip_frac"].item() == 0.0
    assert st["approx_kl"].item() < 1e-9
    assert st["value_clip_frac"].item() == 0.0
    assert torch.isfinite(loss.total)
    policy.zero_grad(set_to_none=True)
    critic.zero_grad(set_to_none=True)


class _GradRecorder:
    """Stands in for the optimizer in ppo_update: records the gradients of each step instead of stepping."""

    def __init__(self, models):
        self.params = [p for m in models for p in m.parameters() if p.requires_grad]
        self.steps = []

    def step(self):
        self.steps.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize("micro, entropy_coef", [(None, 0.0), (2, 0.0), (4, 0.0), (2, 0.05)])
def test_update_gradients_equal_one_graph_over_the_whole_minibatch(experience, full_models, micro, entropy_coef):
    """ppo_update back-propagates policy and critic one after the other, micro-batch by micro-batch
    (weighted by valid tokens): the gradients are those of the one-graph ``ppo_loss`` of the whole
    minibatch (entropy bonus included)."""
    cfg, _, (policy, _, critic, _, _, _) = full_models
    c = cfg.model_copy(update={"rollout_batch_size": len(experience), "num_minibatches": 1, "ppo_epochs": 1,
                               "micro_batch_size": micro, "max_grad_norm": 1e9, "entropy_coef": entropy_coef})
    rec = _GradRecorder([policy, critic])
    rec.zero_grad()
    one_graph_loss(policy, critic, experience.select(torch.arange(len(experience))), c).total.backward()
    rec.step()
    rec.zero_grad()
    stats = ppo_update(policy, critic, experience, c, rec, step=1, info=D.DistInfo())
    expected, got = rec.steps
    assert any(g.abs().sum() > 0 for g in got)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, rtol=1e-4, atol=1e-7)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and stats["clip_frac"] == 0.0


def test_pad_equal_to_eos_is_rejected_at_load(sft_model, tmp_path):
    tok = models.load_tokenizer(sft_model)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="pad"):
        models.load_tokenizer(tmp_path)  # strict load: docs/ppo.md #1
    fixed = models.load_tokenizer(tmp_path, add_pad=True)  # what load_policy does: a pad of its own
    assert fixed.pad_token_id != fixed.eos_token_id
    with pytest.raises(UserError, match="pad"):
        check_special_tokens(tok)  # the PPO boundary refuses it too


def test_lora_reference_is_the_policy_with_its_adapter_disabled(sft_model, reward_model, tiny_cfg, prompts):
    cfg = PPOConfig(max_new_tokens=16)
    mc = tiny_cfg.model_copy(update={"lora": True, "lora_r": 4, "lora_alpha": 8, "device": "cpu"})
    policy, ref, critic, rm, tok, _ = load_models(sft_model, reward_model, cfg, mc, RewardNorm())
    assert ref is None and hasattr(policy, "disable_adapter")  # no second copy of the weights
    n_params = sum(p.numel() for p in policy.parameters())
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) < n_params / 5
    torch.manual_seed(0)
    exp = make_experience(policy, None, critic, rm, tok, prompts[:4], _settings(cfg), 0.05, RewardNorm())
    assert torch.equal(exp.logprobs, exp.ref_logprobs)  # LoRA B starts at 0: policy == reference
    with torch.no_grad():  # move the adapter: the policy changes, the reference must not
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(0)
    exp2 = make_experience(policy, None, critic, rm, tok, prompts[:4], _settings(cfg), 0.05, RewardNorm())
    sft, _ = models.load_policy(sft_model, tiny_cfg, for_training=False)
    from rlhf.ppo.rollout import forward_logprobs

    expect, _ = forward_logprobs(sft, exp2.query_ids, exp2.query_mask, exp2.response_ids, exp2.response_mask,
                                 cfg.temperature, 8)
    assert torch.allclose(exp2.ref_logprobs, expect, atol=1e-5)
    assert not torch.allclose(exp2.logprobs, exp2.ref_logprobs, atol=1e-4)


def test_checkpoints_are_atomic_validated_and_corrupt_ones_skipped(tmp_path):
    root = tmp_path / "ckpts"
    w = {"policy": {"a": torch.arange(4.0)}, "critic": {"b": torch.ones(2)}}
    for step in (1, 2, 3):
        ckpt.save(root, step, weights=w, trainer={"optimizer": {"x": torch.tensor(step)}},
                  state={"fingerprint": "fp", "rng": [ckpt.capture_rng()]}, keep=3)
    assert ckpt.latest(root, "fp").step == 3
    assert ckpt.latest(root, "other") is None  # another run's checkpoints are never used
    # corrupt the newest: flip bytes in its weights -> the previous one is used
    f = root / "step-000003" / "policy.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(data)
    assert ckpt.validate(root / "step-000003") == "checksum mismatch in policy.safetensors"
    assert ckpt.latest(root, "fp").step == 2
    # a half-written one (no COMPLETE marker) is skipped as well
    (root / "step-000002" / ckpt.MARKER).unlink()
    found = ckpt.latest(root, "fp")
    assert found.step == 1 and torch.equal(found.weights("policy")["a"], torch.arange(4.0))
    # temp dirs of killed writers are ignored and cleaned up by the next save
    (root / ".tmp-step-000009-99999999").mkdir()
    ckpt.save(root, 4, weights=w, trainer={}, state={"fingerprint": "fp", "rng": []}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004"]
    assert ckpt.latest(root, "fp").step == 4


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng(json.loads(json.dumps(state)))
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_ppo_stage_writes_policy_critic_manifest_and_cleans_checkpoints(dataset, sft_model, reward_model, tiny_cfg,
                                                                        tmp_path):
    out = tmp_path / "ppo"
    cfg = PPOConfig(total_steps=3, rollout_batch_size=8, num_minibatches=2, micro_batch_size=2, ppo_epochs=2,
                    max_new_tokens=24, lr=1e-4, checkpoint_every=1, adaptive_kl=True, kl_estimator="k3")
    metrics = train_ppo(dataset, sft_model, reward_model, out, cfg, tiny_cfg)
    for key in ("score", "kl", "non_score_reward", "total_reward", "approx_kl", "clip_frac", "policy_loss",
                "value_loss", "entropy", "response_length", "eos_rate", "gold", "beta"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert metrics["steps"] == 3 and metrics["episodes"] == 24 and metrics["ranks_in_sync"] == 1
    assert metrics["beta"] != cfg.kl_coef  # adaptive
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "policy" and m["stage"] == "ppo" and m["config"]["kl_estimator"] == "k3"
    assert set(m["inputs"]) == {"dataset", "sft_model", "reward_model"}
    assert (out / "model.safetensors").exists() and (out / "critic" / "model.safetensors").exists()
    assert not list(out.rglob("*.bin"))
    assert not (tmp_path / "ppo.checkpoints").exists()  # removed after success (keep_checkpoints_on_success)
    policy, tok = models.load_policy(out, tiny_cfg, for_training=False)  # what evaluate does
    critic, _ = models.load_reward_model(out / "critic", tiny_cfg, for_training=False)
    assert tok.pad_token_id != tok.eos_token_id and critic.config.num_labels == 1
    sft_w = models.load_policy(sft_model, tiny_cfg, for_training=False)[0].state_dict()
    assert any(not torch.equal(v, sft_w[k]) for k, v in policy.state_dict().items())  # it trained


def test_ppo_with_lora_saves_an_adapter_when_not_merged(dataset, sft_model, reward_model, tiny_cfg, tmp_path):
    out = tmp_path / "ppo-lora"
    mc = tiny_cfg.model_copy(update={"lora": True, "lora_r": 4, "lora_alpha": 8})
    cfg = PPOConfig(total_steps=2, rollout_batch_size=4, ppo_epochs=1, max_new_tokens=16, lr=1e-3,
                    merge_lora=False, checkpoint_every=1, keep_checkpoints_on_success=True)
    train_ppo(dataset, sft_model, reward_model, out, cfg, mc)
    assert (out / "adapter_config.json").exists() and (out / models.BASE_MODEL_FILE).exists()
    assert (out / "critic" / "model.safetensors").exists()
    ck = ckpt.latest(tmp_path / "ppo-lora.checkpoints", json.loads(
        (tmp_path / "ppo-lora.checkpoints" / "step-000001" / ckpt.STATE).read_text())["fingerprint"])
    assert ck.step == 1 and all("lora" in k for k in ck.weights("policy"))  # only the adapter is saved
    policy, _ = models.load_policy(out, tiny_cfg, for_training=False)  # adapter + base, merged on load
    assert isinstance(policy, torch.nn.Module)


def test_config_checks_batch_arithmetic():
    from rlhf.config import build
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="num_minibatches"):
        build(PPOConfig, {"rollout_batch_size": 10, "num_minibatches": 3}, source="params.yaml", section="ppo")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        build(PPOConfig, {"rollout_batch_size": 8, "num_minibatches": 2, "micro_batch_size": 3})
    assert ModelConfig().lora is False
