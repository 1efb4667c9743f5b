"""The validate stage: Great Expectations suites over the prepared dataset.

One suite per dataset kind (sft, preferences, prompts), run on each split with
an ephemeral GX context (no GX project folder). A few checks that GX cannot
express on a single column (chosen != rejected, no prompt in both splits, the
conversation before the reply well-formed, every turn free of control strings) are
computed as helper columns that the expectations then check, so every rule is
an expectation and shows up in GX's results.

Output: ``<out>/validation.json`` (machine-readable), ``report.md`` and
``report.html`` listing each failed expectation with examples of offending
rows. If anything fails, :class:`~rlhf.errors.ValidationFailed` is raised after
the report is written, and the pipeline stops before training.
"""

from __future__ import annotations

import html
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf.config import ValidateConfig
from rlhf.data import conversation
from rlhf.data.prepare import COLUMNS, KINDS, load_split
from rlhf.errors import ValidationFailed
from rlhf.io import atomic_dir, write_json, write_manifest
from rlhf.mlops import tracking

TEXT_COLUMNS = {"sft": ["prompt", "response"], "preferences": ["prompt", "chosen", "rejected"],
                "prompts": ["prompt"]}
ISO_TIME = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$"
ANNOTATOR_ID = r"^[A-Za-z0-9_.@:+-]{1,128}$"
#: control strings of common chat templates (ChatML, Llama 3, Llama 2 / Mistral, Gemma): text that holds one
#: tried to open or close a turn. Training encodes them as plain text (rlhf.train.models.encode_text); such rows
#: are still flagged, as they are almost always scraped transcripts or injection attempts.
CONTROL_STRINGS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "<start_of_turn>", "<end_of_turn>")
CONTROL_REGEX = "|".join(s.replace("|", r"\|").replace("[", r"\[").replace("]", r"\]") for s in CONTROL_STRINGS)


def _suite(gx, gxe, kind: str, split: str, cfg: ValidateConfig):
    """The expectations for one dataset kind and split; each carries a plain-words description."""
    suite = gx.ExpectationSuite(name=f"{kind}-{split}")

    def add(exp, why: str):
        exp.meta = {"why": why}
        suite.add_expectation(exp)

    for col in COLUMNS[kind]:
        add(gxe.ExpectColumnToExist(column=col), f"column '{col}' is present")
    for col in TEXT_COLUMNS[kind]:
        limit = cfg.max_prompt_chars if col == "prompt" else cfg.max_response_chars
        add(gxe.ExpectColumnValuesToNotBeNull(column=col), f"'{col}' is never missing")
        add(gxe.ExpectColumnValuesToMatchRegex(column=col, regex=r"\S"), f"'{col}' is not empty or blank")
        add(gxe.ExpectColumnValueLengthsToBeBetween(column=col, min_value=1, max_value=limit),
            f"'{col}' is at most {limit} characters")
        if cfg.reject_control_strings:
            add(gxe.ExpectColumnValuesToNotMatchRegex(column=col, regex=CONTROL_REGEX),
                f"'{col}' holds no chat-template control string (<|im_end|>, [INST], ...)")
    add(gxe.ExpectColumnValuesToBeInSet(column="_conversation_ok", value_set=[True]),
        "the conversation before the reply is well-formed (system turns first, then user/assistant "
        "alternating, the last a user turn; no blank turn)")
    if cfg.reject_control_strings:
        add(gxe.ExpectColumnValuesToNotMatchRegex(column="_turns", regex=CONTROL_REGEX),
            "no turn of the conversation holds a chat-template control string (<|im_end|>, [INST], ...)")
    minimum = cfg.min_rows.get(kind, 1) if split == "train" else cfg.min_eval_rows
    add(gxe.ExpectTableRowCountToBeBetween(min_value=minimum), f"at least {minimum} {split} rows")
    add(gxe.ExpectColumnValuesToBeInSet(column="_prompt_in_other_split", value_set=[False]),
        "no prompt appears in both train and eval")
    if kind == "preferences":
        add(gxe.ExpectColumnValuesToBeInSet(column="_chosen_differs", value_set=[True]),
            "chosen and rejected differ")
        add(gxe.ExpectCompoundColumnsToBeUnique(column_list=["prompt", "chosen", "rejected"]),
            "no duplicate preference pairs")
        add(gxe.ExpectColumnValuesToBeInSet(column="_not_contradicted", value_set=[True],
                                            mostly=1.0 - cfg.max_contradictory_fraction),
            f"at most {cfg.max_contradictory_fraction:.0%} of the pairs also appear labelled the other way round")
        add(gxe.ExpectColumnValuesToMatchRegex(column="annotator", regex=ANNOTATOR_ID),
            "annotator ids, where given, are short identifiers")
        add(gxe.ExpectColumnValuesToMatchRegex(column="time", regex=ISO_TIME),
            "label times, where given, are ISO-8601 timestamps")
    elif kind == "sft":
        add(gxe.ExpectCompoundColumnsToBeUnique(column_list=["prompt", "response"]), "no duplicate demonstrations")
    else:
        add(gxe.ExpectColumnValuesToBeUnique(column="prompt"), "no duplicate prompts")
    return suite


