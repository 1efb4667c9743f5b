"""Backup and restore of MLflow's two stores: the backend database and the artifact store.

A backup is one directory, written atomically (:func:`rlhf.io.atomic_dir`: it appears complete or
not at all)::

    <dir>/manifest.json         what, when, from where (credentials masked), versions, counts,
                                and the sha256 and size of every other file
    <dir>/backend/mlflow.pgdump PostgreSQL: `pg_dump --format=custom`
    <dir>/backend/mlflow.db     SQLite: a consistent copy made with SQLite's online backup API
    <dir>/artifacts/...         every object under the artifact root (S3/MinIO prefix or directory)

The database is dumped first and the artifacts copied second, so every artifact the dump refers to
was already in the store when it was copied (a run that ends in between leaves extra artifacts, never
missing ones).

:func:`restore` checks every hash of the manifest before it writes anything, refuses a target that
already holds MLflow data unless ``force`` (the main path is a new or wiped database and an empty
bucket/directory), restores the database (`pg_restore --clean --if-exists --single-transaction`, or
the SQLite backup API), uploads the artifacts, and then compares the restored store's counts (runs,
experiments, registered models, versions) with the manifest's.

PostgreSQL credentials go to pg_dump/pg_restore/psql through libpq's environment (``PGPASSWORD``;
a password in the URI is moved there), never on a command line or in a message. Connections give up
after ``PGCONNECT_TIMEOUT`` seconds (10 unless set). The client tools are found in ``pg_bin`` /
``$RLHF_PG_BIN``, else on ``PATH``, else in ``/usr/lib/postgresql/<newest>/bin``; pg_dump must be of
the server's major version or newer. S3: boto3 with ``MLFLOW_S3_ENDPOINT_URL`` (MinIO) and the
usual ``AWS_*`` variables, as MLflow itself uses them.
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from rlhf.errors import UserError
from rlhf.io import MANIFEST, atomic_dir, sha256_file, write_json
from rlhf.redact import redact_value

KIND = "mlflow-backup"
FORMAT = 1
PG_DUMP_FILE = "backend/mlflow.pgdump"
SQLITE_FILE = "backend/mlflow.db"
ARTIFACTS = "artifacts"
CONNECT_TIMEOUT_S = 10
ENV_PG_BIN = "RLHF_PG_BIN"
ENV_BACKEND = "MLFLOW_BACKEND_STORE_URI"  # the names `mlflow server` reads too
ENV_ARTIFACTS = "MLFLOW_ARTIFACTS_DESTINATION"
#: the tables whose row counts a backup records and a restore must reproduce
COUNTED = ("experiments", "runs", "registered_models", "model_versions")
#: libpq connection parameters a backend URI's query may carry, and the variable each goes to
_PG_QUERY_ENV = {"sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT",
                 "sslkey": "PGSSLKEY", "connect_timeout": "PGCONNECT_TIMEOUT", "options": "PGOPTIONS",
                 "application_name": "PGAPPNAME", "target_session_attrs": "PGTARGETSESSIONATTRS",
                 "passfile": "PGPASSFILE", "host": "PGHOST", "port": "PGPORT", "user": "PGUSER"}


# ----------------------------------------------------------------------------- where the stores are


@dataclass
class Backend:
    kind: str  # "postgresql" | "sqlite"
    uri: str
    path: Path | None = None  # sqlite
    env: dict[str, str] = field(default_factory=dict)  # postgresql: PG* variables (password included)

    @property
    def display(self) -> str:
        return redact_value(self.uri)

    @property
    def where(self) -> str:
        if self.kind == "sqlite":
            return str(self.path)
        host = self.env.get("PGHOST") or os.environ.get("PGHOST") or "local socket"
        port = self.env.get("PGPORT") or os.environ.get("PGPORT") or "5432"
        return f"{host}:{port}"


@dataclass
class Artifacts:
    kind: str  # "s3" | "local"
    uri: str
    bucket: str = ""
    prefix: str = ""  # no leading or trailing slash
    path: Path | None = None  # local
    default: bool = False  # ./mlruns, not given by the user


def parse_backend(uri: str, where: str = "--backend-uri") -> Backend:
    """A MLflow backend store URI (``postgresql[+driver]://`` or ``sqlite:///``) -> :class:`Backend`."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme == "sqlite":
        rest = uri.split("://", 1)[1]
        if not rest.startswith("/") or rest in ("/", "/:memory:"):
            raise UserError(f"backend store {uri} is not a SQLite file", where=where,
                            hint="use sqlite:////absolute/path/mlflow.db or sqlite:///relative.db")
        return Backend("sqlite", uri, path=Path(rest[1:]).expanduser().absolute())
    if scheme in ("postgresql", "postgres"):
        parts = urllib.parse.urlsplit(uri)
        env = {"PGCONNECT_TIMEOUT": os.environ.get("PGCONNECT_TIMEOUT", str(CONNECT_TIMEOUT_S)),
               "PGAPPNAME": "rlhf-backup"}
        try:
            port = parts.port
        except ValueError:
            raise UserError(f"backend store {redact_value(uri)} has a bad port", where=where) from None
        if parts.hostname:
            env["PGHOST"] = parts.hostname
        if port:
            env["PGPORT"] = str(port)
        if parts.username:
            env["PGUSER"] = urllib.parse.unquote(parts.username)
        if parts.password is not None:
            env["PGPASSWORD"] = urllib.parse.unquote(parts.password)
        db = urllib.parse.unquote(parts.path.lstrip("/"))
        if not db:
            raise UserError(f"backend store {redact_value(uri)} names no database", where=where,
                            hint="postgresql://USER@HOST:PORT/DATABASE, the password in PGPASSWORD")
        env["PGDATABASE"] = db
        for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
            if key not in _PG_QUERY_ENV:
                raise UserError(f"backend store URI parameter '{key}' is not supported here",
                                where=where, hint="supported: " + ", ".join(sorted(_PG_QUERY_ENV)))
            env[_PG_QUERY_ENV[key]] = values[-1]
        return Backend("postgresql", uri, env=env)
    raise UserError(f"cannot back up the backend store {redact_value(uri)}", where=where,
                    hint="give the database MLflow uses, postgresql://USER@HOST:PORT/DB or sqlite:///FILE, with "
                         "--backend-uri or $MLFLOW_BACKEND_STORE_URI; a tracking server's URL is not a store")


def parse_artifacts(uri: str) -> Artifacts:
    """An artifact root (``s3://bucket/prefix``, ``file:///dir`` or a directory) -> :class:`Artifacts`."""
    if uri.startswith("s3://"):
        parts = urllib.parse.urlsplit(uri)
        if not parts.netloc:
            raise UserError(f"artifact store {uri} names no bucket", where="--artifacts-uri")
        return Artifacts("s3", uri, bucket=parts.netloc, prefix=parts.path.strip("/"))
    if uri.startswith("file://"):
        return Artifacts("local", uri, path=Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path)))
    if "://" in uri or uri.startswith("mlflow-artifacts:"):
        raise UserError(f"cannot back up the artifact store {uri}", where="--artifacts-uri",
                        hint="give where the server keeps artifacts: s3://BUCKET[/PREFIX] or a directory")
    return Artifacts("local", uri, path=Path(uri).expanduser().absolute())


