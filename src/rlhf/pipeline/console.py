"""What ``rlhf run`` shows: the KFP local runner's output turned into stage lines and per-step logs.

The local runner prints everything the steps print; :class:`Console` takes it line by line: a line
when a stage starts, finishes, fails or is skipped (with its duration), the stages' own progress
lines (about ten per stage), warnings and errors; everything goes to ``<run dir>/logs/``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ANSI = re.compile(r"\x1b\[[0-9;]*m")
HIDDEN_TASKS = ("finalize",)
TASK_START = re.compile(r"Executing task '([^']+)'")
TASK_END = re.compile(r"Task '([^']+)' finished with status (SUCCESS|FAILURE)")
TASK_RETRY = re.compile(r"Task (\S+) failed \(attempt (\d+)/(\d+)\)")
SKIP_COND = re.compile(r"Skipping conditional task (\S+)")
SKIP_UPSTREAM = re.compile(r"Skipping task (\S+): upstream")
# a log line of a step: ours ("12:00:01 INFO rlhf: msg"), or after the KFP executor took over the root
# logger ("[KFP Executor 2026-01-01 12:00:01,123 INFO]: msg")
RLHF_LINE = re.compile(r"^(?:\d\d:\d\d:\d\d (INFO|WARNING|ERROR) rlhf|\[KFP Executor [^\]]* (INFO|WARNING|ERROR)\]): (.*)$")
DONE_LINE = re.compile(r"^\[\w+\] done: ")
REUSED_LINE = re.compile(r"^\[\w+\] reused ")  # rlhf run --resume: the output of an earlier attempt
RESUMED_LINE = re.compile(r"^\[\w+\] resuming from \S+ \(step (\d+)/(\d+)\)")
QUIET_LINE = re.compile(r"^\[\w+\] (checkpoint|saved checkpoint|resum|time: )")
# a step's own account of its time (rlhf.pipeline.steps.log_timing): start-up, the stage call, its compute
TIME_LINE = re.compile(r"^\[\w+\] time: start-up (\S+) s, stage (\S+) s(?:, compute (\S+) s)?")
STEP_LINE = re.compile(r"^\[(\w+)\] step (\d+)/(\d+)\b")
USER_ERROR = re.compile(r"^(?:rlhf\.errors\.)?(ValidationFailed|DataError|ConfigError|UserError|DiskFull): (.*)$")
ANY_ERROR = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Failed)): (.*)$")
EXIT_CODES = {"ValidationFailed": 3, "DataError": 2, "ConfigError": 2, "UserError": 2, "DiskFull": 4}


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
    reused: bool = False  # taken from an earlier attempt (rlhf run --resume)
    resumed_from: int = 0  # the checkpoint step a training step resumed from
    times: dict[str, float] = field(default_factory=dict)  # start-up / stage / compute seconds (TIME_LINE)


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
    stop_reason: str = ""  # set when rlhf run was asked to stop: the running step is being stopped

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
        if (m := RLHF_LINE.match(body.strip())) and m.group(3).startswith("["):
            if REUSED_LINE.match(m.group(3)):
                state.reused = True
            elif r := RESUMED_LINE.match(m.group(3)):
                state.resumed_from = int(r.group(1))
            elif r := TIME_LINE.match(m.group(3)):
                state.times = {k: float(v) for k, v in zip(("startup", "stage", "compute"), r.groups())
                               if v is not None and v != "?"}
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
        if not self.hidden(task):
            self.echo(f"{self.stamp()} {stage_of(task):<9} started")

    def end(self, task: str, ok: bool) -> None:
        state = self.tasks.setdefault(task, TaskState(task))
        state.ended = time.perf_counter()
        state.status = "succeeded" if ok else "failed"
        took = state.ended - (state.started or state.ended)
        if self.hidden(task) and ok:
            pass
        elif self.stop_reason:
            state.status = "stopped"
            self.echo(f"{self.stamp()} {stage_of(task):<9} stopped ({self.stop_reason}) after {took:.1f} s")
        elif ok and state.reused:
            self.echo(f"{self.stamp()} {stage_of(task):<9} reused (finished by an earlier attempt)")
        elif ok:
            resumed = f", resumed from its step {state.resumed_from} checkpoint" if state.resumed_from else ""
            self.echo(f"{self.stamp()} {stage_of(task):<9} finished in {took:.1f} s{resumed}")
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
        # a skipped condition is the branch not taken (single/multi-node; gate passed/failed: register runs
        # in either branch, the summary says which): nothing to show
        if not task.startswith("condition") and not self.hidden(task):
            self.echo(f"{self.stamp()} {stage_of(task):<9} skipped ({why})")

    @staticmethod
    def hidden(task: str) -> bool:
        """The exit handler's task (rlhf.pipeline.finalize): logged, not shown."""
        return stage_of(task) in HIDDEN_TASKS

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
def captured(console: Console):
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