def _with_helpers(kind: str, df: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    df = df.reset_index(drop=True)
    other_prompts = set(other["prompt"].dropna()) if "prompt" in other else set()
    df["_prompt_in_other_split"] = df["prompt"].isin(other_prompts).astype(bool) if "prompt" in df else False
    turns = _conversations(df)  # the conversation before the reply: every turn checked, as a whole and as text
    df["_conversation_ok"] = [conversation.history_problem(m, blank_turns=False) is None for m in turns]
    df["_turns"] = ["\n".join(str(t["content"]) for t in m) for m in turns]
    if kind == "preferences" and {"chosen", "rejected"} <= set(df.columns):
        df["_chosen_differs"] = (df["chosen"].fillna("") != df["rejected"].fillna("")).astype(bool)
        # the same pair labelled both ways (A > B and B > A for one prompt): contradictory labels
        pairs = set(zip(df["prompt"].fillna(""), df["chosen"].fillna(""), df["rejected"].fillna(""), strict=True))
        df["_not_contradicted"] = [(p, r, c) not in pairs for p, c, r in
                                   zip(df["prompt"].fillna(""), df["chosen"].fillna(""), df["rejected"].fillna(""),
                                       strict=True)]
    return df


def _conversations(df: pd.DataFrame) -> list[list[dict]]:
    """Each row's turns (``prompt_messages``, else ``prompt`` as one user turn); a missing one is no turns."""
    if "prompt_messages" in df:
        return [conversation.as_messages(m) if m is not None else [] for m in df["prompt_messages"]]
    if "prompt" in df:
        return [conversation.as_messages(p) if isinstance(p, str) else [] for p in df["prompt"]]
    return [[] for _ in range(len(df))]


def _short(v: Any, n: int = 120) -> Any:
    if isinstance(v, str) and len(v) > n:
        return v[:n] + "..."
    return v


def _examples(df: pd.DataFrame, result: dict, cfg: ValidateConfig) -> list[dict]:
    idx = result.get("unexpected_index_list") or []
    rows = []
    for i in idx[: cfg.examples_per_failure]:
        if isinstance(i, dict):  # GX may report index as a dict of id columns
            i = next(iter(i.values()))
        try:
            row = df.loc[i]
        except (KeyError, TypeError):
            continue
        rows.append({"row": int(i), **{c: _short(row[c]) for c in df.columns if not c.startswith("_")
                                      and c != "prompt_messages" and pd.notna(row[c])}})
    if not rows and result.get("partial_unexpected_list"):
        rows = [{"value": _short(v)} for v in result["partial_unexpected_list"][: cfg.examples_per_failure]]
    return rows


def _quiet_gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    for name in ["great_expectations", *logging.root.manager.loggerDict]:
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="great_expectations")


def run_checks(dataset: str | Path, cfg: ValidateConfig | None = None) -> dict[str, Any]:
    """Run every suite; return the result document (no files written)."""
    cfg = cfg or ValidateConfig()
    _quiet_gx()
    import great_expectations as gx
    import great_expectations.expectations as gxe

    _quiet_gx()  # GX sets some logger levels of its own on import

    ctx = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    except ImportError:  # older/newer GX layout: progress bars are cosmetic
        pass
    source = ctx.data_sources.add_pandas("rlhf")
    checks: list[dict] = []
    for kind in KINDS:
        frames = {s: load_split(dataset, kind, s) for s in ("train", "eval")}
        for split, other in (("train", "eval"), ("eval", "train")):
            df = _with_helpers(kind, frames[split], frames[other])
            asset = source.add_dataframe_asset(f"{kind}-{split}")
            batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
                batch_parameters={"dataframe": df})
            suite = ctx.suites.add(_suite(gx, gxe, kind, split, cfg))
            res = batch.validate(suite, result_format={"result_format": "COMPLETE",
                                                        "unexpected_index_column_names": None})
            for r in res.results:
                conf = r.expectation_config
                result = r.result or {}
                checks.append({
                    "dataset": f"{kind}/{split}",
                    "expectation": conf.type,
                    "kwargs": {k: v for k, v in conf.kwargs.items() if k != "batch_id"},
                    "description": (conf.meta or {}).get("why", conf.type),
                    "success": bool(r.success),
                    "unexpected_count": result.get("unexpected_count"),
                    "observed_value": result.get("observed_value"),
                    "examples": [] if r.success else _examples(df, result, cfg),
                    "error": (r.exception_info or {}).get("exception_message") if not r.success else None,
                })
    failed = [c for c in checks if not c["success"]]
    return {"success": not failed, "n_checks": len(checks), "n_failed": len(failed), "checks": checks}


