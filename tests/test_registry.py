"""rlhf.mlops.registry: gated promotion, idempotent retries, rollback, lineage, loading by alias, the CLI.

Real MLflow (SQLite file in a temporary directory), real tiny Hugging Face models (a tiny base
with a few perturbed copies standing in for trained policies: registration does not care how
a policy was trained), evaluation directories written with the evaluate stage's own ``gate()``
from chosen metrics, so "better" and "worse" are exact. The real pipeline against a real server
is in test_mlflow_server.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf.config import EvaluateConfig, ModelConfig, RegisterConfig
from rlhf.errors import UserError
from rlhf.evaluate import gate
from rlhf.io import read_manifest, write_json, write_manifest
from rlhf.mlops import registry, tracking
from rlhf.train import models

SECRET = "hf_" + "TopSecretRegistryToken" * 2
DATA_HASH = "0123456789abcdef0123456789abcdef.dir"
CPU = ModelConfig(device="cpu")


# ----------------------------------------------------------------------------- helpers (also used by
# test_mlflow_server.py)


def make_policy(out: Path, base: Path, seed: int, dataset: Path | None = None) -> Path:
    """A policy directory (model + tokenizer + manifest) that differs from the base by seeded noise."""
    model, tok = models.load_policy(base, CPU, for_training=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.002)
    models.save_model(model, tok, out)
    write_manifest(out, kind="policy", inputs={"dataset": dataset} if dataset else {},
                   config={"lr": 0.001, "total_steps": 3, "hub_token": SECRET},
                   extra={"model": {"name": "tiny", "seed": seed}, "stage": "ppo", "mlflow_run_id": None})
    return out


def make_reward(out: Path, base: Path) -> Path:
    model, tok = models.load_reward_model(base, CPU, for_training=False, init_from_causal=True)
    models.save_model(model, tok, out)
    write_manifest(out, kind="reward-model", config={"lr": 0.001}, metrics={"eval_accuracy": 0.75},
                   extra={"reward_norm": {"mean": 0.1, "std": 1.2}, "max_seq_len": 64, "mlflow_run_id": None})
    return out


def make_evaluation(out: Path, policy: Path, baseline: Path, reward: Path, *, gold: float,
                    champion: Path | None = None, champion_gold: float | None = None, kl: float = 1.0,
                    cfg: EvaluateConfig | None = None) -> dict:
    """An evaluation directory as rlhf.evaluate writes it, with chosen means and the real gate rule."""
    cfg = cfg or EvaluateConfig()
    metrics = {"policy_gold_mean": gold, "baseline_gold_mean": 0.0, "policy_rm_mean": gold / 2,
               "baseline_rm_mean": 0.0, "kl_to_baseline": kl, "win_rate_gold_vs_baseline": 0.6, "n_prompts": 8}
    if champion is not None:
        metrics.update({"champion_gold_mean": champion_gold, "champion_rm_mean": champion_gold / 2})
    decision = gate(metrics, cfg, champion is not None)
    metrics["gate_passed"] = int(decision["passed"])
    out.mkdir(parents=True)
    write_json(out / "metrics.json", metrics)
    write_json(out / "gate.json", decision)
    write_manifest(out, kind="evaluation", inputs={"policy": policy, "baseline": baseline, "reward_model": reward,
                                                   **({"champion": champion} if champion else {})},
                   config=cfg, metrics=metrics, extra={"gate": decision, "mlflow_run_id": None})
    return decision


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: one intra-op thread is faster, and much faster when other processes share the CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_base(dataset, tmp_path_factory) -> Path:
    from rlhf.data.prepare import dataset_texts

    cfg = ModelConfig(name="tiny", cache_dir=str(tmp_path_factory.mktemp("tiny-cache")), device="cpu")
    return Path(models.resolve_base(cfg, dataset_texts(dataset)))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite tracking store for the module; the working directory is its folder."""
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "test-registry")
        mp.setenv(tracking.ENV_DATA_HASH, DATA_HASH)
        for k in ("RLHF_TRACKING", tracking.ENV_PARENT, tracking.ENV_PIPELINE, "KFP_RUN_ID"):
            mp.delenv(k, raising=False)
        import mlflow

        yield SimpleNamespace(root=root, client=mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]),
                              cfg=RegisterConfig(cache_dir=str(root / "champions")))


