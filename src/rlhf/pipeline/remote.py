"""Runs on a Kubeflow Pipelines cluster: ``rlhf submit`` (and ``rlhf retrain --host``).

:func:`run_parameters` makes the runtime parameters of a cluster run (params.yaml, profile, data
version, knobs, overrides); :func:`submit_remote` creates the run through
:mod:`rlhf.pipeline.kfp_client` and, with ``wait``, follows it and reports the gate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rlhf.config.resolve import params_text
from rlhf.errors import ConfigError, UserError
from rlhf.pipeline.local import RunFailed, check_parameters


def kfp_call(fn, *args, **kwargs):
    """Run a KFP client call; its errors become one-line user errors."""
    from rlhf.pipeline.kfp_client import KfpError

    try:
        return fn(*args, **kwargs)
    except KfpError as e:
        raise UserError(str(e)) from None


def run_parameters(params: Path, profile: str | None, parameters: dict[str, Any] | None,
                   overrides: dict[str, dict[str, Any]] | None, data_revision: str | None,
                   data_hash: str | None) -> dict[str, Any]:
    """The runtime parameters of a cluster run: params.yaml, profile, data version, knobs, overrides.

    ``data_revision`` defaults to the git commit, ``data_hash`` to the md5 in ``data.dvc``, the
    profile to params.yaml's ``cluster_profile:`` (:func:`rlhf.config.resolve.cluster_profile`). A
    number given for a string parameter (``-p accelerator_limit=2``) is sent as a string.
    """
    from rlhf.config.resolve import resolve_profile
    from rlhf.mlops import tracking, versioning
    from rlhf.pipeline import dag
    params = Path(params)
    if not params.exists():
        raise ConfigError(f"params file not found: {params}", hint="run from the project root or pass --params")
    if data_hash is None:
        data_hash = versioning.data_hash("data.dvc") if Path("data.dvc").exists() else ""
    values: dict[str, Any] = {
        "data_revision": data_revision if data_revision is not None else (tracking.git_commit() or ""),
        "data_hash": data_hash, "params_yaml": params_text(params.read_text(encoding="utf-8")),
        "profile": resolve_profile(profile, params, cluster=True)}
    if overrides:
        values["overrides"] = overrides
    values.update(parameters or {})
    check_parameters(values, dag.pipeline_parameters())
    return dag.typed_parameters(values)


def submit_remote(host: str, values: dict[str, Any], *, pipeline_file: str | Path | None = None,
                  image: str | None = None, gpu_image: str | None = None, experiment: str = "rlhf",
                  run_name: str | None = None, service_account: str | None = None, namespace: str | None = None,
                  wait: bool = False, poll: float = 30.0, timeout: float = 6 * 3600,
                  summary_file: str | Path | None = None, echo: Any = print) -> dict[str, Any]:
    """Submit a pipeline run to KFP (``rlhf submit``); with ``wait``, follow it and report the gate.

    ``summary_file`` (with ``wait``): a Markdown summary with the gate decision is appended to it.
    A run that does not end SUCCEEDED raises :class:`RunFailed`.
    """
    from rlhf.pipeline import kfp_client as kfp

    spec = kfp.compiled_spec(pipeline_file, image=image, gpu_image=gpu_image, params_yaml=values["params_yaml"])
    name = run_name or f"rlhf {values['data_revision'][:8] or 'local'} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    api = kfp.KfpClient(host, namespace=namespace)
    run = kfp_call(kfp.submit, api, pipeline_spec=spec, parameters=values, experiment=experiment, run_name=name,
                   service_account=service_account, wait=wait, poll_s=poll, timeout_s=timeout, echo=echo)
    if not wait:
        return run
    gate = kfp.gate_from_run(run)
    echo(f"run {run.get('run_id')} {run.get('state')}; gate {gate[0]}: {gate[1]}")
    if summary_file is not None:
        with open(summary_file, "a", encoding="utf-8") as f:
            f.write(kfp.summary_markdown(run, host, gate, values))
    if run.get("state") != "SUCCEEDED":
        raise RunFailed(f"run {run.get('run_id')} ended {run.get('state')}",
                        hint=f"{host.rstrip('/')}/#/runs/details/{run.get('run_id')}")
    return run
