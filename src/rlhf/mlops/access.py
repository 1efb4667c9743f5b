"""Who can do what on the MLflow server: the accounts and their permissions (``rlhf tracking accounts``).

The MLflow server runs MLflow's own ``basic-auth`` app (``mlflow server --app-name basic-auth``;
docs/deploy.md, "Who can do what"). Its admin creates, as this module does, from a small YAML file:

* the experiments and registered models the pipeline uses (created by the admin if missing, so that
  no other account can create one of these names first and own it);
* one MLflow user per account, with the password from an environment variable (on the cluster a
  ``secretKeyRef``); a user that exists gets that password again (a rotation is: change the
  Secret, run the Job again) and loses any admin flag;
* per account, the permissions of its role on those experiments and models:

  ========== ============ ================= ==================================================
  role       experiments  registered models what for
  ========== ============ ================= ==================================================
  pipeline   EDIT         MANAGE            runs, model versions, aliases (promotion, rollback)
  serving    READ         READ              ``models:/<name>@champion``: metadata and weights
  ========== ============ ================= ==================================================

Everything else gets the server's ``default_permission``, NO_PERMISSIONS in our auth config: an
account with no grant on a resource can neither read nor change it, and a client without
credentials gets 401 on every API call (``/health`` stays open for the probes).

Idempotent: a second run changes nothing (a grant that differs from its role's is replaced). It
talks to the server only through MLflow's REST API (:class:`mlflow.server.auth.client.AuthServiceClient`,
:class:`mlflow.MlflowClient`) with the admin's credentials in ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``. The Job ``mlflow-accounts`` (k8s/base/mlflow-accounts.yaml) and the
tests run this same function.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf.errors import ConfigError, UserError
from rlhf.mlops import tracking

log = logging.getLogger("rlhf")

#: the Secret whose MLflow credentials every pipeline pod gets as environment (KFP steps, Trainer jobs), and its
#: keys: the names the MLflow client reads
PIPELINE_SECRET = "rlhf-mlflow-pipeline"
CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
#: MLflow's basic-auth refuses shorter passwords
MIN_PASSWORD = 12
#: the permissions of each role: (on the experiments, on the registered models)
ROLES: dict[str, tuple[str, str]] = {"pipeline": ("EDIT", "MANAGE"), "serving": ("READ", "READ")}


class Account(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
    password_env: str = Field(min_length=1, description="environment variable holding the password (a Secret)")
    role: Literal["pipeline", "serving"]


class AccessConfig(BaseModel):
    """The file ``rlhf tracking accounts --config`` reads (k8s: the ConfigMap ``mlflow-accounts``)."""

    model_config = ConfigDict(extra="forbid")

    experiments: list[str] = Field(default_factory=lambda: ["rlhf"])
    registered_models: list[str] = Field(default_factory=lambda: ["rlhf-policy", "rlhf-reward-model"])
    accounts: list[Account] = Field(min_length=1)


def load_config(path: str | Path) -> AccessConfig:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the accounts file: {e.strerror}", where=str(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {str(e).splitlines()[0]}", where=str(path)) from None
    try:
        return AccessConfig.model_validate(data or {})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise ConfigError(f"{loc}: {err['msg']}", where=str(path)) from None


def _code(e: BaseException) -> str:
    return getattr(e, "error_code", "")


def _signs_in(uri: str, username: str, password: str) -> bool:
    """Whether the server accepts ``username`` with ``password`` (GET the current user as them)."""
    from mlflow.server.auth.routes import GET_CURRENT_USER
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    resp = http_request(MlflowHostCreds(uri, username=username, password=password), GET_CURRENT_USER, "GET",
                        max_retries=0)
    return resp.status_code == 200


def _ensure_user(auth, uri: str, username: str, password: str) -> str | None:
    """Create the user, or set its password if it changed; never an admin. Returns what was done, if anything."""
    from mlflow.exceptions import MlflowException

    try:
        user = auth.get_user(username)
    except MlflowException as e:
        if _code(e) != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(username, password)
        return "created"
    done = []
    if not _signs_in(uri, username, password):
        done.append("new password")
    # always: with auth_cache_ttl_seconds a worker may still vouch for a password that is no longer stored
    auth.update_user_password(username, password)
    if user.is_admin:
        auth.update_user_admin(username, False)
        done.append("admin flag removed")
    return ", ".join(done) or None


def _ensure_grant(auth, username: str, resource_type: str, resource_id: str, permission: str) -> bool:
    """Give ``username`` exactly ``permission`` on the resource; True when something changed."""
    from mlflow.exceptions import MlflowException

    if auth.get_user_permission(username, resource_type, resource_id).permission == permission:
        return False
    try:
        auth.grant_user_permission(username, resource_type, resource_id, permission)
    except MlflowException as e:  # a grant with another permission exists: replace it
        if _code(e) != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, resource_type, resource_id)
        auth.grant_user_permission(username, resource_type, resource_id, permission)
    return True


def _ensure_experiment(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException as e:
            if _code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags={"managed_by": "rlhf"})
    except MlflowException as e:
        if _code(e) != "RESOURCE_ALREADY_EXISTS":
            raise


def wait_for_server(uri: str, seconds: float) -> None:
    """Wait up to ``seconds`` for the server's /health (a Job may start before the server)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            tracking.check_reachable(uri)
            return
        except UserError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(3)


