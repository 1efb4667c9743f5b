"""Label Studio interop against a real Label Studio server on loopback.

PyPI's ``label-studio`` lives in a virtualenv of its own (its pins clash with ours):
``.ci/label-studio.sh`` creates it and prints its ``label-studio`` executable; ``.ci/run`` passes
that as ``$RLHF_LABEL_STUDIO_BIN``. Without the variable the fixture runs the script itself (a few
minutes the first time) and skips, with the script's reason, only when it cannot install it.

The server is started once for the module, on 127.0.0.1 with a throw-away data directory, a preset
admin and legacy API token, and Sentry / analytics / version checks off (no traffic leaves the
machine). Round trip: push a batch, label it through the API as two different users (one of them
signs up through Label Studio's own sign-up form and uses its own token), pull, and check every
label and its annotator; then ``rlhf prepare`` on the pulled rows and on an exported JSON file.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, run_cli

from rlhf.feedback import labelstudio as ls

ADMIN, ADMIN_PASSWORD, ADMIN_TOKEN = "lead@example.com", "Lead-Passw0rd-1", "rlhf-test-token-0123456789abcdef"
SECOND, SECOND_PASSWORD = "annotator2@example.com", "Second-Passw0rd-2"
NO_PHONING_HOME = {"SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "LATEST_VERSION_CHECK": "false",
                   "COLLECT_ANALYTICS": "false"}


def _label_studio_bin() -> Path:
    exe = os.environ.get("RLHF_LABEL_STUDIO_BIN")
    if exe:
        if not Path(exe).is_file():
            pytest.fail(f"$RLHF_LABEL_STUDIO_BIN={exe} does not exist (run .ci/label-studio.sh)")
        return Path(exe)
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "label-studio.sh")], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        pytest.skip(f"label-studio cannot be installed here (.ci/label-studio.sh: {tail})")
    return Path(proc.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, exe: Path, root: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = root / "data"
        self.log = root / "label-studio.log"
        env = {**os.environ, **NO_PHONING_HOME, "LABEL_STUDIO_USERNAME": ADMIN,
               "LABEL_STUDIO_PASSWORD": ADMIN_PASSWORD, "LABEL_STUDIO_USER_TOKEN": ADMIN_TOKEN,
               "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LABEL_STUDIO_BASE_DATA_DIR": str(self.data),
               "HOME": str(root)}
        for k in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "VIRTUAL_ENV"):
            env.pop(k, None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port),
                 "--data-dir", str(self.data)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                start_new_session=True)

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"label-studio exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"label-studio did not answer within {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exe = _label_studio_bin()
    srv = Server(exe, tmp_path_factory.mktemp("label-studio"))
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()
    # nothing tried to leave the machine (Sentry, analytics, the PyPI version check are off)
    outside = [line for line in srv.log.read_text(errors="replace").splitlines()
               if re.search(r"sentry\.io|pypi\.org|NameResolutionError|Failed to resolve", line)]
    assert not outside, "Label Studio tried to reach outside hosts:\n" + "\n".join(outside[:5])


def _sign_up(url: str, email: str, password: str) -> str:
    """A second annotator joins through Label Studio's sign-up form; return their own API token."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(url + "/user/signup/", timeout=30).read().decode()
    m = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    csrf = m.group(1) if m else next(c.value for c in jar if c.name == "csrftoken")
    form = urllib.parse.urlencode({"csrfmiddlewaretoken": csrf, "email": email, "password": password,
                                   "allow_newsletters": "false", "how_find_us": "Other",
                                   "elaborate": "test"}).encode()
    req = urllib.request.Request(url + "/user/signup/", data=form, headers={"Referer": url + "/user/signup/"})
    opener.open(req, timeout=30).read()
    ans = json.loads(opener.open(url + "/api/current-user/token", timeout=30).read())
    return ans["token"]