@pytest.fixture(scope="module")
def story(store, tiny_base, dataset):
    """Register six policies in sequence (see test_gate_story); return what happened at each step."""
    root, cfg = store.root, store.cfg
    reward = make_reward(root / "reward", tiny_base)
    pol = {k: make_policy(root / f"policy-{k}", tiny_base, seed=i, dataset=dataset) for i, k in enumerate("ABCDEF")}
    out: dict = {"policies": pol, "reward": reward}

    def run(key: str, pipeline_run_id: str, **ev):
        ev_dir = root / f"eval-{key}-{pipeline_run_id}"
        if not ev_dir.exists():
            make_evaluation(ev_dir, pol[key], tiny_base, reward, **ev)
        with tracking.pipeline_run(pipeline_run_id) as parent:
            result = registry.register(pol[key], reward, ev_dir, cfg)
        result["parent_run_id"] = parent.run_id
        return result

    out["A"] = run("A", "run-A", gold=0.5)                                       # first champion
    out["champion_dir_1"] = registry.champion_dir(cfg)
    out["B"] = run("B", "run-B", gold=1.0, champion=out["champion_dir_1"], champion_gold=0.5)  # better
    out["champion_dir_2"] = registry.champion_dir(cfg)
    out["C"] = run("C", "run-C", gold=0.2, champion=out["champion_dir_2"], champion_gold=1.0)  # worse
    out["C_retry"] = run("C", "run-C")                                             # KFP retry, same id
    out["D"] = run("D", "run-D", gold=2.0, champion=out["champion_dir_1"], champion_gold=0.5)  # stale champion
    out["E"] = run("E", "run-E", gold=2.0)                                         # no champion comparison
    out["F"] = run("F", "run-F", gold=3.0, champion=out["champion_dir_2"], champion_gold=1.0, kl=99.0)  # KL
    out["history_before_rollback"] = json.loads(
        store.client.get_registered_model(cfg.model_name).tags[registry.HISTORY_TAG])
    out["rollback"] = registry.rollback(cfg, reason="regression reported by serving")
    with pytest.raises(UserError, match="first champion") as err:
        registry.rollback(cfg)
    out["second_rollback_error"] = err.value.one_line()
    out["B_retry"] = run("B", "run-B")  # v2 was champion once: no automatic second promotion
    return out


def _aliases(store) -> dict[str, int]:
    rm = store.client.get_registered_model(store.cfg.model_name)
    return {a: int(v) for a, v in rm.aliases.items()}


# ----------------------------------------------------------------------------- the gate story


