"""`rlhf feedback export`: a batch's labels -> preference rows that prepare reads, as a new data version.

Per batch, in ``feedback.export_dir`` (``data/raw/feedback``):

* ``<batch_id>.jsonl``: one preference row per label with a winner: ``{"prompt", "chosen", "rejected",
  "annotator", "time", "batch_id", "item_id", "shown_left"}`` (``shown_left``: which batch response,
  ``a`` or ``b``, the annotator saw on the left; ``prompt``: the item's ``prompt_messages`` when it has
  them, else its text);
* ``<batch_id>.unpaired.ndjson``: ties, both-bad and skips (not pairs; prepare does not read it);
* ``<batch_id>.report.md`` / ``.report.html``: labels per annotator, agreement, time per label and,
  for a champion-vs-challenger batch, the head-to-head result with a 95% Wilson interval.

A batch is exported once: an existing file is never rewritten. The files are written under
temporary names and renamed, the preference file last, so an interrupted export leaves nothing a
later ``prepare`` would read. ``record=True`` then records the new data version (``dvc commit`` of
``data.dvc``, what ``dvc add data/raw`` does for this project's pointer) and ``commit=True`` also
commits ``data.dvc`` to git with a message naming the batch.
"""

from __future__ import annotations

import html
import json
import os
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.feedback import agreement
from rlhf.feedback.batch import Batch
from rlhf.feedback.store import Store


def rows_for(batch: Batch, labels: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    items = {it["item_id"]: it for it in batch.items}
    pairs, other = [], []
    for r in labels:
        it = items[r["item_id"]]
        base = {"batch_id": batch.batch_id, "item_id": r["item_id"], "annotator": r["annotator"], "time": r["updated"],
                "shown_left": "b" if r["flipped"] else "a"}
        if r["winner"] in ("a", "b"):
            win, lose = ("response_a", "response_b") if r["winner"] == "a" else ("response_b", "response_a")
            # a conversation goes back as its turns, which prepare reads as a message-list prompt
            pairs.append({"prompt": it.get("prompt_messages") or it["prompt"], "chosen": it[win], "rejected": it[lose],
                          **base})
        else:
            other.append({"prompt": it["prompt"], "choice": r["choice"], "reason": r["reason"], **base})
    return pairs, other


def summary(batch: Batch, labels: list[dict[str, Any]]) -> dict[str, Any]:
    per: dict[str, Counter] = defaultdict(Counter)
    secs: dict[str, list[float]] = defaultdict(list)
    for r in labels:
        per[r["annotator"]][r["choice"]] += 1
        if r["seconds"] is not None:
            secs[r["annotator"]].append(r["seconds"])
    out: dict[str, Any] = {
        "batch_id": batch.batch_id, "n_items": len(batch.items), "n_labels": len(labels),
        "pairs": sum(1 for r in labels if r["winner"]), "choices": dict(Counter(r["choice"] for r in labels)),
        "per_annotator": {a: {"labels": sum(c.values()), **dict(c),
                              "seconds_per_label": (sum(secs[a]) / len(secs[a])) if secs[a] else None}
                          for a, c in sorted(per.items())},
        "agreement": agreement.agreement(labels), "mode": batch.manifest.get("mode")}
    if batch.manifest.get("mode", "").startswith("champion-vs-"):
        decided = [r for r in labels if r["winner"]]
        wins_b = sum(r["winner"] == "b" for r in decided)
        lo, hi = agreement.wilson(wins_b, len(decided))
        out["head_to_head"] = {"a": batch.manifest["versions"]["a"], "b": batch.manifest["versions"]["b"],
                               "b_win_rate": wins_b / len(decided) if decided else None, "ci95": [lo, hi],
                               "n": len(decided)}
    return out


def report_markdown(s: dict[str, Any]) -> str:
    lines = [f"# Feedback batch {s['batch_id']}", "",
             f"{s['n_labels']} labels on {s['n_items']} items; {s['pairs']} became preference pairs; "
             f"choices: {json.dumps(s['choices'], sort_keys=True)}", "",
             "| annotator | labels | left | right | tie | both bad | skip | s/label |", "|---|---|---|---|---|---|---|---|"]
    for a, c in s["per_annotator"].items():
        spl = f"{c['seconds_per_label']:.1f}" if c["seconds_per_label"] is not None else "-"
        lines.append(f"| {a} | {c['labels']} | {c.get('left', 0)} | {c.get('right', 0)} | {c.get('tie', 0)} | "
                     f"{c.get('both_bad', 0)} | {c.get('skip', 0)} | {spl} |")
    ag = s["agreement"]
    lines += ["", f"Agreement: {ag['n_items']} items with 2+ labels" + (
        f", percent agreement {ag['percent']:.3f}, Cohen's kappa {ag['kappa']:.3f}" if ag["n_items"] else "")]
    if "head_to_head" in s:
        h = s["head_to_head"]
        rate = "-" if h["b_win_rate"] is None else f"{h['b_win_rate']:.3f}"
        lines += ["", f"Head to head: v{h['b']} beat v{h['a']} in {rate} of {h['n']} decided labels "
                      f"(95% Wilson interval {h['ci95'][0]:.3f} to {h['ci95'][1]:.3f})"]
    return "\n".join(lines) + "\n"


def report_html(md: str) -> str:
    return ("<!doctype html><meta charset='utf-8'><title>feedback report</title><pre>" + html.escape(md) +
            "</pre>\n")


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True, sort_keys=True) + "\n" for r in rows)  # see items_bytes


