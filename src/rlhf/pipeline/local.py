"""``rlhf run``: the whole KFP pipeline on this machine with the KFP local runner.

The pipeline is the one ``rlhf compile`` writes (``pipelines/rlhf_pipeline.py``), executed by
``kfp.local`` with ``SubprocessRunner(use_venv=False)``: every step is a subprocess of this Python,
so the installed ``rlhf`` package is used and nothing is pip-installed. Kubernetes settings (GPUs,
node selectors, ConfigMaps, ...) are ignored by the local runner; retries are compiled out (a
deterministic local error is shown at once instead of after minutes of back-off).

What you see: a line when a stage starts and when it finishes (with its duration), the stages'
own progress lines, and a summary (gate decision, key metrics, where the model and the report are,
the MLflow run). Everything the steps print goes to ``<run dir>/logs/<step>.log``; the artifacts
are under ``<run dir>/kfp/`` with a link per stage in the run directory (``<run dir>/sft`` ...).

``rlhf run --containers`` runs every step in the component image instead (KFP's ``DockerRunner``), as
on the cluster: as its user (uid 10001) on a read-only root with a tmpfs ``/tmp``, the pipeline root
and the raw data mounted at their own paths, on the host network so that MLflow is reached over
loopback only (a SQLite store is served for the run by ``mlflow server`` on 127.0.0.1, its artifacts
proxied; see :func:`_loopback_mlflow`). Same steps, same summary.

Two work-arounds for kfp 2.17's local runner, both local-only and tested:

* it cannot resolve ``dsl.OneOf`` over artifacts (the merge of the single-node and multi-node
  branches): :func:`_patch_oneof` picks the branch that ran;
* it evaluates ``dsl.If`` with ``eval``: the pipeline's conditions read only an int parameter and
  the evaluate step's own ``"passed"`` / ``"failed"`` output.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rlhf.config.resolve import params_text, resolve_profile
from rlhf.errors import ConfigError, UserError
from rlhf.pipeline.console import EXIT_CODES, Console, captured, stage_of
from rlhf.pipeline.threads import auto_threads
from rlhf.process import Interrupted, stop_children


class RunFailed(UserError):
    """A pipeline step failed; the message is the step's own error line."""

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int = 1):
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


def check_parameters(params: dict[str, Any], known: dict[str, Any]) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"unknown pipeline parameter(s): {', '.join(unknown)}",
                          hint=f"known: {', '.join(sorted(known))}")


# ---------------------------------------------------------------------------------------- kfp.local


def _patch_oneof() -> None:
    """Let kfp 2.17's local runner resolve ``dsl.OneOf`` artifact outputs (the branch that ran wins)."""
    from kfp.local.orchestrator import orchestrator_utils as ou

    cls = ou.OrchestratorUtils
    if getattr(cls, "_rlhf_oneof_patch", False):
        return

    def get_dag_output_artifacts(cls, dag_outputs_spec, io_store):
        outputs = {}
        for key, spec in dag_outputs_spec.artifacts.items():
            for sel in spec.artifact_selectors:
                try:
                    outputs[key] = io_store.get_task_output(sel.producer_subtask, sel.output_artifact_key)
                    break
                except ValueError:
                    continue
            else:
                if len(spec.artifact_selectors) == 1:  # the original behaviour: a missing output is an error
                    sel = spec.artifact_selectors[0]
                    outputs[key] = io_store.get_task_output(sel.producer_subtask, sel.output_artifact_key)
        return outputs

    cls.get_dag_output_artifacts = classmethod(get_dag_output_artifacts)
    cls._rlhf_oneof_patch = True


# ------------------------------------------------------------------------------------------ run


