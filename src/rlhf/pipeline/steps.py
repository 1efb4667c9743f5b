"""The step runner: one stage of the table on local paths, called by every door.

* :func:`run_stage`: the stage function with its resolved configs (the CLI and ``dvc repro`` call
  it through ``rlhf <stage>``; the KFP steps and Trainer jobs through :func:`run_component`);
* :func:`kfp_step`: the body of every generated KFP component (``components.py``): artifacts and
  pipeline parameters in, :func:`run_component`, artifacts out;
* :func:`register`: the register stage (the registry, or a receipt saying why not);
* :func:`parent_run`: the MLflow parent run of a pipeline run around one step.

No KFP imports here: the generated components import this module inside their bodies.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rlhf import process
from rlhf.config.resolve import KNOB_NAMES, RunConfig
from rlhf.errors import ConfigError, UserError
from rlhf.io import check_output
from rlhf.pipeline.stages import CHAMPION, STAGE_NAMES, STAGES, TRAINING_STAGES, stage
from rlhf.redact import install_log_redaction

__all__ = ["run_stage", "run_component", "run_torchrun", "processes", "visible_gpus", "kfp_step", "kfp_job", "register", "fetch_champion", "gate_decision",
           "parent_run", "numeric_metrics", "setup_logging", "STAGES", "STAGE_NAMES", "TRAINING_STAGES",
           "CHAMPION", "stage"]

log = logging.getLogger("rlhf")


def setup_logging() -> None:
    """Progress lines of the stages on stderr (a KFP step's log), as the CLI prints them."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=os.environ.get("RLHF_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    install_log_redaction()


def _function(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------------------------ stages


def run_stage(name: str, inputs: dict[str, str | Path | None], out: str | Path, run: RunConfig, *,
              run_id: str = "", data_hash: str = "", data_revision: str = "") -> dict[str, Any]:
    """Run one stage on local paths with the run's configuration. Returns the stage's metrics.

    ``inputs`` maps the stage's input names to paths (optional ones may be None; evaluate's
    ``champion`` may be :data:`CHAMPION`: fetch it from the registry).
    """
    spec = stage(name)
    missing = [i.name for i in spec.required_inputs if not inputs.get(i.name)]
    if missing:
        raise ConfigError(f"stage {name}: missing input(s) {', '.join(missing)}")
    check_output(out, stage=name, kind=spec.output.kind, inputs=inputs, file=bool(spec.output.file))
    configs = [run.section(s) for s in spec.sections]
    optional = {i.name: inputs.get(i.name) or None for i in spec.inputs if i.optional}
    if optional.get("champion") == CHAMPION:
        optional["champion"] = fetch_champion(run)
    args = [inputs[i.name] for i in spec.required_inputs]
    startup, t0 = process.age(), time.perf_counter()
    if name == "register":
        result = register(*args, out, *configs, run=run, run_id=run_id, data_hash=data_hash,
                          data_revision=data_revision)
    else:
        result = _function(spec.func)(*args, out, *configs, **optional)
    log_timing(name, startup, time.perf_counter() - t0, result)
    return result


def log_timing(name: str, startup: float | None, stage_s: float, metrics: Any) -> None:
    """One line for ``rlhf run``'s summary (parsed by :mod:`rlhf.pipeline.console`): how long the process took
    to reach the stage (interpreter, imports), the stage call, and of that the compute the stage measured
    itself (its training loop's ``seconds``: SFT, reward, PPO)."""
    compute = metrics.get("seconds") if isinstance(metrics, dict) else None
    parts = [f"start-up {startup:.1f} s" if startup is not None else "start-up ? s", f"stage {stage_s:.1f} s"]
    if isinstance(compute, int | float) and math.isfinite(compute):
        parts.append(f"compute {float(compute):.1f} s")
    log.info("[%s] time: %s", name, ", ".join(parts))


def register(policy: str | Path, reward_model: str | Path, evaluation: str | Path, out: str | Path, cfg,
             *, run: RunConfig, run_id: str = "", data_hash: str = "", data_revision: str = "") -> dict[str, Any]:
    """Register the evaluated policy (and reward model) in MLflow through :func:`rlhf.mlops.registry.register`.

    Writes the receipt to ``out`` (a ``.json`` file). With tracking off there is no registry: the
    receipt says so and nothing else happens. The version's ``pipeline_config_hash`` is the
    fingerprint of ``run``: the configuration that was trained.
    """
    from rlhf.io import write_file_atomic
    from rlhf.mlops import tracking

    if not tracking.enabled():
        doc: dict[str, Any] = {"registered": False, "model_name": cfg.model_name,
                               "reason": "tracking is off (RLHF_TRACKING=off): no model registry"}
    else:
        from rlhf.mlops import registry

        pipeline_run_id = os.environ.get("RLHF_PIPELINE_RUN_ID") or run_id or None
        # the store failing mid-way (a server that dies): one line; a retry finds what was registered
        with tracking.store_errors(hint="rerun when MLflow is back: a retry of the same pipeline run "
                                        "creates no second version"):
            doc = {"registered": True, **registry.register(
                policy, reward_model, evaluation, cfg, pipeline_run_id=pipeline_run_id,
                config_fingerprint=run.fingerprint())}
    doc.update({"stage": "register", "data_hash": data_hash, "data_revision": data_revision})
    write_file_atomic(out, json.dumps(json.loads(json.dumps(doc, default=str)), indent=2, sort_keys=True) + "\n")
    log.info("[register] %s", doc.get("decision") or doc.get("reason"))
    return doc


def fetch_champion(run: RunConfig) -> Path | None:
    """The registry's current champion policy as a local directory, or None (none yet, or tracking off)."""
    from rlhf.mlops import tracking

    if not tracking.enabled():
        return None
    from rlhf.mlops import registry

    path = registry.champion_dir(run.section("register"))
    log.info("[evaluate] champion: %s", path or "none yet")
    return path


def gate_decision(evaluation_dir: str | Path) -> str:
    """``passed`` or ``failed``: the evaluate stage's gate.json (what the pipeline's dsl.If reads)."""
    gate = json.loads((Path(evaluation_dir) / "gate.json").read_text())
    return "passed" if gate.get("passed") else "failed"


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict (what KFP's Metrics artifact accepts)."""
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


# ------------------------------------------------------------------------------------------ KFP steps


def _tag_artifact(artifact: Any, path: Path) -> None:
    """Copy the manifest's identity (kind, content hash) into a KFP artifact's metadata."""
    mf = path / "manifest.json"
    if artifact is not None and hasattr(artifact, "metadata") and mf.exists():
        m = json.loads(mf.read_text())
        artifact.metadata.update({k: m[k] for k in ("kind", "content_hash", "schema_version") if m.get(k)})


def step_config(params_yaml: str, profile: str, overrides: dict | None, knobs: dict[str, Any] | None
                ) -> RunConfig:
    """A step's configuration from its pipeline parameters ('' profile: the file's / $RLHF_PROFILE)."""
    return RunConfig.from_text(params_yaml or "{}", profile=profile or None, overrides=overrides, knobs=knobs)


#: the device a step must train on (``cuda`` on the cluster's GPU steps: :mod:`rlhf.pipeline.dag`)
DEVICE_ENV = "RLHF_DEVICE"


def check_device(name: str) -> dict[str, dict[str, Any]]:
    """A GPU stage with ``$RLHF_DEVICE`` set: stop now if that device is missing; else the model override.

    On a cluster the GPU steps get ``RLHF_DEVICE=cuda``: a pod that got no GPU (no ``nvidia.com/gpu``
    limit, a CPU node, a CPU image) fails in one line instead of training on the CPU until its timeout.
    ``rlhf run`` leaves it unset, so a laptop trains on what it has.
    """
    device = os.environ.get(DEVICE_ENV, "")
    if not device or not stage(name).gpu:
        return {}
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"stage {name} is a GPU step (RLHF_DEVICE=cuda) but this pod sees no CUDA device",
                            hint="check the pipeline parameters accelerator_type / accelerator_limit, the node's "
                                 "NVIDIA device plugin, and that GPU steps use the -cuda image")
    return {"model": {"device": device}}


def run_component(name: str, *, inputs: dict[str, Any], out: Any, params_yaml: str, profile: str = "",
                  overrides: dict[str, dict[str, Any]] | None = None, knobs: dict[str, Any] | None = None,
                  metrics: Any = None, html: Any = None, run_id: str = "", data_hash: str = "",
                  data_revision: str = "", gpus: str | int = 1) -> dict[str, Any]:
    """One stage inside a pipeline step: KFP artifacts (or paths) in, :func:`run_stage`, artifacts out.

    ``inputs`` maps input names to KFP input artifacts (anything with ``.path``), plain paths, or
    None; ``out`` is the output artifact; ``metrics`` / ``html`` the optional Metrics / HTML outputs.
    ``gpus``: the step's GPU limit; a training stage with more than one runs as
    ``torchrun --standalone --nproc-per-node <gpus>`` inside the pod (:func:`run_torchrun`).
    """
    setup_logging()
    device = check_device(name)
    if device:
        overrides = {**(overrides or {}), "model": {**(overrides or {}).get("model", {}), **device["model"]}}
    run_id = run_id or os.environ.get("KFP_RUN_ID", "")  # cached steps: from the pod's label (rlhf.pipeline.dag)
    if run_id:
        os.environ.setdefault("KFP_RUN_ID", run_id)
    if data_hash:
        os.environ.setdefault("RLHF_DATA_HASH", data_hash)
    run = step_config(params_yaml, profile, overrides, knobs)
    spec = stage(name)
    paths = {k: (getattr(v, "path", v) if v is not None else None) for k, v in inputs.items()}
    out_dir = Path(getattr(out, "path", out))
    target = out_dir / spec.output.file if spec.output.file else out_dir
    nproc = processes(name, gpus)
    from rlhf.pipeline import reuse

    result = reuse.reuse_output(name, paths, target, run)  # rlhf run --resume: an earlier attempt's output
    if result is None:
        reuse.adopt_checkpoints(name, target, run)  # ... or its checkpoints, to resume from
        with parent_run(run_id), _profile_env(run.profile):
            if nproc > 1:
                result = run_torchrun(name, paths, target, run, nproc)
            else:
                result = run_stage(name, paths, target, run, run_id=run_id, data_hash=data_hash,
                                   data_revision=data_revision)
    _tag_artifact(out, out_dir)
    if metrics is not None:
        for k, v in numeric_metrics(result).items():
            metrics.log_metric(k, v)
        _write_metrics_file(metrics, numeric_metrics(result))
    if html is not None:
        report = out_dir / "report.html"
        if report.exists():
            Path(html.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(report, html.path)
    log.info("[%s] done: %s", name, json.dumps(numeric_metrics(result), sort_keys=True)[:400])
    return result


@contextlib.contextmanager
def _profile_env(profile: str | None):
    """``$RLHF_PROFILE`` = the step's profile while it runs (MLflow's profile tag), as it was afterwards."""
    saved = os.environ.get("RLHF_PROFILE")
    if profile:
        os.environ["RLHF_PROFILE"] = profile
    else:
        os.environ.pop("RLHF_PROFILE", None)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RLHF_PROFILE", None)
        else:
            os.environ["RLHF_PROFILE"] = saved


def _write_metrics_file(metrics: Any, values: dict[str, float]) -> None:
    """The Metrics artifact's file too (KFP keeps the values in its metadata): an output whose file is
    missing is a cache miss for kfp.local's cache, so a step with metrics would never hit it."""
    path = getattr(metrics, "path", None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(values, sort_keys=True) + "\n")


def processes(name: str, gpus: str | int | None) -> int:
    """How many processes a step of stage ``name`` runs: one per GPU for the training stages (sft, reward,
    ppo), one for the others and inside a process that torchrun already started."""
    text = str(gpus if gpus not in (None, "") else 1).strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"GPU count {gpus!r} of step {name} is not a positive whole number",
                          where="pipeline parameter accelerator_limit", hint="e.g. 1 or 8")
    n = int(text)
    if name not in TRAINING_STAGES or "LOCAL_RANK" in os.environ:
        return 1
    return n


def visible_gpus() -> int:
    """The GPUs this pod was given: its accelerator limit (the device plugin exposes exactly those), so the
    one pipeline value ``accelerator_limit`` sets both the GPU request and the torchrun process count."""
    try:
        import torch
    except ImportError:
        return 1
    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def run_torchrun(name: str, inputs: dict[str, Any], out: Path, run: RunConfig, nproc: int) -> dict[str, Any]:
    """Stage ``name`` as ``torchrun --standalone --nproc-per-node <nproc> -m rlhf.cli <stage> ...`` on this
    node (every rank runs the stage; rank 0 writes ``out``), with the step's resolved config. Its metrics."""
    import subprocess

    from rlhf.io import read_manifest
    from rlhf.pipeline.jobs import torchrun_args

    with tempfile.TemporaryDirectory(prefix=f"rlhf-{name}-config-") as cfg_dir:
        params = run.write(cfg_dir)
        cmd = torchrun_args(name, {k: str(v) for k, v in inputs.items()}, str(out), str(params),
                            ["--standalone", f"--nproc-per-node={nproc}"])
        cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
        log.info("[%s] %d processes: %s", name, nproc, " ".join(cmd))
        env = {**os.environ, "RLHF_PROFILE": ""}  # the written params.yaml has the profile applied
        rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise RuntimeError(f"stage {name}: torchrun with {nproc} processes exited with code {rc}")
    return read_manifest(out)["metrics"]


def _step_inputs(name: str, args: dict[str, Any], tmp: str) -> dict[str, Any]:
    """A generated component's arguments -> the stage's inputs (raw data fetched, champion resolved)."""
    inputs: dict[str, Any] = {}
    for i in stage(name).inputs:
        if i.kind == "raw":
            from rlhf.data.remote import resolve_raw

            inputs[i.name] = resolve_raw(args["raw_data"], args["data_hash"], tmp)
        elif i.kind == "champion":
            inputs[i.name] = CHAMPION if args.get("compare_champion") else None
        else:
            inputs[i.name] = args[i.name]
    return inputs


def kfp_step(name: str, args: dict[str, Any]) -> str | None:
    """The body of the generated KFP component of stage ``name`` (``args``: the component's ``locals()``)."""
    from rlhf.process import raise_on_signals, stop_with

    spec = stage(name)
    setup_logging()
    raise_on_signals()  # SIGTERM unwinds: MLflow runs end KILLED, no half-written output
    if os.environ.get("RLHF_LOCAL_RUN", "").isdigit():
        stop_with(int(os.environ["RLHF_LOCAL_RUN"]))  # a step of `rlhf run` stops when `rlhf run` is gone
    with tempfile.TemporaryDirectory(prefix=f"rlhf-{name}-") as tmp:
        run_component(name, inputs=_step_inputs(name, args, tmp), out=args[spec.output.name],
                      metrics=args.get("metrics"), html=args.get("report"), params_yaml=args["params_yaml"],
                      profile=args["profile"], overrides=args.get("overrides"),
                      knobs={k: args[k] for k in KNOB_NAMES if k in args}, run_id=args.get("run_id", ""),
                      data_hash=args.get("data_hash", ""), data_revision=args.get("data_revision", ""),
                      gpus=visible_gpus() if spec.gpu else 1)
    return gate_decision(args[spec.output.name].path) if spec.returns_gate else None


#: the multi-node launcher components' own parameters (what :func:`kfp_job` hands to the job builder)
LAUNCHER_PARAMETERS = ("num_nodes", "accelerator_type", "accelerator_limit", "cpu", "memory", "node_selector",
                       "tolerations", "image", "namespace", "job_kind", "scratch_url", "timeout_s")


def _gpu_count(limit: str | int) -> int:
    """The pipeline parameter ``accelerator_limit`` (a string, as the KFP driver wants it) as a number."""
    try:
        n = int(str(limit).strip())
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"accelerator_limit must be a whole number of GPUs, got {limit!r}",
                          hint="pass it as a string, e.g. -p accelerator_limit=1")
    return n


def kfp_job(name: str, args: dict[str, Any]) -> None:
    """The body of a generated multi-node launcher: run stage ``name`` as a Kubeflow Trainer job."""
    from rlhf.pipeline import multinode

    setup_logging()
    spec = stage(name)
    run = step_config(args["params_yaml"], args["profile"], args.get("overrides"),
                      {k: args[k] for k in KNOB_NAMES if k in args})
    multinode.run_stage_job(
        name, inputs={i.name: args[i.name] for i in spec.inputs}, out=args[spec.output.name],
        metrics=args.get("metrics"), params_yaml=args["params_yaml"], profile=args["profile"],
        overrides=run.overrides, run_id=args["run_id"], num_nodes=args["num_nodes"],
        accelerator_type=args["accelerator_type"], gpus_per_node=_gpu_count(args["accelerator_limit"]),
        cpu=args["cpu"],
        memory=args["memory"], node_selector=args["node_selector"], tolerations=args["tolerations"],
        image=args["image"], namespace=args["namespace"], kind=args["job_kind"], scratch_url=args["scratch_url"],
        timeout_s=args["timeout_s"])


@contextlib.contextmanager
def parent_run(run_id: str):
    """The MLflow parent run of this pipeline run around one step.

    ``rlhf run`` owns the parent itself (``RLHF_PARENT_RUN_ID`` is set); on a cluster each step finds
    or creates it by the KFP run id (``tracking.start_pipeline_run``) and leaves it FINISHED, or
    FAILED when the step fails, so the parent's status is that of the last step that ran.
    """
    from rlhf.mlops import tracking

    if not tracking.enabled() or os.environ.get("RLHF_PARENT_RUN_ID") or not run_id:
        yield
        return
    parent = tracking.start_pipeline_run(run_id, name=f"pipeline {run_id}")
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    finally:
        tracking.end_pipeline_run(status, parent)
