"""``rlhf run --resume``: what an earlier, interrupted attempt in the same run directory already did.

Every attempt of a run directory is one KFP local job under ``<run dir>/kfp/<job>/``; ``rlhf run
--resume`` starts another one there and exports ``RLHF_REUSE_ROOT=<run dir>/kfp`` to its steps. A step
then (:func:`reuse_output`) takes the output an earlier attempt's step of the same stage left, instead
of running, when that output is

* whole: its ``manifest.json`` exists and its content hash matches the files (an output is only ever
  renamed into place complete, so a killed step leaves none, or a temporary directory that is ignored);
* of the same stage (kind, stage), written by the same rlhf version;
* made from the same inputs (the content hashes the manifest records equal those of this step's
  inputs, which are themselves reused outputs or fresh ones) and the same resolved config (the stage's
  section but for its checkpoint and logging settings, and the model section);
* for validate: a passing report (a failed one stops the pipeline and is never reused).

The step copies it (hard links where the file system allows) into its own output, so the new job's
artifacts are complete on their own. Evaluate and register always run: evaluate compares with the
registry's champion, which may have moved; register is idempotent per pipeline run.

A training stage that is not reused takes over the checkpoints the interrupted attempt left beside its
output (:func:`adopt_checkpoints`) and resumes from them (:mod:`rlhf.train.checkpoint`).

Why not kfp 2.17's own local cache (``kfp.local.init(enable_caching=True)``): its key is the
component, command, arguments and container env, and the training steps take the pipeline job id
(``dsl.PIPELINE_JOB_ID_PLACEHOLDER``, new for every attempt) for their MLflow lineage, so they could
never hit; and a hit only checks that the cached output path exists, not that its content is whole
and was made from these inputs. The manifests record exactly that.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from rlhf.io import MANIFEST, artifact_problem, input_hashes

log = logging.getLogger("rlhf")

ENV = "RLHF_REUSE_ROOT"
#: the stages whose earlier output may be reused (evaluate and register always run)
REUSABLE = ("prepare", "validate", "sft", "reward", "ppo")


def _stage_of(task: str) -> str:
    from rlhf.pipeline.console import stage_of

    return stage_of(task)


def earlier_outputs(root: Path, stage: str, output: str, current: Path) -> list[Path]:
    """Stage ``stage``'s outputs (``<job>/<task>/<output>``) under ``root`` other than ``current``, newest first."""
    found = []
    if not root.is_dir():
        return found
    current = Path(os.path.realpath(current))
    for job in root.iterdir():
        if not job.is_dir() or job.name.startswith("."):
            continue
        for task in job.iterdir():
            art = task / output
            if task.is_dir() and _stage_of(task.name) == stage and art.is_dir() \
                    and Path(os.path.realpath(art)) != current:
                found.append(art)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _computed(config: dict[str, Any] | None) -> dict[str, Any]:
    """A stage config without the fields that never change its output (checkpointing, logging)."""
    from rlhf.config.schema import RUN_ONLY_FIELDS

    return {k: v for k, v in (config or {}).items() if k not in RUN_ONLY_FIELDS}


def mismatch(art: Path, stage: str, kind: str, inputs: dict[str, Any], configs: list[Any]) -> str | None:
    """``None`` when ``art`` is what this step would write (see the module doc), else why it is not."""
    from rlhf import __version__

    problem = artifact_problem(art)
    if problem:
        return problem
    m = json.loads((art / MANIFEST).read_text(encoding="utf-8"))
    if m.get("kind") != kind or m.get("stage", stage) != stage:
        return f"a '{m.get('kind')}' artifact of stage {m.get('stage', '?')}"
    if m.get("rlhf_version") != __version__:
        return f"written by rlhf {m.get('rlhf_version')}"
    if _computed(m.get("config")) != _computed(_json(configs[0].model_dump(mode="json"))):
        return f"made with another {stage} config"
    model = next((c for c in configs[1:] if type(c).__name__ == "ModelConfig"), None)
    if model is not None and "model" in m and m["model"] != _json(model.model_dump(mode="json")):
        return "made with another model config"
    given = {k: v for k, v in inputs.items() if v}
    if sorted(input_hashes(given).values()) != sorted((m.get("inputs") or {}).values()):
        return "made from other inputs"
    if kind == "validation-report" and not (m.get("metrics") or {}).get("passed"):
        return "a failed validation"
    return None


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def reuse_output(stage: str, inputs: dict[str, Any], out: Path, run) -> dict[str, Any] | None:
    """Under ``rlhf run --resume``: copy an earlier attempt's matching output of ``stage`` to ``out`` and
    return its metrics; None when there is none (or this is not a resumed run): the step runs."""
    from rlhf.pipeline.stages import stage as stage_spec

    root = os.environ.get(ENV)
    if not root or stage not in REUSABLE:
        return None
    spec = stage_spec(stage)
    configs = [run.section(s) for s in spec.sections]
    for art in earlier_outputs(Path(root), stage, out.name, out):
        why = mismatch(art, stage, spec.output.kind, inputs, configs)
        if why:
            log.info("[%s] not reusing %s: %s", stage, art, why)
            continue
        if out.exists():
            shutil.rmtree(out)
        tmp = out.parent / f".{out.name}.reuse-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(art, tmp, copy_function=_link_or_copy)
        os.replace(tmp, out)
        log.info("[%s] reused %s (same inputs and config, finished by an earlier attempt)", stage, art)
        return json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("metrics") or {}
    return None


def adopt_checkpoints(stage: str, out: Path, run) -> Path | None:
    """Under ``rlhf run --resume``: move the checkpoints an earlier attempt of training stage ``stage`` left
    beside its output (``<output>.checkpoints``) beside ``out``, where the stage looks for them.

    Nothing moves when the stage has its own ``checkpoint_dir`` (it is the same for every attempt) or
    already has checkpoints. Returns the directory taken over."""
    from rlhf.pipeline.stages import TRAINING_STAGES

    root = os.environ.get(ENV)
    if not root or stage not in TRAINING_STAGES or getattr(run.section(stage), "checkpoint_dir", None):
        return None
    mine = out.parent / f"{out.name}.checkpoints"
    if mine.exists():
        return None
    earlier = []
    for job in (j for j in Path(root).iterdir() if j.is_dir() and not j.name.startswith(".")):
        for task in (t for t in job.iterdir() if t.is_dir() and _stage_of(t.name) == stage):
            ck = task / f"{out.name}.checkpoints"
            if ck.is_dir() and Path(os.path.realpath(ck)) != Path(os.path.realpath(mine)) and any(ck.iterdir()):
                earlier.append(ck)
    if not earlier:
        return None
    newest = max(earlier, key=lambda p: p.stat().st_mtime)
    mine.parent.mkdir(parents=True, exist_ok=True)
    os.replace(newest, mine)
    log.info("[%s] took over the checkpoints of an earlier attempt (%s)", stage, newest)
    return newest