def test_gate_story_promotes_better_keeps_worse_and_is_idempotent(story, store):
    a, b, c = story["A"], story["B"], story["C"]
    assert (a["version"], a["created"], a["promoted"]) == (1, True, True)
    assert a["aliases"] == ["challenger", "champion"] and a["decision"].startswith("first champion")
    assert (b["version"], b["promoted"], b["previous_champion"]) == (2, True, 1)        # better: moves
    assert b["decision"].startswith("beats champion v1")
    assert (c["version"], c["promoted"], c["champion"]) == (3, False, 2)                # worse: stays
    assert "beats_champion failed" in c["decision"] and c["aliases"] == ["challenger"]
    retry = story["C_retry"]
    assert (retry["version"], retry["created"], retry["promoted"], retry["champion"]) == (3, False, False, 2)
    d, e, f = story["D"], story["E"], story["F"]
    assert (d["version"], d["promoted"]) == (4, False) and "another model" in d["decision"]
    assert (e["version"], e["promoted"]) == (5, False) and "did not compare against the current champion" in \
        e["decision"]
    assert (f["version"], f["promoted"]) == (6, False) and "kl_within_budget failed" in f["decision"]
    assert f["champion"] == 2 and f["aliases"] == ["challenger"]
    versions = store.client.search_model_versions(f"name='{store.cfg.model_name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4, 5, 6]  # the retry created nothing
    tags3 = store.client.get_model_version(store.cfg.model_name, "3").tags
    assert "beats_champion failed" in tags3["not_promoted_reason"] and "promoted_at" not in tags3
    # a gated-out candidate is in the registry (the audit trail) as challenger only, the gate as tags
    assert (tags3["gate_passed"], tags3["gate_decision"]) == ("false", "failed")
    assert tags3["gate_reason"]
    assert story["history_before_rollback"] == [1, 2]


def test_rollback_restores_the_previous_champion_with_history(story, store):
    rb = story["rollback"]
    assert (rb["champion"], rb["previous_champion"]) == (1, 2)
    assert "no previous one" in story["second_rollback_error"]
    rm = store.client.get_registered_model(store.cfg.model_name)
    assert json.loads(rm.tags[registry.HISTORY_TAG]) == [1]
    log = json.loads(rm.tags[registry.LOG_TAG])
    assert [(e["event"], e["version"], e["from"]) for e in log] == [("promote", 1, None), ("promote", 2, 1),
                                                                     ("rollback", 1, 2)]
    v2 = store.client.get_model_version(store.cfg.model_name, "2").tags
    assert v2["rollback_reason"] == "regression reported by serving" and v2["rolled_back_at"]
    # a retry of v2's pipeline run finds v2 and does not promote it a second time
    b2 = story["B_retry"]
    assert (b2["version"], b2["created"], b2["promoted"]) == (2, False, False)
    assert "automatic promotion happens once per version" in b2["decision"]
    reward = store.client.get_registered_model(store.cfg.reward_model_name)
    assert int(reward.aliases["champion"]) == 1


def test_manual_promote_records_the_reason(story, store):
    cfg = store.cfg
    with pytest.raises(UserError, match="needs a reason"):
        registry.promote(3, "  ", cfg)
    with pytest.raises(UserError, match="no version 42"):
        registry.promote(42, "why not", cfg)
    res = registry.promote(3, "A/B test on live traffic won", cfg)
    assert (res["champion"], res["previous_champion"], res["changed"]) == (3, 1, True)
    assert _aliases(store)["champion"] == 3
    tags = store.client.get_model_version(cfg.model_name, "3").tags
    assert tags["manual_promotion_reason"] == "A/B test on live traffic won"
    assert tags["promoted_by"].startswith("manual:")
    assert registry.promote(3, "again", cfg)["changed"] is False
    assert registry.rollback(cfg, reason="undo manual promotion")["champion"] == 1
    assert _aliases(store)["champion"] == 1


def test_lineage_on_versions_and_runs(story, store):
    client, cfg = store.client, store.cfg
    a = story["A"]
    mv = client.get_model_version(cfg.model_name, "1")
    t = mv.tags
    policy_manifest = read_manifest(story["policies"]["A"])
    assert t["pipeline_run_id"] == "run-A" and t["parent_run_id"] == a["parent_run_id"]
    assert t["data_hash"] == DATA_HASH and t["dataset_hash"] == policy_manifest["inputs"]["dataset"]
    assert len(t["git_commit"]) == 40
    assert t["policy_content_hash"] == policy_manifest["content_hash"] and t["policy_stage"] == "ppo"
    assert t["gate_passed"] == "true" and t["gate_decision"] == "passed" and t["evaluated_against"] == "none"
    assert "image" not in t and "image_digest" not in t  # not a cluster run: no step images to record
    assert float(t["metric.policy_gold_mean"]) == 0.5 and float(t["metric.kl_to_baseline"]) == 1.0
    assert json.loads(t["params"])["train.lr"] == 0.001 and len(t["params_hash"]) == 16
    assert t["reward_model_version"] == "1" and t["register_run_id"] == mv.run_id == a["run_id"]
    assert client.get_model_version(cfg.model_name, "2").tags["evaluated_against"] == t["policy_content_hash"]
    run = client.get_run(mv.run_id)  # the register run: nested, params, metrics, lineage artifacts
    assert run.data.tags["mlflow.parentRunId"] == a["parent_run_id"] and run.data.tags["stage"] == "register"
    assert run.data.params["model_name"] == cfg.model_name and run.data.params["lineage.policy.lr"] == "0.001"
    assert run.data.metrics["policy_gold_mean"] == 0.5
    arts = {f.path for f in client.list_artifacts(mv.run_id, "lineage")}
    assert {"lineage/policy_manifest.json", "lineage/gate.json", "lineage/evaluation_manifest.json"} <= arts
    rmv = client.get_model_version(cfg.reward_model_name, "1")
    assert rmv.tags["content_hash"] == read_manifest(story["reward"])["content_hash"]
    assert json.loads(rmv.tags["reward_norm"]) == {"mean": 0.1, "std": 1.2}
    # the reward model did not change between runs: one version for all six policies
    assert len(client.search_model_versions(f"name='{cfg.reward_model_name}'")) == 1
    # the champion directory carries the registered policy's identity for evaluate(champion=...)
    d1 = story["champion_dir_1"]
    assert read_manifest(d1, expect_kind="policy")["content_hash"] == t["policy_content_hash"]
    assert read_manifest(d1)["registered_model"]["version"] == 1
    assert models.load_policy(d1, CPU, for_training=False)[0].config.model_type == "llama"


def test_secrets_never_reach_mlflow(story, store):
    client = store.client
    exp = client.get_experiment_by_name("test-registry")
    blobs = []
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        blobs += [run.data.params, run.data.tags]
    for name in (store.cfg.model_name, store.cfg.reward_model_name):
        blobs += [mv.tags for mv in client.search_model_versions(f"name='{name}'")]
        blobs.append(client.get_registered_model(name).tags)
    text = json.dumps(blobs)
    assert SECRET not in text
    assert '"lineage.policy.hub_token": "***"' in text  # the key is there, its value is not


def test_loading_by_alias_generates_text(story, store):
    import mlflow
    import mlflow.transformers

    from rlhf.train import generation

    uri = f"models:/{store.cfg.model_name}@champion"
    pipe = mlflow.transformers.load_model(uri)
    out = pipe("Any advice on baking bread?", max_new_tokens=8, do_sample=False)
    assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"].startswith("Any advice")
    pyfunc = mlflow.pyfunc.load_model(uri)
    pred = pyfunc.predict(["Any advice on baking bread?"], params={"max_new_tokens": 6})
    assert isinstance(pred[0], str)
    model, tok, version = registry.load_components(store.cfg)
    assert version == _aliases(store)["champion"]
    r = generation.sample(model, tok, ["Any advice on baking bread?"], max_new_tokens=6, temperature=0.7,
                          generator_seed=0)
    assert int(r.lengths[0]) >= 1 and isinstance(r.texts[0], str)
    assert isinstance(registry.generate("How do I start running?", store.cfg, max_new_tokens=5), str)


def test_cli_models_commands(story, store):
    from typer.testing import CliRunner

    from rlhf.cli import app

    runner = CliRunner()
    params = ["--params", str(store.root / "params.yaml")]
    (store.root / "params.yaml").write_text(f"register:\n  cache_dir: {store.root / 'champions'}\n")
    res = runner.invoke(app, ["models", "list", *params])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[1].split()[:4] == ["version", "aliases", "created", "(UTC)"]
    row1 = next(ln for ln in lines if ln.startswith("1 "))
    assert "champion" in row1 and "passed" in row1 and DATA_HASH[:12] in row1 and "run-A" in row1
    res = runner.invoke(app, ["models", "list", "--json", *params])
    assert [r["version"] for r in json.loads(res.output)] == [6, 5, 4, 3, 2, 1]
    res = runner.invoke(app, ["models", "promote", "2", *params])
    assert res.exit_code != 0 and "--reason" in res.output  # the reason is required
    res = runner.invoke(app, ["models", "promote", "2", "--reason", "cli test", *params])
    assert res.exit_code == 0 and "v1 -> v2" in res.output
    res = runner.invoke(app, ["models", "rollback", "--reason", "cli rollback", *params])
    assert res.exit_code == 0 and "v2 -> v1" in res.output
    res = runner.invoke(app, ["models", "generate", "Any advice on baking bread?", "--max-new-tokens", "5", *params])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["models", "champion-path", *params])
    assert res.exit_code == 0 and Path(res.output.strip()).name == f"{store.cfg.model_name}-v1"


