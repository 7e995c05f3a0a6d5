"""The pieces of a row that the format parsers share (`sft_formats`, `preference_formats`, `prompt_formats`):
required fields, ids, texts, facts, images, LLaVA turns and TRL messages, ranked responses.

Placeholders: in the records the user text holds "<image>" exactly once per image. Rows that carry
fewer (none, or one for several images as in Vision-LLM-Alignment's comma-separated multi-image
rows) get them moved to the front of the first user turn, as LLaVA's preprocessing does; more
placeholders than images, or any in an assistant turn, is a bad row (`_place_images`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from training.data.images import is_base64_text
from training.data.readers import RowProblem
from training.data.records import IMAGE_PLACEHOLDER as PH, Message, RowRef

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_LLAVA_NAMES = {"user": "human", "assistant": "gpt", "system": "system"}
_TRL_NAMES = {"user": "user", "assistant": "assistant", "system": "system"}
# Multiple-choice ground truth (Fact-RLHF): a direct answer field, or A-OKVQA's choices + index.
ANSWER_FIELDS = ("correct_choice", "correct_option", "correct_answer", "gt_answer", "ground_truth")


def _need(row: dict, key: str) -> Any:
    """A field the row's format needs. The format is detected from one row of a file, so another
    row may lack it: a bad row, not a KeyError."""
    if key not in row:
        raise RowProblem(key, "missing field")
    return row[key]


def _row_id(row: dict, ref: RowRef, *keys: str) -> str:
    for k in keys:
        if row.get(k) is not None:
            return str(row[k])
    return f"{Path(ref.file).stem}-{ref.row}"


def _text(value: Any, field: str, response: bool = False) -> str:
    if value is None:
        raise RowProblem(field, "missing value")
    if not isinstance(value, str):
        raise RowProblem(field, f"expected text, got {type(value).__name__}")
    if response and not value.strip():
        raise RowProblem(field, "empty response")
    return value


def _facts(row: dict) -> list[str] | None:
    facts = row.get("facts")
    if facts is None:
        return None
    if isinstance(facts, str):
        return [facts]
    if isinstance(facts, list) and all(isinstance(f, str) for f in facts):
        return list(facts)
    raise RowProblem("facts", "expected a list of strings")


def _choice_index(row: dict, choices, letters: bool = False) -> int:
    """correct_choice_idx as an index into choices (letters: one the options' letters A-Z name): a whole number,
    1.0 as a float column holds it too; True / False are no index."""
    idx = row.get("correct_choice_idx")
    whole = isinstance(idx, int) or (isinstance(idx, float) and idx.is_integer())
    bound = (min(len(choices), 26) if letters else len(choices)) if isinstance(choices, list) else 0
    if isinstance(idx, bool) or not whole or not 0 <= idx < bound:
        raise RowProblem("correct_choice_idx", f"{idx!r} is not an index into choices")
    return int(idx)


def _answer_meta(row: dict) -> dict:
    """A prompt row's multiple-choice ground truth (PPO's --correct_bonus reads it): its answer field, or
    for choices + correct_choice_idx the option's letter (the prompt lists the options as A., B., ...)."""
    meta = {k: row[k] for k in ANSWER_FIELDS if row.get(k) is not None}
    idx, choices = row.get("correct_choice_idx"), row.get("choices")
    if not meta and idx is not None:
        meta["correct_option"] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[_choice_index(row, choices, letters=True)]
    return meta


def _llava_images(row: dict, ctx: dict) -> tuple[list, str]:
    """LLaVA-style `image` (else `image_path`, else `images`): one source, a list, or Vision-LLM-Alignment's
    "a.jpg,b.jpg" (a name with a comma that is a file in the image root, ctx["image_root"], is that one image)."""
    field = next((k for k in ("image", "image_path", "images") if row.get(k) is not None), "image_path")
    src = row.get(field)
    if src is None or (isinstance(src, str) and not src.strip()):
        return [], field
    if isinstance(src, list):
        return list(src), field
    if isinstance(src, str) and "," in src and not is_base64_text(src) and not _is_file(ctx.get("image_root"), src):
        return [s.strip() for s in src.split(",") if s.strip()], field
    return [src], field


def _is_file(root: str | None, name: str) -> bool:
    return root is not None and os.path.isfile(os.path.join(root, name))


def _trl_images(row: dict, inline: list) -> tuple[list, str]:
    images = row.get("images")
    if images is None:
        return ([row["image"]], "image") if row.get("image") is not None else (inline, "images")
    if not isinstance(images, list):
        images = [images]
    return list(images) or inline, "images"


