"""The ``rlhf`` command line: one thin door into the stage functions of this package.

Every stage command reads its section of ``params.yaml`` (typed, validated),
calls the stage function, and prints its metrics. User mistakes print one line
and exit non-zero; see :mod:`rlhf.errors`.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from pathlib import Path

import click
import typer

from rlhf.errors import UserError
from rlhf.pipeline.stages import CHAMPION, STAGES, Stage
from rlhf.process import Interrupted, raise_on_signals
from rlhf.redact import install_log_redaction

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="RLHF pipeline: prepare -> validate -> sft -> reward -> ppo -> evaluate -> register.",
)

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params file with one section per stage")
#: stage and registry commands: ./params.yaml when there is one, else the built-in defaults; a file given
#: with --params must exist
STAGE_PARAMS = typer.Option(None, "--params", help="params file with one section per stage (default: "
                            "./params.yaml if present, else the built-in defaults)")


def _params_file(params: Path | None) -> Path | None:
    """The params file a stage or registry command reads: --params (must exist), ./params.yaml, or None."""
    if params is None:
        default = Path("params.yaml")
        return default if default.is_file() else None
    if not params.is_file():
        from rlhf.errors import ConfigError

        raise ConfigError(f"params file not found: {params}", where="--params",
                          hint="give an existing file, or leave --params out for ./params.yaml / the defaults")
    return params


def _print_metrics(name: str, metrics: dict) -> None:
    typer.echo(f"{name}: " + json.dumps(metrics, sort_keys=True, default=str))


@app.command("demo-data")
def demo_data_cmd(
    out: Path = typer.Option(Path("data/raw"), help="directory to write the demo JSONL files to"),
    seed: int = typer.Option(0, help="generator seed (the committed data.dvc uses 0)"),
):
    """Generate the bundled demo data set (deterministic: same bytes every time)."""
    from rlhf.data import demo

    counts = demo.generate(out, seed=seed)
    _print_metrics(f"demo data written to {out}", counts)


@app.command("fetch-data")
def fetch_data_cmd(
    target: Path = typer.Option(Path("data.dvc"), help="the DVC pointer file of the raw data"),
):
    """Get data/raw on a fresh clone: dvc pull, or regenerate the demo data and check its hash."""
    from rlhf.mlops import versioning

    typer.echo(versioning.fetch_data(target))


# ---------------------------------------------------------------------------- the stage commands


def _stage_command(s: Stage):
    """``rlhf <stage>``: options from the stage table, then :func:`rlhf.pipeline.steps.run_stage`."""

    def command(**kw):
        from rlhf.config.resolve import RunConfig
        from rlhf.pipeline.steps import run_stage

        params, out = _params_file(kw.pop("params")), kw.pop("out")
        run = RunConfig.from_file(params)
        inputs = {i.name: kw.pop(i.name) for i in s.inputs}
        if kw.pop("champion_from_registry", False):
            if inputs.get("champion") is not None:
                raise UserError("give either --champion DIR or --champion-from-registry, not both",
                                where=f"rlhf {s.name}")
            inputs["champion"] = CHAMPION
        run_id = kw.pop("pipeline_run_id", None) or ""
        if out is None:
            raise UserError("--out is required", where=f"rlhf {s.name}")
        metrics = run_stage(s.name, inputs, out, run, run_id=run_id)
        if int(os.environ.get("RANK", "0")) == 0:
            line = s.done_line(str(out), metrics)
            typer.echo(line if s.output.file else f"{line}: " + json.dumps(metrics, sort_keys=True, default=str))

    def option(name, annotation, default, flags, help, envvar=None):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Option(default, *flags, help=help, envvar=envvar))

    params = [option(i.name, Path | None if i.optional else Path, Path(i.default) if i.default else None,
                     i.flags, i.help) for i in s.inputs]
    params += [option(o.name, o.type | None if o.default is None else o.type, o.default, o.flags, o.help,
                      o.envvar) for o in s.options]
    params += [option("out", Path, Path(s.output.default), ("--out",), s.output.help),
               inspect.Parameter("params", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                                 default=STAGE_PARAMS)]
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = s.help
    command.__name__ = f"{s.name}_cmd"
    return command


for _s in STAGES:
    app.command(_s.name)(_stage_command(_s))


tracking_app = typer.Typer(no_args_is_help=True, help="MLflow tracking: resend what an outage left unsent; accounts.")
app.add_typer(tracking_app, name="tracking")


@tracking_app.command("flush")
def tracking_flush_cmd(directory: Path | None = typer.Option(None, "--dir", help="where stages saved what MLflow "
                                                             "did not store (default: $RLHF_UNSENT_DIR or "
                                                             "./mlflow-unsent)")):
    """Send the metrics and tags saved in mlflow-unsent/ during an MLflow outage (each value once)."""
    from rlhf.mlops import tracking

    if not tracking.enabled():
        raise UserError("tracking is off (RLHF_TRACKING=off): nothing to send to")
    n = tracking.resend_unsent(directory)
    typer.echo(f"sent {n['rows']} value(s) from {n['files']} file(s)"
               + (f"; {n['kept']} file(s) kept (see the warnings)" if n["kept"] else ""))


@tracking_app.command("accounts")
def tracking_accounts_cmd(config: Path = typer.Option(..., "--config", help="accounts file (YAML: experiments, "
                                                      "registered_models, accounts)"),
                          wait: float = typer.Option(0, "--wait", help="seconds to wait for the server first")):
    """Create or update the MLflow users and their permissions (as the admin in MLFLOW_TRACKING_USERNAME)."""
    from rlhf.mlops import access, tracking

    cfg = access.load_config(config)
    if wait:
        access.wait_for_server(tracking.tracking_uri(), wait)
    changes = access.apply_accounts(cfg)
    typer.echo("\n".join(changes) if changes else "MLflow accounts: nothing to change")


models_app = typer.Typer(no_args_is_help=True, help="The model registry: list, promote, rollback, generate.")
app.add_typer(models_app, name="models")


def _register_cfg(params: Path | None, name: str | None):
    from rlhf.config import RegisterConfig, load_stage

    return load_stage(RegisterConfig, "register", _params_file(params), overrides={"model_name": name})


MODEL_NAME = typer.Option(None, "--name", help="registered model name (default: register.model_name)")


@models_app.command("list")
def models_list_cmd(params: Path | None = STAGE_PARAMS, name: str | None = MODEL_NAME,
                    as_json: bool = typer.Option(False, "--json", help="print JSON rows")):
    """Versions with aliases, gate, key metrics, data hash and pipeline run (newest first)."""
    from rlhf.mlops import registry

    cfg = _register_cfg(params, name)
    rows = registry.list_versions(cfg)
    typer.echo(json.dumps(rows, indent=1) if as_json else registry.format_versions(rows, cfg))


@models_app.command("promote")
def models_promote_cmd(version: int = typer.Argument(..., help="version to make champion"),
                       reason: str = typer.Option(..., "--reason", help="why (recorded as a tag)"),
                       params: Path | None = STAGE_PARAMS, name: str | None = MODEL_NAME):
    """Make a version the champion by hand (the reason is recorded)."""
    from rlhf.mlops import registry

    typer.echo(registry.promote(version, reason, _register_cfg(params, name))["message"])


@models_app.command("rollback")
def models_rollback_cmd(reason: str | None = typer.Option(None, "--reason", help="why (recorded as a tag)"),
                        params: Path | None = STAGE_PARAMS, name: str | None = MODEL_NAME):
    """Move champion back to the previous champion."""
    from rlhf.mlops import registry

    typer.echo(registry.rollback(_register_cfg(params, name), reason)["message"])


@models_app.command("generate")
def models_generate_cmd(prompt: str = typer.Argument(..., help="the user's message"),
                        alias: str = typer.Option("champion", help="which alias to load"),
                        max_new_tokens: int | None = typer.Option(None, help="default: register.max_new_tokens"),
                        temperature: float | None = typer.Option(None, help="default: register.temperature"),
                        seed: int | None = typer.Option(None, help="sampling seed (default: register.seed)"),
                        params: Path | None = STAGE_PARAMS, name: str | None = MODEL_NAME):
    """Load models:/<name>@champion from MLflow and print a completion of the prompt."""
    from rlhf.mlops import registry

    typer.echo(registry.generate(prompt, _register_cfg(params, name), alias=alias, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed))


@models_app.command("champion-path")
def models_champion_path_cmd(params: Path | None = STAGE_PARAMS, name: str | None = MODEL_NAME):
    """Download the champion policy (cached) and print its directory, for evaluate --champion; empty if none."""
    from rlhf.mlops import registry

    path = registry.champion_dir(_register_cfg(params, name))
    typer.echo(str(path) if path else "")



# ---------------------------------------------------------------------------- backups of MLflow's stores

backup_app = typer.Typer(no_args_is_help=True, help="Back up and restore MLflow's database and artifact store "
                         "(docs/deploy.md, Backup and restore).")
app.add_typer(backup_app, name="backup")
BACKEND_URI = typer.Option(None, "--backend-uri", envvar="MLFLOW_BACKEND_STORE_URI", show_envvar=False,
                           help="MLflow's database: postgresql://USER@HOST:PORT/DB (password: $PGPASSWORD) or "
                                "sqlite:///FILE (default: $MLFLOW_BACKEND_STORE_URI, else a database "
                                "$MLFLOW_TRACKING_URI, else ./mlflow.db)")
ARTIFACTS_URI = typer.Option(None, "--artifacts-uri", envvar="MLFLOW_ARTIFACTS_DESTINATION", show_envvar=False,
                             help="the artifact store: s3://BUCKET or s3://BUCKET/PREFIX (endpoint: $MLFLOW_S3_ENDPOINT_URL) "
                                  "or a directory (default: $MLFLOW_ARTIFACTS_DESTINATION; ./mlruns with SQLite)")
PG_BIN = typer.Option(None, "--pg-bin", envvar="RLHF_PG_BIN", show_envvar=False,
                      help="directory of pg_dump / pg_restore / psql (default: PATH, /usr/lib/postgresql/*/bin)")
BACKUP_TIMEOUT = typer.Option(3600.0, "--timeout", help="seconds pg_dump / pg_restore may take")


@backup_app.command("create")
def backup_create_cmd(out: Path | None = typer.Option(None, "--out", help="new (or empty) directory to write"),
                      into: Path | None = typer.Option(None, "--into", help="write DIR/mlflow-<UTC time> instead"),
                      keep: int | None = typer.Option(None, "--keep", min=1, help="with --into: keep only the "
                                                      "newest N backups there"),
                      backend_uri: str | None = BACKEND_URI, artifacts_uri: str | None = ARTIFACTS_URI,
                      pg_bin: str | None = PG_BIN, timeout: float = BACKUP_TIMEOUT):
    """Dump MLflow's database and copy its artifacts into a directory with a hashed manifest."""
    from rlhf.mlops import backup

    if (out is None) == (into is None):
        raise UserError("give one of --out DIR and --into DIR", where="rlhf backup create")
    if keep is not None and into is None:
        raise UserError("--keep needs --into", where="rlhf backup create")
    if out is not None:
        manifest, deleted = backup.backup(out, backend_uri, artifacts_uri, pg_bin=pg_bin, timeout=timeout), []
    else:
        out, manifest, deleted = backup.backup_into(into, backend_uri, artifacts_uri, keep=keep, pg_bin=pg_bin,
                                                    timeout=timeout)
    typer.echo(f"backup written to {out}: {backup.describe(manifest)}")
    for p in deleted:
        typer.echo(f"deleted old backup {p}")


