"""Helpers of the feedback tests: small labelling batches of demo responses (no model needed)."""

from __future__ import annotations

import random
from pathlib import Path

from rlhf.data import demo
from rlhf.feedback.batch import write_batch

XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> & "quotes"'


def make_batch(root: Path, n: int, *, seed: int = 0, xss_item: int | None = None):
    rng = random.Random(seed)
    prompts = demo.all_prompts()
    items = []
    for i in range(n):
        p = rng.choice(prompts)
        t = demo.topic_of(p)
        a, b = demo.make_response(rng, t, "wide"), demo.make_response(rng, t, "wide")
        if i == xss_item:
            a = XSS
        items.append({"item_id": f"{i:04d}", "prompt": p, "response_a": a, "response_b": b,
                      "source_a": {"version": 1, "seed": seed}, "source_b": {"version": 1, "seed": seed + 1}})
    return write_batch(items, root, {"model_name": "test", "versions": {"a": 1, "b": 1},
                                     "mode": "champion-two-samples", "generation": {"seed": seed}})
