"""What `rlhf run --resume` may reuse (rlhf.pipeline.reuse): only a whole output of the same stage made
from the same inputs and config; anything else is rerun. Real artifacts (the session's tiny SFT
policy and dataset), no pipeline run."""

from __future__ import annotations

import json
import shutil

import yaml

from rlhf.config import SFTConfig
from rlhf.config.resolve import RunConfig
from rlhf.pipeline import reuse

SFT = {"max_steps": 120, "batch_size": 16, "lr": 3e-3, "eval_max_rows": 64}  # the sft_model fixture's config


def _run(tiny_cfg, **sft) -> RunConfig:
    return RunConfig.from_text(yaml.safe_dump({"model": tiny_cfg.model_dump(mode="json"), "sft": {**SFT, **sft}}))


def _earlier(tmp_path, sft_model):
    """An earlier attempt's sft output, laid out as the KFP local runner does: <root>/<job>/<task>/<output>."""
    art = tmp_path / "kfp" / "rlhf-pipeline-1" / "sft" / "model"
    shutil.copytree(sft_model, art)
    return art


def test_a_whole_output_of_the_same_inputs_and_config_is_reused(sft_model, dataset, tiny_cfg, tmp_path,
                                                                  monkeypatch):
    earlier = _earlier(tmp_path, sft_model)
    out = tmp_path / "kfp" / "rlhf-pipeline-2" / "sft" / "model"
    monkeypatch.setenv(reuse.ENV, str(tmp_path / "kfp"))
    metrics = reuse.reuse_output("sft", {"dataset": str(dataset)}, out, _run(tiny_cfg))
    assert metrics == json.loads((sft_model / "manifest.json").read_text())["metrics"]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(p.relative_to(earlier)
                                                                       for p in earlier.rglob("*"))
    monkeypatch.delenv(reuse.ENV)
    assert reuse.reuse_output("sft", {"dataset": str(dataset)}, tmp_path / "o", _run(tiny_cfg)) is None, \
        "only under rlhf run --resume"


def test_anything_else_is_not_reused(sft_model, dataset, demo_raw, tiny_cfg, tmp_path):
    art = _earlier(tmp_path, sft_model)
    cfgs = [SFTConfig(**SFT), tiny_cfg]
    assert reuse.mismatch(art, "sft", "policy", {"dataset": dataset}, cfgs) is None
    assert reuse.mismatch(art, "sft", "policy", {"dataset": dataset}, [SFTConfig(**{**SFT, "lr": 1e-3}), tiny_cfg]) \
        == "made with another sft config"
    assert reuse.mismatch(art, "sft", "policy", {"dataset": dataset},
                          [SFTConfig(**SFT), tiny_cfg.model_copy(update={"tiny_layers": 3})]) \
        == "made with another model config"
    assert reuse.mismatch(art, "sft", "policy", {"dataset": demo_raw}, cfgs) == "made from other inputs"
    assert "stage" in reuse.mismatch(art, "ppo", "policy", {"dataset": dataset}, cfgs)
    assert reuse.mismatch(art, "sft", "policy", {"dataset": dataset},
                          [SFTConfig(**SFT, checkpoint_every=3, log_every=1), tiny_cfg]) is None, \
        "checkpoint and logging settings do not change the output"
    (art / "config.json").write_text((art / "config.json").read_text() + " ")  # a changed file
    assert reuse.mismatch(art, "sft", "policy", {"dataset": dataset}, cfgs) == \
        "its files do not match the manifest's content hash"
    (art / "manifest.json").unlink()  # a half-written output has no manifest
    assert reuse.mismatch(art, "sft", "policy", {"dataset": dataset}, cfgs) == "no readable manifest.json"


def test_resume_without_a_run_directory_is_one_line(demo_raw, tmp_path):
    from conftest import ROOT, run_cli

    env = {"RLHF_TRACKING": "off", "RLHF_PROFILE": ""}
    base = ["run", "--raw", str(demo_raw), "--params", str(ROOT / "params.yaml")]
    r = run_cli(*base, "--resume", "--runs-dir", str(tmp_path / "runs"), env=env, timeout=300)
    assert r.returncode == 2 and "no run directory to resume in" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli(*base, "--run-dir", str(tmp_path), env=env, timeout=300)
    assert r.returncode == 2 and "is not a run directory of `rlhf run`" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists() and list(tmp_path.iterdir()) == [], "nothing written"
