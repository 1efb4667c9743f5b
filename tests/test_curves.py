"""PPO snapshots and evaluate's curves: gold and reward vs KL along the run, and the PPO training curves.

A real tiny PPO run (snapshots every step), then a real evaluate with MLflow on a SQLite file in
tmp_path: one curve point per snapshot + the SFT point (KL exactly 0) + the final policy, both
figures in report.html and in the MLflow run's artifacts.
"""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from rlhf.config import EvaluateConfig, ModelConfig, PPOConfig
from rlhf.evaluate import evaluate
from rlhf.mlops import tracking
from rlhf.ppo import snapshots, train_ppo
from rlhf.train import distributed as D
from rlhf.train import models

EVAL = dict(n_prompts=12, curve_prompts=8, max_new_tokens=12, batch_size=4, gate_margin=-100.0, kl_budget=1e6)


@pytest.fixture(scope="module")
def ppo_run(dataset, sft_model, reward_model, tiny_cfg, tmp_path_factory):
    os.environ["RLHF_TRACKING"] = "off"
    out = tmp_path_factory.mktemp("curves") / "ppo"
    cfg = PPOConfig(total_steps=3, rollout_batch_size=8, ppo_epochs=1, max_new_tokens=12, lr=3e-3,
                    checkpoint_every=0, snapshot_every=1)
    train_ppo(dataset, sft_model, reward_model, out, cfg, tiny_cfg)
    return out


def test_ppo_keeps_snapshots_and_step_metrics_in_its_output(ppo_run):
    manifest = json.loads((ppo_run / "manifest.json").read_text())
    assert manifest["snapshots"]["steps"] == [1, 2]  # not after the last step: the output is that point
    idx = snapshots.index(ppo_run)
    assert [e["step"] for e in idx["snapshots"]] == [1, 2] and idx["lora"] is False
    for e in idx["snapshots"]:
        assert (ppo_run / e["path"] / "policy.safetensors").is_file()
    # the checkpoint root (their staging area) is gone after success
    assert (ppo_run.parent / "ppo.checkpoints").exists() is False
    steps = snapshots.step_metrics(ppo_run)
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["gold"] == s["gold"] and s["entropy"] > 0 for s in steps)  # gold logged per step, not NaN
    assert steps[-1]["score"] == pytest.approx(manifest["metrics"]["score"])