class StopOnSignal:
    """While active, SIGINT/SIGTERM stop the running step (and any step started after) instead of us.

    The KFP local runner waits for its worker threads, so an exception in the main thread would leave
    the step training; this stops the children, lets the runner see the failure and skip what is left,
    and records the signal for :func:`run_local` to report. A second signal kills at once.
    """

    def __init__(self, console: Console, stop: Any = None) -> None:
        self.console = console
        self.stop = stop  # what stops the steps: our children (default), or the run's containers
        self.signum = 0
        self.during: str | None = None  # the task that was running
        self._saved: dict[int, Any] = {}
        self._done = threading.Event()

    def _handle(self, signum, _frame) -> None:
        if self.signum:  # second time: no more grace
            if self.stop is None:
                stop_children(grace_s=0)
            return
        self.signum = signum
        self.during = self.console.current
        self.console.stop_reason = signal.Signals(signum).name
        threading.Thread(target=self._stop_loop, daemon=True).start()

    def _stop_loop(self) -> None:
        while not self._done.is_set():
            if self.stop is None:
                stop_children()
            else:
                with contextlib.suppress(Exception):
                    self.stop()
            self._done.wait(0.5)

    def __enter__(self) -> StopOnSignal:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for s, h in self._saved.items():
            signal.signal(s, h)


@dataclass
class RunResult:
    run_dir: Path
    status: str  # succeeded | failed
    seconds: float
    gate: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    registration: dict[str, Any] | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # per stage: wall (the step as the runner saw it), startup (process start to the stage call: interpreter,
    # imports), stage (the call), compute (the training loop, where the stage measures one), overhead (wall - compute)
    stage_times: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str = ""
    reused: list[str] = field(default_factory=list)  # stages taken from an earlier attempt (--resume)
    resumed: bool = False


def new_run_dir(runs_dir: str | Path) -> Path:
    base = Path(runs_dir) / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    path.mkdir(parents=True)
    return path


#: ``<run dir>/<LOCK>``: the process of `rlhf run` working in the directory (removed when it ends)
LOCK = "rlhf-run.json"


