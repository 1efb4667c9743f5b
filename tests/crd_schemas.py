"""Strict offline validation of custom resources against the CRDs vendored in ``k8s/crds/``.

The API server checks a custom resource against its CRD's ``openAPIV3Schema`` and *prunes* fields the
schema does not know (silently: an unknown field is not an error on a plain ``kubectl apply``). Here an
unknown field is an error: every object node of the schema that does not say
``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false``. Besides the schema:

* ``x-kubernetes-list-type`` ``map`` / ``set``: duplicate keys or items are errors (as in the API server);
* ``x-kubernetes-validations`` (CEL): the rules that apply when an object is created are translated in
  ``CEL_RULES`` below; a rule on a field we set that has no translation is reported, so a newer CRD with a
  new rule cannot pass unnoticed. Transition rules (``oldSelf``) only apply to updates and are skipped.

The root ``metadata`` is ObjectMeta, which the API server validates itself (the schema only says
``type: object``); names are checked by the CRDs' own CEL rules where they have them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).resolve().parents[1] / "k8s" / "crds"
#: the lines our copy puts above the upstream file (yamllint must not lint someone else's file)
HEADER_LINES = 2

RFC1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
#: create-time CEL rules of the vendored CRDs, translated (``self`` is the node the rule sits on)
CEL_RULES: dict[str, Callable[[Any], bool]] = {
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')":
        lambda s: bool(RFC1035.fullmatch(s["metadata"].get("name", ""))),
    "size(self.metadata.name) <= 63": lambda s: len(s["metadata"].get("name", "")) <= 63,
    "[has(self.torch), has(self.mpi), has(self.jax), has(self.xgboost),has(self.flux)]"
    ".filter(x, x).size() <= 1":
        lambda s: sum(k in s for k in ("torch", "mpi", "jax", "xgboost", "flux")) <= 1,
    "!(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder == 'InOrder' && "
    "self.replicatedJobs.exists(x, has(x.dependsOn)))":
        lambda s: not (s.get("startupPolicy", {}).get("startupPolicyOrder") == "InOrder"
                       and any("dependsOn" in x for x in s.get("replicatedJobs", []))),
}


def upstream_blob_id(path: Path) -> str:
    """The git blob id of the vendored file without our header: equal to the upstream file's blob id."""
    body = path.read_bytes().split(b"\n", HEADER_LINES)[HEADER_LINES]
    return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


def crd_files() -> list[Path]:
    return sorted(CRD_DIR.glob("*/*.yaml"))


@functools.cache
def schemas() -> dict[tuple[str, str], dict]:
    """{(apiVersion, kind): openAPIV3Schema} for every served version of every vendored CRD."""
    out = {}
    for f in crd_files():
        for crd in yaml.safe_load_all(f.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                if v.get("served"):
                    out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


def strict(schema: dict) -> dict:
    """A copy of ``schema`` in which unknown fields are errors instead of being pruned."""
    s = copy.deepcopy(schema)

    def walk(node: dict, is_root_meta: bool = False) -> None:
        if node.get("nullable") and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        preserve = node.get("x-kubernetes-preserve-unknown-fields")
        open_object = preserve or is_root_meta or "additionalProperties" in node
        if node.get("type") == "object" and not open_object:
            node["additionalProperties"] = False
        for key, sub in (node.get("properties") or {}).items():
            walk(sub, is_root_meta=node is s and key == "metadata")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in node.get(key) or []:
                walk(sub)

    walk(s)
    return s


@functools.cache
def _validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 schemas are closest to JSON Schema draft 4 (boolean exclusiveMinimum, no $schema)
    return jsonschema.Draft4Validator(strict(schemas()[(api_version, kind)]))


def _k8s_rules(obj: Any, schema: dict, path: str, errors: list[str]) -> None:
    """List-type uniqueness and CEL rules on every node of ``obj`` that ``schema`` describes."""
    for rule in schema.get("x-kubernetes-validations") or []:
        expr = rule["rule"]
        if "oldSelf" in expr:
            continue
        check = CEL_RULES.get(expr)
        if check is None:
            errors.append(f"{path or '.'}: CEL rule not checked offline (add it to CEL_RULES): {expr}")
        elif not check(obj):
            errors.append(f"{path or '.'}: {rule.get('message') or expr}")
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for k, v in obj.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if sub is not None:
                _k8s_rules(v, sub, f"{path}.{k}", errors)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        list_type, keys = schema.get("x-kubernetes-list-type"), schema.get("x-kubernetes-list-map-keys") or []
        seen = [tuple(i.get(k) for k in keys) if list_type == "map" else repr(i) for i in obj]
        if list_type in ("map", "set") and len(set(seen)) != len(seen):
            what = f"keys {keys}" if keys else "items"
            errors.append(f"{path}: duplicate {what} in a list of type {list_type}")
        for i, item in enumerate(obj):
            _k8s_rules(item, schema["items"], f"{path}[{i}]", errors)


def violations(obj: dict) -> list[str]:
    """Every reason the API server (or our strict reading of it) would reject or prune ``obj``."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key not in schemas():
        return [f"no vendored CRD serves {key[0]} {key[1]} (k8s/crds/)"]
    found = sorted(_validator(*key).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '.'}: {e.message}" for e in found]
    _k8s_rules(obj, schemas()[key], "", errors)
    return errors
