"""The whole loop on the tiny profile: a champion, then `rlhf feedback loop --rounds 2 --local`
(sample -> simulated labels through the real app -> export + new DVC data version -> retrain), twice.

Real MLflow (SQLite), real DVC, real KFP local runs. Slow (two retrains after the suite's shared
pipeline run): it is the loop's end-to-end test, the parts have their own fast tests.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_two_rounds_make_two_data_versions_and_two_retrains_with_feedback_lineage(local_run, tmp_path):
    # round 0 is the suite's shared `rlhf run` (conftest.local_run, which registered the first champion),
    # copied so that this test's new data versions and retrains do not touch it
    root = tmp_path / "project"
    shutil.copytree(local_run.root, root, symlinks=True)
    env = {**local_run.env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "RLHF_CACHE": str(root / ".cache")}
    empty = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"}
    no_champion = run_cli("feedback", "sample", "--prompts", "data/raw/prompts.jsonl", cwd=root, env=empty)
    assert no_champion.returncode == 2 and "no 'champion' version" in no_champion.stderr
    assert local_run.result.returncode == 0, local_run.result.stdout[-2000:]
    data_before = (root / "data.dvc").read_text()

    res = run_cli("feedback", "loop", "--rounds", "2", "--local", "--n", "24", "--annotators", "3", "--seed", "1", cwd=root,
                  env=env, timeout=2400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rounds = json.loads((root / "feedback" / "loop.json").read_text())
    print(json.dumps(rounds, indent=1))  # the measured figures (pytest -s shows them)
    assert [r["round"] for r in rounds] == [1, 2]
    assert len({r["data_hash"] for r in rounds}) == 2 and (root / "data.dvc").read_text() != data_before
    assert all(r["started"] for r in rounds)  # both rounds retrained
    exported = sorted(p.stem for p in (root / "data" / "raw" / "feedback").glob("*.jsonl"))
    assert exported == sorted(r["batch_id"] for r in rounds)
    for r in rounds:
        assert r["versions"] and r["rm_agreement_before"]["n_pairs"] > 0

    listing = run_cli("models", "list", "--json", cwd=root, env=env)
    assert listing.returncode == 0, listing.stderr
    rows = {r["version"]: r for r in json.loads(listing.stdout)}
    v1, v2 = rounds[0]["versions"][-1], rounds[1]["versions"][-1]
    assert json.loads(rows[v1]["feedback_batches"]) == [rounds[0]["batch_id"]]
    assert sorted(json.loads(rows[v2]["feedback_batches"])) == sorted(r["batch_id"] for r in rounds)
    assert int(rows[v2]["feedback_labels"]) == sum(r["pairs"] for r in rounds)
    table = run_cli("models", "list", cwd=root, env=env).stdout
    assert "human" in table and "(2 batches)" in table
