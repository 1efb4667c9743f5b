"""`rlhf feedback ...`: the door to the human feedback loop (sample, serve, add-annotator, simulate, export, loop)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rlhf.errors import UserError

app = typer.Typer(no_args_is_help=True, help="The human feedback loop: sample pairs from the champion, people "
                  "label them, the labels become a new data version (docs/feedback.md).")

@app.callback()
def _quiet_downloads() -> None:
    """The human feedback loop (docs/feedback.md)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in our output


PARAMS = typer.Option(Path("params.yaml"), "--params", help="params file (its feedback: section)")
STORE = typer.Option(None, "--store", help="labels database (default: feedback.store)")


def _run(params: Path):
    from rlhf.config.resolve import RunConfig

    return RunConfig.from_file(params, missing_ok=True)


def _store(params: Path, store: Path | None):
    from rlhf.feedback.store import Store

    return Store(store or _run(params).section("feedback").store)


def _batches(paths: list[Path]):
    from rlhf.feedback.batch import load_batch

    if not paths:
        raise UserError("give at least one batch directory", hint="rlhf feedback sample writes one")
    return [load_batch(p) for p in paths]


@app.command("sample")
def sample_cmd(
    dataset: Path | None = typer.Option(None, "--dataset", help="prepared dataset: sample its held-out prompts"),
    prompts: Path | None = typer.Option(None, "--prompts", help="file of prompts (JSONL with 'prompt', or text)"),
    n: int | None = typer.Option(None, "--n", min=1, help="prompts in the batch (default: feedback.n_prompts)"),
    vs: str | None = typer.Option(None, "--vs", help="'challenger': champion vs challenger (default: two "
                                  "samples of the champion)"),
    seed: int | None = typer.Option(None, "--seed", help="seed (default: feedback.seed)"),
    out: Path | None = typer.Option(None, "--out", help="batches directory (default: feedback.batches_dir)"),
    params: Path = PARAMS,
):
    """Write a labelling batch: two responses per prompt from models:/<name>@champion (prints its directory)."""
    from rlhf.feedback.batch import sample_batch

    run = _run(params)
    fb = run.section("feedback")
    batch = sample_batch(reg_cfg=run.section("register"), fb_cfg=fb, model_cfg=run.section("model"),
                         batches_dir=out or fb.batches_dir, dataset=dataset, prompts_file=prompts, vs=vs,
                         n_prompts=n, seed=seed)
    typer.echo(f"batch {batch.batch_id}: {len(batch.items)} items ({batch.manifest['mode']}, versions "
               f"{batch.manifest['versions']}) in {batch.path}")


@app.command("add-annotator")
def add_annotator_cmd(name: str = typer.Argument(..., help="annotator id (recorded with every label)"),
                      admin: bool = typer.Option(False, "--admin", help="may see the admin page"),
                      store: Path | None = STORE, params: Path = PARAMS):
    """Create an annotator (or give it a new token) and print its access token (shown once)."""
    typer.echo(_store(params, store).add_annotator(name, admin=admin))


@app.command("serve")
def serve_cmd(batches: list[Path] = typer.Argument(None, help="batch directories to label"),
              batches_dir: Path | None = typer.Option(None, "--batches-dir", help="also serve every batch in "
                                                      "this directory (e.g. on the app's volume)"),
              host: str | None = typer.Option(None, "--host", help="bind address (default: feedback.host, "
                                              "127.0.0.1)"),
              port: int | None = typer.Option(None, "--port", help="port (default: feedback.port)"),
              overlap: int | None = typer.Option(None, "--overlap", min=1, help="labels per item"),
              store: Path | None = STORE, params: Path = PARAMS):
    """Serve the annotation app for BATCH... (annotators sign in with their token)."""
    from rlhf.feedback import app as feedback_app

    fb = _run(params).section("feedback")
    if overlap:
        fb.overlap = overlap
    paths = list(batches or [])
    if batches_dir is not None:
        if not batches_dir.is_dir():
            raise UserError(f"batches directory not found: {batches_dir}")
        paths += sorted(d for d in batches_dir.iterdir() if (d / "manifest.json").is_file())
    loaded = _batches(paths)
    st = _store(params, store)
    h, p = host or fb.host, fb.port if port is None else port
    typer.echo(f"annotation app on http://{h}:{p}/ ({sum(len(b.items) for b in loaded)} items, overlap "
               f"{fb.overlap}, labels in {st.path})")
    feedback_app.serve(st, loaded, fb, host=h, port=p)


