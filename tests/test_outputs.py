"""Output paths that cannot destroy data: every stage refuses an --out it would wipe (real CLI processes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from rlhf.errors import UserError
from rlhf.io import check_output, sha256_dir


def _snapshot(path: Path) -> str:
    return sha256_dir(path) if path.is_dir() else path.read_bytes().hex()


@pytest.fixture()
def raw(demo_raw, tmp_path) -> Path:
    dest = tmp_path / "raw"
    shutil.copytree(demo_raw, dest)
    return dest


def _refused(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_prepare_refuses_to_write_over_its_raw_input(raw, tmp_path):
    before = _snapshot(raw)
    proc = run_cli("prepare", "--raw", str(raw), "--out", str(raw), cwd=tmp_path)
    _refused(proc, "--out", "is the input raw")
    assert _snapshot(raw) == before
    proc = run_cli("prepare", "--raw", str(raw / "sft.jsonl"), "--out", str(raw), cwd=tmp_path)
    _refused(proc, "contains the input raw")
    assert _snapshot(raw) == before


def test_validate_refuses_to_write_over_the_dataset(dataset, tmp_path):
    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    dataset = copy
    before = _snapshot(dataset)
    proc = run_cli("validate", "--dataset", str(dataset), "--out", str(dataset), cwd=tmp_path)
    _refused(proc, "is the input dataset")
    proc = run_cli("validate", "--dataset", str(dataset), "--out", str(dataset / "report"), cwd=tmp_path)
    _refused(proc, "is inside the input dataset")
    assert _snapshot(dataset) == before


def test_directories_with_other_content_files_and_the_source_are_refused(raw, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me\n")
    _refused(run_cli("prepare", "--raw", str(raw), "--out", str(other), cwd=tmp_path),
             "1 entry and no manifest.json", "not a previous prepare output")
    assert (other / "todo.txt").read_text() == "keep me\n"

    readme = tmp_path / "README.md"
    readme.write_text("# mine\n")
    _refused(run_cli("prepare", "--raw", str(raw), "--out", str(readme), cwd=tmp_path), "is a file")
    assert readme.read_text() == "# mine\n"
    _refused(run_cli("prepare", "--raw", str(raw), "--out", str(readme / "x"), cwd=tmp_path), "is a file")

    src_before = _snapshot(ROOT / "src")
    _refused(run_cli("prepare", "--raw", str(raw), "--out", "src"), "the installed rlhf source")
    _refused(run_cli("prepare", "--raw", str(raw), "--out", "."), "the working directory")
    assert _snapshot(ROOT / "src") == src_before


def test_a_previous_output_of_the_same_stage_is_replaced(raw, tmp_path):
    out = tmp_path / "dataset"
    first = run_cli("prepare", "--raw", str(raw), "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = run_cli("prepare", "--raw", str(raw), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (out / "manifest.json").exists()
    # ...but another stage's output is not: validate may not replace a dataset
    other = tmp_path / "dataset-2"
    assert run_cli("prepare", "--raw", str(raw), "--out", str(other), cwd=tmp_path).returncode == 0
    _refused(run_cli("validate", "--dataset", str(out), "--out", str(other), cwd=tmp_path),
             "a 'dataset' artifact", "not a previous validate output")


def test_file_outputs_replace_only_their_own_receipt(tmp_path):
    receipt = tmp_path / "registration.json"
    receipt.write_text('{"stage": "register", "registered": false}\n')
    check_output(receipt, stage="register", kind="registration", file=True)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    with pytest.raises(UserError, match="not a previous register receipt"):
        check_output(notes, stage="register", kind="registration", file=True)
    with pytest.raises(UserError, match="is a directory"):
        check_output(tmp_path, stage="register", kind="registration", file=True)


def test_an_out_the_os_refuses_is_one_line(raw, tmp_path):
    for out in ("/proc/rlhf-dataset", "/proc/self/rlhf-dataset"):  # a virtual filesystem: no new entries
        _refused(run_cli("prepare", "--raw", str(raw), "--out", out, cwd=tmp_path), f"cannot write the output {out}",
                 "choose a path in a writable directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
