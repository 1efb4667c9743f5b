"""Experiment tracking: the one module that talks to MLflow for runs, params and metrics.

Stages call :func:`stage_run` and log through the :class:`Tracker` it yields;
nothing else in the package imports mlflow for tracking (the model registry,
:mod:`rlhf.mlops.registry`, builds on the connection made here).

* Tracking URI: ``MLFLOW_TRACKING_URI``, default a SQLite file ``mlflow.db`` in
  the current directory (run artifacts in ``./mlruns``). Browse it with
  ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
* Experiment: ``MLFLOW_EXPERIMENT_NAME``, default ``rlhf``.
* ``RLHF_TRACKING=off`` turns MLflow off (metrics still go to the progress log).
* One parent run per pipeline run (:func:`pipeline_run`, or
  :func:`start_pipeline_run` / :func:`end_pipeline_run` when every step runs in
  its own process, as KFP components do). The parent run's id travels in
  ``RLHF_PARENT_RUN_ID`` and the pipeline run id in ``RLHF_PIPELINE_RUN_ID``;
  every stage run is nested under the parent (``mlflow.parentRunId``). A retried
  pipeline run (same id) finds and reuses its parent run.
* Tags on every run: git commit (and whether the tree was dirty), DVC data
  hash, pipeline run id, KFP run id, profile, host, stage.
* Params are the resolved stage config, flattened (``lora.r``); values of
  secret-looking keys (``password``, ``hf_token``, ``aws_secret_access_key``...)
  and secret-looking values (credentials in URIs, ``hf_...``/``AKIA...`` tokens)
  are replaced by ``***``. ``max_new_tokens`` or ``pad_token`` are not secrets.
* Per-step metrics carry ``step`` so the MLflow UI plots them.

MLflow unreachable: **fail fast at start-up**. :func:`stage_run` and
:func:`pipeline_run` check the server (HTTP ``/health``, or a TCP connect for a
database URI; 5 s timeout) before any work starts and stop with one line naming
the URI and the fix.

MLflow refusing the credentials (401 no or wrong credentials, 403 no permission; basic-auth on the
cluster, :mod:`rlhf.mlops.access`): one line naming the action and the user
(:class:`rlhf.errors.AccessDenied`, exit 4; :func:`refusals`). MLflow does not retry a 401/403.

If the server goes away *after* the start, training neither dies nor waits:

* Metrics and tags go through MLflow's asynchronous logging
  (``MlflowClient.log_batch(..., synchronous=False)``); the training thread never
  waits for the network. Each request is retried by MLflow's own HTTP retries;
  where the user set none, this module bounds them for the whole process
  (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=3``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1``):
  a refused connection gives up after 7 s (measured; MLflow's defaults took
  246 s). ``MLFLOW_HTTP_REQUEST_TIMEOUT`` stays MLflow's (120 s per attempt,
  model uploads need it): a server that accepts connections but never answers
  costs up to 4 x that per request.
* MLflow drops a request that still fails after its retries (an ERROR line, the
  error on its ``RunOperations``); the tracker reads that outcome, keeps the
  values and resends them, one request every ``RETRY_SECONDS`` (30 s), until the
  server answers; then everything kept goes out. Values the store *refuses*
  (``INVALID_PARAMETER_VALUE``: a bad key, a deleted run) cannot be resent; they
  are saved at once (below).
* One round of requests is in flight per run, and a new round starts at most every
  ``SEND_SECONDS`` (2 s, or ``$RLHF_MLFLOW_SEND_SECONDS``; at once when a full
  request of 1000 values is waiting):
  what is logged meanwhile goes out together in the next one. A round per training
  step cost the loop 20 % of its speed on a 2-core machine (the SQLite writes and
  the request thread compete with it for the cores and the GIL: SFT on the tiny
  profile, 200 steps, 6.4 s of compute with a round per step vs 5.1 s untracked).
  MLflow's queue itself is unbounded and cannot be cancelled: closing a run and
  interpreter exit wait for every queued request, each paying the full retry time
  (measured: 50 single-step requests queued against a killed server took 36 s to drain; with MLflow's default retries one
  round of 10 took 246 s). ``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS`` (MLflow
  merging queued calls) is not used: it reports a failed merged request to the
  first call only (measured: 2 s buffering, 10 calls, server killed after the
  5th: 2 of the 10 ``RunOperations`` raised, none of the 10 values was stored).
* At the end of a stage the tracker waits for the round in flight (at most one
  request's retries, about 7 s), sends what is kept unless a request failed less
  than ``RETRY_SECONDS`` ago, writes what MLflow has still not stored to
  ``mlflow-unsent/<run_id>.jsonl`` (one JSON row per metric value or tag, only
  values whose request failed) with a warning, and marks the run terminated
  (another 7 s when the server is gone; the run then stays RUNNING in MLflow, with
  a warning). Measured (``tests/test_mlflow_server.py``, server killed with
  SIGKILL mid-run): no log call took more than 11 ms; after a first kill and a
  restart every value reached the server; after a second kill the stage ended
  14 s later, the 10 steps logged after the kill were in ``mlflow-unsent/`` and
  all earlier ones on the server, no value in both. Kept values live in memory
  until the stage ends: a process that is killed loses them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import math
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf.errors import AccessDenied, ConfigError, UserError
from rlhf.redact import (
    REDACTED,
    config_params,
    flatten,
    install_log_redaction,
    is_secret_key,
    redact,
    redact_value,
)

log = logging.getLogger("rlhf")

ENV_PARENT = "RLHF_PARENT_RUN_ID"
ENV_PIPELINE = "RLHF_PIPELINE_RUN_ID"
ENV_DATA_HASH = "RLHF_DATA_HASH"
ROLE_TAG = "rlhf.role"
RETRY_SECONDS = 30.0  # while MLflow is down: how often kept metrics are tried again
SEND_SECONDS = 2.0  # while it is up: how often a round of metric requests starts (the first at once)
ENV_SEND_SECONDS = "RLHF_MLFLOW_SEND_SECONDS"  # another interval (0: a round whenever none is in flight)
UNSENT_DIR = "mlflow-unsent"
ENV_UNSENT_DIR = "RLHF_UNSENT_DIR"
# A refused connection gives up after about 7 s (MLflow's defaults, 7 retries x factor 2: about 4 minutes).
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}

# ----------------------------------------------------------------------------- configuration


def enabled() -> bool:
    return os.environ.get("RLHF_TRACKING", "on").lower() not in ("off", "0", "false", "no")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlhf")


def display_uri(uri: str | None = None) -> str:
    """The tracking URI with any credentials masked (safe for logs and errors)."""
    return redact_value(uri or tracking_uri())


def unsent_dir() -> Path:
    """Where values MLflow never received are kept: ``$RLHF_UNSENT_DIR``, else ``./mlflow-unsent`` when the
    working directory is writable, else ``<tmp>/mlflow-unsent`` (the image's ``/app`` is root-owned and
    its root filesystem read-only; the pod's ``/tmp`` is writable)."""
    if os.environ.get(ENV_UNSENT_DIR):
        return Path(os.environ[ENV_UNSENT_DIR])
    if os.access(os.getcwd(), os.W_OK):
        return Path(UNSENT_DIR)
    import tempfile

    return Path(tempfile.gettempdir()) / UNSENT_DIR


# ----------------------------------------------------------------------------- lineage tags


@functools.lru_cache(maxsize=8)
def _git(cwd: str) -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5,
                                check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None, None
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return commit, dirty


def git_commit() -> str | None:
    """The commit of the code: ``RLHF_GIT_COMMIT`` (the image's, from the build argument ``GIT_COMMIT``),
    else the package's git checkout."""
    return os.environ.get("RLHF_GIT_COMMIT") or _git(str(Path(__file__).resolve().parent))[0] or \
        _git(os.getcwd())[0]


def git_dirty() -> bool | None:
    if os.environ.get("RLHF_GIT_COMMIT"):
        return None
    commit, dirty = _git(str(Path(__file__).resolve().parent))
    return dirty if commit else _git(os.getcwd())[1]


def data_hash() -> str | None:
    """The DVC hash of the raw data: ``RLHF_DATA_HASH``, else ``data.dvc`` in the current directory."""
    if os.environ.get(ENV_DATA_HASH):
        return os.environ[ENV_DATA_HASH]
    if Path("data.dvc").is_file():
        try:
            from rlhf.mlops.versioning import data_hash as dvc_hash

            return dvc_hash("data.dvc") or None
        except Exception:  # a malformed pointer file must not stop training; it just goes unrecorded
            return None
    return None


def profile() -> str | None:
    if os.environ.get("RLHF_PROFILE"):
        return os.environ["RLHF_PROFILE"]
    if Path("params.yaml").is_file():
        try:
            from rlhf.config import active_profile, load_yaml

            return active_profile(load_yaml("params.yaml"))
        except Exception:
            return None
    return None


def default_tags(extra: dict[str, Any] | None = None) -> dict[str, str]:
    dirty = git_dirty()
    tags = {
        "git_commit": git_commit(),
        "git_dirty": None if dirty is None else str(dirty).lower(),
        "data_hash": data_hash(),
        "pipeline_run_id": os.environ.get(ENV_PIPELINE),
        "kfp_run_id": os.environ.get("KFP_RUN_ID"),
        "profile": profile(),
        "host": socket.gethostname(),
    }
    tags.update(extra or {})
    return {k: _tag_value(k, v) for k, v in tags.items() if v is not None}


def _tag_value(key: str, value: Any) -> str:
    if is_secret_key(key) and not key.startswith("mlflow."):
        return REDACTED
    return redact_value(str(value))[:5000]


# ----------------------------------------------------------------------------- connecting


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with one line if the tracking server (or database) does not answer."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    hint = "start it, fix MLFLOW_TRACKING_URI, or set RLHF_TRACKING=off"
    if scheme in ("http", "https"):
        try:
            _health(parsed, timeout)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                return  # it answers; authentication is checked by the first real call
            raise UserError(f"MLflow tracking server {display_uri(uri)} is unhealthy (HTTP {e.code} on /health)",
                            hint=hint) from None
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"MLflow tracking server {display_uri(uri)} is unreachable "
                            f"({getattr(e, 'reason', e)})", hint=hint) from None
    elif scheme in ("postgresql", "postgres", "mysql", "mssql"):
        port = parsed.port or {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}[scheme]
        host = parsed.hostname or "localhost"
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            raise UserError(f"MLflow database {display_uri(uri)} is unreachable ({e.strerror or e})",
                            hint=hint) from None
    elif scheme == "sqlite":
        path = sqlite_path(uri)
        if path is not None:
            _check_sqlite_path(path)
    elif scheme == "file" or (not scheme and uri.startswith(("/", ".", "~"))) or \
            (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):  # a plain path (or C:\...) is the file store too
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            raise UserError(f"MLFLOW_TRACKING_URI={display_uri(uri)} is MLflow's file store, which MLflow 3 "
                            "refuses (maintenance mode)",
                            hint="use a database, e.g. MLFLOW_TRACKING_URI=sqlite:///mlflow.db, or an "
                                 "http(s):// server; `mlflow migrate-filestore` moves old runs") from None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None: in memory)."""
    path = uri.split(":///", 1)[-1] if ":///" in uri else ""
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser()


def _check_sqlite_path(path: Path) -> None:
    """MLflow's SQLite file must be creatable or writable: else one line now, not a traceback from SQLAlchemy."""
    hint = "point MLFLOW_TRACKING_URI at a writable file, e.g. sqlite:///mlflow.db, or set RLHF_TRACKING=off"
    for parent in path.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"MLflow's SQLite database {path}: {parent} is a file, not a directory",
                            where="MLFLOW_TRACKING_URI", hint=hint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the directory of MLflow's SQLite database {path}: {e.strerror or e}",
                        where="MLFLOW_TRACKING_URI", hint=hint) from None
    target = path if path.exists() else path.parent
    if path.is_dir() or not os.access(target, os.W_OK):
        why = " is a directory" if path.is_dir() else f": {target} is not writable (read-only file system or " \
            "permissions)"
        raise UserError(f"MLflow's SQLite database {path}{why}", where="MLFLOW_TRACKING_URI", hint=hint)


