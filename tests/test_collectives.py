"""Every collective puts its tensor on the rank's device (docs/ppo.md #26).

NCCL refuses CPU tensors ("No backend type associated with device type cpu"), and a gloo test on CPU
cannot see that: there every device is the CPU. So here the process group is simulated as a
2-rank NCCL group whose rank device is ``meta`` (a device that is not the CPU and exists without a
GPU); the group's ``all_reduce`` records the device of each tensor it is handed and stops the caller
(a meta tensor holds no values to continue with). Each code path that reduces must hand over a
tensor on that device, never a CPU one.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from rlhf.config import PPOConfig
from rlhf.ppo import metrics
from rlhf.train import distributed as D

RANK_DEVICE = torch.device("meta")


class Handed(Exception):
    """Raised by the simulated collective once it has seen its tensor."""


@pytest.fixture
def nccl_group(monkeypatch):
    seen: list[torch.device] = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        seen.append(tensor.device)
        raise Handed

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    # the rank's GPU under NCCL (torch.cuda.current_device() in a real run)
    monkeypatch.setattr(D, "collective_device", lambda: RANK_DEVICE, raising=False)
    return seen


def test_sum_dict_reduces_on_the_rank_device(nccl_group):
    with pytest.raises(Handed):
        D.sum_dict({"a": 1.0, "b": 2.0})
    assert nccl_group == [RANK_DEVICE]


def test_all_reduce_sum_moves_a_cpu_tensor_to_the_rank_device(nccl_group):
    with pytest.raises(Handed):
        D.all_reduce_sum(torch.ones(3, dtype=torch.float64))
    assert nccl_group == [RANK_DEVICE]


def test_whitening_statistics_reduce_on_the_rank_device(nccl_group):
    from rlhf.ppo import loss as L

    with pytest.raises(Handed):
        L.masked_whiten(torch.randn(2, 4), torch.ones(2, 4), all_reduce=D.all_reduce_sum)
    assert nccl_group == [RANK_DEVICE]


def test_step_log_reduces_all_its_metrics_on_the_rank_device(nccl_group, monkeypatch):
    """The per-step metrics (experience sums, update means, generation time) of PPO's StepLog.record."""
    monkeypatch.setattr(metrics, "experience_stats", lambda exp: {"n": 4.0, "tokens": 16.0})
    info = D.DistInfo(rank=0, world_size=2)
    book = metrics.StepLog(SimpleNamespace(log_metrics=lambda *a, **k: None), PPOConfig(), info, [], 0)
    exp = SimpleNamespace(response_ids=torch.zeros(4, 4, dtype=torch.long))  # rollouts on the CPU
    with pytest.raises(Handed):
        book.record(1, exp, {"policy_loss": 0.1}, beta=0.05, lr=1e-5, gen_seconds=0.5)
    assert nccl_group == [RANK_DEVICE]
    assert torch.device("cpu") not in nccl_group


def test_collective_device_is_the_cpu_without_a_group():
    assert D.collective_device() == torch.device("cpu")
