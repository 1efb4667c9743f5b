"""Files generated from the stage table: ``dvc.yaml`` and the KFP components (``components.py``).

    python -m rlhf.pipeline.codegen           # rewrite both (``make codegen``)
    python -m rlhf.pipeline.codegen --check   # exit 1 if a committed file differs (CI, tests)

Why generated files rather than objects built at import: KFP's lightweight components ship the
*source* of their function to the step's container, so each component must exist as real Python
source with a typed signature; and ``dvc.yaml`` is read by DVC itself. Generating both from
:data:`rlhf.pipeline.stages.STAGES` keeps one declaration per stage while the outputs stay plain,
reviewable files.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from rlhf.config.resolve import knobs_for
from rlhf.pipeline.stages import STAGES, Stage

ROOT = Path(__file__).resolve().parents[3]
COMPONENTS = Path(__file__).with_name("components.py")
DVC_YAML = ROOT / "dvc.yaml"

LAUNCHER_SIGNATURE = ("num_nodes: int", "accelerator_type: str", "accelerator_limit: str", "cpu: str",
                      "memory: str", "node_selector: dict", "tolerations: list", "image: str", "namespace: str",
                      "job_kind: str", "scratch_url: str", "timeout_s: int")
HEADER = "GENERATED from the stage table (src/rlhf/pipeline/stages.py) by `make codegen`: do not edit."


# ------------------------------------------------------------------------------------------ KFP


def component_parameters(s: Stage, *, launcher: bool = False) -> list[str]:
    """The typed parameters of a stage's KFP component (inputs, pipeline settings, outputs, knobs)."""
    params: list[str] = []
    for i in s.inputs:
        if i.kind == "raw":
            params += ["raw_data: str", "data_hash: str", "data_revision: str"]
        elif i.kind == "artifact":
            params.append(f"{i.name}: Input[{i.kfp_type}]")
    # a cached stage takes no run_id: a per-run argument would change its cache key every run
    params += ["params_yaml: str", "profile: str", *([] if s.cache else ["run_id: str"]), "overrides: dict"]
    if any(i.kind == "champion" for i in s.inputs):
        params.append("compare_champion: bool")
    if s.name == "register":
        params += ["data_hash: str", "data_revision: str"]
    if launcher:
        params += list(LAUNCHER_SIGNATURE)
    params.append(f"{s.output.name}: Output[{s.output.kfp_type}]")
    if s.report and not launcher:
        params.append("report: Output[HTML]")
    params.append("metrics: Output[Metrics]")
    # knobs last, with their "as in params.yaml" default
    params += [f"{k.name}: {k.type.__name__} = {k.unset!r}" for k in knobs_for(s.config_sections)]
    return params


def _function(name: str, params: list[str], doc: str, body: str, returns: str = "") -> str:
    indent = " " * (5 + len(name))
    lines, line = [], ""
    for i, p in enumerate(params):
        piece = p + ("," if i + 1 < len(params) else "")
        if line and len(indent) + len(line) + 1 + len(piece) > 108:
            lines.append(line)
            line = piece
        else:
            line = f"{line} {piece}" if line else piece
    sig = ("\n" + indent).join([*lines, line])
    return (f"def {name}({sig}){returns}:\n    \"\"\"{doc}\"\"\"\n    from rlhf.pipeline import steps\n\n"
            f"    {body}\n")


def components_source() -> str:
    parts = [f'"""KFP components, one per stage (and a launcher per multi-node stage).\n\n{HEADER}\n'
             "Each body hands its arguments to :func:`rlhf.pipeline.steps.kfp_step` (or ``kfp_job``).\n"
             '"""\n\n'
             "from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output  # noqa: F401\n"]
    for s in STAGES:
        returns = " -> str" if s.returns_gate else ""
        call = "return " if s.returns_gate else ""
        parts.append(_function(s.name, component_parameters(s), s.help,
                               f'{call}steps.kfp_step("{s.name}", locals())', returns))
    for s in STAGES:
        if s.multinode:
            parts.append(_function(f"{s.name}_multinode", component_parameters(s, launcher=True),
                                   f"{s.display} on num_nodes nodes: a Kubeflow Trainer job running "
                                   f"`torchrun -m rlhf.cli {s.name}` (this step waits).",
                                   f'steps.kfp_job("{s.name}", locals())'))
    stage_names = ", ".join(f'"{s.name}": {s.name}' for s in STAGES)
    launchers = ", ".join(f'"{s.name}": {s.name}_multinode' for s in STAGES if s.multinode)
    parts.append(f"STAGE_FUNCS = {{{stage_names}}}\nMULTINODE_FUNCS = {{{launchers}}}\n")
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------ DVC


def dvc_command(s: Stage) -> list[str]:
    cmd = ["rlhf", s.name]
    for i in s.inputs:
        if i.kind in ("raw", "artifact"):
            cmd += [i.flags[0], i.default]
    return cmd + list(s.dvc_cmd_extra) + ["--out", s.output.default]


def dvc_yaml() -> str:
    outputs = {s.name: s.output.default for s in STAGES}
    lines = [f"# {HEADER}", "# The pipeline as DVC stages: `dvc repro` runs what changed and skips the rest.",
             "# Each stage calls the same `rlhf` command the KFP components call.", "stages:"]
    for s in STAGES:
        lines.append(f"  {s.name}:")
        lines += [f"    # {n}" for n in s.dvc_notes]
        cmd = " ".join(dvc_command(s))
        if len(cmd) <= 100:
            lines.append(f"    cmd: {cmd}")
        else:
            lines.append("    cmd: >-")
            lines += textwrap.wrap(cmd, width=100, initial_indent="      ", subsequent_indent="      ",
                                   break_on_hyphens=False)
        deps = [i.default for i in s.inputs if i.kind in ("raw", "artifact")]
        deps += [outputs[a] for a in s.after] + list(s.code)
        lines += ["    deps:", *[f"      - {d}" for d in dict.fromkeys(deps)]]
        lines += ["    params:", *[f"      - {p}" for p in ("profile", *s.config_sections, "profiles")]]
        lines.append("    outs:")
        if s.dvc_outs_cache:
            lines.append(f"      - {s.output.default}")
        else:
            lines += [f"      - {s.output.default}:", "          cache: false"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ main


def generated() -> dict[Path, str]:
    return {COMPONENTS: components_source(), DVC_YAML: dvc_yaml()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stale = [p for p, text in generated().items() if not p.exists() or p.read_text(encoding="utf-8") != text]
    if "--check" in argv:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run `make codegen`", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(generated()[p], encoding="utf-8")
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
