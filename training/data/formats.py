"""Published VLM data formats -> canonical records (see /work/shared/reference/data_formats.md).

Each file's format is detected from the fields of its first row of a known format (rows before it are
bad rows of that format; a file with none in its first 100 objects is refused); each format is a row parser here, run
by `readers.read_records`. Every row either becomes a record or is reported through
`BadRowReport.bad` with its file, row and field: nothing is dropped silently. Every image is decoded
once to validate it, but records keep the *source*: bytes for bytes / {bytes, path} / base64
sources, the resolved absolute path for path sources (any consumer opens it with `load_image`).

Placeholders: in the records the user text holds "<image>" exactly once per image. Rows that carry
fewer (none, or one for several images as in Vision-LLM-Alignment's comma-separated multi-image
rows) get them moved to the front of the first user turn, as LLaVA's preprocessing does; more
placeholders than images, or any in an assistant turn, is a bad row.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

from training.data.bad_rows import BadRowReport
from training.data.images import is_base64_text
from training.data.readers import DataFormatError, Format, ParsedRow, RowProblem, read_records, read_table
from training.data.captions import caption_facts
from training.data.span_weights import span_weights
from training.data.records import (IMAGE_PLACEHOLDER as PH, ConversationRecord, Message, PreferenceRecord,
                                   PromptRecord, RowRef)

__all__ = ["read_sft", "read_preferences", "read_prompts", "read_table", "question_id", "DataFormatError",
           "write_jsonl"]

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_LLAVA_NAMES = {"user": "human", "assistant": "gpt", "system": "system"}
_TRL_NAMES = {"user": "user", "assistant": "assistant", "system": "system"}
# Multiple-choice ground truth (Fact-RLHF): a direct answer field, or A-OKVQA's choices + index.
ANSWER_FIELDS = ("correct_choice", "correct_option", "correct_answer", "gt_answer", "ground_truth")


# ---------------------------------------------------------------- shared pieces of a row

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


def _answer_meta(row: dict) -> dict:
    """A prompt row's multiple-choice ground truth (PPO's --correct_bonus reads it): its answer field, or
    for choices + correct_choice_idx the option's letter (the prompt lists the options as A., B., ...)."""
    meta = {k: row[k] for k in ANSWER_FIELDS if row.get(k) is not None}
    idx, choices = row.get("correct_choice_idx"), row.get("choices")
    if not meta and idx is not None:
        if not (isinstance(choices, list) and isinstance(idx, int) and 0 <= idx < min(len(choices), 26)):
            raise RowProblem("correct_choice_idx", f"{idx!r} is not an index into choices")
        meta["correct_option"] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[idx]
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


# ---------------------------------------------------------------- SFT formats

