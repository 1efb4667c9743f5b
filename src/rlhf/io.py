"""Small file helpers shared by all stages: hashing, atomic output directories, manifests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | Path) -> str:
    """Content hash of a directory: relative paths and file hashes, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
        h.update(b"\n")
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    p = Path(path)
    return sha256_dir(p) if p.is_dir() else sha256_file(p)


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out``.

    On any error the temporary directory is removed and ``out`` is left as it
    was, so a later stage never picks up a half-written artifact.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def write_manifest(
    out_dir: str | Path,
    *,
    kind: str,
    inputs: dict[str, str | Path] | None = None,
    config: Any = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json``: what the artifact is, its inputs' hashes, config and metrics."""
    from rlhf import __version__

    out_dir = Path(out_dir)
    input_hashes = {}
    for name, p in (inputs or {}).items():
        p = Path(p)
        mf = p / MANIFEST
        if p.is_dir() and mf.exists():
            # an upstream artifact: its identity is its own content hash, recorded in its manifest
            input_hashes[name] = json.loads(mf.read_text()).get("content_hash") or sha256_path(p)
        else:
            input_hashes[name] = sha256_path(p)
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    manifest = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "rlhf_version": __version__,
        "inputs": input_hashes,
        "config": config or {},
        "metrics": metrics or {},
        **(extra or {}),
    }
    manifest["content_hash"] = sha256_dir(out_dir) if out_dir.exists() else None
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(artifact_dir: str | Path, expect_kind: str | None = None) -> dict[str, Any]:
    from rlhf.errors import UserError

    mf = Path(artifact_dir) / MANIFEST
    if not mf.exists():
        raise UserError(
            f"no {MANIFEST} in {artifact_dir}",
            hint="point at a directory written by an rlhf stage",
        )
    manifest = json.loads(mf.read_text())
    if expect_kind and manifest.get("kind") != expect_kind:
        raise UserError(
            f"{artifact_dir} holds a '{manifest.get('kind')}' artifact, expected '{expect_kind}'"
        )
    return manifest
