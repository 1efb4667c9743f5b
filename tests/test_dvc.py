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


def test_a_corrupted_remote_object_is_refused_not_served(tmp_path):
    """A same-length corruption in the DVC remote passes `dvc pull` and `dvc status`; fetch-data refuses it."""
    repo = _checkout(tmp_path)
    assert run_cli("fetch-data", cwd=repo).returncode == 0  # regenerates the demo data and pushes it
    victim = max((p for p in (repo / ".dvcstore" / "files" / "md5").rglob("*") if p.is_file()
                  and not p.name.endswith(".dir")), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[100:110] = b"POISONED!!"  # same length, different bytes
    victim.write_bytes(bytes(data))
    shutil.rmtree(repo / "data" / "raw")
    shutil.rmtree(repo / ".dvc" / "cache")  # a fresh clone: only the remote has the data
    proc = run_cli("fetch-data", cwd=repo)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "corrupted data" in err and "content differs from data version" in err, err
    assert not (repo / "data" / "raw").exists(), "nothing corrupted is left in the workspace"


def test_the_cluster_fetch_refuses_a_corrupted_file_list(tmp_path):
    """prepare on a cluster reads the remote directly: a tampered .dir listing is refused too."""
    import hashlib
    import json

    import pytest

    from rlhf.data.remote import fetch_raw
    from rlhf.errors import UserError

    remote = tmp_path / "remote"
    body = b"{}\n"
    md5 = hashlib.md5(body).hexdigest()
    (remote / "files/md5" / md5[:2]).mkdir(parents=True)
    (remote / "files/md5" / md5[:2] / md5[2:]).write_bytes(body)
    listing = json.dumps([{"md5": md5, "relpath": "sft.jsonl"}]).encode()
    h = hashlib.md5(listing).hexdigest()
    (remote / "files/md5" / h[:2]).mkdir(parents=True, exist_ok=True)
    (remote / "files/md5" / h[:2] / (h[2:] + ".dir")).write_bytes(listing.replace(b"sft", b"rlh"))
    with pytest.raises(UserError, match="file list of data version .* is corrupted"):
        fetch_raw(h + ".dir", str(remote), tmp_path / "out")