def test_evaluate_compares_with_the_registry_champion(story, store, tiny_base, dataset, tmp_path):
    """`rlhf evaluate --champion-from-registry` (the DVC evaluate stage) samples the champion too."""
    from typer.testing import CliRunner

    from rlhf.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(f"model:\n  device: cpu\nregister:\n  cache_dir: {store.root / 'champions'}\n"
                      "evaluate:\n  n_prompts: 4\n  max_new_tokens: 6\n")
    champion_hash = read_manifest(registry.champion_dir(store.cfg))["content_hash"]
    out = tmp_path / "evaluation"
    res = CliRunner().invoke(app, ["evaluate", "--dataset", str(dataset), "--policy", str(story["policies"]["F"]),
                                   "--baseline", str(tiny_base), "--reward", str(story["reward"]),
                                   "--champion-from-registry", "--out", str(out), "--params", str(params)])
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out)
    assert manifest["inputs"]["champion"] == champion_hash, "the evaluation names the champion it compared with"
    assert "champion_gold_mean" in json.loads((out / "metrics.json").read_text())
    res = CliRunner().invoke(app, ["evaluate", "--champion", str(tiny_base), "--champion-from-registry",
                                   "--out", str(tmp_path / "x"), "--params", str(params)])
    assert isinstance(res.exception, UserError) and "not both" in str(res.exception)


