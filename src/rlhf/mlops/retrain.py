"""``rlhf retrain``: run the pipeline again only when the data or the configuration changed.

The reference is the current **champion** in the MLflow registry (``models:/<name>@champion``,
``register.model_name``). Its lineage tags say what it was trained on:

* ``data_hash``: the DVC md5 of ``data/raw`` (``data.dvc``) of its run;
* ``pipeline_config_hash`` / ``pipeline_config_sections``: :meth:`rlhf.config.resolve.RunConfig.fingerprint` of
  the run's resolved configuration (every stage section from params.yaml + profile + overrides and
  knobs, secrets redacted; ``register`` excluded).

:func:`decide` computes the same two things for what a run would use now and compares:

==================================================  ===========
no champion                                         retrain
champion without ``data_hash``                      retrain (data unknown)
data hash differs                                   retrain (old -> new)
champion without ``pipeline_config_hash``           retrain (params unknown: registered before the tag)
configuration hash differs                          retrain (the sections that changed)
otherwise                                           nothing to do
==================================================  ===========

The data version is the one ``data.dvc`` records (or ``--data-hash`` / ``$RLHF_DATA_HASH`` for a
cluster run from a place without the repository, e.g. the retrain CronJob). Rows added to
``data/raw`` but not yet recorded (no ``dvc add data/raw``) would be invisible to that hash and to
the cluster, which fetches data by hash from the DVC remote; :func:`current_data` therefore checks
the workspace with ``dvc status`` and stops with a one-line error telling the user to ``dvc add``.

:func:`retrain` then does nothing, or runs the pipeline: here with :func:`rlhf.pipeline.local.run_local`
(what ``rlhf run`` does) or on Kubeflow Pipelines with :func:`rlhf.pipeline.local.submit_remote` (what
``rlhf submit`` does). A run whose gate fails leaves the champion unchanged, so the next check
decides the same way again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.errors import ConfigError, UserError


@dataclass
class Decision:
    """Whether to retrain and why (``reason`` is the one line shown to the user)."""

    retrain: bool
    reason: str
    model_name: str
    champion: int | None = None
    data_hash: str = ""
    champion_data_hash: str | None = None
    config_hash: str = ""
    champion_config_hash: str | None = None
    changed_sections: list[str] = field(default_factory=list)
    profile: str = ""
    forced: bool = False

    def line(self) -> str:
        if not self.retrain:
            return self.reason
        return f"retrain{' (--force)' if self.forced else ' needed'}: {self.reason}"

    def markdown(self) -> str:
        """The decision for a CI job summary."""
        rows = [("decision", f"**{'retrain' if self.retrain else 'up to date, nothing to do'}**"),
                ("why", self.reason), ("registered model", self.model_name),
                ("champion", f"v{self.champion}" if self.champion is not None else "none"),
                ("data", f"`{self.data_hash}` (champion: `{self.champion_data_hash or '-'}`)"),
                ("pipeline config", f"`{self.config_hash}` (champion: `{self.champion_config_hash or '-'}`)"),
                ("profile", self.profile or "-")]
        return "### rlhf retrain\n\n" + "\n".join(f"* {k}: {v}" for k, v in rows) + "\n\n"


def short(data_hash: str | None) -> str:
    """``d3eec975eaa4...e1.dir`` -> ``d3eec975``."""
    return (data_hash or "").removesuffix(".dir")[:8] or "?"


# ------------------------------------------------------------------------------------------ inputs


def current_data(dvc_file: str | Path = "data.dvc", data_hash: str | None = None, *,
                 local: bool = False) -> tuple[str, Path | None]:
    """``(data hash, raw data directory)`` a run would use now.

    ``data_hash`` (``--data-hash`` / ``$RLHF_DATA_HASH``) names the version directly, for a cluster
    run from a place without the repository. Otherwise it is the md5 ``dvc_file`` records, and the
    workspace must match it: unrecorded changes of ``data/raw`` are an error naming the fix.
    ``local``: the data must be here (a local run reads it).
    """
    from rlhf.mlops import versioning

    dvc_file = Path(dvc_file)
    if data_hash and not local:
        return data_hash, None
    if not dvc_file.is_file():
        if local:
            raise UserError(f"DVC pointer file not found: {dvc_file}",
                            hint="rlhf retrain --local compares and trains the data data.dvc tracks; "
                                 "run it from the project root")
        raise UserError("no data version to compare: data.dvc not found",
                        hint="run from the project root, or pass --data-hash (or set RLHF_DATA_HASH) to the md5 "
                             "in data.dvc")
    try:
        raw, md5 = versioning.tracked_path(dvc_file)
    except (KeyError, IndexError, TypeError, AttributeError):
        raise UserError(f"{dvc_file} is not a DVC pointer file (no outs with a path and md5)") from None
    if not md5:
        raise UserError(f"{dvc_file} records no md5 for {raw}", hint=f"`dvc add {raw}`")
    if data_hash and data_hash != md5:
        raise UserError(f"--data-hash {short(data_hash)} is not the version {dvc_file} records ({short(md5)})",
                        hint="--local trains on the data data.dvc tracks; drop --data-hash (or RLHF_DATA_HASH)")
    if raw.exists():
        changes = versioning.workspace_changes(dvc_file)
        if changes:
            raise UserError(f"{raw} has changes that {dvc_file} does not record ({changes}); the recorded version "
                            f"is {short(md5)}",
                            hint=f"record them with `dvc add {raw}`, then `dvc push` and commit {dvc_file}; or "
                                 f"discard them with `dvc checkout {dvc_file}`")
    elif local:
        raise UserError(f"raw data not found: {raw}", hint="`rlhf fetch-data` (or `dvc pull`) first")
    return md5, raw


@contextlib.contextmanager
def _no_profile_env() -> Iterator[None]:
    """While resolving a materialised params file: its ``profile:`` rules, not ``$RLHF_PROFILE``."""
    saved = os.environ.pop("RLHF_PROFILE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["RLHF_PROFILE"] = saved
        else:
            os.environ.pop("RLHF_PROFILE", None)


def run_config(params: str | Path, profile: str | None = None, overrides: dict[str, dict[str, Any]] | None = None,
               knobs: dict[str, Any] | None = None, *, cluster: bool = False) -> tuple[str, dict[str, Any], Any]:
    """``(profile, fingerprint, register config)`` of the run params.yaml + profile + overrides + knobs make.

    Resolved by :class:`rlhf.config.resolve.RunConfig` exactly as a pipeline step resolves its
    parameters, so the fingerprint is the one the register step records. ``cluster``: a run on
    Kubeflow, whose default profile is params.yaml's ``cluster_profile:``.
    """
    from rlhf.config.resolve import RunConfig, resolve_profile

    params = Path(params)
    if not params.is_file():
        raise ConfigError(f"params file not found: {params}", hint="run from the project root or pass --params")
    profile = resolve_profile(profile, params, cluster=cluster)
    with _no_profile_env():
        run = RunConfig.from_file(params, profile=profile, overrides=overrides, knobs=knobs)
        return profile, run.fingerprint(), run.section("register")


# ------------------------------------------------------------------------------------------ decision


def _parse_sections(text: str | None) -> dict[str, str] | None:
    import json

    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def decide(params: str | Path = "params.yaml", *, data_hash: str, profile: str | None = None,
           overrides: dict[str, dict[str, Any]] | None = None, knobs: dict[str, Any] | None = None,
           force: bool = False, cluster: bool = False) -> Decision:
    """Compare what a run would use now (``data_hash``, the params) with the champion's lineage."""
    from rlhf.mlops import registry, tracking

    profile, fp, cfg = run_config(params, profile, overrides, knobs, cluster=cluster)
    champion = registry.champion_version(cfg)
    d = Decision(retrain=True, reason="", model_name=cfg.model_name, data_hash=data_hash,
                 config_hash=fp["hash"], profile=profile)
    if champion is None:
        d.reason = f"no champion in the registry ({cfg.model_name} at {tracking.display_uri()})"
        return d
    tags = champion.tags or {}
    d.champion = int(champion.version)
    d.champion_data_hash = tags.get("data_hash") or None
    d.champion_config_hash = tags.get(registry.CONFIG_HASH_TAG) or None
    who = f"champion {cfg.model_name} v{d.champion}"
    why: list[str] = []
    if not d.champion_data_hash:
        why.append(f"{who} has no recorded data version (data_hash tag)")
    elif d.champion_data_hash != data_hash:
        why.append(f"the data changed since {who}: {short(d.champion_data_hash)} -> {short(data_hash)}")
    if not d.champion_config_hash:
        why.append(f"{who} records no pipeline configuration ({registry.CONFIG_HASH_TAG}; registered before "
                   "rlhf recorded it), so its params are unknown")
    elif d.champion_config_hash != fp["hash"]:
        old = _parse_sections(tags.get(registry.CONFIG_SECTIONS_TAG))
        if old is None:
            changed = "pipeline configuration"
        else:
            d.changed_sections = sorted(s for s in set(old) | set(fp["sections"]) if old.get(s) != fp["sections"].get(s))
            changed = f"section{'s' if len(d.changed_sections) != 1 else ''} {', '.join(d.changed_sections)}"
        why.append(f"the params changed since {who}: {changed} "
                   f"({d.champion_config_hash[:8]} -> {fp['hash'][:8]}, profile {profile})")
    if why:
        d.reason = "; ".join(why)
    elif force:
        d.forced = True
        d.reason = (f"{who} is up to date (data {short(data_hash)}, same params {fp['hash'][:8]}, profile "
                    f"{profile}), but a run was asked for")
    else:
        d.retrain = False
        d.reason = (f"up to date: {who} was trained on data {short(data_hash)} with the same params "
                    f"({fp['hash'][:8]}, profile {profile}); nothing to do")
    return d


