"""POPE (three splits, reference parsing) and AMBER (generative + discriminative) on hand-worked cases."""
import json

import pytest

from eval.amber import RuleNouns, amber_metrics, score_generative
from eval.benchmark import main as bench_main
from eval.pope import LLAVA_SUFFIX, parse_yes_no


def test_pope_parsing_rule_edge_cases():
    assert parse_yes_no("No") == "no" and parse_yes_no("no.") == "no"
    assert parse_yes_no("Yes, it is not a dog.") == "no"        # "not" before the first '.'
    assert parse_yes_no("NO") == "yes"                          # tokens are case-sensitive
    assert parse_yes_no("No, there is none.") == "no"           # the comma is removed first
    assert parse_yes_no("There is a dog. No cat.") == "yes"     # only the first sentence counts
    assert parse_yes_no("no\nthere is none") == "yes"           # split on spaces only: "no\nthere"


def test_pope_metrics_hand_worked_with_more_false_positives_than_false_negatives():
    """preds yes yes yes no, labels yes no no yes: tp 1, fp 2, tn 0, fn 1. POPE: precision tp / (tp + fp) = 1/3,
    recall tp / (tp + fn) = 1/2, F1 2 P R / (P + R) = 0.4, accuracy 1/4, yes ratio (predicted yes) 3/4. (The
    split files above have fp = fn in every split, where precision and recall cannot be told apart.)"""
    from eval.pope import pope_metrics
    m = pope_metrics(["yes", "yes", "yes", "no"], ["yes", "no", "no", "yes"])
    assert m == {"accuracy": 0.25, "precision": pytest.approx(1 / 3), "recall": 0.5, "f1": pytest.approx(0.4),
                 "yes_ratio": 0.75, "n": 4}


def _pope(tmp_path):
    d = tmp_path / "pope"
    d.mkdir()
    labels = {"random": ["yes", "yes", "no", "no"], "popular": ["yes", "no"], "adversarial": ["yes", "no"]}
    answers = {"random": ["Yes, there is.", "No.", "No, there is not.", "Yes"],  # yes no no yes: tp fn tn fp
               "popular": ["There is a dog.", "I do not see one."],            # yes no: tp tn
               "adversarial": ["no", "yes"]}                                   # no yes: fn fp
    files = []
    for split, ls in labels.items():
        (d / f"coco_pope_{split}.json").write_text("".join(
            json.dumps({"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg",
                        "text": "Is there a dog in the image?", "label": lab}) + "\n" for i, lab in enumerate(ls)))
        a = tmp_path / f"ans_{split}.jsonl"
        a.write_text("".join(json.dumps({"question_id": str(i + 1), "text": t}) + "\n"
                             for i, t in enumerate(answers[split])))
        files.append(f"{split}={a}")
    return d, files


