"""kill -9 during a PPO run, then the same command: it resumes from the last good checkpoint and ends
exactly where an uninterrupted run ends (fixed seed, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import ROOT, run_cli

from rlhf.io import sha256_file
from rlhf.ppo.metrics import TIMING_METRICS

PPO = {"total_steps": 5, "rollout_batch_size": 8, "ppo_epochs": 2, "num_minibatches": 2, "max_new_tokens": 16,
       "lr": 3e-4, "checkpoint_every": 1, "adaptive_kl": True, "seed": 7, "snapshot_every": 1}


def _params(tmp_path: Path, tiny_cfg) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"model": {"name": "tiny", "cache_dir": tiny_cfg.cache_dir, "device": "cpu"},
                                 "ppo": PPO}))
    return p


def _env() -> dict[str, str]:
    # one thread in every run: the thread count the CLI would pick follows the machine's load
    return {"RLHF_TRACKING": "off", "RLHF_PROFILE": "", "RLHF_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}


def _args(dataset, sft, rm, out, params) -> list[str]:
    return ["ppo", "--dataset", str(dataset), "--sft", str(sft), "--reward", str(rm), "--out", str(out),
            "--params", str(params)]


def test_sigkill_then_same_command_resumes_and_matches_uninterrupted(dataset, sft_model, reward_model, tiny_cfg,
                                                                     tmp_path):
    params = _params(tmp_path, tiny_cfg)
    # 1. the reference: an uninterrupted run
    ref_out = tmp_path / "uninterrupted"
    r = run_cli(*_args(dataset, sft_model, reward_model, ref_out, params), env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    # 2. the same run, killed with SIGKILL once its second checkpoint exists
    out = tmp_path / "killed"
    ckpts = tmp_path / "killed.checkpoints"
    env = {**os.environ, **_env()}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log_path = tmp_path / "first-attempt.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", *_args(dataset, sft_model, reward_model, out,
                                                                          params)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (ckpts / "step-000002" / "COMPLETE").exists():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # the final artifact is only ever written whole

    # 3. the same command again: resumes and finishes
    r2 = run_cli(*_args(dataset, sft_model, reward_model, out, params), env=_env(), timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "resuming from" in r2.stderr and "killed.checkpoints/step-00000" in r2.stderr
    resumed_step = json.loads((out / "manifest.json").read_text())["metrics"]["resumed_from_step"]
    assert 2 <= resumed_step < PPO["total_steps"]

    a = json.loads((ref_out / "manifest.json").read_text())["metrics"]
    b = json.loads((out / "manifest.json").read_text())["metrics"]
    skip = {*TIMING_METRICS, "seconds", "resumed_from_step"}
    for key in sorted(set(a) - skip):
        va, vb = a[key], b[key]
        if isinstance(va, float):
            assert abs(va - vb) <= 1e-6 * max(1.0, abs(va)), (key, va, vb)
        else:
            assert va == vb, (key, va, vb)
    # bit-identical final weights (policy and critic)
    assert sha256_file(ref_out / "model.safetensors") == sha256_file(out / "model.safetensors")
    assert sha256_file(ref_out / "critic" / "model.safetensors") == sha256_file(out / "critic" / "model.safetensors")
    assert not ckpts.exists()  # cleaned up after success
    # the policy snapshots (evaluate's curve): those before the checkpoint kept, the later ones taken again
    assert json.loads((out / "manifest.json").read_text())["snapshots"]["steps"] == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        f = f"snapshots/step-{step:06d}/policy.safetensors"
        assert sha256_file(ref_out / f) == sha256_file(out / f), f


def test_checkpoints_of_another_run_are_kept_unless_replacing_is_asked(tmp_path):
    """A changed fingerprint (config, inputs, GPU count) stops the run with one line and keeps the old
    checkpoints; with ppo.replace_stale_checkpoints they are deleted and the run starts over."""
    import pytest
    import torch

    from rlhf.config import PPOConfig
    from rlhf.errors import ConfigError
    from rlhf.ppo import checkpoint as ckpt
    from rlhf.train.distributed import DistInfo

    root = tmp_path / "ckpts"
    ckpt.save(root, 3, weights={"policy": {"w": torch.zeros(1)}, "critic": {"w": torch.zeros(1)}},
              trainer={"optimizer": {}, "scheduler": {}}, state={"fingerprint": "old-run", "history": []})
    with pytest.raises(ConfigError, match="another run") as e:
        ckpt.RunCheckpoints(root, "new-run", PPOConfig(), DistInfo()).resume(None, None, None, None, None)
    assert "replace_stale_checkpoints" in e.value.one_line()
    assert (root / "step-000003" / "COMPLETE").exists()
    cfg = PPOConfig(replace_stale_checkpoints=True)
    assert ckpt.RunCheckpoints(root, "new-run", cfg, DistInfo()).resume(None, None, None, None, None) == (0, [])
    assert not (root / "step-000003").exists()
