"""The bundled demo task and its simulated annotator.

The task: short, friendly advice. A user asks for help with one of a fixed set
of topics ("Any advice on baking bread?"); a good answer is on topic, covers
several distinct aspects of it, is polite, does not repeat itself, stays off
other topics and has a sensible length.

Gold score (what the simulated people want), for a response ``r`` to a prompt
about topic ``t``, over the lower-cased words of ``r``::

    gold = 1.0 * min(#distinct keywords of t in r, 4)      # covers several aspects
         - 0.5 * min(#distinct keywords of other topics, 4) # stays on topic
         + 0.5 * [a polite phrase is present]               # tone (counted once)
         - 1.0 * [a rude phrase is present]
         - 3.0 * (1 - distinct word bigrams / word bigrams) # repetition
         - 0.15 * max(0, 12 - n_words) - 0.1 * max(0, n_words - 45)  # length

so the maximum is 4.5. Repeating a keyword earns nothing (keywords count once)
and costs through the bigram term, so the score is hard to hack by repetition.
The SFT demonstrations mostly cover one to three keywords (mean gold around
2), so a policy trained by RLHF has clear room to improve on them.

The simulated annotator labels a pair (a, b) with a Bradley-Terry draw:
``P(a preferred) = sigmoid((gold(a) - gold(b)) / T)`` with a per-annotator
temperature T (0.4-0.8), and records an annotator id and a timestamp like a
real label. Everything is generated from fixed seeds: the same bytes every
time, so ``data.dvc`` stays valid when the data is regenerated.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

TOPICS: dict[str, list[str]] = {
    "cooking": ["salt", "heat", "knife", "taste", "recipe", "onion"],
    "gardening": ["soil", "water", "seeds", "sunlight", "compost", "weeds"],
    "running": ["shoes", "pace", "stretch", "breathing", "distance", "rest"],
    "sleep": ["bedtime", "darkness", "caffeine", "pillow", "routine", "screens"],
    "saving money": ["budget", "savings", "receipts", "discounts", "debt", "goals"],
    "learning python": ["functions", "loops", "errors", "variables", "tests", "projects"],
    "public speaking": ["audience", "practice", "slides", "voice", "pauses", "notes"],
    "photography": ["light", "lens", "focus", "framing", "shutter", "angles"],
    "chess": ["openings", "tactics", "endgames", "pawns", "clock", "puzzles"],
    "baking bread": ["flour", "yeast", "dough", "oven", "crust", "kneading"],
    "cycling": ["helmet", "tires", "gears", "brakes", "saddle", "route"],
    "painting": ["brushes", "colors", "canvas", "sketch", "layers", "palette"],
    "camping": ["tent", "map", "fire", "backpack", "weather", "flashlight"],
    "writing": ["outline", "drafts", "editing", "characters", "readers", "deadlines"],
    "yoga": ["posture", "balance", "mat", "flexibility", "breath", "poses"],
    "studying": ["schedule", "breaks", "flashcards", "memory", "questions", "summaries"],
}

PROMPT_TEMPLATES = [
    "How do I get better at {t}?",
    "Any advice on {t}?",
    "Give me a quick tip about {t}.",
    "What should a beginner know about {t}?",
    "I want to learn {t}. Where do I start?",
    "Can you help me with {t}?",
]
PROMPT_CONTEXTS = ["", "I am new to this. ", "I only have a little time. ", "My friend asked me. ",
                   "I tried before and gave up. ", "Please keep it simple. "]

# content sentence frames: each carries exactly one keyword
FRAMES = [
    "Start with the {k}.",
    "Pay attention to the {k} every time.",
    "A good {k} makes a big difference.",
    "Keep the {k} in mind as you go.",
    "Check the {k} before you begin.",
    "Think about the {k} early.",
    "Do not forget the {k}.",
    "Spend a few minutes on the {k}.",
]
POLITE_OPENERS = ["Happy to help!", "Glad you asked.", "Great question."]
NEUTRAL_OPENERS = ["Sure.", "Here is what I know.", "Okay."]
RUDE_OPENERS = ["Obviously.", "Whatever, fine.", "Just google it."]
POLITE_CLOSERS = ["Hope this helps.", "Good luck!", "You can do it."]
NEUTRAL_CLOSERS = ["That is all.", "That is it."]
FILLER = ["It takes time.", "Everyone learns at their own speed.", "Small steps add up.",
          "Try it a few times."]

POLITE_MARKERS = ["happy to help", "glad you asked", "great question", "hope this helps", "good luck",
                  "you can do it"]
RUDE_MARKERS = ["obviously", "whatever", "just google it"]

ANNOTATORS = {"sim-01": 0.4, "sim-02": 0.5, "sim-03": 0.6, "sim-04": 0.7, "sim-05": 0.8}
LABEL_EPOCH = datetime(2026, 1, 5, 9, 0, 0, tzinfo=timezone.utc)

_WORD = re.compile(r"[a-z]+")
_KEYWORD_TOPIC = {k: t for t, ks in TOPICS.items() for k in ks}


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def topic_of(prompt: str) -> str | None:
    """The demo topic a prompt asks about (the longest topic name found in it), or None."""
    p = prompt.lower()
    found = [t for t in TOPICS if t in p]
    return max(found, key=len) if found else None


@dataclass(frozen=True)
class GoldBreakdown:
    coverage: int
    off_topic: int
    polite: bool
    rude: bool
    repetition: float
    n_words: int
    score: float


def gold_breakdown(prompt: str, response: str) -> GoldBreakdown:
    topic = topic_of(prompt)
    ws = words(response)
    wset = set(ws)
    on = set(TOPICS[topic]) if topic else set()
    coverage = len(wset & on)
    off = sum(1 for w in wset if w in _KEYWORD_TOPIC and w not in on)
    low = " ".join(ws)
    polite = any(m in low for m in POLITE_MARKERS)
    rude = any(m in low for m in RUDE_MARKERS)
    bigrams = list(zip(ws, ws[1:]))
    repetition = 1.0 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0
    n = len(ws)
    length_pen = 0.15 * max(0, 12 - n) + 0.1 * max(0, n - 45)
    score = (
        1.0 * min(coverage, 4)
        - 0.5 * min(off, 4)
        + 0.5 * polite
        - 1.0 * rude
        - 3.0 * repetition
        - length_pen
    )
    return GoldBreakdown(coverage, off, polite, rude, repetition, n, round(score, 6))


def gold_score(prompt: str, response: str) -> float:
    """The simulated people's score of ``response`` to ``prompt`` (max 4.5); see module docstring."""
    return gold_breakdown(prompt, response).score


