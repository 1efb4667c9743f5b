"""The pipeline's stage table and the step runner that KFP components and Trainer jobs call.

No KFP imports here: a KFP component is a few lines that hand its artifacts'
paths to :func:`run_component`, which loads the stage config exactly like the
CLI does (``params.yaml`` < active profile < overrides) and calls the stage
function. The same table (:data:`STAGES`) drives the KFP pipeline, and a test
checks it against ``dvc.yaml`` and the CLI, so the three doors into the stages
cannot drift apart.

Also here, because pods run it without the repository:

* :func:`fetch_raw`: get ``data/raw`` by its DVC hash straight from the DVC
  remote (a cluster's prepare step has no git checkout);
* :func:`job_main` (``python -m rlhf.steps job ...``): the entry point of a
  multi-node Trainer job; stages its inputs from object storage, runs
  ``torchrun ... -m rlhf.cli <stage>`` and uploads the output from node 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.errors import ConfigError, UserError

log = logging.getLogger("rlhf")


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its config sections, its inputs (named as the CLI names them), its output."""

    name: str
    sections: tuple[str, ...]
    inputs: tuple[str, ...]
    output: str
    gpu: bool = False
    optional_inputs: tuple[str, ...] = field(default=())


#: The pipeline, in order. Input names are the CLI's parameter names (``rlhf reward --sft``),
#: the KFP components' input names and the keys :func:`run_stage` takes.
STAGES: tuple[Stage, ...] = (
    Stage("prepare", ("prepare",), ("raw",), "dataset"),
    Stage("validate", ("validate",), ("dataset",), "validation"),
    Stage("sft", ("model", "sft"), ("dataset",), "model", gpu=True),
    Stage("reward", ("model", "reward"), ("dataset", "sft"), "model", gpu=True),
    Stage("ppo", ("model", "ppo"), ("dataset", "sft", "reward_model"), "model", gpu=True),
    Stage("evaluate", ("model", "evaluate"), ("dataset", "policy", "baseline", "reward_model", "champion"),
          "evaluation", gpu=True, optional_inputs=("champion",)),
    Stage("register", ("register",), ("policy", "reward_model", "evaluation"), "registration"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
#: evaluate's ``champion`` input: fetch the current champion of the registered model from the registry
CHAMPION = "@champion"
TRAINING_STAGES = ("sft", "reward", "ppo")


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ConfigError(f"unknown stage '{name}'", hint=f"stages: {', '.join(STAGE_NAMES)}")


# ------------------------------------------------------------------------------------------ params


def setup_logging() -> None:
    """Progress lines of the stages on stderr (a KFP step's log), as the CLI prints them."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=os.environ.get("RLHF_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def materialize_params(params_yaml: str, profile: str, dest: str | Path) -> Path:
    """Write the pipeline's params text to ``dest/params.yaml`` with the profile resolved.

    ``profile``: empty keeps ``$RLHF_PROFILE`` / the file's ``profile:``; a name selects that profile;
    ``none`` runs the base sections (no profile).
    """
    try:
        data = yaml.safe_load(params_yaml or "") or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"pipeline parameter params_yaml is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("pipeline parameter params_yaml must be a mapping of stage sections")
    if profile:
        os.environ.pop("RLHF_PROFILE", None)
        if profile.lower() in ("none", "base"):
            data.pop("profile", None)
        else:
            known = data.get("profiles") or {}
            if profile not in known:
                raise ConfigError(f"unknown profile '{profile}'",
                                  hint=f"known profiles: {', '.join(sorted(known)) or 'none'}, or 'none'")
            data["profile"] = profile
    path = Path(dest) / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def config_classes() -> dict[str, Any]:
    """Section name -> config class, for every section a stage reads."""
    from rlhf import config as c

    return {"prepare": c.PrepareConfig, "validate": c.ValidateConfig, "model": c.ModelConfig, "sft": c.SFTConfig,
            "reward": c.RewardConfig, "ppo": c.PPOConfig, "evaluate": c.EvaluateConfig,
            "register": c.RegisterConfig}


def check_overrides(overrides: dict | None) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` with known sections and fields only (values are checked on load)."""
    classes = config_classes()
    for section, fields in (overrides or {}).items():
        if section not in classes:
            raise ConfigError(f"overrides: unknown section '{section}'", hint=f"sections: {', '.join(classes)}")
        if not isinstance(fields, dict):
            raise ConfigError(f"overrides: '{section}' must map field names to values")
        unknown = sorted(set(fields) - set(classes[section].model_fields))
        if unknown:
            raise ConfigError(f"overrides: unknown field(s) {', '.join(f'{section}.{k}' for k in unknown)}",
                              hint="see params.yaml / src/rlhf/config.py for the known fields")
    return dict(overrides or {})


def knob_overrides(stage_name: str, *, model_name: str = "", lora: str = "", max_steps: int = 0,
                   total_steps: int = 0, kl_coef: float = -1.0, registered_model_name: str = "",
                   overrides: dict | None = None) -> dict[str, dict[str, Any]]:
    """Pipeline knobs -> ``{section: {field: value}}``; empty / 0 / negative means "as in params.yaml".

    ``overrides`` (``{section: {field: value}}``, any config field) comes first; the named knobs win.
    """
    out: dict[str, dict[str, Any]] = {k: dict(v) for k, v in check_overrides(overrides).items()}
    if model_name:
        out.setdefault("model", {})["name"] = model_name
    if lora:
        if lora.lower() not in ("true", "false"):
            raise ConfigError(f"pipeline parameter lora must be 'true', 'false' or empty, got {lora!r}")
        out.setdefault("model", {})["lora"] = lora.lower() == "true"
    if max_steps and max_steps > 0 and stage_name in ("sft", "reward"):
        out.setdefault(stage_name, {})["max_steps"] = int(max_steps)
    if stage_name == "ppo":
        if total_steps and total_steps > 0:
            out.setdefault("ppo", {})["total_steps"] = int(total_steps)
        if kl_coef is not None and kl_coef >= 0:
            out.setdefault("ppo", {})["kl_coef"] = float(kl_coef)
    if registered_model_name and stage_name in ("evaluate", "register"):
        out.setdefault("register", {})["model_name"] = registered_model_name
    return out


#: pipeline parameters that change a stage config (see :func:`knob_overrides`)
KNOBS = ("model_name", "lora", "sft_max_steps", "reward_max_steps", "ppo_total_steps", "ppo_kl_coef",
         "registered_model_name")


def pipeline_overrides(overrides: dict | None = None, knobs: dict[str, Any] | None = None
                       ) -> dict[str, dict[str, Any]]:
    """``overrides`` plus every knob among the pipeline ``knobs`` (other parameters are ignored).

    What the run's stages see, all sections at once: each stage component applies the same knobs
    to its own section through :func:`knob_overrides`.
    """
    k = {name: v for name, v in (knobs or {}).items() if name in KNOBS and v is not None}
    out = {s: dict(v) for s, v in check_overrides(overrides).items()}
    per_stage = {"sft": {"max_steps": int(k.get("sft_max_steps") or 0)},
                 "reward": {"max_steps": int(k.get("reward_max_steps") or 0)},
                 "ppo": {"total_steps": int(k.get("ppo_total_steps") or 0),
                         "kl_coef": float(k.get("ppo_kl_coef", -1.0))},
                 "register": {"registered_model_name": str(k.get("registered_model_name") or "")}}
    lora = k.get("lora", "")
    lora = str(lora).lower() if lora != "" else ""  # -p lora=false arrives as the bool False
    for stage_name, kw in per_stage.items():
        found = knob_overrides(stage_name, model_name=str(k.get("model_name") or ""), lora=lora, **kw)
        for section, fields in found.items():
            out.setdefault(section, {}).update(fields)
    return out


#: config sections in the pipeline's fingerprint: everything that shapes the trained and gated
#: model. ``register`` is left out: names, promotion rules and ``rlhf models generate`` defaults.
FINGERPRINT_SECTIONS = ("prepare", "validate", "model", "sft", "reward", "ppo", "evaluate")


def pipeline_config(params: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict]:
    """Every stage config of a run, resolved (defaults < params.yaml < profile < overrides), secrets redacted.

    The active profile is the one :func:`rlhf.config.load_stage` sees (``$RLHF_PROFILE``, else the
    file's ``profile:``), as in a pipeline step after :func:`materialize_params`.
    """
    from rlhf import tracking

    classes = config_classes()
    return {s: tracking.config_params(load_config(classes[s], s, Path(params), overrides))
            for s in FINGERPRINT_SECTIONS}


def config_fingerprint(params: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``{"hash": <16 hex>, "sections": {section: <12 hex>}}`` of :func:`pipeline_config`.

    The one function behind the ``pipeline_config_hash`` lineage tag of a registered model and the
    params check of ``rlhf retrain``: same resolved configs, same hashes.
    """
    import hashlib

    def digest(obj: Any) -> str:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    cfg = pipeline_config(params, overrides)
    return {"hash": digest(cfg)[:16], "sections": {s: digest(v)[:12] for s, v in cfg.items()}}


def load_config(cls, section: str, params: Path, overrides: dict[str, dict[str, Any]] | None):
    from rlhf.config import load_stage

    return load_stage(cls, section, params, (overrides or {}).get(section))


# ------------------------------------------------------------------------------------------ stages


def run_stage(name: str, inputs: dict[str, str | Path | None], out: str | Path, params: str | Path,
              overrides: dict[str, dict[str, Any]] | None = None, *, run_id: str = "",
              data_hash: str = "", data_revision: str = "") -> dict[str, Any]:
    """Run one stage on local paths: the same calls the CLI makes. Returns the stage's metrics."""
    from rlhf import config as c

    params = Path(params)
    spec = stage(name)
    missing = [k for k in spec.inputs if k not in spec.optional_inputs and not inputs.get(k)]
    if missing:
        raise ConfigError(f"stage {name}: missing input(s) {', '.join(missing)}")
    if name == "prepare":
        from rlhf.data import prepare

        return prepare(inputs["raw"], out, load_config(c.PrepareConfig, "prepare", params, overrides))
    if name == "validate":
        from rlhf.validate import validate

        return validate(inputs["dataset"], out, load_config(c.ValidateConfig, "validate", params, overrides))
    model_cfg = load_config(c.ModelConfig, "model", params, overrides) if "model" in spec.sections else None
    if name == "sft":
        from rlhf.sft import train_sft

        return train_sft(inputs["dataset"], out, load_config(c.SFTConfig, "sft", params, overrides), model_cfg)
    if name == "reward":
        from rlhf.reward import train_reward

        return train_reward(inputs["dataset"], inputs["sft"], out,
                            load_config(c.RewardConfig, "reward", params, overrides), model_cfg)
    if name == "ppo":
        from rlhf.ppo import train_ppo

        return train_ppo(inputs["dataset"], inputs["sft"], inputs["reward_model"], out,
                         load_config(c.PPOConfig, "ppo", params, overrides), model_cfg)
    if name == "evaluate":
        from rlhf.evaluate import evaluate

        champion = inputs.get("champion") or None
        if champion == CHAMPION:
            champion = fetch_champion(params, overrides)
        return evaluate(inputs["dataset"], inputs["policy"], inputs["baseline"], inputs["reward_model"], out,
                        load_config(c.EvaluateConfig, "evaluate", params, overrides), model_cfg, champion=champion)
    if name == "register":
        return register(inputs, out, params, overrides, run_id=run_id, data_hash=data_hash,
                        data_revision=data_revision)
    raise ConfigError(f"unknown stage '{name}'")  # pragma: no cover - stage() already checked


def register_config(params: str | Path, overrides: dict[str, dict[str, Any]] | None = None):
    from rlhf.config import RegisterConfig

    return load_config(RegisterConfig, "register", Path(params), overrides)


def register(inputs: dict[str, Any], out: str | Path, params: str | Path,
             overrides: dict[str, dict[str, Any]] | None = None, *, run_id: str = "", data_hash: str = "",
             data_revision: str = "") -> dict[str, Any]:
    """Register the evaluated policy (and reward model) in MLflow through :func:`rlhf.registry.register`.

    Writes the receipt to ``out/registration.json``. With tracking off there is no registry: the
    receipt says so and nothing else happens. ``overrides``: those of the whole run (every section,
    :func:`pipeline_overrides`), so the version's ``pipeline_config_hash`` is that of what was trained.
    """
    from rlhf import tracking

    cfg = register_config(params, overrides)
    if not tracking.enabled():
        doc: dict[str, Any] = {"registered": False, "model_name": cfg.model_name,
                               "reason": "tracking is off (RLHF_TRACKING=off): no model registry"}
    else:
        from rlhf import registry

        pipeline_run_id = os.environ.get("RLHF_PIPELINE_RUN_ID") or run_id or None
        doc = {"registered": True, **registry.register(
            inputs["policy"], inputs["reward_model"], inputs["evaluation"], cfg, pipeline_run_id=pipeline_run_id,
            config_fingerprint=config_fingerprint(params, overrides))}
    doc.update({"data_hash": data_hash, "data_revision": data_revision})
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "registration.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    log.info("[register] %s", doc.get("decision") or doc.get("reason"))
    return doc


def fetch_champion(params: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> Path | None:
    """The registry's current champion policy as a local directory, or None (none yet, or tracking off)."""
    from rlhf import tracking

    if not tracking.enabled():
        return None
    from rlhf import registry

    path = registry.champion_dir(register_config(params, overrides))
    log.info("[evaluate] champion: %s", path or "none yet")
    return path


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict (what KFP's Metrics artifact accepts)."""
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


def _tag_artifact(artifact: Any, path: Path) -> None:
    """Copy the manifest's identity (kind, content hash) into a KFP artifact's metadata."""
    mf = path / "manifest.json"
    if artifact is not None and hasattr(artifact, "metadata") and mf.exists():
        m = json.loads(mf.read_text())
        artifact.metadata.update({k: m[k] for k in ("kind", "content_hash", "schema_version") if m.get(k)})


def run_component(name: str, *, inputs: dict[str, Any], out: Any, params_yaml: str, profile: str = "",
                  overrides: dict[str, dict[str, Any]] | None = None, metrics: Any = None, html: Any = None,
                  run_id: str = "", data_hash: str = "", data_revision: str = "") -> dict[str, Any]:
    """The body of every KFP stage component: artifacts in, stage, artifacts out.

    ``inputs`` maps input names to KFP input artifacts (anything with ``.path``), plain paths, or
    None; ``out`` is the output artifact; ``metrics`` / ``html`` the optional Metrics / HTML outputs.
    """
    setup_logging()
    if run_id:
        os.environ.setdefault("KFP_RUN_ID", run_id)
    if data_hash:
        os.environ.setdefault("RLHF_DATA_HASH", data_hash)
    if profile and profile.lower() not in ("none", "base"):
        os.environ["RLHF_PROFILE"] = profile
    paths = {k: (getattr(v, "path", v) if v is not None else None) for k, v in inputs.items()}
    out_path = Path(getattr(out, "path", out))
    with tempfile.TemporaryDirectory(prefix=f"rlhf-{name}-") as tmp, parent_run(run_id):
        params = materialize_params(params_yaml, profile, tmp)
        result = run_stage(name, paths, out_path, params, overrides, run_id=run_id, data_hash=data_hash,
                           data_revision=data_revision)
    _tag_artifact(out, out_path)
    if metrics is not None:
        for k, v in numeric_metrics(result).items():
            metrics.log_metric(k, v)
    if html is not None:
        report = out_path / "report.html"
        if report.exists():
            Path(html.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(report, html.path)
    log.info("[%s] done: %s", name, json.dumps(numeric_metrics(result), sort_keys=True)[:400])
    return result


@contextlib.contextmanager
def parent_run(run_id: str):
    """The MLflow parent run of this pipeline run around one step.

    ``rlhf run`` owns the parent itself (``RLHF_PARENT_RUN_ID`` is set); on a cluster each step finds
    or creates it by the KFP run id (``tracking.start_pipeline_run``) and leaves it FINISHED, or
    FAILED when the step fails, so the parent's status is that of the last step that ran.
    """
    from rlhf import tracking

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


def gate_decision(evaluation_dir: str | Path) -> str:
    """``passed`` or ``failed``: the evaluate stage's gate.json (what the pipeline's dsl.If reads)."""
    gate = json.loads((Path(evaluation_dir) / "gate.json").read_text())
    return "passed" if gate.get("passed") else "failed"


# ------------------------------------------------------------------------------------------ data


def _dvc_remote_fs(remote: str):
    import fsspec

    opts: dict[str, Any] = {}
    endpoint = os.environ.get("DVC_REMOTE_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if remote.startswith(("s3://", "minio://")) and endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    proto = remote.split("://", 1)[0] if "://" in remote else "file"
    if proto == "minio":
        proto = "s3"
    return fsspec.filesystem(proto, **opts), remote.split("://", 1)[-1].rstrip("/")


def fetch_raw(data_hash: str, remote: str, out: str | Path) -> Path:
    """Download the raw data version ``data_hash`` (DVC md5 of ``data/raw``, ``.dir`` suffix optional).

    Reads the DVC 3 remote layout directly (``files/md5/<2>/<30>[.dir]``), so a pod needs neither git
    nor a DVC repository; every file's md5 is checked.
    """
    import hashlib

    if not data_hash:
        raise ConfigError("no raw data: give raw_data (a path) or data_hash (the md5 in data.dvc)")
    if not remote:
        raise ConfigError("no DVC remote to fetch the data from", hint="set DVC_REMOTE_URL (ConfigMap rlhf-config)")
    fs, root = _dvc_remote_fs(remote)
    h = data_hash.removesuffix(".dir")

    def obj(md5: str, suffix: str = "") -> str:
        return f"{root}/files/md5/{md5[:2]}/{md5[2:]}{suffix}"

    try:
        listing = json.loads(fs.cat_file(obj(h, ".dir")))
    except FileNotFoundError:
        raise UserError(f"data version {h} is not in the DVC remote {remote}",
                        hint="`dvc push` it from the machine that has it") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for entry in listing:
        target = out / entry["relpath"]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(obj(entry["md5"]), str(target))
        if hashlib.md5(target.read_bytes()).hexdigest() != entry["md5"]:
            raise UserError(f"{entry['relpath']}: checksum mismatch after download from {remote}")
    log.info("[prepare] fetched data %s (%d files) from %s", h, len(listing), remote)
    return out


def resolve_raw(raw_data: str, data_hash: str, dest: str | Path) -> Path:
    """Local raw data: ``raw_data`` when it is a local path, else fetched by hash from the DVC remote."""
    if raw_data and "://" not in raw_data:
        p = Path(raw_data)
        if not p.exists():
            raise UserError(f"raw data not found: {p}", hint="run `make data` (or `rlhf fetch-data`) first")
        return p
    if raw_data:  # a URL of a directory of raw files
        fs, root = _dvc_remote_fs(raw_data)
        fs.get(root + "/", str(dest) + "/", recursive=True)
        return Path(dest)
    return fetch_raw(data_hash, os.environ.get("DVC_REMOTE_URL", ""), dest)


# ------------------------------------------------------------------------------------------ jobs


def copy_tree(src: str, dst: str) -> None:
    """Copy a directory between local paths and object storage (s3://, minio://, file paths)."""
    if "://" not in src and "://" not in dst:
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    if "://" in src:
        fs, root = _dvc_remote_fs(src)
        Path(dst).mkdir(parents=True, exist_ok=True)
        fs.get(root + "/", dst.rstrip("/") + "/", recursive=True)
    else:
        fs, root = _dvc_remote_fs(dst)
        fs.put(src.rstrip("/") + "/", root + "/", recursive=True)


def job_command(name: str, scratch_url: str, rendezvous: list[str]) -> list[str]:
    """The command line of every node of a multi-node job (see :func:`job_main`)."""
    return ["python", "-m", "rlhf.steps", "job", "--stage", name, "--scratch", scratch_url, "--", *rendezvous]


def torchrun_args(name: str, inputs: dict[str, str], out: str, params: str, rendezvous: list[str]) -> list[str]:
    """``torchrun <rendezvous> -m rlhf.cli <stage> --<input> <path> ... --out <out> --params <params>``."""
    flags = {"dataset": "--dataset", "sft": "--sft", "reward_model": "--reward"}
    cmd = ["torchrun", *rendezvous, "-m", "rlhf.cli", name]
    for k in stage(name).inputs:
        cmd += [flags[k], inputs[k]]
    return cmd + ["--out", out, "--params", params]


def job_main(argv: list[str] | None = None) -> int:
    """Entry point of a Trainer job's node: stage inputs, ``torchrun -m rlhf.cli <stage>``, upload (node 0)."""
    parser = argparse.ArgumentParser(prog="python -m rlhf.steps job")
    parser.add_argument("--stage", required=True, choices=TRAINING_STAGES)
    parser.add_argument("--scratch", required=True, help="object-store prefix: inputs/, params.yaml, output/")
    parser.add_argument("--workdir", default=os.environ.get("RLHF_JOB_WORKDIR", "/tmp/rlhf-job"))
    parser.add_argument("rendezvous", nargs="*", help="torchrun's --nnodes/--node-rank/... flags")
    args = parser.parse_args(argv)
    setup_logging()
    work = Path(args.workdir)
    local_inputs = {}
    for k in stage(args.stage).inputs:
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
        print("usage: python -m rlhf.steps job --stage STAGE --scratch URL -- [torchrun flags]", file=sys.stderr)
        return 2
    try:
        return job_main(argv[1:])
    except UserError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
