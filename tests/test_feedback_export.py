"""`rlhf feedback` commands as a user runs them: simulate through the real app, export in prepare's format
(once, never partial), the new data version, and one-line errors for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from feedback_helpers import make_batch

from rlhf.feedback.store import Store

ENV = {"RLHF_TRACKING": "off"}


@pytest.fixture
def labelled(tmp_path):
    """A batch labelled by three simulated annotators through `rlhf feedback simulate` (real app on loopback)."""
    batch = make_batch(tmp_path / "batches", 12, seed=7)
    res = run_cli("feedback", "simulate", "--batch", str(batch.path), "--annotators", "3", "--store", "labels.db",
                  cwd=tmp_path, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    counts = json.loads(res.stdout.split("simulated labels: ", 1)[1])
    assert sum(counts.values()) == 12 and set(counts) == {"sim-01", "sim-02", "sim-03"}
    return tmp_path, batch


def test_export_writes_preference_rows_prepare_reads_once(labelled):
    from rlhf.config import PrepareConfig
    from rlhf.data.prepare import load_split, prepare

    root, batch = labelled
    res = run_cli("feedback", "export", str(batch.path), "--store", "labels.db", "--out", "raw/feedback",
                  cwd=root, env=ENV)
    assert res.returncode == 0, res.stderr
    out = root / "raw" / "feedback" / f"{batch.batch_id}.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    labels = Store(root / "labels.db").labels()
    decided = [r for r in labels if r["winner"]]
    assert len(rows) == len(decided) and rows
    items = {it["item_id"]: it for it in batch.items}
    for row in rows:
        assert {"prompt", "chosen", "rejected", "annotator", "time", "batch_id", "item_id", "shown_left"} <= set(row)
        it = items[row["item_id"]]
        assert {row["chosen"], row["rejected"]} == {it["response_a"], it["response_b"]}
        assert row["batch_id"] == batch.batch_id and row["annotator"].startswith("sim-")
    unpaired = (root / "raw" / "feedback" / f"{batch.batch_id}.unpaired.ndjson").read_text().splitlines()
    assert len(unpaired) == len(labels) - len(decided)
    report = (root / "raw" / "feedback" / f"{batch.batch_id}.report.md").read_text()
    assert "| sim-01 |" in report and f"{len(labels)} labels on 12 items" in report
    # prepare reads the export as preference pairs, with the annotator kept
    prepare(root / "raw", root / "dataset", PrepareConfig(eval_fraction=0.2))
    prefs = [load_split(root / "dataset", "preferences", s) for s in ("train", "eval")]
    assert sum(len(p) for p in prefs) >= 1 and set(prefs[0]["annotator"]) <= {"sim-01", "sim-02", "sim-03"}
    # exported once: a second export is refused and changes nothing
    before = out.read_bytes()
    again = run_cli("feedback", "export", str(batch.path), "--store", "labels.db", "--out", "raw/feedback",
                    cwd=root, env=ENV)
    assert again.returncode == 2 and "exported already" in again.stderr and len(again.stderr.splitlines()) == 1
    assert out.read_bytes() == before


def test_incomplete_batch_exports_nothing(tmp_path):
    batch = make_batch(tmp_path / "batches", 4)
    st = Store(tmp_path / "labels.db")
    st.add_annotator("ann")
    st.add_batch(batch)
    a = st.next_item("ann", [batch.batch_id], 1)
    st.put_label("ann", a["batch_id"], a["item_id"], "left", "", 1.0)
    res = run_cli("feedback", "export", str(batch.path), "--store", "labels.db", "--out", "out", cwd=tmp_path, env=ENV)
    assert res.returncode == 2 and "3 of 4 items have fewer than 1 label" in res.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    ok = run_cli("feedback", "export", str(batch.path), "--store", "labels.db", "--out", "out", "--allow-incomplete",
                 cwd=tmp_path, env=ENV)
    assert ok.returncode == 0 and "exported 1 preference pairs" in ok.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{batch.batch_id}{s}" for s in (".jsonl", ".unpaired.ndjson", ".report.md", ".report.html"))


def one_line_error(res, *needles: str) -> None:
    assert res.returncode != 0, res.stdout
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]  # (MLflow logs its own setup)
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_one_line_errors(tmp_path):
    missing = run_cli("feedback", "serve", str(tmp_path / "nope"), "--store", "l.db", cwd=tmp_path, env=ENV)
    one_line_error(missing, "batch not found", "nope")

    batch = make_batch(tmp_path / "batches", 3)
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "manifest.json").write_text((batch.path / "manifest.json").read_text())
    (bad / "items.jsonl").write_text((batch.path / "items.jsonl").read_text().replace("a", "b", 1))
    one_line_error(run_cli("feedback", "serve", str(bad), cwd=tmp_path, env=ENV), "corrupt batch", "items.jsonl")
    (bad / "manifest.json").write_text("{not json")
    one_line_error(run_cli("feedback", "export", str(bad), cwd=tmp_path, env=ENV), "corrupt batch manifest")

    no_labels = run_cli("feedback", "export", str(batch.path), "--store", "l.db", cwd=tmp_path, env=ENV)
    one_line_error(no_labels, "has no labels")

    unknown = run_cli("feedback", "simulate", "--batch", str(batch.path), "--annotators", "3", "--url",
                      "http://127.0.0.1:9", "--store", "l.db", cwd=tmp_path, env=ENV)
    one_line_error(unknown, "simulated annotator failed")

    no_champion = run_cli("feedback", "sample", "--prompts", str(tmp_path / "p.txt"), cwd=tmp_path,
                          env={"RLHF_TRACKING": "on", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    one_line_error(no_champion, "no 'champion' version")

    bad_name = run_cli("feedback", "add-annotator", "no spaces", "--store", "l.db", cwd=tmp_path, env=ENV)
    one_line_error(bad_name, "not valid")
    for cmd in ("sample", "serve", "simulate", "export", "add-annotator", "loop"):
        assert run_cli("feedback", cmd, "--help", cwd=tmp_path, env=ENV).returncode == 0


def test_unknown_token_is_refused_by_the_app(tmp_path):
    from rlhf.config import FeedbackConfig
    from rlhf.feedback.app import create_app
    from rlhf.feedback.simulate import running_app
    from rlhf.feedback.store import Store as S

    batch = make_batch(tmp_path / "b", 2)
    with running_app(create_app(S(tmp_path / "x.db"), [batch], FeedbackConfig())) as url:
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"{url}/api/next",
                                                          headers={"Authorization": "Bearer wrong"}))
        assert e.value.code == 401
        assert Path(tmp_path / "x.db").exists()


def test_model_text_with_unicode_line_separators_round_trips(tmp_path):
    """Model output can hold U+2028, U+0085, U+001C (str.splitlines breaks there): batch and export stay intact."""
    from rlhf.config import PrepareConfig
    from rlhf.data.prepare import load_split, prepare
    from rlhf.feedback.batch import load_batch, write_batch
    from rlhf.feedback.export import export

    odd = "Start with the salt.\u2028Then heat\x85 it\x1c up\r\nGood luck!"
    items = [{"item_id": f"{i}", "prompt": f"Any advice on cooking? {i}", "response_a": odd + str(i),
              "response_b": f"Okay {i}.", "source_a": {}, "source_b": {}} for i in range(3)]
    batch = load_batch(write_batch(items, tmp_path / "b", {"mode": "champion-two-samples"}).path)
    assert [it["response_a"] for it in batch.items] == [it["response_a"] for it in items]
    st = Store(tmp_path / "l.db")
    st.add_annotator("ann")
    st.add_batch(batch)
    while (a := st.next_item("ann", [batch.batch_id], 1)) is not None:
        st.put_label("ann", a["batch_id"], a["item_id"], "left", "", None)
    export(st, batch, tmp_path / "raw" / "feedback")
    prepare(tmp_path / "raw", tmp_path / "ds", PrepareConfig(eval_fraction=0.3))
    texts = {t for s in ("train", "eval") for df in [load_split(tmp_path / "ds", "preferences", s)]
             for t in list(df["chosen"]) + list(df["rejected"])}
    assert {(odd + str(i)).replace("\r\n", "\n") for i in range(3)} <= texts  # (prepare normalises CRLF)
