"""`rlhf run`: the whole KFP pipeline through the KFP local runner, as a user runs it.

One full run (tiny profile with a few steps per stage, from a test params file) and one run that
validation stops before SFT. Tracking is off (MLflow has its own tests); OMP_NUM_THREADS=1 keeps
the tiny model fast on a busy 2-core machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli

ENV = {"RLHF_TRACKING": "off", "RLHF_PROFILE": "", "OMP_NUM_THREADS": "1"}
STAGES = ["prepare", "validate", "sft", "reward", "ppo", "evaluate", "register"]


def quick_params(tmp_path: Path) -> Path:
    """params.yaml with its tiny profile cut down to a few steps per stage and a gate that passes."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["profile"] = "tiny"
    tiny = data.setdefault("profiles", {}).setdefault("tiny", {})
    tiny.setdefault("sft", {}).update(max_steps=12, eval_max_rows=16)
    tiny.setdefault("reward", {}).update(max_steps=12, eval_max_rows=32, gold_pairs=32)
    tiny.setdefault("ppo", {}).update(total_steps=3, rollout_batch_size=8, ppo_epochs=1, max_new_tokens=12,
                                      checkpoint_every=0)
    tiny.setdefault("evaluate", {}).update(n_prompts=8, max_new_tokens=12, gate_margin=-100.0, kl_budget=1e6)
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@pytest.mark.slow
def test_rlhf_run_executes_the_whole_dag(demo_raw, tmp_path):
    params = quick_params(tmp_path)
    res = run_cli("run", "--raw", str(demo_raw), "--params", str(params), "--runs-dir", str(tmp_path / "runs"),
                  "-p", "ppo_total_steps=2", env=ENV, timeout=900)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    started = re.findall(r"^\[\d\d:\d\d\] (\w+) +started$", out, re.M)
    finished = re.findall(r"^\[\d\d:\d\d\] (\w+) +finished in [\d.]+ s$", out, re.M)
    assert started == STAGES and finished == STAGES, out
    assert "[ppo] step 2/2" in out, "the stages' progress lines are shown; the knob -p ppo_total_steps=2 applied"
    assert "Executing task" not in out and "executor_input" not in out, "KFP's own log goes to the log files"
    assert "gate      PASSED" in out and "registry " in out and "MLflow    off" in out

    run_dir = Path(re.search(r"run directory (\S+)$", out, re.M).group(1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["gate"]["passed"] is True
    for link, kind in (("dataset", "dataset"), ("sft", "policy"), ("reward", "reward-model"), ("ppo", "policy"),
                       ("evaluation", "evaluation")):
        assert json.loads((run_dir / link / "manifest.json").read_text())["kind"] == kind, link
    assert (run_dir / "evaluation" / "report.html").exists() and f"{run_dir / 'evaluation' / 'report.html'}" in out
    assert json.loads((run_dir / "registration" / "registration.json").read_text())["registered"] is False
    assert (run_dir / "logs" / "sft.log").read_text().count("[sft] step") >= 2
    ppo_cfg = json.loads((run_dir / "ppo" / "manifest.json").read_text())["config"]
    assert ppo_cfg["total_steps"] == 2 and ppo_cfg["rollout_batch_size"] == 8, "params file + knob reached PPO"


def test_failed_validation_stops_before_sft(demo_raw, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in ("sft", "preferences", "prompts"):
        lines = (demo_raw / f"{f}.jsonl").read_text().splitlines()[:12]
        (raw / f"{f}.jsonl").write_text("\n".join(lines) + "\n")
    res = run_cli("run", "--raw", str(raw), "--params", str(ROOT / "params.yaml"), "--runs-dir",
                  str(tmp_path / "runs"), env=ENV, timeout=600)
    assert res.returncode == 3, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "validate failed: data validation failed" in errors[0], res.stderr
    assert "at least 50 train rows" in errors[0] and "Traceback" not in res.stderr
    assert "validate  FAILED" in res.stdout
    assert "sft       started" not in res.stdout and "Pipeline finished" not in res.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "sft").exists()
    assert (run_dir / "validation" / "report.md").exists(), "the validation report is kept for the user"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"


def test_missing_raw_data_is_one_line(tmp_path):
    res = run_cli("run", "--raw", str(tmp_path / "nope"), "--runs-dir", str(tmp_path / "runs"), env=ENV)
    assert res.returncode == 2 and "raw data not found" in res.stderr and "make data" in res.stderr
    assert "Traceback" not in res.stderr