def resolve_stores(backend_uri: str | None, artifacts_uri: str | None) -> tuple[Backend, Artifacts]:
    """The stores to use: the arguments, else ``$MLFLOW_BACKEND_STORE_URI`` / ``$MLFLOW_ARTIFACTS_DESTINATION``,
    else a database ``$MLFLOW_TRACKING_URI``, else what ``rlhf run`` uses (``./mlflow.db`` and ``./mlruns``)."""
    from rlhf.mlops import tracking

    if backend_uri:
        uri, where = backend_uri, "--backend-uri"
    elif os.environ.get(ENV_BACKEND):
        uri, where = os.environ[ENV_BACKEND], f"${ENV_BACKEND}"
    else:
        uri, where = tracking.tracking_uri(), "$MLFLOW_TRACKING_URI"
    backend = parse_backend(uri, where)
    art = artifacts_uri or os.environ.get(ENV_ARTIFACTS)
    if not art:
        if backend.kind != "sqlite":
            raise UserError("no artifact store given", where="--artifacts-uri",
                            hint=f"give the server's artifact root, e.g. s3://mlflow, or set ${ENV_ARTIFACTS}")
        return backend, Artifacts("local", "./mlruns", path=Path("mlruns").absolute(), default=True)
    return backend, parse_artifacts(art)


