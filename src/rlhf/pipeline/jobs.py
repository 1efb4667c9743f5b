"""The entry point of every node of a multi-node Kubeflow Trainer job: ``python -m rlhf.pipeline.jobs job ...``.

Each node stages the step's inputs and its resolved params.yaml from object storage, runs
``torchrun <rendezvous> -m rlhf.cli <stage> ...`` and, on node 0, uploads the output
(:mod:`rlhf.pipeline.multinode` builds and launches the job).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from rlhf.data.remote import copy_tree
from rlhf.errors import UserError
from rlhf.pipeline.stages import TRAINING_STAGES, stage
from rlhf.pipeline.steps import setup_logging

log = logging.getLogger("rlhf")


def job_command(name: str, scratch_url: str, rendezvous: list[str]) -> list[str]:
    """The command line of every node of a multi-node job (see :func:`job_main`)."""
    return ["python", "-m", "rlhf.pipeline.jobs", "job", "--stage", name, "--scratch", scratch_url, "--", *rendezvous]


def torchrun_args(name: str, inputs: dict[str, str], out: str, params: str, rendezvous: list[str]) -> list[str]:
    """``torchrun <rendezvous> -m rlhf.cli <stage> --<input> <path> ... --out <out> --params <params>``."""
    cmd = ["torchrun", *rendezvous, "-m", "rlhf.cli", name]
    for i in stage(name).inputs:
        cmd += [i.flags[0], inputs[i.name]]
    return cmd + ["--out", out, "--params", params]


def job_main(argv: list[str] | None = None) -> int:
    """Entry point of a Trainer job's node: stage inputs, ``torchrun -m rlhf.cli <stage>``, upload (node 0)."""
    parser = argparse.ArgumentParser(prog="python -m rlhf.pipeline.jobs job")
    parser.add_argument("--stage", required=True, choices=TRAINING_STAGES)
    parser.add_argument("--scratch", required=True, help="object-store prefix: inputs/, params.yaml, output/")
    parser.add_argument("--workdir", default=os.environ.get("RLHF_JOB_WORKDIR", "/tmp/rlhf-job"))
    parser.add_argument("rendezvous", nargs="*", help="torchrun's --nnodes/--node-rank/... flags")
    args = parser.parse_args(argv)
    setup_logging()
    work = Path(args.workdir)
    local_inputs = {}
    for k in stage(args.stage).input_names:
        local_inputs[k] = str(work / "inputs" / k)
        copy_tree(f"{args.scratch.rstrip('/')}/inputs/{k}", local_inputs[k])
    copy_tree(f"{args.scratch.rstrip('/')}/config", str(work / "config"))
    out = str(work / "output")
    cmd = torchrun_args(args.stage, local_inputs, out, str(work / "config" / "params.yaml"), args.rendezvous)
    log.info("[%s] %s", args.stage, " ".join(cmd))
    rc = subprocess.call(cmd)
    if rc != 0:
        return rc
    node_rank = int(os.environ.get("PET_NODE_RANK", os.environ.get("RANK", "0")) or 0)
    if node_rank == 0:
        copy_tree(out, f"{args.scratch.rstrip('/')}/output")
        log.info("[%s] output uploaded to %s/output", args.stage, args.scratch.rstrip("/"))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "job":
        print("usage: python -m rlhf.pipeline.jobs job --stage STAGE --scratch URL -- [torchrun flags]", file=sys.stderr)
        return 2
    try:
        return job_main(argv[1:])
    except UserError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
