"""Per-token weights a preference row may carry for the DPO family's losses (RLAIF-V's option): chosen_weights /
rejected_weights, [[text span, weight], ...] of the best and the second response (training.dpo.weights turns them
into token weights)."""
from __future__ import annotations

import math
import numbers

from training.data.readers import RowProblem

WEIGHT_KEYS = ("chosen_weights", "rejected_weights")  # of the best and the second response


def weights_note(records, user: str) -> str | None:
    """The note for a stage that does not use per-token weights (`user`: the reward model, ORPO) when rows carry
    them: they are not dropped without a word."""
    n = sum(r.weights is not None for r in records)
    return (f"note: {n} row(s) carry {' / '.join(WEIGHT_KEYS)}, which {user} does not use (the sigmoid, cdpo, ipo "
            "and listwise DPO losses do)") if n else None


def span_weights(row: dict, responses: list[str]) -> list[list | None] | None:
    """A row's optional per-token weights: chosen_weights / rejected_weights, each [[text, weight], ...] whose texts
    are spans of that response in order (its other tokens weigh 1); None when the row has neither."""
    if not any(row.get(k) is not None for k in WEIGHT_KEYS):
        return None
    out = []
    for key, text in zip(WEIGHT_KEYS, responses):
        spans = row.get(key)
        if spans is None:
            out.append(None)
            continue
        if not isinstance(spans, list):
            raise RowProblem(key, f"expected a list of [text, weight], got {type(spans).__name__}")
        for j, x in enumerate(spans):
            if not (isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) and x[0].strip()
                    and isinstance(x[1], numbers.Real) and not isinstance(x[1], bool) and math.isfinite(x[1])
                    and x[1] >= 0):  # a negative weight would turn the span's log-probs against its response
                raise RowProblem(f"{key}[{j}]", f"expected [text, finite weight >= 0], got {x!r:.80}")
        j = missing_span(text, spans)
        if j is not None:
            raise RowProblem(f"{key}[{j}]", f"{spans[j][0]!r:.60} is not in the response after the spans before it")
        out.append(spans)
    return out


def missing_span(text: str, spans: list) -> int | None:
    """The index of the first [span, weight] of `spans` whose span, stripped, is not in `text` after the spans before
    it (the rule training.dpo.weights places them by); None when every one is."""
    pos = 0
    for j, (span, _) in enumerate(spans):
        at = text.find(span.strip(), pos)
        if at < 0:
            return j
        pos = at + len(span.strip())
    return None
