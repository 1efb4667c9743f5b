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


def content_hash(artifact_dir: str | Path) -> str:
    """The content hash a manifest records: :func:`sha256_dir` of the artifact without its manifest."""
    root = Path(artifact_dir)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
        h.update(b"\n")
    return h.hexdigest()


def artifact_problem(artifact_dir: str | Path) -> str | None:
    """``None`` when ``artifact_dir`` is a whole stage output (a manifest whose content hash matches the
    files beside it), else what is wrong with it."""
    mf = Path(artifact_dir) / MANIFEST
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return f"no readable {MANIFEST}"
    if not isinstance(manifest, dict) or not manifest.get("content_hash"):
        return f"{MANIFEST} records no content hash"
    if content_hash(artifact_dir) != manifest["content_hash"]:
        return "its files do not match the manifest's content hash"
    return None


def input_hashes(inputs: dict[str, str | Path] | None) -> dict[str, str]:
    """The identity of each input as a manifest records it: an upstream artifact's own content hash
    (from its manifest), else the hash of the file or directory."""
    out = {}
    for name, p in (inputs or {}).items():
        p = Path(p)
        mf = p / MANIFEST
        if p.is_dir() and mf.exists():
            out[name] = json.loads(mf.read_text()).get("content_hash") or sha256_path(p)
        else:
            out[name] = sha256_path(p)
    return out


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
    hashes = input_hashes(inputs)  # an upstream artifact's identity: its own content hash
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    manifest = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "rlhf_version": __version__,
        "inputs": hashes,
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


def check_output(out: str | Path, *, stage: str, kind: str, inputs: dict[str, str | Path | None] | None = None,
                 file: bool = False) -> None:
    """Refuse an output path that writing (and atomically replacing) would destroy data at.

    ``out`` may be absent, an empty directory, or a previous output of the same stage (its
    ``manifest.json`` names ``kind`` and, where it records one, this ``stage``); with ``file`` it
    is one file, which may only replace a previous receipt of the stage (a JSON object naming
    ``stage``). Anything else raises a one-line :class:`~rlhf.errors.UserError`: an input of the
    run, a path inside or around an input, a directory with other content, a file, the working
    directory or the installed source, a path under a file.
    """
    from rlhf.errors import UserError

    flag = f"rlhf {stage} --out"
    target = Path(out).expanduser().absolute()
    real = Path(os.path.realpath(target))

    for parent in real.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{parent} is a file, not a directory", where=f"{flag} {out}",
                            hint="choose an output path in a directory")
    for name, p in (inputs or {}).items():
        if not p or "://" in str(p) or str(p).startswith("@"):
            continue
        src = Path(os.path.realpath(Path(p).expanduser().absolute()))
        if real == src or src in real.parents or real in src.parents:
            rel = "is" if real == src else ("is inside" if src in real.parents else "contains")
            raise UserError(f"the output {rel} the input {name} ({p})", where=f"{flag} {out}",
                            hint="writing it would delete that input; choose another output path")
    package = Path(os.path.realpath(Path(__file__).parent))
    for protected, what in ((Path(os.path.realpath(Path.cwd())), "the working directory"),
                            (package, "the installed rlhf source")):
        if real == protected or real in protected.parents:
            raise UserError(f"the output would replace {what} ({protected})", where=f"{flag} {out}",
                            hint="choose a new or empty output directory, e.g. artifacts/<name>")
    if not real.exists():
        return
    if file:
        if real.is_dir():
            raise UserError("is a directory; this stage writes one file", where=f"{flag} {out}",
                            hint="give a file path, e.g. artifacts/registration.json")
        try:
            doc = json.loads(real.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            doc = None
        legacy = isinstance(doc, dict) and "stage" not in doc and "model_name" in doc  # receipts before 0.2
        if not isinstance(doc, dict) or doc.get("stage") != stage and not legacy:
            raise UserError(f"is a file that is not a previous {stage} receipt", where=f"{flag} {out}",
                            hint="choose a new file path; the existing file is left as it is")
        return
    if not real.is_dir():
        raise UserError("is a file, not an output directory", where=f"{flag} {out}",
                        hint="choose a new or empty directory; the file is left as it is")
    entries = [e.name for e in real.iterdir()]
    if not entries:
        return
    try:
        manifest = json.loads((real / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and manifest.get("kind") == kind and manifest.get("stage", stage) == stage:
        return
    found = f"a '{manifest.get('kind')}' artifact" if isinstance(manifest, dict) else \
        f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} and no {MANIFEST}"
    raise UserError(f"holds {found}, not a previous {stage} output", where=f"{flag} {out}",
                    hint="choose a new or empty directory; nothing was written")
