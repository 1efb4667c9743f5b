"""SFT, reward and evaluate stages with the tiny profile: real training on the demo data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from rlhf.config import EvaluateConfig, ModelConfig
from rlhf.evaluate import evaluate, gate, text_stats
from rlhf.train import generation, models
from rlhf.train.sft import collate, encode


def test_sft_lowers_eval_loss(sft_model):
    m = json.loads((sft_model / "manifest.json").read_text())
    assert m["kind"] == "policy" and m["stage"] == "sft"
    assert m["metrics"]["eval_loss"] < m["metrics"]["eval_loss_before"] - 2.0
    assert m["metrics"]["eval_perplexity"] < 20
    assert (sft_model / "model.safetensors").exists() and not list(sft_model.glob("*.bin"))


def test_sft_masks_prompt_tokens(sft_model):
    tok = models.load_tokenizer(sft_model)
    ids, labels = encode(tok, "Any advice on chess?", "Study the openings.", 128)
    n_prompt = len(tok(models.chat_prompt(tok, "Any advice on chess?"), add_special_tokens=False).input_ids)
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    batch = collate([(ids, labels), (ids[:5], labels[:5])], tok.pad_token_id)
    assert batch["attention_mask"][1, 5:].sum() == 0 and (batch["labels"][1, 5:] == -100).all()


def test_reward_model_beats_chance(reward_model):
    m = json.loads((reward_model / "manifest.json").read_text())
    assert m["kind"] == "reward-model"
    assert m["metrics"]["eval_accuracy"] > 0.6  # the labels are noisy: ~0.86 is the ceiling
    assert m["metrics"]["gold_agreement"] > 0.6
    assert m["reward_norm"]["std"] > 0


def test_reward_score_is_read_at_last_real_token(reward_model, tiny_cfg):
    rm, tok = models.load_reward_model(reward_model, tiny_cfg, for_training=False)
    ids = tok("Happy to help! Start with the flour.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    alone = models.reward_scores(rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    padded = torch.tensor([ids + [tok.pad_token_id] * 4])
    mask = torch.tensor([[1] * len(ids) + [0] * 4])
    left = torch.tensor([[tok.pad_token_id] * 4 + ids])
    lmask = torch.tensor([[0] * 4 + [1] * len(ids)])
    assert torch.allclose(alone, models.reward_scores(rm, padded, mask), atol=1e-5)
    assert torch.allclose(alone, models.reward_scores(rm, left, lmask), atol=1e-5)


def test_sampling_stops_at_eos_and_masks_after(sft_model, tiny_cfg):
    model, tok = models.load_policy(sft_model, tiny_cfg, for_training=False)
    r = generation.sample(model, tok, ["Any advice on chess?"] * 8, max_new_tokens=24, temperature=0.7,
                          generator_seed=0)
    assert r.response_ids.shape == (8, 24)
    for i in range(8):
        valid = r.response_ids[i][r.response_mask[i].bool()]
        if r.has_eos[i]:
            assert valid[-1] == tok.eos_token_id and (valid[:-1] != tok.eos_token_id).all()
        assert (r.response_ids[i][~r.response_mask[i].bool()] == tok.pad_token_id).all()
    assert (r.query_mask[:, 0] <= r.query_mask[:, -1]).all()  # left padded


def test_evaluate_reports_all_metrics_and_gate(dataset, sft_model, reward_model, tiny_cfg, tmp_path):
    out = tmp_path / "eval"
    m = evaluate(dataset, sft_model, sft_model, reward_model, out,
                 EvaluateConfig(n_prompts=16, max_new_tokens=24, batch_size=16), tiny_cfg)
    for name in ("policy", "baseline"):
        for k in ("gold_mean", "rm_mean", "response_tokens", "eos_rate", "distinct_2", "repetition_rate"):
            assert f"{name}_{k}" in m
    assert m["kl_to_baseline"] == pytest.approx(0.0, abs=1e-4)  # same model: KL is 0
    assert m["win_rate_gold_vs_baseline"] == pytest.approx(0.5)  # same seeds: identical samples
    g = json.loads((out / "gate.json").read_text())
    assert g["passed"] is True and {c["check"] for c in g["checks"]} == {"beats_baseline", "kl_within_budget"}
    html = (out / "report.html").read_text()
    assert "Side-by-side samples" in html and "data:image/png;base64" in html


def test_gate_decisions():
    cfg = EvaluateConfig(gate_margin=0.2, kl_budget=10)
    base = {"policy_gold_mean": 3.0, "baseline_gold_mean": 2.0, "kl_to_baseline": 5.0, "champion_gold_mean": 2.9}
    assert gate(base, cfg, has_champion=False)["passed"]
    assert not gate(base, cfg, has_champion=True)["passed"]  # 3.0 < 2.9 + 0.2
    assert "kl_within_budget failed" in gate({**base, "kl_to_baseline": 11}, cfg, False)["reason"]
    # floors: a first champion must clear an absolute bar, and the reward model must be sane
    floored = cfg.model_copy(update={"min_gold": 3.5, "min_rm_accuracy": 0.7})
    low = gate(base, floored, False, rm_accuracy=0.65)
    assert not low["passed"] and "gold_floor failed" in low["reason"] and "reward_model_sane failed" in low["reason"]
    assert gate(base, cfg.model_copy(update={"min_gold": 2.5}), False, rm_accuracy=0.9)["passed"]
    nan = gate({**base, "policy_gold_mean": float("nan")}, cfg.model_copy(update={"min_gold": 0.0}), False)
    assert not nan["passed"] and "min_gold: null" in nan["reason"]
    assert not gate({**base, "policy_gold_mean": 2.1}, cfg, False)["passed"]


def test_text_stats():
    s = text_stats(["a b c d", "a b a b a b"])
    assert s["repetition_rate"] == pytest.approx((0 + (1 - 2 / 5)) / 2)
    assert 0 < s["distinct_2"] < 1


def test_cli_sft_reward_evaluate_tiny(dataset, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "model: {name: tiny, cache_dir: %s}\n"
        "sft: {max_steps: 4, batch_size: 8}\nreward: {max_steps: 4, batch_size: 8, gold_pairs: 20}\n"
        "evaluate: {n_prompts: 8, max_new_tokens: 12}\n" % (tmp_path / "cache"))
    env = {"RLHF_TRACKING": "off"}
    a = tmp_path / "a"
    for args in (["sft", "--dataset", str(dataset), "--out", str(a / "sft")],
                 ["reward", "--dataset", str(dataset), "--sft", str(a / "sft"), "--out", str(a / "rm")],
                 ["evaluate", "--dataset", str(dataset), "--policy", str(a / "sft"), "--baseline", str(a / "sft"),
                  "--reward", str(a / "rm"), "--out", str(a / "ev")]):
        proc = run_cli(*args, "--params", str(params), env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[sft] step 4/4" in proc.stderr or (a / "ev" / "gate.json").exists()
    assert json.loads((a / "ev" / "manifest.json").read_text())["kind"] == "evaluation"


def test_missing_model_is_one_line(dataset, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("model: {name: no-such/model-anywhere}\nsft: {max_steps: 1}\n")
    proc = run_cli("sft", "--dataset", str(dataset), "--out", str(tmp_path / "o"), "--params", str(params),
                   env={"RLHF_TRACKING": "off"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not found locally" in proc.stderr and not (tmp_path / "o").exists()


def test_model_config_rejects_unknown_dtype():
    with pytest.raises(ValueError):
        ModelConfig(dtype="float8")
