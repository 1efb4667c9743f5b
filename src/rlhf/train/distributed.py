"""torchrun / DDP helpers: the same training code (SFT, reward, PPO) runs on one process or on many.

Launch with ``torchrun --nproc_per_node N -m rlhf.cli ppo ...`` (or a Kubeflow PyTorchJob, which
sets the same environment). Each rank samples its own slice of the global prompt batch with its own
seed (``seed + rank``: docs/ppo.md #24); the policy and the critic are wrapped in
``DistributedDataParallel`` so gradients are averaged and parameters stay identical; advantage
whitening and the logged metrics use statistics reduced over all ranks. Only rank 0 writes:
checkpoints, the final artifact, MLflow and the progress log (other ranks log warnings only).

Backend: NCCL on CUDA, gloo on CPU (the CPU test runs 2 gloo processes). NCCL only takes CUDA
tensors, so every collective here builds or moves its tensor to :func:`collective_device` (the rank's
GPU under NCCL, the CPU under gloo) and copies the result back: docs/ppo.md #26.

The same helpers serve SFT and the reward model (:mod:`rlhf.train.loop`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("rlhf")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group (so we tear it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> DistInfo:
    """Join the process group that torchrun describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), False)
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("RLHF_DIST_BACKEND", "") != "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)  # so that device "cuda" means this rank's GPU
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)
    if not info.is_main:  # rank 0 speaks for everyone
        logging.getLogger("rlhf").setLevel(logging.WARNING)
    return info


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else the model itself."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = next(model.parameters()).device
    kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
    return DDP(model, **kw)


def no_sync(models: list[torch.nn.Module], active: bool):
    """Skip DDP's gradient all-reduce (for gradient-accumulation micro-steps) when ``active``."""
    stack = contextlib.ExitStack()
    if active:
        for m in models:
            if hasattr(m, "no_sync"):
                stack.enter_context(m.no_sync())
    return stack


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where this rank's collective tensors must live: its GPU under NCCL, else the CPU."""
    if _distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op on one process). A tensor on another device than
    :func:`collective_device` is reduced through a copy there, so a CPU tensor works under NCCL too."""
    if _distributed():
        dev = collective_device()
        if t.device == dev:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            buf = t.to(dev)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t.copy_(buf.to(t.device))
    return t


def sum_dict(values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats over ranks: one collective for all keys, on :func:`collective_device`."""
    keys = sorted(values)
    if not _distributed():
        return {k: float(values[k]) for k in keys}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
    all_reduce_sum(t)
    return dict(zip(keys, t.cpu().tolist()))


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself on one process)."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (a one-element list on one process)."""
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def params_digest(*modules: torch.nn.Module) -> str:
    """A hash of the exact bytes of all parameters (to check that ranks hold identical weights)."""
    h = hashlib.sha256()
    for m in modules:
        for name, p in m.named_parameters():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_in_sync(*modules: torch.nn.Module) -> bool:
    """True when every rank's parameters are bit-identical (always True on one process)."""
    digests = gather_objects(params_digest(*modules))
    ok = len(set(digests)) == 1
    if not ok:
        log.error("parameters differ across ranks: %s", digests)
    return ok


__all__ = ["DistInfo", "setup", "teardown", "wrap", "no_sync", "collective_device", "all_reduce_sum", "sum_dict",
           "broadcast_object", "gather_objects", "barrier", "params_digest", "check_in_sync"]