# ----------------------------------------------------------------------------- PostgreSQL


def _pg_tool(name: str, pg_bin: str | Path | None) -> str:
    where = pg_bin or os.environ.get(ENV_PG_BIN)
    if where:
        candidates = [Path(where) / name]
    else:
        on_path = shutil.which(name)
        candidates = [Path(on_path)] if on_path else []
        candidates += [Path(p) for p in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                                              key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit()
                                              else 0, reverse=True)]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise UserError(f"{name} not found" + (f" in {where}" if where else " on PATH or in /usr/lib/postgresql/*/bin"),
                    hint="install the PostgreSQL client tools (the server's major version or newer), or point "
                         f"--pg-bin / ${ENV_PG_BIN} at their bin directory")


def _pg_failure(tool: str, backend: Backend, stderr: str) -> UserError:
    text = redact_value(stderr or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()), lines[-1] if lines else "")
    low = text.lower()
    user = backend.env.get("PGUSER") or os.environ.get("PGUSER") or "(default user)"
    if "password authentication failed" in low or "no password supplied" in low or \
            "password must be" in low or "authentication failed" in low:
        return UserError(f"{tool}: PostgreSQL at {backend.where} rejected the password of user {user}",
                         hint="check PGPASSWORD (the Secret rlhf-postgres on the cluster) or the backend URI")
    if any(s in low for s in ("could not connect", "connection refused", "timeout expired",
                              "could not translate host name", "no route to host", "connection timed out")):
        return UserError(f"{tool}: cannot reach PostgreSQL at {backend.where} "
                         f"(connect timeout {backend.env.get('PGCONNECT_TIMEOUT', CONNECT_TIMEOUT_S)} s)",
                         hint="is the server up, and are host and port right?")
    if "does not exist" in low and "database" in low:
        return UserError(f"{tool}: database {backend.env.get('PGDATABASE')} does not exist at {backend.where}",
                         hint="create it first (createdb), then restore into it")
    if "server version mismatch" in low:
        return UserError(f"{tool}: {detail}", hint="use pg_dump of the server's major version or newer (--pg-bin)")
    return UserError(f"{tool} failed against {backend.where}: {detail}")


def _pg_run(tool: str, args: list[str], backend: Backend, *, pg_bin, timeout: float) -> str:
    exe = _pg_tool(tool, pg_bin)
    env = {**os.environ, **backend.env}
    try:
        p = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"{tool} against {backend.where} did not finish within {timeout:.0f} s",
                        hint="raise --timeout, or check the server's load and locks") from None
    if p.returncode != 0:
        raise _pg_failure(tool, backend, p.stderr)
    return p.stdout


def _pg_rows(backend: Backend, sql: str, *, pg_bin, timeout: float = 120) -> list[list[str]]:
    out = _pg_run("psql", ["-X", "-w", "-q", "-A", "-t", "-F", "\x1f", "-v", "ON_ERROR_STOP=1", "-c", sql],
                  backend, pg_bin=pg_bin, timeout=timeout)
    return [ln.split("\x1f") for ln in out.splitlines() if ln]


# ----------------------------------------------------------------------------- what a store holds


def _query(backend: Backend, sql: str, *, pg_bin=None) -> list[list[str]]:
    if backend.kind == "postgresql":
        return _pg_rows(backend, sql, pg_bin=pg_bin)
    if not backend.path.exists():
        return []
    con = sqlite3.connect(f"file:{backend.path}?mode=ro", uri=True, timeout=CONNECT_TIMEOUT_S)
    try:
        return [[str(v) for v in row] for row in con.execute(sql).fetchall()]
    except sqlite3.DatabaseError as e:
        raise UserError(f"cannot read the SQLite store {backend.path}: {e}") from None
    finally:
        con.close()