@app.command("simulate")
def simulate_cmd(batch: list[Path] = typer.Option(..., "--batch", help="batch directory (repeatable)"),
                 annotators: int = typer.Option(3, "--annotators", help="simulated annotators (1-5)"),
                 url: str | None = typer.Option(None, "--url", help="a running app over the same --store "
                                                "(default: start one on 127.0.0.1)"),
                 overlap: int | None = typer.Option(None, "--overlap", min=1, help="labels per item"),
                 seed: int = typer.Option(0, "--seed"), store: Path | None = STORE, params: Path = PARAMS):
    """Let the demo's Bradley-Terry gold annotators label the batch through the app's HTTP API."""

    tokens, counts = _simulate(params, store, batch, annotators, url, overlap, seed)
    typer.echo("simulated labels: " + json.dumps(counts, sort_keys=True))


def _simulate(params, store, batch_paths, annotators, url, overlap, seed):
    from rlhf.feedback import app as feedback_app
    from rlhf.feedback import simulate

    fb = _run(params).section("feedback")
    if overlap:
        fb.overlap = overlap
    st = _store(params, store)
    tokens = {n: st.add_annotator(n) for n in simulate.sim_names(annotators)}
    if url:
        return tokens, simulate.simulate(url.rstrip("/"), tokens, seed=seed)
    with simulate.running_app(feedback_app.create_app(st, _batches(batch_paths), fb)) as base:
        return tokens, simulate.simulate(base, tokens, seed=seed)


@app.command("export")
def export_cmd(batch: Path = typer.Argument(..., help="batch directory"),
               out: Path | None = typer.Option(None, "--out", help="export directory (default: "
                                               "feedback.export_dir, data/raw/feedback)"),
               allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="export although items "
                                                     "lack labels (a batch is exported only once)"),
               dvc: bool = typer.Option(False, "--dvc", help="then record data/raw as a new DVC data version"),
               commit: bool = typer.Option(False, "--commit", help="with --dvc: also git-commit data.dvc"),
               dvc_file: Path = typer.Option(Path("data.dvc"), "--dvc-file"),
               overlap: int | None = typer.Option(None, "--overlap", min=1),
               store: Path | None = STORE, params: Path = PARAMS):
    """Labels of BATCH -> preference rows in data/raw/feedback/<batch_id>.jsonl (+ unpaired labels, report)."""
    from rlhf.feedback import export

    fb = _run(params).section("feedback")
    (b,) = _batches([batch])
    res = export.export(_store(params, store), b, out or fb.export_dir, overlap=overlap or fb.overlap,
                        allow_incomplete=allow_incomplete)
    typer.echo(f"exported {res['pairs']} preference pairs ({res['n_labels']} labels: "
               f"{json.dumps(res['choices'], sort_keys=True)}) to {res['path']}")
    if dvc or commit:
        md5 = export.record_data_version(dvc_file, commit=commit, batch_id=b.batch_id)
        typer.echo(f"new data version {md5[:8]} recorded in {dvc_file}" + (" and committed" if commit else "")
                   + "; `rlhf retrain --local` will train on it")
    else:
        typer.echo("next: `dvc add data/raw` (this project: `dvc commit data.dvc`, or rerun with --dvc)")


@app.command("loop")
def loop_cmd(rounds: int = typer.Option(2, "--rounds", min=1),
             local: bool = typer.Option(False, "--local", help="retrain here (rlhf retrain --local)"),
             prompts: Path | None = typer.Option(None, "--prompts", help="prompts file (default: "
                                                 "data/raw/prompts.jsonl)"),
             dataset: Path | None = typer.Option(None, "--dataset", help="sample its held-out prompts instead"),
             annotators: int = typer.Option(3, "--annotators"), n: int | None = typer.Option(None, "--n", min=1),
             seed: int = typer.Option(0, "--seed"),
             runs_dir: Path = typer.Option(Path("runs"), "--runs-dir"),
             dvc_file: Path = typer.Option(Path("data.dvc"), "--dvc-file"),
             param: list[str] = typer.Option([], "--param", "-p", help="pipeline parameter NAME=VALUE"),
             store: Path | None = STORE, params: Path = PARAMS):
    """sample -> simulated labels -> export (+ new data version) -> rlhf retrain --local, ROUNDS times."""
    from rlhf.feedback import loop

    if not local:
        raise UserError("rlhf feedback loop needs --local (the retrain runs here)",
                        hint="on a cluster run the commands one by one (docs/feedback.md)")
    loop.run_loop(rounds=rounds, params=params, prompts=prompts, dataset=dataset, annotators=annotators, n=n,
                  seed=seed, runs_dir=runs_dir, dvc_file=dvc_file, param=param, store=store, echo=typer.echo)


__all__ = ["app"]


# Label Studio, for teams that already label there (rlhf.feedback.labelstudio)
from rlhf.feedback.labelstudio_cli import pull_cmd, push_cmd  # noqa: E402

app.command("push")(push_cmd)
app.command("pull")(pull_cmd)
