"""Shared pieces of the fault suite: start a stage or `rlhf run` as a real process, watch its log, kill it.

The suite's tests import this module as ``faults.conftest`` (``tests/faults`` is a package so that its
conftest does not clash with ``tests/conftest.py``, whose fixtures -- demo data, dataset, tiny SFT and
reward models -- apply here too).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ROOT


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an `rlhf` process (as tests/conftest.run_cli builds it)."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class Watched:
    """`python -m rlhf.cli <args>` in its own process group, its output teed to ``log`` line by line."""

    def __init__(self, args: list[str], log: Path, *, cwd: Path | str = ROOT, env: dict[str, str] | None = None):
        self.log = log
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args], cwd=cwd, env=cli_env(env),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log, "w") as f:
            for line in self.proc.stdout:
                f.write(line)
                f.flush()
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = 600) -> re.Match:
        """Block until a line matches ``pattern`` (the process must still be alive to print it)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := rx.search(line):
                        return m
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"exited {self.proc.returncode} before /{pattern}/:\n"
                                         + "".join(self.lines[-40:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no /{pattern}/ after {timeout_s:.0f} s:\n" + "".join(self.lines[-40:]))
                self._cond.wait(min(left, 0.5))

    def kill_group(self) -> int:
        """SIGKILL the whole process group (the command and every child it started); its exit status."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        rc = self.proc.wait(timeout=60)
        self._reader.join(timeout=30)
        return rc

    def wait(self, timeout_s: float = 600) -> int:
        rc = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=30)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)