def apply_accounts(cfg: AccessConfig, tracking_uri: str | None = None) -> list[str]:
    """Make the server's users and grants match ``cfg`` (idempotent); returns one line per change made.

    Runs as the admin: ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``. Passwords come from
    each account's ``password_env``; a missing or empty one stops before anything is changed.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # mlflow.server imports starlette's deprecated WSGI middleware
        warnings.simplefilter("ignore")
        from mlflow.server.auth.client import AuthServiceClient

    uri = tracking_uri or tracking.tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise UserError(f"MLflow accounts live on a tracking server, not in {tracking.display_uri(uri)}",
                        hint="set MLFLOW_TRACKING_URI to the server (http://...)")
    admin = os.environ.get("MLFLOW_TRACKING_USERNAME")
    passwords = {}
    for a in cfg.accounts:
        passwords[a.username] = os.environ.get(a.password_env, "")
        if len(passwords[a.username]) < MIN_PASSWORD:
            raise UserError(f"no usable password for the MLflow account {a.username!r}: ${a.password_env} is "
                            f"{'unset or empty' if not passwords[a.username] else 'too short'}",
                            hint=f"set it from the account's Secret (key MLFLOW_TRACKING_PASSWORD), at least "
                                 f"{MIN_PASSWORD} characters")
        if a.username == admin:
            raise UserError(f"account {a.username!r} is the admin running this command",
                            hint="give the pipeline and serving accounts their own names")
    tracking.check_reachable(uri)
    tracking._bounded_http_retries()
    auth, client = AuthServiceClient(uri), mlflow.MlflowClient(uri)
    changes: list[str] = []
    try:
        _apply(cfg, uri, auth, client, passwords, changes)
    except MlflowException as e:
        if tracking.is_denied(e):
            raise tracking.access_denied(e, "manage users and permissions (an admin's job)") from None
        raise UserError(f"MLflow at {tracking.display_uri(uri)} refused a change: {tracking._one_line(e)}",
                        hint=f"done before: {'; '.join(changes) or 'nothing'}") from None
    for line in changes:
        log.info("mlflow accounts: %s", line)
    return changes


def _apply(cfg: AccessConfig, uri: str, auth, client, passwords: dict[str, str], changes: list[str]) -> None:
    experiment_ids = {name: _ensure_experiment(client, name) for name in cfg.experiments}
    for name in cfg.registered_models:
        _ensure_registered_model(client, name)
    for a in cfg.accounts:
        done = _ensure_user(auth, uri, a.username, passwords[a.username])
        if done:
            changes.append(f"user {a.username}: {done}")
        on_experiments, on_models = ROLES[a.role]
        targets = [("experiment", exp_id, f"experiment {name}", on_experiments)
                   for name, exp_id in experiment_ids.items()]
        targets += [("registered_model", name, f"registered model {name}", on_models)
                    for name in cfg.registered_models]
        for resource_type, resource_id, what, permission in targets:
            if _ensure_grant(auth, a.username, resource_type, resource_id, permission):
                changes.append(f"user {a.username}: {permission} on {what}")