def _annotate(client: ls.Client, task_id: int, label: str) -> None:
    """One annotation as ``client``'s user: left / right (Pairwise), Tie / Both bad (Choices), skip."""
    if label == "skip":
        body = {"result": [], "was_cancelled": True}
    elif label in ("left", "right"):
        body = {"result": [{"from_name": "pw", "to_name": "pw", "type": "pairwise",
                            "value": {"selected": label}}]}
    else:
        body = {"result": [{"from_name": "verdict", "to_name": "prompt", "type": "choices",
                            "value": {"choices": [label]}}]}
    client.request("POST", f"/api/tasks/{task_id}/annotations/", body={**body, "lead_time": 3.5})


ITEMS = [
    ("it-1", "Name a colour.", "Blue.", "A colour is <b>red</b> & \"green\" 🟢"),
    ("it-2", "Say hi in French.", "Bonjour !", "Hola."),
    ("it-3", "2+2?", "4", "four"),
    ("it-4", "Capital of France?", "Paris", "Lyon\nand more lines"),
]
# (item, admin's label, second annotator's label)
LABELS = [("it-1", "left", "right"), ("it-2", "right", "right"), ("it-3", "Tie", "Both bad"),
          ("it-4", "skip", "left")]


def make_batch(root: Path, batch_id: str = "b-20261201-abc123") -> Path:
    d = root / batch_id
    d.mkdir(parents=True)
    with open(d / "items.jsonl", "w", encoding="utf-8") as f:
        for item_id, prompt, a, b in ITEMS:
            f.write(json.dumps({"item_id": item_id, "prompt": prompt, "response_a": a, "response_b": b,
                                "source_a": {"model": "rlhf-policy", "version": 3, "seed": 11},
                                "source_b": {"model": "rlhf-policy", "version": 4, "seed": 12}}) + "\n")
    (d / "manifest.json").write_text(json.dumps({
        "batch_id": batch_id, "created": "2026-12-01T20:00:00Z", "model_name": "rlhf-policy",
        "versions": {"a": 3, "b": 4}, "generation": {"temperature": 0.8, "max_new_tokens": 32},
        "n_items": len(ITEMS)}))
    return d


def expected_rows(batch_id: str, second_email: str) -> list[tuple]:
    texts = {i: (p, a, b) for i, p, a, b in ITEMS}
    out = []
    for item_id, *labels in LABELS:
        for who, lab in zip((ADMIN, second_email), labels, strict=True):
            p, a, b = texts[item_id]
            if lab in ("left", "right"):
                chosen, rejected = (a, b) if lab == "left" else (b, a)
                out.append((item_id, who, p, chosen, rejected, batch_id))
    return sorted(out)


