"""Labelling batches: prompts with two responses each, written as a content-addressed directory.

A batch is a directory ``<batches_dir>/<batch_id>/`` with

* ``items.jsonl``: one row per item ``{"item_id", "prompt", "response_a", "response_b", "source_a",
  "source_b"}``; ``source_*`` say which model version, seed and settings produced the response; a
  prompt that is a conversation (several turns) has them in ``prompt_messages`` too, ``prompt``
  being its readable text (:func:`rlhf.data.conversation.render`);
* ``manifest.json``: ``{"kind": "feedback-batch", "batch_id", "created", "model_name", "versions",
  "generation", "n_items", "items_sha256", "prompts_from"}``.

``batch_id`` is the first 16 hex digits of the sha256 of ``items.jsonl``: the same items give the
same id, and a changed file no longer matches its id (:func:`load_batch` refuses it). The Label
Studio bridge reads the same two files.

:func:`sample_batch` draws the prompts (the held-out prompts of a prepared dataset, or a file)
and samples both responses from ``models:/<register.model_name>@champion`` (two samples with seeds
``seed`` and ``seed + 1``), or the champion against the challenger (``vs="challenger"``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.data import conversation
from rlhf.errors import DataError, UserError
from rlhf.io import atomic_dir, write_json

ITEMS = "items.jsonl"
MANIFEST = "manifest.json"
KIND = "feedback-batch"
ITEM_FIELDS = ("item_id", "prompt", "response_a", "response_b", "source_a", "source_b")
OPTIONAL_FIELDS = ("prompt_messages",)


@dataclass
class Batch:
    path: Path
    manifest: dict[str, Any]
    items: list[dict[str, Any]]

    @property
    def batch_id(self) -> str:
        return self.manifest["batch_id"]


def items_bytes(items: list[dict[str, Any]]) -> bytes:
    """One ASCII JSON object per line: model text may hold U+2028, U+0085 and the like, which some
    readers (``str.splitlines``) take for line breaks; escaped, every reader sees one row per line."""
    return "".join(json.dumps({k: it[k] for k in (*ITEM_FIELDS, *OPTIONAL_FIELDS) if k in it}, ensure_ascii=True,
                              sort_keys=True) + "\n" for it in items).encode("ascii")


def batch_id_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def write_batch(items: list[dict[str, Any]], batches_dir: str | Path, meta: dict[str, Any]) -> Batch:
    """Write ``items`` as a batch under ``batches_dir`` (atomically); returns it. Same items, same batch."""
    if not items:
        raise UserError("no items to put in a batch", hint="give at least one prompt")
    ids = [it["item_id"] for it in items]
    if len(set(ids)) != len(ids):
        raise UserError("item ids in a batch must be unique")
    data = items_bytes(items)
    bid = batch_id_of(data)
    out = Path(batches_dir) / bid
    manifest = {"kind": KIND, "schema_version": 1, "batch_id": bid, "n_items": len(items),
                "items_sha256": hashlib.sha256(data).hexdigest(),
                "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **meta}
    if (out / MANIFEST).is_file():  # the same items again: the batch exists already
        return load_batch(out)
    with atomic_dir(out) as tmp:
        (tmp / ITEMS).write_bytes(data)
        write_json(tmp / MANIFEST, manifest)
    return load_batch(out)


def load_batch(path: str | Path) -> Batch:
    """Read and check a batch directory; every problem is one line naming the file."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"batch not found: {p}", hint="give a directory written by `rlhf feedback sample`")
    mpath, ipath = p / MANIFEST, p / ITEMS
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"not a labelling batch: no {MANIFEST}", where=str(p)) from None
    except (OSError, ValueError) as e:
        raise DataError(f"corrupt batch manifest ({e})", where=str(mpath)) from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND or not manifest.get("batch_id"):
        raise DataError("not a labelling batch manifest (kind feedback-batch with a batch_id)", where=str(mpath))
    try:
        data = ipath.read_bytes()
    except OSError:
        raise DataError(f"batch has no {ITEMS}", where=str(p)) from None
    if batch_id_of(data) != manifest["batch_id"]:
        raise DataError(f"corrupt batch: {ITEMS} does not match its id {manifest['batch_id']} (changed after "
                        "sampling?)", where=str(ipath), hint="sample a new batch instead of editing one")
    items = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"line {n}: not JSON ({e})", where=str(ipath)) from None
        missing = [k for k in ITEM_FIELDS if k not in row]
        if missing:
            raise DataError(f"line {n}: missing {', '.join(missing)}", where=str(ipath))
        items.append(row)
    return Batch(p, manifest, items)


