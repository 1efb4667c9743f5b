"""The model registry (MLflow): register the evaluated policy and its reward model, gated promotion, lineage.

``register(policy_dir, reward_dir, eval_dir)`` is the last pipeline stage (the
KFP ``register`` component and the ``register`` DVC stage call it):

1. It checks its inputs before touching MLflow: the three manifests, and that
   the evaluation's ``gate.json`` belongs to *this* policy (content hashes). A
   missing or foreign evaluation registers nothing.
2. The reward model is registered under ``reward_model_name``, once per distinct
   content (a retrained identical model reuses its version).
3. The policy is logged with the ``transformers`` flavor from its loaded
   components (``{"model", "tokenizer"}``, task ``text-generation``, the chat
   template as pyfunc ``prompt_template``) and registered under ``model_name``.
   Serving loads it with ``mlflow.transformers.load_model("models:/<name>@champion")``
   (a text-generation pipeline, or ``return_type="components"``) or
   ``mlflow.pyfunc.load_model(...)`` (prompt in, completion out).
4. Idempotent: a retried pipeline run (same ``pipeline_run_id`` tag), or the
   same policy bytes (``policy_content_hash`` tag), finds its version instead of
   creating a second one.
5. Lineage on every version (tags): data hash (DVC), dataset hash, git commit (``RLHF_GIT_COMMIT``
   in the image), the step images and the training image's digest (:func:`image_lineage`),
   pipeline run id, parent / training / evaluation / register run ids, training
   params (redacted JSON) and their hash, the hash of the whole resolved
   pipeline configuration (``pipeline_config_hash``, per section in
   ``pipeline_config_sections``; what ``rlhf retrain`` compares), evaluation
   metrics (``metric.*``), gate decision, the reward model version. The register run holds the params,
   the metrics and the manifests (``lineage/``).
6. Aliases: every new version gets ``challenger``. ``champion`` moves only when
   the gate passed *and*, if there is a champion, the evaluation compared
   against that very champion (its content hash is an input of the evaluation);
   never twice automatically for the same version; never for a failed or
   gated-out run. Every move is recorded (``champion_history`` for rollback,
   ``champion_log`` for audit, ``promoted_*`` tags on the version); the reward
   model's ``champion`` follows the policy's.

Around it: :func:`champion_dir` (the champion as a local policy directory for
``evaluate(champion=...)``), :func:`list_versions`, :func:`promote` (manual, with
a reason), :func:`rollback` and :func:`generate` (the ``rlhf models`` commands).
"""

from __future__ import annotations

import datetime
import functools
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlhf.config import ModelConfig, RegisterConfig
from rlhf.errors import UserError
from rlhf.io import MANIFEST, read_manifest, sha256_dir, write_json
from rlhf.mlops import tracking

log = logging.getLogger("rlhf")

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
LOG_TAG = "champion_log"
CONFIG_HASH_TAG = "pipeline_config_hash"
CONFIG_SECTIONS_TAG = "pipeline_config_sections"
TAG_MAX = 5000
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/ ]{0,250}$")
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


