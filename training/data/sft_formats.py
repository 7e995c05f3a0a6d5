"""SFT formats: LLaVA-Instruct conversations, TRL conversational and prompt-completion rows, OPA-DPO's OPA set
(see /work/shared/reference/data_formats.md); each a row parser run by `readers.read_records`."""
from __future__ import annotations

from training.data.readers import Format, ParsedRow, RowProblem
from training.data.records import IMAGE_PLACEHOLDER as PH, ConversationRecord, Message, RowRef
from training.data.row_parts import (_is_ranked, _llava_images, _llava_messages, _llava_turns, _need, _opa_images,
                                     _place_images, _row_id, _text, _trl_images, _trl_messages, _trl_response)


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
