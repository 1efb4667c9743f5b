"""SFT and the reward model under torchrun (2 gloo processes on CPU): DDP gives the weights of one process
on the same global batch (within float tolerance), only rank 0 writes and tracks, and a pipeline
step with 2 GPUs runs its stage as ``torchrun --standalone --nproc-per-node 2``."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli
from safetensors.torch import load_file

SFT = {"max_steps": 3, "grad_accum": 2, "lr": 3e-3, "eval_max_rows": 8, "max_seq_len": 96, "seed": 5}
REWARD = {"max_steps": 3, "grad_accum": 2, "lr": 3e-3, "eval_max_rows": 8, "gold_pairs": 0, "max_seq_len": 96,
          "seed": 5}


def _env(**extra) -> dict[str, str]:
    env = {**os.environ, "RLHF_TRACKING": "off", "RLHF_PROFILE": "", "OMP_NUM_THREADS": "1",
           "RLHF_DIST_BACKEND": "gloo", **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _params(tmp_path: Path, tiny_cfg, name: str, section: str, values: dict) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"model": {"name": "tiny", "cache_dir": tiny_cfg.cache_dir, "device": "cpu"},
                                 section: values}))
    return p


def _torchrun(args: list[str], logs: Path, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3", "-m", "rlhf.cli", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=900)
    rank_logs = {p.parent.name: p.read_text()[-3000:] for p in logs.rglob("stderr.log")}
    assert r.returncode == 0, (r.stderr[-2000:], rank_logs)
    return r


def _assert_same_weights(a: Path, b: Path, tol: float = 2e-4) -> None:
    """Equal within float tolerance: reduction order differs, and AdamW (eps 1e-8) amplifies the rounding
    of near-zero gradients; a per-step update here is ~lr = 3e-3."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb)
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst <= tol, worst


def _trained(out: Path, base: Path) -> bool:
    wa, wb = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    return any(float((wa[k].float() - wb[k].float()).abs().max()) > 1e-4 for k in wa if k in wb)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_two_ranks_match_one_process_on_the_same_global_batch(stage, dataset, sft_model, tiny_cfg, tmp_path):
    section, base = (SFT, "sft") if stage == "sft" else (REWARD, "reward")
    one = _params(tmp_path, tiny_cfg, "one", base, {**section, "batch_size": 8})
    two = _params(tmp_path, tiny_cfg, "two", base, {**section, "batch_size": 4})  # per rank: 2 x 4 = 8
    inputs = ["--dataset", str(dataset)] + (["--sft", str(sft_model)] if stage == "reward" else [])
    single, ddp = tmp_path / "single", tmp_path / "work" / "ddp"
    r = run_cli(stage, *inputs, "--out", str(single), "--params", str(one), env=_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    db = tmp_path / "mlflow.db"
    _torchrun([stage, *inputs, "--out", str(ddp), "--params", str(two)], tmp_path / "logs",
              _env(RLHF_TRACKING="on", MLFLOW_TRACKING_URI=f"sqlite:///{db}", MLFLOW_EXPERIMENT_NAME="ddp"))

    _assert_same_weights(single, ddp)
    assert _trained(ddp, sft_model)  # it did train: the weights are not trivially equal
    a = json.loads((single / "manifest.json").read_text())["metrics"]
    b = json.loads((ddp / "manifest.json").read_text())["metrics"]
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert abs(a["train_loss"] - b["train_loss"]) <= 1e-4 * max(1.0, abs(a["train_loss"]))
    # rank 0 alone wrote the output and tracked one MLflow run
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["ddp"]
    with sqlite3.connect(db) as con:
        assert con.execute("select name from runs").fetchall() == [(stage,)]


def test_pipeline_step_with_two_gpus_runs_torchrun(dataset, sft_model, tiny_cfg, tmp_path, monkeypatch):
    """steps.run_component with gpus=2 re-launches the stage under torchrun with the step's resolved config."""
    from rlhf.pipeline import steps

    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    params = yaml.safe_dump({"model": {"name": "tiny", "cache_dir": tiny_cfg.cache_dir, "device": "cpu"},
                             "sft": {**SFT, "batch_size": 4, "max_steps": 1}})
    out = tmp_path / "step-out"
    result = steps.run_component("sft", inputs={"dataset": str(dataset)}, out=str(out), params_yaml=params,
                                 knobs={"sft_max_steps": 2}, gpus="2")
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["world_size"] == 2 and result["world_size"] == 2
    assert m["metrics"]["steps"] == 2  # the knob reached the torchrun processes
    assert steps.processes("sft", "2") == 2 and steps.processes("evaluate", "2") == 1
    assert steps.processes("ppo", 1) == 1
