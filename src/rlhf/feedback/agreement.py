"""Numbers about labels: agreement between annotators (percent, Cohen's kappa), a binomial interval."""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from typing import Any


def agreement(labels: list[dict[str, Any]]) -> dict[str, Any]:
    """Percent agreement and Cohen's kappa over every pair of annotators on the same item.

    The category is the answer in batch terms: winner ``a`` / ``b``, or the choice (tie, both bad);
    skips are left out. Kappa pools all annotator pairs (expected agreement from the pooled marginals).
    """
    by_item: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in labels:
        if r["choice"] == "skip":
            continue
        by_item[(r["batch_id"], r["item_id"])].append(r["winner"] or r["choice"])
    pairs = [(x, y) for cats in by_item.values() if len(cats) > 1 for x, y in itertools.combinations(cats, 2)]
    n_items = sum(1 for cats in by_item.values() if len(cats) > 1)
    if not pairs:
        return {"n_items": 0, "n_pairs": 0, "percent": None, "kappa": None}
    observed = sum(x == y for x, y in pairs) / len(pairs)
    marg = Counter(c for p in pairs for c in p)
    total = sum(marg.values())
    expected = sum((v / total) ** 2 for v in marg.values())
    kappa = 1.0 if expected == 1 else (observed - expected) / (1 - expected)
    return {"n_items": n_items, "n_pairs": len(pairs), "percent": observed, "kappa": kappa}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


__all__ = ["agreement", "wilson"]