def _markdown(doc: dict) -> str:
    lines = ["# Data validation report", "",
             f"**{'PASSED' if doc['success'] else 'FAILED'}**: {doc['n_checks'] - doc['n_failed']} of "
             f"{doc['n_checks']} expectations met.", ""]
    failed = [c for c in doc["checks"] if not c["success"]]
    if failed:
        lines += ["## Failed expectations", ""]
        for c in failed:
            n = c["unexpected_count"]
            lines.append(f"### {c['dataset']}: {c['description']}")
            lines.append(f"`{c['expectation']}` {json.dumps(c['kwargs'])}"
                         + (f" — {n} offending rows" if n is not None else "")
                         + (f" — observed {c['observed_value']}" if c["observed_value"] is not None else ""))
            if c.get("error"):
                lines.append(f"Error: {c['error']}")
            for ex in c["examples"]:
                lines.append(f"- `{json.dumps(ex, ensure_ascii=False)}`")
            lines.append("")
    lines += ["## All expectations", "", "| dataset | expectation | result |", "|---|---|---|"]
    for c in doc["checks"]:
        lines.append(f"| {c['dataset']} | {c['description']} | {'ok' if c['success'] else '**FAILED**'} |")
    return "\n".join(lines) + "\n"


def _html(doc: dict) -> str:
    rows = []
    for c in doc["checks"]:
        ex = "".join(f"<li><code>{html.escape(json.dumps(e, ensure_ascii=False))}</code></li>" for e in c["examples"])
        colour = "#e6f4ea" if c["success"] else "#fce8e6"
        rows.append(
            f"<tr style='background:{colour}'><td>{html.escape(c['dataset'])}</td>"
            f"<td>{html.escape(c['description'])}<br><small>{html.escape(c['expectation'])}</small></td>"
            f"<td>{'ok' if c['success'] else 'FAILED'}</td>"
            f"<td>{'' if c['unexpected_count'] is None else c['unexpected_count']}</td><td><ul>{ex}</ul></td></tr>")
    status = "PASSED" if doc["success"] else "FAILED"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Data validation: {status}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px;"
            "vertical-align:top}table{border-collapse:collapse}</style></head><body>"
            f"<h1>Data validation: {status}</h1><p>{doc['n_checks'] - doc['n_failed']} of {doc['n_checks']} "
            "expectations met.</p><table><tr><th>dataset</th><th>expectation</th><th>result</th>"
            f"<th>offending rows</th><th>examples</th></tr>{''.join(rows)}</table></body></html>")


def validate(dataset: str | Path, out: str | Path, cfg: ValidateConfig | None = None) -> dict[str, Any]:
    """Validate a prepared dataset; write the report to ``out``; raise ValidationFailed on any failure."""
    cfg = cfg or ValidateConfig()
    with tracking.stage_run("validate", cfg) as tracker:
        doc = run_checks(dataset, cfg)
        metrics = {"checks": doc["n_checks"], "failed": doc["n_failed"], "passed": int(doc["success"]),
                   "contradictory_pairs": sum(c["unexpected_count"] or 0 for c in doc["checks"]
                                              if c["kwargs"].get("column") == "_not_contradicted")}
        with atomic_dir(out) as tmp:
            write_json(tmp / "validation.json", doc)
            (tmp / "report.md").write_text(_markdown(doc), encoding="utf-8")
            (tmp / "report.html").write_text(_html(doc), encoding="utf-8")
            write_manifest(tmp, kind="validation-report", inputs={"dataset": dataset}, config=cfg,
                           metrics=metrics)
        tracker.log_metrics(metrics)
        tracker.set_tags({"validation_passed": doc["success"]})
        tracker.log_artifacts(out, "validation")
    if not doc["success"]:
        first = next(c for c in doc["checks"] if not c["success"])
        n = first["unexpected_count"]
        raise ValidationFailed(
            f"data validation failed: {doc['n_failed']} of {doc['n_checks']} expectations; first: "
            f"{first['dataset']}: {first['description']}" + (f" ({n} rows)" if n else ""),
            hint=f"see {Path(out) / 'report.md'}",
        )
    return metrics
