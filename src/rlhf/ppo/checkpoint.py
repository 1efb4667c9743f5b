"""PPO checkpoints: everything needed to continue a run exactly, written atomically and validated on load.

A checkpoint is a directory ``<root>/step-000010/``::

    policy.safetensors     trainable policy weights (all weights; with LoRA only the adapter)
    critic.safetensors     trainable critic weights (with LoRA: its adapter and value head; critic adapter
                           or shared: the value head, the adapter being in policy.safetensors);
                           absent when the estimator has no critic (rloo, grpo)
    trainer.pt             optimizer + lr-scheduler state (torch.save, loaded with weights_only=True)
    state.json             step, data position, KL controller, per-rank RNG states (python, numpy,
                           torch, CUDA), the metric history, the run fingerprint
    COMPLETE               the marker, written last: sha256 of every file above

It is written into ``<root>/.tmp-step-000010-<pid>/``, fsynced, and renamed into place, so a
``kill -9`` at any moment leaves either the whole checkpoint or a temp dir that is ignored (and
cleaned up). On load the newest checkpoint whose marker exists, whose hashes match and whose
fingerprint (config + inputs) matches this run is used; a corrupt or half-written one is skipped
with a warning in favour of the previous one.

The root defaults to ``<out>.checkpoints`` next to the stage output, so the atomic replacement of
``<out>`` at the end never touches them (set ``ppo.checkpoint_dir`` to put them on a volume that
outlives a Kubeflow pod).

:class:`RunCheckpoints` is the trainer's side: at the start, remove what cannot be resumed and load
the newest checkpoint of the same run (same :func:`fingerprint`); a checkpoint every
``checkpoint_every`` steps; the checkpoints removed once the final artifact is written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf.config import ModelConfig, PPOConfig
from rlhf.errors import ConfigError, UserError
from rlhf.io import no_space_error, out_of_space, read_manifest, sha256_file
from rlhf.train import distributed as D

log = logging.getLogger("rlhf")

MARKER = "COMPLETE"
STATE = "state.json"
TRAINER = "trainer.pt"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
FORMAT = 1


# ----------------------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, CUDA) as JSON-serialisable data."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


# ----------------------------------------------------------------------------- weights


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (all of them, or the LoRA adapter + trainable heads)."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise ValueError(f"checkpoint weights do not match the model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


# ----------------------------------------------------------------------------- write / find / read


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / f"{name}.safetensors"))

    def trainer_state(self) -> dict[str, Any]:
        return torch.load(self.path / TRAINER, map_location="cpu", weights_only=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def save(root: str | Path, step: int, *, weights: dict[str, dict[str, torch.Tensor]], trainer: dict[str, Any],
         state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and keep only the newest ``keep`` ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, tensors in weights.items():
            save_file(tensors, str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
        torch.save(trainer, tmp / TRAINER)
        (tmp / STATE).write_text(json.dumps({"format": FORMAT, "step": step, **state}) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
        for f in files:
            _fsync_file(tmp / f)
        marker = {"step": step, "files": {f: sha256_file(tmp / f) for f in files}}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        _fsync_file(tmp / MARKER)
        _fsync_dir(tmp)
        if final.exists():  # e.g. a run resumed from an older checkpoint reached this step again
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        full = out_of_space(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:  # the previous checkpoints are untouched: say which one a rerun resumes from
            previous = next((p for s, p in _step_dirs(root) if s != step and validate(p) is None), None)
            raise no_space_error(final, what="checkpoint", kept=(
                f"the previous checkpoint {previous} is intact and the same command resumes from it"
                if previous is not None else "no checkpoint was kept")) from None
        raise
    prune(root, keep)
    return final


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints, and temp dirs left by killed writers."""
    for _, p in _step_dirs(root)[max(keep, 1):]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(p, ignore_errors=True)


def validate(path: Path) -> str | None:
    """``None`` when the checkpoint at ``path`` is complete and intact, else what is wrong with it."""
    marker = path / MARKER
    if not marker.is_file():
        return "no COMPLETE marker (half-written)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "unreadable COMPLETE marker"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if sha256_file(f) != digest:
            return f"checksum mismatch in {name}"
    for required in (STATE, TRAINER):
        if required not in files:
            return f"marker does not list {required}"
    return None


def latest(root: str | Path, fingerprint: str) -> Checkpoint | None:
    """The newest valid checkpoint of this run (same fingerprint) under ``root``, or None."""
    for step, path in _step_dirs(Path(root)):
        problem = validate(path)
        if problem:
            log.warning("[ppo] skipping checkpoint %s: %s", path, problem)
            continue
        state = json.loads((path / STATE).read_text())
        if state.get("fingerprint") != fingerprint:
            log.warning("[ppo] skipping checkpoint %s: made with another config or other inputs", path)
            continue
        return Checkpoint(path, step, state)
    return None


def stale(root: str | Path, fingerprint: str) -> list[Path]:
    """The checkpoints under ``root`` made by another run (other config, inputs or rank count)."""
    found = []
    for _, path in _step_dirs(Path(root)):
        try:
            fp = json.loads((path / STATE).read_text()).get("fingerprint")
        except (OSError, ValueError):
            fp = None
        if fp is not None and fp != fingerprint:
            found.append(path)
    return found


def clear_stale(root: str | Path, fingerprint: str) -> int:
    """Delete checkpoints of another run (other config/inputs) so they can never be mixed with this one."""
    paths = stale(root, fingerprint)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return len(paths)


# ----------------------------------------------------------------------------- a run's checkpoints


