"""The one configuration resolver: params.yaml + profile + overrides + pipeline knobs -> stage configs.

Every door into the stages resolves its configuration here, the same way:

* the CLI stage commands (``rlhf sft --params params.yaml``) and ``dvc repro``;
* ``rlhf run`` / ``rlhf submit`` / ``rlhf retrain`` (params.yaml + ``--profile`` + ``--set`` + ``-p``);
* each KFP step (the pipeline parameters ``params_yaml``, ``profile``, ``overrides`` and the knobs);
* the register step and ``rlhf retrain``, which compare the :meth:`RunConfig.fingerprint` of what
  was trained with what would be trained now.

Precedence, lowest first: the config class defaults < the params.yaml section < the active
profile's section (``profiles: {tiny: {sft: {...}}}``) < ``overrides`` (``{section: {field: value}}``,
``--set section.field=value``) < the pipeline knobs (``sft_max_steps`` ..., :data:`KNOBS`).

The active profile: an explicit one (``--profile``, the pipeline parameter ``profile``), else
``$RLHF_PROFILE``, else params.yaml's ``profile:`` key; ``none`` (or ``base``) means no profile.

Mistakes (unknown keys, sections, fields, profiles; bad values; YAML errors) raise
:class:`~rlhf.errors.ConfigError` with one line naming where and what.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from rlhf.config.schema import (
    EvaluateConfig,
    FeedbackConfig,
    ModelConfig,
    PPOConfig,
    PrepareConfig,
    RegisterConfig,
    RewardConfig,
    SFTConfig,
    StageConfig,
    ValidateConfig,
)
from rlhf.errors import ConfigError
from rlhf.redact import config_params

C = TypeVar("C", bound=StageConfig)

#: params.yaml section -> its config class
SECTIONS: dict[str, type[StageConfig]] = {
    "prepare": PrepareConfig, "validate": ValidateConfig, "model": ModelConfig, "sft": SFTConfig,
    "reward": RewardConfig, "ppo": PPOConfig, "evaluate": EvaluateConfig, "register": RegisterConfig,
    "feedback": FeedbackConfig,  # not a pipeline stage: `rlhf feedback` only
}
#: sections in the fingerprint: everything that shapes the trained and gated model. ``register`` is
#: left out: names, promotion rules and ``rlhf models generate`` defaults.
FINGERPRINT_SECTIONS = ("prepare", "validate", "model", "sft", "reward", "ppo", "evaluate")
NO_PROFILE = ("none", "base")


# ------------------------------------------------------------------------------------------ knobs


def _lora(value: Any) -> bool:
    text = str(value).lower()
    if text not in ("true", "false"):
        raise ConfigError(f"pipeline parameter lora must be 'true', 'false' or empty, got {value!r}")
    return text == "true"


@dataclass(frozen=True)
class Knob:
    """A pipeline parameter that sets one config field; ``unset`` (its default) means "as in params.yaml"."""

    name: str
    section: str
    field: str
    type: type
    unset: Any
    help: str
    parse: Callable[[Any], Any] | None = None

    def is_set(self, value: Any) -> bool:
        if value is None or value == "" or isinstance(value, bool) and self.type is not str:
            return False
        if self.type in (int, float):
            return float(value) >= 0 and (self.unset < 0 or float(value) > 0)
        return value != self.unset

    def value(self, raw: Any) -> Any:
        return self.parse(raw) if self.parse else self.type(raw)


#: The pipeline's knobs: the most-tuned config fields as named pipeline parameters (``-p NAME=VALUE``).
#: Any other field is reachable through ``overrides`` (``--set SECTION.FIELD=VALUE``).
KNOBS: tuple[Knob, ...] = (
    Knob("model_name", "model", "name", str, "", "base model (model.name); '' = as in params.yaml"),
    Knob("lora", "model", "lora", str, "", "'true' / 'false' (model.lora); '' = as in params.yaml", _lora),
    Knob("sft_max_steps", "sft", "max_steps", int, 0, "sft.max_steps; 0 = as in params.yaml"),
    Knob("reward_max_steps", "reward", "max_steps", int, 0, "reward.max_steps; 0 = as in params.yaml"),
    Knob("ppo_total_steps", "ppo", "total_steps", int, 0, "ppo.total_steps; 0 = as in params.yaml"),
    Knob("ppo_kl_coef", "ppo", "kl_coef", float, -1.0, "ppo.kl_coef (beta); negative = as in params.yaml"),
    Knob("registered_model_name", "register", "model_name", str, "",
         "MLflow registered model name; '' = register.model_name or rlhf-policy"),
)
KNOB_NAMES = tuple(k.name for k in KNOBS)


def knobs_for(sections: tuple[str, ...]) -> tuple[Knob, ...]:
    """The knobs that set a field of one of ``sections``."""
    return tuple(k for k in KNOBS if k.section in sections)


def knob_overrides(knobs: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Knob values -> ``{section: {field: value}}`` for the knobs that are set (other names are ignored)."""
    out: dict[str, dict[str, Any]] = {}
    for k in KNOBS:
        raw = (knobs or {}).get(k.name)
        if k.name == "lora" and isinstance(raw, bool):  # -p lora=false arrives as the bool False
            raw = str(raw).lower()
        if k.is_set(raw):
            out.setdefault(k.section, {})[k.field] = k.value(raw)
    return out