def _llava_turns(row: dict, field: str = "conversations") -> list[tuple[str, dict]]:
    turns = _need(row, field)
    if isinstance(turns, str):  # vision-feedback-mix stores the conversation as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as err:
            raise RowProblem(field, f"not valid JSON text: {err.msg}") from None
    if not isinstance(turns, list) or not turns:
        raise RowProblem(field, "expected a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowProblem(f"{field}[{i}]", "turn is not an object")
        who = turn.get("from", turn.get("role"))
        if not isinstance(who, str) or who not in _LLAVA_ROLES:
            raise RowProblem(f"{field}[{i}].from", f"unknown speaker {who!r} (expected human, gpt or system)")
        out.append((_LLAVA_ROLES[who], turn))
    return out


def _check_order(roles: list[str], field: str, key: str, names: dict, end: str) -> None:
    """Optional system turn, then user/assistant alternating from user, ending with `end`."""
    start = 1 if roles and roles[0] == "system" else 0
    user, asst = names["user"], names["assistant"]
    for i in range(start, len(roles)):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != want:
            raise RowProblem(f"{field}[{i}].{key}", f"turns must alternate {user}/{asst} starting with "
                                                    f"{user}; turn {i} is {names[roles[i]]}")
    if len(roles) == start:
        raise RowProblem(field, f"no {user} message")
    if roles[-1] != end:
        raise RowProblem(f"{field}[{len(roles) - 1}].{key}",
                         f"ends with a {user} turn: no response to train on" if end == "assistant"
                         else f"the prompt must end with a {user} turn")


def _llava_messages(turns: list[tuple[str, dict]], field: str, end: str) -> list[Message]:
    _check_order([r for r, _ in turns], field, "from", _LLAVA_NAMES, end)
    return [Message(role, _text(t.get("value"), f"{field}[{i}].value", response=role == "assistant"))
            for i, (role, t) in enumerate(turns)]


def _trl_content(content: Any, field: str) -> tuple[str, list]:
    """TRL content (text, or parts [{"type": "image"}, {"type": "text", "text": ...}]) -> text, inline images."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RowProblem(field, "expected text or a list of content parts")
    pieces, inline = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(_text(part.get("text"), f"{field}[{j}].text"))
        elif kind == "image":
            pieces.append(PH)
            src = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
            if src is not None:
                inline.append(src)
        else:
            raise RowProblem(f"{field}[{j}]", f"unknown content part {kind!r} (expected type text or image)")
    return "\n".join(pieces), inline


def _trl_messages(messages: Any, field: str, end: str) -> tuple[list[Message], list]:
    if isinstance(messages, str):  # TRL "standard" (non-conversational) prompt; SFT's messages need a response
        if end == "assistant":
            raise RowProblem(field, "a text, not a list of messages: no assistant response to train on")
        return [Message("user", messages)], []
    if not isinstance(messages, list) or not messages:
        raise RowProblem(field, "expected a non-empty list of messages")
    roles = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in _TRL_NAMES:
            raise RowProblem(f"{field}[{i}].role", f"unknown role {role!r} (expected user, assistant or system)")
        roles.append(role)
    _check_order(roles, field, "role", _TRL_NAMES, end)
    out, inline = [], []
    for i, (role, m) in enumerate(zip(roles, messages)):
        text, imgs = _trl_content(m.get("content"), f"{field}[{i}].content")
        if role == "assistant" and not text.strip():
            raise RowProblem(f"{field}[{i}].content", "empty response")
        out.append(Message(role, text))
        inline += imgs
    return out, inline


def _trl_response(value: Any, field: str) -> str:
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise RowProblem(field, "expected exactly one assistant message")
        value = _trl_content(value[0].get("content"), f"{field}[0].content")[0]
    return _text(value, field, response=True)


def _place_images(messages: list[Message], n_images: int, field: str) -> None:
    """Make the user text hold "<image>" exactly once per image (see the module docstring)."""
    where = (lambda i: field) if len(messages) == 1 else (lambda i: f"{field}[{i}]")
    for i, m in enumerate(messages):
        if m.role != "user" and PH in m.content:
            raise RowProblem(where(i), f"'{PH}' outside the user text (in a {m.role} turn)")
    count = sum(m.content.count(PH) for m in messages)
    if count != n_images:
        if n_images == 0:
            raise RowProblem(field, f"text has {count} '{PH}' but the row has no image")
        if count > n_images:
            raise RowProblem(field, f"{count} '{PH}' placeholders for {n_images} image(s)")
        for m in messages:
            if PH in m.content:
                m.content = m.content.replace(PH, "").strip()
        first = next(m for m in messages if m.role == "user")
        first.content = f"{PH}\n" * n_images + first.content
    for i, m in enumerate(messages):
        if m.role == "user" and not m.content.strip():
            raise RowProblem(where(i), "empty user message")


def _responses(values: list, field: str, names: tuple | list = ()) -> list[str]:
    """names: each response's own field, in the order of `values`, where [k] (the k-th best) would misname it."""
    if len(values) < 2:
        raise RowProblem(field, f"ranked list has {len(values)} response(s), needs at least 2")
    fields = list(names) or [f"{field}[{k}]" for k in range(len(values))]
    out = [_text(v, fields[k], response=True) for k, v in enumerate(values)]
    for k, text in enumerate(out):
        if PH in text:
            raise RowProblem(fields[k], f"'{PH}' in a response")
    if len({t.strip() for t in out}) < len(out):
        raise RowProblem(field, "identical responses: chosen and rejected must differ")
    return out


def _opa_images(row: dict) -> list:
    return [] if row.get("image_bytes") is None else [row["image_bytes"]]


def _is_ranked(r: dict) -> bool:
    conv = r.get("conversations")
    last = conv[-1] if isinstance(conv, list) and conv else None
    return isinstance(last, dict) and (isinstance(last.get("value"), list) or "preference_values" in last)


def _answer_fact(row: dict) -> list[str]:
    """LLaVA-RLHF's factual line for a multiple-choice row, ["correct answer: <the option's text>"], else []."""
    answer = next((row[k] for k in ANSWER_FIELDS if row.get(k) is not None), None)
    choices, idx = row.get("choices"), row.get("correct_choice_idx")
    if answer is None and idx is not None:
        answer = choices[_choice_index(row, choices)]
    return [] if answer is None else [f"correct answer: {answer}"]
