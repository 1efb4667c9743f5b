"""The same PPO code under torchrun: 2 CPU processes with gloo. Parameters stay identical across ranks
and only rank 0 writes outputs, checkpoints, the progress log and the MLflow run."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT

from rlhf.train import models


def test_two_gloo_ranks_stay_in_sync_and_only_rank0_writes(dataset, sft_model, reward_model, tiny_cfg, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"name": "tiny", "cache_dir": tiny_cfg.cache_dir, "device": "cpu"},
        "ppo": {"total_steps": 3, "rollout_batch_size": 4, "ppo_epochs": 2, "num_minibatches": 2,
                "micro_batch_size": 1, "max_new_tokens": 16, "lr": 3e-4, "checkpoint_every": 1,
                "keep_checkpoints_on_success": True, "seed": 3},
    }))
    out = work / "ppo"
    logs = tmp_path / "logs"
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "RLHF_PROFILE": "",
           "OMP_NUM_THREADS": "1", "RLHF_DIST_BACKEND": "gloo", "MLFLOW_EXPERIMENT_NAME": "ppo-ddp-test"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3",
           "-m", "rlhf.cli", "ppo", "--dataset", str(dataset), "--sft", str(sft_model), "--reward", str(reward_model),
           "--out", str(out), "--params", str(params)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=900)
    rank_logs = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert r.returncode == 0, (r.stderr[-2000:], {k: v[-3000:] for k, v in rank_logs.items()})

    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["world_size"] == 2 and m["ranks_in_sync"] == 1
    assert m["episodes"] == 3 * 4 * 2
    # it trained (so identical parameters across ranks are not trivially the SFT weights)
    policy, _ = models.load_policy(out, tiny_cfg, for_training=False)
    sft, _ = models.load_policy(sft_model, tiny_cfg, for_training=False)
    import torch

    assert any(not torch.equal(v, sft.state_dict()[k]) for k, v in policy.state_dict().items())

    # only rank 0 wrote: one artifact, one checkpoint tree (holding both ranks' RNG states), no strays
    assert sorted(p.name for p in work.iterdir()) == ["ppo", "ppo.checkpoints"]
    steps = sorted(p.name for p in (work / "ppo.checkpoints").iterdir())
    assert steps == ["step-000001", "step-000002"]
    state = json.loads((work / "ppo.checkpoints" / "step-000002" / "state.json").read_text())
    assert len(state["rng"]) == 2 and state["rng"][0]["torch"] != state["rng"][1]["torch"]  # per-rank seeds

    # only rank 0 logs progress and talks to MLflow
    assert set(rank_logs) == {"0", "1"}
    assert "[ppo] step 3/3" in rank_logs["0"]
    assert "[ppo] step" not in rank_logs["1"] and "MLflow run" not in rank_logs["1"]
    with sqlite3.connect(db) as con:
        runs = con.execute("select name from runs").fetchall()
        steps_logged = con.execute("select count(*) from metrics where key = 'episodes_per_s'").fetchone()[0]
    assert runs == [("ppo",)]
    assert steps_logged == 3


def test_two_ranks_resume_after_sigkill_and_end_where_an_uninterrupted_run_ends(dataset, sft_model, reward_model,
                                                                                tiny_cfg, tmp_path):
    """Rank 0 picks the checkpoint and broadcasts it; both ranks continue from it and the run ends with the
    weights of a run that was never interrupted."""
    import signal
    import time

    from rlhf.io import sha256_file

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"name": "tiny", "cache_dir": tiny_cfg.cache_dir, "device": "cpu"},
        "ppo": {"total_steps": 4, "rollout_batch_size": 2, "ppo_epochs": 1, "num_minibatches": 1,
                "max_new_tokens": 8, "lr": 3e-4, "checkpoint_every": 1, "seed": 4},
    }))
    env = {**os.environ, "RLHF_TRACKING": "off", "RLHF_PROFILE": "", "OMP_NUM_THREADS": "1",
           "RLHF_DIST_BACKEND": "gloo", "RLHF_LOG_LEVEL": "INFO"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    def cmd(out: Path, logs: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--log-dir", str(logs), "--redirects", "3", "-m", "rlhf.cli", "ppo", "--dataset", str(dataset),
                "--sft", str(sft_model), "--reward", str(reward_model), "--out", str(out), "--params", str(params)]

    ref = tmp_path / "uninterrupted"
    r = subprocess.run(cmd(ref, tmp_path / "logs-ref"), cwd=ROOT, env=env, text=True, capture_output=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    out, ckpts = tmp_path / "killed", tmp_path / "killed.checkpoints"
    proc = subprocess.Popen(cmd(out, tmp_path / "logs-1"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (ckpts / "step-000002" / "COMPLETE").exists():
        assert proc.poll() is None, "the run ended before its second checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.05)
    # torchrun and both ranks at once, as a node loss would (torchrun starts each rank in its own session,
    # so the ranks are found as its child processes, not through its process group)
    ranks = _children(proc.pid)
    assert len(ranks) >= 2, ranks
    for pid in [proc.pid, *ranks]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for pid in ranks:
        _wait_gone(pid)
    assert not out.exists()

    logs = tmp_path / "logs-2"
    r2 = subprocess.run(cmd(out, logs), cwd=ROOT, env=env, text=True, capture_output=True, timeout=900)
    rank_logs = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert r2.returncode == 0, (r2.stderr[-2000:], {k: v[-2000:] for k, v in rank_logs.items()})
    resumed = json.loads((out / "manifest.json").read_text())["metrics"]["resumed_from_step"]
    assert 2 <= resumed < 4
    assert "resuming from" in rank_logs["0"]
    assert sha256_file(ref / "model.safetensors") == sha256_file(out / "model.safetensors")
    assert sha256_file(ref / "critic" / "model.safetensors") == sha256_file(out / "critic" / "model.safetensors")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _wait_gone(pid: int, timeout_s: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists():
        stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
        if ") Z " in stat:  # a zombie: dead, waiting for its (killed) parent's reaper
            return
        assert time.monotonic() < deadline, f"rank process {pid} still alive"
        time.sleep(0.05)
