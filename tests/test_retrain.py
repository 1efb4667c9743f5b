"""`rlhf retrain`: retrain only when the data or the configuration changed since the champion.

Real MLflow (SQLite in a temporary directory), real DVC projects, the tiny profile.

* Decisions: a champion registered by the register component's own body (the code a pipeline
  step runs, knobs included), then :func:`rlhf.mlops.retrain.decide` for no champion / the same data
  and params / new data / changed params / a champion from before the configuration tag.
* The command: the one-line errors, ``--host`` against the fake KFP API of test_pipeline_client
  (nothing submitted when up to date; a run with the data version when not), ``--local`` starting
  the pipeline when needed.
* End to end, after the one tiny ``rlhf run`` of the suite (conftest ``local_run``, which
  registered a champion): ``rlhf retrain --local`` is a no-op; after new preference rows are
  appended to data/raw it refuses until they are recorded (``dvc add data/raw``), then says a
  retrain is needed because the data changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, dvc_project, quick_params, run_cli
from kfp.dsl import Artifact, Metrics, Model
from test_pipeline_client import TOKEN, compiled, kfp_server  # noqa: F401 (fixtures)
from test_registry import make_evaluation, make_policy, make_reward, one_torch_thread, tiny_base  # noqa: F401

from rlhf.config import resolve
from rlhf.data import demo
from rlhf.errors import UserError
from rlhf.mlops import retrain, tracking
from rlhf.pipeline import dag

DATA_HASH = "0123456789abcdef0123456789abcdef.dir"
NEW_HASH = "fedcba9876543210fedcba9876543210.dir"
KNOBS = {"ppo_total_steps": 2}  # the champion's run used this knob: it is part of its configuration
MODEL = "rlhf-policy"


def new_preference_rows(n: int = 200) -> list[str]:
    """Preference pairs of another annotation batch (the demo generator with another seed)."""
    with tempfile.TemporaryDirectory() as tmp:
        demo.generate(Path(tmp), seed=1)
        return (Path(tmp) / "preferences.jsonl").read_text().splitlines()[:n]


def dvc(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def recorded_hash(project: Path) -> str:
    return yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]


def errors(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- a registry with a champion


@pytest.fixture(scope="module")
def store(tiny_base, dataset, tmp_path_factory):  # noqa: F811
    """A SQLite registry whose champion (v1) was registered by the register component with the knob
    ppo_total_steps=2, data DATA_HASH and the quick tiny params; the working directory is its folder."""
    root = tmp_path_factory.mktemp("retrain")
    params = quick_params(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "test-retrain")
        # set (not deleted) so that the component's own os.environ writes are undone afterwards
        for k, v in {tracking.ENV_DATA_HASH: DATA_HASH, "RLHF_PROFILE": "", "KFP_RUN_ID": "retrain-run-1"}.items():
            mp.setenv(k, v)
        for k in ("RLHF_TRACKING", tracking.ENV_PARENT, tracking.ENV_PIPELINE):
            mp.delenv(k, raising=False)
        reward = make_reward(root / "reward", tiny_base)
        policy = make_policy(root / "policy", tiny_base, seed=0, dataset=dataset)
        make_evaluation(root / "evaluation", policy, tiny_base, reward, gold=1.0)
        registration = Artifact(name="registration", uri=str(root / "registration"))
        dag.build("example/rlhf:1").register.python_func(
            policy=Model(name="policy", uri=str(policy)), reward_model=Model(name="reward", uri=str(reward)),
            evaluation=Artifact(name="evaluation", uri=str(root / "evaluation")), params_yaml=params.read_text(),
            profile="tiny", run_id="retrain-run-1", overrides={}, registered_model_name="", data_hash=DATA_HASH,
            data_revision="rev-1", registration=registration, metrics=Metrics(name="m", uri=str(root / "m")),
            ppo_total_steps=KNOBS["ppo_total_steps"])
        receipt = json.loads((root / "registration" / "registration.json").read_text())
        assert (receipt["version"], receipt["promoted"]) == (1, True), receipt
        import mlflow

        yield SimpleNamespace(root=root, params=params, uri=uri, client=mlflow.MlflowClient(uri))


def variant(src: Path, dest: Path, edit) -> Path:
    """A copy of the params file ``src`` changed by ``edit(data)``."""
    data = yaml.safe_load(src.read_text())
    edit(data)
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def test_the_champion_records_the_configuration_it_was_trained_with(store):
    tags = store.client.get_model_version(MODEL, "1").tags
    _, fp, _ = retrain.run_config(store.params, knobs=KNOBS)
    assert tags["pipeline_config_hash"] == fp["hash"] and len(fp["hash"]) == 16
    assert json.loads(tags["pipeline_config_sections"]) == fp["sections"]
    assert set(fp["sections"]) == set(resolve.FINGERPRINT_SECTIONS)
    assert tags["data_hash"] == DATA_HASH
    assert tags["params_hash"], "the policy's own params hash is still there"


def test_no_champion_means_retrain(store, tmp_path):
    params = variant(store.params, tmp_path / "params.yaml",
                     lambda d: d.setdefault("register", {}).update(model_name="nobody-yet"))
    d = retrain.decide(params, data_hash=DATA_HASH, knobs=KNOBS)
    assert d.retrain and d.champion is None
    assert d.line() == f"retrain needed: no champion in the registry (nobody-yet at {store.uri})"


def test_same_data_and_params_is_up_to_date(store):
    d = retrain.decide(store.params, data_hash=DATA_HASH, knobs=KNOBS)
    assert not d.retrain and d.champion == 1 and not d.changed_sections
    assert re.fullmatch(r"up to date: champion rlhf-policy v1 was trained on data 01234567 with the same params "
                        r"\([0-9a-f]{8}, profile tiny\); nothing to do", d.line()), d.line()
    forced = retrain.decide(store.params, data_hash=DATA_HASH, knobs=KNOBS, force=True)
    assert forced.retrain and forced.forced and forced.line().startswith("retrain (--force): champion rlhf-policy v1 "
                                                                         "is up to date")
    # what does not shape the model does not count: infrastructure knobs, the register section
    assert not retrain.decide(store.params, data_hash=DATA_HASH, knobs={**KNOBS, "accelerator_limit": 8}).retrain
    params = variant(store.params, store.root / "params-register.yaml",
                     lambda d: d["register"].update(max_new_tokens=7, key_metrics=["kl_to_baseline"]))
    assert not retrain.decide(params, data_hash=DATA_HASH, knobs=KNOBS).retrain


def test_new_data_means_retrain(store):
    d = retrain.decide(store.params, data_hash=NEW_HASH, knobs=KNOBS)
    assert d.retrain and not d.changed_sections
    assert d.line() == "retrain needed: the data changed since champion rlhf-policy v1: 01234567 -> fedcba98"


def test_changed_params_name_the_changed_sections(store, tmp_path):
    def sections(params=store.params, **kw):
        d = retrain.decide(params, data_hash=DATA_HASH, **{"knobs": KNOBS, **kw})
        assert d.retrain and "the params changed since champion rlhf-policy v1" in d.reason, d.reason
        return d.changed_sections, d.line()

    lr = variant(store.params, tmp_path / "lr.yaml", lambda d: d["profiles"]["tiny"]["sft"].update(lr=0.01))
    changed, line = sections(lr)
    assert changed == ["sft"] and re.search(r"section sft \([0-9a-f]{8} -> [0-9a-f]{8}, profile tiny\)$", line)
    assert sections(knobs={"ppo_total_steps": 5})[0] == ["ppo"]  # a pipeline knob (-p)
    assert sections(overrides={"evaluate": {"n_prompts": 9}})[0] == ["evaluate"]  # --set
    both, line = sections(profile="none")  # the base sections instead of the tiny profile
    assert {"model", "sft", "reward", "ppo", "evaluate"} <= set(both) and "profile none" in line
    d = retrain.decide(lr, data_hash=NEW_HASH, knobs=KNOBS)
    assert d.line().startswith("retrain needed: the data changed since champion rlhf-policy v1: 01234567 -> "
                               "fedcba98; the params changed since champion rlhf-policy v1: section sft")


def test_knobs_and_overrides_resolve_alike(store):
    """-p ppo_total_steps=2 and --set ppo.total_steps=2 make the same run: the same configuration."""
    d = retrain.decide(store.params, data_hash=DATA_HASH, overrides={"ppo": {"total_steps": 2}})
    assert not d.retrain, d.line()


def test_champion_without_the_configuration_tag_means_params_unknown(store):
    client = store.client
    saved = client.get_model_version(MODEL, "1").tags["pipeline_config_hash"]
    client.delete_model_version_tag(MODEL, "1", "pipeline_config_hash")
    try:
        d = retrain.decide(store.params, data_hash=DATA_HASH, knobs=KNOBS)
    finally:
        client.set_model_version_tag(MODEL, "1", "pipeline_config_hash", saved)
    assert d.retrain and d.champion_config_hash is None
    assert d.line() == ("retrain needed: champion rlhf-policy v1 records no pipeline configuration "
                        "(pipeline_config_hash; registered before rlhf recorded it), so its params are unknown")


def test_profile_from_the_environment_is_used_and_left_alone(store, monkeypatch):
    monkeypatch.setenv("RLHF_PROFILE", "smollm2")
    d = retrain.decide(store.params, data_hash=DATA_HASH, knobs=KNOBS)
    assert d.retrain and d.profile == "smollm2" and "profile smollm2" in d.reason
    assert os.environ["RLHF_PROFILE"] == "smollm2"


def test_fingerprint_redacts_secrets_and_leaves_out_register(tmp_path):
    params = variant(quick_params(tmp_path), tmp_path / "secret.yaml", lambda d: d["profiles"]["tiny"]["model"].update(
        name="https://alice:S3cretPassw0rd@models.example.com/tiny"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RLHF_PROFILE", raising=False)
        cfg = resolve.RunConfig.from_file(params).resolved()
    assert list(cfg) == list(resolve.FINGERPRINT_SECTIONS) and "register" not in cfg
    text = json.dumps(cfg)
    assert "S3cretPassw0rd" not in text and "https://***@models.example.com/tiny" in text
    assert resolve.merge_overrides({"ppo": {"lr": 0.1}}, resolve.knob_overrides({"ppo_total_steps": 2, "lora": False, "num_nodes": 3})) == \
        {"ppo": {"lr": 0.1, "total_steps": 2}, "model": {"lora": False}}


def test_unrecorded_data_changes_are_an_error(demo_raw, tmp_path):
    project = dvc_project(tmp_path / "p", demo_raw)
    recorded = recorded_hash(project)
    assert retrain.current_data(project / "data.dvc", local=True) == (recorded, project / "data" / "raw")
    with open(project / "data" / "raw" / "preferences.jsonl", "a") as f:
        f.write("\n".join(new_preference_rows(5)) + "\n")
    with pytest.raises(UserError) as e:
        retrain.current_data(project / "data.dvc", local=True)
    msg = e.value.one_line()
    assert "data/raw modified" in msg and retrain.short(recorded) in msg and "`dvc add " in msg
    # the retrain CronJob has no checkout: --data-hash names the version
    assert retrain.current_data(tmp_path / "nowhere.dvc", NEW_HASH) == (NEW_HASH, None)
    with pytest.raises(UserError, match="--data-hash"):
        retrain.current_data(tmp_path / "nowhere.dvc")


# ----------------------------------------------------------------------------- the command


def test_cli_errors_are_one_line(tmp_path):
    res = run_cli("retrain", cwd=tmp_path)
    assert res.returncode == 2 and len(errors(res)) == 1 and "Traceback" not in res.stderr
    assert "needs --local (run the pipeline here) or --host URL" in errors(res)[0]
    res = run_cli("retrain", "--local", "--host", "http://x", cwd=tmp_path)
    assert res.returncode == 2 and errors(res) == ["error: choose one of --local and --host"]
    res = run_cli("retrain", "--local", "--params", str(ROOT / "params.yaml"), cwd=tmp_path)
    assert res.returncode == 2 and "DVC pointer file not found: data.dvc" in errors(res)[0]
    res = run_cli("retrain", "--host", "http://127.0.0.1:9", "--params", str(ROOT / "params.yaml"), cwd=tmp_path,
                  env={"RLHF_DATA_HASH": DATA_HASH, "RLHF_TRACKING": "off"})
    assert res.returncode == 2 and "needs MLflow, but RLHF_TRACKING is off" in errors(res)[0]


def test_cli_host_submits_only_when_needed(store, kfp_server, compiled, tmp_path):  # noqa: F811
    env = {"KFP_TOKEN": TOKEN, "RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": store.uri,
           "MLFLOW_EXPERIMENT_NAME": "test-retrain", "RLHF_PROFILE": "", "RLHF_DATA_HASH": ""}
    summary = tmp_path / "summary.md"
    # the champion was trained with the tiny profile; a cluster run's default is cluster_profile: (smollm2)
    base = ("retrain", "--host", kfp_server.url, "--pipeline", str(compiled), "-p", "ppo_total_steps=2",
            "--profile", "tiny", "--summary-file", str(summary))
    res = run_cli(*base, "--data-hash", DATA_HASH, cwd=store.root, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("up to date: champion rlhf-policy v1") and not kfp_server.runs
    assert "**up to date, nothing to do**" in summary.read_text()

    res = run_cli(*base, "--data-hash", NEW_HASH, "--data-revision", "abc123", "--wait", "--poll", "0.05",
                  cwd=store.root, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("retrain needed: the data changed since champion rlhf-policy v1: 01234567 -> "
                                 "fedcba98\nsubmitted run ")
    assert "gate passed" in res.stdout
    (run,) = kfp_server.runs.values()
    params = run["runtime_config"]["parameters"]
    assert (params["data_hash"], params["data_revision"], params["profile"]) == (NEW_HASH, "abc123", "tiny")
    assert params["ppo_total_steps"] == 2
    md = summary.read_text()
    assert "**retrain**" in md and "fedcba98" in md and "gate: **passed**" in md


def test_cli_local_starts_the_pipeline_when_needed(store, demo_raw, tmp_path):
    """A project whose data is not the champion's: the pipeline starts (and validation stops this tiny data)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in ("sft", "preferences", "prompts"):
        (raw / f"{f}.jsonl").write_text("\n".join((demo_raw / f"{f}.jsonl").read_text().splitlines()[:12]) + "\n")
    project = dvc_project(tmp_path / "project", raw)
    quick_params(project)
    env = {"RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": store.uri, "MLFLOW_EXPERIMENT_NAME": "test-retrain",
           "RLHF_PROFILE": "", "RLHF_DATA_HASH": "", "OMP_NUM_THREADS": "1"}
    res = run_cli("retrain", "--local", "-p", "ppo_total_steps=2", "--runs-dir", "runs", cwd=project, env=env,
                  timeout=600)
    out = res.stdout
    assert out.startswith(f"retrain needed: the data changed since champion rlhf-policy v1: 01234567 -> "
                          f"{retrain.short(recorded_hash(project))}\nrlhf run: profile tiny, data "), out
    assert res.returncode == 3 and "validate  FAILED" in out, out + res.stderr
    assert len(errors(res)) == 1 and "validate failed: data validation failed" in errors(res)[0]
    assert len(store.client.search_model_versions(f"name='{MODEL}'")) == 1