def bt_prob(gold_a: float, gold_b: float, temperature: float) -> float:
    """Bradley-Terry probability that a is preferred over b."""
    return 1.0 / (1.0 + math.exp(-(gold_a - gold_b) / temperature))


def all_prompts() -> list[str]:
    return [c + tpl.format(t=t) for t in TOPICS for tpl in PROMPT_TEMPLATES for c in PROMPT_CONTEXTS]


def make_response(rng: random.Random, topic: str, quality: str) -> str:
    """A response of a given quality profile: 'demo' (SFT demonstrations) or 'wide' (pairs)."""
    kws = TOPICS[topic]
    if quality == "demo":
        k = rng.choices([1, 2, 3, 4], weights=[30, 45, 20, 5])[0]
        tone = rng.choices(["polite", "neutral"], weights=[50, 50])[0]
        n_off, repeat, filler = 0, 0, rng.randint(0, 2)
    else:
        k = rng.choices([0, 1, 2, 3, 4, 5], weights=[10, 20, 25, 20, 15, 10])[0]
        tone = rng.choices(["polite", "neutral", "rude"], weights=[40, 40, 20])[0]
        n_off = rng.choices([0, 1, 2], weights=[70, 20, 10])[0]
        repeat = rng.choices([0, 1, 3], weights=[75, 15, 10])[0]
        filler = rng.choices([0, 1, 2, 5], weights=[35, 35, 20, 10])[0]
    chosen_kws = rng.sample(kws, min(k, len(kws)))
    sentences = [rng.choice(FRAMES).format(k=kw) for kw in chosen_kws]
    others = [t for t in TOPICS if t != topic]
    for _ in range(n_off):
        sentences.insert(rng.randint(0, len(sentences)), rng.choice(FRAMES).format(k=rng.choice(TOPICS[rng.choice(others)])))
    for _ in range(filler):
        sentences.insert(rng.randint(0, len(sentences)), rng.choice(FILLER))
    if repeat and sentences:
        s = rng.choice(sentences)
        sentences.extend([s] * repeat)
    opener = {"polite": POLITE_OPENERS, "neutral": NEUTRAL_OPENERS, "rude": RUDE_OPENERS}[tone]
    parts = [rng.choice(opener), *sentences]
    if tone == "polite" and rng.random() < 0.6:
        parts.append(rng.choice(POLITE_CLOSERS))
    elif tone == "neutral" and rng.random() < 0.3:
        parts.append(rng.choice(NEUTRAL_CLOSERS))
    return " ".join(parts)


