"""Honest exits: `rlhf run` stopped by SIGTERM / SIGINT / SIGKILL while a step trains (real processes, real MLflow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import quick_params


def _start(demo_raw: Path, root: Path) -> tuple[subprocess.Popen, list[str]]:
    params = quick_params(root)
    env = {**os.environ, "RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "MLFLOW_EXPERIMENT_NAME": "interrupts", "RLHF_CACHE": str(root / ".cache"), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for k in ("RLHF_PROFILE", "RLHF_PARENT_RUN_ID", "RLHF_PIPELINE_RUN_ID", "KFP_RUN_ID", "RLHF_LOCAL_RUN"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "run", "--raw", str(demo_raw), "--params", str(params),
                             "--runs-dir", str(root / "runs"), "--set", "sft.max_steps=100000"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 600
    while not any("[sft] step" in x for x in lines):
        assert proc.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, "sft did not start training:\n" + "".join(lines)
        time.sleep(0.5)
    return proc, lines


def _steps_alive(root: Path) -> list[psutil.Process]:
    """Processes of this run other than the test itself (their command lines name the run's directory)."""
    alive = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(str(root) in a for a in p.info["cmdline"] or []):
                alive.append(p)
        except psutil.Error:
            continue
    return alive


def _wait_gone(root: Path, seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while (alive := _steps_alive(root)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def _runs(root: Path) -> dict[str, str]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("interrupts")
    return {r.info.run_name: r.info.status for r in client.search_runs([exp.experiment_id])}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_step_ends_mlflow_runs_killed_and_exits_non_zero(sig, demo_raw, tmp_path):
    proc, lines = _start(demo_raw, tmp_path)
    t0 = time.monotonic()
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    time.sleep(0.5)
    out = "".join(lines)
    assert rc == 128 + sig, out
    assert time.monotonic() - t0 < 60, "the step was stopped, not waited for"
    assert f"interrupted by {signal.Signals(sig).name} during sft" in out, out
    assert f"sft       stopped ({signal.Signals(sig).name})" in out and "sft       finished" not in out, out
    assert "Traceback" not in out.split("sft       started")[0]
    assert not _wait_gone(tmp_path, 10), "no step keeps running after rlhf run exited"
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert summary["status"] == "interrupted" and "interrupted by" in summary["error"]
    assert "registration" not in summary["artifacts"]
    runs = _runs(tmp_path)
    assert "RUNNING" not in runs.values(), runs
    parent = next(s for n, s in runs.items() if n.startswith("pipeline"))
    assert parent == "KILLED", runs


def test_sigkill_of_rlhf_run_takes_the_training_step_with_it(demo_raw, tmp_path):
    proc, lines = _start(demo_raw, tmp_path)
    assert _steps_alive(tmp_path), "the sft step runs as a child process"
    proc.kill()
    proc.wait(timeout=30)
    alive = _wait_gone(tmp_path, 120)  # the step notices within a second, then ends its MLflow run
    assert not alive, [p.info["cmdline"] for p in alive]
    runs = _runs(tmp_path)
    sft = [s for n, s in runs.items() if "sft" in n]
    assert sft and "RUNNING" not in sft, runs  # the step's own MLflow run was ended by its SIGTERM