# ------------------------------------------------------------------------------------------ action


@dataclass
class Outcome:
    decision: Decision
    started: bool = False
    local_result: Any = None  # pipeline_run.RunResult of a --local run
    kfp_run: dict[str, Any] | None = None  # the KFP run of a --host run


def retrain(*, mode: str, params: str | Path = "params.yaml", profile: str | None = None,
            parameters: dict[str, Any] | None = None, overrides: dict[str, dict[str, Any]] | None = None,
            dvc_file: str | Path = "data.dvc", data_hash: str | None = None, force: bool = False,
            dry_run: bool = False, summary_file: str | Path | None = None,
            local_options: dict[str, Any] | None = None, host: str | None = None,
            submit_options: dict[str, Any] | None = None, data_revision: str | None = None,
            echo: Callable[[str], None] = print) -> Outcome:
    """Decide; then nothing, a local run (``mode="local"``) or a KFP run (``mode="host"``, on ``host``).

    ``local_options`` go to :func:`rlhf.pipeline.local.run_local` (runs_dir, verbose, quiet, threads, out);
    ``submit_options`` to :func:`rlhf.pipeline.local.submit_remote` (pipeline_file, image, wait, ...).
    """
    from rlhf.mlops import tracking
    from rlhf.pipeline import dag, remote
    from rlhf.pipeline import local as pipeline_run

    if mode not in ("local", "host"):
        raise UserError("rlhf retrain needs --local (run the pipeline here) or --host URL (submit to Kubeflow "
                        "Pipelines)")
    if mode == "host" and not host:
        raise UserError("--host needs the KFP API URL")
    parameters = dict(parameters or {})
    pipeline_run.check_parameters(parameters, dag.pipeline_parameters())
    if mode == "local" and int(parameters.get("num_nodes", 1) or 1) > 1:
        raise ConfigError("num_nodes > 1 launches Kubeflow Trainer jobs: that needs a cluster",
                          hint="use rlhf retrain --host")
    current, raw = current_data(dvc_file, data_hash, local=mode == "local")
    decision = decide(params, data_hash=current, profile=profile, overrides=overrides, knobs=parameters,
                      force=force, cluster=mode == "host")
    echo(decision.line())
    if summary_file is not None:
        with open(summary_file, "a", encoding="utf-8") as f:
            f.write(decision.markdown())
    outcome = Outcome(decision)
    if not decision.retrain:
        return outcome
    if dry_run:
        echo("dry run: nothing started")
        return outcome
    outcome.started = True
    if mode == "local":
        outcome.local_result = pipeline_run.run_local(raw=raw, params=params, profile=decision.profile,
                                                      runs_dir=(local_options or {}).get("runs_dir", "runs"),
                                                      parameters=parameters, overrides=overrides,
                                                      **{k: v for k, v in (local_options or {}).items()
                                                         if k != "runs_dir"})
        echo(pipeline_run.format_summary(outcome.local_result))
        return outcome
    revision = data_revision if data_revision is not None else (tracking.git_commit() or "")
    values = remote.run_parameters(Path(params), decision.profile, parameters, overrides, revision, current)
    outcome.kfp_run = remote.submit_remote(host, values, summary_file=summary_file, echo=echo,
                                                 **(submit_options or {}))
    return outcome


__all__ = ["Decision", "Outcome", "current_data", "run_config", "decide", "retrain", "short"]
