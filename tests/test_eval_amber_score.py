"""AMBER's metrics (eval/amber.py amber_metrics) worked by hand where accuracy and F1 differ and a hallucinated noun
is repeated: tests/test_eval_pope_amber.py's hand-worked case has accuracy = F1 = 0.5."""
import pytest

from eval.amber import amber_metrics


def test_amber_score_is_of_f1_and_every_mention_of_a_hallucinated_noun_counts():
    relation = {"dog": ["puppy"], "cat": ["kitten"]}
    ann = [{"id": 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]}] + [
        {"id": i, "type": "discriminative-hallucination", "truth": t} for i, t in ((2, "no"), (3, "no"), (4, "yes"),
                                                                                   (5, "yes"))]
    items = [{"id": i} for i in range(1, 6)]
    responses = ["dog cat cat", "No", "No", "No", "Yes"]
    m, _, per = amber_metrics(items, responses, ann, relation, set(), lambda text: text.split())
    assert per[0]["nouns"] == ["dog", "cat", "cat"] and per[0]["hallucinated"] == ["cat", "cat"]
    assert m["CHAIR"] == pytest.approx(2 / 3)  # inference.py counts each mention: 2 of 3 candidate nouns
    assert (m["Cover"], m["Hal"], m["Cog"]) == pytest.approx((1.0, 1.0, 1.0))
    # positive class "No": 3 of 4 right; answered No 3 times (2 right): P 2/3; truth No twice, both found: R 1
    assert (m["accuracy"], m["precision"], m["recall"]) == pytest.approx((3 / 4, 2 / 3, 1.0))
    assert m["F1"] == pytest.approx(0.8)
    assert m["AMBER_score"] == pytest.approx(0.5 * (1 - 2 / 3 + 0.8))
