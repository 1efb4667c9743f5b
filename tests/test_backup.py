"""`rlhf backup create / verify / restore` on loopback: dump -> wipe -> restore -> `rlhf models list` unchanged.

PostgreSQL: a throw-away cluster with password (SCRAM) authentication, as on the cluster, as MLflow's
backend store; artifacts in a real S3 server on 127.0.0.1 (moto's server: MinIO itself cannot be
installed here; the code path is the same boto3 client MLflow uses for s3:// roots, pointed at
MLFLOW_S3_ENDPOINT_URL). SQLite + a local ./mlruns directory: what `rlhf run` uses.

Every `rlhf` and `mlflow` command runs as a real subprocess; the store is filled through MLflow's own
client (a run with metrics and artifacts, a registered model with two versions and aliases).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from test_mlflow_server import _free_port, _pg_bindir

PASSWORD = "bk-Secret-Passw0rd"
MODEL = "rlhf-policy"  # register.model_name's default: what `rlhf models list` shows
BIN = Path(sys.executable).parent


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG", "AWS_", "RLHF_"))}
    env.update({"RLHF_LOG_LEVEL": "WARNING", **extra})
    return env


def rlhf(*args: str, env: dict[str, str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(BIN / "rlhf"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, f"rlhf {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exit code 2 and a single 'error: ...' line (no traceback) naming ``needles``."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def populate(tracking_uri: str, artifact_location: str | None, files: dict[str, bytes], tmp: Path) -> str:
    """A run with metrics and artifacts, and MODEL with versions 1, 2 (champion) made from it; the run id."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = client.create_experiment("backup-test", artifact_location=artifact_location)
    run = client.create_run(exp, run_name="sft", tags={"stage": "sft"})
    rid = run.info.run_id
    for step, loss in enumerate((2.5, 1.75, 1.5)):
        client.log_metric(rid, "loss", loss, step=step)
    client.log_param(rid, "lr", "0.001")
    src = tmp / "artifact-src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    client.log_artifacts(rid, str(src / "policy"), artifact_path="policy")
    client.set_terminated(rid)
    client.create_registered_model(MODEL)
    for v, gold in ((1, "0.41"), (2, "0.57")):
        client.create_model_version(MODEL, source=f"{run.info.artifact_uri}/policy", run_id=rid, tags={
            "gate_passed": "true", "metric.policy_gold_mean": gold, "metric.kl_to_baseline": "0.12",
            "data_hash": f"{v:032x}.dir", "pipeline_run_id": f"pipeline-run-{v}"})
    client.set_registered_model_alias(MODEL, "challenger", "2")
    client.set_registered_model_alias(MODEL, "champion", "2")
    return rid


FILES = {"policy/model.safetensors": os.urandom(200_000), "policy/config.json": b'{"layers": 2}\n',
         "policy/tokenizer/vocab.txt": b"a\nb\nc\n"}


