"""The validate stage with real Great Expectations suites."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from conftest import run_cli

from rlhf.config import ValidateConfig
from rlhf.data.validate import validate
from rlhf.errors import ValidationFailed


def test_demo_dataset_passes(dataset, tmp_path):
    metrics = validate(dataset, tmp_path / "report")
    assert metrics["failed"] == 0 and metrics["checks"] > 60
    doc = json.loads((tmp_path / "report" / "validation.json").read_text())
    assert doc["success"] and {c["dataset"] for c in doc["checks"]} >= {"preferences/train", "prompts/eval"}
    assert "PASSED" in (tmp_path / "report" / "report.html").read_text()


@pytest.fixture
def broken(dataset, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(dataset, d)
    prefs = pd.read_parquet(d / "preferences" / "train.parquet")
    prefs.loc[3, "rejected"] = prefs.loc[3, "chosen"]
    prefs.loc[5, "chosen"] = "   "
    prefs.loc[7, "time"] = "yesterday"
    prefs.to_parquet(d / "preferences" / "train.parquet")
    sft_eval = pd.read_parquet(d / "sft" / "eval.parquet")
    sft_train = pd.read_parquet(d / "sft" / "train.parquet")
    pd.concat([sft_train, sft_eval.iloc[:2]], ignore_index=True).to_parquet(d / "sft" / "train.parquet")
    return d


def test_failures_are_reported_with_offending_rows(broken, tmp_path):
    out = tmp_path / "report"
    with pytest.raises(ValidationFailed):
        validate(broken, out)
    doc = json.loads((out / "validation.json").read_text())
    failed = {(c["dataset"], c["description"]): c for c in doc["checks"] if not c["success"]}
    assert ("preferences/train", "chosen and rejected differ") in failed
    assert failed[("preferences/train", "chosen and rejected differ")]["examples"][0]["row"] == 3
    assert ("preferences/train", "'chosen' is not empty or blank") in failed
    assert ("preferences/train", "label times, where given, are ISO-8601 timestamps") in failed
    assert failed[("sft/train", "no prompt appears in both train and eval")]["unexpected_count"] == 2
    md = (out / "report.md").read_text()
    assert "FAILED" in md and "yesterday" in md


def test_min_rows(dataset, tmp_path):
    with pytest.raises(ValidationFailed, match="at least 100000 train rows"):
        validate(dataset, tmp_path / "r", ValidateConfig(min_rows={"sft": 100000}))


def test_cli_failure_is_one_line_and_nonzero(broken, tmp_path):
    proc = run_cli("validate", "--dataset", str(broken), "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode == 3
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data validation failed") and "report.md" in err[0]


def test_contradictory_pairs_are_counted_and_fail_above_the_limit(dataset, tmp_path):
    d = tmp_path / "swapped"
    shutil.copytree(dataset, d)
    prefs = pd.read_parquet(d / "preferences" / "train.parquet")
    swapped = prefs.iloc[:200].rename(columns={"chosen": "rejected", "rejected": "chosen"})
    pd.concat([prefs, swapped], ignore_index=True).to_parquet(d / "preferences" / "train.parquet")
    with pytest.raises(ValidationFailed, match="labelled the other way round"):
        validate(d, tmp_path / "r", ValidateConfig())
    doc = json.loads((tmp_path / "r" / "validation.json").read_text())
    check = next(c for c in doc["checks"] if c["kwargs"].get("column") == "_not_contradicted"
                 and c["dataset"] == "preferences/train")
    assert check["unexpected_count"] == 400  # each of the 200 pairs, both ways round
    m = validate(d, tmp_path / "r2", ValidateConfig(max_contradictory_fraction=0.5))
    assert m["contradictory_pairs"] == 400