def read_prompts(path: str | Path) -> list[conversation.Messages]:
    """Prompts from a file: JSONL rows with a ``prompt`` field (a text, or a list of ``{"role", "content"}``
    turns ending with a user turn), or plain text (one prompt per line)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file not found: {p}")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        if p.suffix.lower() in (".jsonl", ".json"):
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"line {n}: not JSON ({e})", where=str(p)) from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if isinstance(prompt, list):
                problem = "turns must be {role, content} objects" if not all(
                    isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt) else \
                    conversation.history_problem(prompt, blank_turns=False)
                if problem:
                    raise DataError(f"line {n}: field 'prompt': {problem}", where=str(p))
            elif not isinstance(prompt, str):
                raise DataError(f"line {n}: no field 'prompt' (a text or a list of messages)", where=str(p))
            out.append(conversation.as_messages(prompt))
        else:
            out.append(conversation.as_messages(line.strip()))
    if not out:
        raise UserError(f"no prompts in {p}")
    return out


def draw_prompts(*, dataset: str | Path | None, prompts_file: str | Path | None, n: int,
                 seed: int) -> list[conversation.Messages]:
    if prompts_file is not None:
        prompts = read_prompts(prompts_file)
    elif dataset is not None:
        from rlhf.data.prepare import load_split, prompt_conversations

        unique: dict[str, conversation.Messages] = {}
        for m in prompt_conversations(load_split(dataset, "prompts", "eval")):
            unique.setdefault(conversation.render(m), m)
        prompts = list(unique.values())
    else:
        raise UserError("give --dataset DIR (its held-out prompts) or --prompts FILE")
    rng = random.Random(seed)
    return rng.sample(prompts, min(n, len(prompts)))


def _load(alias: str, reg_cfg, model_cfg):
    from rlhf.mlops import registry
    from rlhf.train import models

    mv = registry.champion_version(reg_cfg, alias=alias)
    if mv is None:
        raise UserError(f"{reg_cfg.model_name} has no '{alias}' version to sample from",
                        hint="train and register a model first: rlhf run, or rlhf retrain --local")
    path = registry.champion_dir(reg_cfg, alias=alias)
    model, tok = models.load_policy(path, model_cfg, for_training=False)
    return model, tok, int(mv.version)


def sample_batch(*, reg_cfg, fb_cfg, model_cfg, batches_dir: str | Path, dataset: str | Path | None = None,
                 prompts_file: str | Path | None = None, vs: str | None = None, n_prompts: int | None = None,
                 seed: int | None = None) -> Batch:
    """Sample a batch from the champion (two samples, or champion vs ``vs``); see the module docstring."""
    from rlhf.train import generation

    seed = fb_cfg.seed if seed is None else seed
    n = n_prompts or fb_cfg.n_prompts
    if vs not in (None, "challenger"):
        raise UserError(f"--vs must be 'challenger', not {vs!r}")
    model_a, tok_a, ver_a = _load("champion", reg_cfg, model_cfg)
    prompts = draw_prompts(dataset=dataset, prompts_file=prompts_file, n=n, seed=seed)
    if vs:
        model_b, tok_b, ver_b = _load(vs, reg_cfg, model_cfg)
    else:
        model_b, tok_b, ver_b = model_a, tok_a, ver_a
    gen = {"max_new_tokens": fb_cfg.max_new_tokens, "temperature": fb_cfg.temperature}
    out_a = generation.sample(model_a, tok_a, prompts, generator_seed=seed, **gen).texts
    out_b = generation.sample(model_b, tok_b, prompts, generator_seed=seed + 1, **gen).texts
    src = {"model_name": reg_cfg.model_name, **gen}
    items = [{"item_id": f"{i:04d}", "prompt": conversation.render(p), "response_a": a, "response_b": b,
              "source_a": {**src, "alias": "champion", "version": ver_a, "seed": seed},
              "source_b": {**src, "alias": vs or "champion", "version": ver_b, "seed": seed + 1},
              **({"prompt_messages": p} if len(p) > 1 else {})}
             for i, (p, a, b) in enumerate(zip(prompts, out_a, out_b))]
    meta = {"model_name": reg_cfg.model_name, "versions": {"a": ver_a, "b": ver_b},
            "mode": f"champion-vs-{vs}" if vs else "champion-two-samples", "generation": {**gen, "seed": seed},
            "prompts_from": str(prompts_file or dataset)}
    return write_batch(items, batches_dir, meta)


__all__ = ["Batch", "load_batch", "write_batch", "sample_batch", "read_prompts", "draw_prompts", "ITEM_FIELDS"]
