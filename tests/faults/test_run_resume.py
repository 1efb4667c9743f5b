"""SIGKILL of the whole `rlhf run` process group while the reward model trains, then `rlhf run --resume`.

The resumed run reuses the stages the killed attempt finished (prepare, validate, sft: their outputs
are whole and were made from the same inputs and config), resumes the reward model from its last
checkpoint, runs the rest, registers once; no MLflow run is left RUNNING, and the killed attempt
registered nothing. The reward model it ends with is bit-identical to the one of the uninterrupted
run of the same configuration (the shared ``local_run`` fixture: same params, knob and data).
"""

from __future__ import annotations

import json
import random
import re
import time

from conftest import quick_params, run_cli

from faults.conftest import Watched
from rlhf.io import sha256_file

CHECKPOINT_EVERY = 3  # the quick profile's reward model trains 12 steps: checkpoints after 3, 6 and 9


def _env(root) -> dict[str, str]:
    env = {"RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "MLFLOW_EXPERIMENT_NAME": "faults", "RLHF_CACHE": str(root / ".cache"), "OMP_NUM_THREADS": "1"}
    for k in ("RLHF_PROFILE", "RLHF_DATA_HASH", "RLHF_PARENT_RUN_ID", "RLHF_PIPELINE_RUN_ID", "KFP_RUN_ID",
              "RLHF_LOCAL_RUN", "RLHF_REUSE_ROOT"):
        env[k] = ""
    return env


def test_sigkill_of_rlhf_run_then_resume_reuses_the_finished_stages(demo_raw, local_run, tmp_path):
    import mlflow

    root = tmp_path / "project"
    root.mkdir()
    quick_params(root)
    env = _env(root)
    args = ["run", "--raw", str(demo_raw), "--params", "params.yaml", "--runs-dir", "runs", *local_run.args,
            "--set", f"reward.checkpoint_every={CHECKPOINT_EVERY}"]
    kill_at = random.Random("fault-run").choice([3, 6, 9])

    first = Watched(args, tmp_path / "first.log", cwd=root, env=env)
    deadline = time.monotonic() + 900
    while not list(root.glob(f"runs/*/kfp/*/reward/model.checkpoints/step-{kill_at:06d}/COMPLETE")):
        assert first.proc.poll() is None, first.output[-3000:]
        assert time.monotonic() < deadline, "no reward checkpoint after 900 s:\n" + first.output[-3000:]
        time.sleep(0.05)
    assert first.kill_group() == -9
    assert "reward    finished" not in first.output, "killed while the reward model trained"

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.search_model_versions("") == [], "the killed run registered nothing"

    r = run_cli(*args[:1], "--resume", *args[1:], cwd=root, env=env, timeout=900)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert re.findall(r"^\[\d\d:\d\d\] (\w+) +reused \(finished by an earlier attempt\)$", out, re.M) == \
        ["prepare", "validate", "sft"], out
    m = re.search(r"^\[\d\d:\d\d\] reward +finished in [\d.]+ s, resumed from its step (\d+) checkpoint$", out, re.M)
    assert m and kill_at <= int(m.group(1)) < 12, out
    for stage in ("ppo", "evaluate", "register"):
        assert re.search(rf"^\[\d\d:\d\d\] {stage} +finished in", out, re.M), out
    assert "resumed   reused from an earlier attempt: prepare, validate, sft" in out
    assert "registry  rlhf-policy v1 (challenger, champion): first champion" in out

    run_dirs = list((root / "runs").iterdir())
    assert len(run_dirs) == 1, "the resumed run continues in the killed run's directory"
    run_dir = run_dirs[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["resumed"] is True
    assert summary["reused"] == ["prepare", "validate", "sft"] and summary["gate"]["passed"] is True
    assert not (run_dir / "rlhf-run.json").exists()

    exp = client.get_experiment_by_name("faults")
    runs = client.search_runs([exp.experiment_id])
    states = sorted((r.info.run_name, r.info.status) for r in runs)
    assert "RUNNING" not in {s for _, s in states}, states
    parents = [r for r in runs if r.info.run_name.startswith("pipeline")]
    assert [p.info.status for p in parents] == ["FINISHED"], states  # one parent: the killed attempt's, reopened
    reward_runs = sorted(r.info.status for r in runs if "reward" in r.info.run_name)
    assert reward_runs == ["FINISHED", "KILLED"], states  # the killed attempt's reward run was ended KILLED
    versions = client.search_model_versions("name = 'rlhf-policy'")
    assert [str(v.version) for v in versions] == ["1"], "one version: the resumed run's"

    # the resumed reward model is the uninterrupted run's, bit for bit
    ref_dir = local_run.root / re.search(r"run directory (\S+)$", local_run.result.stdout, re.M).group(1)
    assert local_run.result.returncode == 0
    assert sha256_file(run_dir / "reward" / "model.safetensors") == sha256_file(ref_dir / "reward" / "model.safetensors")
    assert not list(run_dir.glob("kfp/*/reward/model.checkpoints")), "checkpoints removed after success"
    jobs = sorted(p for p in (run_dir / "kfp").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2, jobs  # two attempts in one run directory; its links point at the latest one's outputs
    assert (run_dir / "sft").resolve().is_relative_to(jobs[-1].resolve())
