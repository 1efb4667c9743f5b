"""A full disk (a small tmpfs) under a stage's output, a PPO checkpoint and MLflow's store: one line, the
previous state intact, nothing half-written left behind. Real CLI processes, real filesystems."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, run_cli

from faults.disks import Disks, du_kib, fill, one_error_line, used_kib
from rlhf.io import sha256_dir
from rlhf.ppo import checkpoint as ckpt


@pytest.fixture
def disks(tmp_path):
    d = Disks(tmp_path / "mnt")
    yield d
    d.unmount_all()


def test_a_stage_output_that_fills_the_disk_leaves_the_previous_output(disks, demo_raw, tmp_path):
    disk = disks.mount("disk", 1024)
    out = disk / "dataset"
    first = run_cli("prepare", "--raw", str(demo_raw), "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = sha256_dir(out)
    fill(disk, leave_kib=48)  # the dataset is about 300 KiB: the next one cannot fit

    again = run_cli("prepare", "--raw", str(demo_raw), "--out", str(out), cwd=tmp_path)
    line = one_error_line(again, 4, "no space left on device", str(out), "is unchanged")
    assert sha256_dir(out) == before, line  # the previous output, whole
    assert sorted(p.name for p in disk.iterdir()) == ["dataset", "filler"]  # no temp dir left

    other = disk / "dataset-2"  # a new path: nothing at all, not even an empty directory
    proc = run_cli("prepare", "--raw", str(demo_raw), "--out", str(other), cwd=tmp_path)
    one_error_line(proc, 4, "no space left on device", str(other), "nothing was written")
    assert sorted(p.name for p in disk.iterdir()) == ["dataset", "filler"]


PPO = {"total_steps": 3, "rollout_batch_size": 8, "ppo_epochs": 1, "num_minibatches": 1, "max_new_tokens": 8,
       "checkpoint_every": 1, "seed": 3}


def test_a_checkpoint_that_fills_the_disk_keeps_the_previous_one_and_the_run_resumes(
        disks, dataset, sft_model, reward_model, tiny_cfg, tmp_path):
    disk = disks.mount("ckpts", 256 * 1024)
    root = disk / "run"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"name": "tiny", "cache_dir": tiny_cfg.cache_dir, "device": "cpu"},
                                      "ppo": {**PPO, "checkpoint_dir": str(root)}}))
    out = tmp_path / "policy"
    args = [sys.executable, "-m", "rlhf.cli", "ppo", "--dataset", str(dataset), "--sft", str(sft_model),
            "--reward", str(reward_model), "--out", str(out), "--params", str(params)]
    env = {**os.environ, "RLHF_TRACKING": "off", "RLHF_PROFILE": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = root / ckpt.step_name(1)
    deadline = time.monotonic() + 300
    while not (first / ckpt.MARKER).exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    # the first checkpoint is whole: stop the run and shrink the disk so that the second cannot fit
    proc.send_signal(signal.SIGSTOP)
    try:
        size = du_kib(first)
        partial = sum(du_kib(p) for p in root.glob(".tmp-step-*"))
        disks.resize(disk, used_kib(disk) + max(8, (size - partial) // 2))
    finally:
        proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=300)
    line = one_error_line(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr), 4,
                          "no space left on device writing checkpoint", str(root / ckpt.step_name(2)),
                          f"the previous checkpoint {first} is intact")
    assert ckpt.validate(first) is None, line  # whole, hashes match
    assert [p.name for p in root.iterdir()] == [first.name]  # no half-written step-000002
    assert not out.exists()

    disks.resize(disk, 256 * 1024)  # space again: the same command resumes from that checkpoint
    again = run_cli("ppo", "--dataset", str(dataset), "--sft", str(sft_model), "--reward", str(reward_model),
                    "--out", str(out), "--params", str(params), env={k: env[k] for k in
                                                                     ("RLHF_TRACKING", "RLHF_PROFILE",
                                                                      "OMP_NUM_THREADS")})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {first}" in again.stderr


def _tracking_env(uri: str, **extra: str) -> dict[str, str]:
    return {"RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "full-disk",
            "RLHF_PARENT_RUN_ID": "", "RLHF_PIPELINE_RUN_ID": "", "KFP_RUN_ID": "", "RLHF_PROFILE": "", **extra}


def test_mlflow_database_on_a_full_disk_is_one_line_and_no_half_made_database(disks, dataset, tmp_path):
    disk = disks.mount("db", 128)  # too small for MLflow's schema
    db = disk / "mlflow.db"
    out = tmp_path / "validation"
    proc = run_cli("validate", "--dataset", str(dataset), "--out", str(out), cwd=tmp_path,
                   env=_tracking_env(f"sqlite:///{db}"))
    one_error_line(proc, 4, "no space left on device writing MLflow's database", str(db))
    assert list(disk.iterdir()) == [] and not out.exists()


def test_mlflow_artifacts_on_a_full_disk_are_a_warning_and_the_stage_output_is_whole(disks, dataset, tmp_path):
    db = tmp_path / "mlflow.db"
    work = disks.mount("work", 64)  # the working directory: MLflow's ./mlruns artifact root for SQLite
    out = tmp_path / "validation"
    proc = run_cli("validate", "--dataset", str(dataset), "--out", str(out), cwd=work,
                   env=_tracking_env(f"sqlite:///{db}", RLHF_UNSENT_DIR=str(tmp_path / "unsent")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "could not upload" in ln]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], proc.stderr[-3000:]
    assert (out / "manifest.json").exists() and (out / "report.html").exists()


def test_a_read_only_disk_under_the_output_or_the_tracking_database_is_one_line(disks, dataset, demo_raw, tmp_path):
    ro = disks.mount("ro", 64, read_only=True)
    proc = run_cli("prepare", "--raw", str(demo_raw), "--out", str(ro / "dataset"), cwd=tmp_path)
    one_error_line(proc, 2, f"cannot write the output {ro / 'dataset'}", "Read-only file system")
    proc = run_cli("validate", "--dataset", str(dataset), "--out", str(tmp_path / "validation"), cwd=tmp_path,
                   env=_tracking_env(f"sqlite:///{ro / 'mlflow.db'}"))
    one_error_line(proc, 2, "MLFLOW_TRACKING_URI", f"{ro} is not writable", "sqlite:///mlflow.db")
    assert not (tmp_path / "validation").exists()
