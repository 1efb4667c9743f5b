"""SIGKILL of `rlhf sft`, `rlhf reward` and `rlhf ppo` at a random step, then the same command: it resumes
from its last checkpoint and ends exactly where an uninterrupted run ends (fixed seed, CPU, one thread).

The step is drawn from a seeded RNG per stage; the kill lands right after the stage logged that step's
checkpoint (so there is one to resume from), while the process goes on training. Weights are compared
bit for bit: on CPU with one thread every operation is deterministic, and resuming restores weights,
optimizer, scheduler, grad scaler, RNG states and the data-order position exactly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from faults.conftest import Watched
from rlhf.io import artifact_problem, sha256_file
from rlhf.ppo.metrics import TIMING_METRICS

STEPS = {"sft": 8, "reward": 8, "ppo": 4}
SECTIONS = {
    "sft": {"max_steps": STEPS["sft"], "batch_size": 8, "eval_max_rows": 8, "lr": 3e-3},
    "reward": {"max_steps": STEPS["reward"], "batch_size": 8, "eval_max_rows": 16, "gold_pairs": 16, "lr": 1e-3},
    "ppo": {"total_steps": STEPS["ppo"], "rollout_batch_size": 4, "ppo_epochs": 1, "num_minibatches": 1,
            "max_new_tokens": 8, "adaptive_kl": True},
}
ENV = {"RLHF_TRACKING": "off", "RLHF_PROFILE": "", "RLHF_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}


def _params(tmp_path: Path, tiny_cfg, stage: str) -> Path:
    p = tmp_path / "params.yaml"
    section = {**SECTIONS[stage], "checkpoint_every": 1, "log_every": 1, "seed": 3}
    p.write_text(yaml.safe_dump({"model": {"name": "tiny", "cache_dir": tiny_cfg.cache_dir, "device": "cpu"},
                                 stage: section}))
    return p


def _args(stage: str, out: Path, params: Path, dataset, sft_model, reward_model) -> list[str]:
    inputs = {"sft": ["--dataset", str(dataset)],
              "reward": ["--dataset", str(dataset), "--sft", str(sft_model)],
              "ppo": ["--dataset", str(dataset), "--sft", str(sft_model), "--reward", str(reward_model)]}[stage]
    return [stage, *inputs, "--out", str(out), "--params", str(params)]


def _weights(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*.safetensors"))}


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_sigkill_at_a_random_step_then_the_same_command_ends_like_an_uninterrupted_run(
        stage, dataset, sft_model, reward_model, tiny_cfg, tmp_path):
    params = _params(tmp_path, tiny_cfg, stage)
    kill_after = random.Random(f"fault-{stage}").randint(1, STEPS[stage] - 2)

    ref = tmp_path / "uninterrupted"
    r = run_cli(*_args(stage, ref, params, dataset, sft_model, reward_model), env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "killed"
    first = Watched(_args(stage, out, params, dataset, sft_model, reward_model), tmp_path / "first.log", env=ENV)
    first.wait_for(rf"\[{stage}\] checkpoint \S+step-{kill_after:06d}")
    assert first.kill_group() == -9
    assert not out.exists()  # the artifact is only ever written whole
    ckpts = tmp_path / "killed.checkpoints"
    assert (ckpts / f"step-{kill_after:06d}" / "COMPLETE").exists()

    r2 = run_cli(*_args(stage, out, params, dataset, sft_model, reward_model), env=ENV, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert f"[{stage}] resuming from {ckpts}/step-" in r2.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert kill_after <= manifest["metrics"]["resumed_from_step"] < STEPS[stage]
    assert artifact_problem(out) is None  # a whole artifact: its manifest's content hash matches its files
    assert not ckpts.exists()  # checkpoints removed after success

    assert _weights(out) == _weights(ref) != {}  # bit-identical weights (policy; PPO's critic too)
    a, b = json.loads((ref / "manifest.json").read_text())["metrics"], manifest["metrics"]
    skip = {*TIMING_METRICS, "seconds", "samples_per_s", "resumed_from_step"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def test_two_ranks_resume_from_one_checkpoint_to_the_same_weights(dataset, tiny_cfg, tmp_path):
    """DDP (2 gloo ranks): rank 0 writes the checkpoint, every rank loads it. A finished run that kept its
    checkpoints (``keep_checkpoints_on_success``) has its output removed and the same command rerun: both
    ranks resume from the step-2 checkpoint and end with the first run's weights, bit for bit."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"name": "tiny", "cache_dir": tiny_cfg.cache_dir, "device": "cpu"},
        "sft": {**SECTIONS["sft"], "max_steps": 4, "batch_size": 4, "checkpoint_every": 2,
                "keep_checkpoints_on_success": True}}))
    out = tmp_path / "ddp"
    env = {**os.environ, **ENV, "RLHF_DIST_BACKEND": "gloo"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    def torchrun(logs: str) -> dict[str, str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--log-dir", str(tmp_path / logs), "--redirects", "3", "-m", "rlhf.cli",
               *_args("sft", out, params, dataset, None, None)]
        r = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=900)
        rank_logs = {p.parent.name: p.read_text() for p in (tmp_path / logs).rglob("stderr.log")}
        assert r.returncode == 0, (r.stderr[-2000:], {k: v[-2000:] for k, v in rank_logs.items()})
        return rank_logs

    torchrun("first")
    first = _weights(out)
    assert (tmp_path / "ddp.checkpoints" / "step-000002" / "COMPLETE").exists()
    assert json.loads((tmp_path / "ddp.checkpoints" / "step-000002" / "state.json").read_text())["world_size"] == 2
    shutil.rmtree(out)
    logs = torchrun("second")
    assert set(logs) == {"0", "1"} and "[sft] resuming from" in logs["0"], logs  # rank 0 speaks for all
    assert _weights(out) == first != {}  # rank 1 loaded the checkpoint too: otherwise its gradients would differ
    assert json.loads((out / "manifest.json").read_text())["metrics"]["resumed_from_step"] == 2
