"""A real ``mlflow server`` on loopback, used over HTTP: SQLite backend, then PostgreSQL.

The server runs as a subprocess in its own process group, with a local artifact root served
through the server (``--serve-artifacts``: clients never touch the artifact directory). At the
end the whole group is stopped (SIGTERM, then SIGKILL) and the test asserts that no process of
it is left: the uvicorn worker and the job-runner/huey consumers included.

PostgreSQL: the Debian ``postgresql`` package's binaries (``.ci/run`` installs them) start a
throw-away cluster on loopback as the ``postgres`` user; ``psycopg2-binary`` is the driver.
Without them the test is skipped locally, and fails where ``RLHF_REQUIRE_POSTGRES=1`` (CI).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from test_registry import make_evaluation, make_policy, make_reward, one_torch_thread  # noqa: F401 (autouse)

from rlhf.config import EvaluateConfig, ModelConfig, RegisterConfig, RewardConfig, SFTConfig
from rlhf.mlops import registry, tracking
from rlhf.train import models

PG_PASSWORD = "pg-Secret-Passw0rd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes(pgid: int, marker: str) -> list[tuple[int, str, str]]:
    """Live processes in the group/session ``pgid`` or whose environment mentions ``marker``."""
    found = []
    for d in glob.glob("/proc/[0-9]*"):
        pid = int(d.rsplit("/", 1)[1])
        if pid == os.getpid():
            continue
        try:
            stat = Path(d, "stat").read_text()
            state, _ppid, pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
            if state == "Z":
                continue
            env = Path(d, "environ").read_bytes()
            cmd = Path(d, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if int(pgrp) == pgid or int(session) == pgid or marker.encode() in env:
            found.append((pid, state, cmd[:200]))
    return found


class MlflowServer:
    """``mlflow server`` in its own process group; ``stop()`` ends the group and reports leftovers."""

    def __init__(self, backend_uri: str, root: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None):
        self.backend_uri, self.root, self.args = backend_uri, root, list(args or [])
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.artifacts = root / "artifacts"
        self.env = {**os.environ, **(env or {})}
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", tracking.ENV_PARENT, tracking.ENV_PIPELINE):
            self.env.pop(k, None)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
               "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", *self.args]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if urllib.request.urlopen(self.url + "/health", timeout=2).read().strip() == b"OK":
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not answer within {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def processes(self) -> list[tuple[int, str, str]]:
        return _processes(self.proc.pid, str(self.root)) if self.proc else []

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash, not a shutdown); ``start()`` brings it back on the same port."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, grace: float = 20) -> list[tuple[int, str, str]]:
        """SIGTERM the group, SIGKILL what is left after ``grace`` seconds; return survivors (should be [])."""
        if self.proc is None:
            return []
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the leader
                if not self.processes():
                    break
                time.sleep(0.2)
            if not self.processes():
                break
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return self.processes()


@pytest.fixture
def tracking_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for k in ("RLHF_TRACKING", tracking.ENV_PARENT, tracking.ENV_PIPELINE, "KFP_RUN_ID", "RLHF_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(tracking.ENV_DATA_HASH, "feedfacefeedfacefeedfacefeedface.dir")
    return monkeypatch


def _runs_by_stage(client, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], max_results=500):
        out.setdefault(run.data.tags.get("stage") or run.data.tags.get("rlhf.role"), []).append(run)
    return out


# ----------------------------------------------------------------------------- SQLite backend


@pytest.mark.slow
def test_tiny_pipeline_over_http_with_sqlite_backend(dataset, tmp_path, tracking_env):
    import mlflow
    import mlflow.transformers

    from rlhf.evaluate import evaluate
    from rlhf.train.reward import train_reward
    from rlhf.train.sft import train_sft

    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root).start()
    try:
        tracking_env.setenv("MLFLOW_TRACKING_URI", server.url)
        tracking_env.setenv("MLFLOW_EXPERIMENT_NAME", "server-sqlite")
        pids_while_running = server.processes()
        mc = ModelConfig(name="tiny", cache_dir=str(tmp_path / "cache"), device="cpu")
        cfg = RegisterConfig(cache_dir=str(tmp_path / "champions"))
        ev_cfg = EvaluateConfig(n_prompts=4, max_new_tokens=8, batch_size=4)
        sft, reward = tmp_path / "sft", tmp_path / "reward"

        # pipeline run 1: sft -> reward -> evaluate -> register (first champion)
        with tracking.pipeline_run("server-run-1") as parent:
            train_sft(dataset, sft, SFTConfig(max_steps=3, batch_size=8, max_seq_len=64, eval_max_rows=8,
                                              log_every=1), mc)
            train_reward(dataset, sft, reward, RewardConfig(max_steps=2, batch_size=8, max_seq_len=64,
                                                            eval_max_rows=8, gold_pairs=8), mc)
            evaluate(dataset, sft, sft, reward, tmp_path / "eval-1", ev_cfg, mc)
            r1 = registry.register(sft, reward, tmp_path / "eval-1", cfg)
        assert (r1["version"], r1["promoted"], r1["aliases"]) == (1, True, ["challenger", "champion"])

        # pipeline runs 2 and 3: a new candidate each, evaluated against the champion fetched from the
        # server. The margin makes the gate's outcome certain: run 2 passes (champion moves), run 3 not.
        for run_id, seed, margin in (("server-run-2", 11, -1e6), ("server-run-3", 12, 1e6)):
            champion = registry.champion_dir(cfg)
            with tracking.pipeline_run(run_id):
                cand = make_policy(tmp_path / f"cand-{seed}", sft, seed=seed, dataset=dataset)
                evaluate(dataset, cand, sft, reward, tmp_path / f"eval-{run_id}",
                         ev_cfg.model_copy(update={"gate_margin": margin}), mc, champion=champion)
                last = registry.register(cand, reward, tmp_path / f"eval-{run_id}", cfg)
            if run_id == "server-run-2":
                assert (last["version"], last["promoted"], last["champion"]) == (2, True, 2), last
            else:
                assert (last["version"], last["promoted"], last["champion"]) == (3, False, 2), last
                assert "beats_champion failed" in last["decision"]
        again = registry.register(cand, reward, tmp_path / "eval-server-run-3", cfg, pipeline_run_id="server-run-3")
        assert (again["version"], again["created"]) == (3, False)  # a retry creates nothing

        client = mlflow.MlflowClient(server.url)
        runs = _runs_by_stage(client, "server-sqlite")
        assert len(runs["pipeline"]) == 3 and {len(runs[s]) for s in ("sft", "reward")} == {1}
        for stage in ("sft", "reward", "evaluate", "register"):
            first = [r for r in runs[stage] if r.data.tags.get("pipeline_run_id") == "server-run-1"]
            assert first and first[0].data.tags["mlflow.parentRunId"] == parent.run_id, stage
            assert first[0].info.status == "FINISHED"
        sft_run = runs["sft"][0]
        assert [m.step for m in client.get_metric_history(sft_run.info.run_id, "loss")] == [1, 2, 3]
        assert sft_run.data.tags["data_hash"] == "feedfacefeedfacefeedfacefeedface.dir"
        # artifacts went through the server into its artifact root
        ev_run = next(r for r in runs["evaluate"] if r.data.tags["pipeline_run_id"] == "server-run-1")
        assert "evaluation/report.html" in {f.path for f in client.list_artifacts(ev_run.info.run_id, "evaluation")}
        assert list(server.artifacts.rglob("report.html")) and list(server.artifacts.rglob("model.safetensors"))
        assert not (tmp_path / "mlruns").exists()  # nothing written client-side

        # serving: load @champion over HTTP and generate
        pipe = mlflow.transformers.load_model(f"models:/{cfg.model_name}@champion")
        text = pipe(models.chat_prompt(pipe.tokenizer, "Any advice on baking bread?"), max_new_tokens=12,
                    do_sample=False, return_full_text=False)[0]["generated_text"]
        assert isinstance(text, str)
        completion = registry.generate("Any advice on baking bread?", cfg, max_new_tokens=12)
        assert isinstance(completion, str) and completion.strip(), completion
        rows = registry.list_versions(cfg)
        assert [(r["version"], r["aliases"]) for r in rows] == [(3, ["challenger"]), (2, ["champion"]), (1, [])]
        assert pids_while_running and len(pids_while_running) >= 2  # the CLI process and its uvicorn worker
    finally:
        leftovers = server.stop()
    assert leftovers == [], f"server processes left running: {leftovers}"
    assert server.proc.returncode is not None


@pytest.mark.slow
def test_server_killed_mid_run_training_goes_on_and_no_metric_is_lost(tmp_path, tracking_env, caplog, capfd):
    """The server is killed twice while a stage logs: once it comes back (what was kept is resent), once for good
    (the stage still ends within seconds; what the server does not have is in mlflow-unsent/, nothing else)."""
    import mlflow

    caplog.set_level(logging.INFO, logger="rlhf")
    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root).start()
    tracking_env.setenv("MLFLOW_TRACKING_URI", server.url)
    tracking_env.setenv("MLFLOW_EXPERIMENT_NAME", "server-killed")
    tracking_env.setattr(tracking, "RETRY_SECONDS", 1.0)  # resend kept metrics every second, not every 30
    slowest, step = 0.0, 0

    def train(n: int, until=None) -> None:  # n steps, or until ``until()`` holds
        nonlocal slowest, step
        deadline = time.monotonic() + 120
        while (n > 0) if until is None else not until():
            assert time.monotonic() < deadline
            step, n = step + 1, n - 1
            t0 = time.monotonic()
            t.log_metrics({"loss": 1.0 / step, "reward": float(step)}, step=step)
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.1)

    try:
        with tracking.stage_run("ppo") as t:
            run_id = t.run_id
            train(10)
            server.kill()  # outage 1: the server comes back
            train(0, until=lambda: "training goes on" in caplog.text)
            train(5)
            server.start()
            train(0, until=lambda: "stores metrics again" in caplog.text)
            train(3)
            assert t.flush() is None and t.pending == 0  # everything kept during outage 1 went out
            stored_before = step
            server.kill()  # outage 2: gone for good; the stage ends while it lasts
            train(10)
            killed_at = time.monotonic()
        closed_in = time.monotonic() - killed_at
        assert slowest < 1.0, slowest  # no log call waited for the network
        assert closed_in < 60, closed_in  # about 15 s: one request's retries, then marking the run terminated
        server.start()  # to read what it kept
        client = mlflow.MlflowClient(server.url)
        on_server = {m.step for m in client.get_metric_history(run_id, "loss")}
        assert {m.step for m in client.get_metric_history(run_id, "reward")} == on_server
        assert client.get_run(run_id).info.status == "RUNNING"  # it could not be marked FINISHED
    finally:
        leftovers = server.stop()
    assert leftovers == [], f"server processes left running: {leftovers}"
    saved = [json.loads(x) for x in (tmp_path / "mlflow-unsent" / f"{run_id}.jsonl").read_text().splitlines()]
    unsent = {r["step"] for r in saved if r["key"] == "loss"}
    assert set(range(1, stored_before + 1)) <= on_server  # outage 1 cost nothing
    assert unsent and unsent.isdisjoint(on_server) and unsent | on_server == set(range(1, step + 1))
    assert len(saved) == 2 * len(unsent)  # loss and reward of each step, each once
    assert f"could not mark run {run_id} as FINISHED" in caplog.text
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err + caplog.text


# ----------------------------------------------------------------------------- PostgreSQL backend


def _pg_bindir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
        if out and Path(out, "initdb").exists():
            return Path(out)
    except OSError:
        pass
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL cluster on loopback; yields the SQLAlchemy URI of database 'mlflow'."""
    bindir = _pg_bindir()
    missing = []
    if bindir is None:
        missing.append("PostgreSQL server binaries (apt-get install postgresql)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        missing.append("psycopg2 (pip install psycopg2-binary)")
    if missing:
        msg = "PostgreSQL backend test needs " + " and ".join(missing)
        if os.environ.get("RLHF_REQUIRE_POSTGRES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    as_user: list[str] = []
    d = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))  # not under pytest's 0700 tmp: the postgres user reads it
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(d, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()

    def pg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120, check=check)

    try:
        pg(str(bindir / "initdb"), "-D", str(d / "data"), "-A", "trust", "-U", "mlflow", "-E", "UTF8", "--no-sync")
        pg(str(bindir / "pg_ctl"), "-D", str(d / "data"), "-l", str(d / "postgres.log"), "-w", "-t", "60", "-o",
           f"-p {port} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off", "start")
        pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql+psycopg2://mlflow:{PG_PASSWORD}@127.0.0.1:{port}/mlflow"
    except subprocess.CalledProcessError as e:
        pytest.fail(f"could not start PostgreSQL: {e.cmd[-1]}: {e.stderr or e.stdout}")
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(d / "data"), "-m", "fast", "-w", "stop", check=False)
        assert not (d / "data" / "postmaster.pid").exists(), "PostgreSQL did not stop"
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_registry_over_http_with_postgres_backend(postgres, dataset, tmp_path, tracking_env):
    import mlflow
    import mlflow.transformers

    from rlhf.data.prepare import dataset_texts

    root = tmp_path / "server"
    root.mkdir()
    # the job runner is not needed here; without it the server starts faster
    server = MlflowServer(postgres, root, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}).start()
    try:
        tracking_env.setenv("MLFLOW_TRACKING_URI", server.url)
        tracking_env.setenv("MLFLOW_EXPERIMENT_NAME", "server-postgres")
        base = Path(models.resolve_base(ModelConfig(name="tiny", cache_dir=str(tmp_path / "cache")),
                                        dataset_texts(dataset)))
        reward = make_reward(tmp_path / "reward", base)
        cfg = RegisterConfig(cache_dir=str(tmp_path / "champions"), model_name="pg-policy",
                             reward_model_name="pg-reward")
        pol1 = make_policy(tmp_path / "p1", base, seed=1, dataset=dataset)
        make_evaluation(tmp_path / "e1", pol1, base, reward, gold=1.0)
        with tracking.pipeline_run("pg-run-1", config={"db_uri": postgres}):
            r1 = registry.register(pol1, reward, tmp_path / "e1", cfg)
        assert (r1["version"], r1["promoted"]) == (1, True)
        pol2 = make_policy(tmp_path / "p2", base, seed=2, dataset=dataset)
        make_evaluation(tmp_path / "e2", pol2, base, reward, gold=0.5, champion=registry.champion_dir(cfg),
                        champion_gold=1.0)
        with tracking.pipeline_run("pg-run-2"):
            r2 = registry.register(pol2, reward, tmp_path / "e2", cfg)
            r2_retry = registry.register(pol2, reward, tmp_path / "e2", cfg)
        assert (r2["version"], r2["promoted"], r2["champion"]) == (2, False, 1)
        assert (r2_retry["version"], r2_retry["created"]) == (2, False)
        pipe = mlflow.transformers.load_model(f"models:/{cfg.model_name}@champion")
        assert isinstance(pipe("Any advice on baking bread?", max_new_tokens=6)[0]["generated_text"], str)
        client = mlflow.MlflowClient(server.url)
        exp = client.get_experiment_by_name("server-postgres")
        blobs = [[r.data.params, r.data.tags] for r in client.search_runs([exp.experiment_id])]
        blobs += [mv.tags for mv in client.search_model_versions(f"name='{cfg.model_name}'")]
        text = json.dumps(blobs)
        assert PG_PASSWORD not in text and "postgresql+psycopg2://***@127.0.0.1" in text
    finally:
        leftovers = server.stop()
    assert leftovers == [], f"server processes left running: {leftovers}"