@backup_app.command("verify")
def backup_verify_cmd(directory: Path = typer.Argument(..., help="a directory written by `rlhf backup create`")):
    """Check every file of a backup against its manifest's sha256."""
    from rlhf.mlops import backup

    typer.echo(f"backup {directory} is intact: {backup.describe(backup.verify(directory))}")


@backup_app.command("restore")
def backup_restore_cmd(directory: Path = typer.Argument(..., help="a directory written by `rlhf backup create`"),
                       backend_uri: str | None = BACKEND_URI, artifacts_uri: str | None = ARTIFACTS_URI,
                       force: bool = typer.Option(False, "--force", help="replace a database / artifact store "
                                                  "that already holds MLflow data"),
                       pg_bin: str | None = PG_BIN, timeout: float = BACKUP_TIMEOUT):
    """Restore a backup (stop the MLflow server first); checks the hashes before writing anything."""
    from rlhf.mlops import backup

    r = backup.restore(directory, backend_uri, artifacts_uri, force=force, pg_bin=pg_bin, timeout=timeout)
    typer.echo(f"restored {directory} into {r['backend']} and {r['artifacts']}: {r['runs']} run(s), "
               f"{r['registered_models']} registered model(s), {r['model_versions']} version(s), "
               f"{r['files']} artifact file(s)")



