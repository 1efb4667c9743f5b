"""Who can do what on a real authenticated ``mlflow server --app-name basic-auth`` on loopback.

One server per module, configured with the auth config of the cluster (the ConfigMap ``mlflow-auth`` in
k8s/base/mlflow-auth.yaml, its ``database_uri`` pointed at a SQLite file here) and the accounts file the
bootstrap Job runs (the ConfigMap ``mlflow-accounts``), applied by the same function
(:func:`rlhf.mlops.access.apply_accounts`). Then:

* the pipeline account registers model versions and moves ``champion`` (``rlhf models promote`` /
  ``rollback``);
* the read-only serving account and a client without credentials cannot register, promote or roll back:
  the ``rlhf`` command prints one line naming the action and the user, exits 4, no traceback; the server
  saw one request each (MLflow does not retry a 401/403);
* the serving account reads ``models:/<name>@champion`` (metadata, and the weights);
* the schema migration commands of the server's init containers upgrade an old schema and are idempotent;
  with PostgreSQL (slow): migrations, auth store and server exactly as the Deployment runs them.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli
from test_mlflow_server import MlflowServer, postgres  # noqa: F401 (fixture)
from test_registry import make_evaluation, make_policy, make_reward, one_torch_thread  # noqa: F401 (autouse)

from rlhf.config import ModelConfig, RegisterConfig
from rlhf.errors import AccessDenied
from rlhf.mlops import access, registry, tracking
from rlhf.train import models

ADMIN = ("admin", "admin-Passw0rd-for-tests")
PASSWORDS = {"PIPELINE_PASSWORD": "pipeline-Passw0rd-for-tests", "SERVING_PASSWORD": "serving-Passw0rd-for-tests"}
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def k8s_config(name: str) -> dict[str, str]:
    """The data of a ConfigMap in k8s/base/mlflow-auth.yaml (what the cluster runs)."""
    docs = yaml.safe_load_all((ROOT / "k8s/base/mlflow-auth.yaml").read_text())
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)["data"]


def auth_ini(database_uri: str, dest: Path) -> Path:
    ini = configparser.ConfigParser()
    ini.read_string(k8s_config("mlflow-auth")["basic_auth.ini"])
    ini["mlflow"]["database_uri"] = database_uri
    with dest.open("w") as f:
        ini.write(f)
    return dest


def accounts_file(dest: Path) -> Path:
    dest.write_text(k8s_config("mlflow-accounts")["accounts.yaml"])
    return dest


def server_env(ini: Path) -> dict[str, str]:
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@contextlib.contextmanager
def signed_in(user: tuple[str, str] | None):
    """The MLflow client's credentials for the block (None: no credentials at all)."""
    saved = {k: os.environ.pop(k, None) for k in CREDENTIAL_ENV}
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user
    try:
        yield
    finally:
        for k in CREDENTIAL_ENV:
            os.environ.pop(k, None)
            if saved[k] is not None:
                os.environ[k] = saved[k]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An authenticated server with the accounts applied: ``.url``, ``.pipeline``, ``.serving``, ``.first``."""
    root = tmp_path_factory.mktemp("auth-server")
    ini = auth_ini(f"sqlite:///{root / 'auth.db'}", root / "basic_auth.ini")
    srv = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root, env=server_env(ini), args=["--app-name", "basic-auth"])
    for k in CREDENTIAL_ENV:
        srv.env.pop(k, None)
    srv.start()
    saved = {k: os.environ.get(k) for k in PASSWORDS}
    os.environ.update(PASSWORDS)
    try:
        cfg = access.load_config(accounts_file(root / "accounts.yaml"))
        with signed_in(ADMIN):
            srv.first = access.apply_accounts(cfg, srv.url)
        users = {a.role: (a.username, PASSWORDS[a.password_env]) for a in cfg.accounts}
        srv.pipeline, srv.serving, srv.accounts = users["pipeline"], users["serving"], root / "accounts.yaml"
        yield srv
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        leftovers = srv.stop()
    assert leftovers == [], f"server processes left running: {leftovers}"


@pytest.fixture
def env(server, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for k in ("RLHF_TRACKING", tracking.ENV_PARENT, tracking.ENV_PIPELINE, "KFP_RUN_ID", "RLHF_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv(tracking.ENV_DATA_HASH, "feedfacefeedfacefeedfacefeedface.dir")
    return monkeypatch


def cli(server, user: tuple[str, str] | None, *args: str) -> subprocess.CompletedProcess:
    """``rlhf ...`` as that user (None: no credentials), in the repository (its params.yaml names the models)."""
    assert not any(os.environ.get(k) for k in CREDENTIAL_ENV), "credentials leaked into the test's environment"
    env = {"RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": server.url}
    if user:
        env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = user
    return run_cli(*args, env=env, timeout=600)


def assert_refused(res: subprocess.CompletedProcess, action: str, user: str, status: str) -> None:
    err = res.stderr.strip().splitlines()
    assert res.returncode == AccessDenied.exit_code, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert f"refused to {action}" in errors[0] and f"for user '{user}'" in errors[0] and status in errors[0], errors
    assert PASSWORDS["SERVING_PASSWORD"] not in res.stderr and PASSWORDS["PIPELINE_PASSWORD"] not in res.stderr


def requests_logged(server, needle: str) -> int:
    return sum(needle in line for line in server.log.read_text(errors="replace").splitlines())


# ----------------------------------------------------------------------------- the accounts


def test_bootstrap_creates_the_accounts_and_is_idempotent(server):
    assert {"user pipeline: created", "user serving: created",
            "user pipeline: MANAGE on registered model rlhf-policy",
            "user pipeline: EDIT on experiment rlhf", "user serving: READ on registered model rlhf-policy"} \
        <= set(server.first)
    # the Job's command, a second time: nothing to change
    res = cli(server, ADMIN, "tracking", "accounts", "--config", str(server.accounts))
    assert res.returncode == 0 and "nothing to change" in res.stdout, res.stdout + res.stderr
    # only the admin may run it
    res = cli(server, server.serving, "tracking", "accounts", "--config", str(server.accounts))
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr


def test_bootstrap_rotates_a_password(server, env):
    import mlflow

    new = "serving-rotated-Passw0rd"
    env.setenv("SERVING_PASSWORD", new)
    with signed_in(ADMIN):
        assert access.apply_accounts(access.load_config(server.accounts), server.url) == \
            ["user serving: new password"]
    try:
        with signed_in((server.serving[0], new)):
            assert mlflow.MlflowClient(server.url).get_registered_model("rlhf-policy").name == "rlhf-policy"
    finally:
        env.setenv("SERVING_PASSWORD", server.serving[1])
        with signed_in(ADMIN):
            assert access.apply_accounts(access.load_config(server.accounts), server.url) == \
                ["user serving: new password"]


def test_no_credentials_no_access(server, env):
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(server.url)
    before = requests_logged(server, '" 401 Unauthorized')
    with signed_in(None):
        for call in (lambda: client.get_registered_model("rlhf-policy"),
                     lambda: client.set_registered_model_alias("rlhf-policy", "champion", "1"),
                     lambda: client.create_registered_model("squatter")):
            with pytest.raises(MlflowException) as e:
                call()
            assert e.value.error_code == "UNAUTHENTICATED"
    # one refused request per call, no retries (MLflow retries only 408/429/5xx)
    assert requests_logged(server, '" 401 Unauthorized') == before + 3


def test_refused_metrics_are_saved_at_once_not_resent(server, env, tmp_path):
    """Metrics a run's credentials may not write (a rotated password, a read-only account) go to
    mlflow-unsent/ in the first round, with no waiting for the outage retries."""
    import json

    import mlflow

    env.setattr(tracking, "RETRY_SECONDS", 3600.0)  # an outage would keep them in memory for an hour
    with signed_in(server.pipeline):
        exp = mlflow.MlflowClient(server.url).get_experiment_by_name("rlhf")
        run_id = mlflow.MlflowClient(server.url).create_run(exp.experiment_id).info.run_id
    with signed_in(server.serving):
        t = tracking.Tracker(run_id, mlflow.MlflowClient(server.url))
        t.log_metrics({"loss": 0.5}, step=1)
        assert t.flush() is None  # nothing left to save at the end: it was saved when refused
    assert t.pending == 0
    saved = tmp_path / "mlflow-unsent" / f"{run_id}.jsonl"
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [(r["key"], r["step"]) for r in rows] == [("loss", 1)]


# ----------------------------------------------------------------------------- registry: promote, refuse, read


@pytest.fixture(scope="module")
def registered(server, dataset, tmp_path_factory):
    """Two versions registered by the pipeline account: v1 champion, v2 challenger (worse gold score)."""
    from rlhf.data.prepare import dataset_texts

    tmp = tmp_path_factory.mktemp("auth-registry")
    saved = {k: os.environ.get(k) for k in ("RLHF_TRACKING", "MLFLOW_TRACKING_URI", tracking.ENV_PARENT,
                                            tracking.ENV_PIPELINE)}
    os.environ.update({"RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": server.url})
    try:
        base = Path(models.resolve_base(ModelConfig(name="tiny", cache_dir=str(tmp / "cache")),
                                        dataset_texts(dataset)))
        reward = make_reward(tmp / "reward", base)
        cfg = RegisterConfig(cache_dir=str(tmp / "champions"))
        pol1 = make_policy(tmp / "p1", base, seed=1, dataset=dataset)
        make_evaluation(tmp / "e1", pol1, base, reward, gold=1.0)
        with signed_in(server.pipeline):
            with tracking.pipeline_run("auth-run-1"):
                r1 = registry.register(pol1, reward, tmp / "e1", cfg)
            pol2 = make_policy(tmp / "p2", base, seed=2, dataset=dataset)
            make_evaluation(tmp / "e2", pol2, base, reward, gold=0.5, champion=registry.champion_dir(cfg),
                            champion_gold=1.0)
            with tracking.pipeline_run("auth-run-2"):
                r2 = registry.register(pol2, reward, tmp / "e2", cfg)
        yield {"r1": r1, "r2": r2, "cfg": cfg, "tmp": tmp, "pol": pol2, "reward": reward, "base": base,
               "dataset": dataset}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_pipeline_registers_and_moves_the_champion(server, registered):
    assert (registered["r1"]["version"], registered["r1"]["promoted"]) == (1, True)
    assert (registered["r2"]["version"], registered["r2"]["promoted"], registered["r2"]["champion"]) == (2, False, 1)
    res = cli(server, server.pipeline, "models", "promote", "2", "--reason", "auth test")
    assert res.returncode == 0 and "champion: v1 -> v2" in res.stdout, res.stdout + res.stderr


def test_serving_and_anonymous_cannot_promote_or_roll_back(server, registered):
    """With v2 champion (the test above) and v1 before it: neither may promote v1 nor roll back to it."""
    import mlflow

    for user, name, status in ((server.serving, "serving", "HTTP 403 PERMISSION_DENIED"),
                               (None, "anonymous", "HTTP 401 UNAUTHENTICATED")):
        res = cli(server, user, "models", "promote", "1", "--reason", "hostile")
        assert_refused(res, "move the champion alias of 'rlhf-policy'", name, status)
        res = cli(server, user, "models", "rollback")
        assert_refused(res, "move the champion alias of 'rlhf-policy' back", name, status)
    with signed_in(server.pipeline):
        assert mlflow.MlflowClient(server.url).get_model_version_by_alias("rlhf-policy", "champion").version == "2"
    # a wrong password is not the read-only account
    res = cli(server, (server.serving[0], "not-the-Passw0rd"), "models", "list")
    assert_refused(res, "list the versions of 'rlhf-policy'", "serving", "HTTP 401 UNAUTHENTICATED")
    # the pipeline account may
    res = cli(server, server.pipeline, "models", "rollback", "--reason", "auth test")
    assert res.returncode == 0 and "champion: v2 -> v1" in res.stdout, res.stdout + res.stderr


def test_serving_cannot_register_nor_set_an_alias(server, registered, env):
    import mlflow
    from mlflow.exceptions import MlflowException

    env.setenv("RLHF_TRACKING", "on")
    tmp = registered["tmp"]
    pol = make_policy(tmp / "p3", registered["base"], seed=3, dataset=registered["dataset"])
    make_evaluation(tmp / "e3", pol, registered["base"], registered["reward"], gold=2.0)
    client = mlflow.MlflowClient(server.url)
    with signed_in(server.serving):
        with pytest.raises(AccessDenied) as e:
            registry.register(pol, registered["reward"], tmp / "e3", registered["cfg"])
        assert str(e.value).startswith(f"MLflow at {server.url} refused to register or promote a version of "
                                       "'rlhf-policy' for user 'serving' (HTTP 403 PERMISSION_DENIED"), e.value
        with pytest.raises(AccessDenied, match="refused to start the pipeline run in the experiment 'rlhf' for "
                                               "user 'serving'"):
            with tracking.pipeline_run("auth-hostile"):
                pass
        before = requests_logged(server, '"POST /api/2.0/mlflow/registered-models/alias HTTP/1.1" 403')
        for call in (lambda: client.set_registered_model_alias("rlhf-policy", "champion", "2"),
                     lambda: client.create_model_version("rlhf-policy", "models:/rlhf-policy/1"),
                     lambda: client.delete_registered_model_alias("rlhf-policy", "champion"),
                     lambda: client.set_registered_model_alias("rlhf-reward-model", "champion", "1")):
            with pytest.raises(MlflowException) as e:
                call()
            assert e.value.error_code == "PERMISSION_DENIED"
        assert requests_logged(server, '"POST /api/2.0/mlflow/registered-models/alias HTTP/1.1" 403') == before + 2
    with signed_in(server.pipeline):  # nothing was registered
        assert sorted(int(v.version) for v in client.search_model_versions("name='rlhf-policy'")) == [1, 2]


def test_serving_reads_the_champion(server, registered, env):
    import mlflow

    env.setenv("RLHF_TRACKING", "on")
    with signed_in(server.serving):
        mv = mlflow.MlflowClient(server.url).get_model_version_by_alias("rlhf-policy", "champion")
        assert mv.version == "1" and mv.tags["gate_passed"] == "true"
        # the weights too: the champion as a local directory (what evaluate --champion-from-registry reads)
        path = registry.champion_dir(registered["cfg"].model_copy(update={"cache_dir": str(registered["tmp"] /
                                                                                          "serving-cache")}))
        assert path is not None and (path / "manifest.json").is_file()
    res = cli(server, server.serving, "models", "list")
    assert res.returncode == 0 and "champion" in res.stdout, res.stdout + res.stderr


# ----------------------------------------------------------------------------- schema migrations


def _schema_version(uri: str) -> str:
    import sqlalchemy
    from mlflow.store.db import utils

    engine = sqlalchemy.create_engine(uri)
    try:
        return utils._get_schema_version(engine)
    finally:
        engine.dispose()


def test_db_upgrade_migrates_an_old_schema_and_is_idempotent(tmp_path):
    """What the init container ``db-upgrade`` runs, on a tracking store two migrations behind."""
    from alembic import command
    from mlflow.store.db import utils

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    upgrade = [sys.executable, "-m", "mlflow", "db", "upgrade", uri]
    assert subprocess.run(upgrade, capture_output=True, text=True, timeout=300).returncode == 0
    head = _schema_version(uri)
    assert head == utils._get_latest_schema_revision()
    command.downgrade(utils._get_alembic_config(uri), "-2")  # the store of an older MLflow
    assert _schema_version(uri) != head
    # (what MLflow 3.17.2's server does with such a store by itself, docs/deploy.md: it migrates it while
    # starting, because a table is missing; the explicit step is what the init container adds)
    import shutil

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    shutil.copy(tmp_path / "mlflow.db", tmp_path / "copy.db")
    SqlAlchemyStore(f"sqlite:///{tmp_path / 'copy.db'}", str(tmp_path / "artifacts"))
    assert _schema_version(f"sqlite:///{tmp_path / 'copy.db'}") == head
    for _ in range(2):  # the upgrade, then a restart of the pod: nothing to do
        res = subprocess.run(upgrade, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert _schema_version(uri) == head
    SqlAlchemyStore(uri, str(tmp_path / "artifacts"))  # what the server opens; it checks the schema version


@pytest.mark.slow
def test_postgres_migrations_then_authenticated_server(postgres, tmp_path):  # noqa: F811
    """As the Deployment runs: both init-container migrations, then the server with the auth store in the same
    PostgreSQL database, the auth config's URI naming no user or password (libpq: PGUSER/PGPASSWORD)."""
    import urllib.parse

    import mlflow

    pg = urllib.parse.urlparse(postgres)
    pg_env = {"PGUSER": pg.username, "PGPASSWORD": pg.password}
    env = {**os.environ, **pg_env}
    backend = f"postgresql+psycopg2://{pg.username}@{pg.hostname}:{pg.port}{pg.path}"
    ini_uri = configparser.ConfigParser()
    ini_uri.read_string(k8s_config("mlflow-auth")["basic_auth.ini"])
    auth_uri = urllib.parse.urlparse(ini_uri["mlflow"]["database_uri"])._replace(
        netloc=f"{pg.hostname}:{pg.port}", path=pg.path).geturl()
    for cmd in ([sys.executable, "-m", "mlflow", "db", "upgrade", backend],
                [sys.executable, "-m", "mlflow.server.auth", "db", "upgrade", "--url", backend]):
        for _ in range(2):  # idempotent
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
            assert res.returncode == 0, res.stderr[-2000:]
    root = tmp_path / "server"
    root.mkdir()
    ini = auth_ini(auth_uri, root / "basic_auth.ini")
    srv = MlflowServer(backend, root, env={**server_env(ini), **pg_env}, args=["--app-name", "basic-auth"])
    for k in CREDENTIAL_ENV:
        srv.env.pop(k, None)
    srv.start()
    try:
        os.environ.update(PASSWORDS)
        with signed_in(ADMIN):
            changes = access.apply_accounts(access.load_config(accounts_file(root / "accounts.yaml")), srv.url)
        assert "user pipeline: created" in changes
        with signed_in(("pipeline", PASSWORDS["PIPELINE_PASSWORD"])):
            assert mlflow.MlflowClient(srv.url).get_registered_model("rlhf-policy").name == "rlhf-policy"
        with signed_in(None), pytest.raises(Exception) as e:
            mlflow.MlflowClient(srv.url).get_registered_model("rlhf-policy")
        assert getattr(e.value, "error_code", None) == "UNAUTHENTICATED"
    finally:
        for k in PASSWORDS:
            os.environ.pop(k, None)
        leftovers = srv.stop()
    assert leftovers == [], f"server processes left running: {leftovers}"
    assert pg.password not in backend + auth_uri
