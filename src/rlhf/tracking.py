"""Experiment tracking: the one module that talks to MLflow.

Stages call :func:`stage_run` and log through the :class:`Tracker` it yields;
nothing else in the package imports mlflow for tracking.

* Tracking URI: ``MLFLOW_TRACKING_URI``, default a SQLite file ``mlflow.db`` in
  the current directory (browse it with
  ``mlflow ui --backend-store-uri sqlite:///mlflow.db``).
* ``RLHF_TRACKING=off`` turns MLflow off (metrics still go to the progress log).
* A stage run is nested under ``RLHF_PARENT_RUN_ID`` when that is set (the
  pipeline's parent run); tags carry git commit, DVC data hash, KFP run id,
  profile and host.
* Params are the resolved stage config, flattened; keys that look like
  secrets are redacted.
* MLflow unreachable: we fail fast at start-up with one clear line, never
  mid-way through training.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf.errors import UserError

log = logging.getLogger("rlhf")

SECRET_KEY = re.compile(r"(secret|password|passwd|token|api[_-]?key|credential|access[_-]?key)", re.I)
REDACTED = "***"


def enabled() -> bool:
    return os.environ.get("RLHF_TRACKING", "on").lower() not in ("off", "0", "false", "no")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlhf")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Replace values of secret-looking keys (and URIs with credentials) by '***'."""
    out = {}
    for k, v in params.items():
        if SECRET_KEY.search(k):
            out[k] = REDACTED
        elif isinstance(v, str) and re.search(r"://[^/\s:@]+:[^/\s@]+@", v):
            out[k] = re.sub(r"://[^/\s:@]+:[^/\s@]+@", f"://{REDACTED}@", v)
        else:
            out[k] = v
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def default_tags(extra: dict[str, Any] | None = None) -> dict[str, str]:
    tags = {
        "git_commit": os.environ.get("RLHF_GIT_COMMIT") or git_commit(),
        "data_hash": os.environ.get("RLHF_DATA_HASH"),
        "kfp_run_id": os.environ.get("KFP_RUN_ID"),
        "profile": os.environ.get("RLHF_PROFILE"),
        "host": socket.gethostname(),
    }
    tags.update(extra or {})
    return {k: str(v) for k, v in tags.items() if v is not None}


class Tracker:
    """Logs metrics/params/artifacts of one stage run; a no-op when tracking is off."""

    def __init__(self, run=None):
        self.run = run
        self.run_id = run.info.run_id if run is not None else None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is None:
            return
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.run is None:
            return
        import mlflow

        flat = redact(flatten(params))
        mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.run is None:
            return
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run is None:
            return
        import mlflow

        p = Path(path)
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=artifact_path)
        elif p.exists():
            mlflow.log_artifact(str(p), artifact_path=artifact_path)


def check_reachable(uri: str) -> None:
    """Fail fast with one line if an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"MLflow tracking server {uri} is unreachable ({getattr(e, 'reason', e)})",
                        hint="start it, fix MLFLOW_TRACKING_URI, or set RLHF_TRACKING=off") from None


@contextlib.contextmanager
def stage_run(stage: str, config: Any = None, tags: dict[str, Any] | None = None) -> Iterator[Tracker]:
    """An MLflow run for one stage (nested under the pipeline's parent run when there is one)."""
    if not enabled():
        yield Tracker(None)
        return
    import mlflow

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_name())
    parent = os.environ.get("RLHF_PARENT_RUN_ID")
    all_tags = default_tags({"stage": stage, **(tags or {})})
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        tracker = Tracker(run)
        if config is not None:
            tracker.log_params(config.model_dump(mode="json") if hasattr(config, "model_dump") else config)
        log.info("MLflow run %s (%s) at %s", run.info.run_id, stage, uri)
        yield tracker