# ----------------------------------------------------------------------------- small helpers


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return os.environ.get("RLHF_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _refusals(action: str):
    """Decorator: MLflow's 401/403 become one line naming ``action`` (``{name}``: the model) and the user."""
    def wrap(fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            cfg = next((a for a in (*args, *kwargs.values()) if isinstance(a, RegisterConfig)), None)
            with tracking.refusals(action.format(name=(cfg or RegisterConfig()).model_name)):
                return fn(*args, **kwargs)
        return guarded
    return wrap


def _check_name(name: str) -> str:
    if not _NAME_OK.match(name):
        raise UserError(f"registered model name {name!r} is not allowed", where="register.model_name",
                        hint="letters, digits, '_', '.', '-', '/' and spaces")
    return name


def _connect():
    if not tracking.enabled():
        raise UserError("the model registry needs MLflow, but RLHF_TRACKING is off",
                        hint="unset RLHF_TRACKING (MLFLOW_TRACKING_URI picks the server; default ./mlflow.db)")
    client, _ = tracking.connect()
    return client


def _tag(value: Any) -> str:
    return tracking.redact_value(str(value))[:TAG_MAX]


def _get_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in _MISSING:
            return None
        raise


def _get_version(client, name: str, version: int | str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if e.error_code in _MISSING:
            return None
        raise


def _ensure_registered_model(client, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as e:
        if e.error_code not in _MISSING:
            raise
    try:
        client.create_registered_model(name, tags={"managed_by": "rlhf"}, description=description)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # created concurrently: fine
            raise


def _versions(client, name: str, **tags: str) -> list:
    """Versions of ``name`` carrying all ``tags``, oldest first ([] when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    for v in tags.values():
        if "'" in v or "`" in v:
            raise UserError(f"tag value {v!r} cannot contain quotes")
    flt = f"name='{name}'" + "".join(f" and tags.`{k}`='{v}'" for k, v in tags.items())
    try:
        found = client.search_model_versions(flt)
    except MlflowException as e:
        if e.error_code in _MISSING:
            return []
        raise
    return sorted(found, key=lambda mv: int(mv.version))


def _aliases(client, name: str) -> dict[str, int]:
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code in _MISSING:
            return {}
        raise
    return {a: int(v) for a, v in (rm.aliases or {}).items()}


def _model_tags(client, name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(name).tags or {})
    except MlflowException as e:
        if e.error_code in _MISSING:
            return {}
        raise


def _history(client, name: str) -> list[int]:
    try:
        return [int(v) for v in json.loads(_model_tags(client, name).get(HISTORY_TAG, "[]"))]
    except (ValueError, TypeError):
        log.warning("registry: unreadable %s tag on %s; starting a new history", HISTORY_TAG, name)
        return []


def _append_log(client, name: str, event: dict[str, Any]) -> None:
    """Append to the ``champion_log`` audit tag, dropping the oldest entries to stay within the tag limit."""
    try:
        entries = json.loads(_model_tags(client, name).get(LOG_TAG, "[]"))
    except (ValueError, TypeError):
        entries = []
    entries.append(event)
    text = json.dumps(entries, separators=(",", ":"))
    while len(text) > TAG_MAX and len(entries) > 1:
        entries.pop(0)
        text = json.dumps(entries, separators=(",", ":"))
    client.set_registered_model_tag(name, LOG_TAG, text[:TAG_MAX])


def _set_alias_if_newer(client, name: str, alias: str, version: int) -> bool:
    """Point ``alias`` at ``version`` unless it already points at a newer one (a late retry must not win)."""
    current = _aliases(client, name).get(alias)
    if current is not None and current >= version:
        return current == version
    client.set_registered_model_alias(name, alias, str(version))
    return True


def _set_champion(client, cfg: RegisterConfig, mv, *, reason: str, by: str) -> int | None:
    """Move ``champion`` to ``mv`` with its bookkeeping; re-entrant (a retry completes a half-done move)."""
    name = cfg.model_name
    version = int(mv.version)
    previous = _aliases(client, name).get(CHAMPION)
    history = _history(client, name)
    if previous is not None and previous != version and (not history or history[-1] != previous):
        history.append(previous)  # the alias was moved outside rlhf (UI, API): keep the stack truthful
    if previous != version:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    if not history or history[-1] != version:
        history.append(version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-cfg.history_length:]))
    if not mv.tags.get("promoted_at"):
        for k, v in {"promoted_at": _now(), "promoted_by": by, "promotion_reason": reason,
                     "previous_champion": previous if previous is not None else "none"}.items():
            client.set_model_version_tag(name, str(version), k, _tag(v))
        _append_log(client, name, {"at": _now(), "event": "promote", "version": version, "from": previous,
                                   "by": by, "reason": reason[:300]})
    _follow_reward_champion(client, cfg, mv)
    return previous


def _follow_reward_champion(client, cfg: RegisterConfig, mv) -> None:
    rv = mv.tags.get("reward_model_version")
    if cfg.register_reward_model and rv and rv.isdigit() and _get_version(client, cfg.reward_model_name, rv):
        client.set_registered_model_alias(cfg.reward_model_name, CHAMPION, rv)


def _pip_requirements() -> list[str]:
    import importlib.metadata as md

    reqs = []
    for pkg in ("mlflow", "transformers", "torch", "tokenizers", "safetensors"):
        try:
            reqs.append(f"{pkg}=={md.version(pkg).split('+')[0]}")
        except md.PackageNotFoundError:
            pass
    return reqs


def _prompt_template(tokenizer) -> str:
    """The chat template around ``{prompt}`` (other braces escaped), for the pyfunc flavor."""
    from rlhf.train.models import chat_prompt

    marker = "\x00PROMPT\x00"
    text = chat_prompt(tokenizer, marker)
    return text.replace("{", "{{").replace("}", "}}").replace(marker, "{prompt}")


def _model_card(title: str, lineage: dict[str, Any], metrics: dict[str, Any]):
    from huggingface_hub import ModelCard

    rows = "\n".join(f"| {k} | {v} |" for k, v in lineage.items() if v not in (None, ""))
    mrows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())
                      if isinstance(v, (int, float)) and not isinstance(v, bool))
    text = (f"---\nlibrary_name: transformers\ntags: [rlhf]\n---\n# {title}\n\nRegistered by the rlhf pipeline.\n\n"
            f"## Lineage\n\n| key | value |\n|---|---|\n{rows}\n\n## Evaluation\n\n| metric | value |\n|---|---|\n"
            f"{mrows}\n")
    return ModelCard(text)


def _finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    import math

    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


# ----------------------------------------------------------------------------- inputs


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise UserError(f"{what} not found: {path}", hint="run the evaluate stage first") from None
    except ValueError as e:
        raise UserError(f"{what} is not valid JSON: {e}", where=str(path)) from None


def _load_inputs(policy_dir, reward_dir, eval_dir) -> dict[str, Any]:
    """Manifests, gate and metrics; checks that the evaluation is of this policy. Touches nothing."""
    policy_dir, eval_dir = Path(policy_dir), Path(eval_dir)
    pm = read_manifest(policy_dir, expect_kind="policy")
    em = read_manifest(eval_dir, expect_kind="evaluation")
    gate = _read_json(eval_dir / "gate.json", "gate decision (gate.json)")
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        raise UserError("gate.json has no boolean 'passed'", where=str(eval_dir / "gate.json"),
                        hint="re-run rlhf evaluate")
    metrics = _read_json(eval_dir / "metrics.json", "evaluation metrics") if (eval_dir / "metrics.json").exists() \
        else em.get("metrics", {})
    p_hash = pm.get("content_hash") or sha256_dir(policy_dir)
    inputs = em.get("inputs") or {}
    if inputs.get("policy") and inputs["policy"] != p_hash:
        raise UserError(f"{eval_dir} is the evaluation of another policy ({inputs['policy'][:12]}), not of "
                        f"{policy_dir} ({p_hash[:12]})",
                        hint=f"run rlhf evaluate --policy {policy_dir} first; nothing was registered")
    out = {"policy_manifest": pm, "eval_manifest": em, "gate": gate, "metrics": metrics, "policy_hash": p_hash,
           "eval_hash": em.get("content_hash"), "evaluated_against": inputs.get("champion"),
           "reward_manifest": None, "reward_hash": None}
    if reward_dir is not None:
        rm = read_manifest(reward_dir, expect_kind="reward-model")
        out["reward_manifest"] = rm
        out["reward_hash"] = rm.get("content_hash") or sha256_dir(reward_dir)
        if inputs.get("reward_model") and inputs["reward_model"] != out["reward_hash"]:
            log.warning("register: %s was scored with another reward model (%s) than %s (%s)", eval_dir,
                        inputs["reward_model"][:12], reward_dir, out["reward_hash"][:12])
    return out


def _lineage(inp: dict[str, Any], pipeline_run_id: str | None) -> dict[str, Any]:
    pm, em, rm = inp["policy_manifest"], inp["eval_manifest"], inp["reward_manifest"] or {}
    params = {"train": pm.get("config") or {}, "model": pm.get("model") or {}}
    params_json = json.dumps(tracking.redact(tracking.flatten(params)), sort_keys=True, separators=(",", ":"),
                             default=str)
    gate = inp["gate"]
    return {
        "pipeline_run_id": pipeline_run_id,
        "parent_run_id": os.environ.get(tracking.ENV_PARENT),
        "kfp_run_id": os.environ.get("KFP_RUN_ID"),
        "git_commit": tracking.git_commit(),
        "data_hash": tracking.data_hash(),
        "dataset_hash": (pm.get("inputs") or {}).get("dataset"),
        "policy_content_hash": inp["policy_hash"],
        "policy_stage": pm.get("stage") or "",
        "base_model": (pm.get("model") or {}).get("name"),
        "training_run_id": pm.get("mlflow_run_id"),
        "evaluation_content_hash": inp["eval_hash"],
        "evaluation_run_id": em.get("mlflow_run_id"),
        "reward_content_hash": inp["reward_hash"],
        "reward_run_id": rm.get("mlflow_run_id"),
        "gate_passed": str(bool(gate["passed"])).lower(),
        "gate_decision": "passed" if gate["passed"] else "failed",
        "gate_reason": gate.get("reason", ""),
        "gate_metric": gate.get("metric"),
        "evaluated_against": inp["evaluated_against"] or "none",
        "params_hash": hashlib.sha256(params_json.encode()).hexdigest()[:16],
        "params": params_json,
        "profile": tracking.profile(),
        **image_lineage(),
    }


#: the images of the pipeline's steps, set on the register task by the compiled pipeline (rlhf.pipeline.dag)
ENV_IMAGE, ENV_TRAINING_IMAGE = "RLHF_PIPELINE_IMAGE", "RLHF_PIPELINE_GPU_IMAGE"


def image_lineage() -> dict[str, str | None]:
    """``image`` / ``training_image`` (the CPU and GPU step images, as compiled: ``repo@sha256:...`` when
    pinned) and ``image_digest`` (the training image's digest, when pinned); None outside a cluster run."""
    image, training = os.environ.get(ENV_IMAGE) or None, os.environ.get(ENV_TRAINING_IMAGE) or None
    digest = training.partition("@")[2] if training and "@sha256:" in training else None
    return {"image": image, "training_image": training, "image_digest": digest}


# ----------------------------------------------------------------------------- promotion rule


def promotion_decision(gate: dict[str, Any], evaluated_against: str | None, champion, candidate_tags: dict[str, str],
                       cfg: RegisterConfig) -> tuple[bool, str]:
    """Whether a registered candidate becomes champion, and why (pure: no MLflow calls).

    ``champion``: the current champion ModelVersion (or None); ``evaluated_against``: the content
    hash of the champion the evaluation compared with (None when it compared with none).
    """
    if not gate.get("passed"):
        return False, f"gate failed: {gate.get('reason', 'no reason given')}"
    if not cfg.auto_promote:
        return False, "gate passed, but automatic promotion is off (register.auto_promote); use rlhf models promote"
    if candidate_tags.get("promoted_at"):
        return False, ("gate passed, but this version was champion before (promoted "
                       f"{candidate_tags['promoted_at']}); automatic promotion happens once per version")
    if champion is None:
        return True, f"first champion: {gate.get('reason', 'gate passed')}"
    if cfg.require_champion_comparison:
        champ_hash = champion.tags.get("policy_content_hash")
        if not evaluated_against:
            return False, (f"gate passed, but the evaluation did not compare against the current champion "
                           f"v{champion.version}; run evaluate with champion=champion_dir()")
        if evaluated_against != champ_hash:
            return False, (f"gate passed, but against another model ({evaluated_against[:12]}) than the current "
                           f"champion v{champion.version} ({(champ_hash or '?')[:12]}); evaluate again")
        beats = [c for c in gate.get("checks", []) if c.get("check") == "beats_champion"]
        if not beats or not beats[0].get("passed"):
            return False, "gate passed without a passed beats_champion check"
    return True, f"beats champion v{champion.version}: {gate.get('reason', 'gate passed')}"


# ----------------------------------------------------------------------------- register


def _log_and_register(kind: str, directory: Path, name: str, tags: dict[str, Any], lineage: dict[str, Any],
                      metrics: dict[str, Any], cfg: RegisterConfig):
    """Log a loaded HF model (transformers flavor) in the active run and create a version with ``tags``."""
    import mlflow
    import mlflow.transformers

    from rlhf.train import models

    load_cfg = ModelConfig(device="cpu", lora=False)
    path = Path(directory).resolve()  # an absolute name_or_path: no hub lookups for card/license
    if kind == "policy":
        model, tok = models.load_policy(path, load_cfg, for_training=False)
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tok}, name="policy", task="text-generation",
            prompt_template=_prompt_template(tok),
            model_config={"max_new_tokens": cfg.max_new_tokens, "do_sample": True, "temperature": cfg.temperature},
            model_card=_model_card(name, lineage, metrics), pip_requirements=_pip_requirements(),
            metadata={k: str(v) for k, v in lineage.items() if v is not None and k != "params"})
    else:
        model, tok = models.load_reward_model(path, load_cfg, for_training=False)
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tok}, name="reward_model",
            task="text-classification", model_card=_model_card(name, lineage, metrics),
            pip_requirements=_pip_requirements(),
            metadata={k: str(v) for k, v in lineage.items() if v is not None and k != "params"})
    del model
    try:
        mlflow.log_metrics(_finite_metrics(metrics), model_id=info.model_id)  # shown on the logged model
    except Exception as e:  # older servers without logged-model metrics: the tags still carry them
        log.debug("could not attach metrics to the logged model: %s", e)
    mv = mlflow.register_model(info.model_uri, name, tags={k: _tag(v) for k, v in tags.items() if v is not None})
    return mv


def _dedupe(client, name: str, mv, **key: str):
    """Two concurrent retries may both have created a version: keep the oldest, delete ours if newer."""
    same = _versions(client, name, **key)
    if len(same) > 1 and int(same[0].version) != int(mv.version):
        log.warning("registry: %s v%s duplicates v%s (concurrent retry); deleting v%s", name, mv.version,
                    same[0].version, mv.version)
        try:
            client.delete_model_version(name, str(mv.version))
        except Exception as e:
            log.warning("registry: could not delete duplicate v%s: %s", mv.version, e)
        return same[0]
    return mv


def _register_reward(client, reward_dir, inp, lineage, cfg: RegisterConfig) -> tuple[Any, bool]:
    name = cfg.reward_model_name
    existing = _versions(client, name, content_hash=inp["reward_hash"])
    if existing:
        return existing[0], False
    rm = inp["reward_manifest"]
    rm_metrics = _finite_metrics(rm.get("metrics") or {})
    tags = {k: lineage[k] for k in ("pipeline_run_id", "parent_run_id", "git_commit", "data_hash", "dataset_hash",
                                    "profile", "training_image", "image_digest")}
    tags.update({"content_hash": inp["reward_hash"], "training_run_id": rm.get("mlflow_run_id"),
                 "reward_norm": json.dumps(rm.get("reward_norm")), "max_seq_len": rm.get("max_seq_len"),
                 **{f"metric.{k}": f"{v:.6g}" for k, v in rm_metrics.items()}})
    mv = _log_and_register("reward", Path(reward_dir), name, tags, {**tags, "reward_norm": tags["reward_norm"]},
                           rm_metrics, cfg)
    mv = _dedupe(client, name, mv, content_hash=inp["reward_hash"])
    return mv, True


@_refusals("register or promote a version of {name!r}")
def register(policy_dir: str | Path, reward_dir: str | Path | None, eval_dir: str | Path,
             cfg: RegisterConfig | None = None, *, pipeline_run_id: str | None = None,
             config_fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register the evaluated policy (and its reward model); move ``champion`` only if the gate allows it.

    Returns ``{"model_name", "version", "created", "promoted", "decision", "champion",
    "previous_champion", "aliases", "model_uri", "reward_model": {...}, "run_id", ...}``.
    Idempotent per pipeline run (``pipeline_run_id``, else ``$RLHF_PIPELINE_RUN_ID`` / ``$KFP_RUN_ID``)
    and per policy content. ``config_fingerprint``: :func:`rlhf.pipeline.steps.config_fingerprint` of the run's
    configuration, recorded as the tags ``pipeline_config_hash`` and ``pipeline_config_sections``
    (what ``rlhf retrain`` compares); without it the version has no such tags.
    """
    import mlflow

    cfg = cfg or RegisterConfig()
    _check_name(cfg.model_name)
    _check_name(cfg.reward_model_name)
    pipeline_run_id = pipeline_run_id or os.environ.get(tracking.ENV_PIPELINE) or os.environ.get("KFP_RUN_ID")
    if pipeline_run_id:
        tracking._check_pipeline_run_id(pipeline_run_id)
    with_reward = cfg.register_reward_model and reward_dir is not None
    inp = _load_inputs(policy_dir, reward_dir if with_reward else None, eval_dir)
    lineage = _lineage(inp, pipeline_run_id)
    config_tags: dict[str, str] = {}
    if config_fingerprint:
        lineage[CONFIG_HASH_TAG] = config_fingerprint["hash"]
        config_tags[CONFIG_SECTIONS_TAG] = json.dumps(config_fingerprint["sections"], sort_keys=True,
                                                      separators=(",", ":"))
    metrics = inp["metrics"]
    client = _connect()
    name = cfg.model_name

    with tracking.stage_run("register", cfg, tags={"pipeline_run_id": pipeline_run_id}) as tracker, \
            mlflow.start_run(run_id=tracker.run_id, nested=mlflow.active_run() is not None):
        tracker.log_params({"lineage": {"policy": inp["policy_manifest"].get("config") or {},
                                        "policy_model": inp["policy_manifest"].get("model") or {},
                                        "evaluate": inp["eval_manifest"].get("config") or {}}})
        tracker.log_metrics(_finite_metrics(metrics))
        for key, obj in (("policy_manifest", inp["policy_manifest"]), ("evaluation_manifest", inp["eval_manifest"]),
                         ("gate", inp["gate"]), ("reward_manifest", inp["reward_manifest"])):
            if obj is not None:
                tracker.log_dict(obj, f"lineage/{key}.json")

        _ensure_registered_model(client, name, f"RLHF policy (rlhf pipeline); serve models:/{name}@champion")
        reward_info: dict[str, Any] = {}
        if with_reward:
            _ensure_registered_model(client, cfg.reward_model_name, "RLHF reward model (rlhf pipeline)")
            rmv, r_created = _register_reward(client, reward_dir, inp, lineage, cfg)
            _set_alias_if_newer(client, cfg.reward_model_name, CHALLENGER, int(rmv.version))
            reward_info = {"name": cfg.reward_model_name, "version": int(rmv.version), "created": r_created}

        existing = (_versions(client, name, pipeline_run_id=pipeline_run_id) if pipeline_run_id else []) or \
            _versions(client, name, policy_content_hash=inp["policy_hash"])
        if existing:
            mv, created = existing[0], False
            log.info("register: %s v%s already holds this %s; not creating another version", name, mv.version,
                     "pipeline run" if pipeline_run_id and mv.tags.get("pipeline_run_id") == pipeline_run_id
                     else "policy")
        else:
            tags = {**lineage, **config_tags, "register_run_id": tracker.run_id,
                    "reward_model_version": reward_info.get("version"),
                    **{f"metric.{k}": f"{v:.6g}" for k, v in _finite_metrics(metrics).items()}}
            mv = _log_and_register("policy", Path(policy_dir), name, tags, lineage, metrics, cfg)
            key = {"pipeline_run_id": pipeline_run_id} if pipeline_run_id else \
                {"policy_content_hash": inp["policy_hash"]}
            mv = _dedupe(client, name, mv, **key)
            created = True
            client.update_model_version(name, str(mv.version), description=(
                f"{lineage['policy_stage'] or 'policy'} from pipeline run {pipeline_run_id or '-'}; data "
                f"{(lineage['data_hash'] or '-')[:12]}; gate {'passed' if inp['gate']['passed'] else 'failed'}: "
                f"{inp['gate'].get('reason', '')}"[:4900]))
        version = int(mv.version)
        mv = _get_version(client, name, version)  # fresh tags
        _set_alias_if_newer(client, name, CHALLENGER, version)

        champion = _get_alias(client, name, CHAMPION)
        previous = int(champion.version) if champion is not None else None
        if champion is not None and int(champion.version) == version:
            promoted, decision = False, f"v{version} is already the champion"
            if not mv.tags.get("promoted_at"):  # a retry after a crash mid-promotion: finish the bookkeeping
                _set_champion(client, cfg, mv, reason=inp["gate"].get("reason", ""), by="gate")
        else:
            promoted, decision = promotion_decision(inp["gate"], inp["evaluated_against"], champion, mv.tags, cfg)
            if promoted:
                _set_champion(client, cfg, mv, reason=decision, by="gate")
            elif created or not mv.tags.get("not_promoted_reason"):
                client.set_model_version_tag(name, str(version), "not_promoted_reason", _tag(decision))
        aliases = [a for a, v in _aliases(client, name).items() if v == version]
        champion_now = _aliases(client, name).get(CHAMPION)
        result = {
            "model_name": name, "version": version, "created": created, "model_uri": f"models:/{name}/{version}",
            "aliases": sorted(aliases), "promoted": promoted, "decision": decision, "champion": champion_now,
            "previous_champion": previous, "gate_passed": bool(inp["gate"]["passed"]),
            "pipeline_run_id": pipeline_run_id, "run_id": tracker.run_id, "reward_model": reward_info,
            "data_hash": lineage["data_hash"], "tracking_uri": tracking.display_uri(),
        }
        tracker.set_tags({"registered_model": name, "registered_version": version, "promoted": promoted,
                          "promotion_decision": decision[:500], "version_created": created})
        tracker.log_dict(result, "registration.json")
    log.info("[register] %s v%s (%s); champion %s: %s", name, version, "new" if created else "existing",
             f"moved to v{version}" if promoted else f"stays {f'v{champion_now}' if champion_now else 'unset'}",
             decision)
    return result


# ----------------------------------------------------------------------------- champion for evaluate


def _cache_root(cfg: RegisterConfig) -> Path:
    if cfg.cache_dir:
        base = Path(cfg.cache_dir).expanduser()
    else:
        base = Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf").expanduser() / "registry"
    return base / hashlib.sha256(tracking.tracking_uri().encode()).hexdigest()[:10]


def _is_complete(d: Path, expected_hash: str | None) -> bool:
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (d / "config.json").is_file() and manifest.get("content_hash") == expected_hash


@_refusals("read {name!r}@champion")
def champion_version(cfg: RegisterConfig | None = None, *, alias: str = CHAMPION):
    """The MLflow ModelVersion (with its lineage tags) that ``alias`` points at, or None."""
    cfg = cfg or RegisterConfig()
    return _get_alias(_connect(), _check_name(cfg.model_name), alias)


@_refusals("download the champion of {name!r}")
def champion_dir(cfg: RegisterConfig | None = None, *, alias: str = CHAMPION) -> Path | None:
    """The current champion's policy as a local directory (None when there is no champion).

    Downloaded once per version into the cache (``register.cache_dir``) and assembled as a plain
    Hugging Face directory with a ``manifest.json`` whose ``content_hash`` is the registered
    policy's, so that ``evaluate(..., champion=champion_dir())`` records which champion it compared
    against and :func:`register` can check it.
    """
    import mlflow

    cfg = cfg or RegisterConfig()
    client = _connect()
    mv = _get_alias(client, cfg.model_name, alias)
    if mv is None:
        return None
    expected = mv.tags.get("policy_content_hash")
    root = _cache_root(cfg)
    out = root / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', cfg.model_name)}-v{mv.version}"
    if _is_complete(out, expected):
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=root))
    try:
        dl = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{cfg.model_name}/{mv.version}",
                                                      dst_path=str(tmp / "download")))
        policy = tmp / "policy"
        policy.mkdir()
        for src in (dl / "model", dl / "components" / "tokenizer"):
            if src.is_dir():
                for f in src.iterdir():
                    shutil.move(str(f), policy / f.name)
        if not (policy / "config.json").is_file():
            raise UserError(f"models:/{cfg.model_name}/{mv.version} has no transformers weights",
                            hint="was it registered by rlhf register?")
        manifest: dict[str, Any] = {}
        if mv.run_id:
            try:
                manifest = json.loads(Path(mlflow.artifacts.download_artifacts(
                    run_id=mv.run_id, artifact_path="lineage/policy_manifest.json",
                    dst_path=str(tmp / "lineage"))).read_text())
            except Exception as e:
                log.warning("champion_dir: no lineage manifest for v%s (%s)", mv.version, e)
        manifest.update({"kind": "policy", "content_hash": expected,
                         "registered_model": {"name": cfg.model_name, "version": int(mv.version),
                                              "uri": f"models:/{cfg.model_name}/{mv.version}", "run_id": mv.run_id}})
        write_json(policy / MANIFEST, manifest)
        if out.exists():
            shutil.rmtree(out)
        try:
            os.rename(policy, out)
        except OSError:  # another process won the race
            if not _is_complete(out, expected):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("champion %s v%s available at %s", cfg.model_name, mv.version, out)
    return out


FEEDBACK_LABELS_TAG = "feedback_labels"
FEEDBACK_BATCHES_TAG = "feedback_batches"


@_refusals("tag versions of {name!r}")
def tag_feedback(cfg: RegisterConfig | None = None, *, data_hash: str, labels: int, batches: list[str]) -> list[int]:
    """Record on every version trained on ``data_hash`` how many human labels (and which batches) it saw."""
    cfg = cfg or RegisterConfig()
    client = _connect()
    versions = _versions(client, cfg.model_name, data_hash=data_hash)
    for mv in versions:
        client.set_model_version_tag(cfg.model_name, str(mv.version), FEEDBACK_LABELS_TAG, str(labels))
        client.set_model_version_tag(cfg.model_name, str(mv.version), FEEDBACK_BATCHES_TAG,
                                     _tag(json.dumps(batches)))
    return sorted(int(mv.version) for mv in versions)


# ----------------------------------------------------------------------------- rlhf models ...


@_refusals("list the versions of {name!r}")
def list_versions(cfg: RegisterConfig | None = None) -> list[dict[str, Any]]:
    """Every version, newest first: aliases, creation time, gate, key metrics, data hash, pipeline run."""
    cfg = cfg or RegisterConfig()
    client = _connect()
    aliases = _aliases(client, cfg.model_name)
    rows = []
    for mv in reversed(_versions(client, cfg.model_name)):
        t = mv.tags or {}
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(a for a, v in aliases.items() if v == int(mv.version)),
            "created": datetime.datetime.fromtimestamp(mv.creation_timestamp / 1000, datetime.timezone.utc)
            .strftime("%Y-%m-%d %H:%M:%S"),
            "gate_passed": t.get("gate_passed"),
            "metrics": {k: t.get(f"metric.{k}") for k in cfg.key_metrics},
            "data_hash": t.get("data_hash"),
            "dataset_hash": t.get("dataset_hash"),
            "pipeline_run_id": t.get("pipeline_run_id"),
            "git_commit": t.get("git_commit"),
            "reward_model_version": t.get("reward_model_version"),
            "promoted_at": t.get("promoted_at"),
            "promotion_reason": t.get("promotion_reason"),
            "not_promoted_reason": t.get("not_promoted_reason"),
            "feedback_labels": t.get(FEEDBACK_LABELS_TAG),
            "feedback_batches": t.get(FEEDBACK_BATCHES_TAG),
        })
    return rows


def format_versions(rows: list[dict[str, Any]], cfg: RegisterConfig | None = None) -> str:
    cfg = cfg or RegisterConfig()
    if not rows:
        return f"no versions of {cfg.model_name} at {tracking.display_uri()}"
    short = {"policy_gold_mean": "gold", "policy_rm_mean": "rm", "kl_to_baseline": "kl",
             "win_rate_gold_vs_baseline": "win_gold"}
    head = ["version", "aliases", "created (UTC)", "gate"] + [short.get(k, k) for k in cfg.key_metrics] + \
        ["data_hash", "human", "pipeline_run"]
    table = [head]
    for r in rows:
        table.append([str(r["version"]), ",".join(r["aliases"]) or "-", r["created"],
                      {"true": "passed", "false": "failed"}.get(r["gate_passed"] or "", "-")]
                     + [_fmt(r["metrics"].get(k)) for k in cfg.key_metrics]
                     + [_data_column(r), _feedback_column(r), (r["pipeline_run_id"] or "-")[:36]])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [f"{cfg.model_name} at {tracking.display_uri()}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)


def _data_column(row: dict[str, Any]) -> str:
    """The DVC data hash; without one (run outside the repo), the prepared dataset's content hash."""
    if row.get("data_hash"):
        return row["data_hash"][:12]
    return f"dataset:{row['dataset_hash'][:8]}" if row.get("dataset_hash") else "-"


def _feedback_column(row: dict[str, Any]) -> str:
    """Human labels the version was trained on and from how many batches (``-``: none recorded)."""
    if not row.get("feedback_labels"):
        return "-"
    try:
        n = len(json.loads(row.get("feedback_batches") or "[]"))
    except ValueError:
        n = 0
    return f"{row['feedback_labels']} ({n} batch{'es' if n != 1 else ''})"


def _fmt(v: str | None) -> str:
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return "-"


@_refusals("move the champion alias of {name!r}")
def promote(version: int | str, reason: str, cfg: RegisterConfig | None = None) -> dict[str, Any]:
    """Make ``version`` the champion by hand; the reason is recorded on the version and in the log."""
    cfg = cfg or RegisterConfig()
    if not reason or not reason.strip():
        raise UserError("a promotion needs a reason", hint='rlhf models promote <version> --reason "..."')
    client = _connect()
    mv = _get_version(client, cfg.model_name, version)
    if mv is None:
        raise UserError(f"{cfg.model_name} has no version {version}", hint="rlhf models list")
    current = _aliases(client, cfg.model_name).get(CHAMPION)
    if current == int(mv.version):
        return {"model_name": cfg.model_name, "champion": current, "previous_champion": current, "changed": False,
                "message": f"v{current} is already the champion"}
    by = f"manual:{_user()}"
    client.set_model_version_tag(cfg.model_name, str(mv.version), "manual_promotion_reason", _tag(reason))
    if mv.tags.get("promoted_at"):  # promoted before: record this promotion too
        for k, v in {"promoted_at": _now(), "promoted_by": by, "promotion_reason": reason}.items():
            client.set_model_version_tag(cfg.model_name, str(mv.version), k, _tag(v))
        mv = _get_version(client, cfg.model_name, mv.version)
        _append_log(client, cfg.model_name, {"at": _now(), "event": "promote", "version": int(mv.version),
                                             "from": current, "by": by, "reason": reason[:300]})
    previous = _set_champion(client, cfg, mv, reason=reason, by=by)
    return {"model_name": cfg.model_name, "champion": int(mv.version), "previous_champion": previous,
            "changed": True, "message": f"champion: v{previous if previous is not None else '-'} -> v{mv.version}"}


@_refusals("move the champion alias of {name!r} back")
def rollback(cfg: RegisterConfig | None = None, reason: str | None = None) -> dict[str, Any]:
    """Move ``champion`` back to the previous champion (the history stack); recorded in tags and the log."""
    cfg = cfg or RegisterConfig()
    client = _connect()
    name = cfg.model_name
    current = _aliases(client, name).get(CHAMPION)
    if current is None:
        raise UserError(f"{name} has no champion to roll back", hint="rlhf models list")
    history = _history(client, name)
    if not history or history[-1] != current:
        history.append(current)
    history.pop()
    while history and _get_version(client, name, history[-1]) is None:  # deleted versions are skipped
        history.pop()
    if not history:
        raise UserError(f"{name} v{current} is the first champion: there is no previous one to roll back to",
                        hint="rlhf models promote <version> --reason ... picks any version")
    target = history[-1]
    client.set_registered_model_alias(name, CHAMPION, str(target))
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-cfg.history_length:]))
    by = f"manual:{_user()}"
    why = reason or "rollback"
    for k, v in {"rolled_back_at": _now(), "rolled_back_by": by, "rollback_reason": why}.items():
        client.set_model_version_tag(name, str(current), k, _tag(v))
    client.set_model_version_tag(name, str(target), "restored_at", _now())
    _append_log(client, name, {"at": _now(), "event": "rollback", "version": target, "from": current, "by": by,
                               "reason": why[:300]})
    _follow_reward_champion(client, cfg, _get_version(client, name, target))
    return {"model_name": name, "champion": target, "previous_champion": current,
            "message": f"champion: v{current} -> v{target} (rolled back)"}


