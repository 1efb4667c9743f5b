"""Policy snapshots along a PPO run, for evaluate's over-optimisation curve (gold and reward vs KL).

Every ``snapshot_every`` steps rank 0 saves the policy's trainable weights -- the LoRA adapter with
LoRA, every parameter with full fine-tuning -- as ``step-NNNNNN/policy.safetensors`` (+ ``snapshot.json``)
in a staging directory under the checkpoint root (``<checkpoint root>/snapshots``), so a run resumed
from a checkpoint keeps the snapshots taken before it. With the final artifact they are copied into
``<out>/snapshots/`` and listed in ``snapshots/index.json`` and in the manifest (``snapshots``), together
with the run's per-step metrics in ``<out>/ppo_steps.jsonl``. Unlike checkpoints they are part of the
stage's output and stay.

:func:`load` is evaluate's side: the SFT policy with a snapshot's weights on top (a LoRA snapshot merged).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlhf.config import ModelConfig, PPOConfig
from rlhf.errors import UserError
from rlhf.ppo import checkpoint as ckpt
from rlhf.train import distributed as D
from rlhf.train.checkpoint import step_dirs  # the step-NNNNNN folders, newest first

log = logging.getLogger("rlhf")

DIR = "snapshots"
INDEX = "index.json"
META = "snapshot.json"
WEIGHTS = "policy.safetensors"
STEPS_FILE = "ppo_steps.jsonl"
FORMAT = 1


def staging_root(out: str | Path, cfg: PPOConfig) -> Path:
    return ckpt.checkpoint_root(out, cfg) / DIR


def _staged(root: Path) -> list[tuple[int, Path]]:
    return sorted(step_dirs(root))


class RunSnapshots:
    """The snapshots of one PPO run; every rank may call every method (only rank 0 writes)."""

    def __init__(self, out: str | Path, cfg: PPOConfig, model_cfg: ModelConfig, fingerprint: str,
                 start_step: int, info: D.DistInfo):
        self.root, self.cfg, self.info = staging_root(out, cfg), cfg, info
        self.fingerprint, self.lora = fingerprint, bool(model_cfg.lora)
        self.model = model_cfg.model_dump(mode="json")
        if info.is_main:
            self._keep_resumable(start_step)

    def _keep_resumable(self, start_step: int) -> None:
        """Keep only snapshots of this run taken up to the step it resumes from (later ones are taken again)."""
        for step, path in _staged(self.root):
            try:
                fp = json.loads((path / META).read_text()).get("fingerprint")
            except (OSError, ValueError):
                fp = None
            if step > start_step or fp != self.fingerprint:
                shutil.rmtree(path, ignore_errors=True)
        for p in self.root.glob(".tmp-*") if self.root.is_dir() else ():
            shutil.rmtree(p, ignore_errors=True)

    def due(self, step: int) -> bool:
        """After ``step``? Never after the last one: the stage's output is that point."""
        every = self.cfg.snapshot_every
        return bool(every) and step % every == 0 and step < self.cfg.total_steps

    def save(self, step: int, policy: torch.nn.Module, metrics: dict[str, float]) -> None:
        """Rank 0: the (unwrapped) policy's trainable weights after ``step``, with the step's metrics."""
        if not self.info.is_main:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / ckpt.step_name(step)
        tmp = self.root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # the policy's own weights: not the critic's / reward model's adapters riding on the same base
        other = [f".{name}." for name in getattr(policy, "peft_config", {}) if name != "default"]
        weights = {n: t for n, t in ckpt.trainable_state(policy).items() if not any(o in n for o in other)}
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        keep = ("score", "gold", "kl", "entropy", "response_length")
        (tmp / META).write_text(json.dumps({"format": FORMAT, "step": step, "fingerprint": self.fingerprint,
                                            "lora": self.lora,
                                            "metrics": {k: metrics[k] for k in keep if k in metrics}}) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)

    def publish(self, out_tmp: Path, history: list[dict[str, float]]) -> dict[str, Any]:
        """Copy the snapshots into the output being written, with the index and the per-step metrics;
        the manifest's entries for them."""
        dest = out_tmp / DIR
        dest.mkdir(parents=True, exist_ok=True)
        steps = []
        for step, path in _staged(self.root):
            shutil.copytree(path, dest / path.name, copy_function=_link_or_copy)
            steps.append({"step": step, "path": f"{DIR}/{path.name}"})
        (dest / INDEX).write_text(json.dumps({"format": FORMAT, "lora": self.lora, "model": self.model,
                                              "total_steps": self.cfg.total_steps, "snapshots": steps},
                                             indent=1) + "\n")
        with open(out_tmp / STEPS_FILE, "w", encoding="utf-8") as f:
            for i, m in enumerate(history, 1):
                f.write(json.dumps({"step": i, **m}, allow_nan=True) + "\n")
        return {"snapshots": {"index": f"{DIR}/{INDEX}", "steps": [s["step"] for s in steps],
                              "every": self.cfg.snapshot_every},
                "step_metrics": STEPS_FILE}


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the staging directory is on the same file system (snapshots can be large)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ----------------------------------------------------------------------------- evaluate's side


def index(policy_dir: str | Path) -> dict[str, Any] | None:
    """The snapshot index of a PPO output, or None (not a PPO output, or made before snapshots existed)."""
    f = Path(policy_dir) / DIR / INDEX
    return json.loads(f.read_text()) if f.is_file() else None


def step_metrics(policy_dir: str | Path) -> list[dict[str, float]]:
    """A PPO output's per-step metrics (``ppo_steps.jsonl``), or [] when it has none."""
    f = Path(policy_dir) / STEPS_FILE
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def load(policy_dir: str | Path, entry: dict[str, Any], idx: dict[str, Any], sft_model: str | Path,
         model_cfg: ModelConfig):
    """The policy of snapshot ``entry`` (from ``idx``): the SFT policy with the snapshot's weights on top
    (a LoRA adapter merged into it), ready for sampling; and its tokenizer."""
    from rlhf.train import models

    plain = model_cfg.model_copy(update={"lora": False})
    model, tok = models.load_policy(sft_model, plain, for_training=False)
    tensors = load_file(str(Path(policy_dir) / entry["path"] / WEIGHTS))
    if idx.get("lora"):
        from peft import get_peft_model

        run_cfg = ModelConfig(**{**idx["model"], "cache_dir": model_cfg.cache_dir})
        model = get_peft_model(model, models._lora_config(run_cfg, "CAUSAL_LM"))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise UserError(f"PPO snapshot {entry['path']} does not fit the baseline policy (unexpected weights "
                        f"{unknown[:3]})", where=str(Path(policy_dir) / entry["path"]),
                        hint="pass the SFT policy the PPO run started from as the baseline, or set "
                             "evaluate.curve_prompts 0")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    if idx.get("lora"):
        model = model.merge_and_unload()
    model.eval().requires_grad_(False)
    return model, tok


__all__ = ["RunSnapshots", "staging_root", "index", "step_metrics", "load", "STEPS_FILE"]
