"""Label Studio's side of the preference format: our pairwise labelling config and its annotations.

One place for the mapping from a Label Studio task (as its export and its API return it) to
judgements, used by ``rlhf prepare`` (a Label Studio JSON export file in ``data/raw``) and by
:mod:`rlhf.feedback.labelstudio` (``pull``). Pure: no HTTP, no files.

A task's ``data`` holds ``prompt``, ``answer1`` (response A, shown left), ``answer2`` (response B,
shown right), ``item_id`` and ``batch_id``. Each annotation gives one judgement:

* the ``Pairwise`` result ``{"selected": "left" | "right"}`` -> ``a`` / ``b`` (a preference pair);
* the ``verdict`` choice ``Tie`` / ``Both bad`` -> ``tie`` / ``both_bad`` (counted, not a pair; it
  wins over a pairwise click in the same annotation);
* a skipped annotation (``was_cancelled``) -> ``skip``; no result at all -> ``empty``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf.errors import DataError

PAIRWISE = "pw"       # the Pairwise control
VERDICT = "verdict"   # the Choices control for tie / both bad
DATA_FIELDS = ("prompt", "answer1", "answer2")
VERDICTS = {"Tie": "tie", "Both bad": "both_bad"}
SIDES = {"left": "a", "right": "b"}

# Two Text objects side by side, compared with Pairwise (click the better one); Choices for the two
# answers that are not a pair. Nothing about the models is shown: the task data has no source fields.
LABEL_CONFIG = """<View>
  <Header value="Which response is better? Click it. Or choose Tie / Both bad below."/>
  <Text name="prompt" value="$prompt"/>
  <Pairwise name="pw" toName="answer1,answer2" selectionStyle="background-color: #e6f4ea; border: 2px solid #34a853"/>
  <View style="display: flex; gap: 1em;">
    <View style="flex: 1;"><Header value="Response 1" size="5"/><Text name="answer1" value="$answer1"/></View>
    <View style="flex: 1;"><Header value="Response 2" size="5"/><Text name="answer2" value="$answer2"/></View>
  </View>
  <Choices name="verdict" toName="prompt" choice="single" showInline="true">
    <Choice value="Tie"/>
    <Choice value="Both bad"/>
  </Choices>
</View>
"""


@dataclass(frozen=True)
class Judgement:
    """One annotation of a task: ``choice`` is a, b, tie, both_bad, skip or empty."""

    choice: str
    annotator: str | None
    time: str | None
    annotation_id: int | None


def is_task(rec: Any) -> bool:
    """A record of a Label Studio JSON export: a task object with its ``data`` and ``annotations``."""
    return isinstance(rec, dict) and isinstance(rec.get("data"), dict) and "annotations" in rec


def task_texts(task: dict, where: str) -> dict[str, str]:
    """The task's prompt and the two responses (answer1 = A, answer2 = B)."""
    data = task["data"]
    out = {}
    for key in DATA_FIELDS:
        v = data.get(key)
        if not isinstance(v, str):
            got = "missing" if key not in data else f"not text ({type(v).__name__})"
            raise DataError(f"Label Studio task field 'data.{key}' is {got}", where=where,
                            hint="expected a task pushed by `rlhf feedback push` (data: prompt, answer1, answer2)")
        out[key] = v
    return out


def annotator_of(completed_by: Any, users: dict[int, str] | None = None) -> str | None:
    """The user's email: the export has a user object, or an id the API's user list resolves."""
    if isinstance(completed_by, dict):
        return completed_by.get("email") or completed_by.get("username") or (
            f"user-{completed_by['id']}" if "id" in completed_by else None)
    if isinstance(completed_by, int) and not isinstance(completed_by, bool):
        return (users or {}).get(completed_by, f"user-{completed_by}")
    return None


def _judgement_of(ann: dict, where: str) -> str:
    if ann.get("was_cancelled"):
        return "skip"
    result = ann.get("result")
    if result is None:
        result = []
    if not isinstance(result, list):
        raise DataError(f"annotation 'result' must be a list, got {type(result).__name__}", where=where)
    side = verdict = None
    for r in result:
        if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
            raise DataError("annotation result entries must be objects with a 'value' object", where=where)
        if r.get("from_name") == PAIRWISE or r.get("type") == "pairwise":
            sel = r["value"].get("selected")
            if not isinstance(sel, str) or sel not in SIDES:
                raise DataError(f"pairwise 'value.selected' must be 'left' or 'right', got {sel!r}", where=where)
            side = SIDES[sel]
        elif r.get("from_name") == VERDICT:
            chosen = r["value"].get("choices")
            if not isinstance(chosen, list) or len(chosen) != 1 or not isinstance(chosen[0], str) \
                    or chosen[0] not in VERDICTS:
                raise DataError(f"'verdict' choices must be one of {sorted(VERDICTS)}, got {chosen!r}",
                                where=where)
            verdict = VERDICTS[chosen[0]]
    return verdict or side or "empty"


def task_judgements(task: dict, where: str, users: dict[int, str] | None = None) -> list[Judgement]:
    """Every annotation of one exported task, in order, as a :class:`Judgement`."""
    anns = task.get("annotations")
    if not isinstance(anns, list):
        raise DataError(f"Label Studio task 'annotations' must be a list, got {type(anns).__name__}", where=where)
    out = []
    for i, ann in enumerate(anns):
        at = f"{where} annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError("annotation must be an object", where=at)
        when = ann.get("updated_at") or ann.get("created_at")
        out.append(Judgement(_judgement_of(ann, at), annotator_of(ann.get("completed_by"), users),
                             when if isinstance(when, str) else None,
                             ann.get("id") if isinstance(ann.get("id"), int) else None))
    return out


def preference(texts: dict[str, str], choice: str) -> tuple[str, str] | None:
    """(chosen, rejected) for an a/b judgement, None for tie / both bad / skip / empty."""
    if choice == "a":
        return texts["answer1"], texts["answer2"]
    if choice == "b":
        return texts["answer2"], texts["answer1"]
    return None
