"""Data versioning with DVC: fetching data/raw on a fresh clone and reading its version hash.

``data.dvc`` (top level) tracks ``data/raw``. The default remote is a local
directory (``.dvcstore``, see ``.dvc/config``) so a fresh clone works without
network; on a cluster the remote is S3/MinIO (``dvc remote add -d ...``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from rlhf.errors import DataError, UserError


def dvc(*args: str, cwd: str | Path = ".", check: bool = True) -> subprocess.CompletedProcess:
    """Run the DVC command line of this interpreter's environment."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, text=True, capture_output=True)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"`dvc {' '.join(args)}` failed: {msg[-1] if msg else proc.returncode}")
    return proc


def tracked_path(dvc_file: str | Path) -> tuple[Path, str]:
    """The path a .dvc file tracks and the md5 it records."""
    p = Path(dvc_file)
    if not p.exists():
        raise UserError(f"DVC pointer file not found: {p}", hint="run from the project root")
    out = (yaml.safe_load(p.read_text()) or {}).get("outs", [{}])[0]
    return p.parent / out["path"], out.get("md5", "")


def data_hash(dvc_file: str | Path = "data.dvc") -> str:
    """The DVC content hash of the tracked raw data (what a run records as its data version)."""
    return tracked_path(dvc_file)[1]


def is_clean(dvc_file: str | Path) -> bool:
    root = Path(dvc_file).parent
    proc = dvc("status", "--json", Path(dvc_file).name, cwd=root, check=False)
    try:
        return proc.returncode == 0 and json.loads(proc.stdout or "{}") == {}
    except json.JSONDecodeError:
        return False


def workspace_changes(dvc_file: str | Path = "data.dvc") -> str:
    """How the tracked data in the workspace differs from what ``dvc_file`` records ("" when it does not).

    ``dvc status`` hashes the workspace: rows appended to ``data/raw`` without ``dvc add data/raw``
    show up here (e.g. ``"data/raw modified"``), while :func:`data_hash` still names the old version.
    """
    dvc_file = Path(dvc_file)
    proc = dvc("status", "--json", dvc_file.name, cwd=dvc_file.parent)
    try:
        status = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        raise UserError(f"`dvc status {dvc_file.name}` printed something unexpected: {proc.stdout[:200]!r}") from None
    changes = []
    for entries in status.values():
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, dict):
                for outs in entry.values():
                    if isinstance(outs, dict):
                        changes += [f"{path} {what}" for path, what in outs.items()]
            else:
                changes.append(str(entry))
    return ", ".join(changes)


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify_workspace(dvc_file: str | Path = "data.dvc") -> tuple[list[str], list[Path]]:
    """Re-hash the tracked data byte for byte against the version ``dvc_file`` names.

    ``dvc status`` trusts what ``dvc pull`` wrote (a same-length corruption in the remote passes it);
    this reads the version's file listing from the cache (its own md5 must be the recorded hash) and
    compares every file's md5. Returns (problems, cache objects that do not match their name).
    """
    dvc_file = Path(dvc_file)
    path, md5 = tracked_path(dvc_file)
    if not md5.endswith(".dir"):
        return ([] if path.is_file() and _md5(path) == md5 else [f"{path}: md5 differs from {dvc_file}"]), []
    cache = Path(dvc("cache", "dir", cwd=dvc_file.parent).stdout.strip() or dvc_file.parent / ".dvc" / "cache")
    if not cache.is_absolute():
        cache = dvc_file.parent / cache
    h = md5.removesuffix(".dir")

    def obj(m: str, suffix: str = "") -> Path:
        return cache / "files" / "md5" / m[:2] / (m[2:] + suffix)

    listing_file = obj(h, ".dir")
    if not listing_file.is_file() or _md5(listing_file) != h:
        return [f"the file list of data version {h} is missing or corrupted"], [listing_file]
    problems, bad = [], []
    listing = json.loads(listing_file.read_text(encoding="utf-8"))
    expected = {e["relpath"]: e["md5"] for e in listing}
    for rel, want in expected.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif _md5(f) != want:
            problems.append(f"{f}: content differs from data version {h} (md5 {want})")
            if obj(want).is_file() and _md5(obj(want)) != want:
                bad.append(obj(want))
    extra = sorted(str(q.relative_to(path)) for q in path.rglob("*") if q.is_file()
                   and str(q.relative_to(path)) not in expected)
    problems += [f"{path / rel}: not part of data version {h}" for rel in extra]
    return problems, bad


def fetch_data(dvc_file: str | Path = "data.dvc") -> str:
    """Make the tracked raw data present: already there, ``dvc pull``, or regenerate the demo data.

    The demo data is deterministic, so regenerating it reproduces exactly the
    bytes ``data.dvc`` records; that is checked, and the result is pushed to
    the default remote so the next clone can simply pull.
    """
    from rlhf.data import demo

    dvc_file = Path(dvc_file)
    root = dvc_file.parent
    path, md5 = tracked_path(dvc_file)
    if path.exists() and is_clean(dvc_file) and not verify_workspace(dvc_file)[0]:
        return f"{path} is up to date (md5 {md5})"
    if dvc("pull", "--quiet", dvc_file.name, cwd=root, check=False).returncode == 0 and is_clean(dvc_file):
        problems, bad = verify_workspace(dvc_file)
        if problems:
            # what was pulled is not the version data.dvc names: leave none of it behind
            import shutil

            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            for obj in bad:
                obj.unlink(missing_ok=True)
            raise DataError(f"the DVC remote served corrupted data: {problems[0]}"
                            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                            hint="nothing was kept; repair the remote (`dvc push` from a good copy) and retry")
        return f"pulled {path} from the DVC remote (md5 {md5}; every file's md5 checked)"
    generated = not (path.exists() and any(path.iterdir()))
    if generated:
        demo.generate(path)
    # `dvc commit` hashes the workspace into the cache; if the hash differs from the recorded one,
    # put the pointer file back: the data in data/raw is not the version data.dvc names
    recorded = dvc_file.read_text()
    dvc("commit", "--force", "--quiet", dvc_file.name, cwd=root)
    if tracked_path(dvc_file)[1] != md5:
        dvc_file.write_text(recorded)
        raise DataError(
            f"{'regenerated demo data' if generated else str(path)} does not match {dvc_file} (md5 {md5})",
            hint="configure the DVC remote that holds this data version and run `dvc pull`"
            if generated else "`dvc add data/raw` to record your changes, or `dvc checkout` to discard them")
    dvc("push", "--quiet", dvc_file.name, cwd=root, check=False)
    if not generated:
        return f"{path} matches {dvc_file} (md5 {md5}); cached and pushed to the remote"
    return f"regenerated the demo data in {path}; it matches {dvc_file} (md5 {md5}) and was pushed to the remote"
