"""PPO maths on hand-built tensors: masks, KL estimators, score placement, GAE, whitening, clipped losses."""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo import loss as L
from rlhf.ppo.trainer import AdaptiveKLController, FixedKLController, PromptStream
from rlhf.train.generation import truncate_after_eos

EOS, PAD = 2, 0


def test_truncate_after_eos_masks_everything_after_the_first_eos():
    resp = torch.tensor([[5, 6, EOS, 7, EOS, 8],
                         [5, EOS, 9, 9, 9, 9],
                         [5, 6, 7, 8, 9, 10]])  # no EOS in budget
    ids, mask, has_eos = truncate_after_eos(resp, EOS, PAD)
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert ids.tolist() == [[5, 6, EOS, PAD, PAD, PAD], [5, EOS, PAD, PAD, PAD, PAD], [5, 6, 7, 8, 9, 10]]
    assert has_eos.tolist() == [True, True, False]


def test_masked_mean_ignores_padding_even_if_it_holds_garbage():
    x = torch.tensor([[1.0, 3.0, float("inf")], [2.0, float("nan"), 1e30]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert L.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert L.masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 2.0])
    assert L.masked_sum(x, mask).item() == pytest.approx(6.0)


def test_whitening_uses_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = L.masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-4)  # unbiased std of the 3 valid tokens
    assert w[~mask.bool()].abs().max().item() == 0.0
    kept = L.masked_whiten(x, mask, shift_mean=False)
    assert kept[mask.bool()].mean().item() == pytest.approx(2.0, abs=1e-5)


def test_kl_estimators_are_zero_when_policy_equals_reference():
    lp = torch.log_softmax(torch.randn(3, 5, 11), -1).gather(2, torch.randint(0, 11, (3, 5, 1))).squeeze(-1)
    for est in ("k1", "k3"):
        assert torch.equal(L.kl_per_token(lp, lp.clone(), est), torch.zeros_like(lp))
    # k3 is non-negative per token; k1 is the plain log-ratio
    ref = lp - torch.randn_like(lp)
    assert (L.kl_per_token(lp, ref, "k3") >= 0).all()
    assert torch.allclose(L.kl_per_token(lp, ref, "k1"), lp - ref)
    with pytest.raises(ValueError):
        L.kl_per_token(lp, ref, "k9")


def test_k1_and_k3_estimate_the_true_kl():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(7), 0)
    q = torch.softmax(torch.randn(7), 0)
    true_kl = (p * (p / q).log()).sum()
    x = torch.multinomial(p, 200_000, replacement=True)
    lp, lq = p.log()[x], q.log()[x]
    for est in ("k1", "k3"):
        assert L.kl_per_token(lp, lq, est).mean().item() == pytest.approx(true_kl.item(), rel=0.05)


def test_score_lands_on_the_eos_index_and_kl_penalty_on_valid_tokens():
    # row 0: EOS at index 2; row 1: EOS at index 0; row 2: no EOS, budget of 4 -> last token index 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [0.1, 0.1, 0.1, 0.1]])
    scores = torch.tensor([1.0, -2.0, 3.0])
    rewards, non_score = L.token_rewards(scores, kl, mask, beta=0.5)
    expected_ns = torch.tensor([[-0.05, -0.1, -0.15, 0], [-0.25, 0, 0, 0], [-0.05, -0.05, -0.05, -0.05]])
    assert torch.allclose(non_score, expected_ns)
    expected = expected_ns.clone()
    expected[0, 2] += 1.0
    expected[1, 0] += -2.0
    expected[2, 3] += 3.0
    assert torch.allclose(rewards, expected)
    assert L.last_token_index(mask).tolist() == [2, 0, 3]


