"""The curves of evaluate's report: gold and reward vs KL over a PPO run, and its per-step training curves.

* the over-optimisation curve (Gao et al. 2022): one point per policy along the run -- the SFT
  baseline (KL 0), each PPO snapshot, the final policy -- with its mean gold score and reward-model
  score on the same eval prompts against its KL to the SFT policy. A reward-model score that keeps
  rising while gold turns down is the reward model being over-optimised; the KL where gold peaks is a
  sensible KL budget;
* the training curves: score, KL, gold, entropy and response length per PPO step (``ppo_steps.jsonl``
  of the PPO output, :mod:`rlhf.ppo.snapshots`).

The points are computed by :func:`rlhf.evaluate.evaluate`; this module draws and tabulates them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

CURVE_PNG = "gold_reward_vs_kl.png"
TRAINING_PNG = "training_curves.png"
CURVE_JSON = "gold_reward_vs_kl.json"
CURVE_CSV = "gold_reward_vs_kl.csv"
FIELDS = ("label", "step", "kl", "gold", "rm", "n_prompts")
TRAINING_PANELS = (("score", "reward-model score"), ("kl", "KL to SFT (nats)"), ("gold", "gold score"),
                   ("entropy", "entropy (nats/token)"), ("response_length", "response length (tokens)"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def curve_png(points: list[dict[str, Any]]) -> bytes:
    """Gold (left axis) and reward-model score (right axis) against KL to the SFT policy, points labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    rm_ax = ax.twinx()
    labelled = False
    for axis, key, colour, name in ((ax, "gold", "tab:blue", "gold score"),
                                    (rm_ax, "rm", "tab:orange", "reward-model score")):
        pts = [p for p in points if _finite(p[key]) and _finite(p["kl"])]
        if not pts:
            continue
        axis.plot([p["kl"] for p in pts], [p[key] for p in pts], "o-", color=colour, label=name)
        axis.set_ylabel(name, color=colour)
        for p in pts if not labelled else ():  # the points of one line carry the labels (SFT, steps)
            axis.annotate("SFT" if p["step"] == 0 else str(p["step"]), (p["kl"], p[key]),
                          textcoords="offset points", xytext=(4, 4), fontsize=8, color=colour)
        labelled = True
    ax.set_xlabel("KL(policy || SFT), nats per response")
    ax.set_title("gold and reward-model score vs KL along the PPO run (points: PPO step)")
    handles = [h for a in (ax, rm_ax) for h in a.get_legend_handles_labels()[0]]
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8)
    return _png(fig)


def training_png(steps: list[dict[str, Any]]) -> bytes:
    """One panel per training metric against the PPO step."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = [(k, t) for k, t in TRAINING_PANELS if any(_finite(s.get(k)) for s in steps)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1), 3), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        pts = [(s["step"], s[key]) for s in steps if _finite(s.get(key))]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "-", marker="." if len(pts) < 30 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PPO step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def write_tables(points: list[dict[str, Any]], out_dir: Path) -> None:
    """The curve as JSON and CSV (one row per point)."""
    (out_dir / CURVE_JSON).write_text(json.dumps(points, indent=1) + "\n", encoding="utf-8")
    with open(out_dir / CURVE_CSV, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(points)


def best_gold(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The point with the highest mean gold score (None without gold)."""
    pts = [p for p in points if _finite(p["gold"])]
    return max(pts, key=lambda p: p["gold"]) if pts else None


__all__ = ["curve_png", "training_png", "write_tables", "best_gold", "CURVE_PNG", "TRAINING_PNG", "CURVE_JSON",
           "CURVE_CSV"]
