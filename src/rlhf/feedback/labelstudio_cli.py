"""`rlhf feedback push|pull --label-studio URL`: a labelling batch to a Label Studio project and its labels back."""

from __future__ import annotations

import json
from pathlib import Path

import typer

URL = typer.Option(..., "--url", "--label-studio", help="Label Studio base URL, e.g. http://127.0.0.1:8080")
TOKEN = typer.Option(None, "--token", help="API token (legacy token); default: $LABEL_STUDIO_API_KEY",
                     show_default=False)


def push_cmd(batch: Path = typer.Argument(..., help="batch directory (manifest.json + items.jsonl)"),
             url: str = URL, token: str | None = TOKEN,
             title: str | None = typer.Option(None, "--title", help="project title (default: rlhf feedback <batch id>)"),
             overlap: int = typer.Option(1, "--overlap", help="annotators per task (Label Studio's maximum "
                                         "annotations; >1 for agreement), for a new project")):
    """Create a pairwise-comparison project for the batch and import its items (again: only missing ones)."""
    from rlhf.feedback import labelstudio

    res = labelstudio.push(batch, url, token, project_title=title, overlap=overlap)
    typer.echo(f"project {res['project_id']} ({res['title']}): {res['imported']} tasks imported, "
               f"{res['already_there']} already there; open {url.rstrip('/')}/projects/{res['project_id']}")


def pull_cmd(project: str = typer.Argument(..., help="project id (or the batch id / title of a pushed project)"),
             url: str = URL, token: str | None = TOKEN,
             out: Path = typer.Option(Path("data/raw/feedback"), "--out", help="directory for <batch>.labelstudio.jsonl"),
             overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing file with other labels")):
    """Read the project's labels and write the a/b ones as preference pairs (ties, both bad, skips counted)."""
    from rlhf.feedback import labelstudio

    res = labelstudio.pull(project, url, token, out, overwrite=overwrite)
    for b in res["batches"]:
        where = f"{b['file']} ({b['state']})" if b["file"] else "no file (no a/b label yet)"
        typer.echo(f"batch {b['batch_id']}: {b['pairs']} pairs -> {where}; "
                   f"tie {b['tie']}, both bad {b['both_bad']}, skipped {b['skip']}, empty {b['empty']}")
    typer.echo("summary: " + json.dumps(res, sort_keys=True))