# ---------------------------------------------------------------------------- the human feedback loop

from rlhf.feedback.commands import app as feedback_app  # noqa: E402

app.add_typer(feedback_app, name="feedback")

# ---------------------------------------------------------------------------- the pipeline (KFP)

PIPELINE_PARAM = typer.Option([], "--param", "-p", help="pipeline parameter NAME=VALUE (repeatable), e.g. "
                              "-p sft_max_steps=20; `rlhf compile` + the YAML header list them all")
SET_FIELD = typer.Option([], "--set", help="any config field SECTION.FIELD=VALUE (repeatable), e.g. --set "
                         "ppo.total_steps=5 (the pipeline parameter `overrides`)")
PROFILE = typer.Option(None, help="params profile (default: $RLHF_PROFILE, else params.yaml's `profile:` on "
                       "this machine, its `cluster_profile:` on a cluster; 'none': the base sections)")
PIPELINE_FILE = typer.Option(None, "--pipeline", help="compiled pipeline YAML (default: compile now)")
IMAGE_OPT = typer.Option(None, "--image", envvar="RLHF_IMAGE", help="component image (CPU steps)")
GPU_IMAGE_OPT = typer.Option(None, "--gpu-image", envvar="RLHF_GPU_IMAGE",
                             help="image of GPU steps (default: the CPU image's tag + '-cuda')")
