"""`rlhf feedback loop --local`: sample -> simulated labels -> export + new data version -> retrain, N rounds.

Each round: a batch from the current champion (prompts drawn with seed ``seed + round``), the demo's
simulated annotators label it through the real app, the labels are exported to
``data/raw/feedback/<batch_id>.jsonl`` and recorded as a new DVC data version, and ``rlhf retrain
--local`` trains on it. The registered versions trained on that data version are then tagged with the
human feedback they saw (:func:`rlhf.mlops.registry.tag_feedback`), which ``rlhf models list`` shows.

Measured per round (written to ``feedback/loop.json``): the reward model's agreement with the gold
annotator on an unlabelled probe batch sampled from the champion of that round, with the champion's
reward model before and with the new version's reward model after (:mod:`rlhf.feedback.onpolicy`),
and the gold score of the champion and of the new version (their evaluation metrics).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def feedback_lineage(export_dir: str | Path) -> dict[str, Any]:
    """The exported feedback in ``export_dir``: batch ids and the number of preference rows (labels)."""
    batches, labels = [], 0
    for f in sorted(Path(export_dir).glob("*.jsonl")):
        batches.append(f.stem)
        labels += sum(1 for line in f.read_text(encoding="utf-8").split("\n") if line.strip())
    return {"batches": batches, "labels": labels}


def run_loop(*, rounds: int, params: Path, prompts: Path | None, dataset: Path | None, annotators: int,
             n: int | None, seed: int, runs_dir: Path, dvc_file: Path, param: list[str], store: Path | None,
             echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    from rlhf.config import resolve
    from rlhf.config.resolve import RunConfig
    from rlhf.feedback import app as feedback_app
    from rlhf.feedback import export, onpolicy, simulate
    from rlhf.feedback.batch import sample_batch
    from rlhf.feedback.store import Store
    from rlhf.mlops import registry, retrain

    run = RunConfig.from_file(params, missing_ok=True)
    fb, reg = run.section("feedback"), run.section("register")
    if prompts is None and dataset is None:
        prompts = Path("data/raw/prompts.jsonl")
    st = Store(store or fb.store)
    out = []
    for r in range(1, rounds + 1):
        champ = registry.champion_version(reg)
        probe = sample_batch(reg_cfg=reg, fb_cfg=fb, model_cfg=run.section("model"),
                             batches_dir=Path(fb.batches_dir) / "probes", dataset=dataset, prompts_file=prompts,
                             n_prompts=n, seed=seed + 1000 + r)
        before = onpolicy.rm_gold_agreement(*onpolicy.load_reward_for(reg, int(champ.version))[:2], probe.items)
        batch = sample_batch(reg_cfg=reg, fb_cfg=fb, model_cfg=run.section("model"), batches_dir=fb.batches_dir,
                             dataset=dataset, prompts_file=prompts, n_prompts=n, seed=seed + r)
        tokens = {name: st.add_annotator(name) for name in simulate.sim_names(annotators)}
        with simulate.running_app(feedback_app.create_app(st, [batch], fb)) as base:
            counts = simulate.simulate(base, tokens, seed=seed + r)
        res = export.export(st, batch, fb.export_dir, overlap=fb.overlap)
        md5 = export.record_data_version(dvc_file, batch_id=batch.batch_id)
        echo(f"round {r}: batch {batch.batch_id} from v{batch.manifest['versions']['a']}, labels "
             f"{json.dumps(counts, sort_keys=True)}, {res['pairs']} pairs exported, data version {md5[:8]}")
        outcome = retrain.retrain(mode="local", params=params, parameters=resolve.parse_assignments(param),
                                  dvc_file=dvc_file, local_options={"runs_dir": runs_dir, "quiet": True},
                                  echo=echo)
        lineage = feedback_lineage(fb.export_dir)
        tagged = registry.tag_feedback(reg, data_hash=md5, labels=lineage["labels"], batches=lineage["batches"])
        new = max(tagged) if tagged else None
        after = onpolicy.rm_gold_agreement(*onpolicy.load_reward_for(reg, new)[:2], probe.items) if new else {}
        gold = {v: _metric(reg, v, "policy_gold_mean") for v in (int(champ.version), new) if v}
        now = registry.champion_version(reg)
        out.append({"round": r, "batch_id": batch.batch_id, "probe_batch_id": probe.batch_id, "labels": counts,
                    "pairs": res["pairs"], "data_hash": md5, "started": outcome.started, "versions": tagged,
                    "champion_before": int(champ.version), "champion_after": int(now.version),
                    "rm_agreement_before": before, "rm_agreement_after": after, "gold": gold})
        echo(f"round {r}: versions {tagged} record {lineage['labels']} human labels from "
             f"{len(lineage['batches'])} batch(es); champion v{champ.version} -> v{now.version}; on-policy RM "
             f"agreement {_pct(before)} -> {_pct(after)} ({before['n_pairs']} pairs); gold {gold}")
        Path(fb.batches_dir).parent.mkdir(parents=True, exist_ok=True)
        (Path(fb.batches_dir).parent / "loop.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def _metric(reg, version: int, key: str) -> float | None:
    from rlhf.mlops import registry

    mv = registry._get_version(registry._connect(), reg.model_name, version)
    try:
        return float((mv.tags or {}).get(f"metric.{key}"))
    except (TypeError, ValueError):
        return None


def _pct(a: dict) -> str:
    return "-" if not a or a.get("agreement") is None else f"{a['agreement']:.3f}"


__all__ = ["run_loop", "feedback_lineage"]
