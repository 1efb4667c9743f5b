"""The labels database: annotators, items, assignments and labels in one SQLite file (WAL mode).

Durability: every label is one ``BEGIN IMMEDIATE ... COMMIT`` with ``synchronous=FULL``, so a label
the app acknowledged survives a crash or SIGKILL of the server. Tokens are stored only as sha256.

Assignment (no two annotators on one item unless ``overlap`` > 1): an annotator's next item is the
first item assigned to them that they have not labelled yet; otherwise, inside one write
transaction, the first item with fewer than ``overlap`` assignments that they do not hold yet is
assigned to them. SQLite serialises write transactions, so two annotators asking at the same
moment cannot claim the same slot.

Choices are stored as the annotator saw them (``left``/``right`` map to batch ``a``/``b`` through
the recorded ``flipped`` order) and as the winner in batch terms (``winner``: ``a``, ``b``, or
empty for tie / both bad / skip).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import random
import secrets
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf.errors import UserError

CHOICES = ("left", "right", "tie", "both_bad", "skip")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
  name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, admin INTEGER NOT NULL DEFAULT 0, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
  batch_id TEXT NOT NULL, item_id TEXT NOT NULL, seq INTEGER NOT NULL, prompt TEXT NOT NULL,
  response_a TEXT NOT NULL, response_b TEXT NOT NULL, PRIMARY KEY (batch_id, item_id));
CREATE TABLE IF NOT EXISTS assignments (
  batch_id TEXT NOT NULL, item_id TEXT NOT NULL, annotator TEXT NOT NULL, flipped INTEGER NOT NULL,
  n INTEGER NOT NULL, assigned TEXT NOT NULL, PRIMARY KEY (batch_id, item_id, annotator));
CREATE TABLE IF NOT EXISTS labels (
  batch_id TEXT NOT NULL, item_id TEXT NOT NULL, annotator TEXT NOT NULL, choice TEXT NOT NULL,
  winner TEXT NOT NULL, flipped INTEGER NOT NULL, reason TEXT NOT NULL, seconds REAL, created TEXT NOT NULL,
  updated TEXT NOT NULL, revisions INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (batch_id, item_id, annotator));
"""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Store:
    """One SQLite file. Safe across threads (one connection per call) and processes (SQLite locks)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (secrets.token_hex(32),))

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def _write(self, fn, *args):
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(db, *args)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return out
        finally:
            db.close()

    def _read(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        db = self._connect()
        try:
            return db.execute(sql, tuple(args)).fetchall()
        finally:
            db.close()

    # ----------------------------------------------------------------- secrets and annotators

    @property
    def secret(self) -> bytes:
        return self._read("SELECT value FROM meta WHERE key='secret'")[0]["value"].encode()

    def csrf_token(self, annotator: str) -> str:
        return hmac.new(self.secret, f"csrf:{annotator}".encode(), hashlib.sha256).hexdigest()

    def add_annotator(self, name: str, *, admin: bool = False) -> str:
        """Create ``name`` (or give it a new token) and return the token; only its hash is stored."""
        name = name.strip()
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise UserError(f"annotator name {name!r} is not valid", hint="letters, digits, - _ . (at most 64)")
        token = secrets.token_urlsafe(24)

        def tx(db):
            db.execute("INSERT INTO annotators (name, token_sha256, admin, created) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET token_sha256=excluded.token_sha256, admin=excluded.admin",
                       (name, token_hash(token), int(admin), _now()))
        self._write(tx)
        return token

    def annotator_for(self, token: str | None) -> dict[str, Any] | None:
        if not token:
            return None
        rows = self._read("SELECT name, admin FROM annotators WHERE token_sha256=?", (token_hash(token),))
        return dict(rows[0]) if rows else None

    def annotators(self) -> list[str]:
        return [r["name"] for r in self._read("SELECT name FROM annotators ORDER BY name")]

    # ----------------------------------------------------------------- items

    def add_batch(self, batch) -> None:
        """Make a batch's items available (idempotent: a restart re-adds nothing)."""
        def tx(db):
            for seq, it in enumerate(batch.items):
                db.execute("INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?)",
                           (batch.batch_id, it["item_id"], seq, it["prompt"], it["response_a"], it["response_b"]))
        self._write(tx)

    def item(self, batch_id: str, item_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM items WHERE batch_id=? AND item_id=?", (batch_id, item_id))
        return dict(rows[0]) if rows else None

    def n_items(self, batch_ids: list[str]) -> int:
        q = ",".join("?" * len(batch_ids))
        return self._read(f"SELECT count(*) AS n FROM items WHERE batch_id IN ({q})", batch_ids)[0]["n"]

    # ----------------------------------------------------------------- assignment

    def next_item(self, annotator: str, batch_ids: list[str], overlap: int) -> dict[str, Any] | None:
        """The annotator's next unlabelled assignment, claiming a new item if needed; None when done."""
        q = ",".join("?" * len(batch_ids))

        def tx(db):
            row = db.execute(
                f"SELECT s.* FROM assignments s LEFT JOIN labels l ON l.batch_id=s.batch_id AND "
                f"l.item_id=s.item_id AND l.annotator=s.annotator WHERE s.annotator=? AND l.choice IS NULL "
                f"AND s.batch_id IN ({q}) ORDER BY s.n LIMIT 1", (annotator, *batch_ids)).fetchone()
            if row is not None:
                return dict(row)
            free = db.execute(
                f"SELECT i.batch_id, i.item_id FROM items i WHERE i.batch_id IN ({q}) AND "
                f"(SELECT count(*) FROM assignments s WHERE s.batch_id=i.batch_id AND s.item_id=i.item_id) < ? "
                f"AND NOT EXISTS (SELECT 1 FROM assignments s WHERE s.batch_id=i.batch_id AND "
                f"s.item_id=i.item_id AND s.annotator=?) ORDER BY i.batch_id, i.seq LIMIT 1",
                (*batch_ids, overlap, annotator)).fetchone()
            if free is None:
                return None
            n = db.execute("SELECT coalesce(max(n), 0) + 1 AS n FROM assignments WHERE annotator=?",
                           (annotator,)).fetchone()["n"]
            flipped = random.SystemRandom().random() < 0.5
            db.execute("INSERT INTO assignments VALUES (?, ?, ?, ?, ?, ?)",
                       (free["batch_id"], free["item_id"], annotator, int(flipped), n, _now()))
            return {"batch_id": free["batch_id"], "item_id": free["item_id"], "annotator": annotator,
                    "flipped": int(flipped), "n": n}
        return self._write(tx)

    def assignment(self, annotator: str, batch_id: str, item_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM assignments WHERE annotator=? AND batch_id=? AND item_id=?",
                          (annotator, batch_id, item_id))
        return dict(rows[0]) if rows else None

    def previous(self, annotator: str, n: int, batch_ids: list[str]) -> dict[str, Any] | None:
        q = ",".join("?" * len(batch_ids))
        rows = self._read(f"SELECT * FROM assignments WHERE annotator=? AND n<? AND batch_id IN ({q}) "
                          "ORDER BY n DESC LIMIT 1", (annotator, n, *batch_ids))
        return dict(rows[0]) if rows else None

    # ----------------------------------------------------------------- labels

    def put_label(self, annotator: str, batch_id: str, item_id: str, choice: str, reason: str,
                  seconds: float | None) -> dict[str, Any]:
        """Store (or change) one label in one transaction; the item must be assigned to ``annotator``."""
        if choice not in CHOICES:
            raise UserError(f"unknown choice {choice!r}", hint=f"one of {', '.join(CHOICES)}")

        def tx(db):
            a = db.execute("SELECT flipped FROM assignments WHERE annotator=? AND batch_id=? AND item_id=?",
                           (annotator, batch_id, item_id)).fetchone()
            if a is None:
                raise UserError(f"item {batch_id}/{item_id} is not assigned to {annotator}")
            flipped = bool(a["flipped"])
            winner = {"left": "b" if flipped else "a", "right": "a" if flipped else "b"}.get(choice, "")
            now = _now()
            db.execute("INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT(batch_id, item_id, "
                       "annotator) DO UPDATE SET choice=excluded.choice, winner=excluded.winner, "
                       "reason=excluded.reason, seconds=excluded.seconds, updated=excluded.updated, "
                       "revisions=revisions+1",
                       (batch_id, item_id, annotator, choice, winner, int(flipped), reason, seconds, now, now))
            return {"winner": winner, "flipped": flipped}
        return self._write(tx)

    def label(self, annotator: str, batch_id: str, item_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM labels WHERE annotator=? AND batch_id=? AND item_id=?",
                          (annotator, batch_id, item_id))
        return dict(rows[0]) if rows else None

    def labels(self, batch_ids: list[str] | None = None) -> list[dict[str, Any]]:
        if batch_ids is None:
            return [dict(r) for r in self._read("SELECT * FROM labels ORDER BY batch_id, item_id, annotator")]
        q = ",".join("?" * len(batch_ids))
        return [dict(r) for r in self._read(f"SELECT * FROM labels WHERE batch_id IN ({q}) "
                                            "ORDER BY batch_id, item_id, annotator", batch_ids)]

    def progress(self, batch_ids: list[str]) -> dict[str, Any]:
        q = ",".join("?" * len(batch_ids))
        per = self._read(f"SELECT annotator, count(*) AS n, sum(choice='skip') AS skips, avg(seconds) AS secs "
                         f"FROM labels WHERE batch_id IN ({q}) GROUP BY annotator ORDER BY annotator", batch_ids)
        return {"items": self.n_items(batch_ids), "per_annotator": [dict(r) for r in per],
                "labels": sum(r["n"] for r in per)}


__all__ = ["Store", "CHOICES", "token_hash"]
