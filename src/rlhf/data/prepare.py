"""The prepare stage: raw human data in several formats -> clean Parquet splits.

Accepted input (a file, or a directory whose ``*.jsonl`` / ``*.json`` files, gzipped or not
(``.jsonl.gz``, ``.json.gz``), are all read; other files such as README.md are ignored):

* our JSONL, one record per line, the kind told by its fields:
  ``sft``: ``prompt`` + ``response``; ``preferences``: ``prompt`` + ``chosen`` +
  ``rejected`` (optional ``annotator``, ``time``); ``prompts``: ``prompt``. A ``prompt`` is a
  text (one user turn) or a list of ``{"role", "content"}`` messages ending with a user turn;
* chat messages: ``{"messages": [{"role", "content"}, ...]}`` (JSONL, or a
  ``.json`` file holding a list of such records or of bare message lists); the
  final assistant turn is the response, the turns before it the prompt's conversation;
  ``{"chosen": [messages], "rejected": [messages]}`` is a preference pair;
* Anthropic HH-RLHF transcripts: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}``: split on the ``Human:`` / ``Assistant:`` markers into turns; the turns before
  the final assistant reply (which chosen and rejected must share) are the conversation, the two
  final replies the pair;
* a Label Studio JSON export of a pairwise project pushed by ``rlhf feedback push`` (a list of
  tasks with ``data`` and ``annotations``): each a/b annotation is a preference pair with its
  annotator; ties, both-bad and skips give no pair (see :mod:`rlhf.data.labelstudio`).

UTF-8 with or without BOM, LF or CRLF line endings. Anything else gets a
:class:`~rlhf.errors.DataError` naming the file, the line and the field; with
``prepare.on_invalid: skip`` malformed records are dropped and counted instead (the first few are
named in the manifest), up to ``max_invalid_fraction`` of them.

Preference pairs without any demonstrations: SFT trains on the chosen replies (said in the
manifest's ``sft_source``).

A conversation keeps its turns (:mod:`rlhf.data.conversation`): system turns first, then user and
assistant turns alternating, the last one a user turn; one that breaks the rule is a malformed
record (an error naming file and line, or skipped with ``on_invalid: skip``).

Output: ``<out>/<kind>/{train,eval}.parquet`` + ``manifest.json``. Every kind has ``prompt_messages``
(the conversation before the reply, ``list<struct<role, content>>``; one user turn for a text
prompt), which the training stages encode, and ``prompt``, its readable rendering (the text itself
for one user turn, else a ``Human: ... / Assistant: ...`` transcript). The split is a hash of
``prompt`` (so a prompt is never on both sides, in any kind), and exact duplicate records are
removed and counted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from rlhf.config import PrepareConfig
from rlhf.data import conversation, labelstudio
from rlhf.errors import DataError
from rlhf.io import atomic_dir, sha256_file, write_manifest

KINDS = ("sft", "preferences", "prompts")
COLUMNS = {
    "sft": ["prompt", "prompt_messages", "response", "source"],
    "preferences": ["prompt", "prompt_messages", "chosen", "rejected", "annotator", "time", "source"],
    "prompts": ["prompt", "prompt_messages", "source"],
}
#: ``prompt_messages``: the conversation before the reply (:mod:`rlhf.data.conversation`); every other
#: column is text
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
MAX_JSON_FILE_BYTES = 256 << 20


@dataclass
class Record:
    kind: str
    values: dict[str, Any]
    source: str


@dataclass
class PrepareResult:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- reading


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", list: "list", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)


def _text(rec: dict, key: str, where: str, *, required: bool = True) -> str | None:
    if key not in rec or (rec[key] is None and not required):
        if required:
            raise DataError(f"missing required field '{key}'", where=where,
                            hint=f"record has fields {sorted(rec)}")
        return None
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"field '{key}' must be text, got {_type_name(v)}", where=where)
    return v


def _suffix(path: Path) -> str:
    """``.jsonl`` / ``.json`` / ``.jsonl.gz`` / ``.json.gz`` (lower-case), or the plain suffix."""
    name = path.name.lower()
    return next((s for s in (".jsonl.gz", ".json.gz") if name.endswith(s)), path.suffix.lower())


def _open(path: Path):
    import gzip

    return gzip.open(path, "rb") if _suffix(path).endswith(".gz") else open(path, "rb")


def _gzip_error(e: Exception, where: str) -> DataError:
    """A gzip file that is cut off or not gzip at all (``gzip``'s EOFError / BadGzipFile / zlib.error)."""
    what = "truncated gzip file (it ends before the end of the compressed stream)" if isinstance(e, EOFError) \
        else f"not a readable gzip file ({e})"
    return DataError(what, where=where, hint="re-download or re-compress it, or remove the .gz suffix if it is "
                                             "plain text")


def _gzip_failures() -> tuple[type[Exception], ...]:
    import gzip
    import zlib

    return EOFError, gzip.BadGzipFile, zlib.error


def _iter_jsonl(path: Path, max_line_bytes: int, invalid: list[str] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) per non-blank line. A bad line raises, or with ``invalid`` (a list)
    is recorded there as its one-line error and skipped."""
    with _open(path) as f:
        line_no = 0
        while True:
            try:
                raw = f.readline(max_line_bytes + 1)
            except _gzip_failures() as e:
                raise _gzip_error(e, f"{path}:{line_no + 1}") from None
            if not raw:
                break
            line_no += 1
            where = f"{path}:{line_no}"
            try:
                record = _parse_line(raw, line_no, where, max_line_bytes)
            except DataError as e:
                if invalid is None:
                    raise
                invalid.append(e.one_line())
                while len(raw) > max_line_bytes and not raw.endswith(b"\n"):  # the rest of an over-long line
                    try:
                        raw = f.readline(max_line_bytes + 1)
                    except _gzip_failures() as e:
                        raise _gzip_error(e, f"{path}:{line_no}") from None
                continue
            if record is not _BLANK:
                yield line_no, record


_BLANK = object()


def _parse_line(raw: bytes, line_no: int, where: str, max_line_bytes: int) -> Any:
    if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
        raise DataError(
            f"line is longer than {max_line_bytes:,} bytes", where=where,
            hint="split the record or raise prepare.max_line_bytes in params.yaml",
        )
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                        where=where, hint="re-save the file as UTF-8") from None
    text = text.rstrip("\r\n")
    if not text.strip():
        return _BLANK
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError("JSON nested too deeply", where=where) from None
    except json.JSONDecodeError as e:
        # a last line without a newline that does not parse: the file was cut off mid-record
        truncated = not raw.endswith(b"\n")
        what = "truncated JSON record (the file ends mid-record)" if truncated else \
            f"not valid JSON: {e.msg} (column {e.colno})"
        raise DataError(what, where=where) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits (int's string conversion limit)
        raise DataError(f"not valid JSON: {str(e).split(';')[0]}", where=where) from None


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    size = path.stat().st_size
    if size > MAX_JSON_FILE_BYTES:
        raise DataError(f"JSON file is {size:,} bytes, over the {MAX_JSON_FILE_BYTES:,} limit",
                        where=str(path), hint="convert it to JSONL (one record per line)")
    with _open(path) as f:
        try:
            raw = f.read(MAX_JSON_FILE_BYTES + 1)
        except _gzip_failures() as e:
            raise _gzip_error(e, str(path)) from None
    if len(raw) > MAX_JSON_FILE_BYTES:
        raise DataError(f"JSON file is over the {MAX_JSON_FILE_BYTES:,} byte limit", where=str(path),
                        hint="convert it to JSONL (one record per line)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x})", where=f"{path}:{line}") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise DataError("JSON nested too deeply", where=str(path)) from None
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg} (column {e.colno})", where=f"{path}:{e.lineno}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits (int's string conversion limit)
        raise DataError(f"not valid JSON: {str(e).split(';')[0]}", where=str(path)) from None
    if not isinstance(data, list):
        data = [data]
    yield from enumerate(data, start=1)


def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m for m in v) and len(v) > 0


def _split_messages(msgs: Any, where: str, fld: str) -> tuple[list[dict], str]:
    """A message list ending with an assistant turn -> (the turns before it, its content)."""
    turns = _messages(msgs, where, fld)
    if turns[-1]["role"] != "assistant" or len(turns) < 2:
        raise DataError(f"'{fld}' must end with an assistant turn after at least one user turn", where=where)
    return turns[:-1], turns[-1]["content"]


def _messages(msgs: Any, where: str, fld: str) -> list[dict]:
    if not _is_messages(msgs):
        raise DataError(f"field '{fld}' must be a list of {{role, content}} messages, got {_type_name(msgs)}",
                        where=where)
    turns = []
    for i, m in enumerate(msgs):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in conversation.ROLES:
            raise DataError(f"{fld}[{i}].role must be system, user or assistant, got {role!r}", where=where)
        if not isinstance(content, str):
            raise DataError(f"{fld}[{i}].content must be text, got {_type_name(content)}", where=where)
        turns.append({"role": role, "content": content})
    return turns


def _split_hh(transcript: str, where: str, fld: str) -> tuple[list[dict], str]:
    """An HH-RLHF transcript -> (the turns before the final assistant reply, the reply)."""
    t = transcript.replace("\r\n", "\n")
    marker = "\n\nAssistant:"
    idx = t.rfind(marker)
    if idx < 0 or "Human:" not in t[:idx]:
        raise DataError(f"field '{fld}' is not an HH-RLHF transcript ('\\n\\nHuman:' ... '\\n\\nAssistant:')",
                        where=where)
    history, reply = t[:idx], t[idx + len(marker):].strip()
    turns: list[dict] = []
    for chunk in history.split("\n\n"):
        if chunk.startswith("Human:"):
            turns.append({"role": "user", "content": chunk[len("Human:"):].strip()})
        elif chunk.startswith("Assistant:"):
            turns.append({"role": "assistant", "content": chunk[len("Assistant:"):].strip()})
        elif turns:  # a paragraph break inside a turn
            turns[-1]["content"] += "\n\n" + chunk
    return turns, reply


def _prompt(rec: dict, where: str) -> str | list[dict]:
    """Our formats' ``prompt``: a text (one user turn) or a list of messages ending with a user turn."""
    if _is_messages(rec.get("prompt")):
        return _messages(rec["prompt"], where, "prompt")
    return _text(rec, "prompt", where)


def parse_record(rec: Any, where: str) -> Record:
    """One raw record -> a normalised :class:`Record` of kind sft / preferences / prompts.

    Its ``prompt`` is a text or (from chat messages, HH-RLHF transcripts, or a message-list
    ``prompt``) the list of turns before the reply; :func:`read_file` turns it into the
    ``prompt_messages`` + ``prompt`` columns.
    """
    if _is_messages(rec):
        rec = {"messages": rec}
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object, got {_type_name(rec)}", where=where)
    if "messages" in rec:
        prompt, response = _split_messages(rec["messages"], where, "messages")
        return Record("sft", {"prompt": prompt, "response": response}, where)
    if "chosen" in rec and "rejected" in rec:
        meta = {"annotator": _text(rec, "annotator", where, required=False),
                "time": _text(rec, "time", where, required=False)}
        if "prompt" in rec:
            return Record("preferences", {"prompt": _prompt(rec, where),
                                          "chosen": _text(rec, "chosen", where),
                                          "rejected": _text(rec, "rejected", where), **meta}, where)
        c, r = rec["chosen"], rec["rejected"]
        if _is_messages(c) or _is_messages(r):
            pc, cc = _split_messages(c, where, "chosen")
            pr, rr = _split_messages(r, where, "rejected")
        else:
            pc, cc = _split_hh(_text(rec, "chosen", where), where, "chosen")
            pr, rr = _split_hh(_text(rec, "rejected", where), where, "rejected")
        if pc != pr:
            raise DataError("'chosen' and 'rejected' do not share the same conversation before the final reply",
                            where=where)
        return Record("preferences", {"prompt": pc, "chosen": cc, "rejected": rr, **meta}, where)
    if "prompt" in rec and "response" in rec:
        return Record("sft", {"prompt": _prompt(rec, where),
                              "response": _text(rec, "response", where)}, where)
    if "prompt" in rec:
        return Record("prompts", {"prompt": _prompt(rec, where)}, where)
    raise DataError(
        f"unknown record format with fields {sorted(rec)}", where=where,
        hint="expected prompt/response, prompt/chosen/rejected, prompt, messages, or HH-RLHF chosen/rejected",
    )


def labelstudio_records(task: dict, where: str) -> list[Record]:
    """A Label Studio export task -> one preference record per a/b annotation (others give none)."""
    texts = labelstudio.task_texts(task, where)
    turns = task["data"].get("prompt_messages")  # a conversation pushed by `rlhf feedback push`
    prompt = _messages(turns, where, "data.prompt_messages") if turns is not None else texts["prompt"]
    out = []
    for j in labelstudio.task_judgements(task, where):
        pair = labelstudio.preference(texts, j.choice)
        if pair is not None:
            out.append(Record("preferences", {"prompt": prompt, "chosen": pair[0], "rejected": pair[1],
                                              "annotator": j.annotator, "time": j.time}, where))
    return out


def input_files(raw: str | Path) -> list[Path]:
    p = Path(raw)
    if not p.exists():
        raise DataError(f"input path does not exist: {p}", hint="run `make data` to fetch the demo data")
    if p.is_file():
        if _suffix(p) not in SUFFIXES:
            raise DataError(f"unknown file format '{p.suffix or '(no extension)'}'", where=str(p),
                            hint="use .jsonl (one JSON record per line) or .json, optionally gzipped")
        return [p]
    files = sorted(q for q in p.rglob("*") if q.is_file() and _suffix(q) in SUFFIXES
                   and not any(part.startswith(".") for part in q.relative_to(p).parts))
    if not files:
        raise DataError(f"no .jsonl or .json files in directory {p}",
                        hint="put sft / preferences / prompts JSONL files there")
    return files


def read_file(path: Path, max_line_bytes: int, invalid: list[str] | None = None) -> list[Record]:
    """The records of one file. ``invalid``: collect malformed records' one-line errors there (skip)
    instead of raising; the file itself being unreadable still raises."""
    if path.stat().st_size == 0:
        raise DataError("file is empty", where=str(path), hint="remove it or add records")
    it = _iter_json(path) if _suffix(path) in (".json", ".json.gz") else _iter_jsonl(path, max_line_bytes, invalid)
    out, n_read = [], 0
    for line_no, rec in it:
        where = f"{path}:{line_no}"
        n_read += 1
        try:
            records = labelstudio_records(rec, where) if labelstudio.is_task(rec) else [parse_record(rec, where)]
            for r in records:
                _check_text(r, where)
                _finish(r, where)
        except DataError as e:
            if invalid is None:
                raise
            invalid.append(e.one_line())
            continue
        out.extend(records)
    if not n_read and not invalid:
        raise DataError("file has no records (only blank lines)", where=str(path))
    return out


def _check_text(r: Record, where: str) -> None:
    """Text fields must be encodable (a lone surrogate from a broken \\ud800 escape is not)."""
    for k, v in r.values.items():
        texts = [(k, v)] if isinstance(v, str) else \
            [(f"{k}[{i}].content", m["content"]) for i, m in enumerate(v)] if isinstance(v, list) else []
        for name, t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"field '{name}' holds an invalid character (U+{ord(t[e.start]):04X}, a lone "
                                "surrogate)", where=where, hint="fix the record's escapes") from None


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def _finish(r: Record, where: str) -> None:
    """Texts normalised (LF, stripped); the prompt (text or turns) -> ``prompt_messages`` + its rendering
    ``prompt``; a conversation that breaks :func:`rlhf.data.conversation.history_problem` is refused."""
    for k in ("response", "chosen", "rejected"):
        v = r.values.get(k)
        if v is not None:
            r.values[k] = _clean(v)
    msgs = [{"role": m["role"], "content": _clean(m["content"])} for m in conversation.as_messages(r.values["prompt"])]
    problem = conversation.history_problem(msgs)
    if problem:
        raise DataError(f"the conversation before the reply is not usable: {problem}", where=where,
                        hint="system turns first, then user/assistant turns alternating, the last one a user turn")
    r.values["prompt_messages"] = msgs
    r.values["prompt"] = conversation.render(msgs)


