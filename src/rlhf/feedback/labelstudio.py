"""Label Studio for the human feedback loop: push a labelling batch as a project, pull its labels back.

The batch contract (shared with the rest of :mod:`rlhf.feedback`): a batch directory holds

* ``manifest.json``: ``{"batch_id", "created", "model_name", "versions", "generation", "n_items"}``;
* ``items.jsonl``: one ``{"item_id", "prompt", "response_a", "response_b", "source_a", "source_b"}``
  per line (the A/B order is already randomised per item by whoever wrote the batch).

:func:`push` creates a Label Studio project with the pairwise config of :mod:`rlhf.data.labelstudio`
and imports one task per item, ``{prompt, answer1: response_a, answer2: response_b, item_id,
batch_id}``: the sources (model identities) never reach Label Studio. Pushing the same batch again
finds its project (by the batch id in the description, or the title) and imports only the missing
items. :func:`pull` reads the project's tasks through the export endpoint and writes the a/b labels,
every one with its annotator's email, as preference rows to ``<out>/<batch_id>.labelstudio.jsonl``
(atomically); ties, both-bad, skips and empty annotations are counted in the summary it returns.

HTTP only through :class:`Client` (stdlib ``urllib``; the legacy token header ``Authorization:
Token <key>``). Server and input mistakes are one-line :class:`~rlhf.errors.UserError` s.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.data import labelstudio as fmt
from rlhf.errors import DataError, UserError

ITEM_FIELDS = ("item_id", "prompt", "response_a", "response_b", "source_a", "source_b")
MANIFEST_FIELDS = ("batch_id", "created", "model_name", "versions", "generation", "n_items")
EXPORT_SUFFIX = ".labelstudio.jsonl"
DESCRIPTION_MARK = "rlhf-batch:"
TOKEN_ENV = "LABEL_STUDIO_API_KEY"


# ---------------------------------------------------------------- the batch contract


@dataclass(frozen=True)
class Batch:
    path: Path
    manifest: dict[str, Any]
    items: list[dict[str, Any]]

    @property
    def batch_id(self) -> str:
        return self.manifest["batch_id"]


def read_batch(batch_dir: str | Path) -> Batch:
    """A labelling batch directory, checked against the contract (one-line errors naming file:line)."""
    d = Path(batch_dir)
    if not d.is_dir():
        raise UserError(f"batch directory does not exist: {d}", hint="give a directory written by `rlhf feedback sample`")
    mf_path, items_path = d / "manifest.json", d / "items.jsonl"
    for p in (mf_path, items_path):
        if not p.is_file():
            raise DataError(f"missing {p.name} in batch {d}", where=str(d),
                            hint="a batch holds manifest.json and items.jsonl")
    try:
        manifest = json.loads(mf_path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"not valid JSON ({e})", where=str(mf_path)) from None
    if not isinstance(manifest, dict):
        raise DataError("manifest must be a JSON object", where=str(mf_path))
    missing = [k for k in MANIFEST_FIELDS if k not in manifest]
    if missing:
        raise DataError(f"manifest is missing {', '.join(missing)}", where=str(mf_path))
    if not isinstance(manifest["batch_id"], str) or not manifest["batch_id"] or "/" in manifest["batch_id"]:
        raise DataError("'batch_id' must be a non-empty name without '/'", where=str(mf_path))
    items, seen = [], set()
    with open(items_path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{items_path}:{n}"
            if not raw.strip():
                continue
            try:
                item = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"not valid JSON ({e})", where=where) from None
            if not isinstance(item, dict):
                raise DataError("item must be a JSON object", where=where)
            for k in ITEM_FIELDS:
                if k not in item:
                    raise DataError(f"missing required field '{k}'", where=where)
            for k in ("item_id", "prompt", "response_a", "response_b"):
                if not isinstance(item[k], str):
                    raise DataError(f"field '{k}' must be text", where=where)
            if item["item_id"] in seen:
                raise DataError(f"duplicate item_id {item['item_id']!r}", where=where)
            seen.add(item["item_id"])
            items.append(item)
    if not items:
        raise DataError("batch has no items", where=str(items_path))
    if manifest["n_items"] != len(items):
        raise DataError(f"manifest says n_items={manifest['n_items']} but items.jsonl has {len(items)}",
                        where=str(mf_path), hint="the batch is incomplete or was edited; sample it again")
    return Batch(d, manifest, items)


def task_of(item: dict[str, Any], batch_id: str) -> dict[str, Any]:
    """The Label Studio task for one item: texts and ids only (model identity stays hidden). A conversation's
    turns ride along in ``prompt_messages`` (shown as the ``prompt`` text), so its labels keep them."""
    return {"data": {"prompt": item["prompt"], "answer1": item["response_a"], "answer2": item["response_b"],
                     "item_id": item["item_id"], "batch_id": batch_id,
                     **({"prompt_messages": item["prompt_messages"]} if item.get("prompt_messages") else {})}}


# ---------------------------------------------------------------- HTTP


def resolve_token(token: str | None) -> str:
    tok = token or os.environ.get(TOKEN_ENV)
    if not tok:
        raise UserError("no Label Studio API token", hint=f"pass --token or set ${TOKEN_ENV} "
                        "(Label Studio: Account & Settings -> Legacy Token)")
    return tok


class Client:
    """The few Label Studio REST calls we use; errors become one-line :class:`UserError` s."""

    def __init__(self, url: str, token: str, timeout: float = 60):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UserError(f"not a Label Studio URL: {url!r}", hint="e.g. http://127.0.0.1:8080")
        self.url = url.rstrip("/")
        self.token = resolve_token(token)
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Token {self.token}", "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace").strip().replace("\n", " ")
            if e.code in (401, 403):
                raise UserError(f"Label Studio refused the token ({e.code}) at {method} {path}",
                                hint=f"check --token / ${TOKEN_ENV}; legacy tokens must be enabled "
                                "(LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true or Organization settings)") from None
            raise UserError(f"Label Studio answered {e.code} to {method} {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"cannot reach Label Studio at {self.url} ({reason})",
                            hint="is it running? check the URL") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise UserError(f"Label Studio's answer to {method} {path} is not JSON",
                            hint="is the URL a Label Studio server?") from None

    def projects(self, title: str | None = None) -> list[dict[str, Any]]:
        out, page = [], 1
        while True:
            q = {"page": page, "page_size": 100, **({"title": title} if title else {})}
            ans = self.request("GET", "/api/projects/", query=q)
            results = ans.get("results", []) if isinstance(ans, dict) else ans
            out.extend(results)
            if not isinstance(ans, dict) or not ans.get("next"):
                return out
            page += 1

    def export(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project with its annotations (the JSON export, unfinished tasks included)."""
        ans = self.request("GET", f"/api/projects/{project_id}/export",
                           query={"exportType": "JSON", "download_all_tasks": "true"})
        if not isinstance(ans, list):
            raise UserError(f"Label Studio's export of project {project_id} is not a list of tasks")
        return ans

    def users(self) -> dict[int, str]:
        """User id -> email (the export names annotators by id)."""
        ans = self.request("GET", "/api/users/")
        rows = ans.get("results", []) if isinstance(ans, dict) else ans
        return {u["id"]: u.get("email") or u.get("username") or f"user-{u['id']}" for u in rows}

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]], poll_s: float = 0.5,
                     timeout_s: float = 300) -> int:
        ans = self.request("POST", f"/api/projects/{project_id}/import", body=tasks)
        if isinstance(ans, dict) and "import" in ans and "task_count" not in ans:  # editions that import async
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                st = self.request("GET", f"/api/projects/{project_id}/imports/{ans['import']}")
                if st.get("status") == "completed":
                    return int(st.get("task_count") or len(tasks))
                if st.get("status") == "failed":
                    raise UserError(f"Label Studio failed to import the tasks: {st.get('error')}")
                time.sleep(poll_s)
            raise UserError(f"Label Studio did not finish importing within {timeout_s:.0f}s")
        return int(ans.get("task_count", len(tasks))) if isinstance(ans, dict) else len(tasks)