def _sft_llava(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    turns = _llava_turns(row)
    if any(isinstance(t.get("value"), list) for _, t in turns):
        raise RowProblem("conversations", "a ranked-list (preference) row: SFT needs one response per gpt turn")
    messages = _llava_messages(turns, "conversations", end="assistant")
    images, field = _llava_images(row, ctx)
    _place_images(messages, len(images), "conversations")
    return ParsedRow(ConversationRecord(_row_id(row, ref, "id"), messages, source=ref), images, field)


def _sft_trl(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    messages, inline = _trl_messages(_need(row, "messages"), "messages", end="assistant")
    images, field = _trl_images(row, inline)
    _place_images(messages, len(images), "messages")
    return ParsedRow(ConversationRecord(_row_id(row, ref, "id"), messages, source=ref, text_field="messages"), images,
                     field)


def _sft_trl_completion(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    """TRL prompt-completion: the completion is the one target; assistant turns in the prompt are context."""
    prompt, inline = _trl_messages(_need(row, "prompt"), "prompt", end="user")
    completion = _trl_response(_need(row, "completion"), "completion")
    if PH in completion:
        raise RowProblem("completion", f"'{PH}' in a response")
    messages = prompt + [Message("assistant", completion)]
    images, field = _trl_images(row, inline)
    _place_images(messages, len(images), "prompt")
    return ParsedRow(ConversationRecord(_row_id(row, ref, "id"), messages, source=ref, text_field="prompt/completion",
                                        last_answer_only=True), images, field)


_OPA_ANSWERS = ("standard_response", "AI_pseudo_response")


def _opa_images(row: dict) -> list:
    return [] if row.get("image_bytes") is None else [row["image_bytes"]]


def _sft_opa(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    """OPA-DPO's OPA set, the data of its OPA step (LoRA-SFT): the query answered by the ground truth
    (standard_response) and by the expert's revision (AI_pseudo_response), two conversations on the
    row's image (one when both are the same text)."""
    prompt = [Message("user", _text(_need(row, "queries"), "queries"))]
    images = _opa_images(row)
    _place_images(prompt, len(images), "queries")
    answers = {}
    for key in _OPA_ANSWERS:
        text = _text(row.get(key), key, response=True)
        if PH in text:
            raise RowProblem(key, f"'{PH}' in a response")
        answers.setdefault(text.strip(), key)
    base = _row_id(row, ref, "id")
    records = [ConversationRecord(f"{base}-{key}", [Message("user", prompt[0].content), Message("assistant", text)],
                                  source=ref, text_field=f"queries/{key}") for text, key in answers.items()]
    return ParsedRow(records, images, "image_bytes")


def _is_ranked(r: dict) -> bool:
    conv = r.get("conversations")
    last = conv[-1] if isinstance(conv, list) and conv else None
    return isinstance(last, dict) and (isinstance(last.get("value"), list) or "preference_values" in last)


SFT_FORMATS = [
    Format("llava", "LLaVA-Instruct: id, image, conversations [{from: human|gpt, value: text}]",
           lambda r: isinstance(r.get("conversations"), list) and not _is_ranked(r), _sft_llava),
    Format("trl_messages", "TRL conversational: messages [{role, content}], images",
           lambda r: "messages" in r, _sft_trl),
    Format("trl_prompt_completion", "TRL prompt-completion: prompt (messages or text), completion (one assistant "
           "message or text), images; the completion alone is trained", lambda r: {"prompt", "completion"} <= r.keys(),
           _sft_trl_completion),
    Format("opa", "OPA-DPO's OPA set (save_to_disk): queries, image_bytes, standard_response and "
           "AI_pseudo_response (each a target)", lambda r: {"queries", *_OPA_ANSWERS} <= r.keys(), _sft_opa),
]


# ---------------------------------------------------------------- preference formats

def _pref(row: dict, ref: RowRef, prompt: list[Message], responses: list[str], images: list, field: str,
          facts: list[str] | None, id_keys=("id",), text_field: str = "conversations",
          response_fields: str = "") -> ParsedRow:
    """text_field: where the prompt's text is (image placeholders are counted there); response_fields: where the
    responses are when not in it, e.g. "chosen/rejected". A bad row names both."""
    _place_images(prompt, len(images), text_field)
    record = PreferenceRecord(_row_id(row, ref, *id_keys), prompt, responses, facts=facts, source=ref,
                              text_field="/".join(x for x in (text_field, response_fields) if x),
                              weights=span_weights(row, responses))
    return ParsedRow(record, images, field)


def _pref_ranked(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    """Vision-LLM-Alignment ranked list (also the embedded world, and vision-feedback-mix)."""
    turns = _llava_turns(row)
    last = len(turns) - 1
    role, turn = turns[last]
    key = "preference_values" if "preference_values" in turn else "value"
    if role != "assistant":
        raise RowProblem(f"conversations[{last}].from", "the last turn must be gpt with the ranked responses")
    if not isinstance(turn.get(key), list):
        raise RowProblem(f"conversations[{last}].{key}", "expected a ranked list [best, ..., worst]")
    responses = _responses(turn[key], f"conversations[{last}].{key}")
    prompt = _llava_messages(turns[:last], "conversations", end="user")
    images, field = _llava_images(row, ctx)
    return _pref(row, ref, prompt, responses, images, field, _facts(row))


def _pref_rlaif_v(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    prompt = [Message("user", _text(row.get("question"), "question"))]
    responses = _responses([row.get("chosen"), row.get("rejected")], "chosen/rejected")
    images, field = _llava_images(row, ctx)
    return _pref(row, ref, prompt, responses, images, field, _facts(row), ("idx", "id"), "question",
                 "chosen/rejected")


def _output_text(row: dict, key: str) -> str:
    value = row.get(key)
    return _text(value.get("value") if isinstance(value, dict) else value, key, response=True)


def _answer_fact(row: dict) -> list[str]:
    """LLaVA-RLHF's factual line for a multiple-choice row, ["correct answer: <the option's text>"], else []."""
    answer = next((row[k] for k in ANSWER_FIELDS if row.get(k) is not None), None)
    choices, idx = row.get("choices"), row.get("correct_choice_idx")
    if answer is None and idx is not None:
        if not (isinstance(choices, list) and isinstance(idx, int) and 0 <= idx < len(choices)):
            raise RowProblem("correct_choice_idx", f"{idx!r} is not an index into choices")
        answer = choices[idx]
    return [] if answer is None else [f"correct answer: {answer}"]


def _pref_llava_rlhf(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    turns = _llava_turns(row)
    if turns[-1][0] == "assistant":  # the slot that output_1 / output_2 fill
        turns = turns[:-1]
    prompt = _llava_messages(turns, "conversations", end="user")
    pref = str(row.get("preference")).strip().removesuffix(".0")  # 1.0: a parquet or pandas column of floats
    if pref not in ("1", "2"):
        raise RowProblem("preference", f"expected 1 or 2, got {row.get('preference')!r}")
    outs = [_output_text(row, "output_1"), _output_text(row, "output_2")]
    names = ["output_1", "output_2"] if pref == "1" else ["output_2", "output_1"]
    responses = _responses(outs if pref == "1" else outs[::-1], "output_1/output_2", names)
    images, field = _llava_images(row, ctx)
    facts = list(_facts(row) or []) + caption_facts(images, field, ctx) + _answer_fact(row)
    return _pref(row, ref, prompt, responses, images, field, facts or None,
                 response_fields="output_1/output_2")


def _margin(row: dict) -> float | None:
    """TRL's optional `margin` column (its RewardTrainer subtracts it inside the Bradley-Terry sigmoid)."""
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RowProblem("margin", f"expected a finite number, got {value!r}")
    return float(value)


def _pref_trl(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    prompt, inline = _trl_messages(_need(row, "prompt"), "prompt", end="user")
    responses = _responses([_trl_response(row.get("chosen"), "chosen"),
                            _trl_response(row.get("rejected"), "rejected")], "chosen/rejected")
    images, field = _trl_images(row, inline)
    parsed = _pref(row, ref, prompt, responses, images, field, _facts(row), text_field="prompt",
                   response_fields="chosen/rejected")
    parsed.record.margin = _margin(row)
    return parsed


def _pref_opa_dpo(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    """OPA-DPO saved set: the expert-corrected response beats the model's own original one."""
    prompt = [Message("user", _text(row.get("queries"), "queries"))]
    responses = _responses([row.get("AI_pseudo_response"), row.get("original_generate_response")],
                           "AI_pseudo_response/original_generate_response")
    return _pref(row, ref, prompt, responses, _opa_images(row), "image_bytes", _facts(row), text_field="queries",
                 response_fields="AI_pseudo_response/original_generate_response")


def _is_feedback_mix(r: dict) -> bool:
    conv = r.get("conversations")
    return isinstance(conv, str) or (_is_ranked(r) and "preference_values" in conv[-1])


PREFERENCE_FORMATS = [
    Format("vision_feedback_mix", "vision-feedback-mix-binarized: image, conversations (JSON text, last turn "
           "has preference_values [preferred, dispreferred])", _is_feedback_mix, _pref_ranked),
    Format("llava_rlhf", "LLaVA-RLHF: image, conversations, output_1, output_2, preference (1|2)",
           lambda r: {"output_1", "output_2", "preference"} <= r.keys(), _pref_llava_rlhf, context=("captions",)),
    Format("rlaif_v", "RLAIF-V: image {bytes, path}, question, chosen, rejected",
           lambda r: {"question", "chosen", "rejected"} <= r.keys(), _pref_rlaif_v),
    Format("opa_dpo", "OPA-DPO (save_to_disk): queries, image_bytes, AI_pseudo_response (chosen), "
           "original_generate_response (rejected)",
           lambda r: {"queries", "AI_pseudo_response", "original_generate_response"} <= r.keys(), _pref_opa_dpo),
    Format("trl_preference", "TRL preference: images, prompt, chosen, rejected (message lists or text)",
           lambda r: {"prompt", "chosen", "rejected"} <= r.keys(), _pref_trl),
    Format("ranked_list", "Vision-LLM-Alignment / embedded world: image, conversations whose last gpt value "
           "is a list [best, ..., worst], optional facts", lambda r: isinstance(r.get("conversations"), list),
           _pref_ranked),
]


# ---------------------------------------------------------------- prompt formats

def _reference(value: Any, field: str) -> str | None:
    """A prompt's optional reference answer: text, or None when absent or blank; any other value is a bad row
    (it was dropped without a word)."""
    if value is not None and not isinstance(value, str):
        raise RowProblem(field, f"expected text, got {type(value).__name__}")
    return value if value and value.strip() else None


def _prompt_conversations(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    turns = _llava_turns(row)
    reference = None
    if turns[-1][0] == "assistant":  # the optional reference answer
        last = len(turns) - 1
        turn = turns.pop()[1]
        key = "preference_values" if "preference_values" in turn else "value"
        value = turn.get(key)
        value = value[0] if isinstance(value, list) and value else value
        reference = _reference(value, f"conversations[{last}].{key}")
    prompt = _llava_messages(turns, "conversations", end="user")
    images, field = _llava_images(row, ctx)
    _place_images(prompt, len(images), "conversations")
    facts = _facts(row)
    if ctx.get("captions") is not None:  # Fact-RLHF's PPO: the same factual block as its reward model's training
        facts = list(facts or []) + caption_facts(images, field, ctx) + _answer_fact(row)
    record = PromptRecord(_row_id(row, ref, "id"), prompt, reference=reference, facts=facts or None,
                          meta=_answer_meta(row), source=ref, prompt_field="conversations")
    return ParsedRow(record, images, field)


def _prompt_trl(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    prompt, inline = _trl_messages(_need(row, "prompt"), "prompt", end="user")
    images, field = _trl_images(row, inline)
    _place_images(prompt, len(images), "prompt")
    return ParsedRow(PromptRecord(_row_id(row, ref, "id"), prompt, facts=_facts(row), meta=_answer_meta(row),
                                  source=ref, prompt_field="prompt"), images, field)


def _prompt_opa(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    """OPA set rows as prompts to roll out: the ground truth (standard_response) is the reference answer."""
    prompt = [Message("user", _text(_need(row, "queries"), "queries"))]
    images = _opa_images(row)
    _place_images(prompt, len(images), "queries")
    reference = _reference(row.get("standard_response"), "standard_response")
    return ParsedRow(PromptRecord(_row_id(row, ref, "id"), prompt, reference=reference, facts=_facts(row),
                                  meta=_answer_meta(row), source=ref, prompt_field="queries"), images, "image_bytes")


_QUESTION_KEYS = ("text", "question", "query")
_IMAGE_KEYS = ("image", "image_path", "images")


def _prompt_question(row: dict, ref: RowRef, ctx: dict) -> ParsedRow:
    """LLaVA-style question / benchmark files; every other field goes to meta."""
    key = next((k for k in _QUESTION_KEYS if k in row), None)
    if key is None:
        raise RowProblem("|".join(_QUESTION_KEYS), "missing field")
    prompt = [Message("user", _text(row[key], key))]
    images, field = _llava_images(row, ctx)
    if not images and row.get("image_src"):
        raise RowProblem("image_src", "only an image URL; nothing is downloaded here: give 'image' or "
                                      "'image_path' relative to the image root")
    _place_images(prompt, len(images), key)
    meta = {k: v for k, v in row.items() if k not in (key, "facts", *_IMAGE_KEYS)}
    record = PromptRecord(question_id(row, ref.row), prompt, facts=_facts(row), meta=meta, source=ref,
                          prompt_field=key)
    return ParsedRow(record, images, field)


def question_id(row: dict, index: int) -> str:
    """A question's id: its question_id, else its id (AMBER), else its row index (0-based, as `read_table` numbers
    rows: RLAIF-V keys its answers to its Object HalBench file so). Not image_id: several questions about one
    image would share an id (and an answer). Predict's answers and the benchmarks' scoring both key questions by
    it, so the answers to a raw benchmark file join its questions."""
    for k in ("question_id", "id"):
        if row.get(k) is not None:
            return str(row[k])
    return str(index)


PROMPT_FORMATS = [
    Format("conversations", "Vision-LLM-Alignment / LLaVA-RLHF PPO prompts: image, conversations [human, optional "
           "gpt reference]", lambda r: isinstance(r.get("conversations"), (list, str)), _prompt_conversations,
           context=("captions",)),
    Format("trl_prompt", "TRL prompt-only: prompt (messages or text), images",
           lambda r: "prompt" in r, _prompt_trl),
    Format("opa", "OPA-DPO's OPA set: queries, image_bytes, standard_response (the reference)",
           lambda r: "queries" in r, _prompt_opa),
    Format("questions", "LLaVA question / benchmark file: question_id, image, text|question|query, any other "
           "fields (kept as meta)", lambda r: any(k in r for k in _QUESTION_KEYS), _prompt_question),
]
KINDS = {"SFT": SFT_FORMATS, "preference": PREFERENCE_FORMATS, "prompt": PROMPT_FORMATS}
def read_sft(paths, image_root: str | None, report: BadRowReport | None = None) -> list[ConversationRecord]:
    """SFT conversations: LLaVA-Instruct or TRL `messages` files (preference files are refused)."""
    return read_records(KINDS, "SFT", paths, image_root, report, {})


def read_captions(captions_file: str | None) -> dict:
    """The read context of a captions file (Fact-RLHF image_to_caption.json: image -> captions), or {}."""
    if not captions_file:
        return {}
    try:
        with open(captions_file, encoding="utf-8-sig") as f:
            captions = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:  # OSError: missing, a folder, unreadable
        raise DataFormatError(f"{captions_file}: not a JSON file of captions ({err})") from None
    if not isinstance(captions, dict):
        raise DataFormatError(f"{captions_file}: expected a JSON object image id -> list of captions")
    return {"captions": captions}


def read_preferences(paths, image_root: str | None, report: BadRowReport | None = None,
                     captions_file: str | None = None) -> list[PreferenceRecord]:
    """Ranked responses, best first. `captions_file` (Fact-RLHF image_to_caption.json: image -> captions)
    adds each LLaVA-RLHF row's captions to its facts; a file of any other format is refused with it,
    as no other format can use them."""
    return read_records(KINDS, "preference", paths, image_root, report, read_captions(captions_file))


def read_prompts(paths, image_root: str | None, report: BadRowReport | None = None,
                 captions_file: str | None = None) -> list[PromptRecord]:
    """Prompts for PPO rollouts and prediction (optional reference answer, facts, benchmark meta).
    `captions_file`: for conversation rows (LLaVA-RLHF's PPO prompts), each image's captions and a multiple-choice
    row's "correct answer: <option>" join its facts, as read_preferences gives them to the reward model's training;
    a file of any other format is refused with it."""
    return read_records(KINDS, "prompt", paths, image_root, report, read_captions(captions_file))


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
