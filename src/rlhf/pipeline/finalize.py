"""The pipeline's exit handler: what runs after every pipeline run, whatever became of it.

A step that dies hard (OOM kill, node loss, ``activeDeadlineSeconds``, a cancelled run) cannot
close what it opened. The DAG (:mod:`rlhf.pipeline.dag`) wraps every task in a ``dsl.ExitHandler``
whose exit task calls :func:`finalize`, which, unless the run SUCCEEDED:

* ends the MLflow parent run of this pipeline run and every stage run of it still RUNNING as
  FAILED, and tags the parent with the run's final state and error (``pipeline_state``,
  ``pipeline_error``);
* with ``num_nodes > 1``, deletes the Kubeflow Trainer jobs the run started that did not succeed
  (:func:`rlhf.pipeline.multinode.delete_run_jobs`; they carry the run's label).

After a successful run it changes nothing. It never fails the pipeline for a clean-up it could
not do (it logs it): the run's own state is what the user must see.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("rlhf")

SUCCEEDED = "SUCCEEDED"


def _pipeline_run_id(run_id: str) -> str:
    """The id the steps tagged their MLflow runs with (``rlhf run`` exports its own)."""
    from rlhf.mlops import tracking

    return os.environ.get(tracking.ENV_PIPELINE) or run_id


def _running(client, exp_id: str, pipeline_run_id: str) -> list:
    return client.search_runs([exp_id], filter_string=(
        f"tags.pipeline_run_id = '{pipeline_run_id}' and attributes.status = 'RUNNING'"), max_results=1000)


def end_running_runs(pipeline_run_id: str, status: str, *, include_parent: bool = False,
                     reason: str = "") -> list[str]:
    """End the RUNNING MLflow runs of pipeline run ``pipeline_run_id`` with ``status``: its stage runs, and
    with ``include_parent`` its parent run too (tagged ``pipeline_state`` = ``status`` and ``reason``).

    What `rlhf run` does for an attempt that was killed without closing its runs (SIGKILL):
    :func:`rlhf.pipeline.local.close_abandoned`, and ``rlhf run --resume`` before its steps start.
    Returns the ids it ended."""
    from rlhf.mlops import tracking

    if not tracking.enabled():
        return []
    pipeline_run_id = tracking._check_pipeline_run_id(pipeline_run_id)
    client, exp_id = tracking.connect()
    found = tracking.find_pipeline_run(client, exp_id, pipeline_run_id)
    parent = found.info.run_id if found is not None else None
    closed = []
    for r in _running(client, exp_id, pipeline_run_id):
        if r.info.run_id == parent and not include_parent:
            continue
        if r.info.run_id == parent:
            client.set_tag(parent, "pipeline_state", status)
            if reason:
                client.set_tag(parent, "pipeline_error", tracking.redact_value(reason)[:5000])
        client.set_terminated(r.info.run_id, status=status)
        closed.append(r.info.run_id)
    if closed:
        log.info("ended %d MLflow run(s) of pipeline run %s %s", len(closed), pipeline_run_id, status)
    return closed


def close_mlflow_runs(run_id: str, state: str, error: str = "") -> list[str]:
    """End the parent and any RUNNING stage run of pipeline run ``run_id`` FAILED; returns their ids."""
    from rlhf.mlops import tracking

    if not tracking.enabled() or not run_id:
        return []
    pipeline_run_id = tracking._check_pipeline_run_id(_pipeline_run_id(run_id))
    client, exp_id = tracking.connect()
    closed = []
    parent = os.environ.get(tracking.ENV_PARENT)
    if not parent:
        found = tracking.find_pipeline_run(client, exp_id, pipeline_run_id)
        parent = found.info.run_id if found is not None else None
    for r in _running(client, exp_id, pipeline_run_id):
        if r.info.run_id != parent:
            client.set_terminated(r.info.run_id, status="FAILED")
            closed.append(r.info.run_id)
    if parent:
        client.set_tag(parent, "pipeline_state", state)
        if error:
            client.set_tag(parent, "pipeline_error", tracking.redact_value(error)[:5000])
        if client.get_run(parent).info.status != "FAILED":
            client.set_terminated(parent, status="FAILED")
        closed.append(parent)
    return closed


def finalize(run_id: str, state: str, error: str = "", *, num_nodes: int = 1, namespace: str = "",
             api: Any = None) -> dict[str, Any]:
    """The exit task's body (see the module doc). Returns what it did."""
    from rlhf.pipeline.steps import setup_logging

    setup_logging()
    done: dict[str, Any] = {"state": state, "closed_runs": [], "deleted_jobs": []}
    if state == SUCCEEDED:
        log.info("[finalize] pipeline run %s succeeded: nothing to clean up", run_id)
        return done
    log.info("[finalize] pipeline run %s ended %s: closing its MLflow runs%s", run_id, state,
             " and deleting its training jobs" if num_nodes > 1 else "")
    try:
        done["closed_runs"] = close_mlflow_runs(run_id, state, error)
    except Exception as e:  # noqa: BLE001 - clean-up must not hide the run's own failure
        log.warning("[finalize] could not close the MLflow runs of %s: %s", run_id, e)
    if num_nodes > 1:
        from rlhf.pipeline import multinode

        try:
            done["deleted_jobs"] = multinode.delete_run_jobs(
                run_id, namespace or os.environ.get("RLHF_TRAINING_NAMESPACE") or "rlhf", api,
                echo=lambda line: log.info("[finalize] %s", line))
        except Exception as e:  # noqa: BLE001
            log.warning("[finalize] could not delete the training jobs of %s: %s", run_id, e)
    log.info("[finalize] closed %d MLflow run(s), deleted %d job(s)", len(done["closed_runs"]),
             len(done["deleted_jobs"]))
    return done
