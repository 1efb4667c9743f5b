"""Pieces every training loop here shares: seeding, optimizer + schedule, progress lines, batching."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger("rlhf")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, eps: float = 1e-8):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps)


def make_scheduler(optimizer, total_steps: int, warmup_ratio: float = 0.0, kind: str = "cosine"):
    """Linear warm-up, then cosine (or linear) decay to 10 % of the peak learning rate."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return 0.1 + 0.9 * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batches(n: int, batch_size: int, *, shuffle: bool, rng: random.Random | None = None) -> Iterator[list[int]]:
    order = list(range(n))
    if shuffle:
        (rng or random).shuffle(order)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, fill: int | None = None) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    value = pad_id if fill is None else fill
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A line per ``every`` steps: ``[stage] step 20/200 loss=1.234 tok/s=5,120 eta=0:01:10``."""

    def __init__(self, stage: str, total: int, every: int = 10):
        self.stage, self.total, self.every = stage, total, every
        self.start = time.perf_counter()
        self.tokens = 0

    def step(self, step: int, metrics: dict[str, Any], tokens: int = 0) -> dict[str, float]:
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        rate = {"tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0}
        if step == 1 or step % self.every == 0 or step == self.total:
            eta = elapsed / step * (self.total - step)
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            log.info("[%s] step %d/%d %s tok/s=%s eta=%s", self.stage, step, self.total, shown,
                     f"{rate['tokens_per_s']:,.0f}", fmt_duration(eta))
        return rate

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