def test_gae_matches_a_hand_computed_example():
    gamma, lam = 1.0, 0.95
    rewards = torch.tensor([[0.0, -0.1, 1.0, 7.0]])  # the 7 sits on padding and must be ignored
    values = torch.tensor([[0.5, 0.6, 0.7, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # by hand: deltas d2 = 1 - 0.7 = 0.3; d1 = -0.1 + 0.7 - 0.6 = 0.0; d0 = 0 + 0.6 - 0.5 = 0.1
    a2 = 0.3
    a1 = 0.0 + gamma * lam * a2          # 0.285
    a0 = 0.1 + gamma * lam * a1          # 0.37075
    adv, ret = L.gae(rewards, values, mask, gamma, lam)
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2, 0.0])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0])


def test_gae_with_gamma_lambda_one_gives_reward_to_go():
    rewards = torch.tensor([[0.1, 0.2, 0.3]])
    values = torch.tensor([[5.0, -1.0, 2.0]])
    adv, ret = L.gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert ret.tolist()[0] == pytest.approx([0.6, 0.5, 0.3])  # Monte-Carlo returns


def test_policy_loss_first_minibatch_has_ratio_one_and_no_clipping():
    lp = torch.randn(4, 6)
    adv = torch.randn(4, 6)
    mask = torch.ones(4, 6)
    mask[0, 3:] = 0
    loss, st = L.policy_loss(lp, lp.clone(), adv, mask, 0.2)
    assert st["ratio_mean"].item() == pytest.approx(1.0)
    assert st["clip_frac"].item() == 0.0
    assert st["approx_kl"].item() == 0.0
    assert loss.item() == pytest.approx(-L.masked_mean(adv, mask).item(), abs=1e-6)


def test_policy_loss_clips_and_its_gradient_vanishes_outside_the_trust_region():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.5, -0.5]], requires_grad=True)  # ratios e^0.5 = 1.65, e^-0.5 = 0.61
    adv = torch.tensor([[1.0, -1.0]])
    loss, st = L.policy_loss(new, old, adv, torch.ones(1, 2), 0.2)
    assert st["clip_frac"].item() == 1.0
    loss.backward()
    assert torch.equal(new.grad, torch.zeros(1, 2))  # both clipped on the side the advantage pushes
    # the pessimistic side is not clipped: positive advantage with a small ratio keeps its gradient
    new2 = torch.tensor([[-0.5]], requires_grad=True)
    loss2, st2 = L.policy_loss(new2, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss2.backward()
    assert st2["clip_frac"].item() == 0.0 and new2.grad.abs().item() > 0


def test_value_loss_clips_around_old_values():
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0]])
    v = torch.tensor([[0.5, 0.1]])
    loss, st = L.value_loss(v, old, ret, torch.ones(1, 2), clip_eps=0.2)
    # row: v=0.5 -> clipped 0.2: max(0.25, 0.64) = 0.64; v=0.1 -> clipped 0.1: 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert st["value_clip_frac"].item() == pytest.approx(0.5)


def test_losses_ignore_masked_positions():
    lp, old, adv = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    base, _ = L.policy_loss(lp, old, adv, mask)
    lp2, adv2 = lp.clone(), adv.clone()
    lp2[~mask.bool()] = 50.0
    adv2[~mask.bool()] = -1e6
    changed, _ = L.policy_loss(lp2, old, adv2, mask)
    assert changed.item() == pytest.approx(base.item())
    v, ov, ret = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    vb, _ = L.value_loss(v, ov, ret, mask)
    ret2 = ret.clone()
    ret2[~mask.bool()] = 1e6
    assert L.value_loss(v, ov, ret2, mask)[0].item() == pytest.approx(vb.item())