def export(store: Store, batch: Batch, export_dir: str | Path, *, overlap: int = 1,
           allow_incomplete: bool = False) -> dict[str, Any]:
    """Write the batch's export files (see the module docstring); returns the summary and paths."""
    out_dir = Path(export_dir)
    main = out_dir / f"{batch.batch_id}.jsonl"
    if main.exists():
        raise UserError(f"batch {batch.batch_id} was exported already: {main}",
                        hint="a batch is exported once; sample a new batch for new labels")
    labels = store.labels([batch.batch_id])
    counts = Counter(r["item_id"] for r in labels)
    missing = sum(1 for it in batch.items if counts[it["item_id"]] < overlap)
    if not labels:
        raise UserError(f"batch {batch.batch_id} has no labels in {store.path}",
                        hint="label it first (rlhf feedback serve / simulate), or pass the right --store")
    if missing and not allow_incomplete:
        raise UserError(f"batch {batch.batch_id}: {missing} of {len(batch.items)} items have fewer than {overlap} "
                        "label(s); nothing exported", hint="finish labelling, or --allow-incomplete to export "
                        "what there is (the batch cannot be exported again)")
    pairs, other = rows_for(batch, labels)
    s = summary(batch, labels)
    md = report_markdown(s)
    files = {out_dir / f"{batch.batch_id}.unpaired.ndjson": _jsonl(other),
             out_dir / f"{batch.batch_id}.report.md": md,
             out_dir / f"{batch.batch_id}.report.html": report_html(md),
             main: _jsonl(pairs)}  # last: its presence means the export is complete
    out_dir.mkdir(parents=True, exist_ok=True)
    tmps = []
    try:
        for path, text in files.items():
            tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            tmps.append((tmp, path))
        for tmp, path in tmps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
    return {**s, "path": str(main), "files": [str(p) for p in files]}


def record_data_version(dvc_file: str | Path = "data.dvc", *, commit: bool = False, batch_id: str = "") -> str:
    """Record data/raw as a new DVC data version (``dvc commit`` of ``dvc_file``); optionally git-commit it."""
    from rlhf.mlops import versioning

    dvc_file = Path(dvc_file)
    if not dvc_file.is_file():
        raise UserError(f"DVC pointer file not found: {dvc_file}", hint="run from the project root")
    versioning.dvc("commit", "-f", "-q", dvc_file.name, cwd=dvc_file.parent)
    md5 = versioning.data_hash(dvc_file)
    if commit:
        for args in (["git", "add", dvc_file.name], ["git", "commit", "-q", "-m",
                                                     f"data: human feedback batch {batch_id}", "--", dvc_file.name]):
            proc = subprocess.run(args, cwd=dvc_file.parent, text=True, capture_output=True)
            if proc.returncode:
                raise UserError(f"`{' '.join(args[:3])}` failed: {(proc.stderr or proc.stdout).strip()[-200:]}")
    return md5


__all__ = ["export", "record_data_version", "rows_for", "summary"]
