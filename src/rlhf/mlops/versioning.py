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
    if path.exists() and is_clean(dvc_file):
        return f"{path} is up to date (md5 {md5})"
    if dvc("pull", "--quiet", dvc_file.name, cwd=root, check=False).returncode == 0 and is_clean(dvc_file):
        return f"pulled {path} from the DVC remote (md5 {md5})"
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
