"""Preference formats: ranked lists (Vision-LLM-Alignment, the embedded world, vision-feedback-mix), LLaVA-RLHF,
RLAIF-V, OPA-DPO's saved set, TRL preference rows (see /work/shared/reference/data_formats.md); each a row parser run
by `readers.read_records`, the responses ranked best first."""
from __future__ import annotations

import math
import numbers

from training.data.captions import caption_facts
from training.data.readers import Format, ParsedRow, RowProblem
from training.data.records import Message, PreferenceRecord, RowRef
from training.data.row_parts import (_answer_fact, _facts, _is_ranked, _llava_images,
                                     _llava_messages, _llava_turns, _need, _opa_images, _place_images, _responses,
                                     _row_id, _text, _trl_images, _trl_messages, _trl_response)
from training.data.span_weights import span_weights


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
