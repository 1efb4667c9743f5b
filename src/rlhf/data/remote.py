"""Raw data and artifacts in object storage, for pods that have no git checkout and no DVC repository.

* :func:`fetch_raw`: ``data/raw`` by its DVC hash, read straight from the DVC remote (the DVC 3
  layout ``files/md5/<2>/<30>[.dir]``), every file's md5 checked;
* :func:`resolve_raw`: prepare's raw input: a local path, a URL of a directory, or a DVC version;
* :func:`copy_tree`: a directory between local paths and object storage (multi-node jobs).

Credentials on a cluster: the Secret :data:`S3_SECRET` (MinIO user ``rlhf-pipeline``: read
``s3://dvc/files``, read-write ``s3://dvc/runs``) reaches the pod as :data:`S3_KEY_ENV`, and
:func:`_dvc_remote_fs` hands them to s3fs itself. They are deliberately not ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``: KFP's launcher runs in the same container and its S3 client takes those
from the environment (AWS SDK default chain) for KFP's own artifact store. Without them set (a
laptop) s3fs uses its usual chain (``AWS_*``, ``~/.aws``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from rlhf.errors import ConfigError, UserError

log = logging.getLogger("rlhf")

#: the Kubernetes Secret of the pipeline's object-store user (k8s/base: MinIO user rlhf-pipeline)
S3_SECRET = "rlhf-s3-pipeline"
#: its keys, used as the environment variable names too (never the AWS SDK's or KFP's names)
S3_ACCESS_KEY_ENV = "RLHF_S3_ACCESS_KEY_ID"
S3_SECRET_KEY_ENV = "RLHF_S3_SECRET_ACCESS_KEY"
S3_KEY_ENV = (S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV)


def _dvc_remote_fs(remote: str):
    import fsspec

    opts: dict[str, Any] = {}
    endpoint = os.environ.get("DVC_REMOTE_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if remote.startswith(("s3://", "minio://")) and endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    proto = remote.split("://", 1)[0] if "://" in remote else "file"
    if proto == "minio":
        proto = "s3"
    key, secret = os.environ.get(S3_ACCESS_KEY_ENV), os.environ.get(S3_SECRET_KEY_ENV)
    if proto == "s3" and key and secret:
        opts.update(key=key, secret=secret)
    return fsspec.filesystem(proto, **opts), remote.split("://", 1)[-1].rstrip("/")


def fetch_raw(data_hash: str, remote: str, out: str | Path) -> Path:
    """Download the raw data version ``data_hash`` (DVC md5 of ``data/raw``, ``.dir`` suffix optional).

    Reads the DVC 3 remote layout directly (``files/md5/<2>/<30>[.dir]``), so a pod needs neither git
    nor a DVC repository; every file's md5 is checked.
    """
    import hashlib

    if not data_hash:
        raise ConfigError("no raw data: give raw_data (a path) or data_hash (the md5 in data.dvc)")
    if not remote:
        raise ConfigError("no DVC remote to fetch the data from", hint="set DVC_REMOTE_URL (ConfigMap rlhf-config)")
    fs, root = _dvc_remote_fs(remote)
    h = data_hash.removesuffix(".dir")

    def obj(md5: str, suffix: str = "") -> str:
        return f"{root}/files/md5/{md5[:2]}/{md5[2:]}{suffix}"

    try:
        raw_listing = fs.cat_file(obj(h, ".dir"))
        listing = json.loads(raw_listing)
    except FileNotFoundError:
        raise UserError(f"data version {h} is not in the DVC remote {remote}",
                        hint="`dvc push` it from the machine that has it") from None
    if hashlib.md5(raw_listing).hexdigest() != h:
        raise UserError(f"the file list of data version {h} in {remote} is corrupted (its md5 differs)",
                        hint="repair the remote with `dvc push` from a good copy")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for entry in listing:
        target = out / entry["relpath"]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(obj(entry["md5"]), str(target))
        if hashlib.md5(target.read_bytes()).hexdigest() != entry["md5"]:
            raise UserError(f"{entry['relpath']}: checksum mismatch after download from {remote}")
    log.info("[prepare] fetched data %s (%d files) from %s", h, len(listing), remote)
    return out


def resolve_raw(raw_data: str, data_hash: str, dest: str | Path) -> Path:
    """Local raw data: ``raw_data`` when it is a local path, else fetched by hash from the DVC remote."""
    if raw_data and "://" not in raw_data:
        p = Path(raw_data)
        if not p.exists():
            raise UserError(f"raw data not found: {p}", hint="run `make data` (or `rlhf fetch-data`) first")
        return p
    if raw_data:  # a URL of a directory of raw files
        fs, root = _dvc_remote_fs(raw_data)
        fs.get(root + "/", str(dest) + "/", recursive=True)
        return Path(dest)
    return fetch_raw(data_hash, os.environ.get("DVC_REMOTE_URL", ""), dest)


def copy_tree(src: str, dst: str) -> None:
    """Copy a directory between local paths and object storage (s3://, minio://, file paths)."""
    if "://" not in src and "://" not in dst:
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    if "://" in src:
        fs, root = _dvc_remote_fs(src)
        Path(dst).mkdir(parents=True, exist_ok=True)
        fs.get(root + "/", dst.rstrip("/") + "/", recursive=True)
    else:
        fs, root = _dvc_remote_fs(dst)
        fs.put(src.rstrip("/") + "/", root + "/", recursive=True)