@pytest.fixture
def mlflow_on(tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", request.node.name)
    for k in ("RLHF_TRACKING", tracking.ENV_PARENT, tracking.ENV_PIPELINE, "KFP_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    import mlflow

    return mlflow.MlflowClient(uri)


def test_evaluate_draws_gold_and_reward_vs_kl_and_logs_it(ppo_run, dataset, sft_model, reward_model, tiny_cfg,
                                                          tmp_path, mlflow_on):
    out = tmp_path / "eval"
    m = evaluate(dataset, ppo_run, sft_model, reward_model, out, EvaluateConfig(**EVAL), tiny_cfg)
    points = json.loads((out / "curves" / "gold_reward_vs_kl.json").read_text())
    assert [p["label"] for p in points] == ["sft", "step 1", "step 2", "final (step 3)"]
    assert [p["step"] for p in points] == [0, 1, 2, 3]
    assert points[0]["kl"] == 0.0  # the SFT policy against itself: the same log-probs
    assert all(p["n_prompts"] == 8 for p in points)
    # the final point is the candidate's own evaluation on the same first 8 prompts
    samples = json.loads((out / "samples.json").read_text())
    assert points[-1]["gold"] == pytest.approx(sum(s["policy"]["gold"] for s in samples[:8]) / 8)
    assert points[0]["rm"] == pytest.approx(sum(s["baseline"]["rm"] for s in samples[:8]) / 8)
    # the snapshots moved away from SFT (lr 3e-3 on the tiny model): positive KL
    assert all(p["kl"] > 0 for p in points[1:])
    with open(out / "curves" / "gold_reward_vs_kl.csv") as f:
        assert [r["label"] for r in csv.DictReader(f)] == [p["label"] for p in points]
    best = max(points, key=lambda p: p["gold"])
    assert m["curve_best_gold_step"] == best["step"] and m["curve_best_gold_kl"] == pytest.approx(best["kl"])

    html = (out / "report.html").read_text()
    assert "Gold and reward vs KL along the PPO run" in html and "PPO training curves" in html
    assert 'alt="gold and reward-model score vs KL"' in html and 'alt="PPO training curves"' in html
    assert html.count("data:image/png;base64,") == 3  # score histograms + the two curves
    for png in ("gold_reward_vs_kl.png", "training_curves.png"):
        assert (out / "curves" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run_id = json.loads((out / "manifest.json").read_text())["mlflow_run_id"]
    logged = {f.path for f in mlflow_on.list_artifacts(run_id, "evaluation/curves")}
    assert logged == {f"evaluation/curves/{n}" for n in ("gold_reward_vs_kl.png", "training_curves.png",
                                                          "gold_reward_vs_kl.json", "gold_reward_vs_kl.csv")}
    history = mlflow_on.get_metric_history(run_id, "curve_kl")
    assert sorted(h.step for h in history) == [p["step"] for p in points]
    assert [h.value for h in sorted(history, key=lambda h: h.step)] == pytest.approx([p["kl"] for p in points])


def test_evaluate_without_snapshots_has_no_curves(dataset, sft_model, reward_model, tiny_cfg, tmp_path):
    out = tmp_path / "eval"
    m = evaluate(dataset, sft_model, sft_model, reward_model, out, EvaluateConfig(**EVAL), tiny_cfg)
    assert not (out / "curves").exists() and "curve_best_gold_kl" not in m
    assert "Gold and reward vs KL" not in (out / "report.html").read_text()


def test_a_resumed_run_keeps_the_snapshots_taken_before_its_checkpoint(tmp_path):
    cfg = PPOConfig(total_steps=6, snapshot_every=1)
    mc = ModelConfig()
    info = D.DistInfo()
    out = tmp_path / "ppo"
    model = torch.nn.Linear(2, 2)
    first = snapshots.RunSnapshots(out, cfg, mc, "fp-a", 0, info)
    for step in (1, 2, 3):
        first.save(step, model, {"score": float(step), "gold": 0.5})
    staged = snapshots.staging_root(out, cfg)
    assert sorted(p.name for p in staged.iterdir()) == ["step-000001", "step-000002", "step-000003"]
    snapshots.RunSnapshots(out, cfg, mc, "fp-a", 2, info)  # resumed from the checkpoint of step 2
    assert sorted(p.name for p in staged.iterdir()) == ["step-000001", "step-000002"]
    snapshots.RunSnapshots(out, cfg, mc, "fp-b", 2, info)  # another run (other config): none of them
    assert list(staged.iterdir()) == []


def test_a_lora_snapshot_is_the_policy_of_its_step(dataset, sft_model, reward_model, tiny_cfg, tmp_path):
    """The snapshot of step 1 (the adapter only), merged onto SFT, is the policy a 1-step run outputs."""
    os.environ["RLHF_TRACKING"] = "off"
    mc = tiny_cfg.model_copy(update={"lora": True, "lora_r": 4, "lora_alpha": 8})
    cfg = PPOConfig(total_steps=2, rollout_batch_size=4, ppo_epochs=1, max_new_tokens=12, lr=1e-2,
                    lr_schedule="constant", checkpoint_every=0, snapshot_every=1)
    train_ppo(dataset, sft_model, reward_model, tmp_path / "two", cfg, mc)
    train_ppo(dataset, sft_model, reward_model, tmp_path / "one", cfg.model_copy(update={"total_steps": 1}), mc)
    idx = snapshots.index(tmp_path / "two")
    assert idx["lora"] is True and [e["step"] for e in idx["snapshots"]] == [1]
    from safetensors.torch import load_file

    entry = idx["snapshots"][0]
    assert all("lora_" in k for k in load_file(str(tmp_path / "two" / entry["path"] / "policy.safetensors")))
    snap, _ = snapshots.load(tmp_path / "two", entry, idx, sft_model, tiny_cfg)
    one, _ = models.load_policy(tmp_path / "one", tiny_cfg, for_training=False)
    sft, _ = models.load_policy(sft_model, tiny_cfg, for_training=False)
    got, want, base = snap.state_dict(), one.state_dict(), sft.state_dict()
    assert set(got) == set(want)
    assert any(not torch.equal(want[k], base[k]) for k in want)  # the step changed the policy
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)

    out = tmp_path / "eval"
    evaluate(dataset, tmp_path / "two", sft_model, reward_model, out,
             EvaluateConfig(**{**EVAL, "n_prompts": 4, "curve_prompts": 4}), tiny_cfg)
    points = json.loads((out / "curves" / "gold_reward_vs_kl.json").read_text())
    assert [p["label"] for p in points] == ["sft", "step 1", "final (step 2)"] and points[1]["kl"] > 0
