"""The prepare stage: formats, splitting, dedup, and bad input handled as a user would see it."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import run_cli

from rlhf.config import PrepareConfig
from rlhf.data.prepare import is_eval, load_split, prepare
from rlhf.errors import DataError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_demo_dataset_splits_and_manifest(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["kind"] == "dataset"
    assert set(manifest["files"]) == {"sft.jsonl", "preferences.jsonl", "prompts.jsonl"}
    assert manifest["config"]["eval_fraction"] == 0.12
    counts = manifest["counts"]
    assert counts["preferences"]["train"] + counts["preferences"]["eval"] == 2400
    assert counts["prompts"]["eval"] > 0 and counts["sft"]["eval"] > 0
    for kind in ("sft", "preferences", "prompts"):
        train = set(pd.read_parquet(dataset / kind / "train.parquet")["prompt"])
        ev = set(pd.read_parquet(dataset / kind / "eval.parquet")["prompt"])
        assert not train & ev
    # the split is by prompt across kinds: an eval prompt is eval everywhere
    sft_eval = set(pd.read_parquet(dataset / "sft" / "eval.parquet")["prompt"])
    pref_train = set(pd.read_parquet(dataset / "preferences" / "train.parquet")["prompt"])
    assert not sft_eval & pref_train


def test_prepare_is_deterministic(demo_raw, tmp_path):
    prepare(demo_raw, tmp_path / "a")
    prepare(demo_raw, tmp_path / "b")
    for f in ("sft/train.parquet", "preferences/eval.parquet", "manifest.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_duplicates_removed_and_counted(tmp_path):
    rows = [{"prompt": "Any advice on chess?", "response": "Study the openings."}] * 3
    rows.append({"prompt": "Any advice on yoga?", "response": "Mind your posture."})
    m = prepare(_jsonl(tmp_path / "sft.jsonl", rows), tmp_path / "out")
    assert m["sft_duplicates_removed"] == 2
    assert m["sft_train_rows"] + m["sft_eval_rows"] == 2


def test_chat_messages_and_hh_transcripts(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _jsonl(raw / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tip for sleep?"},
        {"role": "assistant", "content": "Keep a routine."}]}])
    (raw / "conversations.json").write_text(json.dumps([[
        {"role": "user", "content": "Tip for running?"},
        {"role": "assistant", "content": "Buy good shoes."}]]), encoding="utf-8")
    _jsonl(raw / "hh.jsonl", [
        {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
         "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: Apple.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: Rock."},
    ])
    _jsonl(raw / "pairs.jsonl", [{"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                                  "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B."}]}])
    out = tmp_path / "out"
    prepare(raw, out, PrepareConfig(eval_fraction=0.01))
    sft = pd.concat(pd.read_parquet(out / "sft" / f"{s}.parquet") for s in ("train", "eval"))
    prefs = pd.concat(pd.read_parquet(out / "preferences" / f"{s}.parquet") for s in ("train", "eval"))
    by_resp = dict(zip(sft["response"], sft["prompt"]))
    assert by_resp["Buy good shoes."] == "Tip for running?"
    assert by_resp["Keep a routine."] == "System: Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tip for sleep?"
    pairs = {r.chosen: (r.prompt, r.rejected) for r in prefs.itertuples()}
    assert pairs["4."] == ("What is 2+2?", "5.")
    assert pairs["Apple."] == ("Human: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.", "Rock.")
    assert pairs["A."] == ("Q?", "B.")
    # no explicit prompt file: prompts are derived from the other kinds
    prompts = pd.concat(pd.read_parquet(out / "prompts" / f"{s}.parquet") for s in ("train", "eval"))
    assert "What is 2+2?" in set(prompts["prompt"])


def test_bom_and_crlf_are_accepted(tmp_path):
    body = '{"prompt": "Any advice on chess?", "response": "Study openings."}\r\n' \
           '{"prompt": "Any advice on yoga?", "response": "Breathe."}\r\n'
    f = tmp_path / "sft.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + body.encode())
    m = prepare(f, tmp_path / "out")
    assert m["sft_train_rows"] + m["sft_eval_rows"] == 2
    df = pd.concat(pd.read_parquet(tmp_path / "out" / "sft" / f"{s}.parquet") for s in ("train", "eval"))
    assert set(df["prompt"]) == {"Any advice on chess?", "Any advice on yoga?"}
    assert not any("\r" in r for r in df["response"])


GOOD = '{"prompt": "Any advice on chess?", "response": "Study openings."}\n'

BAD_INPUTS = {
    # name: (file name, bytes, text the one-line error must contain)
    "empty file": ("sft.jsonl", b"", "file is empty"),
    "truncated last line": ("sft.jsonl", (GOOD + '{"prompt": "Any advice on yoga?", "resp').encode(),
                            "sft.jsonl:2: truncated JSON"),
    "not json": ("sft.jsonl", (GOOD + "this is not json\n").encode(), "sft.jsonl:2: not valid JSON"),
    "number instead of text": ("sft.jsonl", (GOOD + '{"prompt": 42, "response": "x"}\n').encode(),
                               "sft.jsonl:2: field 'prompt' must be text, got number"),
    "list instead of string": ("prefs.jsonl", b'{"prompt": "p", "chosen": ["a"], "rejected": "b"}\n',
                               "prefs.jsonl:1: field 'chosen' must be text, got list"),
    "missing field": ("prefs.jsonl", b'{"prompt": "p", "chosen": "a", "rejected": null}\n',
                      "prefs.jsonl:1: field 'rejected' must be text, got null"),
    "invalid utf-8": ("sft.jsonl", GOOD.encode() + b'{"prompt": "caf\xe9", "response": "x"}\n',
                      "sft.jsonl:2: not valid UTF-8"),
    "50 MB line": ("sft.jsonl", b'{"prompt": "' + b"a" * (50 << 20) + b'", "response": "x"}\n',
                   "sft.jsonl:1: line is longer than 1,048,576 bytes"),
    "unknown record format": ("sft.jsonl", b'{"question": "q", "answer": "a"}\n',
                              "sft.jsonl:1: unknown record format with fields ['answer', 'question']"),
    "unknown file format": ("data.csv", b"prompt,response\nq,a\n", "unknown file format '.csv'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_line_error_and_no_output(case, tmp_path):
    name, content, expected = BAD_INPUTS[case]
    f = tmp_path / name
    f.write_bytes(content)
    out = tmp_path / "dataset"
    proc = run_cli("prepare", "--raw", str(f), "--out", str(out), cwd=tmp_path)  # no params.yaml: the defaults
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not any(p.name.startswith(".dataset") for p in tmp_path.iterdir())


def test_failed_prepare_keeps_previous_output(tmp_path):
    out = tmp_path / "dataset"
    prepare(_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "response": "b"}]), out)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(DataError):
        prepare(tmp_path / "missing.jsonl", out)
    assert (out / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("kind", ["missing path", "empty directory"])
def test_bad_paths(kind, tmp_path):
    target = tmp_path / "nope"
    if kind == "empty directory":
        target.mkdir()
        (target / "README.md").write_text("no data here")
    proc = run_cli("prepare", "--raw", str(target), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("does not exist" if kind == "missing path" else "no .jsonl or .json files") in proc.stderr


def test_split_is_stable_hash():
    assert is_eval("Any advice on chess?", 0.5, "s") == is_eval("Any advice on chess?", 0.5, "s")
    share = sum(is_eval(f"prompt {i}", 0.2, "s") for i in range(5000)) / 5000
    assert 0.17 < share < 0.23


def test_bad_params_one_line(tmp_path, demo_raw):
    p = tmp_path / "params.yaml"
    p.write_text("prepare:\n  eval_fraction: 1.5\n")
    proc = run_cli("prepare", "--raw", str(demo_raw), "--out", str(tmp_path / "o"), "--params", str(p))
    assert proc.returncode == 2 and "prepare.eval_fraction" in proc.stderr and "Traceback" not in proc.stderr
    p.write_text("prepare:\n  eval_fractoin: 0.1\n")
    proc = run_cli("prepare", "--raw", str(demo_raw), "--out", str(tmp_path / "o"), "--params", str(p))
    assert proc.returncode == 2 and "unknown key 'prepare.eval_fractoin'" in proc.stderr
    # a params file that does not exist is an error, not a silent run on the built-in defaults
    proc = run_cli("prepare", "--raw", str(demo_raw), "--out", str(tmp_path / "o"), "--params",
                   str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "params file not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, needle", [
    (["reward", "--set", "reward.max_steps=3"], "No such option: --set"),
    (["prepare", "--eval-fraction", "0.2"], "No such option: --eval-fraction"),
    (["no-such-command"], "No such command"),
    (["run", "--threads", "many"], "Invalid value for '--threads'"),
])
def test_command_line_mistakes_are_a_usage_line_not_a_traceback(tmp_path, args, needle):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "--help' for help" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_gzipped_jsonl_is_read_transparently(tmp_path):
    import gzip

    rows = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(20)]
    with gzip.open(tmp_path / "sft.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    m = prepare(tmp_path / "sft.jsonl.gz", tmp_path / "out")
    assert m["sft_train_rows"] + m["sft_eval_rows"] == 20


def test_skip_drops_and_counts_bad_records_up_to_the_limit(tmp_path):
    good = [json.dumps({"prompt": f"q{i}?", "response": f"a{i}."}) for i in range(300)]
    lines = good[:100] + ["{not json"] + good[100:200] + ['{"prompt": 3, "response": "x"}'] + good[200:]
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="not valid JSON"):
        prepare(f, tmp_path / "fail")  # the default: the first bad record stops prepare
    m = prepare(f, tmp_path / "skip", PrepareConfig(on_invalid="skip"))
    assert m["invalid_records_skipped"] == 2 and m["sft_train_rows"] + m["sft_eval_rows"] == 300
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert manifest["invalid_records"]["first"][0].startswith(f"{f}:101")
    with pytest.raises(DataError, match="2 malformed records .* over prepare.max_invalid_fraction"):
        prepare(f, tmp_path / "strict", PrepareConfig(on_invalid="skip", max_invalid_fraction=0.001))
    assert not (tmp_path / "strict").exists()


def test_preference_only_data_trains_sft_on_the_chosen_replies(tmp_path):
    rows = [{"prompt": f"q{i}?", "chosen": f"good {i}.", "rejected": f"bad {i}."} for i in range(50)]
    m = prepare(_jsonl(tmp_path / "prefs.jsonl", rows), tmp_path / "out")
    assert m["sft_train_rows"] + m["sft_eval_rows"] == 50
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "chosen replies" in manifest["sft_source"]
    sft = pd.concat([load_split(tmp_path / "out", "sft", s) for s in ("train", "eval")])
    assert set(sft["response"]) == {r["chosen"] for r in rows}


def test_deep_nesting_and_lone_surrogates_are_one_line_errors(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(DataError, match="nested too deeply|must be text"):
        prepare(deep, tmp_path / "o1")
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"prompt": "hi \\ud800 there", "response": "ok"}\n')
    with pytest.raises(DataError, match="lone surrogate"):
        prepare(lone, tmp_path / "o2")
