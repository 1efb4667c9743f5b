"""Small file helpers shared by all stages: hashing, atomic output directories, manifests."""

from __future__ import annotations

import contextlib
import errno
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


#: errno values that mean the filesystem is full (space or quota)
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "errno 28", "disk quota exceeded", "storagefull")
#: below this many free bytes a failed write is blamed on the full disk (torch.save's C++ writer, for one,
#: reports a full disk as "unexpected pos N vs M" with no errno)
LOW_SPACE_BYTES = 1 << 20


def free_bytes(path: str | Path) -> int | None:
    """Bytes an unprivileged writer can still use on the filesystem holding ``path`` (its nearest existing
    parent), or None when that cannot be told."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def out_of_space(exc: BaseException, path: str | Path | None = None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk: ENOSPC/EDQUOT, the message of
    a library that wraps it (safetensors, pyarrow, SQLite), or any failed write while the filesystem of
    ``path`` has (almost) no space left."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return True
        text = str(e).lower()
        if any(t in text for t in _NO_SPACE_TEXT) or "database or disk is full" in text:
            return True
        e = e.__cause__ or e.__context__
    from rlhf.errors import UserError

    if path is not None and isinstance(exc, Exception) and not isinstance(exc, UserError):
        free = free_bytes(path)
        return free is not None and free < LOW_SPACE_BYTES
    return False


def no_space_error(path: str | Path, *, what: str = "", kept: str | None = None):
    """The one-line :class:`~rlhf.errors.DiskFull` for a write to ``path`` that ran out of space."""
    from rlhf.errors import DiskFull

    free = free_bytes(path)
    left = f", {free // 1024} KiB free" if free is not None else ""
    return DiskFull(f"no space left on device writing {what + ' ' if what else ''}{path}{left}",
                    hint=f"free space there or choose another location; {kept or 'nothing was written'}")


def write_error(path: str | Path, e: OSError, *, what: str = "output"):
    """The one-line :class:`~rlhf.errors.UserError` for an output path the OS refuses (a read-only or
    virtual filesystem such as /proc, a missing or unwritable parent)."""
    from rlhf.errors import UserError

    reason = e.strerror or type(e).__name__
    return UserError(f"cannot write the {what} {path}: {reason}",
                     hint="choose a path in a writable directory, e.g. artifacts/<name>")


def environment_error(e: OSError):
    """A full or read-only filesystem met outside :func:`atomic_dir` as a one-line error (None: not one)."""
    path = e.filename or ""
    if out_of_space(e):
        return no_space_error(path or "a file", kept="check the last output it names before rerunning")
    if e.errno == errno.EROFS:
        return write_error(path or "a file", e, what="file")
    return None


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out``.

    On any error the temporary directory is removed and ``out`` is left as it
    was, so a later stage never picks up a half-written artifact. A full disk
    (:func:`out_of_space`) becomes one line (:class:`~rlhf.errors.DiskFull`), as
    does an output directory the OS refuses to create (:func:`write_error`).
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        if out_of_space(e):
            raise no_space_error(out) from None
        raise write_error(out, e) from None
    kept = f"the previous {out} is unchanged" if out.exists() else None
    try:
        yield tmp
    except BaseException as e:
        full = out_of_space(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise no_space_error(out, kept=kept) from None
        raise
    old = None
    try:
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as e:  # renames need no space; a vanished or read-only parent: put the old one back
        if old is not None and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out, e) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_file_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place: a full disk leaves the old
    file (or none) and one line (:class:`~rlhf.errors.DiskFull`), never a truncated file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        if out_of_space(e):
            raise no_space_error(path) from None
        raise write_error(path, e, what="file") from None
    kept = f"the previous {path} is unchanged" if path.exists() else None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # as a plain write would leave it (mkstemp makes it 0600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and out_of_space(e):
            raise no_space_error(path, kept=kept) from None
        raise


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
