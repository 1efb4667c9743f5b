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

Two work-arounds for kfp 2.17's local runner, both local-only and tested:

* it cannot resolve ``dsl.OneOf`` over artifacts (the merge of the single-node and multi-node
  branches): :func:`_patch_oneof` picks the branch that ran;
* it evaluates ``dsl.If`` with ``eval``: the pipeline's conditions read only an int parameter and
  the evaluate step's own ``"passed"`` / ``"failed"`` output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from rlhf.errors import ConfigError, UserError

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TASK_START = re.compile(r"Executing task '([^']+)'")
TASK_END = re.compile(r"Task '([^']+)' finished with status (SUCCESS|FAILURE)")
TASK_RETRY = re.compile(r"Task (\S+) failed \(attempt (\d+)/(\d+)\)")
SKIP_COND = re.compile(r"Skipping conditional task (\S+)")
SKIP_UPSTREAM = re.compile(r"Skipping task (\S+): upstream")
# a log line of a step: ours ("12:00:01 INFO rlhf: msg"), or after the KFP executor took over the root
# logger ("[KFP Executor 2026-01-01 12:00:01,123 INFO]: msg")
RLHF_LINE = re.compile(r"^(?:\d\d:\d\d:\d\d (INFO|WARNING|ERROR) rlhf|\[KFP Executor [^\]]* (INFO|WARNING|ERROR)\]): (.*)$")
DONE_LINE = re.compile(r"^\[\w+\] done: ")
QUIET_LINE = re.compile(r"^\[\w+\] (checkpoint|saved checkpoint|resum)")
STEP_LINE = re.compile(r"^\[(\w+)\] step (\d+)/(\d+)\b")
USER_ERROR = re.compile(r"^(?:rlhf\.errors\.)?(ValidationFailed|DataError|ConfigError|UserError): (.*)$")
ANY_ERROR = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Failed)): (.*)$")
EXIT_CODES = {"ValidationFailed": 3, "DataError": 2, "ConfigError": 2, "UserError": 2}


class RunFailed(UserError):
    """A pipeline step failed; the message is the step's own error line."""

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int = 1):
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


# ------------------------------------------------------------------------------------------ import


def project_root() -> Path:
    """The directory holding ``pipelines/`` and ``components/``: $RLHF_PROJECT_ROOT, cwd, or the checkout."""
    candidates = [os.environ.get("RLHF_PROJECT_ROOT"), os.getcwd(), Path(__file__).resolve().parents[2], "/app"]
    for c in candidates:
        if c and (Path(c) / "pipelines" / "rlhf_pipeline.py").exists() and (Path(c) / "components").is_dir():
            return Path(c).resolve()
    raise UserError("cannot find the pipeline definitions (pipelines/, components/)",
                    hint="run from the project root or set RLHF_PROJECT_ROOT")