@contextlib.contextmanager
def store_errors(uri: str | None = None, hint: str | None = None) -> Iterator[None]:
    """Failures of the tracking store itself as one line: a full disk under a SQLite (or any local) store,
    a SQLite file that cannot be opened, a request the store refuses."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    try:
        yield
    except Exception as e:
        from rlhf.io import no_space_error, out_of_space

        db = sqlite_path(uri) if uri.startswith("sqlite") else None
        if out_of_space(e, db.parent if db is not None else None):
            raise no_space_error(db or display_uri(uri), what="MLflow's database",
                                 kept="the stage stopped before writing its output") from None
        if isinstance(e, UserError):
            raise
        if is_denied(e):  # 401/403: the credentials, not the store
            raise access_denied(e, _ACTION.get() or "use it") from None
        if isinstance(e, MlflowException) or type(e).__module__.split(".")[0] in ("sqlalchemy", "sqlite3"):
            raise UserError(f"MLflow at {display_uri(uri)} failed: {_one_line(e)}",
                            hint=hint or "check MLFLOW_TRACKING_URI (a writable sqlite:/// file or a reachable "
                                         "server), or set RLHF_TRACKING=off") from None
        if type(e).__module__.split(".")[0] in ("requests", "urllib3"):  # the server went away mid-call
            raise UserError(f"MLflow tracking server {display_uri(uri)} stopped answering: {_one_line(e)}",
                            hint=hint or "check the server; metrics not sent are in mlflow-unsent/ "
                                         "(`rlhf tracking flush`)") from None
        raise


def _health(parsed: urllib.parse.ParseResult, timeout: float) -> None:
    """GET <server>/health the way the mlflow client would reach it (auth and TLS settings included)."""
    import base64
    import ssl

    host = parsed.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host + (f":{parsed.port}" if parsed.port else "")  # credentials go in a header, not the URL
    url = urllib.parse.urlunparse(parsed._replace(netloc=netloc)).rstrip("/") + "/health"
    req = urllib.request.Request(url)
    user = urllib.parse.unquote(parsed.username or "") or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = urllib.parse.unquote(parsed.password or "") or os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        req.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    context = None
    if parsed.scheme == "https":
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl._create_unverified_context()
        elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            context = ssl.create_default_context(cafile=os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    urllib.request.urlopen(req, timeout=timeout, context=context).read()


def connect():
    """Check the server, point the mlflow client at it and make sure the experiment exists.

    Returns ``(client, experiment_id)``.
    """
    import mlflow

    send_seconds()  # a bad $RLHF_MLFLOW_SEND_SECONDS stops here, before a run exists
    uri = tracking_uri()
    check_reachable(uri)
    _bounded_http_retries()
    if redact_value(uri) != uri:
        # MLflow prints "View run ... at: <URI with the password>" straight to stdout: not with a secret in it
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    install_log_redaction("mlflow")
    db = sqlite_path(uri) if uri.startswith("sqlite") else None
    new_db = db is not None and not db.exists()
    try:
        with store_errors(uri):
            mlflow.set_tracking_uri(uri)
            client = mlflow.MlflowClient(uri)
            exp_id = _experiment(client, uri)
    except UserError:
        if new_db:  # a database this call began to create (a full disk mid-migration): not left half-made
            for suffix in ("", "-journal", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    Path(f"{db}{suffix}").unlink()
        raise
    mlflow.set_experiment(experiment_id=exp_id)
    return client, exp_id


def _experiment(client, uri: str) -> str:
    """The id of the experiment named by ``MLFLOW_EXPERIMENT_NAME``, created or restored when needed."""
    from mlflow.exceptions import MlflowException

    name = experiment_name()
    try:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = client.create_experiment(name)
            except MlflowException:  # created concurrently by another step
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        elif exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
            exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
    except MlflowException as e:
        if is_denied(e):
            raise access_denied(e, _ACTION.get() or f"use the experiment {name!r}") from None
        raise UserError(f"MLflow at {display_uri(uri)} refused the request: {_one_line(e)}",
                        hint="check MLFLOW_TRACKING_URI and the credentials (MLFLOW_TRACKING_USERNAME/PASSWORD "
                             "or MLFLOW_TRACKING_TOKEN)") from None
    return exp_id


# ----------------------------------------------------------------------------- refused credentials

#: MLflow's error codes for HTTP 401 and 403 (``mlflow.exceptions.get_error_code``). MLflow's HTTP retries
#: cover only 408/429/5xx and refused connections, so a refusal comes back at once, never after retries.
DENIED = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
#: what the caller is doing (outermost :func:`refusals`), for the message of a refusal anywhere below it
_ACTION: contextvars.ContextVar[str | None] = contextvars.ContextVar("rlhf_mlflow_action", default=None)


def mlflow_user() -> str:
    """Who the MLflow client is: ``MLFLOW_TRACKING_USERNAME``, the user in the URI, a token, or anonymous."""
    uri_user = urllib.parse.urlparse(tracking_uri()).username
    if os.environ.get("MLFLOW_TRACKING_USERNAME") or uri_user:
        return os.environ.get("MLFLOW_TRACKING_USERNAME") or urllib.parse.unquote(uri_user or "")
    return "a bearer token (MLFLOW_TRACKING_TOKEN)" if os.environ.get("MLFLOW_TRACKING_TOKEN") else "anonymous"


def is_denied(e: BaseException) -> bool:
    """Whether ``e`` is MLflow refusing these credentials (401: not signed in, 403: not allowed)."""
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and e.error_code in DENIED


def access_denied(e: BaseException, action: str) -> AccessDenied:
    """The one-line error for a refused request: what was refused, for whom, and how to get access."""
    user = mlflow_user()
    code = getattr(e, "error_code", "")
    if code == "UNAUTHENTICATED":
        why = "no credentials" if user == "anonymous" else "unknown user or wrong password"
        hint = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an MLflow account "
                "(on the cluster: the Secret rlhf-mlflow-pipeline or rlhf-mlflow-serving)")
    else:
        why = "this account may not do that"
        hint = ("read-only accounts cannot register or move aliases: use the pipeline account, or have an MLflow "
                "admin grant the permission (rlhf tracking accounts, docs/deploy.md 'Who can do what')")
    return AccessDenied(f"MLflow at {display_uri()} refused to {action} for user {user!r} "
                        f"(HTTP {DENIED.get(code, '?')} {code}: {why})", hint=hint)


@contextlib.contextmanager
def refusals(action: str) -> Iterator[None]:
    """Turn MLflow's 401/403 inside the block into :class:`rlhf.errors.AccessDenied` (one line, exit 4)."""
    token = _ACTION.set(_ACTION.get() or action)  # the outermost action: what the user asked for
    try:
        yield
    except AccessDenied:
        raise
    except Exception as e:
        if is_denied(e):
            raise access_denied(e, _ACTION.get()) from None
        raise
    finally:
        _ACTION.reset(token)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return redact_value(text[0] if text else type(e).__name__)[:300]