# ------------------------------------------------------------------------------------------ overrides


def check_overrides(overrides: dict | None) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` with known sections and fields only (values are checked on load)."""
    for section, fields in (overrides or {}).items():
        if section not in SECTIONS:
            raise ConfigError(f"overrides: unknown section '{section}'", hint=f"sections: {', '.join(SECTIONS)}")
        if not isinstance(fields, dict):
            raise ConfigError(f"overrides: '{section}' must map field names to values")
        unknown = sorted(set(fields) - set(SECTIONS[section].model_fields))
        if unknown:
            raise ConfigError(f"overrides: unknown field(s) {', '.join(f'{section}.{k}' for k in unknown)}",
                              hint="see params.yaml / src/rlhf/config/schema.py for the known fields")
    return {s: dict(v) for s, v in (overrides or {}).items()}


def merge_overrides(*layers: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, fields in (layer or {}).items():
            out.setdefault(section, {}).update(fields)
    return out


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """``["a=1", "b=x", "c={k: v}"]`` -> ``{"a": 1, "b": "x", "c": {"k": "v"}}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected NAME=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def dotted_overrides(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["sft.max_steps=5"]`` -> ``{"sft": {"max_steps": 5}}`` (the pipeline's ``overrides`` parameter)."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_assignments(items).items():
        section, dot, fld = key.partition(".")
        if not dot or not fld:
            raise ConfigError(f"--set expects SECTION.FIELD=VALUE, got {key!r}")
        out.setdefault(section, {})[fld] = value
    return check_overrides(out)


# ------------------------------------------------------------------------------------------ params.yaml


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A params file as a mapping; a missing file or bad YAML is a one-line :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"params file not found: {p}", hint="run from the project root or pass --params")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"cannot read the params file: {e}", where=str(p)) from None
    return parse_yaml(text, str(p))


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text or "") or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"not valid YAML: {getattr(e, 'problem', e)}", where=where) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of stage sections at the top level", where=source)
    return data


def params_text(text: str) -> str:
    """params.yaml as one line of JSON (valid YAML too): the pipeline parameter ``params_yaml``.

    One line because the KFP compiler copies parameter defaults into the YAML's header comment
    verbatim: a multi-line default would break the compiled file.
    """
    return json.dumps(parse_yaml(text, "params_yaml"), sort_keys=False, separators=(",", ":"))


def active_profile(data: dict[str, Any]) -> str | None:
    """The profile in force when none is given explicitly: ``$RLHF_PROFILE``, else ``profile:``."""
    return os.environ.get("RLHF_PROFILE") or data.get("profile")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _format_error(err: ValidationError, source: str, section: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in (section, *e["loc"]))
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{loc}' (check the spelling; see params.yaml for the known keys)"
    return f"{source}: {loc}: {e['msg']} (got {e.get('input')!r})"


def build(cls: type[C], values: dict[str, Any] | None, *, source: str = "config", section: str = "") -> C:
    """A config object from plain values; a bad value is a one-line :class:`ConfigError`."""
    try:
        return cls.model_validate(values or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err, source, section)) from None


# ------------------------------------------------------------------------------------------ the resolver


@dataclass(frozen=True)
class RunConfig:
    """The configuration of one run, resolved once: what every stage of the run is configured by.

    Build it with :meth:`from_file` (a params.yaml on disk) or :meth:`from_text` (the pipeline
    parameter ``params_yaml``). ``profile`` is the active profile (None: the base sections).
    """

    data: dict[str, Any]
    source: str = "params.yaml"
    profile: str | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_data(cls, data: dict[str, Any], *, source: str, profile: str | None = None,
                  overrides: dict | None = None, knobs: dict[str, Any] | None = None) -> RunConfig:
        chosen = profile or active_profile(data) or None
        if chosen and chosen.lower() in NO_PROFILE:  # --profile none, RLHF_PROFILE=none: the base sections
            chosen = None
        known = data.get("profiles") or {}
        if chosen and chosen not in known:
            raise ConfigError(f"unknown profile '{chosen}'", where=source,
                              hint=f"known profiles: {', '.join(sorted(known)) or 'none'}, or 'none'")
        for name, sec in data.items():
            if name in SECTIONS and sec is not None and not isinstance(sec, dict):
                raise ConfigError(f"section '{name}' must be a mapping", where=source)
        return cls(data=data, source=source, profile=chosen,
                   overrides=merge_overrides(check_overrides(overrides), knob_overrides(knobs)))

    @classmethod
    def from_file(cls, path: str | Path | None = "params.yaml", *, missing_ok: bool = False, **kw) -> RunConfig:
        """From a params file; ``missing_ok``: a file that does not exist means the built-in defaults."""
        if path is None or missing_ok and not Path(path).exists():
            # the built-in defaults have no profiles: $RLHF_PROFILE does not apply (an explicit one still does)
            return cls.from_data({}, source="defaults", **{"profile": "none", **kw})
        return cls.from_data(load_yaml(path), source=str(path), **kw)

    @classmethod
    def from_text(cls, text: str, *, source: str = "pipeline parameter params_yaml", **kw) -> RunConfig:
        return cls.from_data(parse_yaml(text, source), source=source, **kw)

    # -- per section
    def values(self, section: str) -> dict[str, Any]:
        """The raw values of a section: params.yaml < profile < overrides (before validation)."""
        sec = self.data.get(section) or {}
        if self.profile:
            sec = _merge(sec, ((self.data.get("profiles") or {}).get(self.profile) or {}).get(section) or {})
        return {**sec, **{k: v for k, v in self.overrides.get(section, {}).items() if v is not None}}

    def section(self, name: str, cls: type[C] | None = None) -> C:
        """The validated config of one section (``cls``: its class, default :data:`SECTIONS`)."""
        if cls is None and name not in SECTIONS:
            raise ConfigError(f"unknown config section '{name}'", hint=f"sections: {', '.join(SECTIONS)}")
        return build(cls or SECTIONS[name], self.values(name), source=self.source, section=name)

    def with_overrides(self, overrides: dict | None = None, knobs: dict[str, Any] | None = None) -> RunConfig:
        return RunConfig(self.data, self.source, self.profile,
                         merge_overrides(self.overrides, check_overrides(overrides), knob_overrides(knobs)))

    # -- the whole run
    def resolved(self) -> dict[str, dict[str, Any]]:
        """Every fingerprinted section, validated, as flat redacted params (what MLflow records)."""
        return {s: config_params(self.section(s)) for s in FINGERPRINT_SECTIONS}

    def fingerprint(self) -> dict[str, Any]:
        """``{"hash": <16 hex>, "sections": {section: <12 hex>}}``: same resolved configs, same hashes.

        The ``pipeline_config_hash`` lineage tag of a registered model and what ``rlhf retrain``
        compares it with.
        """
        def digest(obj: Any) -> str:
            text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
            return hashlib.sha256(text.encode()).hexdigest()

        cfg = self.resolved()
        return {"hash": digest(cfg)[:16], "sections": {s: digest(v)[:12] for s, v in cfg.items()}}

    def write(self, dest: str | Path) -> Path:
        """``dest/params.yaml`` that resolves to the same configs: profile pinned, overrides applied."""
        data = {k: v for k, v in self.data.items() if k not in ("profile", "profiles")}
        for section in SECTIONS:
            if section in self.data or section in self.overrides or self.profile:
                data[section] = self.values(section)
        path = Path(dest) / "params.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    def params_text(self) -> str:
        return json.dumps(self.data, sort_keys=False, separators=(",", ":"))


def load_stage(cls: type[C], section: str, params: str | Path | None = "params.yaml",
               overrides: dict[str, Any] | None = None) -> C:
    """Config for one section from a params file: defaults < section < active profile < ``overrides``.

    ``params`` None: the class defaults. ``overrides``: this section's fields.
    """
    run = RunConfig.from_file(params)
    if overrides:
        run = RunConfig(run.data, run.source, run.profile, {section: dict(overrides)})
    return run.section(section, cls)


#: params.yaml's key naming the profile of cluster runs (``profile:`` is the laptop's)
CLUSTER_PROFILE_KEY = "cluster_profile"


def cluster_profile(data: dict[str, Any]) -> str:
    """The profile a cluster run uses when none is given: ``$RLHF_PROFILE``, else ``cluster_profile:``.

    One rule for every door: an explicit profile (``--profile``, ``$RLHF_PROFILE``) wins; otherwise
    the laptop doors (``rlhf run``, ``dvc repro``, the stage commands) use ``profile:`` and the
    cluster doors (``rlhf compile``/``submit``/``schedule``, ``rlhf retrain --host``, the CronJob)
    use ``cluster_profile:``; a params file without that key means the base sections ('none').
    """
    return os.environ.get("RLHF_PROFILE") or data.get(CLUSTER_PROFILE_KEY) or "none"


def resolve_profile(profile: str | None, params: str | Path, *, cluster: bool = False) -> str:
    """The profile a run uses, by name: --profile, $RLHF_PROFILE, params.yaml's ``profile:`` (``cluster``:
    its ``cluster_profile:``, see :func:`cluster_profile`); else 'none'."""
    if profile:
        return profile
    data = load_yaml(params)
    return cluster_profile(data) if cluster else (active_profile(data) or "none")