HOST = typer.Option(..., "--host", envvar="KFP_HOST", help="KFP API endpoint (token: $KFP_TOKEN)")
EXPERIMENT = typer.Option("rlhf", help="KFP experiment")
SERVICE_ACCOUNT = typer.Option(None, "--service-account", help="service account of the run's pods")
NAMESPACE = typer.Option(None, "--namespace", help="KFP namespace (multi-user Kubeflow)")


@app.command("run")
def run_cmd(
    raw: Path = typer.Option(Path("data/raw"), help="raw data directory (`make data` fetches it)"),
    params: Path = PARAMS,
    profile: str | None = PROFILE,
    runs_dir: Path = typer.Option(Path("runs"), help="where run directories are created"),
    param: list[str] = PIPELINE_PARAM,
    set_fields: list[str] = SET_FIELD,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show everything the steps print"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="only stage lines and the summary"),
    threads: int | None = typer.Option(None, min=1, help="CPU threads per step (OMP_NUM_THREADS); 1 is "
                                       "fastest for the tiny model on a busy machine"),
    containers: bool = typer.Option(False, "--containers", help="run every step in the component image "
                                    "(KFP's DockerRunner; `make image` builds it)"),
    image: str | None = typer.Option(None, "--image", envvar="RLHF_IMAGE",
                                     help="the image of --containers (default: the pipeline's)"),
    resume: bool = typer.Option(False, "--resume", help="continue the newest run directory under --runs-dir "
                                "(or --run-dir): reuse its finished stages, resume training from checkpoints"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="the run directory --resume continues"),
):
    """Run the whole pipeline here with the KFP local runner (CPU, demo data); prints a summary.

    After an interruption (Ctrl-C, kill, a crash), `rlhf run --resume` with the same inputs continues the
    run: stages that finished are reused, the interrupted training stage resumes from its checkpoint."""
    from rlhf.config import resolve
    from rlhf.pipeline import local as pipeline_run

    result = pipeline_run.run_local(raw=raw, params=params, profile=profile, runs_dir=runs_dir,
                                    parameters=resolve.parse_assignments(param),
                                    overrides=resolve.dotted_overrides(set_fields), verbose=verbose,
                                    quiet=quiet, threads=threads, containers=containers, image=image,
                                    resume=(run_dir or True) if (resume or run_dir) else None)
    typer.echo(pipeline_run.format_summary(result))