def test_pope_three_splits_and_mean_f1(tmp_path):
    d, files = _pope(tmp_path)
    rec = bench_main(["--benchmark", "pope", "--data", str(d), "--answers", *files, "--output_dir",
                      str(tmp_path / "run")])
    s = rec["details"]["splits"]
    assert s["random"]["accuracy"] == 0.5 and s["random"]["f1"] == 0.5 and s["random"]["yes_ratio"] == 0.5
    assert s["popular"]["f1"] == 1.0 and s["adversarial"]["f1"] == 0.0 and s["adversarial"]["accuracy"] == 0.0
    assert rec["metrics"]["f1_mean"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert rec["metrics"]["accuracy_mean"] == pytest.approx(0.5)
    assert rec["details"]["prompt_suffix"] == LLAVA_SUFFIX


def test_pope_questions_get_llava_suffix(tmp_path):
    from eval.benchmark import build_parser
    from eval.pope import questions
    d, _ = _pope(tmp_path)
    args = build_parser().parse_args(["--benchmark", "pope", "--data", str(d)])
    assert questions(args)["random"][0]["text"] == "Is there a dog in the image?" + LLAVA_SUFFIX
    args = build_parser().parse_args(["--benchmark", "pope", "--data", str(d), "--pope_suffix", ""])
    assert questions(args)["random"][0]["text"] == "Is there a dog in the image?"


def test_amber_rule_nouns_homographs():
    nouns = RuleNouns({"can", "watch", "dog", "man", "woman"})
    # modal "can" and the verb after it are not nouns; "soda can" is; "women" -> "woman" but "men" stays "men" (a
    # WordNet noun of its own, as inference.py's WordNetLemmatizer leaves it); case is kept
    assert nouns("You can watch a dog, two men, two women and a soda can. Dog") == ["dog", "woman", "can"]


def test_amber_rule_nouns_after_to():
    """A word after "to" is a verb only as a bare infinitive; plurals and prepositional "to" keep nouns."""
    nouns = RuleNouns({"dog", "tree", "water", "person", "building", "play", "frisbee", "ride", "skateboard",
                       "boy", "plant", "fence", "swim"})
    assert nouns("A dog next to trees and close to water, people walk to buildings.") == \
        ["dog", "tree", "water", "building"]  # WordNet keeps "people" (no vocabulary word here)
    assert nouns("A dog wants to play frisbee and to swim.") == ["dog", "frisbee"]
    assert nouns("A boy is going to ride a skateboard.") == ["boy", "skateboard"]
    assert nouns("He likes to water the plants next to the fence.") == ["plant", "fence"]
    assert nouns("The fence leads to water due to trees.") == ["fence", "water", "tree"]


def test_amber_generative_marking():
    assoc = {"person": ["man", "woman"], "car": ["vehicle"]}
    # man covers person through its association; vehicle marks the hallu target car and is hallucinated
    flags, cover, cog = score_generative(["man", "vehicle"], ["person"], ["car"], assoc, set())
    assert (flags, cover, cog) == ([0, 1], [1], [1])


def _amber(tmp_path):
    d = tmp_path / "amber"
    (d / "query").mkdir(parents=True)
    relation = {"dog": ["puppy"], "person": ["man", "woman"], "cat": [], "car": ["vehicle"], "grass": ["ground"],
                "frisbee": [], "sky": []}
    ann = [{"id": 1, "type": "generative", "truth": ["dog", "grass"], "hallu": ["cat", "frisbee"]},
           {"id": 2, "type": "generative", "truth": ["person"], "hallu": ["car"]},
           {"id": 3, "type": "discriminative-hallucination", "truth": "no"},
           {"id": 4, "type": "discriminative-attribute-state", "truth": "yes"},
           {"id": 5, "type": "discriminative-relation", "truth": "no"},
           {"id": 6, "type": "discriminative-hallucination", "truth": "yes"}]
    (d / "relation.json").write_text(json.dumps(relation))
    (d / "annotations.json").write_text(json.dumps(ann))
    (d / "safe_words.txt").write_text("sky\n")
    (d / "query" / "query_all.json").write_text(json.dumps(
        [{"id": i, "image": f"AMBER_{i}.jpg", "query": "Describe this image." if i < 3 else "Is there a dog?"}
         for i in range(1, 7)]))
    responses = ["A puppy runs on the grass with a frisbee under the sky.",  # puppy grass frisbee(hal) sky(safe)
                 "A woman and a man.",                                      # both cover person
                 "No", "Yes", "No, it is not.", "No"]                       # right, right, not exact, wrong
    return d, relation, ann, responses


def test_amber_hand_worked(tmp_path):
    d, relation, ann, responses = _amber(tmp_path)
    items = [{"id": i} for i in range(1, 7)]
    nouns = RuleNouns(set(relation) | {w for ws in relation.values() for w in ws})
    m, details, per = amber_metrics(items, responses, ann, relation, {"sky"}, nouns)
    assert per[0]["nouns"] == ["puppy", "grass", "frisbee", "sky"]
    assert m["CHAIR"] == pytest.approx(1 / 6)   # 1 hallucinated of 4 + 2 candidate nouns (safe words count)
    assert m["Cover"] == pytest.approx(3 / 3)   # dog (via puppy), grass, person (via woman)
    assert m["Hal"] == pytest.approx(1 / 2)     # response 1 hallucinates, response 2 does not
    assert m["Cog"] == pytest.approx(1 / 3)     # frisbee of {cat, frisbee, car}
    # discriminative, positive class "No": 2 of 4 exact answers right; answered No 2x (1 right); truth No 2x (1 found)
    assert (m["accuracy"], m["precision"], m["recall"], m["F1"]) == pytest.approx((0.5, 0.5, 0.5, 0.5))
    assert m["existence_F1"] == pytest.approx(2 * 0.5 * 1 / 1.5)  # P 1/2, R 1/1
    assert m["AMBER_score"] == pytest.approx(0.5 * (1 - 1 / 6 + 0.5))
    printout = details["reference_printout"]
    assert printout["generative"]["CHAIR"] == 16.7 and printout["discriminative"]["F1"] == 50.0


def test_amber_benchmark_reads_published_files(tmp_path):
    d, _, _, responses = _amber(tmp_path)
    ans = tmp_path / "amber_answers.json"  # AMBER's own response format
    ans.write_text(json.dumps([{"id": i + 1, "response": r} for i, r in enumerate(responses)]))
    rec = bench_main(["--benchmark", "amber", "--data", str(d), "--answers", str(ans),
                      "--output_dir", str(tmp_path / "run")])
    assert rec["metrics"]["CHAIR"] == pytest.approx(1 / 6) and rec["metrics"]["F1"] == pytest.approx(0.5)
    assert len(rec["dataset"]["files_sha256"]) == 4


def test_amber_counts_and_warns_non_yes_no_answers(tmp_path, capsys):
    """Scoring stays exact (the reference's), but answers that are neither "Yes" nor "No" are counted and said."""
    d, _, _, responses = _amber(tmp_path)
    ans = tmp_path / "amber_answers.json"
    ans.write_text(json.dumps([{"id": i + 1, "response": r} for i, r in enumerate(responses)]))
    rec = bench_main(["--benchmark", "amber", "--data", str(d), "--answers", str(ans),
                      "--output_dir", str(tmp_path / "run")])
    assert rec["metrics"]["disc_not_yes_no"] == 1 and rec["metrics"]["accuracy"] == pytest.approx(0.5)
    err = capsys.readouterr().err
    assert "warning: AMBER: 1 of 4 discriminative answers" in err and "--amber_disc_suffix" in err
    assert rec["details"]["warnings"] and [p["yes_no"] for p in _per(rec) if "yes_no" in p] == [True, True, False, True]
    exact = [r if r in ("Yes", "No") else "No" for r in responses]
    ans.write_text(json.dumps([{"id": i + 1, "response": r} for i, r in enumerate(exact)]))
    rec = bench_main(["--benchmark", "amber", "--data", str(d), "--answers", str(ans),
                      "--output_dir", str(tmp_path / "run2")])
    assert rec["metrics"]["disc_not_yes_no"] == 0 and rec["details"]["warnings"] == []
    assert "warning" not in capsys.readouterr().err


def _per(rec):
    from pathlib import Path
    path = Path(rec["results_file"]).with_suffix(".per_question.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_amber_suffix_only_on_discriminative_questions(tmp_path):
    from eval.amber import questions
    from eval.benchmark import build_parser
    d, _, _, _ = _amber(tmp_path)
    args = build_parser().parse_args(["--benchmark", "amber", "--data", str(d), "--amber_disc_suffix", " Yes or No?"])
    texts = [q["text"] for q in questions(args)[""]]
    assert texts[:3] == ["Describe this image.", "Describe this image.", "Is there a dog? Yes or No?"]
    # by default LLaVA's short-answer instruction, as POPE's (without one a chat model's "Yes, there is a dog."
    # counted as wrong and F1 / AMBER_score fell toward 0)
    from eval.pope import LLAVA_SUFFIX
    default = build_parser().parse_args(["--benchmark", "amber", "--data", str(d)])
    assert [q["text"] for q in questions(default)[""]][:3] == ["Describe this image.", "Describe this image.",
                                                                "Is there a dog?" + LLAVA_SUFFIX]


def test_pope_with_a_split_missing_warns_and_says_how_many(tmp_path, capsys):
    """LLaVA-1.5's headline is F1 averaged over the three splits: a folder with fewer was averaged silently."""
    d, files = _pope(tmp_path)
    (d / "coco_pope_adversarial.json").unlink()
    rec = bench_main(["--benchmark", "pope", "--data", str(d), "--answers", *files[:2], "--output_dir",
                      str(tmp_path / "run")])
    assert rec["metrics"]["n_splits"] == 2 and rec["metrics"]["f1_mean"] == pytest.approx((0.5 + 1) / 2)
    assert "not adversarial" in capsys.readouterr().err


def test_scoring_answers_records_the_decoding_they_were_made_with(tmp_path):
    d, files = _pope(tmp_path)
    argv = ["--benchmark", "pope", "--data", str(d), "--answers", *files, "--output_dir", str(tmp_path / "run")]
    assert bench_main(argv)["decoding"]["mode"].startswith("unknown")  # no settings files beside the answers
    greedy = {"num_beams": 1, "max_new_tokens": 128, "do_sample": False, "mode": "greedy", "precision": "fp32"}
    for f in files:  # what eval.answers.generate writes beside each answer file
        (tmp_path / f.split("=")[1]).with_suffix(".settings.json").write_text(json.dumps({"decoding": greedy}))
    assert bench_main(argv)["decoding"] == {**greedy, "from": "the answers' settings files"}
    (tmp_path / "ans_popular.settings.json").write_text(json.dumps({"decoding": {**greedy, "num_beams": 3}}))
    assert "different decodings" in bench_main(argv)["decoding"]["mode"]


def test_amber_attribute_printout_starts_its_denominators_at_three_counters():
    """inference.py sums the state, number and action counters for attribute, each starting at 0.001."""
    kinds = ("state", "number", "action")
    ann = [{"id": i + 1, "type": f"discriminative-attribute-{kinds[i % 3]}", "truth": "yes"} for i in range(2001)]
    responses = ["Yes"] * 1996 + ["No"] * 5
    _, details, _ = amber_metrics([{"id": a["id"]} for a in ann], responses, ann, {}, set(), RuleNouns(set()))
    assert details["reference_printout"]["attribute"]["Accuracy"] == 99.7  # 1996 / 2001.003; 99.8 with 2001.001
    assert details["reference_printout"]["discriminative"]["Accuracy"] == 99.8  # 1996 / 2001.001


def test_scoring_answers_made_for_other_questions_is_refused(tmp_path):
    """Answers made without LLaVA's suffix (--pope_suffix '') were scored with it when given by --answers: the
    results file said they answered questions with the suffix. Their settings file records the questions' sha256."""
    import hashlib

    from eval.answers import AnswersMismatch, question_lines
    from eval.pope import questions
    d, files = _pope(tmp_path)
    plain = questions(type("A", (), {"data": str(d), "pope_suffix": ""})())
    for f in files:  # what eval.answers.generate writes beside each answer file, for the questions it asked
        split, path = f.split("=")
        sha = hashlib.sha256(question_lines(plain[split]).encode()).hexdigest()
        (tmp_path / path).with_suffix(".settings.json").write_text(json.dumps({"questions_sha256": sha}))
    argv = ["--benchmark", "pope", "--data", str(d), "--answers", *files, "--output_dir", str(tmp_path / "run")]
    with pytest.raises(AnswersMismatch, match="other questions"):
        bench_main(argv)  # the default suffix: LLaVA's
    assert bench_main([*argv, "--pope_suffix", ""])["details"]["prompt_suffix"] == ""


def test_amber_uncovered_objects_repeated_nouns_other_nouns_and_the_printouts_denominators(tmp_path):
    """The hand-worked set covers every truth object, has no noun outside the relation vocabulary, and equal
    precision and recall: marking a repeated first truth object as the next one, starting every truth object
    covered, keeping nouns outside the vocabulary, swapping precision and recall, or inference.py's printout
    without its 0.001 starts (Hal; existence's F1 epsilon 0.001, the others' 0.0001) all passed."""
    # "dog" twice covers dog only; grass stays uncovered; cat is never mentioned
    assert score_generative(["dog", "dog"], ["dog", "grass"], ["cat"], {"dog": [], "grass": [], "cat": []},
                            set()) == ([0, 0], [1, 0], [0])
    d, relation, ann, responses = _amber(tmp_path)
    vocab = set(relation) | {w for ws in relation.values() for w in ws}
    responses[1] = "A woman and a man at a table."  # table: a noun, but not in relation.json
    _, details, per = amber_metrics([{"id": i} for i in range(1, 7)], responses, ann, relation, {"sky"},
                                    RuleNouns(vocab | {"table"}))
    assert per[1]["nouns"] == ["woman", "man"]
    existence = details["discriminative"]["existence"]  # answered No twice (one right); its one No found
    assert (existence["precision"], existence["recall"]) == pytest.approx((0.5, 1.0))
    one = [{"id": 1, "type": "generative", "truth": ["dog"], "hallu": []}]
    _, details, _ = amber_metrics([{"id": 1}], ["Nothing here."], one, {"dog": []}, set(), RuleNouns({"dog"}))
    assert details["reference_printout"]["generative"]["Hal"] == 0.1  # 100 - 1 / 1.001 * 100
    truths, answers = ("yes", "yes", "no", "no"), ("No", "No", "Yes", "No")
    ann = [{"id": i + 1, "type": "discriminative-hallucination", "truth": t} for i, t in enumerate(truths)]
    _, details, _ = amber_metrics([{"id": a["id"]} for a in ann], list(answers), ann, {}, set(), RuleNouns(set()))
    printout = details["reference_printout"]  # P 1/3, R 1/2: F1 .2 / (.833 + eps)
    assert (printout["existence"]["F1"], printout["discriminative"]["F1"]) == (39.9, 40.0)
