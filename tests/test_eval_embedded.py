"""Embedded-world scoring and POPE's parsing on hand-made cases with hand-worked numbers."""
import json

import pytest

from eval.embedded import chair, first_number, mentioned_kinds, question_record, score_answers, score_rows
from eval.pope import parse_yes_no, pope_metrics


def test_mentions_singular_plural_distinct():
    assert mentioned_kinds("Two circles, one circle and three crosses.") == ["circle", "cross"]
    assert mentioned_kinds("nothing here") == []


def test_mentions_are_words_as_the_reference_scorer_splits_them():
    """CHAIR's tokenizer keeps a hyphenated word whole (eval.nouns, as NLTK's): "star-shaped" names no star. The
    embedded scorer split at every non-letter and counted a hallucinated star here (CHAIR_s 1.0, CHAIR_i 1/3)."""
    text = "One red cross-shaped sign and a star-shaped red cross. The cross's arms."
    assert mentioned_kinds(text) == ["cross"]
    m = chair([text], [["cross"]])
    assert m["CHAIRs"] == 0 and m["CHAIRi"] == 0 and m["recall"] == 1


def test_chair_hand_worked():
    responses = ["one red circle and two stars.",  # star hallucinated: 1 of 2 mentions
                 "three squares.",                  # correct
                 "a cat."]                          # mentions nothing
    gt = [["circle"], ["square", "triangle"], ["diamond"]]
    m = chair(responses, gt)
    assert m["CHAIRi"] == pytest.approx(1 / 3)        # 1 hallucinated of 3 mentions
    assert m["CHAIRs"] == pytest.approx(1 / 3)        # 1 of 3 responses
    assert m["CHAIRs_refine"] == pytest.approx(1 / 2)  # 1 of 2 responses that mention objects
    assert m["recall"] == pytest.approx(2 / 4)        # circle + square of 4 GT kinds
    # every mention counts for CHAIR_i (benchmarks.md; eval.chair), distinct kinds for CHAIR_s and recall
    m = chair(["one red circle and one blue star. The star is big. Another star."], [["circle"]])
    assert m["CHAIRi"] == pytest.approx(3 / 4) and m["CHAIRs"] == 1 and m["recall"] == 1


def test_question_records_hand_worked():
    """The per-question rows (eval_embedded.per_question.jsonl was written empty): what each answer was scored as."""
    r = question_record("objhal", {"question_id": "7", "gt_objects": ["circle", "square"]},
                        "Two stars and a circle. The star is big.")
    assert r["mentioned"] == ["star", "circle"] and r["hallucinated"] == ["star", "star"]
    assert r["missed"] == ["square"] and r["n_mentions"] == 3 and r["answer"].startswith("Two stars")
    assert question_record("pope_random", {"question_id": "1", "label": "no"}, "Yes, there is.")["pred"] == "yes"
    assert question_record("count", {"question_id": "2", "count": 3}, "There are two.")["pred"] == 2


def test_pope_parsing_rule():
    assert parse_yes_no("No, there is no star.") == "no"
    assert parse_yes_no("Yes, there is a star.") == "yes"
    assert parse_yes_no("There is not a star") == "no"
    assert parse_yes_no("Yes. No star though") == "yes"  # cut at the first '.'
    assert parse_yes_no("Nope") == "yes"  # only the tokens No / not / no count


def test_pope_metrics_hand_worked():
    m = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    # tp=2 fp=1 tn=1 fn=1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(3 / 5)


def test_count_and_missing_answers(tmp_path):
    assert first_number("There are three stars.") == 3 and first_number("2 stars") == 2
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "count": c}) + "\n" for i, c in [("a", 2), ("b", 1)]))
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"question_id": "a", "text": "There are two circles."}) + "\n")
    with pytest.raises(ValueError, match="1 questions have no answer"):
        score_answers("count", q, a)
    with a.open("a") as f:
        f.write(json.dumps({"question_id": "b", "text": "There are three."}) + "\n")
    assert score_answers("count", q, a)["accuracy"] == pytest.approx(0.5)
    assert score_rows("count", [], {}) == {"accuracy": 0.0, "n": 0}  # was a ZeroDivisionError


def test_a_subset_run_keeps_the_all_benchmark_results(world, tiny, tmp_path):
    """python -m eval.run_embedded --benches X wrote the model's eval_embedded.json, the all-benchmark results
    eval.report reads, with X alone (and deleted those answers)."""
    import shutil

    from eval.run_embedded import main
    model = tmp_path / "m"
    shutil.copytree(tiny, model)
    full = model / "eval_embedded.json"
    full.write_text('{"stand-in": "the all-benchmark results"}')
    main(["--models", str(model), "--world", str(world), "--benches", "count", "--no-progress"])
    assert full.read_text() == '{"stand-in": "the all-benchmark results"}'
    assert json.loads((model / "eval_embedded_count.json").read_text())["details"]["results"].keys() == {"count"}
    per = [json.loads(x) for x in (model / "eval_embedded_count.per_question.jsonl").read_text().splitlines()]
    questions = [json.loads(x) for x in (world / "bench_count.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in per] == [str(q["question_id"]) for q in questions]
    right = sum(r["pred"] == r["count"] for r in per) / len(per)
    assert right == pytest.approx(json.loads((model / "eval_embedded_count.json").read_text())["metrics"]["count/accuracy"])