def _kfp_call(fn, *args, **kwargs):
    from rlhf.pipeline import remote

    return remote.kfp_call(fn, *args, **kwargs)


def _run_parameters(params: Path, profile: str | None, param: list[str], set_fields: list[str],
                    data_revision: str | None, data_hash: str | None) -> dict:
    from rlhf.config import resolve
    from rlhf.pipeline import remote

    return remote.run_parameters(params, profile, resolve.parse_assignments(param),
                                       resolve.dotted_overrides(set_fields), data_revision, data_hash)


@app.command("compile")
def compile_cmd(
    out: Path = typer.Option(Path("pipeline.yaml"), "--out", "-o", help="where the pipeline YAML goes"),
    image: str | None = IMAGE_OPT,
    gpu_image: str | None = GPU_IMAGE_OPT,
    params: Path = PARAMS,
):
    """Compile the pipeline to KFP YAML (IR + Kubernetes platform spec): the deployable artifact."""
    from rlhf.pipeline import dag as rlhf_pipeline

    text = params.read_text(encoding="utf-8") if params.exists() else ""
    path = rlhf_pipeline.compile_pipeline(out, image=image, gpu_image=gpu_image, params_yaml=text)
    typer.echo(f"pipeline written to {path} ({path.stat().st_size:,} bytes)")


@app.command("submit")
def submit_cmd(
    host: str = HOST,
    pipeline_file: Path | None = PIPELINE_FILE,
    data_revision: str | None = typer.Option(None, help="data/code revision recorded with the run "
                                             "(default: git HEAD)"),
    data_hash: str | None = typer.Option(None, help="DVC md5 of data/raw (default: from data.dvc)"),
    params: Path = PARAMS,
    profile: str | None = PROFILE,
    param: list[str] = PIPELINE_PARAM,
    set_fields: list[str] = SET_FIELD,
    experiment: str = EXPERIMENT,
    run_name: str | None = typer.Option(None, help="display name (default: rlhf <revision> <time>)"),
    service_account: str | None = SERVICE_ACCOUNT,
    namespace: str | None = NAMESPACE,
    image: str | None = IMAGE_OPT,
    gpu_image: str | None = GPU_IMAGE_OPT,
    wait: bool = typer.Option(False, "--wait", help="follow the run to its end, printing step states"),
    poll: float = typer.Option(30.0, help="seconds between status polls with --wait"),
    timeout: float = typer.Option(6 * 3600, help="give up waiting after this many seconds"),
    summary_file: Path | None = typer.Option(None, help="with --wait: append a Markdown summary (gate "
                                             "decision) to this file, e.g. $GITHUB_STEP_SUMMARY"),
):
    """Create a run of the pipeline on a Kubeflow Pipelines endpoint (token from $KFP_TOKEN)."""
    from rlhf.pipeline import remote

    values = _run_parameters(params, profile, param, set_fields, data_revision, data_hash)
    remote.submit_remote(host, values, pipeline_file=pipeline_file, image=image, gpu_image=gpu_image,
                               experiment=experiment, run_name=run_name, service_account=service_account,
                               namespace=namespace, wait=wait, poll=poll, timeout=timeout,
                               summary_file=summary_file, echo=typer.echo)