def test_ppo_loss_is_policy_plus_vf_coef_value_minus_entropy_bonus_and_splits_per_model():
    from types import SimpleNamespace

    torch.manual_seed(0)
    B, T, r = 3, 6, 4  # the rollout is T wide; the model outputs cover the first r response tokens
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
    rollout = {"logprobs": torch.randn(B, T), "advantages": torch.randn(B, T), "values": torch.randn(B, T),
               "returns": torch.randn(B, T), "response_mask": mask}
    lp, ent, v = torch.randn(B, r), torch.rand(B, r), torch.randn(B, r)
    coefs = SimpleNamespace(clip_eps=0.2, vf_clip_eps=0.3, vf_coef=0.1, entropy_coef=0.01)
    both = L.ppo_loss(rollout, coefs, logprobs=lp, entropy=ent, values=v)
    m = mask[:, :r]
    pg, pg_st = L.policy_loss(lp, rollout["logprobs"][:, :r], rollout["advantages"][:, :r], m, 0.2)
    vf, vf_st = L.value_loss(v, rollout["values"][:, :r], rollout["returns"][:, :r], m, 0.3)
    expected = pg + 0.1 * vf - 0.01 * L.masked_mean(ent, m)
    assert both.total.item() == pytest.approx(expected.item(), abs=1e-7)
    assert set(both.stats) == set(pg_st) | set(vf_st) and both.stats["policy_loss"].item() == pg.item()
    # one model's outputs alone give that model's part; the parts add up to the total
    policy_part = L.ppo_loss(rollout, coefs, logprobs=lp, entropy=ent)
    critic_part = L.ppo_loss(rollout, coefs, values=v)
    assert policy_part.value is None and critic_part.policy is None
    assert torch.equal(policy_part.total, both.policy) and torch.equal(critic_part.total, both.value)
    assert torch.equal(both.policy + both.value, both.total)
    with pytest.raises(ValueError, match="entropy"):
        L.ppo_loss(rollout, coefs, logprobs=lp)  # a bonus without the entropy
    no_bonus = SimpleNamespace(**{**vars(coefs), "entropy_coef": 0.0})
    assert torch.equal(L.ppo_loss(rollout, no_bonus, logprobs=lp).total, pg)


def test_entropy_of_uniform_logits():
    ent = L.entropy_from_logits(torch.zeros(2, 3, 8))
    assert torch.allclose(ent, torch.full((2, 3), torch.log(torch.tensor(8.0)).item()))


def test_logprobs_and_entropy_from_one_log_softmax_match_the_separate_functions():
    from rlhf.train.generation import logprobs_and_entropy, logprobs_from_logits

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50) * 3
    tokens = torch.randint(0, 50, (3, 5))
    with torch.no_grad():  # the in-place path (rollouts)
        lp, ent = logprobs_and_entropy(logits.clone(), tokens)
    assert torch.equal(lp, logprobs_from_logits(logits, tokens))
    assert torch.allclose(ent, L.entropy_from_logits(logits), atol=1e-6)
    x = logits.clone().requires_grad_(True)  # the autograd path (entropy bonus)
    lp2, ent2 = logprobs_and_entropy(x, tokens)
    (lp2.sum() + ent2.sum()).backward()
    y = logits.clone().requires_grad_(True)
    (logprobs_from_logits(y, tokens).sum() + L.entropy_from_logits(y).sum()).backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-6)


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    ada = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ada.update(12.0, 100)  # KL above target: error clipped to +0.2 -> beta grows by 2 %
    assert ada.value == pytest.approx(0.1 * 1.02)
    ada.update(0.0, 100)   # below target: shrinks by 2 %
    assert ada.value == pytest.approx(0.1 * 1.02 * 0.98)
    restored = AdaptiveKLController(0.1, 6.0, 1000)
    restored.load_state_dict(ada.state_dict())
    assert restored.value == ada.value


def test_prompt_stream_is_a_pure_function_of_position():
    prompts = [f"p{i}" for i in range(10)]
    a, b = PromptStream(prompts, seed=3), PromptStream(prompts, seed=3)
    first = a.take(0, 10)
    assert sorted(first) == sorted(prompts)  # one pass is a permutation
    assert a.take(7, 6) == b.take(7, 6)       # a restarted stream continues identically
    assert a.take(10, 10) != first            # the next pass is shuffled again
