"""Mixed precision for every training loop here (SFT, reward, PPO): docs/ppo.md #27.

* trainable weights and the optimizer state are fp32 (``models`` loads a model for training in fp32);
* the forward passes run under ``torch.autocast`` in the compute dtype that :func:`rlhf.train.models.pick_dtype`
  chooses (bf16 on CUDA where supported, else fp16; fp32 on CPU unless ``model.dtype`` says otherwise);
* with fp16, a ``GradScaler`` scales the loss and unscales the gradients before clipping, and skips
  steps whose gradients overflowed;
* frozen models (the reference policy, the reward model) are loaded in the compute dtype directly.

``Precision.off()`` (fp32) makes every method a plain no-op wrapper, so one code path serves all cases.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Precision:
    device_type: str = "cpu"
    dtype: torch.dtype = torch.float32
    scaler: Any = field(default=None, repr=False)

    @classmethod
    def off(cls) -> Precision:
        return cls()

    @classmethod
    def for_device(cls, device: torch.device | str, dtype: torch.dtype) -> Precision:
        """Autocast to ``dtype`` on ``device``; a gradient scaler when ``dtype`` is fp16."""
        device_type = torch.device(device).type
        scaler = torch.amp.GradScaler(device_type) if dtype == torch.float16 else None
        return cls(device_type, dtype, scaler)

    @property
    def enabled(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self):
        """The context for forward passes (a no-op in fp32)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Before clipping: gradients back to their true scale (fp16 only)."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        """The optimizer step (skipped by the scaler when fp16 gradients overflowed)."""
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def for_model(model: torch.nn.Module, cfg) -> Precision:
    """The precision of training ``model`` (loaded by :mod:`rlhf.train.models`) under model config ``cfg``."""
    from rlhf.train.models import pick_dtype

    device = next(model.parameters()).device
    return Precision.for_device(device, pick_dtype(cfg, device))


__all__ = ["Precision", "for_model"]