@app.command("schedule")
def schedule_cmd(
    host: str = HOST,
    cron: str = typer.Option(..., "--cron", help="cron schedule; KFP form has seconds first (`0 0 3 * * *`), "
                             "a 5-field crontab gets 0 seconds"),
    name: str = typer.Option("rlhf-recurring", help="recurring run name (the key that makes this idempotent)"),
    pipeline_file: Path | None = PIPELINE_FILE,
    params: Path = PARAMS,
    profile: str | None = PROFILE,
    param: list[str] = PIPELINE_PARAM,
    set_fields: list[str] = SET_FIELD,
    data_hash: str | None = typer.Option(None, help="DVC md5 of data/raw (default: from data.dvc)"),
    experiment: str = EXPERIMENT,
    service_account: str | None = SERVICE_ACCOUNT,
    namespace: str | None = NAMESPACE,
    image: str | None = IMAGE_OPT,
    gpu_image: str | None = GPU_IMAGE_OPT,
):
    """Create or update the recurring run (max concurrency 1, no catch-up); running it again changes nothing."""
    from rlhf.pipeline import kfp_client as kfp

    values = _run_parameters(params, profile, param, set_fields, None, data_hash)

    spec = kfp.compiled_spec(pipeline_file, image=image, gpu_image=gpu_image, params_yaml=values["params_yaml"])
    api = kfp.KfpClient(host, namespace=namespace)
    _kfp_call(kfp.schedule, api, pipeline_spec=spec, parameters=values, experiment=experiment, name=name,
              cron=cron, service_account=service_account, echo=typer.echo)