def store_summary(backend: Backend, *, pg_bin=None) -> dict[str, Any]:
    """Tables, MLflow schema revision (alembic) and row counts of the MLflow tables of a store."""
    if backend.kind == "postgresql":
        tables_sql = "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    else:
        tables_sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    tables = sorted(r[0] for r in _query(backend, tables_sql, pg_bin=pg_bin))
    summary: dict[str, Any] = {"tables": len(tables), "schema_revision": None}
    if "alembic_version" in tables:
        rows = _query(backend, "SELECT version_num FROM alembic_version", pg_bin=pg_bin)
        summary["schema_revision"] = rows[0][0] if rows else None
    counted = [t for t in COUNTED if t in tables]
    if counted:
        row = _query(backend, "SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in counted), pg_bin=pg_bin)[0]
        summary.update({t: int(n) for t, n in zip(counted, row)})
    return summary


def _holds_data(summary: dict[str, Any]) -> str | None:
    """Why a store counts as in use (None: new, wiped, or an MLflow schema without runs or models; the
    experiments a client creates when it connects, e.g. `rlhf models list`, hold nothing to lose)."""
    if summary["tables"] and summary["schema_revision"] is None:
        return f"{summary['tables']} table(s) that are not an MLflow schema"
    found = [f"{summary[k]} {k.replace('_', ' ')}" for k in ("runs", "registered_models", "model_versions")
             if summary.get(k)]
    return ", ".join(found) or None


# ----------------------------------------------------------------------------- artifacts


def _s3_client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise UserError("an s3:// artifact store needs boto3", hint="pip install boto3") from None
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "Found credentials in ..." on every run
    return boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None,
                        config=Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=60,
                                      retries={"max_attempts": 3, "mode": "standard"}))


