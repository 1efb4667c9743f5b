"""Component bodies called directly (``.python_func``) with real KFP artifact objects on local paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

from rlhf.config import resolve
from rlhf.data import remote as data_remote
from rlhf.errors import ConfigError, ValidationFailed  # noqa: E402
from rlhf.pipeline import dag, steps


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch):
    monkeypatch.setenv("RLHF_TRACKING", "off")


@pytest.fixture(scope="module")
def c():
    return dag.build("example/rlhf:1")


@pytest.fixture(scope="module")
def params_yaml() -> str:
    return (ROOT / "params.yaml").read_text()


def art(cls, tmp_path: Path, name: str):
    return cls(name=name, uri=str(tmp_path / name))


def test_components_are_lightweight_and_self_contained(c):
    assert set(c.stages) == set(steps.STAGE_NAMES)
    assert set(c.multinode) == set(steps.TRAINING_STAGES)
    for name, comp in {**c.stages, **{f"{k}-multinode": v for k, v in c.multinode.items()}}.items():
        container = comp.component_spec.implementation.container
        assert container.image.startswith("example/rlhf:1"), name
        assert "pip install" not in " ".join(container.command), name
        # the body only uses what it imports itself (it runs alone in the container)
        src = comp.component_spec.implementation.container.command[-1]
        assert "from rlhf.pipeline import steps" in src, name


def test_prepare_and_validate_bodies(c, demo_raw, tmp_path, params_yaml):
    dataset, metrics = art(Dataset, tmp_path, "dataset"), art(Metrics, tmp_path, "metrics")
    c.prepare.python_func(raw_data=str(demo_raw), data_hash="", data_revision="abc", params_yaml=params_yaml,
                          profile="tiny", overrides={}, dataset=dataset, metrics=metrics)
    manifest = json.loads((Path(dataset.path) / "manifest.json").read_text())
    assert manifest["kind"] == "dataset"
    assert dataset.metadata["content_hash"] == manifest["content_hash"]
    assert metrics.metadata["sft_train_rows"] > 0
    assert (Path(dataset.path) / "sft" / "train.parquet").exists()

    validation, report, vm = art(Artifact, tmp_path, "validation"), art(HTML, tmp_path, "report.html"), \
        art(Metrics, tmp_path, "vmetrics")
    c.validate.python_func(dataset=dataset, params_yaml=params_yaml, profile="", overrides={},
                           validation=validation, report=report, metrics=vm)
    assert vm.metadata["failed"] == 0 and vm.metadata["passed"] == 1
    assert "<html" in Path(report.path).read_text().lower()
    assert (Path(validation.path) / "validation.json").exists()


def test_validate_body_raises_on_bad_data(c, demo_raw, tmp_path, params_yaml):
    """The step fails (so the pipeline stops before SFT) with the validation message."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in ("sft", "preferences", "prompts"):
        lines = (demo_raw / f"{f}.jsonl").read_text().splitlines()[:10]
        (raw / f"{f}.jsonl").write_text("\n".join(lines) + "\n")
    dataset = art(Dataset, tmp_path, "dataset")
    c.prepare.python_func(raw_data=str(raw), data_hash="", data_revision="", params_yaml=params_yaml, profile="",
                          overrides={}, dataset=dataset, metrics=art(Metrics, tmp_path, "m"))
    with pytest.raises(ValidationFailed, match="data validation failed"):
        c.validate.python_func(dataset=dataset, params_yaml=params_yaml, profile="", overrides={},
                               validation=art(Artifact, tmp_path, "v"), report=art(HTML, tmp_path, "r.html"),
                               metrics=art(Metrics, tmp_path, "vm"))
    assert (tmp_path / "v" / "report.md").exists(), "the report is written before the step fails"


