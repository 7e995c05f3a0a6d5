"""The ground-truth expert's minimal corrections (training.dpo.opa.gt_edit): a bad sentence corrected in place,
what was right kept word for word, and the reference answer where a sentence does not read as a list."""
from training.dpo.opa.expert import GroundTruthReviser, revise
from training.dpo.opa.gt_edit import attributes, correct_sentence, fact_phrases, read_items

GT = "The image shows one blue circle and three crosses (red and blue) on a cyan background."
FACTS = ["The image contains one blue circle.", "The image contains three crosses (red and blue).",
         "The image contains no squares."]
PHRASES = fact_phrases(FACTS)


def test_fact_phrases_read_each_present_kind():
    assert {k: (i.count, i.text) for k, i in PHRASES.items()} == {"circle": (1, "one blue circle"),
                                                                   "cross": (3, "three crosses (red and blue)")}
    assert fact_phrases(["The image contains no stars.", "Something else."]) == {}


def test_read_items_splits_lead_items_and_tail():
    lead, items, tail = read_items("the image shows one red circle, two squares ( red and green ) and one star "
                                   "on a white background.")
    assert lead == "the image shows " and tail == " on a white background."
    assert [(i.kind, i.count, i.text) for i in items] == [
        ("circle", 1, "one red circle"), ("square", 2, "two squares ( red and green )"), ("star", 1, "one star")]
    assert read_items("one red circle next to one star.") is None  # not a list: "next to" joins them
    assert read_items("one red circle and two circles.") is None  # a kind twice: which one is meant?
    assert read_items("a red circle.") is None  # no count
    assert attributes("three crosses ( red and purple )") == ["red", "purple"]


def test_a_bad_item_is_corrected_and_the_rest_kept_as_written():
    kinds = {"circle", "cross"}
    s = "the image shows one blue circle, one black square and two crosses ( red and blue ) on a cyan background."
    text, errors = correct_sentence(s, kinds, PHRASES)
    assert text == "the image shows one blue circle and three crosses (red and blue) on a cyan background."
    assert errors == [(1, "square", "square is not in the image"), (2, "cross", "the image holds 3 cross(s)")]
    right = "the image shows one blue circle and three crosses ( red and blue ) on a cyan background."
    assert correct_sentence(right, kinds, PHRASES) == (right, [])  # the rollout's own spacing kept
    colours = "the image shows one green circle and three crosses ( blue and red ) on a cyan background."
    text, errors = correct_sentence(colours, kinds, PHRASES)
    assert text == "the image shows one blue circle and three crosses ( blue and red ) on a cyan background."
    assert errors == [(2, "circle", "the circles are blue")]  # the crosses' colours, in another order, are right
    text, errors = correct_sentence("the image shows one blue circle on a cyan background.", kinds, PHRASES,
                                    add=["cross"])
    assert text == GT.replace("The", "the") and errors == [(3, "cross", "leaves out cross")]
    assert correct_sentence("the image shows one blue circle.", kinds, PHRASES, add=["star"]) is None  # no phrase
    assert correct_sentence("the image shows one blue circle and a red star.", kinds, PHRASES) is None  # uncounted


def test_minimal_reviser_reports_and_revises_in_place():
    g = GroundTruthReviser("minimal")
    rollout = "the image shows one blue circle, one red square and three crosses ( red and blue ) on a cyan background."
    rep = g.review(rollout, GT, FACTS)
    assert [(r["score"], r["object"], r["error_type"]) for r in rep] == [(1, "square", "image_recognition_error")]
    assert revise(rep) == "the image shows one blue circle and three crosses ( red and blue ) on a cyan background."
    two = g.review("The image shows one blue circle. It has three crosses (red and blue) and one star.", GT, FACTS)
    assert [r["score"] for r in two] == [4, 1]
    assert revise(two) == "The image shows one blue circle. It has three crosses (red and blue)."
    omit = g.review("The image shows one blue circle. It is on a cyan background.", GT, FACTS)
    assert [r["score"] for r in omit] == [3, 4]
    assert revise(omit) == "The image shows one blue circle and three crosses (red and blue). It is on a cyan background."
    ok = g.review(GT, GT, FACTS)
    assert [r["score"] for r in ok] == [4] and revise(ok) == GT


def test_a_response_that_is_no_list_gets_the_reference_answer():
    g, ref = GroundTruthReviser("minimal"), GroundTruthReviser()
    odd = "The image shows a blue circle and one red square on a cyan background."  # "a blue circle": no count
    assert g.review(odd, GT, FACTS) == ref.review(odd, GT, FACTS)
    assert revise(g.review(odd, GT, FACTS)) == GT
    bare = "There is one red square."  # every object it names is absent: the reference replaces it
    assert revise(g.review(bare, GT, FACTS)) == "There is one blue circle and three crosses (red and blue)."
    assert revise(ref.review(bare, GT, FACTS)) == GT
    assert revise(g.review(bare, GT, [])) == GT  # no facts: nothing to correct against


def test_the_revision_is_part_of_the_experts_identity(tmp_path):
    from training.dpo.opa.main import expert_identity, make_expert, parse
    base = ["--from_checkpoint", "x"]
    assert make_expert(parse(base), tmp_path).revision == "reference"
    assert make_expert(parse(base + ["--revision", "minimal"]), tmp_path).revision == "minimal"
    assert expert_identity(parse(base)) != expert_identity(parse(base + ["--revision", "minimal"]))
    assert expert_identity(parse(base)) == ["ground_truth"]  # the default's: earlier work folders' reports stay valid