def label_pair(rng: random.Random, prompt: str, a: str, b: str, index: int) -> dict:
    """One simulated human label: a Bradley-Terry draw from one annotator, with an id and a time."""
    annotator = list(ANNOTATORS)[index % len(ANNOTATORS)]
    p_a = bt_prob(gold_score(prompt, a), gold_score(prompt, b), ANNOTATORS[annotator])
    chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
    ts = LABEL_EPOCH + timedelta(seconds=37 * index)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "annotator": annotator,
        "time": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def fresh_pairs(n: int, seed: int, prompts: list[str] | None = None) -> list[dict]:
    """Pairs labelled noiselessly by the gold score (ties skipped), for agreement checks."""
    rng = random.Random(seed)
    prompts = prompts or all_prompts()
    out = []
    while len(out) < n:
        p = rng.choice(prompts)
        t = topic_of(p)
        if t is None:
            continue
        a, b = make_response(rng, t, "wide"), make_response(rng, t, "wide")
        ga, gb = gold_score(p, a), gold_score(p, b)
        if ga == gb:
            continue
        out.append({"prompt": p, "chosen": a if ga > gb else b, "rejected": b if ga > gb else a})
    return out


@dataclass
class DemoSizes:
    sft: int = 1200
    preferences: int = 2400


def generate(out_dir: str | Path, seed: int = 0, sizes: DemoSizes | None = None) -> dict[str, int]:
    """Write the demo data set (sft.jsonl, preferences.jsonl, prompts.jsonl) to ``out_dir``."""
    sizes = sizes or DemoSizes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    prompts = all_prompts()

    sft = []
    for _ in range(sizes.sft):
        p = rng.choice(prompts)
        sft.append({"prompt": p, "response": make_response(rng, topic_of(p), "demo")})
    prefs = []
    i = 0
    while len(prefs) < sizes.preferences:
        p = rng.choice(prompts)
        t = topic_of(p)
        a, b = make_response(rng, t, "wide"), make_response(rng, t, "wide")
        if a == b:
            continue
        prefs.append(label_pair(rng, p, a, b, i))
        i += 1
    rows = {"sft": sft, "preferences": prefs, "prompts": [{"prompt": p} for p in prompts]}
    for name, items in rows.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for r in items:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    # The text is part of the data version (data.dvc's md5): it keeps the module's old path on purpose.
    (out / "README.md").write_text(
        "# Demo data (generated by `rlhf demo-data`)\n\n"
        "Advice on everyday topics. `sft.jsonl`: demonstrations; `preferences.jsonl`: pairs labelled by\n"
        "the simulated annotator (Bradley-Terry on the gold score, see `rlhf/demo.py`); `prompts.jsonl`:\n"
        "prompts for PPO and evaluation. Regenerating gives the same bytes.\n",
        encoding="utf-8",
    )
    return {k: len(v) for k, v in rows.items()}
