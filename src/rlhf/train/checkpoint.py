"""Training checkpoints (SFT, reward model, PPO): everything needed to continue a run exactly, written
atomically and validated on load.

A checkpoint is a directory ``<root>/step-000010/``::

    <name>.safetensors     trainable weights of each model (all weights; with LoRA only the adapter):
                           ``model`` for SFT and the reward model, ``policy`` and ``critic`` for PPO
    trainer.pt             optimizer + lr-scheduler (+ fp16 grad scaler) state (torch.save, loaded with
                           weights_only=True)
    state.json             step, data position, per-rank RNG states (python, numpy, torch, CUDA), the
                           run fingerprint, and what the stage adds (PPO: KL controller, metric history)
    COMPLETE               the marker, written last: sha256 of every file above

It is written into ``<root>/.tmp-step-000010-<pid>/``, fsynced, and renamed into place, so a
``kill -9`` at any moment leaves either the whole checkpoint or a temp dir that is ignored (and
cleaned up). On load the newest checkpoint whose marker exists, whose hashes match and whose
fingerprint (config + inputs + rank count) matches this run is used; a corrupt or half-written one
is skipped with a warning in favour of the previous one.

The root defaults to ``<out>.checkpoints`` next to the stage output, so the atomic replacement of
``<out>`` at the end never touches them (set ``<stage>.checkpoint_dir`` to put them on a volume that
outlives a Kubeflow pod).

:class:`RunCheckpoints` is a stage's side: at the start, remove what cannot be resumed and load the
newest checkpoint of the same run (same :func:`fingerprint`); a checkpoint every ``checkpoint_every``
steps; the checkpoints removed once the final artifact is written (unless
``keep_checkpoints_on_success``). The PPO layer is :mod:`rlhf.ppo.checkpoint`; SFT and the reward
model use :class:`RunCheckpoints` through :func:`rlhf.train.loop.train_steps`.
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

from rlhf.config.schema import RUN_ONLY_FIELDS
from rlhf.errors import ConfigError, UserError
from rlhf.io import no_space_error, out_of_space, read_manifest, sha256_file
from rlhf.train import distributed as D

log = logging.getLogger("rlhf")

MARKER = "COMPLETE"
STATE = "state.json"
TRAINER = "trainer.pt"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
FORMAT = 1
#: config fields that do not change what a run computes (left out of :func:`fingerprint`)
NOT_FINGERPRINTED = RUN_ONLY_FIELDS | {"snapshot_every"}  # PPO's snapshots: a rerun with another interval is the same run


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
            previous = next((p for s, p in step_dirs(root) if s != step and validate(p) is None), None)
            raise no_space_error(final, what="checkpoint", kept=(
                f"the previous checkpoint {previous} is intact and the same command resumes from it"
                if previous is not None else "no checkpoint was kept")) from None
        raise
    prune(root, keep)
    return final


def step_dirs(root: Path) -> list[tuple[int, Path]]:
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
    for _, p in step_dirs(root)[max(keep, 1):]:
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


def latest(root: str | Path, fingerprint: str, stage: str = "ppo") -> Checkpoint | None:
    """The newest valid checkpoint of this run (same fingerprint) under ``root``, or None."""
    for step, path in step_dirs(Path(root)):
        problem = validate(path)
        if problem:
            log.warning("[%s] skipping checkpoint %s: %s", stage, path, problem)
            continue
        state = json.loads((path / STATE).read_text())
        if state.get("fingerprint") != fingerprint:
            log.warning("[%s] skipping checkpoint %s: made with another config or other inputs", stage, path)
            continue
        return Checkpoint(path, step, state)
    return None


def stale(root: str | Path, fingerprint: str) -> list[Path]:
    """The checkpoints under ``root`` made by another run (other config, inputs or rank count)."""
    found = []
    for _, path in step_dirs(Path(root)):
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


def fingerprint(section: str, cfg: Any, model_cfg: Any, inputs: dict[str, str], world_size: int) -> str:
    """What makes two runs of a stage the same run (so a checkpoint of one may continue the other):
    the stage's config (``section``) but for the checkpoint settings, the model config, the inputs'
    identities (:func:`artifact_id`) and the rank count."""
    c = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_FINGERPRINTED}
    m = {k: v for k, v in model_cfg.model_dump(mode="json").items() if k not in ("cache_dir",)}
    blob = json.dumps({section: c, "model": m, "inputs": inputs, "world_size": world_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def artifact_id(path: str | Path) -> str:
    """An input artifact's identity for :func:`fingerprint`: its content hash, else its resolved path."""
    try:
        return read_manifest(path).get("content_hash") or str(Path(path).resolve())
    except UserError:
        return str(Path(path).resolve())


