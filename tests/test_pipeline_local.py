"""`rlhf run`: the whole KFP pipeline through the KFP local runner, as a user runs it.

One full run (the session fixture ``local_run``: tiny profile with a few steps per stage from a
test params file, in a DVC project with MLflow on a SQLite file, so it registers the first
champion; test_retrain continues from it) and one run that validation stops before SFT (tracking
off). OMP_NUM_THREADS=1 keeps the tiny model fast on a busy 2-core machine.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT, run_cli

ENV = {"RLHF_TRACKING": "off", "RLHF_PROFILE": "", "OMP_NUM_THREADS": "1"}
STAGES = ["prepare", "validate", "sft", "reward", "ppo", "evaluate", "register"]


@pytest.mark.slow
def test_rlhf_run_executes_the_whole_dag(local_run):
    res = local_run.result
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    started = re.findall(r"^\[\d\d:\d\d\] (\w+) +started$", out, re.M)
    finished = re.findall(r"^\[\d\d:\d\d\] (\w+) +finished in [\d.]+ s$", out, re.M)
    assert started == STAGES and finished == STAGES, out
    assert "[ppo] step 2/2" in out, "the stages' progress lines are shown; the knob -p ppo_total_steps=2 applied"
    assert "Executing task" not in out and "executor_input" not in out, "KFP's own log goes to the log files"
    assert "gate      PASSED" in out
    assert "registry  rlhf-policy v1 (challenger, champion): first champion" in out
    assert "MLflow    run " in out and str(local_run.root / "mlflow.db") in out

    run_dir = local_run.root / re.search(r"run directory (\S+)$", out, re.M).group(1)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["gate"]["passed"] is True
    times = summary["stage_times"]  # each step's own start-up / compute account reached the summary
    assert set(times) >= set(STAGES) and all(times[s]["startup"] > 0 for s in STAGES), times
    assert 0 < times["sft"]["compute"] < times["sft"]["wall"] and "compute" not in times["validate"]
    assert re.search(r"^ +sft \d+s \(start-up \d+s, compute \d+s, overhead \d+s\)$", out, re.M), out[-2000:]
    for link, kind in (("dataset", "dataset"), ("sft", "policy"), ("reward", "reward-model"), ("ppo", "policy"),
                       ("evaluation", "evaluation")):
        assert json.loads((run_dir / link / "manifest.json").read_text())["kind"] == kind, link
    assert (run_dir / "evaluation" / "report.html").exists() and "evaluation/report.html" in out
    receipt = json.loads((run_dir / "registration" / "registration.json").read_text())
    assert receipt["registered"] is True and (receipt["version"], receipt["promoted"]) == (1, True)
    data_dvc = (local_run.root / "data.dvc").read_text()
    assert receipt["data_hash"] and receipt["data_hash"] in data_dvc, "the run recorded the DVC data version"
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