def test_round_trip_keeps_every_label_and_annotator(server, tmp_path):
    batch = make_batch(tmp_path / "batches")
    batch_id = batch.name
    env = {"LABEL_STUDIO_API_KEY": ADMIN_TOKEN}

    proc = run_cli("feedback", "push", str(batch), "--url", server.url, "--overlap", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    pid = int(re.search(r"project (\d+)", proc.stdout).group(1))
    assert "4 tasks imported" in proc.stdout
    # idempotent: the same batch again finds its project and imports nothing
    again = ls.push(batch, server.url, ADMIN_TOKEN)
    assert (again["project_id"], again["created"], again["imported"], again["already_there"]) == (pid, False, 0, 4)

    admin = ls.Client(server.url, ADMIN_TOKEN)
    project = admin.request("GET", f"/api/projects/{pid}/")
    assert project["maximum_annotations"] == 2
    assert "<Pairwise" in project["label_config"] and 'name="verdict"' in project["label_config"]
    tasks = admin.export(pid)
    assert len(tasks) == 4
    for t in tasks:  # model identity hidden: the task carries texts and ids only
        assert set(t["data"]) == {"prompt", "answer1", "answer2", "item_id", "batch_id"}
    by_item = {t["data"]["item_id"]: t["id"] for t in tasks}

    second = ls.Client(server.url, _sign_up(server.url, SECOND, SECOND_PASSWORD))
    who = second.request("GET", "/api/current-user/whoami")
    assert who["email"] == SECOND
    for item_id, admin_label, second_label in LABELS:
        _annotate(admin, by_item[item_id], admin_label)
        _annotate(second, by_item[item_id], second_label)

    out = tmp_path / "raw" / "feedback"
    proc = run_cli("feedback", "pull", str(pid), "--url", server.url, "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.split("summary: ", 1)[1])["batches"][0]
    assert {k: summary[k] for k in ("tasks", "labels", "pairs", "a", "b", "tie", "both_bad", "skip", "empty")} \
        == {"tasks": 4, "labels": 8, "pairs": 5, "a": 2, "b": 3, "tie": 1, "both_bad": 1, "skip": 1, "empty": 0}
    assert summary["per_annotator"] == {ADMIN: {"a": 1, "b": 1, "tie": 1, "skip": 1},
                                        SECOND: {"a": 1, "b": 2, "both_bad": 1}}
    path = out / f"{batch_id}.labelstudio.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"prompt", "chosen", "rejected", "annotator", "time", "batch_id", "item_id"} for r in rows)
    assert all(r["time"] and r["time"].startswith("20") for r in rows)
    got = sorted((r["item_id"], r["annotator"], r["prompt"], r["chosen"], r["rejected"], r["batch_id"])
                 for r in rows)
    assert got == expected_rows(batch_id, SECOND)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # nothing half-written left

    # pulling again with the same labels is a no-op; other labels need --overwrite
    proc = run_cli("feedback", "pull", batch_id, "--url", server.url, "--out", str(out), env=env)
    assert proc.returncode == 0 and "(unchanged)" in proc.stdout, proc.stdout + proc.stderr
    path.write_text(path.read_text().splitlines()[0] + "\n")
    proc = run_cli("feedback", "pull", str(pid), "--url", server.url, "--out", str(out), env=env)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert len(path.read_text().splitlines()) == 1  # refused: left as it was
    assert run_cli("feedback", "pull", str(pid), "--url", server.url, "--out", str(out), "--overwrite",
                   env=env).returncode == 0
    assert len(path.read_text().splitlines()) == 5

    # rlhf prepare on the pulled rows: every pair, with its annotator
    ds = tmp_path / "ds-pulled"
    proc = run_cli("prepare", "--raw", str(out.parent), "--out", str(ds), cwd=tmp_path)  # no params.yaml there: the defaults
    assert proc.returncode == 0, proc.stderr
    prefs = pd.concat([pd.read_parquet(ds / "preferences" / f"{s}.parquet") for s in ("train", "eval")])
    got = sorted((r.annotator, r.prompt, r.chosen, r.rejected) for r in prefs.itertuples())
    assert got == sorted((w, p, c, r) for _, w, p, c, r, _ in expected_rows(batch_id, SECOND))

    # rlhf prepare on Label Studio JSON export files: a snapshot export with the annotators expanded (what
    # the docs recommend: emails kept), and the plain export endpoint (annotators by user id)
    snap = admin.request("POST", f"/api/projects/{pid}/exports/", body={
        "serialization_options": {"annotations__completed_by": {"only_id": False}}})
    deadline = time.monotonic() + 120
    while admin.request("GET", f"/api/projects/{pid}/exports/{snap['id']}")["status"] != "completed":
        assert time.monotonic() < deadline, "snapshot export did not complete"
        time.sleep(0.5)
    users = {u["email"]: u["id"] for u in admin.request("GET", "/api/users/")}
    for name, path_q, annotator in (
            ("snapshot", f"/api/projects/{pid}/exports/{snap['id']}/download?exportType=JSON", lambda w: w),
            ("plain", f"/api/projects/{pid}/export?exportType=JSON", lambda w: f"user-{users[w]}")):
        export = tmp_path / f"export-{name}" / "project.json"
        export.parent.mkdir()
        with urllib.request.urlopen(urllib.request.Request(
                server.url + path_q, headers={"Authorization": f"Token {ADMIN_TOKEN}"}), timeout=60) as r:
            export.write_bytes(r.read())
        ds2 = tmp_path / f"ds-{name}"
        proc = run_cli("prepare", "--raw", str(export), "--out", str(ds2), cwd=tmp_path)  # no params.yaml there: the defaults
        assert proc.returncode == 0, proc.stderr
        prefs2 = pd.concat([pd.read_parquet(ds2 / "preferences" / f"{s}.parquet") for s in ("train", "eval")])
        got2 = sorted((r.annotator, r.prompt, r.chosen, r.rejected) for r in prefs2.itertuples())
        assert got2 == sorted((annotator(w), p, c, r) for _, w, p, c, r, _ in expected_rows(batch_id, SECOND)), name


def test_user_mistakes_are_one_line(server, tmp_path):
    batch = make_batch(tmp_path)
    cases = [
        (("push", str(tmp_path / "nope"), "--url", server.url, "--token", ADMIN_TOKEN), "batch directory does not exist"),
        (("push", str(batch), "--url", server.url, "--token", "wrong-token"), "refused the token"),
        (("push", str(batch), "--url", f"http://127.0.0.1:{_free_port()}", "--token", "x"), "cannot reach Label Studio"),
        (("pull", "no-such-batch", "--url", server.url, "--token", ADMIN_TOKEN), "no Label Studio project"),
    ]
    env = {"LABEL_STUDIO_API_KEY": ""}
    for args, what in cases:
        proc = run_cli("feedback", *args, env=env)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert what in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run_cli("feedback", "push", str(batch), "--url", server.url, "--overlap", "2", env=env)
    assert proc.returncode == 2 and "no Label Studio API token" in proc.stderr


# ---------------------------------------------------------------- without a server


def _export_task(result: list, **ann) -> dict:
    return {"id": 7, "data": {"prompt": "p", "answer1": "A", "answer2": "B", "item_id": "i", "batch_id": "b"},
            "annotations": [{"id": 1, "completed_by": 3, "result": result, "was_cancelled": False,
                             "created_at": "2026-12-01T20:00:00Z", **ann}]}


@pytest.mark.parametrize("task, what", [
    (_export_task([{"from_name": "pw", "to_name": "pw", "type": "pairwise", "value": {"selected": "up"}}]),
     "pairwise 'value.selected' must be 'left' or 'right'"),
    (_export_task([{"from_name": "verdict", "type": "choices", "value": {"choices": ["Maybe"]}}]),
     "'verdict' choices must be one of"),
    ({"id": 1, "data": {"prompt": "p", "answer1": "A"}, "annotations": []}, "field 'data.answer2' is missing"),
    ({"id": 1, "data": {"prompt": "p", "answer1": "A", "answer2": "B"}, "annotations": {}},
     "'annotations' must be a list"),
])
def test_malformed_export_is_one_line(task, what, tmp_path):
    f = tmp_path / "export.json"
    f.write_text(json.dumps([_export_task([]), task]))
    out = tmp_path / "ds"
    proc = run_cli("prepare", "--raw", str(f), "--out", str(out), cwd=tmp_path)  # no params.yaml there: the defaults
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and f"{f}:2" in line and what in line, line
    assert not out.exists()


def test_malformed_batch_is_one_line(tmp_path):
    batch = make_batch(tmp_path)
    (batch / "items.jsonl").write_text((batch / "items.jsonl").read_text() + '{"item_id": "x"}\n')
    proc = run_cli("feedback", "push", str(batch), "--url", "http://127.0.0.1:9", "--token", "t")
    assert proc.returncode == 2 and f"{batch / 'items.jsonl'}:5: missing required field 'prompt'" in proc.stderr