# ----------------------------------------------------------------------------- refusals


def test_evaluation_of_another_policy_registers_nothing(story, store, tiny_base, tmp_path):
    pol = story["policies"]
    ev = tmp_path / "eval"
    make_evaluation(ev, pol["A"], tiny_base, story["reward"], gold=9.0)
    before = len(store.client.search_model_versions(f"name='{store.cfg.model_name}'"))
    champion = _aliases(store)["champion"]
    with pytest.raises(UserError, match="evaluation of another policy"):
        registry.register(pol["F"], story["reward"], ev, store.cfg, pipeline_run_id="wrong-eval")
    (ev / "gate.json").unlink()
    with pytest.raises(UserError, match="gate.json"):
        registry.register(pol["A"], story["reward"], ev, store.cfg, pipeline_run_id="no-gate")
    assert len(store.client.search_model_versions(f"name='{store.cfg.model_name}'")) == before
    assert _aliases(store)["champion"] == champion


def test_registry_needs_tracking(monkeypatch):
    monkeypatch.setenv("RLHF_TRACKING", "off")
    with pytest.raises(UserError, match="needs MLflow"):
        registry.list_versions()


def _mv(version: int, **tags):
    return SimpleNamespace(version=str(version), tags=tags)


@pytest.mark.parametrize("gate_, against, champion, cand_tags, cfg, expect", [
    ({"passed": False, "reason": "x"}, None, None, {}, RegisterConfig(), (False, "gate failed")),
    ({"passed": True}, None, None, {}, RegisterConfig(), (True, "first champion")),
    ({"passed": True}, None, None, {}, RegisterConfig(auto_promote=False), (False, "automatic promotion is off")),
    ({"passed": True}, None, None, {"promoted_at": "t"}, RegisterConfig(), (False, "once per version")),
    ({"passed": True, "checks": [{"check": "beats_champion", "passed": True}]}, "h1", _mv(1, policy_content_hash="h1"),
     {}, RegisterConfig(), (True, "beats champion v1")),
    ({"passed": True, "checks": []}, "h1", _mv(1, policy_content_hash="h1"), {}, RegisterConfig(),
     (False, "without a passed beats_champion")),
    ({"passed": True}, "h0", _mv(1, policy_content_hash="h1"), {}, RegisterConfig(), (False, "another model")),
    ({"passed": True}, None, _mv(1, policy_content_hash="h1"), {}, RegisterConfig(), (False, "did not compare")),
    ({"passed": True}, None, _mv(1, policy_content_hash="h1"), {}, RegisterConfig(require_champion_comparison=False),
     (True, "beats champion v1")),
])
def test_promotion_decision(gate_, against, champion, cand_tags, cfg, expect):
    ok, why = registry.promotion_decision(gate_, against, champion, cand_tags, cfg)
    assert ok is expect[0] and expect[1] in why


def test_image_lineage_records_the_pinned_training_image(monkeypatch):
    digest = "sha256:" + "ab" * 32
    monkeypatch.setenv(registry.ENV_IMAGE, f"ghcr.io/x/rlhf@{digest}")
    monkeypatch.setenv(registry.ENV_TRAINING_IMAGE, f"ghcr.io/x/rlhf-cuda@{digest}")
    assert registry.image_lineage() == {"image": f"ghcr.io/x/rlhf@{digest}",
                                        "training_image": f"ghcr.io/x/rlhf-cuda@{digest}", "image_digest": digest}
    monkeypatch.setenv(registry.ENV_TRAINING_IMAGE, "ghcr.io/x/rlhf:latest-cuda")  # a tag: no digest to record
    assert registry.image_lineage()["image_digest"] is None