@_refusals("load {name!r} from the registry")
def load_components(cfg: RegisterConfig | None = None, *, alias: str = CHAMPION):
    """``(model, tokenizer, version)`` of ``models:/<name>@<alias>``, ready for generation."""
    import mlflow.transformers

    cfg = cfg or RegisterConfig()
    client = _connect()
    mv = _get_alias(client, cfg.model_name, alias)
    if mv is None:
        raise UserError(f"{cfg.model_name} has no '{alias}' version yet",
                        hint="register a model whose gate passes, or rlhf models promote <version> --reason ...")
    comps = mlflow.transformers.load_model(f"models:/{cfg.model_name}/{mv.version}", return_type="components")
    model, tok = comps["model"], comps["tokenizer"]
    tok.padding_side = "left"
    model.eval()
    return model, tok, int(mv.version)


def generate(prompt: str, cfg: RegisterConfig | None = None, *, alias: str = CHAMPION,
             max_new_tokens: int | None = None, temperature: float | None = None, seed: int | None = None) -> str:
    """A completion of ``prompt`` (as a user turn, with the model's chat template) from ``@alias``."""
    from rlhf.train import generation

    cfg = cfg or RegisterConfig()
    model, tok, _ = load_components(cfg, alias=alias)
    rollout = generation.sample(model, tok, [prompt], max_new_tokens=max_new_tokens or cfg.max_new_tokens,
                                temperature=temperature or cfg.temperature,
                                generator_seed=cfg.seed if seed is None else seed)
    return rollout.texts[0]


__all__ = ["register", "champion_dir", "champion_version", "promotion_decision", "list_versions", "format_versions",
           "promote", "rollback", "generate", "load_components", "tag_feedback", "CHAMPION", "CHALLENGER"]