def test_prepare_body_fetches_the_dvc_version_without_git(c, demo_raw, tmp_path, params_yaml, monkeypatch):
    """On a cluster prepare gets data/raw by its DVC hash straight from the remote's files/md5 layout."""
    import hashlib

    remote = tmp_path / "remote"
    entries = []
    for f in sorted(demo_raw.iterdir()):
        md5 = hashlib.md5(f.read_bytes()).hexdigest()
        (remote / "files/md5" / md5[:2]).mkdir(parents=True, exist_ok=True)
        (remote / "files/md5" / md5[:2] / md5[2:]).write_bytes(f.read_bytes())
        entries.append({"md5": md5, "relpath": f.name})
    listing = json.dumps(entries).encode()
    dir_md5 = hashlib.md5(listing).hexdigest()
    (remote / "files/md5" / dir_md5[:2]).mkdir(parents=True, exist_ok=True)
    (remote / "files/md5" / dir_md5[:2] / (dir_md5[2:] + ".dir")).write_bytes(listing)
    monkeypatch.setenv("DVC_REMOTE_URL", str(remote))
    dataset = art(Dataset, tmp_path, "dataset")
    c.prepare.python_func(raw_data="", data_hash=dir_md5 + ".dir", data_revision="", params_yaml=params_yaml,
                          profile="", overrides={}, dataset=dataset, metrics=art(Metrics, tmp_path, "m"))
    assert (Path(dataset.path) / "prompts" / "eval.parquet").exists()
    with pytest.raises(Exception, match="not in the DVC remote"):
        data_remote.fetch_raw("0" * 32, str(remote), tmp_path / "none")


def test_register_body_without_tracking_writes_a_receipt(c, tmp_path, params_yaml):
    reg, m = art(Artifact, tmp_path, "registration"), art(Metrics, tmp_path, "m")
    c.register.python_func(policy=art(Model, tmp_path, "p"), reward_model=art(Model, tmp_path, "r"),
                           evaluation=art(Artifact, tmp_path, "e"), params_yaml=params_yaml, profile="",
                           run_id="r", overrides={}, registered_model_name="my-policy", data_hash="h",
                           data_revision="rev", registration=reg, metrics=m)
    receipt = json.loads((Path(reg.path) / "registration.json").read_text())
    assert receipt["registered"] is False and receipt["model_name"] == "my-policy"
    assert receipt["data_hash"] == "h" and "tracking is off" in receipt["reason"]


def test_knobs_override_params_and_empty_means_unchanged(tmp_path, params_yaml, monkeypatch):
    monkeypatch.delenv("RLHF_PROFILE", raising=False)  # an earlier component body set it, as in a pod
    assert resolve.knob_overrides({"model_name": "", "lora": "", "sft_max_steps": 0}) == {}
    k = resolve.merge_overrides({"ppo": {"lr": 1e-4}, "evaluate": {"n_prompts": 3}}, resolve.knob_overrides(
        {"model_name": "smollm2-135m", "lora": "true", "ppo_total_steps": 7, "ppo_kl_coef": 0.0}))
    assert k == {"ppo": {"lr": 1e-4, "total_steps": 7, "kl_coef": 0.0}, "evaluate": {"n_prompts": 3},
                 "model": {"name": "smollm2-135m", "lora": True}}
    assert resolve.knob_overrides({"sft_max_steps": 5}) == {"sft": {"max_steps": 5}}
    with pytest.raises(ConfigError, match="lora"):
        resolve.knob_overrides({"lora": "maybe"})

    from rlhf.config import ModelConfig, SFTConfig

    p = resolve.RunConfig.from_text(params_yaml, profile="tiny").write(tmp_path / "a")
    assert resolve.load_stage(ModelConfig, "model", p, None).name == "tiny"
    assert resolve.load_stage(SFTConfig, "sft", p, {"max_steps": 5}).max_steps == 5
    p = resolve.RunConfig.from_text(params_yaml, profile="none").write(tmp_path / "b")
    assert "profile" not in yaml.safe_load(p.read_text())
    assert resolve.load_stage(ModelConfig, "model", p, None).name == yaml.safe_load(params_yaml)["model"]["name"]
    with pytest.raises(ConfigError, match="unknown profile"):
        resolve.RunConfig.from_text(params_yaml, profile="nope")


def test_gate_decision_reads_gate_json(tmp_path):
    (tmp_path / "gate.json").write_text(json.dumps({"passed": True, "reason": "ok"}))
    assert steps.gate_decision(tmp_path) == "passed"
    (tmp_path / "gate.json").write_text(json.dumps({"passed": False, "reason": "kl"}))
    assert steps.gate_decision(tmp_path) == "failed"


def test_numeric_metrics_keeps_finite_numbers_only():
    assert steps.numeric_metrics({"a": 1, "b": float("nan"), "c": "x", "d": True, "e": 2.5}) == \
        {"a": 1.0, "d": 1.0, "e": 2.5}