# ----------------------------------------------------------------------------- end to end, after `rlhf run`


@pytest.mark.slow
def test_retrain_local_is_a_no_op_until_new_preferences_are_recorded(local_run, tmp_path):
    assert local_run.result.returncode == 0, local_run.result.stdout[-2000:] + local_run.result.stderr[-2000:]
    project = tmp_path / "project"  # a copy: the shared project stays as the run left it
    shutil.copytree(local_run.root, project, symlinks=True)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    env = {**local_run.env, "MLFLOW_TRACKING_URI": uri, "RLHF_CACHE": str(project / ".cache")}
    import mlflow

    client = mlflow.MlflowClient(uri)

    def versions() -> int:
        return len(client.search_model_versions(f"name='{MODEL}'"))

    runs = sorted(p.name for p in (project / "runs").iterdir())
    old = recorded_hash(project)
    assert versions() == 1

    res = run_cli("retrain", "--local", *local_run.args, cwd=project, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.fullmatch(rf"up to date: champion rlhf-policy v1 was trained on data {retrain.short(old)} with the "
                        r"same params \([0-9a-f]{8}, profile tiny\); nothing to do\n", res.stdout), res.stdout
    assert versions() == 1 and sorted(p.name for p in (project / "runs").iterdir()) == runs

    with open(project / "data" / "raw" / "preferences.jsonl", "a") as f:  # a new batch of labels arrives
        f.write("\n".join(new_preference_rows()) + "\n")
    res = run_cli("retrain", "--local", "--dry-run", *local_run.args, cwd=project, env=env)
    assert res.returncode == 2 and len(errors(res)) == 1, res.stdout + res.stderr
    assert "data/raw has changes that data.dvc does not record (data/raw modified)" in errors(res)[0]
    assert "`dvc add data/raw`" in errors(res)[0]

    dvc("add", "-q", "data/raw", cwd=project)
    new = recorded_hash(project)
    assert new != old
    res = run_cli("retrain", "--local", "--dry-run", *local_run.args, cwd=project, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout == (f"retrain needed: the data changed since champion rlhf-policy v1: {retrain.short(old)} -> "
                          f"{retrain.short(new)}\ndry run: nothing started\n")
    assert versions() == 1 and sorted(p.name for p in (project / "runs").iterdir()) == runs
