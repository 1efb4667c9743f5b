"""The demo data and the simulated annotator."""

from __future__ import annotations

import hashlib
import json
import statistics

from rlhf.data import demo


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_generation_is_byte_identical(tmp_path):
    demo.generate(tmp_path / "a")
    demo.generate(tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_sizes_and_label_metadata(demo_raw):
    prefs = [json.loads(line) for line in (demo_raw / "preferences.jsonl").read_text().splitlines()]
    sft = (demo_raw / "sft.jsonl").read_text().splitlines()
    assert len(prefs) == 2400 and len(sft) == 1200
    assert {p["annotator"] for p in prefs} == set(demo.ANNOTATORS)
    assert all(p["time"].endswith("Z") and p["chosen"] != p["rejected"] for p in prefs)
    total = sum(f.stat().st_size for f in demo_raw.iterdir())
    assert total < 5_000_000


def test_gold_rewards_coverage_and_tone():
    p = "Any advice on baking bread?"
    one = "Sure. Start with the flour."
    four = "Happy to help! Start with the flour. Check the yeast before you begin. A good dough makes a big " \
           "difference. Keep the oven in mind as you go. Hope this helps."
    assert demo.gold_score(p, four) > demo.gold_score(p, one) + 2.5
    assert demo.gold_score(p, four) == 4.5  # the maximum: 4 keywords, polite, no repetition, sane length


def test_gold_is_not_hackable_by_repetition():
    p = "Any advice on cooking?"
    honest = "Happy to help! Taste the salt. Watch the heat. Keep your knife sharp. Read the recipe first."
    spam = "Happy to help! " + " ".join(["salt heat knife recipe"] * 12)
    assert demo.gold_score(p, spam) < demo.gold_score(p, honest) - 2
    kw_spam = "Happy to help! Taste the salt. Taste the salt. Taste the salt. Taste the salt."
    assert demo.gold_score(p, kw_spam) < demo.gold_score(p, "Happy to help! Taste the salt. That is all, friend.")


def test_gold_penalises_off_topic_and_rude():
    p = "How do I get better at chess?"
    on = "Great question. Study the openings. Solve puzzles daily. Watch the clock during games."
    assert demo.gold_score(p, on) > demo.gold_score(p, on + " Also buy a tent and a helmet.")
    assert demo.gold_score(p, on) > demo.gold_score(p, on.replace("Great question.", "Obviously."))


def test_sft_demonstrations_leave_room_for_rlhf(demo_raw):
    rows = [json.loads(line) for line in (demo_raw / "sft.jsonl").read_text().splitlines()]
    scores = [demo.gold_score(r["prompt"], r["response"]) for r in rows]
    assert 1.0 < statistics.mean(scores) < 3.0  # well below the 4.5 maximum


def test_annotator_is_noisy_but_informative(demo_raw):
    prefs = [json.loads(line) for line in (demo_raw / "preferences.jsonl").read_text().splitlines()]
    agree = statistics.mean(
        demo.gold_score(r["prompt"], r["chosen"]) >= demo.gold_score(r["prompt"], r["rejected"]) for r in prefs)
    assert 0.75 < agree < 0.97  # Bradley-Terry noise: mostly right, sometimes wrong


def test_fresh_pairs_are_gold_ordered():
    pairs = demo.fresh_pairs(50, seed=123)
    assert all(demo.gold_score(r["prompt"], r["chosen"]) > demo.gold_score(r["prompt"], r["rejected"])
               for r in pairs)