def fingerprint(cfg: PPOConfig, model_cfg: ModelConfig, inputs: dict[str, str], world_size: int) -> str:
    """What makes two runs the same run (so a checkpoint of one may continue the other)."""
    ignore = {"checkpoint_every", "checkpoint_dir", "keep_checkpoints", "keep_checkpoints_on_success",
              "resume", "replace_stale_checkpoints", "log_every", "snapshot_every"}
    c = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ignore}
    m = {k: v for k, v in model_cfg.model_dump(mode="json").items() if k not in ("cache_dir",)}
    blob = json.dumps({"ppo": c, "model": m, "inputs": inputs, "world_size": world_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def artifact_id(path: str | Path) -> str:
    """An input artifact's identity for :func:`fingerprint`: its content hash, else its resolved path."""
    try:
        return read_manifest(path).get("content_hash") or str(Path(path).resolve())
    except UserError:
        return str(Path(path).resolve())


def checkpoint_root(out: str | Path, cfg: PPOConfig) -> Path:
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir)
    out = Path(out)
    return out.parent / f"{out.name}.checkpoints"


class RunCheckpoints:
    """The checkpoints of one PPO run under ``root``; every rank calls every method (rank 0 writes)."""

    def __init__(self, root: Path, fingerprint: str, cfg: PPOConfig, info: D.DistInfo):
        self.root, self.fingerprint, self.cfg, self.info = root, fingerprint, cfg, info

    def decide(self) -> dict[str, Any]:
        """Rank 0's decision: what to remove, and which checkpoint (if any) every rank resumes from.

        Without ``cfg.resume`` the old checkpoints are removed. Checkpoints of another run (other
        config, inputs or rank count) are removed only with ``cfg.replace_stale_checkpoints``;
        otherwise the run stops and keeps them.
        """
        if not self.cfg.resume:
            if self.root.exists():
                shutil.rmtree(self.root)
            return {"path": None}
        old = stale(self.root, self.fingerprint) if self.root.exists() else []
        if old and not self.cfg.replace_stale_checkpoints:
            return {"error": f"{len(old)} checkpoint(s) in {self.root} belong to another run (changed config, "
                             f"inputs or GPU count), newest {old[0].name}"}
        if old:
            clear_stale(self.root, self.fingerprint)
            log.warning("[ppo] removed %d checkpoint(s) of another run (other config or inputs) from %s",
                        len(old), self.root)
        found = latest(self.root, self.fingerprint)
        return {"path": str(found.path) if found else None, "step": found.step if found else 0}

    def resume(self, policy, critic, opt, sched, kl_ctl) -> tuple[int, list[dict[str, float]]]:
        """Load the checkpoint rank 0 chose (:meth:`decide`, broadcast) into the given objects on every rank:
        ``(its step, its metric history)``; ``(0, [])`` when there is nothing to resume."""
        decision = self.decide() if self.info.is_main else None
        decision = D.broadcast_object(decision)
        if "error" in decision:
            raise ConfigError(decision["error"], where="ppo.checkpoint_dir",
                              hint="set ppo.replace_stale_checkpoints true to delete them, or point "
                                   "ppo.checkpoint_dir elsewhere")
        if decision["path"] is None:
            return 0, []
        path = Path(decision["path"])
        problem = None if self.info.is_main else validate(path)  # rank 0 validated it in decide()
        if problem:  # rank 0 saw it whole; this rank does not (storage that ranks see differently)
            raise RuntimeError(f"rank {self.info.rank} cannot read checkpoint {path} that rank 0 resumes from: "
                               f"{problem}")
        found = Checkpoint(path, decision["step"], json.loads((path / STATE).read_text()))
        load_trainable_state(policy, found.weights("policy"))
        if critic is not None:
            load_trainable_state(critic, found.weights("critic"))
        trainer = found.trainer_state()
        opt.load_state_dict(trainer["optimizer"])
        sched.load_state_dict(trainer["scheduler"])
        kl_ctl.load_state_dict(found.state["kl_controller"])
        restore_rng(found.state["rng"][self.info.rank])
        log.info("[ppo] resuming from %s (step %d/%d)", found.path, found.step, self.cfg.total_steps)
        return found.step, found.state["history"]

    def due(self, step: int) -> bool:
        """Whether to checkpoint after ``step`` (never after the last one: the artifact follows)."""
        every = self.cfg.checkpoint_every
        return bool(every) and step % every == 0 and step < self.cfg.total_steps

    def save(self, step: int, policy, critic, opt, sched, kl_ctl, history: list[dict[str, float]]) -> None:
        """Checkpoint after ``step``: ``policy`` and ``critic`` (None: no critic) unwrapped (no DDP prefix in
        the names)."""
        rng = D.gather_objects(capture_rng())  # every rank's RNG, written by rank 0
        if self.info.is_main:
            t0 = time.perf_counter()
            world = self.info.world_size
            path = save(self.root, step,
                        weights={"policy": trainable_state(policy),
                                 **({"critic": trainable_state(critic)} if critic is not None else {})},
                        trainer={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                        state={"fingerprint": self.fingerprint,
                               "data_position": step * self.cfg.rollout_batch_size * world,
                               "kl_controller": kl_ctl.state_dict(), "rng": rng, "history": history,
                               "world_size": world},
                        keep=self.cfg.keep_checkpoints)
            log.info("[ppo] checkpoint %s (%.1fs)", path, time.perf_counter() - t0)
        D.barrier()

    def remove(self) -> None:
        """After success (rank 0): remove the checkpoints unless ``keep_checkpoints_on_success``."""
        if not self.cfg.keep_checkpoints_on_success:
            shutil.rmtree(self.root, ignore_errors=True)


__all__ = ["Checkpoint", "save", "latest", "validate", "prune", "stale", "clear_stale", "capture_rng", "restore_rng",
           "trainable_state", "load_trainable_state", "step_name", "fingerprint", "artifact_id",
           "checkpoint_root", "RunCheckpoints"]
