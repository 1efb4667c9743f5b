"""Small filesystems for the fault suite: a tmpfs of a given size (full disks), a read-only one.

Mounting needs root with CAP_SYS_ADMIN. Where mounting is refused the tests are skipped with the
reason; ``.ci/run`` checks that it can mount one and then sets ``RLHF_REQUIRE_TMPFS=1``, which turns
that skip into a failure.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REQUIRE = os.environ.get("RLHF_REQUIRE_TMPFS") == "1"


class Disks:
    def __init__(self, root: Path):
        self.root, self.mounted = root, []

    def mount(self, name: str, size_kib: int, *, read_only: bool = False) -> Path:
        """A fresh tmpfs of ``size_kib`` KiB at ``<tmp>/<name>``."""
        path = self.root / name
        path.mkdir(parents=True)
        opts = f"size={size_kib}k,mode=0777" + (",ro" if read_only else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            why = (res.stderr or res.stdout).strip() or f"mount exited {res.returncode}"
            if REQUIRE:
                pytest.fail(f"RLHF_REQUIRE_TMPFS=1 but a tmpfs cannot be mounted: {why}")
            pytest.skip(f"cannot mount a tmpfs here ({why}): needs root with CAP_SYS_ADMIN")
        self.mounted.append(path)
        return path

    def resize(self, path: Path, size_kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(path)], check=True, capture_output=True)

    def unmount_all(self) -> None:
        for path in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def used_kib(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


def fill(disk: Path, leave_kib: int) -> Path:
    """Write a filler file until only ``leave_kib`` KiB are free on ``disk``."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_kib * 1024))
    return filler


def du_kib(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) // 1024


def one_error_line(proc: subprocess.CompletedProcess, exit_code: int, *needles: str) -> str:
    """The process failed with ``exit_code`` and one ``error:`` line holding every needle, no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == exit_code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]
