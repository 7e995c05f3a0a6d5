"""Per-token weights of a response from weights of its sentences (text spans): OPA-DPO's expert report, and
preference rows' chosen_weights / rejected_weights (RLAIF-V's optional per-token weights)."""
from __future__ import annotations

import torch

from training.data.records import Message


class WeightsNotPlaced(ValueError):
    """A response's [sentence, weight] list that cannot be placed on its tokens: a bad row. sentence: the index of
    the sentence not found in the answer (None: the answer is not found in its encoded response); field: the row's
    field that holds the list, as `weighted_responses` names it."""

    def __init__(self, reason: str, sentence: int | None = None):
        super().__init__(reason)
        self.sentence, self.field = sentence, ""


def weighted_responses(encoder, prompt: list[Message], texts: list[str], sentence_weights: list, responses: list,
                       fields) -> list[torch.Tensor | None]:
    """answer_weights of each response that has a [sentence, weight] list (None: every token weighs 1); a list that
    cannot be placed raises WeightsNotPlaced naming its field (fields[k], with the sentence's index)."""
    out = []
    for text, sw, ids, name in zip(texts, sentence_weights, responses, fields):
        try:
            out.append(None if sw is None else answer_weights(encoder, prompt, text, sw, ids))
        except WeightsNotPlaced as err:
            err.field = name if err.sentence is None else f"{name}[{err.sentence}]"
            raise
    return out


def answer_weights(encoder, prompt: list[Message], text: str, sentence_weights: list, ids: torch.Tensor
                   ) -> torch.Tensor:
    """token_weights of the answer `text` to `prompt`, tokenised as its encoded response `ids` holds it: with the
    template's text around it in its segment (a token may merge the answer's last letters with the text after it:
    ".\\n" of Llama 3's tokenizer under a template that writes a newline after the answer). A template that trims
    the answer (Llama 3.2 Vision's `| trim`) holds it without the whitespace around it."""
    found = encoder.answer_context(prompt + [Message("assistant", text)])
    if found is None and text.strip() != text:
        found = encoder.answer_context(prompt + [Message("assistant", text.strip())])
        text = text if found is None else text.strip()
    context, lead, tail = found or ("", "", "")
    segment = lead + text + tail
    return token_weights(encoder.tokenizer, segment, sentence_weights, ids.tolist(),
                         encoder.text_tokens(segment, context), answer=(len(lead), len(lead) + len(text)))


def _locate(ids: list[int], response_ids: list[int]) -> tuple[int | None, int]:
    """(start, n): where the text's ids lie inside the response ids, whole (n = len(ids)); else, the response
    being cut at max_seq_len, the longest prefix ids[:n] that runs to the end of the response ids."""
    n, size = len(ids), len(response_ids)
    whole = next((j for j in range(size - n + 1) if response_ids[j:j + n] == ids), None)
    if whole is not None or not n:
        return whole, n
    cut = next((j for j in range(max(0, size - n + 1), size) if response_ids[j:] == ids[:size - j]), None)
    return cut, 0 if cut is None else size - cut


def _alone(tokenizer, text: str) -> tuple[list[int], list]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def token_weights(tokenizer, text: str, sentence_weights: list, response_ids: list[int],
                  tokens: tuple[list[int], list] | None = None, answer: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-token weights of one encoded response: each token of `text` gets its sentence's weight (found by
    character offsets), located inside the response ids (the template may add tokens around it, which
    keep weight 1; a response cut at max_seq_len keeps a prefix of the text's tokens, each with its
    weight). tokens: (ids, spans) of `text` as the conversation holds it (`ChatEncoder.text_tokens` of the answer's
    segment after its `answer_context`), else `text` is tokenised alone: alone, an answer written straight after
    the prompt's text would start with a token its response does not hold (SentencePiece's "▁"), and one after a
    space with one the space is not part of (byte-level "ĠThe" is "The" alone); and its last token could be one
    the response merges with the template's text after it (".\\n"). A token stands where its first character
    other than whitespace does: a word token that holds the space before it (SentencePiece's "▁No", byte-level
    "ĠThe") is its sentence's first token, not one between sentences. answer: (start, end) of the answer in `text`
    (the template's text around it, which may hold a span's letters: "ASSISTANT: " and a span "A"); spans are
    found there, stripped, each after the one before it. Raises WeightsNotPlaced where one is not, or where the
    text's tokens are not in the response (a template that rewrites the answer)."""
    w = torch.ones(len(response_ids))
    ids, offsets = tokens or _alone(tokenizer, text)
    start, n = _locate(ids, response_ids)
    if start is None and ids and response_ids:
        raise WeightsNotPlaced("the answer's tokens are not found in its encoded response (does the chat template "
                               "rewrite the answer?), so its weights cannot be placed on them")
    if start is None or n == 0:
        return w
    spans, (pos, end) = [], answer or (0, len(text))
    for j, (sentence, weight) in enumerate(sentence_weights):
        s = text.find(sentence.strip(), pos, end)
        if s < 0:  # (rows are read so that none is: span_weights, OPADataset)
            raise WeightsNotPlaced(f"{sentence!r:.60} is not in the answer after the sentences before it", j)
        spans.append((s, s + len(sentence.strip()), float(weight)))
        pos = s + len(sentence.strip())
    owner = {}  # token -> the span it stands in
    for t, (a, b) in enumerate(offsets[:n]):
        word = text[a:b].lstrip()
        a = b - len(word) if word else a  # (a token of whitespace alone stays where it starts)
        for k, (s, e, weight) in enumerate(spans):
            if s <= a < e:
                w[start + t], owner[t] = weight, k
                break
    for k, (s, e, weight) in enumerate(spans):  # a span no token stands in lies inside one ("uares." of SentencePiece's
        if k not in owner.values():             # "▁squares."): the tokens it overlaps carry it (its weight was lost)
            for t, (a, b) in enumerate(offsets[:n]):
                if a < e and s < b and t not in owner:
                    w[start + t], owner[t] = weight, k
    return w