# ---------------------------------------------------------------- push / pull


def _find_project(client: Client, batch_id: str, title: str) -> dict[str, Any] | None:
    mark = f"{DESCRIPTION_MARK} {batch_id}"
    for p in client.projects():
        if mark in (p.get("description") or "").splitlines() or p.get("title") == title:
            return p
    return None


def default_title(batch_id: str) -> str:
    return f"rlhf feedback {batch_id}"


def push(batch_dir: str | Path, url: str, token: str | None, project_title: str | None = None,
         overlap: int = 1) -> dict[str, Any]:
    """Create (or find) the batch's project and import its missing items; return ``{project_id, ...}``.

    ``overlap``: how many annotators Label Studio gives each task to (its ``maximum_annotations``;
    above 1 for agreement), set when the project is created.
    """
    if overlap < 1:
        raise UserError(f"overlap must be at least 1, got {overlap}")
    batch = read_batch(batch_dir)
    client = Client(url, token)
    title = project_title or default_title(batch.batch_id)
    project = _find_project(client, batch.batch_id, title)
    created = project is None
    if created:
        description = (f"Pairwise comparison of model responses (model identity hidden).\n"
                       f"{DESCRIPTION_MARK} {batch.batch_id}")
        project = client.request("POST", "/api/projects/", body={
            "title": title, "description": description, "label_config": fmt.LABEL_CONFIG,
            "show_skip_button": True, "maximum_annotations": overlap})
    pid = int(project["id"])
    have = {t.get("data", {}).get("item_id") for t in client.export(pid)} if not created else set()
    todo = [task_of(it, batch.batch_id) for it in batch.items if it["item_id"] not in have]
    imported = client.import_tasks(pid, todo) if todo else 0
    return {"project_id": pid, "title": project.get("title", title), "created": created, "imported": imported,
            "already_there": len(batch.items) - len(todo), "batch_id": batch.batch_id}