def _run_context_tags(tags: dict[str, str]) -> dict[str, str]:
    """MLflow's own context tags (user, source) merged under ours."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return resolve_tags(tags)
    except Exception:
        return tags


def _bounded_http_retries() -> None:
    """MLflow's own HTTP retries, with this module's bounded defaults where the user set none."""
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _is_tag(value: Any) -> bool:
    from mlflow.entities import RunTag

    return isinstance(value, RunTag)


def _chunks(values: list) -> list[list]:
    """Metric values and tags cut into MLflow's request limits (100 tags, 1000 entries), so that MLflow sends
    each chunk as one request (one future to read its outcome from) and every chunk but the last is full
    (so ``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS``, if a user sets it, cannot merge two of them)."""
    from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    tags = [v for v in values if _is_tag(v)]
    metrics = [v for v in values if not _is_tag(v)]
    out = []
    while tags or metrics:
        t, tags = tags[:MAX_PARAMS_TAGS_PER_BATCH], tags[MAX_PARAMS_TAGS_PER_BATCH:]
        m, metrics = metrics[:MAX_ENTITIES_PER_BATCH - len(t)], metrics[MAX_ENTITIES_PER_BATCH - len(t):]
        out.append(t + m)
    return out


def _request_futures(ops: Any) -> list:
    """The futures behind one ``mlflow.RunOperations``, one per request.

    Read directly because ``RunOperations.wait()`` blocks, and re-raises every failure as one INTERNAL_ERROR,
    which hides whether the store refused the values or could not be reached; the futures tell whether the
    request is over without blocking, and carry the store's own error. (``_operation_futures`` is private to
    MLflow: if a release renames it, tests/test_tracking.py and tests/test_mlflow_server.py fail.)
    """
    return list(ops._operation_futures)


def _refused(error: BaseException) -> bool:
    """Whether the store answered and rejected the values themselves (a bad key or value, a deleted run), or
    refused these credentials (401/403: sending again with the same ones cannot help)."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and (error.error_code == "INVALID_PARAMETER_VALUE" or is_denied(error))