def resume_dir(runs_dir: str | Path, resume: str | Path | bool) -> Path:
    """The run directory ``--resume`` continues: the one given, or the newest under ``runs_dir``."""
    if resume is True or str(resume) in ("", "latest"):
        found = sorted((p for p in Path(runs_dir).glob("*") if (p / "run.json").is_file()),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        if not found:
            raise UserError(f"no run directory to resume in {runs_dir}", where="rlhf run --resume",
                            hint="start one with `rlhf run`, or name one: --run-dir runs/<run>")
        return found[0]
    path = Path(resume)
    if not (path / "run.json").is_file():
        raise UserError(f"{path} is not a run directory of `rlhf run` (no run.json)", where="rlhf run --run-dir",
                        hint="name one under runs/, or pass --resume alone for the newest")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(run_dir: Path) -> int | None:
    """The pid of a live `rlhf run` on this host that works in ``run_dir``, else None."""
    doc = _read_json(run_dir / LOCK) or {}
    pid = doc.get("pid")
    if isinstance(pid, int) and doc.get("host") == socket.gethostname() and pid != os.getpid() and _alive(pid):
        return pid
    return None


def close_abandoned(runs_dir: str | Path) -> list[str]:
    """End the MLflow runs of `rlhf run`s under ``runs_dir`` that were killed (SIGKILL, power loss): their lock
    names a process of this host that is gone. Parent and stage runs still RUNNING end ``KILLED``; returns
    their run ids. A resumed run reopens its parent."""
    from rlhf.mlops import tracking
    from rlhf.pipeline.finalize import end_running_runs

    closed: list[str] = []
    for lock in Path(runs_dir).glob(f"*/{LOCK}"):
        doc = _read_json(lock) or {}
        pid = doc.get("pid")
        if doc.get("host") != socket.gethostname() or not isinstance(pid, int) or _alive(pid):
            continue
        if tracking.enabled():
            try:
                closed += end_running_runs(f"local-{lock.parent.name}", "KILLED", include_parent=True,
                                           reason=f"rlhf run (pid {pid}) ended without closing its runs")
            except Exception as e:  # noqa: BLE001 - a clean-up; the new run is what matters
                print(f"rlhf run: could not close the MLflow runs of {lock.parent}: {e}", file=sys.stderr)
                continue
        lock.unlink(missing_ok=True)
    return closed


def _link_outputs(run_dir: Path, pipeline_root: Path) -> dict[str, Path]:
    """``<run dir>/<stage>`` -> the stage's output artifact under ``kfp/``; returns stage -> path."""
    from rlhf.pipeline.stages import STAGES

    out_names = {s.name: s.output.name for s in STAGES}
    links = {"prepare": "dataset", "validate": "validation", "sft": "sft", "reward": "reward", "ppo": "ppo",
             "evaluate": "evaluation", "register": "registration"}
    found: dict[str, Path] = {}
    for job in sorted(p for p in pipeline_root.iterdir() if p.is_dir()):
        for task_dir in sorted(p for p in job.iterdir() if p.is_dir()):
            stage = stage_of(task_dir.name)
            art = task_dir / out_names.get(stage, "")
            if stage in links and art.exists():
                found[stage] = art
    for stage, art in found.items():
        link = run_dir / links[stage]
        with contextlib.suppress(OSError):
            if link.is_symlink():
                link.unlink()
            link.symlink_to(os.path.relpath(art, run_dir), target_is_directory=True)
    return {s: run_dir / links[s] for s in found}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ containers

CONTAINER_USER = "10001:10001"  # the image's user (components/Dockerfile)
#: the environment the steps get (the subprocess steps inherit ours); paths of this machine are not passed
CONTAINER_ENV = ("RLHF_", "MLFLOW_", "OMP_", "MKL_", "HF_", "TRANSFORMERS_", "GX_", "DVC_", "TOKENIZERS_")
CONTAINER_HOME = {"HOME": "/tmp", "RLHF_CACHE": "/tmp/rlhf-cache", "HF_HOME": "/tmp/hf",
                  "MPLCONFIGDIR": "/tmp/matplotlib"}
RUN_LABEL = "io.rlhf.run"


def _docker(image: str):
    """The Docker engine, with ``image`` present (a local run pulls nothing)."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as e:
        raise UserError(f"--containers needs a Docker engine: {str(e).splitlines()[0][:200]}",
                        hint="start one (`make image` starts dockerd and builds the image)") from None
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise UserError(f"image not found: {image}", hint="build it with `make image`, or pass --image") from None
    return client


def _check_readable(raw: Path) -> None:
    """The steps run as uid 10001: the raw data must be readable by others (a private copy is not)."""
    unreadable = [p for p in (raw, *raw.rglob("*"))
                  if not p.stat().st_mode & (0o005 if p.is_dir() else 0o004)]
    if unreadable:
        raise UserError(f"--containers: the steps run as uid {CONTAINER_USER.split(':')[0]} and cannot read "
                        f"{unreadable[0]}", hint=f"chmod -R o+rX {raw}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _loopback_mlflow(run_dir: Path):
    """MLflow for the containers, over 127.0.0.1 only; yields the mounts they need.

    An http(s) tracking URI is used as it is (the steps share the host network). A SQLite store is
    served for the run by ``mlflow server`` on a free loopback port and ``MLFLOW_TRACKING_URI``
    points at it while the block runs. The experiment is made (or found) in the store first, so its
    artifacts stay where a subprocess run puts them (``./mlruns/<experiment id>``, readable later
    with the SQLite URI alone): that directory is mounted and opened for the containers' user.
    """
    from rlhf.mlops import tracking

    uri = tracking.tracking_uri()
    if not tracking.enabled() or uri.startswith(("http://", "https://")):
        yield []
        return
    if not uri.startswith("sqlite:"):
        raise ConfigError(f"--containers: MLFLOW_TRACKING_URI {uri} is neither SQLite nor http(s)",
                          hint="use a sqlite:/// store or an MLflow server")
    tracking.connect()  # the experiment, with its local artifact directory (mlflow's default for SQLite)
    mounts = _artifact_mounts(uri, tracking.experiment_name())
    port = _free_port()
    log = (run_dir / "logs").joinpath("mlflow-server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                                   "--no-serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "1"],
                                  stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        _wait_http(f"{url}/health", server, log)
        # the run's URLs would point at this server, gone after the run: the summary names the store
        os.environ.update(MLFLOW_TRACKING_URI=url, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true")
        yield mounts
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the MLflow server for the containers exited ({proc.returncode})", hint=f"log: {log}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.5)
    proc.kill()
    raise UserError(f"the MLflow server for the containers did not answer in {timeout_s:.0f} s", hint=f"log: {log}")


def _artifact_mounts(uri: str, experiment: str) -> list:
    from docker.types import Mount
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    loc = exp.artifact_location if exp is not None else ""
    if not loc or not (loc.startswith("file:") or loc.startswith("/")):
        return []
    path = Path(loc.removeprefix("file://").removeprefix("file:"))
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(path.stat().st_mode | 0o777)
    return [Mount(str(path), str(path), type="bind")]


def _docker_runner(image: str, run_dir: Path, pipeline_root: Path, raw: Path, mounts: list):
    """KFP's DockerRunner: the image's user, read-only root, tmpfs /tmp, host network, our mounts."""
    import logging

    from docker.types import Mount
    from kfp import local

    logging.getLogger("kfp.local.pip_install_manager").setLevel(logging.WARNING)  # no pip installs here
    pipeline_root.mkdir(parents=True, exist_ok=True)
    pipeline_root.chmod(0o777)  # the steps write their outputs as uid 10001
    env = {k: v for k, v in os.environ.items() if k.startswith(CONTAINER_ENV) and k != "RLHF_LOCAL_RUN"}
    env.update(CONTAINER_HOME)
    raw = raw.resolve()
    return local.DockerRunner(
        user=CONTAINER_USER, read_only=True, tmpfs={"/tmp": "rw,exec"}, network_mode="host", shm_size="1g",
        environment=env, labels={RUN_LABEL: run_dir.name},
        mounts=[Mount(str(raw), str(raw), type="bind", read_only=True), *mounts])


def _stop_containers(client, run_dir: Path) -> None:
    for c in client.containers.list(filters={"label": f"{RUN_LABEL}={run_dir.name}"}):
        with contextlib.suppress(Exception):
            c.kill()


def run_local(*, raw: str | Path = "data/raw", params: str | Path = "params.yaml", profile: str | None = None,
              runs_dir: str | Path = "runs", parameters: dict[str, Any] | None = None,
              overrides: dict[str, dict[str, Any]] | None = None, verbose: bool = False, quiet: bool = False,
              threads: int | None = None, out: Any = None, containers: bool = False,
              image: str | None = None, resume: str | Path | bool | None = None) -> RunResult:
    """Run the pipeline with the KFP local runner; return what happened (see :func:`format_summary`).

    ``containers``: every step in ``image`` (default ``$RLHF_IMAGE`` or the pipeline's) with KFP's
    DockerRunner instead of a subprocess of this Python.

    ``resume``: continue an interrupted run in its run directory (a path, or True: the newest under
    ``runs_dir``): a new attempt there whose steps reuse the earlier attempts' whole outputs made from
    the same inputs and config, and whose training steps resume from their checkpoints
    (:mod:`rlhf.pipeline.reuse`); the same MLflow parent run.
    """
    from rlhf.mlops import tracking, versioning

    out = out or sys.stdout
    raw, params = Path(raw), Path(params)
    if not raw.exists():
        raise UserError(f"raw data not found: {raw}", hint="run `make data` (or `rlhf fetch-data`) first")
    if not params.exists():
        raise ConfigError(f"params file not found: {params}", hint="run from the project root or pass --params")
    profile = resolve_profile(profile, params)
    from rlhf.pipeline import dag
    known = dag.pipeline_parameters()
    parameters = dict(parameters or {})
    check_parameters(parameters, known)
    parameters = dag.typed_parameters(parameters)  # -p accelerator_limit=2: a string parameter
    if int(parameters.get("num_nodes", 1) or 1) > 1:
        raise ConfigError("num_nodes > 1 launches Kubeflow Trainer jobs: that needs a cluster",
                          hint="rlhf run is single-node; use rlhf submit")
    data_hash = ""
    for dvc_file in (Path("data.dvc"), raw.resolve().parent.parent / "data.dvc"):
        with contextlib.suppress(UserError, OSError, KeyError, TypeError, IndexError):
            if dvc_file.exists() and versioning.tracked_path(dvc_file)[0].resolve() == raw.resolve():
                data_hash = versioning.data_hash(dvc_file)
                break
    data_revision = tracking.git_commit() or ""
    args: dict[str, Any] = {"raw_data": str(raw.resolve()), "data_hash": data_hash,
                            "data_revision": data_revision,
                            "params_yaml": params_text(params.read_text(encoding="utf-8")),
                            "profile": profile, "overrides": overrides or {}, **parameters}
    image = (image or dag.default_images()[0]) if containers else None
    docker_client = _docker(image) if containers else None
    if containers:
        _check_readable(raw.resolve())
    if tracking.enabled():  # an unusable tracking URI stops the run before its run directory exists
        tracking.check_reachable(tracking.tracking_uri())
    run_dir = resume_dir(runs_dir, resume) if resume else None
    if run_dir is not None and (pid := _owner(run_dir)):
        raise UserError(f"{run_dir} is in use by a running `rlhf run` (pid {pid})", where="rlhf run --resume",
                        hint="wait for it or stop it (Ctrl-C / kill its pid) first")
    from rlhf.pipeline import reuse

    close_abandoned(run_dir.parent if run_dir is not None else runs_dir)
    run_dir = run_dir or new_run_dir(runs_dir)
    (run_dir / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    pipeline_root = run_dir / "kfp"
    (run_dir / "run.json").write_text(json.dumps(
        {k: v for k, v in args.items() if k != "params_yaml"}, indent=2, sort_keys=True) + "\n")
    (run_dir / "params.yaml").write_text(params.read_text(encoding="utf-8"), encoding="utf-8")
    print(f"rlhf run: profile {profile}, data {data_hash[:8] or '?'} ({raw}), "
          f"run directory {run_dir}" + (f", image {image}" if containers else "")
          + (" (resumed: finished stages are reused)" if resume else ""), file=out, flush=True)

    from kfp import local

    _patch_oneof()
    pipeline = dag.make_pipeline(image, image, params_yaml=args["params_yaml"], retries=False, gpu_device=None,
                                 record_images=False)
    console = Console(run_dir, out=out, verbose=verbose, quiet=quiet)
    env_keep = {k: os.environ.get(k) for k in ("RLHF_PROFILE", "RLHF_DATA_HASH", "RLHF_LOCAL_RUN", "OMP_NUM_THREADS",
                                               "MKL_NUM_THREADS", reuse.ENV)}
    os.environ.pop(reuse.ENV, None)
    if resume:
        os.environ[reuse.ENV] = str(pipeline_root.resolve())  # the steps look for earlier attempts' outputs
    if data_hash:
        os.environ["RLHF_DATA_HASH"] = data_hash
    note = ""
    if threads is None:
        threads, note = auto_threads()
    if threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if note:
        print(f"rlhf run: {note}", file=out, flush=True)
    t0 = time.perf_counter()
    result = RunResult(run_dir=run_dir, status="failed", seconds=0.0, resumed=bool(resume))
    stopper = StopOnSignal(console, stop=(lambda: _stop_containers(docker_client, run_dir)) if containers else None)
    os.environ["RLHF_LOCAL_RUN"] = str(os.getpid())  # steps stop when this process is gone (rlhf.process)
    display_uri = tracking.display_uri()
    try:
        with contextlib.ExitStack() as stack:
            mounts = stack.enter_context(_loopback_mlflow(run_dir)) if containers else []
            prun = stack.enter_context(tracking.pipeline_run(
                f"local-{run_dir.name}", name=f"pipeline {run_dir.name}",
                tags={"run_dir": str(run_dir), "runner": "kfp-docker" if containers else "kfp-local",
                      **({"image": image} if containers else {})}))
            if prun.run_id:
                result.mlflow_run_id, result.tracking_uri = prun.run_id, display_uri
                if resume:  # the stage runs an earlier attempt left RUNNING (it was killed) end KILLED
                    from rlhf.pipeline.finalize import end_running_runs

                    end_running_runs(f"local-{run_dir.name}", "KILLED", reason="interrupted; resumed")
            runner = (_docker_runner(image, run_dir, pipeline_root, raw, mounts) if containers
                      else local.SubprocessRunner(use_venv=False))
            local.init(runner=runner, pipeline_root=str(pipeline_root), raise_on_error=False)
            try:
                with captured(console), stopper:
                    pipeline(**args)
            except Exception:
                # kfp 2.17's runner goes on to the next task of a sub-DAG after a failed one and then
                # raises for the missing input: the failed step (or the signal) is what to report
                if not (stopper.signum or console.failed):
                    raise
            if stopper.signum:
                raise Interrupted(stopper.signum)  # ends the MLflow parent run KILLED
            failed = console.failed
            if failed is not None:
                raise RunFailed(f"{stage_of(failed.name)} failed: {failed.error or 'see its log'}",
                                hint=f"log: {failed.log}",
                                exit_code=EXIT_CODES.get(failed.error_type, 1))
            if not any(stage_of(t) == "evaluate" and s.status == "succeeded" for t, s in console.tasks.items()):
                raise RunFailed("the pipeline did not reach the evaluate step", hint=f"see {run_dir}/logs/run.log")
        result.status = "succeeded"
    except RunFailed as e:
        result.error = e.one_line()
        raise
    except Interrupted as e:
        where = stage_of(stopper.during) if stopper.during else None
        result.status = "interrupted"
        err = RunFailed(f"interrupted by {e} during {where or 'the run'}: the step was stopped, nothing registered",
                        hint=f"summary: {run_dir / 'summary.json'}", exit_code=e.exit_code)
        result.error = err.one_line()
        raise err from None
    finally:
        if docker_client is not None:
            _stop_containers(docker_client, run_dir)  # none left after an interrupted or failed run
        for k, v in env_keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        (run_dir / LOCK).unlink(missing_ok=True)
        result.seconds = time.perf_counter() - t0
        result.stage_seconds = {stage_of(t): round(s.ended - s.started, 1) for t, s in console.tasks.items()
                                if s.ended and s.started}
        result.stage_times = stage_times(result.stage_seconds, {stage_of(t): s.times for t, s in console.tasks.items()})
        result.reused = [stage_of(t) for t, s in console.tasks.items() if s.reused]
        if pipeline_root.exists():
            result.artifacts = _link_outputs(run_dir, pipeline_root)
        ev = result.artifacts.get("evaluate") if result.status != "interrupted" else None
        if ev is not None:
            result.gate = _read_json(ev / "gate.json")
            result.metrics = _read_json(ev / "metrics.json") or {}
        reg = result.artifacts.get("register")
        if reg is not None:
            result.registration = _read_json(reg / "registration.json")
        (run_dir / "summary.json").write_text(json.dumps(summary_doc(result), indent=2, sort_keys=True,
                                                         default=str) + "\n")
    return result


def summary_doc(r: RunResult) -> dict[str, Any]:
    return {"status": r.status, "seconds": round(r.seconds, 1), "run_dir": str(r.run_dir), "gate": r.gate,
            "metrics": r.metrics, "artifacts": {k: str(v) for k, v in r.artifacts.items()},
            "mlflow_run_id": r.mlflow_run_id, "tracking_uri": r.tracking_uri, "registration": r.registration,
            "stage_seconds": r.stage_seconds, "stage_times": r.stage_times, "error": r.error, "resumed": r.resumed, "reused": r.reused}


def stage_times(walls: dict[str, float], reported: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each stage's wall time split into what the step reported (rlhf.pipeline.steps.log_timing): start-up,
    the stage call, its compute; ``overhead`` is everything but compute (start-up, model loading, saving,
    tracking, the runner's own work)."""
    out = {}
    for name, wall in walls.items():
        t = {"wall": wall, **{k: round(v, 1) for k, v in (reported.get(name) or {}).items()}}
        t["overhead"] = round(wall - t.get("compute", 0.0), 1)
        out[name] = t
    return out


def _timing(name: str, t: dict[str, float]) -> str:
    parts = [f"start-up {t['startup']:.0f}s"] if "startup" in t else []
    if "compute" in t:
        parts.append(f"compute {t['compute']:.0f}s")
    parts.append(f"overhead {t['overhead']:.0f}s")
    return f"{name} {t['wall']:.0f}s ({', '.join(parts)})"


def _stage_metric(path: Path | None, *keys: str) -> str:
    m = (_read_json(path / "manifest.json") or {}).get("metrics", {}) if path else {}
    parts = [f"{k} {m[k]:.3f}" for k in keys if isinstance(m.get(k), (int, float))]
    return ", ".join(parts)


def format_summary(r: RunResult) -> str:
    """The closing summary ``rlhf run`` prints."""
    lines = ["", f"Pipeline finished in {r.seconds:.0f} s; run directory {r.run_dir}"]
    if r.resumed:
        lines.append(f"  resumed   reused from an earlier attempt: {', '.join(r.reused) or 'nothing'}")
    if r.gate is not None:
        decision = "PASSED" if r.gate.get("passed") else "FAILED"
        lines.append(f"  gate      {decision}: {r.gate.get('reason', '')}")
    m = r.metrics
    if m:
        def f(k):
            v = m.get(k)
            return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"

        lines.append(f"  gold      policy {f('policy_gold_mean')} vs SFT {f('baseline_gold_mean')}"
                     + (f" vs champion {f('champion_gold_mean')}" if "champion_gold_mean" in m else "")
                     + f"; win rate {f('win_rate_gold_vs_baseline')}")
        lines.append(f"  reward    policy {f('policy_rm_mean')} vs SFT {f('baseline_rm_mean')}; "
                     f"KL to SFT {f('kl_to_baseline')} nats")
    for stage, keys in (("sft", ("eval_loss",)), ("reward", ("eval_accuracy", "gold_agreement")),
                        ("ppo", ("start_score", "score", "start_gold", "gold", "kl"))):
        text = _stage_metric(r.artifacts.get(stage), *keys)
        if text:
            lines.append(f"  {stage:<9} {text}")
    if "ppo" in r.artifacts:
        lines.append(f"  model     {r.artifacts['ppo']}")
    if "evaluate" in r.artifacts:
        lines.append(f"  report    {r.artifacts['evaluate'] / 'report.html'}")
    if r.registration:
        reg = r.registration
        if reg.get("registered"):
            aliases = ", ".join(reg.get("aliases") or []) or "no aliases"
            lines.append(f"  registry  {reg.get('model_name')} v{reg.get('version')} ({aliases}): "
                         f"{reg.get('decision', '')}".rstrip(": "))
        else:
            lines.append(f"  registry  not registered: {reg.get('reason', '')}")
    elif r.gate is not None and not r.gate.get("passed"):
        lines.append("  registry  not registered (the gate failed); champion unchanged")
    if r.mlflow_run_id:
        lines.append(f"  MLflow    run {r.mlflow_run_id} at {r.tracking_uri}")
        if (r.tracking_uri or "").startswith("sqlite:"):
            lines.append(f"            browse: mlflow ui --backend-store-uri {r.tracking_uri}")
    else:
        lines.append("  MLflow    off (RLHF_TRACKING=off)")
    if r.stage_seconds:
        times = r.stage_times or stage_times(r.stage_seconds, {})
        total = {k: sum(t.get(k, 0.0) for t in times.values()) for k in ("wall", "compute", "overhead")}
        lines.append(f"  timings   steps {total['wall']:.0f}s: compute {total['compute']:.0f}s (training loops), "
                     f"overhead {total['overhead']:.0f}s (start-up and imports, loading, evaluation, saving, tracking)")
        lines.extend(f"            {_timing(k, t)}" for k, t in times.items())
    return "\n".join(lines)