def resolve_project(client: Client, project: str | int) -> int:
    """A project id, or the title / batch id of a pushed project."""
    if isinstance(project, int) or str(project).isdigit():
        return int(project)
    found = _find_project(client, str(project), str(project)) or _find_project(
        client, str(project), default_title(str(project)))
    if found is None:
        raise UserError(f"no Label Studio project titled or marked {project!r}",
                        hint="give the project id that `push` printed")
    return int(found["id"])


def rows_from_tasks(tasks: list[dict[str, Any]], users: dict[int, str] | None = None,
                    where: str = "label studio") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Export rows (one per a/b label) and a summary of every judgement, from exported tasks."""
    rows: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    per_annotator: dict[str, Counter[str]] = {}
    for i, task in enumerate(tasks):
        at = f"{where} task {task.get('id', i)}"
        if not fmt.is_task(task):
            raise DataError("not a Label Studio task (needs 'data' and 'annotations')", where=at)
        texts = fmt.task_texts(task, at)
        data = task["data"]
        for j in fmt.task_judgements(task, at, users):
            counts[j.choice] += 1
            per_annotator.setdefault(j.annotator or "unknown", Counter())[j.choice] += 1
            pair = fmt.preference(texts, j.choice)
            if pair is None:
                continue
            rows.append({"prompt": data.get("prompt_messages") or texts["prompt"], "chosen": pair[0], "rejected": pair[1],
                         "annotator": j.annotator, "time": j.time, "batch_id": data.get("batch_id"),
                         "item_id": data.get("item_id")})
    summary = {"tasks": len(tasks), "labels": sum(counts.values()), "pairs": len(rows),
               **{k: counts.get(k, 0) for k in ("a", "b", "tie", "both_bad", "skip", "empty")},
               "per_annotator": {a: dict(c) for a, c in sorted(per_annotator.items())}}
    return rows, summary


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file atomically: a temporary file beside ``path``, flushed, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pull(project: str | int, url: str, token: str | None, out: str | Path = "data/raw/feedback",
         overwrite: bool = False) -> dict[str, Any]:
    """Read a project's labels; write ``<out>/<batch_id>.labelstudio.jsonl`` per batch; return the summary."""
    client = Client(url, token)
    pid = resolve_project(client, project)
    tasks = client.export(pid)
    try:
        users = client.users()
    except UserError:  # a token that may not list the organisation's users: annotators by id
        users = {}
    by_batch: dict[str, list[dict]] = {}
    for t in tasks:
        bid = t.get("data", {}).get("batch_id") if isinstance(t.get("data"), dict) else None
        if not isinstance(bid, str) or not bid or "/" in bid:
            raise DataError(f"task {t.get('id')} has no valid data.batch_id", where=f"project {pid}",
                            hint="pull reads projects made by `rlhf feedback push`")
        by_batch.setdefault(bid, []).append(t)
    if not by_batch:
        raise UserError(f"Label Studio project {pid} has no tasks", hint="push a batch to it first")
    planned = []
    for bid, ts in sorted(by_batch.items()):
        rows, summary = rows_from_tasks(ts, users, where=f"project {pid}")
        path = Path(out) / f"{bid}{EXPORT_SUFFIX}"
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        old = path.read_text(encoding="utf-8") if path.is_file() else None
        # no a/b label yet: no file (an empty one would stop `rlhf prepare`)
        state = "no a/b label" if not rows else "unchanged" if old == text else \
            "new" if old is None else "replaced"
        if state == "replaced" and not overwrite:  # refuse before writing anything
            raise UserError(f"{path} already exists with other labels",
                            hint="pass --overwrite to replace it with the project's current labels")
        planned.append((path, text, {"batch_id": bid, "file": str(path) if rows else None, "state": state,
                                     **summary}))
    for path, text, summary in planned:
        if summary["state"] in ("new", "replaced"):
            write_text_atomic(path, text)
    return {"project_id": pid, "batches": [s for _, _, s in planned]}