def download(rid: str, env: dict[str, str], cwd: Path, dest: Path) -> dict[str, bytes]:
    """The run's policy/ artifacts fetched by `mlflow artifacts download` (through the restored stores)."""
    p = subprocess.run([str(BIN / "mlflow"), "artifacts", "download", "--run-id", rid, "--artifact-path", "policy",
                        "--dst-path", str(dest)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return {f"policy/{q.relative_to(dest / 'policy').as_posix()}": q.read_bytes()
            for q in sorted((dest / "policy").rglob("*")) if q.is_file()}


def models_list(env: dict[str, str], cwd: Path) -> str:
    out = rlhf("models", "list", env=env, cwd=cwd).stdout
    assert out.strip()
    return out


# ----------------------------------------------------------------------------- servers on loopback


@pytest.fixture
def pg_cluster():
    """A throw-away PostgreSQL cluster on 127.0.0.1 with SCRAM password authentication; database 'mlflow'."""
    bindir = _pg_bindir()
    if bindir is None:
        msg = "needs the PostgreSQL server binaries (.ci/postgres.sh)"
        if os.environ.get("RLHF_REQUIRE_POSTGRES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    pytest.importorskip("psycopg2", reason="MLflow's PostgreSQL driver: pip install psycopg2-binary")
    d = Path(tempfile.mkdtemp(prefix="rlhf-pgbk-"))
    (d / "pw").write_text(PASSWORD + "\n")
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(d, "postgres")
        shutil.chown(d / "pw", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    admin = {**_clean_env(), "PGPASSWORD": PASSWORD, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "mlflow"}

    def pg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120, check=check, env=admin)

    def psql(sql: str, db: str = "postgres") -> str:
        return pg(str(bindir / "psql"), "-X", "-w", "-q", "-A", "-t", "-d", db, "-c", sql).stdout

    try:
        pg(str(bindir / "initdb"), "-D", str(d / "data"), "-A", "scram-sha-256", "--pwfile", str(d / "pw"),
           "-U", "mlflow", "-E", "UTF8", "--no-sync")
        pg(str(bindir / "pg_ctl"), "-D", str(d / "data"), "-l", str(d / "postgres.log"), "-w", "-t", "60", "-o",
           f"-p {port} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off", "start")
        pg(str(bindir / "createdb"), "mlflow")
        yield {"port": port, "psql": psql,
               # MLflow's clients: psycopg2 named (SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3)
               "uri": f"postgresql+psycopg2://mlflow:{PASSWORD}@127.0.0.1:{port}/mlflow",
               "uri_no_password": f"postgresql://mlflow@127.0.0.1:{port}/mlflow"}
    except subprocess.CalledProcessError as e:
        pytest.fail(f"could not start PostgreSQL: {e.cmd}: {e.stderr or e.stdout}")
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(d / "data"), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def s3_server(tmp_path):
    """moto's S3-compatible server as a real HTTP process on 127.0.0.1 (stands in for MinIO)."""
    exe = BIN / "moto_server"
    if not exe.exists():
        pytest.skip("needs moto's server (pip install 'moto[server]')")
    port = _free_port()
    log = open(tmp_path / "moto.log", "wb")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=_clean_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto_server did not start:\n" + (tmp_path / "moto.log").read_text())
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


# ----------------------------------------------------------------------------- PostgreSQL + S3


def test_postgres_and_s3_backup_wipe_restore(pg_cluster, s3_server, tmp_path, monkeypatch):
    import boto3

    s3_env = {"MLFLOW_S3_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "backup-test-key",
              "AWS_SECRET_ACCESS_KEY": "backup-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="mlflow")
    rid = populate(pg_cluster["uri"], "s3://mlflow/artifacts", FILES, tmp_path)

    # MLflow clients use the URI with the password; the backup reads it from PGPASSWORD (as on the cluster)
    env = _clean_env(MLFLOW_TRACKING_URI=pg_cluster["uri"], **s3_env)
    benv = _clean_env(MLFLOW_BACKEND_STORE_URI=pg_cluster["uri_no_password"], PGPASSWORD=PASSWORD,
                      MLFLOW_ARTIFACTS_DESTINATION="s3://mlflow/artifacts", **s3_env)
    work = tmp_path / "work"
    work.mkdir()
    before = models_list(env, work)
    assert "champion" in before and "pipeline-run-2" in before and PASSWORD not in before
    original = download(rid, env, work, tmp_path / "dl-before")
    assert original == FILES

    # one-line errors, before anything is written
    wrong = rlhf("backup", "create", "--out", str(tmp_path / "b-wrong"), "--backend-uri",
                 f"postgresql://mlflow:not-the-password@127.0.0.1:{pg_cluster['port']}/mlflow",
                 env=benv, cwd=work, ok=False)
    assert "not-the-password" not in one_line_error(wrong, "rejected the password of user mlflow")
    closed = _free_port()
    one_line_error(rlhf("backup", "create", "--out", str(tmp_path / "b-down"), "--backend-uri",
                        f"postgresql://mlflow@127.0.0.1:{closed}/mlflow", env=benv, cwd=work, ok=False),
                   f"cannot reach PostgreSQL at 127.0.0.1:{closed}")
    one_line_error(rlhf("backup", "create", "--out", str(tmp_path / "b-nopg"), "--pg-bin", str(tmp_path),
                        env=benv, cwd=work, ok=False), "pg_dump not found in")
    one_line_error(rlhf("backup", "create", "--out", str(tmp_path / "b-nos3"),
                        env={**benv, "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{closed}"}, cwd=work, ok=False),
                   "cannot reach the S3 endpoint")
    (tmp_path / "a-file").write_text("x")
    one_line_error(rlhf("backup", "create", "--out", str(tmp_path / "a-file" / "b"), env=benv, cwd=work, ok=False),
                   "not a writable directory")
    assert not any(p.name.startswith(("b-", ".b-")) for p in tmp_path.iterdir())  # nothing half-written

    # backup
    bk = tmp_path / "backups" / "nightly"
    made = rlhf("backup", "create", "--out", str(bk), env=benv, cwd=work)
    assert PASSWORD not in made.stdout + made.stderr
    manifest = json.loads((bk / "manifest.json").read_text())
    assert manifest["backend"]["type"] == "postgresql" and manifest["backend"]["schema_revision"]
    assert (manifest["backend"]["runs"], manifest["backend"]["registered_models"],
            manifest["backend"]["model_versions"]) == (1, 1, 2)
    assert manifest["artifacts"]["files"] == len(FILES) and PASSWORD not in json.dumps(manifest)
    assert (bk / "backend" / "mlflow.pgdump").read_bytes()[:5] == b"PGDMP"
    one_line_error(rlhf("backup", "create", "--out", str(bk), env=benv, cwd=work, ok=False),
                   "not an empty directory")

    # wipe: drop and recreate the database, empty the bucket
    pg_cluster["psql"]("DROP DATABASE mlflow WITH (FORCE)")
    pg_cluster["psql"]("CREATE DATABASE mlflow")
    for obj in s3.list_objects_v2(Bucket="mlflow").get("Contents", []):
        s3.delete_object(Bucket="mlflow", Key=obj["Key"])
    wiped = models_list(env, work)  # (MLflow creates its empty schema in the new database)
    assert wiped != before and "no versions of rlhf-policy" in wiped

    # a damaged copy of the backup is refused before anything is written
    bad = tmp_path / "backups" / "damaged"
    shutil.copytree(bk, bad)
    dump = bad / "backend" / "mlflow.pgdump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    one_line_error(rlhf("backup", "restore", str(bad), env=benv, cwd=work, ok=False),
                   "backend/mlflow.pgdump does not match the manifest's sha256")
    assert pg_cluster["psql"]("SELECT count(*) FROM runs", "mlflow").strip() == "0"  # nothing restored

    # restore onto the wiped stores
    done = rlhf("backup", "restore", str(bk), env=benv, cwd=work)
    assert "1 run(s), 1 registered model(s), 2 version(s), 3 artifact file(s)" in done.stdout
    assert models_list(env, work) == before
    assert download(rid, env, work, tmp_path / "dl-after") == original

    # a store in use is not overwritten without --force; with it, the same state again
    one_line_error(rlhf("backup", "restore", str(bk), env=benv, cwd=work, ok=False),
                   "is in use (1 runs, 1 registered models, 2 model versions)", "--force")
    rlhf("backup", "restore", str(bk), "--force", env=benv, cwd=work)  # (restore compares the counts itself)


# ----------------------------------------------------------------------------- SQLite + ./mlruns


def test_sqlite_and_local_artifacts_backup_wipe_restore(tmp_path, monkeypatch):
    work = tmp_path / "project"
    work.mkdir()
    env = _clean_env()  # rlhf's defaults: ./mlflow.db and ./mlruns
    uri = f"sqlite:///{work / 'mlflow.db'}"
    monkeypatch.chdir(work)  # MLflow puts a SQLite store's artifacts in ./mlruns of the working directory
    rid = populate(uri, None, FILES, tmp_path)
    denv = {**env, "MLFLOW_TRACKING_URI": uri}
    before = models_list(env, work)
    assert "champion" in before
    original = download(rid, denv, work, tmp_path / "dl-before")
    assert original == FILES

    made = rlhf("backup", "create", "--into", str(tmp_path / "backups"), "--keep", "1", env=env, cwd=work)
    bk = Path(made.stdout.split("backup written to ", 1)[1].split(":", 1)[0])
    assert bk.parent == tmp_path / "backups" and (bk / "backend" / "mlflow.db").is_file()
    assert "intact" in rlhf("backup", "verify", str(bk), env=env, cwd=work).stdout
    second = rlhf("backup", "create", "--into", str(tmp_path / "backups"), "--keep", "1", env=env, cwd=work)
    assert f"deleted old backup {bk}" in second.stdout and not bk.exists()
    bk = Path(second.stdout.split("backup written to ", 1)[1].split(":", 1)[0])
    assert [p.name for p in (tmp_path / "backups").iterdir()] == [bk.name]

    # wipe: the database file and the artifact directory
    (work / "mlflow.db").unlink()
    shutil.rmtree(work / "mlruns")
    wiped = models_list(env, work)
    assert wiped != before and "no versions of rlhf-policy" in wiped

    # damaged backups: an artifact changed, an unreadable manifest
    bad = tmp_path / "damaged"
    shutil.copytree(bk, bad)
    victim = next(p for p in sorted((bad / "artifacts").rglob("*")) if p.name == "config.json")
    victim.write_bytes(b'{"layers": 3}\n')
    one_line_error(rlhf("backup", "restore", str(bad), env=env, cwd=work, ok=False),
                   "config.json does not match the manifest's sha256")
    (bad / "manifest.json").write_text("{not json")
    one_line_error(rlhf("backup", "verify", str(bad), env=env, cwd=work, ok=False), "manifest.json is unreadable")
    assert not (work / "mlruns").exists()

    rlhf("backup", "restore", str(bk), env=env, cwd=work)
    assert models_list(env, work) == before
    assert download(rid, denv, work, tmp_path / "dl-after") == original
    one_line_error(rlhf("backup", "restore", str(bk), env=env, cwd=work, ok=False), "is in use", "--force")
    rlhf("backup", "restore", str(bk), "--force", env=env, cwd=work)  # (restore compares the counts itself)
