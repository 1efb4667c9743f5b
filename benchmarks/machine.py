"""What the machine can do, measured in the benchmark's own run (shared by the benchmark scripts)."""

from __future__ import annotations

import time


def matmul_gflops(n: int = 1024, seconds: float = 3.0) -> float:
    """The fp32 GFLOP/s a large torch matmul reaches here (this process's threads): the machine's matmul limit."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