# ---------------------------------------------------------------- splitting


def is_eval(prompt: str, eval_fraction: float, salt: str) -> bool:
    """Deterministic split by a hash of the prompt: every row with this prompt lands on one side."""
    h = hashlib.sha256(f"{salt}\0{prompt}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < eval_fraction


def _rel(f: Path, raw: str | Path) -> str:
    base = Path(raw) if Path(raw).is_dir() else Path(raw).parent
    return f.relative_to(base).as_posix()


def prepare(raw: str | Path, out: str | Path, cfg: PrepareConfig | None = None) -> dict[str, Any]:
    """Read raw data (file or directory), write Parquet splits + manifest to ``out``; return metrics."""
    cfg = cfg or PrepareConfig()
    files = input_files(raw)
    records: list[Record] = []
    invalid: list[str] | None = [] if cfg.on_invalid == "skip" else None
    for f in files:
        records.extend(read_file(f, cfg.max_line_bytes, invalid))
    n_invalid = len(invalid or [])
    if n_invalid:
        share = n_invalid / (n_invalid + len(records))
        if share > cfg.max_invalid_fraction or not records:
            raise DataError(f"{n_invalid} malformed records ({share:.1%}, over prepare.max_invalid_fraction "
                            f"{cfg.max_invalid_fraction:.1%}); first: {invalid[0]}",
                            hint="fix the input, or raise prepare.max_invalid_fraction")

    rows: dict[str, list[dict]] = {k: [] for k in KINDS}
    seen: dict[str, set] = {k: set() for k in KINDS}
    dups = dict.fromkeys(KINDS, 0)
    for r in records:
        key = json.dumps({k: r.values.get(k) for k in COLUMNS[r.kind] if k != "source"}, sort_keys=True)
        if key in seen[r.kind]:
            dups[r.kind] += 1
            continue
        seen[r.kind].add(key)
        rows[r.kind].append({**r.values, "source": r.source})
    sft_source = "demonstrations"
    if not rows["sft"] and rows["preferences"]:  # preference data only: SFT learns the chosen replies
        rows["sft"] = [{"prompt": r["prompt"], "prompt_messages": r["prompt_messages"], "response": r["chosen"],
                        "source": f"chosen:{r['source']}"} for r in rows["preferences"]]
        sft_source = "the chosen replies of the preference pairs (no demonstrations in the input)"
    if not rows["prompts"]:  # no explicit prompt file: PPO/eval prompts come from the other kinds
        ps: dict[str, dict] = {}
        for r in (r for k in ("preferences", "sft") for r in rows[k]):
            ps.setdefault(json.dumps(r["prompt_messages"]), r)
        rows["prompts"] = [{"prompt": r["prompt"], "prompt_messages": r["prompt_messages"], "source": "derived"}
                           for r in ps.values()]

    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(out) as tmp:
        for kind in KINDS:
            df = pd.DataFrame(rows[kind], columns=COLUMNS[kind])
            for c in COLUMNS[kind]:
                if c != "prompt_messages":
                    df[c] = df[c].astype("string")
            schema = pa.schema([(c, MESSAGES_TYPE if c == "prompt_messages" else pa.string()) for c in COLUMNS[kind]])
            mask = df["prompt"].map(lambda p: is_eval(p, cfg.eval_fraction, cfg.split_salt)).astype(bool) \
                if len(df) else pd.Series([], dtype=bool)
            (tmp / kind).mkdir()
            counts[kind] = {}
            for split, part in (("train", df[~mask]), ("eval", df[mask])):
                part.reset_index(drop=True).to_parquet(tmp / kind / f"{split}.parquet", index=False, schema=schema)
                counts[kind][split] = len(part)
        metrics = {
            **{f"{k}_{s}_rows": n for k, d in counts.items() for s, n in d.items()},
            **{f"{k}_duplicates_removed": n for k, n in dups.items()},
            "invalid_records_skipped": n_invalid,
        }
        write_manifest(tmp, kind="dataset", inputs={"raw": raw}, config=cfg, metrics=metrics,
                       extra={"files": {_rel(f, raw): sha256_file(f) for f in files}, "counts": counts,
                              "duplicates_removed": dups, "sft_source": sft_source,
                              "invalid_records": {"count": n_invalid, "first": (invalid or [])[:5]}})
    return metrics


def load_split(dataset: str | Path, kind: str, split: str) -> pd.DataFrame:
    path = Path(dataset) / kind / f"{split}.parquet"
    if not path.exists():
        raise DataError(f"missing {kind}/{split}.parquet in {dataset}", hint="run the prepare stage first")
    return pd.read_parquet(path)


def prompt_conversations(df: pd.DataFrame) -> list[conversation.Messages]:
    """The prompts of a prepared split as message lists (``prompt_messages``; a dataset prepared before
    that column existed: each ``prompt`` as one user turn)."""
    if "prompt_messages" not in df:
        return [conversation.as_messages(p) for p in df["prompt"]]
    return [conversation.as_messages(m) for m in df["prompt_messages"]]


def dataset_texts(dataset: str | Path) -> list[str]:
    """Every text of the train splits (the turns of the prompts, and the replies): the corpus the tiny
    tokenizer is trained on."""
    texts: list[str] = []
    for kind in KINDS:
        df = load_split(dataset, kind, "train")
        for col in COLUMNS[kind]:
            if col == "prompt":
                texts.extend(m["content"] for msgs in prompt_conversations(df) for m in msgs if m["content"])
            elif col in ("response", "chosen", "rejected"):
                texts.extend(df[col].dropna().tolist())
    return texts
