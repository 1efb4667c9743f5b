"""Mixed precision done right (docs/ppo.md #27): with a low-precision ``model.dtype`` the trainable weights
and the optimizer state stay fp32, the forward passes run under autocast in that dtype, and frozen
models (reference, reward model) are held in it. CPU autocast supports bf16, so the real code path runs
here with ``model.dtype: bfloat16``."""

from __future__ import annotations

import pytest
import torch

from rlhf.config import PPOConfig, RewardConfig, SFTConfig
from rlhf.train import precision as P


class Watch:
    """Captures the optimizer a stage builds and the autocast state of every forward of its trained model."""

    def __init__(self, monkeypatch, module, device_type: str = "cpu"):
        self.optimizers: list[torch.optim.Optimizer] = []
        self.autocast: list[tuple[bool, torch.dtype]] = []
        self.device_type = device_type
        real = module.make_optimizer

        def make_optimizer(*args, **kw):
            opt = real(*args, **kw)
            self.optimizers.append(opt)
            for m in args[0].modules():  # its layers: the reward model's forward bypasses model.forward
                if isinstance(m, torch.nn.Linear):
                    m.register_forward_pre_hook(self._hook)
            return opt

        monkeypatch.setattr(module, "make_optimizer", make_optimizer)

    def _hook(self, module, args):
        if torch.is_grad_enabled():  # training forwards (evaluation runs under no_grad)
            self.autocast.append((torch.is_autocast_enabled(self.device_type),
                                  torch.get_autocast_dtype(self.device_type)))

    def check(self, dtype: torch.dtype) -> None:
        (opt,) = self.optimizers
        params = [p for g in opt.param_groups for p in g["params"]]
        assert params and all(p.dtype == torch.float32 for p in params), {p.dtype for p in params}
        states = [s for s in opt.state.values() if s]
        assert states, "the optimizer never stepped"
        for s in states:
            assert s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
        assert self.autocast, "no training forward pass seen"
        assert all(enabled and d == dtype for enabled, d in self.autocast), set(self.autocast)


@pytest.fixture
def bf16_cfg(tiny_cfg):
    return tiny_cfg.model_copy(update={"dtype": "bfloat16", "device": "cpu"})


def test_sft_in_bf16_keeps_fp32_weights_and_optimizer_state_and_autocasts(dataset, bf16_cfg, sft_model, tmp_path,
                                                                          monkeypatch):
    from rlhf.train import sft

    watch = Watch(monkeypatch, sft)
    sft.train_sft(dataset, tmp_path / "sft", SFTConfig(max_steps=2, batch_size=4, eval_max_rows=4), bf16_cfg)
    watch.check(torch.bfloat16)


def test_reward_in_bf16_keeps_fp32_weights_and_optimizer_state_and_autocasts(dataset, bf16_cfg, sft_model,
                                                                             tmp_path, monkeypatch):
    from rlhf.train import reward

    watch = Watch(monkeypatch, reward)
    reward.train_reward(dataset, sft_model, tmp_path / "rm",
                        RewardConfig(max_steps=2, batch_size=4, eval_max_rows=4, gold_pairs=0), bf16_cfg)
    watch.check(torch.bfloat16)


def test_ppo_in_bf16_trains_fp32_weights_with_frozen_models_in_bf16(dataset, bf16_cfg, sft_model, reward_model,
                                                                    tmp_path, monkeypatch):
    from rlhf.ppo import trainer
    from rlhf.ppo.rollout import RewardNorm

    cfg = PPOConfig(total_steps=1, rollout_batch_size=4, ppo_epochs=1, num_minibatches=1, max_new_tokens=8,
                    checkpoint_every=0)
    policy, ref, critic, rm, _, _ = trainer.load_models(sft_model, reward_model, cfg, bf16_cfg, RewardNorm(0, 1))
    assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in critic.parameters() if p.requires_grad)
    if ref is not None:  # with LoRA the reference is the policy with its adapter off
        assert all(p.dtype == torch.bfloat16 for p in ref.parameters())  # frozen: low precision is fine
    assert all(p.dtype == torch.bfloat16 for p in rm.parameters())

    seen: list[tuple[bool, torch.dtype]] = []
    opts: list[torch.optim.Optimizer] = []
    real_opt = trainer.make_optimizer

    def make_optimizer(policy, critic, cfg):
        opt = real_opt(policy, critic, cfg)
        opts.append(opt)
        for m in [*policy.modules(), *critic.modules()]:
            if isinstance(m, torch.nn.Linear):
                m.register_forward_pre_hook(lambda mod, args: seen.append(
                    (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
        return opt

    monkeypatch.setattr(trainer, "make_optimizer", make_optimizer)
    trainer.train_ppo(dataset, sft_model, reward_model, tmp_path / "ppo", cfg, bf16_cfg)
    (opt,) = opts
    for s in opt.state.values():
        assert s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
    assert opt.state and seen and all(enabled and d == torch.bfloat16 for enabled, d in seen), set(seen)


def test_fp32_is_plain_and_fp16_gets_a_grad_scaler():
    off = P.Precision.for_device("cpu", torch.float32)
    assert not off.enabled and off.scaler is None
    with off.autocast():
        assert not torch.is_autocast_enabled("cpu")
    half = P.Precision.for_device("cpu", torch.float16)
    assert half.enabled and isinstance(half.scaler, torch.amp.GradScaler)


def test_fp16_scaler_unscales_before_clipping_and_skips_overflowed_steps():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    prec = P.Precision.for_device("cpu", torch.float16)
    with prec.autocast():
        out = layer(torch.ones(2, 4))
    assert out.dtype == torch.float16
    prec.backward(out.float().sum() * 0.01)  # small enough that the scaled fp16 gradient does not overflow
    assert prec.scaler.get_scale() > 1.0
    prec.unscale(opt)  # the loss was scaled, the gradients come back at their true scale
    assert torch.allclose(layer.weight.grad, torch.full_like(layer.weight, 0.02), rtol=1e-3)
    prec.step(opt)
    opt.zero_grad()

    before = layer.weight.detach().clone()
    with prec.autocast():
        out = layer(torch.ones(2, 4))
    prec.backward(out.float().sum())
    layer.weight.grad.fill_(float("inf"))  # an overflowed fp16 gradient
    scale = prec.scaler.get_scale()
    prec.unscale(opt)
    prec.step(opt)
    assert torch.equal(layer.weight, before)  # the step was skipped: the weights are not poisoned
    assert prec.scaler.get_scale() < scale  # and the scale backed off
