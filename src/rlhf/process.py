"""Honest process behaviour: signals become exceptions, children stop with their parent.

* :class:`Interrupted` — SIGINT/SIGTERM as an exception (a ``KeyboardInterrupt``, so MLflow runs
  that it unwinds through end ``KILLED``), with the shell's exit code (130 / 143);
* :func:`raise_on_signals` — install that for SIGTERM (SIGINT already raises ``KeyboardInterrupt``);
* :func:`stop_with` — a pipeline step of ``rlhf run`` gets SIGTERM when ``rlhf run`` is gone, even
  after a SIGKILL, so nothing keeps training for nobody;
* :func:`stop_children` — terminate this process's descendants, then kill what is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop (Ctrl-C or ``kill``)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(NAMES.get(signum, f"signal {signum}"))
        self.signum = signum
        self.exit_code = 128 + int(signum)


def age() -> float | None:
    """Seconds since this process started (Linux: /proc), None where that cannot be read: the start-up
    share of a step (interpreter, imports) in ``rlhf run``'s timings."""
    try:
        fields = open("/proc/self/stat", encoding="ascii").read().rsplit(")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): starttime, in clock ticks
        with open("/proc/uptime", encoding="ascii") as f:
            return max(0.0, float(f.read().split()[0]) - start)
    except (OSError, ValueError, IndexError):
        return None


def _raise(signum, _frame):
    raise Interrupted(signum)


def raise_on_signals() -> None:
    """SIGTERM raises :class:`Interrupted` in the main thread (as Ctrl-C raises ``KeyboardInterrupt``)."""
    with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
        signal.signal(signal.SIGTERM, _raise)


def stop_with(pid: int, poll_s: float = 1.0) -> None:
    """SIGTERM this process once process ``pid`` is gone (checked every ``poll_s`` in a daemon thread).

    For the steps of ``rlhf run``: the KFP local runner starts each step through ``sh``, so the
    kernel's parent-death signal would follow the shell, not ``rlhf run``; ``rlhf run`` killed by
    SIGKILL must still take its training step with it.
    """
    import threading

    import psutil

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # killed, not yet reaped
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False

    def watch() -> None:
        while not gone():
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name=f"stop-with-{pid}", daemon=True).start()


def stop_children(grace_s: float = 15.0) -> int:
    """SIGTERM every descendant of this process, SIGKILL those still alive after ``grace_s``."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for c in children:
        with contextlib.suppress(psutil.Error):
            c.terminate()
    deadline = time.monotonic() + grace_s
    _, alive = psutil.wait_procs(children, timeout=max(0.0, deadline - time.monotonic()))
    for c in alive:
        with contextlib.suppress(psutil.Error):
            c.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(children)
