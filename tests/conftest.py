"""Shared fixtures: the demo data and its prepared dataset (built once per test session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# MLflow is exercised by the tracking/registry/server tests, which switch it on themselves; elsewhere it is
# off so no test writes an mlflow.db into the working tree
os.environ.setdefault("RLHF_TRACKING", "off")

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | str | None = None, env: dict | None = None,
            timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `rlhf ...` as a user would (a real process: real exit code, real stderr)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=cwd or ROOT, env=full_env,
                          text=True, capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> Path:
    from rlhf import demo

    out = tmp_path_factory.mktemp("raw")
    demo.generate(out)
    return out


@pytest.fixture(scope="session")
def dataset(demo_raw, tmp_path_factory) -> Path:
    from rlhf.config import PrepareConfig
    from rlhf.data import prepare

    out = tmp_path_factory.mktemp("ds") / "dataset"
    prepare(demo_raw, out, PrepareConfig(eval_fraction=0.12))
    return out


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory):
    """The tiny profile, cached in a per-session directory."""
    from rlhf.config import ModelConfig

    return ModelConfig(name="tiny", cache_dir=str(tmp_path_factory.mktemp("model-cache")))


@pytest.fixture(scope="session")
def sft_model(dataset, tiny_cfg, tmp_path_factory) -> Path:
    """A tiny SFT policy trained briefly on the demo data (shared by the stage, PPO and pipeline tests)."""
    from rlhf.config import SFTConfig
    from rlhf.sft import train_sft

    os.environ["RLHF_TRACKING"] = "off"
    out = tmp_path_factory.mktemp("sft") / "policy"
    train_sft(dataset, out, SFTConfig(max_steps=120, batch_size=16, lr=3e-3, eval_max_rows=64), tiny_cfg)
    return out


@pytest.fixture(scope="session")
def reward_model(dataset, sft_model, tiny_cfg, tmp_path_factory) -> Path:
    from rlhf.config import RewardConfig
    from rlhf.reward import train_reward

    os.environ["RLHF_TRACKING"] = "off"
    out = tmp_path_factory.mktemp("rm") / "reward"
    train_reward(dataset, sft_model, out, RewardConfig(max_steps=120, batch_size=16, lr=1e-3, eval_max_rows=128,
                                                       gold_pairs=200), tiny_cfg)
    return out