@app.command("retrain")
def retrain_cmd(
    local: bool = typer.Option(False, "--local", help="if needed, run the pipeline here (as `rlhf run`)"),
    host: str | None = typer.Option(None, "--host", help="if needed, submit a run to this KFP API (as "
                                    "`rlhf submit`; token: $KFP_TOKEN)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only decide and print why; start nothing"),
    force: bool = typer.Option(False, "--force", help="run even if data and params are unchanged"),
    params: Path = PARAMS,
    profile: str | None = PROFILE,
    param: list[str] = PIPELINE_PARAM,
    set_fields: list[str] = SET_FIELD,
    dvc_file: Path = typer.Option(Path("data.dvc"), "--dvc-file", help="DVC pointer file of the raw data"),
    data_hash: str | None = typer.Option(None, envvar="RLHF_DATA_HASH", help="with --host: the data version "
                                         "(md5 in data.dvc) when there is no data.dvc here, e.g. in the "
                                         "retrain CronJob"),
    summary_file: Path | None = typer.Option(None, help="append the decision (and with --host --wait the run's "
                                             "gate decision) as Markdown, e.g. $GITHUB_STEP_SUMMARY"),
    runs_dir: Path = typer.Option(Path("runs"), help="--local: where run directories are created"),
    threads: int | None = typer.Option(None, min=1, help="--local: CPU threads per step"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="--local: show everything the steps print"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="--local: only stage lines and the summary"),
    data_revision: str | None = typer.Option(None, help="--host: revision recorded with the run "
                                             "(default: git HEAD)"),
    pipeline_file: Path | None = PIPELINE_FILE,
    experiment: str = EXPERIMENT,
    run_name: str | None = typer.Option(None, help="--host: display name (default: rlhf <revision> <time>)"),
    service_account: str | None = SERVICE_ACCOUNT,
    namespace: str | None = NAMESPACE,
    image: str | None = IMAGE_OPT,
    gpu_image: str | None = GPU_IMAGE_OPT,
    wait: bool = typer.Option(False, "--wait", help="--host: follow the run to its end and report the gate"),
    poll: float = typer.Option(30.0, help="--host --wait: seconds between status polls"),
    timeout: float = typer.Option(6 * 3600, help="--host --wait: give up waiting after this many seconds"),
):
    """Retrain only if the data or the params changed since the champion in the MLflow registry.

    Compares the DVC data hash (data.dvc) and the fingerprint of the resolved pipeline configuration
    (params.yaml + profile + --set/-p) with the lineage tags of models:/<register.model_name>@champion,
    prints the decision in one line, and then does nothing (exit 0) or runs the pipeline: --local
    here, --host on Kubeflow Pipelines with the git commit as data revision. New preference rows count
    once recorded: after adding them to data/raw run `dvc add data/raw` (then `dvc push` and commit
    data.dvc); unrecorded changes in data/raw stop the command with that advice.
    """
    from rlhf.config import resolve
    from rlhf.mlops import retrain

    if local and host:
        raise UserError("choose one of --local and --host")
    if not local and not host:
        raise UserError("rlhf retrain needs --local (run the pipeline here) or --host URL (submit to Kubeflow "
                        "Pipelines)", hint="--dry-run with either only prints the decision")
    retrain.retrain(
        mode="local" if local else "host", params=params, profile=profile,
        parameters=resolve.parse_assignments(param), overrides=resolve.dotted_overrides(set_fields),
        dvc_file=dvc_file, data_hash=data_hash or None, force=force, dry_run=dry_run, summary_file=summary_file,
        local_options={"runs_dir": runs_dir, "threads": threads, "verbose": verbose, "quiet": quiet},
        host=host, data_revision=data_revision, echo=typer.echo,
        submit_options={"pipeline_file": pipeline_file, "image": image, "gpu_image": gpu_image,
                        "experiment": experiment, "run_name": run_name, "service_account": service_account,
                        "namespace": namespace, "wait": wait, "poll": poll, "timeout": timeout})


TORCH_STAGES = {s.name for s in STAGES if s.gpu}  # the commands that compute with torch


def _threads_for_this_machine() -> None:
    """On a busy machine fewer torch threads (OMP_NUM_THREADS, set before torch is imported), as `rlhf run` does."""
    from rlhf.pipeline.threads import auto_threads

    n, note = auto_threads()
    if n:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
        logging.getLogger("rlhf").info("%s", note.replace("per step (--threads to choose)",
                                                          "(OMP_NUM_THREADS to choose)"))


# typer >= 0.25 vendors click (``typer._click``): its usage errors, Exit and Abort are not click's own classes
_EXITS = tuple({click.exceptions.Exit, getattr(typer, "Exit", click.exceptions.Exit)})
_ABORTS = tuple({click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort)})
_USAGE_ERRORS = tuple({click.ClickException, getattr(typer, "TyperException", click.ClickException)})


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=os.environ.get("RLHF_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    install_log_redaction()
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in TORCH_STAGES:
        _threads_for_this_machine()
    raise_on_signals()
    try:
        app(args=args, standalone_mode=False)
    except Interrupted as e:
        typer.echo(f"interrupted ({e})", err=True)
        sys.exit(e.exit_code)
    except UserError as e:
        typer.secho(f"error: {e.one_line()}", err=True, fg=typer.colors.RED)
        sys.exit(e.exit_code)
    except _EXITS as e:
        sys.exit(e.exit_code)
    except _ABORTS:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except _USAGE_ERRORS as e:  # an unknown option, a missing or bad value: click's usage message, exit 2
        if hasattr(e, "show"):
            e.show()
        else:
            typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:  # a full or read-only disk is the machine's state, not a bug: one line
        from rlhf.io import environment_error

        err = environment_error(e)
        if err is None:
            raise
        typer.secho(f"error: {err.one_line()}", err=True, fg=typer.colors.RED)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
