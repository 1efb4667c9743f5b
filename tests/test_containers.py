"""The component image, built and run here: `make image`'s script, then `rlhf run --containers`.

Real Docker: the image is built from this checkout by components/image.sh (the script `make image`
and .ci/run use; layers are cached, so a second build only redoes the code layer), then the quick
tiny pipeline runs with every step inside it (KFP's DockerRunner, uid 10001, read-only root, host
network, MLflow over 127.0.0.1) and the champion it registered is loaded back from MLflow.

Skipped only when no Docker engine can be had here (the script's exit code 3, with its reason);
with RLHF_REQUIRE_DOCKER=1 (.ci/run sets it once it has an engine) that is a failure too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, dvc_project, quick_params, run_cli

from rlhf.pipeline.dag import DEFAULT_IMAGE

IMAGE = os.environ.get("RLHF_TEST_IMAGE") or DEFAULT_IMAGE  # the tag `make image` builds
STAGES = ["prepare", "validate", "sft", "reward", "ppo", "evaluate", "register"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image() -> str:
    res = subprocess.run(["bash", "components/image.sh"], cwd=ROOT, text=True, capture_output=True,
                         env={**os.environ, "IMAGE": IMAGE, "PYTHON": sys.executable}, timeout=3600)
    if res.returncode == 3 and not os.environ.get("RLHF_REQUIRE_DOCKER"):
        pytest.skip("no Docker engine here: " + (res.stderr.strip().splitlines() or ["?"])[-1])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert f"image {IMAGE}: " in res.stdout
    return IMAGE


def docker_run(image: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--user", "10001", image, *cmd],
                          text=True, capture_output=True, timeout=300)


def test_image_runs_read_only_as_its_user_with_this_checkouts_code(image):
    res = docker_run(image, "rlhf", "--help")
    assert res.returncode == 0, res.stderr
    assert "run" in res.stdout and "compile" in res.stdout
    # the code inside is this checkout's, byte for byte
    src = sorted(p for p in (ROOT / "src" / "rlhf").rglob("*.py"))
    ours = hashlib.sha256(b"".join(p.read_bytes() for p in src)).hexdigest()
    rel = " ".join(str(p.relative_to(ROOT / "src")) for p in src)
    script = (f"cd $(python3 -c 'import rlhf, os; print(os.path.dirname(os.path.dirname(rlhf.__file__)))') "
              f"&& cat {rel} | sha256sum")
    res = docker_run(image, "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == ours, "the image holds other rlhf code than this checkout"
    # nothing to build with, no pip cache, no tests
    res = docker_run(image, "sh", "-c", "command -v gcc cc make g++; ls -d /root/.cache/pip /home/rlhf/.cache/pip "
                     "/app/tests /app/src 2>/dev/null; id -u")
    assert res.stdout.split() == ["10001"], res.stdout


def test_rlhf_run_containers_end_to_end(image, demo_raw, tmp_path):
    import docker

    root = dvc_project(tmp_path / "project", demo_raw)
    quick_params(root)
    raw = root / "data" / "raw"
    # pytest's temporary directories are private (0700): the steps, uid 10001, could not read the data
    res = run_cli("run", "--containers", "--image", image, "--params", "params.yaml", cwd=root, timeout=300)
    assert res.returncode != 0 and f"cannot read {raw}" in res.stderr and "chmod -R o+rX" in res.stderr
    assert not (root / "runs").exists(), "nothing started"
    subprocess.run(["chmod", "-R", "o+rX", str(raw)], check=True)
    db = root / "mlflow.db"
    env = {"RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "MLFLOW_EXPERIMENT_NAME": "containers",
           "RLHF_CACHE": str(root / ".cache"), "RLHF_PROFILE": "", "RLHF_DATA_HASH": "", "RLHF_PARENT_RUN_ID": "",
           "RLHF_PIPELINE_RUN_ID": "", "KFP_RUN_ID": "", "OMP_NUM_THREADS": "1"}
    res = run_cli("run", "--containers", "--image", image, "--params", "params.yaml", "--runs-dir", "runs",
                  cwd=root, env=env, timeout=1500)
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-4000:]
    started = re.findall(r"^\[\d\d:\d\d\] (\w+) +started$", out, re.M)
    finished = re.findall(r"^\[\d\d:\d\d\] (\w+) +finished in [\d.]+ s$", out, re.M)
    assert started == STAGES and finished == STAGES, out
    assert f"image {image}" in out
    # the same summary as the subprocess run
    assert "gate      PASSED" in out
    assert "registry  rlhf-policy v1 (challenger, champion): first champion" in out
    assert "MLflow    run " in out and str(db) in out, "the summary names the SQLite store, not the run's server"

    run_dir = root / re.search(r"run directory (\S+?)(?:,|$)", out, re.M).group(1)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    # every step ran in a container as the image's user: its outputs belong to uid 10001
    for link in ("dataset", "validation", "sft", "reward", "ppo", "evaluation"):
        assert (run_dir / link / "manifest.json").stat().st_uid == 10001, link
    assert (run_dir / "registration" / "registration.json").stat().st_uid == 10001
    left = docker.from_env().containers.list(all=True, filters={"label": f"io.rlhf.run={run_dir.name}"})
    assert not left, "the run's containers are gone"

    # the registered champion loads from MLflow (through the registry, as a serving client would)
    gen = run_cli("models", "generate", "Say hello.", "--max-new-tokens", "8", "--params", "params.yaml",
                  cwd=root, env=env, timeout=600)
    assert gen.returncode == 0, gen.stdout + gen.stderr
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    mv = client.get_model_version_by_alias("rlhf-policy", "champion")
    assert str(mv.version) == "1"
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["runner"] == "kfp-docker" and parent.data.tags["image"] == image
    assert parent.info.status == "FINISHED"
