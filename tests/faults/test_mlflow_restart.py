"""A real ``mlflow server`` killed (SIGKILL) and restarted on the same port and store while a stage logs:
every metric step ends up on the server exactly once (what the stage could not send goes to mlflow-unsent/,
``rlhf tracking flush`` sends it), and a register retried across the outage creates no second version."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import yaml
from conftest import run_cli
from test_mlflow_server import MlflowServer
from test_registry import make_evaluation, make_reward

STEPS = 200


def _env(server: MlflowServer, tmp_path) -> dict[str, str]:
    # no HTTP retries and a round of metric requests whenever none is in flight (not every 2 s): a refused
    # request fails at once, so the outage shows within a step of the kill however fast the steps are
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "RLHF_MLFLOW_SEND_SECONDS": "0", "RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": server.url, "MLFLOW_EXPERIMENT_NAME": "restart",
            "RLHF_UNSENT_DIR": str(tmp_path / "unsent"), "OMP_NUM_THREADS": "1", "RLHF_PROFILE": "",
            "RLHF_PARENT_RUN_ID": "", "RLHF_PIPELINE_RUN_ID": "", "KFP_RUN_ID": "",
            "RLHF_DATA_HASH": "feedfacefeedfacefeedfacefeedface.dir"}


def _wait(cond, what: str, proc=None, log=None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the stage ended before {what}:\n{log.read_text()[-3000:] if log else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_server_killed_and_restarted_mid_run_no_metric_lost_or_doubled_no_second_version(
        dataset, tiny_cfg, tmp_path):
    import mlflow

    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root).start()
    proc = None
    try:
        env = _env(server, tmp_path)
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({
            "model": {"name": "tiny", "cache_dir": tiny_cfg.cache_dir, "device": "cpu"},
            "sft": {"max_steps": STEPS, "batch_size": 4, "max_seq_len": 64, "eval_max_rows": 8, "log_every": 1}}))
        sft = tmp_path / "sft"
        log = tmp_path / "sft.log"
        full_env = {**os.environ, **env, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "sft", "--dataset", str(dataset), "--out",
                                     str(sft), "--params", str(params)], cwd=tmp_path, env=full_env, stdout=f,
                                    stderr=subprocess.STDOUT)
        client = mlflow.MlflowClient(server.url)

        def run_id() -> str | None:
            exp = client.get_experiment_by_name("restart")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return runs[0].info.run_id if runs else None

        _wait(lambda: run_id() and len(client.get_metric_history(run_id(), "loss")) >= 3, "3 steps on the server",
              proc, log)
        rid = run_id()
        # the stage is held (SIGSTOP) while the server is killed and while it starts again, so that both happen
        # mid-run however fast this machine trains; in between it trains and meets the outage
        proc.send_signal(signal.SIGSTOP)
        server.kill()  # a crash mid-run
        proc.send_signal(signal.SIGCONT)
        _wait(lambda: "MLflow did not store metrics" in log.read_text(), "the outage warning", proc, log)
        proc.send_signal(signal.SIGSTOP)
        try:
            before_restart = max(int(m) for m in re.findall(r"\[sft\] step (\d+)/", log.read_text()))
            server.start()  # same port, same store
        finally:
            proc.send_signal(signal.SIGCONT)
        assert before_restart < STEPS  # training went on after the server was back
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "Traceback" not in text
        last = max(int(m) for m in re.findall(r"\[sft\] step (\d+)/", text))
        assert last == STEPS

        flush = run_cli("tracking", "flush", cwd=tmp_path, env=env, timeout=300)
        assert flush.returncode == 0, flush.stderr[-2000:]
        assert not list((tmp_path / "unsent").glob("*.jsonl"))  # all sent: nothing kept
        for key in ("loss", "grad_norm", "lr"):
            steps = sorted(m.step for m in client.get_metric_history(rid, key))
            assert steps == list(range(1, STEPS + 1)), (key, len(steps), sorted(set(range(1, STEPS + 1)) - set(steps)))
        again = run_cli("tracking", "flush", cwd=tmp_path, env=env, timeout=300)
        assert again.returncode == 0 and "sent 0 value(s)" in again.stdout
        assert len(client.get_metric_history(rid, "loss")) == STEPS  # a second flush sends nothing twice

        # register, then the server dies: a register attempt fails in one line; after the restart the retry
        # finds the version of this pipeline run and creates none
        reward = make_reward(tmp_path / "reward", sft)
        evaluation = tmp_path / "evaluation"
        make_evaluation(evaluation, sft, sft, reward, gold=1.0)
        reg = ["register", "--policy", str(sft), "--reward", str(reward), "--evaluation", str(evaluation),
               "--pipeline-run-id", "restart-run-1"]
        first = run_cli(*reg, "--out", str(tmp_path / "receipt-1.json"), cwd=tmp_path, env=env, timeout=600)
        assert first.returncode == 0, first.stderr[-3000:]
        assert json.loads((tmp_path / "receipt-1.json").read_text())["version"] == 1
        server.kill()
        # (run_cli's timeout bounds the wait: the reachability check takes 5 s, MLflow's own retries minutes)
        down = run_cli(*reg, "--out", str(tmp_path / "receipt-2.json"), cwd=tmp_path, env=env, timeout=120)
        errors = [ln for ln in down.stderr.splitlines() if ln.startswith("error:")]
        assert down.returncode == 2 and len(errors) == 1 and "unreachable" in errors[0], down.stderr[-3000:]
        assert "Traceback" not in down.stderr and not (tmp_path / "receipt-2.json").exists()
        server.start()
        retry = run_cli(*reg, "--out", str(tmp_path / "receipt-2.json"), cwd=tmp_path, env=env, timeout=600)
        assert retry.returncode == 0, retry.stderr[-3000:]
        receipt = json.loads((tmp_path / "receipt-2.json").read_text())
        assert (receipt["version"], receipt["created"]) == (1, False)
        versions = client.search_model_versions(f"name = '{receipt['model_name']}'")
        assert [int(v.version) for v in versions] == [1]
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        leftovers = server.stop()
    assert leftovers == [], f"server processes left running: {leftovers}"
