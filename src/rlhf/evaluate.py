"""The evaluate stage: candidate policy vs the SFT baseline (and the current champion), plus the gate.

All models answer the same eval prompts with the same seeds. Reported per
model: mean gold score (the simulated annotator; demo prompts only), mean
reward-model score, response length, distinct-2, repetition rate, EOS rate;
for the candidate also win rates vs the baseline (by gold and by RM, ties
count half) and KL(candidate || baseline): the mean over samples of the summed
per-token ``log p_cand - log p_base`` (k1 estimator) at the sampling
temperature.

When the candidate is a PPO output with snapshots (``ppo.snapshot_every``), each snapshot is
evaluated the same way on the first ``curve_prompts`` eval prompts: the over-optimisation curve,
gold and reward-model score against KL to the SFT policy, from the SFT point (KL 0) to the final
policy; with the run's per-step training curves it goes into the report, ``curves/`` and MLflow
(:mod:`rlhf.curves`).

The gate (``gate.json``) passes when the candidate beats the baseline and the
champion by ``gate_margin`` on ``gate_metric`` and the KL is within
``kl_budget``; it says which check failed and why.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path
from typing import Any

import torch

from rlhf import curves
from rlhf.config import EvaluateConfig, ModelConfig
from rlhf.data import conversation, demo
from rlhf.data.prepare import load_split, prompt_conversations
from rlhf.io import atomic_dir, read_manifest, write_json, write_manifest
from rlhf.mlops import tracking
from rlhf.ppo import snapshots
from rlhf.train import generation, models
from rlhf.train.loop import set_seed
from rlhf.train.reward import score_texts

log = logging.getLogger("rlhf")


def text_stats(texts: list[str]) -> dict[str, float]:
    """distinct-2 over all responses, mean within-response repetition (repeated-bigram share), words."""
    all_bigrams, reps, lengths = [], [], []
    for t in texts:
        ws = demo.words(t)
        bg = list(zip(ws, ws[1:]))
        all_bigrams.extend(bg)
        reps.append(1 - len(set(bg)) / len(bg) if bg else 0.0)
        lengths.append(len(ws))
    return {
        "distinct_2": len(set(all_bigrams)) / len(all_bigrams) if all_bigrams else 0.0,
        "repetition_rate": sum(reps) / max(len(reps), 1),
        "words": sum(lengths) / max(len(lengths), 1),
    }


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _win_rate(a: list[float], b: list[float]) -> float:
    pairs = [(x, y) for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))]
    if not pairs:
        return float("nan")
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs) / len(pairs)


def sample_model(path: str | Path, prompts: list[conversation.Messages], cfg: EvaluateConfig,
                 model_cfg: ModelConfig):
    model, tok = models.load_policy(path, model_cfg.model_copy(update={"lora": False}), for_training=False)
    return model, tok, sample_loaded(model, tok, prompts, cfg)


def sample_loaded(model, tok, prompts: list[conversation.Messages], cfg: EvaluateConfig) -> list[generation.Rollout]:
    """One response per prompt, in batches of ``batch_size`` seeded by their position (the same for every model)."""
    return [generation.sample(model, tok, prompts[i : i + cfg.batch_size], max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, generator_seed=cfg.seed + i)
            for i in range(0, len(prompts), cfg.batch_size)]


def sequence_kl(model, base_model, rollouts, temperature: float) -> list[float]:
    """KL(model || base) per sample, on ``model``'s own samples: the summed per-token
    ``log p_model - log p_base`` of the response (k1 estimator) at the sampling temperature."""
    kls = []
    with torch.no_grad():
        for r in rollouts:
            lp = generation.response_logprobs(model, r, temperature)
            lb = generation.response_logprobs(base_model, r, temperature)
            kls.extend(((lp - lb) * r.response_mask).sum(1).tolist())
    return kls


def _gold(prompts: list[str], texts: list[str]) -> list[float]:
    return [demo.gold_score(p, t) if demo.topic_of(p) else float("nan") for p, t in zip(prompts, texts)]


def _point(label: str, step: int, kl: list[float], gold: list[float], rm: list[float]) -> dict[str, Any]:
    return {"label": label, "step": step, "kl": _mean(kl), "gold": _mean(gold), "rm": _mean(rm), "n_prompts": len(kl)}


def curve_points(policy: str | Path, baseline: str | Path, prompts: list[conversation.Messages], per_model, loaded,
                 policy_kls: list[float], rm, rm_tok, max_len: int, cfg: EvaluateConfig,
                 model_cfg: ModelConfig) -> list[dict[str, Any]]:
    """The over-optimisation curve over the candidate's PPO snapshots on the first ``curve_prompts`` prompts:
    the SFT point (its KL to itself, 0), each snapshot (sampled, scored, KL to the SFT policy as for the
    candidate) and the final policy (the candidate's own samples). [] when the candidate has no snapshots."""
    idx = snapshots.index(policy)
    n = min(cfg.curve_prompts, len(prompts))
    if idx is None or n == 0:
        return []
    prompts = prompts[:n]
    base_model, _, base_rollouts = loaded["baseline"]
    first = [r for i, r in zip(range(0, n, cfg.batch_size), base_rollouts)]  # the batches holding prompts[:n]
    base = per_model["baseline"]
    points = [_point("sft", 0, sequence_kl(base_model, base_model, first, cfg.temperature)[:n],
                     base["gold"][:n], base["rm"][:n])]
    entries = idx.get("snapshots", [])
    pol_manifest = read_manifest(policy)
    if entries and idx.get("lora") and \
            pol_manifest.get("inputs", {}).get("sft_model") != read_manifest(baseline).get("content_hash"):
        log.warning("[evaluate] the baseline is not the SFT policy the PPO run started from: its LoRA snapshots "
                    "do not apply to it; the curve shows the SFT baseline and the final policy only")
        entries = []
    for entry in entries:
        model, tok = snapshots.load(policy, entry, idx, baseline, model_cfg)
        rollouts = sample_loaded(model, tok, prompts, cfg)
        texts = [t for r in rollouts for t in r.texts]
        points.append(_point(f"step {entry['step']}", int(entry["step"]),
                             sequence_kl(model, base_model, rollouts, cfg.temperature),
                             _gold([conversation.render(p) for p in prompts], texts),
                             score_texts(rm, rm_tok, prompts, texts, max_len).tolist()))
        del model
    final_step = int((pol_manifest.get("metrics") or {}).get("steps") or idx.get("total_steps") or 0)
    pol = per_model["policy"]
    points.append(_point(f"final (step {final_step})", final_step, policy_kls[:n], pol["gold"][:n], pol["rm"][:n]))
    log.info("[evaluate] gold/reward vs KL: %s", ", ".join(f"{p['label']}: KL {p['kl']:.2f} gold {p['gold']:.2f} "
                                                          f"RM {p['rm']:.2f}" for p in points))
    return points


def _plots(per_model: dict[str, dict[str, list[float]]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, s in per_model.items():
        gold = [g for g in s["gold"] if not math.isnan(g)]
        if gold:
            axes[0].hist(gold, bins=20, alpha=0.5, label=name)
        axes[1].hist(s["rm"], bins=20, alpha=0.5, label=name)
    axes[0].set_title("gold score")
    axes[1].set_title("reward-model score")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def gate(metrics: dict[str, Any], cfg: EvaluateConfig, has_champion: bool,
         rm_accuracy: float | None = None) -> dict[str, Any]:
    """Pass/fail with reasons: beats the baseline (and champion) by the margin, KL within budget, and the
    floors: an absolute gold / reward level and a reward model that ranks held-out pairs well enough."""
    key = f"policy_{cfg.gate_metric}_mean"
    checks = []

    def check(name: str, ok: bool, detail: str):
        checks.append({"check": name, "passed": bool(ok), "detail": detail})

    cand = metrics[key]
    base = metrics[f"baseline_{cfg.gate_metric}_mean"]
    check("beats_baseline", cand >= base + cfg.gate_margin if not math.isnan(cand) else False,
          f"{cfg.gate_metric} {cand:.3f} vs baseline {base:.3f} + margin {cfg.gate_margin}")
    if has_champion:
        champ = metrics[f"champion_{cfg.gate_metric}_mean"]
        check("beats_champion", cand >= champ + cfg.gate_margin,
              f"{cfg.gate_metric} {cand:.3f} vs champion {champ:.3f} + margin {cfg.gate_margin}")
    check("kl_within_budget", metrics["kl_to_baseline"] <= cfg.kl_budget,
          f"KL {metrics['kl_to_baseline']:.3f} vs budget {cfg.kl_budget}")
    for name, floor, value in (("gold_floor", cfg.min_gold, metrics.get("policy_gold_mean")),
                               ("reward_floor", cfg.min_reward, metrics.get("policy_rm_mean"))):
        if floor is not None:
            ok = value is not None and not math.isnan(value) and value >= floor
            shown = "undefined (set evaluate.min_gold: null for data without a gold score)" \
                if value is None or math.isnan(value) else f"{value:.3f}"
            check(name, ok, f"{name.split('_')[0]} {shown} vs floor {floor}")
    if cfg.min_rm_accuracy is not None and rm_accuracy is not None:
        check("reward_model_sane", rm_accuracy >= cfg.min_rm_accuracy,
              f"reward model held-out accuracy {rm_accuracy:.3f} vs minimum {cfg.min_rm_accuracy}")
    failed = [c for c in checks if not c["passed"]]
    return {"passed": not failed, "metric": cfg.gate_metric, "margin": cfg.gate_margin,
            "kl_budget": cfg.kl_budget, "checks": checks,
            "reason": "all checks passed" if not failed else "; ".join(f"{c['check']} failed: {c['detail']}"
                                                                        for c in failed)}


def evaluate(dataset: str | Path, policy: str | Path, baseline: str | Path, reward_model: str | Path,
             out: str | Path, cfg: EvaluateConfig | None = None, model_cfg: ModelConfig | None = None,
             champion: str | Path | None = None) -> dict[str, Any]:
    """Compare ``policy`` with ``baseline`` (the SFT policy) and optionally ``champion``; write report + gate."""
    cfg, model_cfg = cfg or EvaluateConfig(), model_cfg or ModelConfig()
    set_seed(cfg.seed)
    prompts = prompt_conversations(load_split(dataset, "prompts", "eval").head(cfg.n_prompts))
    prompt_texts = [conversation.render(p) for p in prompts]  # the gold score and the report read the text
    rm_manifest = read_manifest(reward_model, expect_kind="reward-model")
    max_len = rm_manifest.get("max_seq_len", 256)
    rm, rm_tok = models.load_reward_model(reward_model, model_cfg.model_copy(update={"lora": False}),
                                          for_training=False)

    named = {"policy": policy, "baseline": baseline, **({"champion": champion} if champion else {})}
    per_model: dict[str, dict[str, Any]] = {}
    loaded = {}
    for name, path in named.items():
        model, tok, rollouts = sample_model(path, prompts, cfg, model_cfg)
        texts = [t for r in rollouts for t in r.texts]
        per_model[name] = {
            "texts": texts,
            "gold": _gold(prompt_texts, texts),
            "rm": score_texts(rm, rm_tok, prompts, texts, max_len).tolist(),
            "tokens": torch.cat([r.lengths for r in rollouts]).float().tolist(),
            "eos": torch.cat([r.has_eos for r in rollouts]).float().tolist(),
        }
        loaded[name] = (model, tok, rollouts)

    # KL(policy || baseline) on the policy's own samples, at the sampling temperature
    pol_model, _, pol_rollouts = loaded["policy"]
    kls = sequence_kl(pol_model, loaded["baseline"][0], pol_rollouts, cfg.temperature)
    del pol_model, loaded["policy"]
    loaded.pop("champion", None)  # the snapshots load one at a time beside the baseline
    points = curve_points(policy, baseline, prompts, per_model, loaded, kls, rm, rm_tok, max_len, cfg, model_cfg)
    steps = snapshots.step_metrics(policy)
    del loaded

    metrics: dict[str, Any] = {}
    for name, s in per_model.items():
        stats = text_stats(s["texts"])
        metrics.update({
            f"{name}_gold_mean": _mean(s["gold"]),
            f"{name}_rm_mean": _mean(s["rm"]),
            f"{name}_response_tokens": _mean(s["tokens"]),
            f"{name}_eos_rate": _mean(s["eos"]),
            **{f"{name}_{k}": v for k, v in stats.items()},
        })
    metrics["win_rate_gold_vs_baseline"] = _win_rate(per_model["policy"]["gold"], per_model["baseline"]["gold"])
    metrics["win_rate_rm_vs_baseline"] = _win_rate(per_model["policy"]["rm"], per_model["baseline"]["rm"])
    metrics["kl_to_baseline"] = _mean(kls)
    metrics["n_prompts"] = len(prompts)
    rm_accuracy = (rm_manifest.get("metrics") or {}).get("eval_accuracy")
    if isinstance(rm_accuracy, (int, float)):
        metrics["reward_model_eval_accuracy"] = float(rm_accuracy)
    best = curves.best_gold(points)
    if best is not None:
        metrics.update({"curve_best_gold_step": best["step"], "curve_best_gold_kl": best["kl"]})
    decision = gate(metrics, cfg, champion is not None, metrics.get("reward_model_eval_accuracy"))
    metrics["gate_passed"] = int(decision["passed"])

    samples = [{"prompt": p, **({"prompt_messages": m} if len(m) > 1 else {}),
                **{n: {"text": per_model[n]["texts"][i], "gold": per_model[n]["gold"][i],
                       "rm": per_model[n]["rm"][i]} for n in per_model}}
               for i, (p, m) in enumerate(zip(prompt_texts, prompts))]
    with tracking.stage_run("evaluate", cfg) as tracker:
        tracker.log_metrics({k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))})
        tracker.set_tags({"gate_passed": decision["passed"], "gate_reason": decision["reason"][:500]})
        for p in points:  # the curve as MLflow metrics too, one "step" per PPO step
            tracker.log_metrics({"curve_kl": p["kl"], "curve_gold": p["gold"], "curve_rm": p["rm"]}, step=p["step"])
        figures = {}
        if points:
            figures[curves.CURVE_PNG] = curves.curve_png(points)
        if steps:
            figures[curves.TRAINING_PNG] = curves.training_png(steps)
        with atomic_dir(out) as tmp:
            write_json(tmp / "metrics.json", metrics)
            write_json(tmp / "gate.json", decision)
            write_json(tmp / "samples.json", samples)
            if figures:
                (tmp / "curves").mkdir()
                for name, png in figures.items():
                    (tmp / "curves" / name).write_bytes(png)
                if points:
                    curves.write_tables(points, tmp / "curves")
            (tmp / "report.html").write_text(_report(metrics, decision, samples, per_model, cfg, named, points,
                                                     figures), encoding="utf-8")
            write_manifest(tmp, kind="evaluation", inputs={k: v for k, v in {**named, "reward_model": reward_model,
                                                                               "dataset": dataset}.items()},
                           config=cfg, metrics=metrics, extra={"gate": decision, "mlflow_run_id": tracker.run_id})
        tracker.log_artifacts(out, "evaluation")
    log.info("[evaluate] gold %.3f vs baseline %.3f, RM %.3f vs %.3f, KL %.3f; gate %s (%s)",
             metrics["policy_gold_mean"], metrics["baseline_gold_mean"], metrics["policy_rm_mean"],
             metrics["baseline_rm_mean"], metrics["kl_to_baseline"], "PASSED" if decision["passed"] else "FAILED",
             decision["reason"])
    return metrics


def _curve_section(points: list[dict[str, Any]], figures: dict[str, bytes]) -> str:
    """The report's curves: gold/RM vs KL (with its table) and the PPO training curves, where present."""
    parts = []
    if curves.CURVE_PNG in figures:
        rows = "".join(f"<tr><td>{html.escape(p['label'])}</td>" + "".join(
            f"<td>{p[k]:.3f}</td>" for k in ("kl", "gold", "rm")) + "</tr>" for p in points)
        parts.append(
            "<h2>Gold and reward vs KL along the PPO run</h2><p>Each point is a policy of the run (SFT, the PPO "
            f"snapshots, the final policy) on the first {points[0]['n_prompts']} eval prompts. A reward-model score "
            "that keeps rising while gold turns down is over-optimisation of the reward model; the KL where gold "
            "peaks is a sensible KL budget (<code>evaluate.kl_budget</code>, <code>ppo.kl_coef</code>).</p>"
            f'<img src="data:image/png;base64,{base64.b64encode(figures[curves.CURVE_PNG]).decode()}" '
            'alt="gold and reward-model score vs KL">'
            f"<table><tr><th>policy</th><th>KL to SFT</th><th>gold</th><th>RM score</th></tr>{rows}</table>")
    if curves.TRAINING_PNG in figures:
        parts.append("<h2>PPO training curves</h2><p>Per step, on the training rollouts.</p>"
                     f'<img src="data:image/png;base64,{base64.b64encode(figures[curves.TRAINING_PNG]).decode()}" '
                     'alt="PPO training curves">')
    return "".join(parts)


def _report(metrics, decision, samples, per_model, cfg, named, points=(), figures=None) -> str:
    names = list(per_model)
    rows = ["gold_mean", "rm_mean", "response_tokens", "eos_rate", "distinct_2", "repetition_rate", "words"]
    table = "".join(f"<tr><th>{r}</th>" + "".join(f"<td>{metrics[f'{n}_{r}']:.3f}</td>" for n in names) + "</tr>"
                    for r in rows)
    extra = "".join(f"<tr><th>{k}</th><td colspan={len(names)}>{metrics[k]:.3f}</td></tr>"
                    for k in ("win_rate_gold_vs_baseline", "win_rate_rm_vs_baseline", "kl_to_baseline"))
    sample_rows = "".join(
        "<tr><td>" + html.escape(s["prompt"]) + "</td>" + "".join(
            f"<td>{html.escape(s[n]['text'])}<br><small>gold {s[n]['gold']:.2f} · RM {s[n]['rm']:.2f}</small></td>"
            for n in names) + "</tr>" for s in samples[: cfg.n_samples_in_report])
    colour = "#1e8e3e" if decision["passed"] else "#d93025"
    checks = "".join(f"<li>{'✔' if c['passed'] else '✘'} {html.escape(c['check'])}: {html.escape(c['detail'])}</li>"
                     for c in decision["checks"])
    sources = "".join(f"<li>{n}: <code>{html.escape(str(p))}</code></li>" for n, p in named.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>RLHF evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}td,th{{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}}table{{border-collapse:collapse;margin-bottom:1.5em}}</style></head><body>
<h1>RLHF evaluation</h1>
<h2 style="color:{colour}">Gate: {'PASSED' if decision['passed'] else 'FAILED'}</h2><p>{html.escape(decision['reason'])}</p>
<ul>{checks}</ul><ul>{sources}</ul>
<h2>Metrics ({metrics['n_prompts']} eval prompts, temperature {cfg.temperature}, seed {cfg.seed})</h2>
<table><tr><th></th>{''.join(f'<th>{n}</th>' for n in names)}</tr>{table}{extra}</table>
<h2>Score distributions</h2><img src="data:image/png;base64,{_plots(per_model)}" alt="score histograms">
{_curve_section(list(points), figures or {})}
<h2>Side-by-side samples</h2>
<table><tr><th>prompt</th>{''.join(f'<th>{n}</th>' for n in names)}</tr>{sample_rows}</table>
</body></html>"""
