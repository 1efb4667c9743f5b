"""The KFP component of the pipeline's exit handler (the logic is :func:`rlhf.pipeline.finalize.finalize`).

Kept apart, without ``from __future__ import annotations``: KFP reads the component's signature,
and ``PipelineTaskFinalStatus`` must be a real annotation for the compiler to feed it the run's
final state.
"""

from kfp.dsl import PipelineTaskFinalStatus


def finalize(run_id: str, num_nodes: int, training_namespace: str, status: PipelineTaskFinalStatus):
    """Close the run's MLflow runs FAILED and delete its training jobs unless it succeeded."""
    from rlhf.pipeline import finalize as fin

    fin.finalize(run_id, status.state, status.error_message or "", num_nodes=num_nodes,
                 namespace=training_namespace)