def _s3_failure(e: Exception, art: Artifacts) -> UserError:
    from botocore import exceptions as be

    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or "AWS S3"
    if isinstance(e, be.NoCredentialsError):
        return UserError(f"no S3 credentials for {art.uri}",
                         hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (on the cluster: the Secret rlhf-s3-mlflow)")
    if isinstance(e, (be.EndpointConnectionError, be.ConnectTimeoutError, be.ReadTimeoutError)):
        return UserError(f"cannot reach the S3 endpoint {endpoint} for {art.uri}",
                         hint="is MinIO up, and is MLFLOW_S3_ENDPOINT_URL right?")
    if isinstance(e, be.ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            return UserError(f"bucket {art.bucket} does not exist at {endpoint}",
                             hint="create it first (the minio-buckets Job does on the cluster)")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return UserError(f"{endpoint} refused access to {art.uri} ({code})",
                             hint="check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy")
        return UserError(f"S3 error on {art.uri}: {code or e}")
    return UserError(f"S3 error on {art.uri}: {redact_value(str(e)).splitlines()[0]}")


def _safe_rel(rel: str) -> str:
    p = PurePosixPath(rel)
    if rel.startswith("/") or any(part in ("..", ".", "") for part in p.parts) or not p.parts:
        raise UserError(f"refusing the artifact path {rel!r}: it would leave the artifact directory")
    return p.as_posix()


def _s3_keys(client, art: Artifacts):
    prefix = f"{art.prefix}/" if art.prefix else ""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=art.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if rel and not rel.endswith("/"):  # folder markers carry no data
                yield obj["Key"], _safe_rel(rel)


def _copy_artifacts_out(art: Artifacts, dest: Path) -> None:
    dest.mkdir(parents=True)
    if art.kind == "local":
        if not art.path.is_dir():
            if art.default and not art.path.exists():
                return  # a SQLite store whose runs logged no artifacts yet
            raise UserError(f"artifact directory {art.path} does not exist", where="--artifacts-uri",
                            hint="give the directory MLflow writes artifacts to; rlhf run uses ./mlruns")
        for src in sorted(art.path.rglob("*")):
            if src.is_file() and not src.is_symlink():
                target = dest / src.relative_to(art.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
        return
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_client()
    try:
        client.head_bucket(Bucket=art.bucket)
        for key, rel in _s3_keys(client, art):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(art.bucket, key, str(target))
    except (BotoCoreError, ClientError, Boto3Error) as e:  # Boto3Error: S3Upload/TransferFailed
        raise _s3_failure(e, art) from None


def _artifacts_in_use(art: Artifacts) -> str | None:
    if art.kind == "local":
        if art.path.exists() and not art.path.is_dir():
            raise UserError(f"artifact store {art.path} is a file, not a directory", where="--artifacts-uri")
        n = sum(1 for p in art.path.rglob("*") if p.is_file()) if art.path.is_dir() else 0
        return f"{n} file(s) in {art.path}" if n else None
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_client()
    try:
        client.head_bucket(Bucket=art.bucket)
        page = client.list_objects_v2(Bucket=art.bucket, Prefix=f"{art.prefix}/" if art.prefix else "", MaxKeys=1)
    except (BotoCoreError, ClientError, Boto3Error) as e:  # Boto3Error: S3Upload/TransferFailed
        raise _s3_failure(e, art) from None
    return f"objects under {art.uri}" if page.get("KeyCount") else None


def _copy_artifacts_in(src: Path, files: list[str], art: Artifacts) -> None:
    if art.kind == "local":
        for rel in files:
            target = art.path / _safe_rel(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, target)
        return
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_client()
    try:
        for rel in files:
            key = f"{art.prefix}/{_safe_rel(rel)}" if art.prefix else _safe_rel(rel)
            client.upload_file(str(src / rel), art.bucket, key)
    except (BotoCoreError, ClientError, Boto3Error) as e:  # Boto3Error: S3Upload/TransferFailed
        raise _s3_failure(e, art) from None


# ----------------------------------------------------------------------------- backup


def _mlflow_version() -> str | None:
    from importlib import metadata

    for dist in ("mlflow", "mlflow-skinny"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _check_dest(out: Path, art: Artifacts) -> None:
    out = out.absolute()
    if art.kind == "local" and (out == art.path or art.path in out.parents):
        raise UserError(f"the backup would be written inside the artifact store {art.path}", where=f"--out {out}",
                        hint="write backups elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError("already exists and is not an empty directory; a backup never replaces anything",
                        where=f"--out {out}", hint="choose a new directory, or use --into DIR for a dated one")
    parent = next((p for p in (out, *out.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write here: {parent} is not a writable directory", where=f"--out {out}",
                        hint="choose a directory you can write to (on the cluster: the backup volume)")


def backup(dest: str | Path, backend_uri: str | None = None, artifact_uri: str | None = None, *,
           pg_bin: str | Path | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Back up the backend store and the artifact store into the new directory ``dest``; returns the manifest."""
    backend, art = resolve_stores(backend_uri, artifact_uri)
    dest = Path(dest)
    _check_dest(dest, art)
    if backend.kind == "postgresql":
        for tool in ("pg_dump", "psql"):
            _pg_tool(tool, pg_bin)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        with atomic_dir(dest) as tmp:
            (tmp / "backend").mkdir()
            if backend.kind == "postgresql":
                summary = _pg_dump(backend, tmp / PG_DUMP_FILE, pg_bin=pg_bin, timeout=timeout)
                db_file = PG_DUMP_FILE
            else:
                if not backend.path.is_file():
                    raise UserError(f"SQLite store {backend.path} does not exist", where="--backend-uri",
                                    hint="give the mlflow.db MLflow uses")
                summary = _sqlite_copy(backend.path, tmp / SQLITE_FILE)
                db_file = SQLITE_FILE
            if summary["schema_revision"] is None:
                raise UserError(f"{backend.display} holds no MLflow schema (no alembic_version table)",
                                where="--backend-uri", hint="point at the database MLflow uses")
            _copy_artifacts_out(art, tmp / ARTIFACTS)
            files = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            from rlhf import __version__

            manifest = {
                "kind": KIND, "format": FORMAT, "created": created, "rlhf_version": __version__,
                "mlflow_version": _mlflow_version(),
                "backend": {"type": backend.kind, "uri": backend.display, "file": db_file, **summary},
                "artifacts": {"type": art.kind, "uri": redact_value(art.uri), "dir": ARTIFACTS,
                              "files": sum(1 for k in files if k.startswith(ARTIFACTS + "/")),
                              "bytes": sum(v["bytes"] for k, v in files.items() if k.startswith(ARTIFACTS + "/"))},
                "files": files,
            }
            write_json(tmp / MANIFEST, manifest)
    except OSError as e:
        raise UserError(f"cannot write the backup: {e.strerror or e} ({e.filename})", where=f"--out {dest}") from None
    return manifest


def _pg_dump(backend: Backend, out: Path, *, pg_bin, timeout: float, attempts: int = 3) -> dict[str, Any]:
    """pg_dump into ``out``; the summary (counts) of what it holds.

    The counts are read before and after the dump; when a writer changed them meanwhile, the dump is
    taken again (up to ``attempts`` times), and a count that still moved is recorded as None (a
    restore then checks the others only).
    """
    before = store_summary(backend, pg_bin=pg_bin)
    for _ in range(attempts):
        _pg_run("pg_dump", ["-w", "--format=custom", "--lock-wait-timeout=60000", "--file", str(out)],
                backend, pg_bin=pg_bin, timeout=timeout)
        after = store_summary(backend, pg_bin=pg_bin)
        if after == before:
            return after
        before = after
    return {k: (v if before.get(k) == after.get(k) else None) for k, v in after.items()}


def _sqlite_backup(src_path: Path, dst_path: Path, failure: str) -> None:
    """Copy SQLite database ``src_path`` into ``dst_path`` with SQLite's online backup API (consistent while
    the source is in use); ``failure`` starts the one-line error."""
    src = sqlite3.connect(f"file:{src_path}?mode=ro", uri=True, timeout=CONNECT_TIMEOUT_S)
    dst = sqlite3.connect(dst_path, timeout=CONNECT_TIMEOUT_S)
    try:
        src.backup(dst)
    except sqlite3.DatabaseError as e:
        raise UserError(f"{failure}: {e}") from None
    finally:
        dst.close()
        src.close()


def _sqlite_copy(src_path: Path, dst_path: Path) -> dict[str, Any]:
    """A consistent copy of a live SQLite database (its online backup API); the copy's summary."""
    _sqlite_backup(src_path, dst_path, f"cannot back up the SQLite store {src_path}")
    return store_summary(Backend("sqlite", f"sqlite:///{dst_path}", path=dst_path))


def backup_into(parent: str | Path, backend_uri: str | None = None, artifact_uri: str | None = None, *,
                keep: int | None = None, **kwargs: Any) -> tuple[Path, dict[str, Any], list[Path]]:
    """:func:`backup` into ``parent/mlflow-<UTC time>``; with ``keep``, delete all but the newest ``keep``
    complete backups there (and leftovers of interrupted ones). Returns the path, manifest, deleted paths."""
    parent = Path(parent)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest, n = parent / f"mlflow-{stamp}", 1
    while dest.exists():  # two backups within a second
        n += 1
        dest = parent / f"mlflow-{stamp}-{n}"
    manifest = backup(dest, backend_uri, artifact_uri, **kwargs)
    deleted: list[Path] = []
    if keep is not None:
        complete = sorted(p for p in parent.glob("mlflow-*") if p.is_dir() and _is_backup(p))
        stale = [p for p in parent.glob(".mlflow-*.tmp-*") if p.is_dir()]
        for p in complete[:-keep]:
            shutil.rmtree(p)
            deleted.append(p)
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p)
    return dest, manifest, deleted


def _is_backup(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------- verify, restore


def verify(src: str | Path) -> dict[str, Any]:
    """Check a backup directory against its manifest (every file's size and sha256); returns the manifest."""
    src = Path(src)
    where = f"backup {src}"
    try:
        manifest = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no {MANIFEST}: not a backup (or an interrupted one)", where=where,
                        hint="give a directory written by `rlhf backup create`") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{MANIFEST} is unreadable ({e.__class__.__name__})", where=where,
                        hint="the backup is damaged; use another one") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise UserError(f"{MANIFEST} is not an MLflow backup's", where=where)
    if manifest.get("format") != FORMAT:
        raise UserError(f"backup format {manifest.get('format')} is not {FORMAT}", where=where,
                        hint="restore it with the rlhf version that wrote it")
    try:
        files = {rel: (int(w["bytes"]), str(w["sha256"])) for rel, w in manifest["files"].items()}
        manifest["backend"]["type"], manifest["backend"]["file"], manifest["artifacts"]["dir"]  # noqa: B018
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{MANIFEST} lacks entries a backup has", where=where,
                        hint="the backup is damaged; use another one") from None
    if manifest["backend"]["file"] not in files:
        raise UserError(f"{MANIFEST} lists no database file", where=where, hint="the backup is damaged")
    for rel, (size, sha) in sorted(files.items()):
        p = src / _safe_rel(rel)
        if not p.is_file():
            raise UserError(f"{rel} is missing", where=where, hint="the backup is damaged; use another one")
        if p.stat().st_size != size or sha256_file(p) != sha:
            raise UserError(f"{rel} does not match the manifest's sha256", where=where,
                            hint="the backup is damaged; nothing was restored; use another one")
    return manifest


def restore(src: str | Path, backend_uri: str | None = None, artifact_uri: str | None = None, *,
            force: bool = False, pg_bin: str | Path | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Restore a backup into the given stores (stop the MLflow server first); returns what was restored.

    Refuses, before writing anything, a damaged backup, a backend of another type, and (without
    ``force``) a database or artifact store that already holds MLflow data. With ``force`` the
    database is replaced (`pg_restore --clean --if-exists`, in one transaction) and the backup's
    artifacts overwrite those of the same path; other objects in the artifact store are left alone.
    """
    src = Path(src)
    manifest = verify(src)
    backend, art = resolve_stores(backend_uri, artifact_uri)
    b = manifest["backend"]
    if b["type"] != backend.kind:
        raise UserError(f"the backup holds a {b['type']} database; the target {backend.display} is {backend.kind}",
                        where="--backend-uri", hint=f"restore into a {b['type']} store")
    if backend.kind == "postgresql":
        for tool in ("pg_restore", "psql"):
            _pg_tool(tool, pg_bin)
    if not force:
        for what, in_use in (("database " + backend.display, _holds_data(store_summary(backend, pg_bin=pg_bin))),
                             ("artifact store " + redact_value(art.uri), _artifacts_in_use(art))):
            if in_use:
                raise UserError(f"the {what} is in use ({in_use})",
                                hint="restore into a new or wiped store, or add --force to replace it")
    if backend.kind == "postgresql":
        _pg_run("pg_restore", ["-w", "--clean", "--if-exists", "--no-owner", "--no-privileges",
                               "--single-transaction", "--exit-on-error", "--dbname", backend.env["PGDATABASE"],
                               str(src / b["file"])], backend, pg_bin=pg_bin, timeout=timeout)
    else:
        backend.path.parent.mkdir(parents=True, exist_ok=True)
        _sqlite_backup(src / b["file"], backend.path, f"cannot restore into the SQLite store {backend.path}")
    prefix = manifest["artifacts"]["dir"] + "/"
    files = [k[len(prefix):] for k in manifest["files"] if k.startswith(prefix)]
    try:
        _copy_artifacts_in(src / manifest["artifacts"]["dir"], files, art)
    except UserError as e:
        raise UserError(e.what, where=e.where, hint=(e.hint + "; " if e.hint else "") + "the database is restored "
                        "already: fix this, then run the restore again with --force") from None
    now = store_summary(backend, pg_bin=pg_bin)
    differs = [k for k in ("schema_revision", *COUNTED) if b.get(k) is not None and now.get(k) != b.get(k)]
    if differs:
        raise UserError(f"the restored database differs from the backup in {', '.join(differs)}: "
                        + ", ".join(f"{k} {now.get(k)} != {b.get(k)}" for k in differs),
                        where=f"--backend-uri {backend.display}", hint="was the MLflow server writing to it? "
                        "stop it and restore again with --force")
    return {"backend": backend.display, "artifacts": redact_value(art.uri), "files": len(files),
            **{k: now.get(k) for k in ("schema_revision", *COUNTED)}}


def describe(manifest: dict[str, Any]) -> str:
    """One line: what a backup holds."""
    b, a = manifest["backend"], manifest["artifacts"]
    counts = ", ".join(f"{b.get(k, 0)} {k.replace('_', ' ')}" for k in COUNTED)
    return (f"{b['type']} {b['uri']} (schema {b['schema_revision']}; {counts}) + {a['files']} artifact file(s), "
            f"{a['bytes']:,} bytes from {a['uri']}")
