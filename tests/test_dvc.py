"""Real DVC: a fresh checkout gets its data with one command and `dvc repro` skips unchanged stages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_cli

from rlhf.data import demo
from rlhf.mlops.versioning import data_hash


def _sh(*cmd, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout + proc.stderr


def _checkout(tmp_path) -> Path:
    """A copy of the tracked project files, as a fresh clone would have them."""
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           text=True, capture_output=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / f)
    _sh("git", "init", "-q", cwd=repo)
    return repo


def test_regenerated_demo_data_matches_data_dvc(tmp_path):
    repo = _checkout(tmp_path)
    assert not (repo / "data" / "raw").exists()
    proc = run_cli("fetch-data", cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert "matches data.dvc" in proc.stdout or "pulled" in proc.stdout
    assert "Data and pipelines are up to date" in _sh(sys.executable, "-m", "dvc", "status", "data.dvc", cwd=repo)
    # a second fetch (the remote now has the data) is a no-op
    assert "up to date" in run_cli("fetch-data", cwd=repo).stdout
    assert data_hash(repo / "data.dvc").endswith(".dir")


def test_repro_runs_then_skips(tmp_path):
    repo = _checkout(tmp_path)
    demo.generate(repo / "data" / "raw")
    dvc = (sys.executable, "-m", "dvc")
    out = _sh(*dvc, "repro", "validate", cwd=repo)
    assert "Running stage 'prepare'" in out and "Running stage 'validate'" in out
    assert (repo / "artifacts" / "validation" / "report.md").exists()
    out = _sh(*dvc, "repro", "validate", cwd=repo)
    assert "Running stage" not in out
    assert "up to date" in _sh(*dvc, "status", "prepare", "validate", cwd=repo)
    # a change of params re-runs prepare (and what follows), not before
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("eval_fraction: 0.12", "eval_fraction: 0.2"))
    out = _sh(*dvc, "repro", "validate", cwd=repo)
    assert "Running stage 'prepare'" in out
