"""Conversations: the turns before the reply a row trains on, and the rules they follow.

A *prompt* is either a text (one user turn, the common case) or a list of ``{"role", "content"}``
messages: system turns first, then user and assistant turns alternating, the last one a user turn
(the turn the reply answers). The prepared dataset keeps the messages in ``prompt_messages`` and a
readable rendering of them in ``prompt`` (:func:`render`: the text itself for a single user turn, a
``Human: ... / Assistant: ...`` transcript otherwise), used for the train/eval split, duplicate
checks, reports and the demo's gold score. The training stages read the messages
(:func:`rlhf.train.models.encode_prompt` renders them with the tokenizer's chat template).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

ROLES = ("system", "user", "assistant")
NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}

Messages = list[dict[str, str]]


def as_messages(prompt: str | Iterable[Mapping[str, Any]]) -> Messages:
    """A prompt as a list of ``{"role", "content"}`` dicts: a text is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def render(prompt: str | Iterable[Mapping[str, Any]]) -> str:
    """The readable text of a prompt: a single user turn as is, else a labelled transcript."""
    msgs = as_messages(prompt)
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        return msgs[0]["content"]
    return "\n\n".join(f"{NAMES.get(m['role'], str(m['role']).capitalize())}: {m['content']}" for m in msgs)


def history_problem(msgs: Messages, *, blank_turns: bool = True) -> str | None:
    """Why ``msgs`` is not a conversation a reply can follow, or None.

    The rule: known roles; system turns only at the start; then user and assistant alternating,
    starting with a user turn; the last turn a user turn. ``blank_turns=False``: a turn whose
    content is blank is a problem too.
    """
    if not msgs:
        return "the conversation has no turns"
    expected, started = "user", False
    for i, m in enumerate(msgs):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return f"turn {i}: role must be system, user or assistant, got {role!r}"
        if not isinstance(content, str):
            return f"turn {i}: content must be text"
        if not blank_turns and not content.strip():
            return f"turn {i} ({role}) is blank"
        if role == "system":
            if started:
                return f"turn {i}: a system turn after the conversation started (system turns come first)"
            continue
        if role != expected:
            return f"turn {i}: the conversation starts with an assistant turn" if not started else \
                f"turn {i}: two {role} turns in a row (user and assistant turns must alternate)"
        started, expected = True, "assistant" if role == "user" else "user"
    if msgs[-1]["role"] != "user":
        return "the last turn before the reply must be a user turn"
    return None


__all__ = ["ROLES", "Messages", "as_messages", "render", "history_problem"]
