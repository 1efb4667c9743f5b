"""Parity: the KFP pipeline, dvc.yaml and the CLI are three doors into the same stages.

Same stage list in the same order, same input names (the CLI's parameter names), same config
sections, and every pipeline knob names a real config field.
"""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import ROOT
from typer.main import get_command

from rlhf import config as cfg
from rlhf.cli import app
from rlhf.pipeline import dag as rlhf_pipeline
from rlhf.pipeline import steps

# CLI parameters that are not stage inputs (--champion-from-registry: where --champion comes from, like
# the KFP component's compare_champion)
NOT_INPUTS = {"out", "params", "pipeline_run_id", "champion_from_registry"}
SECTION_CLASSES = {"prepare": cfg.PrepareConfig, "validate": cfg.ValidateConfig, "model": cfg.ModelConfig,
                   "sft": cfg.SFTConfig, "reward": cfg.RewardConfig, "ppo": getattr(cfg, "PPOConfig", None),
                   "evaluate": cfg.EvaluateConfig, "register": getattr(cfg, "RegisterConfig", None)}
KNOBS = {"model_name": ("model", "name"), "lora": ("model", "lora"), "sft_max_steps": ("sft", "max_steps"),
         "reward_max_steps": ("reward", "max_steps"), "ppo_total_steps": ("ppo", "total_steps"),
         "ppo_kl_coef": ("ppo", "kl_coef"), "registered_model_name": ("register", "model_name")}


@pytest.fixture(scope="module")
def ir():
    from kfp import compiler

    out = ROOT / ".pytest_cache" / "parity-pipeline.yaml"
    out.parent.mkdir(exist_ok=True)
    compiler.Compiler().compile(rlhf_pipeline.make_pipeline(params_yaml="{}"), str(out))
    return next(yaml.safe_load_all(out.read_text()))


@pytest.fixture(scope="module")
def dvc():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.fixture(scope="module")
def cli():
    return get_command(app).commands


def kfp_stage_components(ir) -> dict[str, dict]:
    """Single-node stage components of the IR (the multi-node launchers are checked against them)."""
    return {name.removeprefix("comp-"): comp for name, comp in ir["components"].items()
            if "executorLabel" in comp and name.removeprefix("comp-") in steps.STAGE_NAMES}


def kfp_inputs(comp: dict) -> set[str]:
    arts = set(comp["inputDefinitions"].get("artifacts", {}))
    params = set(comp["inputDefinitions"]["parameters"])
    return arts | ({"raw"} if "raw_data" in params else set()) | ({"champion"} if "compare_champion" in params
                                                                   else set())


def cli_inputs(command) -> set[str]:
    return {p.name for p in command.params} - NOT_INPUTS


def test_same_stages_in_the_same_order(ir, dvc, cli):
    names = list(steps.STAGE_NAMES)
    assert names == ["prepare", "validate", "sft", "reward", "ppo", "evaluate", "register"]
    assert set(kfp_stage_components(ir)) == set(names)
    missing_dvc = [s for s in names if s not in dvc]
    assert not missing_dvc, f"dvc.yaml lacks the stage(s) {missing_dvc}"
    assert [s for s in dvc if s in names] == names and set(dvc) == set(names)
    assert [c for c in cli if c in names] == names, "CLI stage commands, in pipeline order"


def test_kfp_dependencies_follow_the_stage_order(ir):
    """Every stage consumes only outputs of stages before it (dsl.OneOf branches resolved by name)."""
    text = yaml.safe_dump(ir)
    order = {s: i for i, s in enumerate(steps.STAGE_NAMES)}
    for stage, comp in kfp_stage_components(ir).items():
        for task_owner in [c for c in ir["components"].values() if "dag" in c]:
            task = task_owner["dag"]["tasks"].get(stage)
            if task is None:
                continue
            refs = re.findall(r"(?:producerTask|producerSubtask): (\S+)|pipelinechannel--([a-z]+)-",
                              yaml.safe_dump(task["inputs"]))
            for a, b in refs:
                up = (a or b).removesuffix("-multinode")
                if up in order:
                    assert order[up] < order[stage], (stage, up)
        assert f"comp-{stage}" in text
    root = ir["components"]["comp-exit-handler-1"]["dag"]["tasks"]  # the run, inside its exit handler
    assert root["validate"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]["producerTask"] == "prepare"
    training = next(t for t in root.values() if "sft" in yaml.safe_dump(ir["components"][t["componentRef"]["name"]]))
    assert "validate" in training["dependentTasks"], "training starts after validation"


def test_same_input_names_in_kfp_cli_and_dvc(ir, dvc, cli):
    comps = kfp_stage_components(ir)
    for s in steps.STAGES:
        assert kfp_inputs(comps[s.name]) == set(s.input_names), s.name
        assert s.output.name in comps[s.name]["outputDefinitions"]["artifacts"], s.name
        assert cli_inputs(cli[s.name]) == set(s.input_names), s.name
        if s.name in steps.TRAINING_STAGES:
            launcher = ir["components"][f"comp-{s.name}-multinode"]
            assert kfp_inputs(launcher) == set(s.input_names), f"{s.name}-multinode"
            knobs = set(comps[s.name]["inputDefinitions"]["parameters"])
            assert knobs <= set(launcher["inputDefinitions"]["parameters"]), "launchers take the same knobs"
        if s.name not in dvc:
            continue
        cmd = dvc[s.name]["cmd"].split()
        assert cmd[:2] == ["rlhf", s.name], dvc[s.name]["cmd"]
        opts = {o: p.name for p in cli[s.name].params for o in p.opts}
        used = {opts[a] for a in cmd[2:] if a.startswith("--")}
        assert all(a in opts for a in cmd[2:] if a.startswith("--")), f"dvc.yaml {s.name}: unknown option"
        assert set(s.input_names) - set(s.optional_inputs) <= used | {"raw"} and "out" in used, s.name


def test_same_config_sections(dvc):
    for s in steps.STAGES:
        for section in s.config_sections:
            assert SECTION_CLASSES.get(section) is not None, f"no config class for section {section}"
        if s.name in dvc:
            dvc_sections = set(dvc[s.name].get("params", [])) - {"profile", "profiles"}
            assert dvc_sections == set(s.config_sections), (s.name, dvc_sections)


def test_pipeline_knobs_name_real_config_fields():
    params = rlhf_pipeline.pipeline_parameters()
    for knob, (section, field) in KNOBS.items():
        assert knob in params, knob
        assert field in SECTION_CLASSES[section].model_fields, (knob, section, field)
    # anything else is a run setting (data, resources), not a silently different config name
    run_settings = {"data_revision", "data_hash", "raw_data", "params_yaml", "profile", "overrides",
                    "compare_champion", "accelerator_type", "accelerator_limit", "num_nodes", "gpu_node_selector",
                    "gpu_tolerations", "train_cpu", "train_memory", "training_image", "training_namespace",
                    "job_kind", "scratch_url"}
    assert set(params) == set(KNOBS) | run_settings


def test_generated_files_match_the_stage_table():
    """dvc.yaml and the KFP components are generated from the stage table; the committed ones are current."""
    from rlhf.pipeline import codegen

    for path, text in codegen.generated().items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale: run `make codegen`"
    assert codegen.main(["--check"]) == 0