def checkpoint_root(out: str | Path, cfg: Any) -> Path:
    """``cfg.checkpoint_dir``, else ``<out>.checkpoints`` beside the output."""
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir)
    out = Path(out)
    return out.parent / f"{out.name}.checkpoints"


class RunCheckpoints:
    """The checkpoints of one run of ``stage`` under ``root``; every rank calls every method (rank 0 writes).

    ``cfg`` carries the checkpoint settings (``checkpoint_every``, ``keep_checkpoints``,
    ``keep_checkpoints_on_success``, ``resume``, ``replace_stale_checkpoints``); ``total_steps``: the
    run's last step (never checkpointed: the artifact follows).
    """

    def __init__(self, root: Path, fingerprint: str, cfg: Any, info: D.DistInfo, *, stage: str, total_steps: int):
        self.root, self.fingerprint, self.cfg, self.info = Path(root), fingerprint, cfg, info
        self.stage, self.total_steps = stage, total_steps

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
            log.warning("[%s] removed %d checkpoint(s) of another run (other config or inputs) from %s",
                        self.stage, len(old), self.root)
        found = latest(self.root, self.fingerprint, self.stage)
        return {"path": str(found.path) if found else None, "step": found.step if found else 0}

    def load(self) -> Checkpoint | None:
        """The checkpoint rank 0 chose (:meth:`decide`, broadcast), with this rank's RNG states restored;
        None when there is nothing to resume. The caller loads its weights and trainer state."""
        decision = self.decide() if self.info.is_main else None
        decision = D.broadcast_object(decision)
        if "error" in decision:
            raise ConfigError(decision["error"], where=f"{self.stage}.checkpoint_dir",
                              hint=f"set {self.stage}.replace_stale_checkpoints true to delete them, or point "
                                   f"{self.stage}.checkpoint_dir elsewhere")
        if decision["path"] is None:
            return None
        path = Path(decision["path"])
        problem = None if self.info.is_main else validate(path)  # rank 0 validated it in decide()
        if problem:  # rank 0 saw it whole; this rank does not (storage that ranks see differently)
            raise RuntimeError(f"rank {self.info.rank} cannot read checkpoint {path} that rank 0 resumes from: "
                               f"{problem}")
        found = Checkpoint(path, decision["step"], json.loads((path / STATE).read_text()))
        restore_rng(found.state["rng"][self.info.rank])
        log.info("[%s] resuming from %s (step %d/%d)", self.stage, found.path, found.step, self.total_steps)
        return found

    def due(self, step: int) -> bool:
        """Whether to checkpoint after ``step`` (never after the last one: the artifact follows)."""
        every = self.cfg.checkpoint_every
        return bool(every) and step % every == 0 and step < self.total_steps

    def write(self, step: int, weights: dict[str, torch.nn.Module], trainer: dict[str, Any],
              state: dict[str, Any]) -> None:
        """Checkpoint after ``step``: each model of ``weights`` unwrapped (no DDP prefix in the names)."""
        rng = D.gather_objects(capture_rng())  # every rank's RNG, written by rank 0
        if self.info.is_main:
            t0 = time.perf_counter()
            path = save(self.root, step, weights={k: trainable_state(m) for k, m in weights.items()},
                        trainer=trainer,
                        state={"fingerprint": self.fingerprint, "rng": rng, "world_size": self.info.world_size,
                               **state},
                        keep=self.cfg.keep_checkpoints)
            log.info("[%s] checkpoint %s (%.1fs)", self.stage, path, time.perf_counter() - t0)
        D.barrier()

    def remove(self) -> None:
        """After success (rank 0): remove the checkpoints unless ``keep_checkpoints_on_success``."""
        if not self.cfg.keep_checkpoints_on_success:
            shutil.rmtree(self.root, ignore_errors=True)


__all__ = ["Checkpoint", "save", "latest", "validate", "prune", "stale", "clear_stale", "capture_rng", "restore_rng",
           "trainable_state", "load_trainable_state", "step_name", "fingerprint", "artifact_id",
           "checkpoint_root", "RunCheckpoints", "NOT_FINGERPRINTED"]