def import_pipelines():
    """``pipelines.rlhf_pipeline`` (the KFP DAG), importable from the project root."""
    root = str(project_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    from pipelines import rlhf_pipeline

    return rlhf_pipeline


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """``["a=1", "b=x", "c={k: v}"]`` -> ``{"a": 1, "b": "x", "c": {"k": "v"}}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected NAME=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def dotted_overrides(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["sft.max_steps=5"]`` -> ``{"sft": {"max_steps": 5}}`` (the pipeline's ``overrides`` parameter)."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_assignments(items).items():
        section, dot, fld = key.partition(".")
        if not dot or not fld:
            raise ConfigError(f"--set expects SECTION.FIELD=VALUE, got {key!r}")
        out.setdefault(section, {})[fld] = value
    from rlhf.steps import check_overrides

    return check_overrides(out)


def check_parameters(params: dict[str, Any], known: dict[str, Any]) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"unknown pipeline parameter(s): {', '.join(unknown)}",
                          hint=f"known: {', '.join(sorted(known))}")


# ------------------------------------------------------------------------------------------ kfp.local


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


def stage_of(task: str) -> str:
    """KFP task name -> stage name (``sft-multinode-2`` -> ``sft``)."""
    name = re.sub(r"-\d+$", "", task)
    return name.removesuffix("-multinode")


@dataclass
class TaskState:
    name: str
    started: float = 0.0
    ended: float = 0.0
    status: str = "pending"  # running, succeeded, failed, skipped
    log: Path | None = None
    error: str = ""
    error_type: str = ""


@dataclass(eq=False)
class Console:
    """Where the local runner's stdout goes: stage lines to the terminal, everything to log files."""

    run_dir: Path
    out: Any = None
    verbose: bool = False
    quiet: bool = False
    tasks: dict[str, TaskState] = field(default_factory=dict)
    current: str | None = None
    t0: float = field(default_factory=time.perf_counter)
    _buf: str = ""
    _last_step: dict[str, int] = field(default_factory=dict)
    _log: Any = None
    _task_log: Any = None

    def __post_init__(self):
        self.out = self.out or sys.stdout
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._log = open(self.run_dir / "logs" / "run.log", "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    # -- file-like: what print() and logging.StreamHandler need
    encoding = "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self.line(line)
        return len(s)

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self.out.flush()

    def close_logs(self) -> None:
        if self._buf:
            self.line(self._buf)
            self._buf = ""
        for f in (self._task_log, self._log):
            if f:
                f.close()
        self._task_log = self._log = None

    # -- lines
    def echo(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def stamp(self) -> str:
        s = int(time.perf_counter() - self.t0)
        return f"[{s // 60:02d}:{s % 60:02d}]"

    def line(self, raw: str) -> None:
        text = ANSI.sub("", raw).rstrip("\r")
        self._log.write(text + "\n")
        if m := TASK_START.search(text):
            return self.start(m.group(1))
        if m := TASK_END.search(text):
            return self.end(m.group(1), m.group(2) == "SUCCESS")
        if m := SKIP_COND.search(text):
            return self.skip(m.group(1), "condition false")
        if m := SKIP_UPSTREAM.search(text):
            return self.skip(m.group(1), "an earlier step failed", show=False)
        if m := TASK_RETRY.search(text):
            self.echo(f"{self.stamp()} {stage_of(m.group(1)):<9} failed, retrying "
                      f"(attempt {m.group(2)}/{m.group(3)})")
            return None
        if self.current is None:
            return None
        state = self.tasks[self.current]
        body = text[4:] if text.startswith("    ") else text
        if self._task_log:
            self._task_log.write(body + "\n")
        if m := USER_ERROR.match(body.strip()):
            state.error_type, state.error = m.group(1), m.group(2)
        elif (m := ANY_ERROR.match(body.strip())) and not state.error_type:
            state.error = f"{m.group(1)}: {m.group(2)}"
        if self.verbose:
            self.echo("    " + body)
        elif not self.quiet and (m := RLHF_LINE.match(body.strip())):
            level, msg = m.group(1) or m.group(2), m.group(3)
            if level != "INFO":
                self.echo(f"    {level}: {msg}")
            elif msg.startswith("[") and self.show_progress(msg):
                self.echo("    " + msg)
        return None

    def show_progress(self, msg: str) -> bool:
        """A stage's own "[stage] ..." line worth showing: about ten step lines per stage, no noise."""
        if DONE_LINE.match(msg) or QUIET_LINE.match(msg):
            return False
        if m := STEP_LINE.match(msg):
            n, total = int(m.group(2)), int(m.group(3))
            last = self._last_step.get(m.group(1), 0)
            if n in (1, total) or n - last >= total / 10:
                self._last_step[m.group(1)] = n
                return True
            return False
        return True

    def start(self, task: str) -> None:
        state = self.tasks.setdefault(task, TaskState(task))
        state.started, state.status = time.perf_counter(), "running"
        state.log = self.run_dir / "logs" / f"{task}.log"
        if self._task_log:
            self._task_log.close()
        self._task_log = open(state.log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self.current = task
        self.echo(f"{self.stamp()} {stage_of(task):<9} started")

    def end(self, task: str, ok: bool) -> None:
        state = self.tasks.setdefault(task, TaskState(task))
        state.ended = time.perf_counter()
        state.status = "succeeded" if ok else "failed"
        took = state.ended - (state.started or state.ended)
        if ok:
            self.echo(f"{self.stamp()} {stage_of(task):<9} finished in {took:.1f} s")
        else:
            self.echo(f"{self.stamp()} {stage_of(task):<9} FAILED after {took:.1f} s (log: {state.log})")
        if self._task_log:
            self._task_log.close()
            self._task_log = None
        self.current = None

    def skip(self, task: str, why: str, *, show: bool = True) -> None:
        state = self.tasks.setdefault(task, TaskState(task))
        state.status = "skipped"
        if not show:
            return
        if not task.startswith("condition"):
            self.echo(f"{self.stamp()} {stage_of(task):<9} skipped ({why})")
        elif any(stage_of(t) == "evaluate" and s.status == "succeeded" for t, s in self.tasks.items()):
            # the only condition after evaluate is the gate around register
            self.echo(f"{self.stamp()} {'register':<9} skipped (the evaluation gate failed)")

    @property
    def failed(self) -> TaskState | None:
        return next((t for t in self.tasks.values() if t.status == "failed"), None)


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Console):
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.write(record.getMessage() + "\n")


@contextlib.contextmanager
def _captured(console: Console):
    """Route the local runner's stdout, its logging and its warnings into ``console``."""
    root = logging.getLogger()
    saved_handlers, saved_level, saved_stdout = root.handlers[:], root.level, sys.stdout
    root.handlers = [_ConsoleHandler(console)]
    root.setLevel(logging.INFO)
    sys.stdout = console
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the local runner warns per step about images / k8s settings
            yield
    finally:
        sys.stdout = saved_stdout
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        console.close_logs()


# ------------------------------------------------------------------------------------------ run


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
    error: str = ""


def new_run_dir(runs_dir: str | Path) -> Path:
    base = Path(runs_dir) / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    path.mkdir(parents=True)
    return path


def _link_outputs(run_dir: Path, pipeline_root: Path) -> dict[str, Path]:
    """``<run dir>/<stage>`` -> the stage's output artifact under ``kfp/``; returns stage -> path."""
    from rlhf.steps import STAGES

    out_names = {s.name: s.output for s in STAGES}
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


def busy_cpus(samples: int = 5, interval: float = 0.02, loadavg: str = "/proc/loadavg") -> float:
    """How many CPUs other processes are using right now.

    The runnable-thread count of ``/proc/loadavg`` (minus this process), median of a few samples:
    unlike the 1-minute load average it does not count the previous pipeline step, which has just
    ended. Elsewhere: the 1-minute load average.
    """
    counts = []
    try:
        for i in range(samples):
            with open(loadavg, encoding="ascii") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
            if i + 1 < samples:
                time.sleep(interval)
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    return float(sorted(counts)[len(counts) // 2])


def auto_threads() -> tuple[int | None, str]:
    """Threads per step when the user chose none: fewer on a busy machine, else torch's default.

    OpenMP threads spin-wait for each other; when other processes hold the cores, a step with as
    many threads as cores slows down several-fold (measured here: the tiny profile took 1106 s with
    torch's 2 threads on a 2-core machine under load 7, 205 s with 1 thread; a `dvc repro` SFT stage
    ran 30x slower with 2 threads beside one busy process than alone).
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None, ""
    ncpu = os.cpu_count() or 1
    busy = busy_cpus()
    if busy < 1 or busy <= 0.25 * ncpu:
        return None, ""
    n = max(1, int(ncpu - busy))
    return n, f"machine busy ({busy:.0f} of {ncpu} CPUs in use): {n} thread(s) per step (--threads to choose)"


def resolve_profile(profile: str | None, params: Path) -> str:
    """The profile the run uses: --profile, $RLHF_PROFILE, params.yaml's ``profile:``; 'none' for the base."""
    from rlhf.config import active_profile, load_yaml

    return profile or active_profile(load_yaml(params)) or "none"


def run_local(*, raw: str | Path = "data/raw", params: str | Path = "params.yaml", profile: str | None = None,
              runs_dir: str | Path = "runs", parameters: dict[str, Any] | None = None,
              overrides: dict[str, dict[str, Any]] | None = None, verbose: bool = False, quiet: bool = False,
              threads: int | None = None, out: Any = None) -> RunResult:
    """Run the pipeline with the KFP local runner; return what happened (see :func:`format_summary`)."""
    from rlhf import tracking, versioning

    out = out or sys.stdout
    raw, params = Path(raw), Path(params)
    if not raw.exists():
        raise UserError(f"raw data not found: {raw}", hint="run `make data` (or `rlhf fetch-data`) first")
    if not params.exists():
        raise ConfigError(f"params file not found: {params}", hint="run from the project root or pass --params")
    profile = resolve_profile(profile, params)
    module = import_pipelines()
    known = module.pipeline_parameters()
    parameters = dict(parameters or {})
    check_parameters(parameters, known)
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
                            "params_yaml": module.params_text(params.read_text(encoding="utf-8")),
                            "profile": profile, "overrides": overrides or {}, **parameters}
    run_dir = new_run_dir(runs_dir)
    pipeline_root = run_dir / "kfp"
    (run_dir / "run.json").write_text(json.dumps(
        {k: v for k, v in args.items() if k != "params_yaml"}, indent=2, sort_keys=True) + "\n")
    (run_dir / "params.yaml").write_text(params.read_text(encoding="utf-8"), encoding="utf-8")
    print(f"rlhf run: profile {profile}, data {data_hash[:8] or '?'} ({raw}), "
          f"run directory {run_dir}", file=out, flush=True)

    from kfp import local

    _patch_oneof()
    pipeline = module.make_pipeline(params_yaml=args["params_yaml"], retries=False)
    console = Console(run_dir, out=out, verbose=verbose, quiet=quiet)
    env_keep = {k: os.environ.get(k) for k in ("RLHF_PROFILE", "RLHF_DATA_HASH", "OMP_NUM_THREADS",
                                               "MKL_NUM_THREADS")}
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
    result = RunResult(run_dir=run_dir, status="failed", seconds=0.0)
    try:
        with tracking.pipeline_run(f"local-{run_dir.name}", name=f"pipeline {run_dir.name}",
                                   tags={"run_dir": str(run_dir), "runner": "kfp-local"}) as prun:
            if prun.run_id:
                result.mlflow_run_id, result.tracking_uri = prun.run_id, tracking.display_uri()
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
                       raise_on_error=False)
            with _captured(console):
                pipeline(**args)
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
    finally:
        for k, v in env_keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        result.seconds = time.perf_counter() - t0
        result.stage_seconds = {stage_of(t): round(s.ended - s.started, 1) for t, s in console.tasks.items()
                                if s.ended and s.started}
        if pipeline_root.exists():
            result.artifacts = _link_outputs(run_dir, pipeline_root)
        ev = result.artifacts.get("evaluate")
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
            "stage_seconds": r.stage_seconds, "error": r.error}


def _stage_metric(path: Path | None, *keys: str) -> str:
    m = (_read_json(path / "manifest.json") or {}).get("metrics", {}) if path else {}
    parts = [f"{k} {m[k]:.3f}" for k in keys if isinstance(m.get(k), (int, float))]
    return ", ".join(parts)


def format_summary(r: RunResult) -> str:
    """The closing summary ``rlhf run`` prints."""
    lines = ["", f"Pipeline finished in {r.seconds:.0f} s; run directory {r.run_dir}"]
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
        lines.append("  timings   " + ", ".join(f"{k} {v:.0f}s" for k, v in r.stage_seconds.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ cluster


def kfp_call(fn, *args, **kwargs):
    """Run a KFP client call; its errors become one-line user errors."""
    import_pipelines()
    from pipelines.client import KfpError

    try:
        return fn(*args, **kwargs)
    except KfpError as e:
        raise UserError(str(e)) from None


def run_parameters(params: Path, profile: str | None, parameters: dict[str, Any] | None,
                   overrides: dict[str, dict[str, Any]] | None, data_revision: str | None,
                   data_hash: str | None) -> dict[str, Any]:
    """The runtime parameters of a cluster run: params.yaml, profile, data version, knobs, overrides.

    ``data_revision`` defaults to the git commit, ``data_hash`` to the md5 in ``data.dvc``.
    """
    from rlhf import tracking, versioning

    module = import_pipelines()
    params = Path(params)
    if not params.exists():
        raise ConfigError(f"params file not found: {params}", hint="run from the project root or pass --params")
    if data_hash is None:
        data_hash = versioning.data_hash("data.dvc") if Path("data.dvc").exists() else ""
    values: dict[str, Any] = {
        "data_revision": data_revision if data_revision is not None else (tracking.git_commit() or ""),
        "data_hash": data_hash, "params_yaml": module.params_text(params.read_text(encoding="utf-8")),
        "profile": profile or ""}
    if overrides:
        values["overrides"] = overrides
    values.update(parameters or {})
    check_parameters(values, module.pipeline_parameters())
    return values


def submit_remote(host: str, values: dict[str, Any], *, pipeline_file: str | Path | None = None,
                  image: str | None = None, gpu_image: str | None = None, experiment: str = "rlhf",
                  run_name: str | None = None, service_account: str | None = None, namespace: str | None = None,
                  wait: bool = False, poll: float = 30.0, timeout: float = 6 * 3600,
                  summary_file: str | Path | None = None, echo: Any = print) -> dict[str, Any]:
    """Submit a pipeline run to KFP (``rlhf submit``); with ``wait``, follow it and report the gate.

    ``summary_file`` (with ``wait``): a Markdown summary with the gate decision is appended to it.
    A run that does not end SUCCEEDED raises :class:`RunFailed`.
    """
    import_pipelines()
    from pipelines import client as kfp

    spec = kfp.compiled_spec(pipeline_file, image=image, gpu_image=gpu_image, params_yaml=values["params_yaml"])
    name = run_name or f"rlhf {values['data_revision'][:8] or 'local'} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    api = kfp.KfpClient(host, namespace=namespace)
    run = kfp_call(kfp.submit, api, pipeline_spec=spec, parameters=values, experiment=experiment, run_name=name,
                   service_account=service_account, wait=wait, poll_s=poll, timeout_s=timeout, echo=echo)
    if not wait:
        return run
    gate = kfp.gate_from_run(run)
    echo(f"run {run.get('run_id')} {run.get('state')}; gate {gate[0]}: {gate[1]}")
    if summary_file is not None:
        with open(summary_file, "a", encoding="utf-8") as f:
            f.write(kfp.summary_markdown(run, host, gate, values))
    if run.get("state") != "SUCCEEDED":
        raise RunFailed(f"run {run.get('run_id')} ended {run.get('state')}",
                        hint=f"{host.rstrip('/')}/#/runs/details/{run.get('run_id')}")
    return run
