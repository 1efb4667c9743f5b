"""CPU threads per step: fewer on a busy machine (``rlhf run`` and the stage commands)."""

from __future__ import annotations

import os
import time


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
