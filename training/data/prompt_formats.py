"""Prompt formats: conversations (Vision-LLM-Alignment / LLaVA-RLHF PPO prompts), TRL prompt-only rows,
OPA-DPO's OPA set, LLaVA question / benchmark files (see /work/shared/reference/data_formats.md); each a row parser
run by `readers.read_records`."""
from __future__ import annotations

from typing import Any

from training.data.captions import caption_facts
from training.data.readers import Format, ParsedRow, RowProblem
from training.data.records import Message, PromptRecord, RowRef
from training.data.row_parts import (_answer_fact, _answer_meta, _facts, _llava_images,
                                     _llava_messages, _llava_turns, _need, _opa_images, _place_images, _row_id,
                                     _text, _trl_images, _trl_messages)


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
