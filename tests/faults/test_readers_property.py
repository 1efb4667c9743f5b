"""prepare's readers against arbitrary input (hypothesis): JSONL, JSON, chat messages, HH-RLHF transcripts,
Label Studio exports, gzipped or not. Whatever the bytes, prepare either writes a whole dataset or stops with
one-line :class:`~rlhf.errors.UserError`: never another exception, never anything left in or beside --out."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.config import PrepareConfig
from rlhf.data.prepare import prepare
from rlhf.errors import UserError

KEYS = ["prompt", "response", "chosen", "rejected", "messages", "role", "content", "annotator", "time", "data",
        "annotations", "result", "value", "selected", "from_name", "type", "choices", "was_cancelled",
        "completed_by", "updated_at", "id", "email", "answer1", "answer2"]

# text with what breaks readers: lone surrogates (from \ud800 escapes), control characters, BOMs, markers
TEXT = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2),
    st.sampled_from(["", " ", "\ufeff", "\x00", "<|im_end|>", "\r\n", "left", "right", "Tie", "Both bad", "user",
                     "assistant", "system", "pw", "verdict", "pairwise",
                     "\n\nHuman: hi\n\nAssistant: hello", "\n\nAssistant: x", "Human: a\n\nAssistant: b"]),
)
LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), TEXT)
JSON = st.recursive(LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=4)), inner, max_size=4)), max_leaves=12)


def _maybe(strategy):
    return st.one_of(strategy, JSON)


MESSAGES = st.lists(st.fixed_dictionaries({"role": _maybe(st.sampled_from(["system", "user", "assistant"])),
                                           "content": _maybe(TEXT)}), max_size=4)
HH = st.builds(lambda a, b, c: f"\n\nHuman: {a}\n\nAssistant: {b}{c}", TEXT, TEXT, TEXT)
RESULT = st.fixed_dictionaries({"from_name": _maybe(st.sampled_from(["pw", "verdict"])),
                                "type": _maybe(st.just("pairwise")),
                                "value": _maybe(st.fixed_dictionaries(
                                    {}, optional={"selected": _maybe(st.sampled_from(["left", "right"])),
                                                  "choices": _maybe(st.sampled_from([["Tie"], ["Both bad"]]))}))})
ANNOTATION = st.fixed_dictionaries({}, optional={
    "result": _maybe(st.lists(RESULT, max_size=3)), "was_cancelled": _maybe(st.booleans()),
    "completed_by": _maybe(st.fixed_dictionaries({}, optional={"email": _maybe(TEXT), "id": _maybe(st.integers())})),
    "updated_at": _maybe(TEXT), "id": _maybe(st.integers())})
RECORD = st.one_of(
    st.fixed_dictionaries({"prompt": _maybe(TEXT), "response": _maybe(TEXT)}),
    st.fixed_dictionaries({"prompt": _maybe(TEXT), "chosen": _maybe(TEXT), "rejected": _maybe(TEXT)},
                          optional={"annotator": _maybe(TEXT), "time": _maybe(TEXT)}),
    st.fixed_dictionaries({"prompt": _maybe(TEXT)}),
    st.fixed_dictionaries({"messages": _maybe(MESSAGES)}),
    MESSAGES,
    st.fixed_dictionaries({"chosen": _maybe(MESSAGES), "rejected": _maybe(MESSAGES)}),
    st.fixed_dictionaries({"chosen": _maybe(HH), "rejected": _maybe(HH)}),
    st.fixed_dictionaries({"data": _maybe(st.fixed_dictionaries({"prompt": _maybe(TEXT), "answer1": _maybe(TEXT),
                                                                  "answer2": _maybe(TEXT)})),
                           "annotations": _maybe(st.lists(ANNOTATION, max_size=3))}),
    JSON,
)
# lines no JSON encoder writes: raw bytes, nesting past the recursion limit, a number too long for int()
ODD_LINE = st.one_of(st.binary(max_size=24), st.sampled_from([
    b"[" * 100_000, b'{"prompt": ' + b"9" * 5000 + b"}", b'{"prompt": 1e999999}', b'{"prompt": "a"', b"\xef\xbb\xbf{}",
    b'{"prompt": "\\ud800"}', b'{"prompt": "x", "prompt": 3}', b"NaN", b'"just a string"', b"\xff\xfe{\x00}\x00"]))


@st.composite
def raw_files(draw) -> dict[str, bytes]:
    files = {}
    for i in range(draw(st.integers(1, 3))):
        suffix = draw(st.sampled_from([".jsonl", ".json", ".jsonl.gz", ".json.gz"]))
        records = draw(st.lists(RECORD, max_size=5))
        if suffix.startswith(".jsonl"):
            lines = [draw(st.one_of(st.builds(lambda r, a: json.dumps(r, ensure_ascii=a).encode("utf-8", "surrogatepass"),
                                              st.just(r), st.booleans()), ODD_LINE)) for r in records]
            body = draw(st.sampled_from([b"\n", b"\r\n"])).join(lines) + draw(st.sampled_from([b"", b"\n"]))
        else:
            body = draw(st.one_of(st.just(json.dumps(records).encode()), st.just(json.dumps(records[:1] and records[0]).encode()),
                                  ODD_LINE))
        if draw(st.booleans()):
            body = b"\xef\xbb\xbf" + body
        if suffix.endswith(".gz"):
            body = draw(st.one_of(st.just(gzip.compress(body)), st.builds(lambda n, b=body: gzip.compress(b)[:n],
                                                                            st.integers(0, 40)), st.just(body)))
        files[f"f{i}{suffix}"] = body
    return files


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(files=raw_files(), skip=st.booleans())
def test_prepare_never_raises_anything_but_a_user_error_and_leaves_nothing_partial(files, skip):
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        for name, body in files.items():
            (raw / name).write_bytes(body)
        out = Path(tmp) / "work" / "dataset"
        cfg = PrepareConfig(on_invalid="skip" if skip else "fail", max_invalid_fraction=0.5)
        try:
            metrics = prepare(raw, out, cfg)
        except UserError as e:
            assert "\n" not in e.one_line()
            assert not out.exists()
        else:
            assert (out / "manifest.json").is_file() and isinstance(metrics, dict)
        left = [p.name for p in out.parent.iterdir() if p.name != "dataset"] if out.parent.exists() else []
        assert left == [], left  # no temporary directory beside --out


BROKEN = {
    "cut.jsonl.gz": gzip.compress(b'{"prompt": "a", "response": "b"}\n' * 50)[:-12],
    "huge.jsonl": b'{"prompt": ' + b"1" * 5000 + b', "response": "b"}\n',
    "deep.json": b"[" * 100_000,
    "pairwise.json": json.dumps([{"data": {"prompt": "p", "answer1": "a", "answer2": "b"},
                                  "annotations": [{"result": [{"from_name": "pw", "value": {"selected": ["left"]}}]}]}
                                 ]).encode(),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_are_one_line_data_errors_naming_the_file(name, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / name).write_bytes(BROKEN[name])
    with pytest.raises(UserError) as err:
        prepare(raw, tmp_path / "dataset", PrepareConfig())
    assert name in err.value.one_line() and "\n" not in err.value.one_line()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


@pytest.mark.parametrize("name", ["cut.jsonl.gz", "pairwise.json"])
def test_the_prepare_command_reports_broken_files_in_one_line(name, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / name).write_bytes(BROKEN[name])
    proc = run_cli("prepare", "--raw", str(raw), "--out", str(tmp_path / "dataset"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(err) == 1 and err[0].startswith("error: ") and name in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