# ----------------------------------------------------------------------------- the tracker


class Tracker:
    """Logs metrics/params/tags/artifacts of one run; a no-op when tracking is off (``Tracker(None)``).

    Metrics and tags go through MLflow's asynchronous logging; what MLflow could not store is kept,
    resent and, at the end, saved locally (see the module docstring), so a tracking outage never stops
    or stalls training.
    """

    def __init__(self, run=None, client=None):
        self.run = run
        self.run_id = run if isinstance(run, str) else (run.info.run_id if run is not None else None)
        self._client = client
        self._held: list = []  # Metric/RunTag values waiting: not handed to MLflow yet, or kept after a failure
        self._in_flight: list[tuple[list, Any]] = []  # (values, RunOperations) of the round being sent
        self._outage_since: float | None = None
        self._next_retry = 0.0
        self._next_round = 0.0  # when the next round may start while MLflow is up (SEND_SECONDS)
        self._send_seconds = send_seconds() if self.run_id is not None else SEND_SECONDS

    @property
    def client(self):
        if self._client is None:
            import mlflow

            _bounded_http_retries()
            self._client = mlflow.MlflowClient(tracking_uri())
        return self._client

    # metrics and tags --------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Finite numbers only (NaN/inf and non-numbers are skipped); returns without waiting for MLflow."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._send([Metric(key=str(k), value=float(v), timestamp=ts, step=int(step or 0))
                    for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import RunTag

        self._send([RunTag(k, _tag_value(k, v)) for k, v in tags.items() if v is not None])

    def _send(self, values: list, *, now: bool = False) -> None:
        """Add ``values`` to those waiting and hand them to MLflow's async queue: one round of requests at a
        time, at most one round every ``SEND_SECONDS`` unless a full request is waiting (``now``: no such wait);
        during an outage one request (the oldest values) every ``RETRY_SECONDS``."""
        from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH

        self._held.extend(values)
        self._settle(wait=False)
        if not self._held or self._in_flight:
            return
        t = time.monotonic()
        if self._outage_since is not None:
            if t < self._next_retry:
                return
        elif not now and t < self._next_round and len(self._held) < MAX_ENTITIES_PER_BATCH:
            return
        self._next_round = t + self._send_seconds
        chunks = _chunks(self._held)
        send = chunks[:1] if self._outage_since is not None else chunks
        self._held = [v for chunk in chunks[len(send):] for v in chunk]
        self._next_retry = time.monotonic() + RETRY_SECONDS
        for chunk in send:
            try:
                ops = self.client.log_batch(self.run_id, metrics=[v for v in chunk if not _is_tag(v)],
                                            tags=[v for v in chunk if _is_tag(v)], synchronous=False)
            except Exception as e:  # not even queued (MLflow's queue failed to start): keep them, as for an outage
                self._held[:0] = self._failed(chunk, e)
                continue
            self._in_flight.append((chunk, ops))

    def _settle(self, wait: bool) -> None:
        """Collect the outcome of the round in flight once it is over (``wait``: wait for it)."""
        if not self._in_flight:
            return
        futures = [f for _, ops in self._in_flight for f in _request_futures(ops)]
        if not wait and not all(f.done() for f in futures):
            return
        kept: list = []
        for values, ops in self._in_flight:
            error = next((e for e in (f.exception() for f in _request_futures(ops)) if e is not None), None)
            if error is not None:
                kept += self._failed(values, error)
        stored = len(kept) < sum(len(v) for v, _ in self._in_flight)
        self._in_flight = []
        self._held[:0] = kept
        if not kept and stored and self._outage_since is not None:
            log.info("MLflow stores metrics again after %.0fs; the kept ones follow",
                     time.monotonic() - self._outage_since)
            self._outage_since = None

    def _failed(self, values: list, error: BaseException) -> list:
        """Values of a failed request: saved at once when the store refused them, else returned to be kept."""
        if _refused(error):  # a bad key or value, a deleted run: sending them again cannot help
            self._save_unsent(values, f"MLflow refused them ({_one_line(error)})")
            return []
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("MLflow did not store metrics (%s); training goes on, metrics are kept and resent every "
                        "%.0fs", _one_line(error), RETRY_SECONDS)
        self._next_retry = time.monotonic() + RETRY_SECONDS
        return values

    @property
    def pending(self) -> int:
        """Metric values and tags not stored yet: being sent, or kept during an outage."""
        if self.run_id is not None:
            self._settle(wait=False)
        return len(self._held) + sum(len(v) for v, _ in self._in_flight)

    def flush(self) -> Path | None:
        """Wait for the values being sent, then send the waiting ones (during an outage only if a retry is
        due); what is still not stored goes to ``mlflow-unsent/<run>.jsonl`` (returned)."""
        if self.run_id is None:
            return None
        self._settle(wait=True)
        while self._held:  # ends when all is stored, or a request failed and the next retry is not due
            self._send([], now=True)
            if not self._in_flight:
                break
            self._settle(wait=True)
        if not self._held:
            return None
        held, self._held = self._held, []
        return self._save_unsent(held, "MLflow stayed unreachable")

    def _save_unsent(self, values: list, why: str) -> Path:
        out = unsent_dir() / f"{self.run_id}.jsonl"
        rows = [{"run_id": self.run_id, "tag": v.key, "value": v.value} if _is_tag(v) else
                {"run_id": self.run_id, "key": v.key, "value": v.value, "timestamp": v.timestamp, "step": v.step}
                for v in values]
        n_tags = sum(map(_is_tag, values))
        size = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            size = out.stat().st_size if out.exists() else 0
            with out.open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))
        except OSError as e:  # e.g. a full disk: no half-written row that a later flush would choke on
            if size is not None:
                with contextlib.suppress(OSError):
                    os.truncate(out, size)
            log.warning("%s, and saving them to %s failed (%s): %d metric value(s) and %d tag(s) of run %s are "
                        "lost", why, out, e.strerror or e, len(values) - n_tags, n_tags, self.run_id)
            return out
        log.warning("%s: %d metric value(s) and %d tag(s) of run %s saved to %s", why, len(values) - n_tags,
                    n_tags, self.run_id, out)
        return out

    # params, artifacts ------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened, redacted params (values cut to MLflow's 6000 characters)."""
        if self.run_id is None:
            return
        from mlflow.entities import Param

        flat = redact(flatten(params))
        items = [Param(k[:250], str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory (reports, validation results). A failure is a warning, not fatal."""
        if self.run_id is None:
            return
        p = Path(path)
        try:
            if p.is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path=artifact_path)
            elif p.exists():
                self.client.log_artifact(self.run_id, str(p), artifact_path=artifact_path)
        except Exception as e:
            log.warning("MLflow: could not upload %s as an artifact (%s); it stays on disk", p, _one_line(e))

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if self.run_id is None:
            return
        try:
            self.client.log_dict(self.run_id, obj, artifact_file)
        except Exception as e:
            log.warning("MLflow: could not upload %s (%s)", artifact_file, _one_line(e))

    def close(self, status: str = "FINISHED") -> None:
        """Flush metrics (:meth:`flush`) and mark the run terminated (a failure here is a warning only)."""
        if self.run_id is None:
            return
        self.flush()
        _wake_async_logging(self.client, self.run_id)
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as e:
            log.warning("MLflow: could not mark run %s as %s (%s)", self.run_id, status, _one_line(e))


def send_seconds() -> float:
    """How often a round of metric requests may start while MLflow is up: ``$RLHF_MLFLOW_SEND_SECONDS``, else
    :data:`SEND_SECONDS`."""
    raw = os.environ.get(ENV_SEND_SECONDS, "").strip()
    if not raw:
        return SEND_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{ENV_SEND_SECONDS}={raw!r} is not a number of seconds >= 0",
                          hint=f"unset it (every {SEND_SECONDS:g} s) or give e.g. 0.5; 0 sends whenever nothing is "
                               "in flight")
    return value


def _wake_async_logging(client, run_id: str) -> None:
    """Let MLflow's async logging thread stop now rather than within a second.

    ``set_terminated`` (and interpreter exit) stop that thread and wait for it, and it polls its queue with a
    1 s timeout: every stage paid up to a second for nothing after its last metric. Stopping it here the way
    its own shutdown does (the stop event), plus an empty batch that wakes it, ends the wait at once; the
    queue state is then what ``set_terminated`` expects. Private to MLflow: on any difference this does
    nothing and the old wait comes back (measured: SFT stage on the tiny profile 1.0 s less per stage).
    """
    try:
        from mlflow.utils.async_logging.run_batch import RunBatch

        queue = client._tracking_client.store._async_logging_queue
        if not queue.is_active():
            return
        queue._stop_data_logging_thread_event.set()
        queue._queue.put(RunBatch(run_id=run_id))
    except Exception as e:  # noqa: BLE001 - an optimisation only
        log.debug("MLflow's async logging queue not woken: %s", e)


def _status_for(exc: BaseException | None) -> str:
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


def _active_fluent_run_id() -> str | None:
    try:
        import mlflow

        run = mlflow.active_run()
        return run.info.run_id if run is not None else None
    except Exception:
        return None


@contextlib.contextmanager
def stage_run(stage: str, config: Any = None, tags: dict[str, Any] | None = None) -> Iterator[Tracker]:
    """An MLflow run for one stage, nested under the pipeline's parent run when there is one.

    The parent is ``RLHF_PARENT_RUN_ID`` (set by :func:`pipeline_run` / :func:`start_pipeline_run`),
    else an active ``mlflow.start_run()`` of the caller. The run ends FINISHED, or FAILED/KILLED when
    the body raises.
    """
    if not enabled():
        yield Tracker(None)
        return
    client, exp_id = connect()
    parent = os.environ.get(ENV_PARENT) or _active_fluent_run_id()
    all_tags = default_tags({"stage": stage, ROLE_TAG: "stage", **(tags or {})})
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    with store_errors(), refusals(f"start a run in the experiment {experiment_name()!r}"):
        run = client.create_run(exp_id, run_name=stage, tags=_run_context_tags(all_tags))
    tracker = Tracker(run, client)
    log.info("MLflow run %s (%s) at %s", run.info.run_id, stage, display_uri())
    exc: BaseException | None = None
    try:
        if config is not None:
            with store_errors(), refusals(f"log params to run {run.info.run_id}"):
                tracker.log_params(config.model_dump(mode="json") if hasattr(config, "model_dump") else config)
        yield tracker
    except BaseException as e:
        exc = e
        raise
    finally:
        tracker.close(_status_for(exc))


# ----------------------------------------------------------------------------- pipeline (parent) runs

_RUN_ID_OK = re.compile(r"^[A-Za-z0-9_.:@/+-]{1,200}$")


def _check_pipeline_run_id(pipeline_run_id: str) -> str:
    if not _RUN_ID_OK.match(pipeline_run_id):
        raise UserError(f"pipeline run id {pipeline_run_id!r} has characters other than letters, digits and "
                        "_.:@/+-", hint="use the KFP run id or a UUID")
    return pipeline_run_id


def find_pipeline_run(client, experiment_id: str, pipeline_run_id: str):
    """The parent run of ``pipeline_run_id`` in the experiment, or None."""
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.pipeline_run_id = '{_check_pipeline_run_id(pipeline_run_id)}' and tags.`{ROLE_TAG}` = 'pipeline'"),
        max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def start_pipeline_run(pipeline_run_id: str | None = None, *, name: str = "rlhf-pipeline", config: Any = None,
                       tags: dict[str, Any] | None = None) -> str | None:
    """Find (retry) or create the parent run of a pipeline run and export it for the stages.

    Sets ``RLHF_PIPELINE_RUN_ID`` (the given id, ``$RLHF_PIPELINE_RUN_ID``, ``$KFP_RUN_ID`` or a new
    UUID), ``RLHF_PARENT_RUN_ID`` and ``RLHF_DATA_HASH`` (when known) in ``os.environ`` so nested
    stage runs in this process and its children attach. Returns the parent run id (None when
    tracking is off). For steps in separate processes (KFP), call it in each step with the same id.
    """
    pipeline_run_id = _check_pipeline_run_id(pipeline_run_id or os.environ.get(ENV_PIPELINE)
                                             or os.environ.get("KFP_RUN_ID") or uuid.uuid4().hex)
    os.environ[ENV_PIPELINE] = pipeline_run_id
    dh = data_hash()
    if dh:
        os.environ[ENV_DATA_HASH] = dh
    if not enabled():
        return None
    client, exp_id = connect()
    with store_errors(), refusals(f"start the pipeline run in the experiment {experiment_name()!r}"):
        run = _find_or_create_pipeline_run(client, exp_id, pipeline_run_id, name, config, tags)
    os.environ[ENV_PARENT] = run.info.run_id
    return run.info.run_id


def _find_or_create_pipeline_run(client, exp_id: str, pipeline_run_id: str, name: str, config: Any,
                                 tags: dict[str, Any] | None):
    run = find_pipeline_run(client, exp_id, pipeline_run_id)
    if run is None:
        all_tags = default_tags({ROLE_TAG: "pipeline", "pipeline_run_id": pipeline_run_id, **(tags or {})})
        run = client.create_run(exp_id, run_name=name, tags=_run_context_tags(all_tags))
        log.info("MLflow pipeline run %s (pipeline run id %s) at %s", run.info.run_id, pipeline_run_id,
                 display_uri())
        if config is not None:
            Tracker(run, client).log_params(config.model_dump(mode="json") if hasattr(config, "model_dump")
                                            else config)
    else:
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        log.info("MLflow pipeline run %s reused for retried pipeline run %s", run.info.run_id, pipeline_run_id)
    return run


def end_pipeline_run(status: str = "FINISHED", run_id: str | None = None) -> None:
    """Mark the parent run terminated (``FINISHED``/``FAILED``/``KILLED``)."""
    run_id = run_id or os.environ.get(ENV_PARENT)
    if enabled() and run_id:
        Tracker(run_id).close(status)


@contextlib.contextmanager
def pipeline_run(pipeline_run_id: str | None = None, *, name: str = "rlhf-pipeline", config: Any = None,
                 tags: dict[str, Any] | None = None) -> Iterator[Tracker]:
    """The parent run of one pipeline run; stage runs started inside are nested under it.

    ``with tracking.pipeline_run(kfp_run_id): train_sft(...); ...`` -- the environment variables of
    :func:`start_pipeline_run` are set inside the block (and child processes inherit them) and
    restored after it; the parent ends FINISHED, or FAILED when the block raises.
    """
    keys = (ENV_PARENT, ENV_PIPELINE, ENV_DATA_HASH)
    saved = {k: os.environ.get(k) for k in keys}
    exc: BaseException | None = None
    try:
        run_id = start_pipeline_run(pipeline_run_id, name=name, config=config, tags=tags)
        tracker = Tracker(run_id)
        try:
            yield tracker
        except BaseException as e:
            exc = e
            raise
        finally:
            tracker.close(_status_for(exc))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v



def resend_unsent(directory: str | Path | None = None) -> dict[str, int]:
    """Send what earlier stages saved to ``mlflow-unsent/`` (``rlhf tracking flush``); each value once.

    A file is removed as soon as all its rows are stored; a file whose run no longer exists, or that
    the server refuses, stays (with the reason logged), as does everything when the server is down.
    Returns counts of sent rows, sent files and files kept.
    """
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    out = {"rows": 0, "files": 0, "kept": 0}
    directory = Path(directory) if directory is not None else unsent_dir()
    files = sorted(directory.glob("*.jsonl")) if directory.is_dir() else []
    if not files:
        return out
    client, _ = connect()
    for f in files:
        by_run: dict[str, list] = {}
        rows, n = [], 0
        try:
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                r = json.loads(line)
                v = RunTag(r["tag"], str(r["value"])) if "tag" in r else \
                    Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r.get("step") or 0))
                by_run.setdefault(r["run_id"], []).append(v)
                rows.append(r)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s kept: line %d is not a saved value (%s); nothing of it was sent", f, n,
                        _one_line(e))
            out["kept"] += 1
            continue
        try:
            for run_id, values in by_run.items():
                for chunk in _chunks(values):
                    client.log_batch(run_id, metrics=[v for v in chunk if not _is_tag(v)],
                                     tags=[v for v in chunk if _is_tag(v)], synchronous=True)
        except MlflowException as e:
            log.warning("%s kept: %s", f, _one_line(e))
            out["kept"] += 1
            continue
        # sent: remove it at once, so a second flush cannot send the same values again
        f.unlink()
        out["rows"] += len(rows)
        out["files"] += 1
    return out

__all__ = ["enabled", "tracking_uri", "experiment_name", "connect", "check_reachable", "stage_run", "pipeline_run",
           "start_pipeline_run", "end_pipeline_run", "find_pipeline_run", "Tracker", "redact", "redact_value",
           "is_secret_key", "flatten", "config_params", "default_tags", "git_commit", "data_hash", "resend_unsent"]
