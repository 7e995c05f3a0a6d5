"""Object HalBench / CHAIR: tokenizer, lemmatizer, phrase rules and metrics on hand-worked cases."""
import base64
import io
import json

import pytest

from eval.benchmark import main as bench_main
from eval.chair import SYNONYMS, CocoObjects, chair_metrics, load_gt_objects, parse_object_list
from eval.nouns import lemmatize, tokenize


@pytest.fixture(scope="module")
def coco():
    return CocoObjects()


def test_synonym_list_is_the_80_class_list():
    lines = [line.split(", ") for line in SYNONYMS.read_text().splitlines()]
    assert len(lines) == 80
    assert len({w for line in lines for w in line}) == 407  # RLAIF-V's synonyms_refine.txt
    canon = {line[0] for line in lines}
    assert {"person", "dining table", "cell phone", "tv", "sports ball", "tie", "teddy bear"} <= canon


def test_tokenizer_needs_no_data():
    assert tokenize("The dog's toy, a hot-dog.") == ["The", "dog", "'s", "toy", ",", "a", "hot-dog", "."]
    # as NLTK's word_tokenize: a quoted word is a word, "n't" splits off, '/' and '_' join (checked with nltk 3.10)
    assert tokenize("A sign reads 'dog'. Can't") == ["A", "sign", "reads", "'", "dog", "'", ".", "Ca", "n't"]
    assert tokenize("a knife/fork and dog_cat") == ["a", "knife/fork", "and", "dog_cat"]
    assert tokenize("a bird's-eye view") == ["a", "bird's-eye", "view"]  # no bird in it
    # an apostrophe inside a word that is no clitic keeps the word whole: "o'clock" held a hallucinated clock
    assert tokenize("It is 3 o'clock.") == ["It", "is", "3", "o'clock", "."]
    assert CocoObjects().mentions("It is 3 o'clock and a dog sleeps.") == [("dog", "dog")]
    assert tokenize("the o'clock's hand") == ["the", "o'clock", "'s", "hand"]


def test_lemmatizer_is_wordnets():
    """Each lemma as NLTK 3.10's WordNetLemmatizer().lemmatize(w) gives it with WordNet 3.0 (checked with nltk over
    the 358,921 words of WordNet's nouns, their -s/-es/-ies/-ves/-men forms and its exceptions: all equal)."""
    words = ("people", "mice", "knives", "children", "geese", "oxen", "dogs", "buses", "benches", "ponies",
             "policemen", "glasses", "bus", "glass", "scissors", "sheep", "skis", "boxes", "dishes", "cities", "cats",
             "grass", "men", "women", "vases", "smartphones", "busses", "bookshelves", "sunglasses")
    assert [lemmatize(w) for w in words] == [
        "people", "mouse", "knife", "child", "goose", "ox", "dog", "bus", "bench", "pony", "policeman", "glass", "bus",
        "glass", "scissors", "sheep", "ski", "box", "dish", "city", "cat", "grass", "men", "woman", "vas",
        "smartphones", "bus", "bookshelf", "sunglass"]


def test_chair_counts_what_the_reference_counts(coco):
    """Cases where the rule-based lemmatizer counted objects the reference (NLTK + WordNet) does not, or missed
    ones it counts: "men" is a WordNet noun of its own (no COCO word), "vases" is "vas", "smartphones" unknown
    to WordNet, "busses" an exception form of "bus", "knife/fork" one token."""
    assert coco.mentions("Two men stand next to a dog.") == [("dog", "dog")]
    assert coco.mentions("Two vases and two smartphones on a table.") == [("table", "dining table")]
    assert coco.mentions("Two busses on the street.") == [("bus", "bus")]
    assert coco.mentions("A knife/fork set on a table.") == [("table", "dining table")]
    texts, gt = ["Two men stand next to a dog."], [{"dog", "person"}]
    m, _ = chair_metrics(texts, [coco.mentions(t) for t in texts], gt)
    assert (m["CHAIRs"], m["CHAIRi"], m["obj_rec"]) == (0.0, 0.0, 0.5)  # the reference's figures for this case


def test_mentions_plural_irregular_and_synonyms(coco):
    assert coco.mentions("Two dogs and three cats.") == [("dog", "dog"), ("cat", "cat")]
    assert coco.mentions("A few people, two mice and some knives.") == \
        [("people", "person"), ("mouse", "mouse"), ("knife", "knife")]
    assert coco.mentions("A desk with a phone and a monitor.") == \
        [("desk", "dining table"), ("phone", "cell phone"), ("monitor", "tv")]


def test_two_word_phrases(coco):
    # without the pair rule "baby" and "passenger" would fire as person
    assert coco.mentions("A baby elephant next to a passenger jet.") == [("elephant", "elephant"), ("jet", "airplane")]
    assert coco.mentions("A hot dog on a dining table with two wine glasses.") == \
        [("hot dog", "hot dog"), ("dining table", "dining table"), ("wine glass", "wine glass")]
    assert coco.mentions("A man in a bow tie holds a teddy bear.") == \
        [("man", "person"), ("tie", "tie"), ("teddy bear", "teddy bear")]
    assert coco.mentions("The train tracks are empty.") == []  # "train track" merges and is no object
    assert coco.mentions("a baby. dog") == [("baby", "person"), ("dog", "dog")]  # no pair across '.'


def test_toilet_seat_rule(coco):
    assert coco.mentions("A toilet seat is up.") == [("toilet", "toilet")]  # the pair
    assert coco.mentions("The seat of the toilet is up.") == [("toilet", "toilet")]  # seat dropped
    assert coco.mentions("A seat near the window.") == [("seat", "chair")]  # no toilet: a chair


def test_chair_metrics_hand_worked(coco):
    texts = ["A man rides a horse next to a dog.",          # person, horse, dog(hal): 3 mentions, 1 hal
             "Two people and a person stand by a car.",     # person, person, car: 3 mentions, 0 hal
             "It is a sunny day.",                          # no object
             "A cat sits on a chair; another cat sleeps."]  # cat, chair(hal), cat: 3 mentions, 1 hal
    gt = [{"person", "horse"}, {"person", "car", "truck"}, {"kite"}, {"cat"}]
    m, per = chair_metrics(texts, [coco.mentions(t) for t in texts], gt)
    assert m["CHAIRs"] == pytest.approx(2 / 4)         # 2 hallucinating responses of 4
    assert m["CHAIRs_refine"] == pytest.approx(2 / 3)  # of the 3 that mention an object
    assert m["CHAIRi"] == pytest.approx(2 / 9)         # 2 hallucinated of 9 mentions (repeats count)
    assert m["obj_rec"] == pytest.approx(5 / 7)        # distinct correct: 2 + 2 + 0 + 1; GT sizes 2+3+1+1
    assert per[0]["hallucinated"] == [("dog", "dog")] and per[3]["CHAIRi"] == pytest.approx(1 / 3)


def _coco_files(tmp_path):
    inst = {"categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 70, "name": "toilet"}],
            "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 18},
                            {"image_id": 2, "category_id": 70}, {"image_id": 99, "category_id": 1}]}
    caps = {"annotations": [{"image_id": 1, "caption": "A man walking his puppy."},
                            {"image_id": 2, "caption": "A bathroom with a toilet and a sink."},
                            {"image_id": 3, "caption": "Two teddy bears sitting on a couch."}]}
    (tmp_path / "instances_val2014.json").write_text(json.dumps(inst))
    (tmp_path / "captions_val2014.json").write_text(json.dumps(caps))
    return tmp_path


def test_gt_from_coco_instances_and_captions(tmp_path, coco):
    d = _coco_files(tmp_path)
    gt = load_gt_objects(coco, {1, 2, 3}, [d / "instances_val2014.json"], [d / "captions_val2014.json"])
    assert gt == {1: {"person", "dog"}, 2: {"toilet", "sink"}, 3: {"teddy bear", "couch"}}
    (tmp_path / "gt.json").write_text(json.dumps({"3": ["people", "sofa"]}))
    assert load_gt_objects(coco, {3}, gt_file=tmp_path / "gt.json") == {3: {"person", "couch"}}


def test_gt_warns_when_incomplete(tmp_path, coco):
    """One COCO source only, or images without any GT object, are said (not silently scored)."""
    from eval.chair import gt_warnings
    d = _coco_files(tmp_path)
    inst, caps = [d / "instances_val2014.json"], [d / "captions_val2014.json"]
    gt = load_gt_objects(coco, {1, 2, 3}, inst, caps)
    assert gt_warnings(inst, caps, gt) == []
    only_inst = gt_warnings(inst, [], load_gt_objects(coco, {1, 2, 3}, inst))
    assert "COCO instances only (no --coco_captions)" in only_inst[0]
    assert "1 of 3 images have no ground-truth objects" in only_inst[1] and "image_id 3;" in only_inst[1]
    assert "COCO captions only (no --coco_instances)" in gt_warnings([], caps, gt)[0]
    many = {i: set() for i in range(10, 17)}
    assert "7 of 7 images" in gt_warnings(inst, caps, many)[0]
    assert "image_id 10, 11, 12, 13, 14, ..." in gt_warnings(inst, caps, many)[0]


def test_objhal_benchmark_warns_missing_gt(tmp_path, capsys):
    d = _coco_files(tmp_path)
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"image": f"COCO_val2014_{i:012d}.jpg", "question": "Describe.",
                                         "image_id": i}) + "\n" for i in (1, 4)))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": str(i), "text": "A dog."}) + "\n" for i in range(2)))
    rec = bench_main(["--benchmark", "objhal", "--data", str(qfile), "--coco_instances",
                      str(d / "instances_val2014.json"), "--answers", str(answers),
                      "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "warning: objhal: ground truth from COCO instances only" in err
    assert "warning: objhal: 1 of 2 images have no ground-truth objects" in err and "image_id 4;" in err
    assert len(rec["details"]["warnings"]) == 2


def test_extract_prompt_is_the_reference_text():
    """RLAIF-V's prompt is a plain Python string: its \\" escapes are quotes in the text the judge sees."""
    from eval.chair import EXTRACT_PROMPT
    text = EXTRACT_PROMPT.read_text()
    assert 'Present the results in a JSON list format: ["object_1", ..., "object_n"].' in text
    assert "\\" not in text


def _png_b64() -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_objhal_benchmark_scores_published_format(tmp_path):
    """RLAIF-V's question file (base64 image, question, image_id) + COCO files -> results JSON."""
    d = _coco_files(tmp_path)
    img = _png_b64()
    qfile = tmp_path / "obj_halbench_300_with_image.jsonl"
    qfile.write_text("".join(json.dumps({"image": img, "question": "Describe the image.", "image_id": i}) + "\n"
                             for i in (1, 2, 3)))
    answers = tmp_path / "answers.jsonl"
    texts = ["Assistant: A man and his dog on a bench.",  # bench hallucinated
             "A toilet next to a sink.",
             "A nice picture."]
    answers.write_text("".join(json.dumps({"question_id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "run"
    rec = bench_main(["--benchmark", "objhal", "--data", str(qfile), "--coco_annotations", str(d),
                      "--answers", str(answers), "--output_dir", str(out), "--model_name", "sft"])
    m = rec["metrics"]
    assert m["CHAIRs"] == pytest.approx(1 / 3) and m["CHAIRs_refine"] == pytest.approx(1 / 2)
    assert m["CHAIRi"] == pytest.approx(1 / 5)   # man, dog, bench | toilet, sink
    assert m["obj_rec"] == pytest.approx(4 / 6)  # {person, dog} + {toilet, sink} of 2 + 2 + 2
    saved = json.loads((out / "eval_objhal.json").read_text())
    assert saved["metrics"] == m and len(saved["dataset"]["files_sha256"]) == 3
    assert saved["judge"] is None



def test_raw_objhal_file_answered_by_predict_joins_every_row(tmp_path, world, tiny):
    """RLAIF-V's question file has no question_id: predict's answers and the scoring key its rows alike (the row
    index, as RLAIF-V's own answers are keyed; predict once keyed them '<file>-<row>', which joined none)."""
    from training.predict.main import main as predict

    images = sorted((world / "images").glob("*.png"))[:3]
    qfile = tmp_path / "obj_halbench_300_with_image.jsonl"
    qfile.write_text("".join(json.dumps({"image": base64.b64encode(p.read_bytes()).decode(), "question": "Describe.",
                                         "image_id": i}) + "\n" for i, p in enumerate(images, 1)))
    (tmp_path / "gt.json").write_text(json.dumps({str(i): ["dog"] for i in (1, 2, 3)}))
    answers = predict(["--model_path", str(tiny), "--data_path", str(qfile), "--output_file", str(tmp_path / "a.jsonl"),
                       "--max_new_tokens", "4", "--no-progress"])
    rec = bench_main(["--benchmark", "objhal", "--data", str(qfile), "--gt_objects", str(tmp_path / "gt.json"),
                      "--answers", str(answers), "--output_dir", str(tmp_path / "run")])
    assert rec["metrics"]["sentence_num"] == 3
    per = [json.loads(x) for x in (tmp_path / "run" / "eval_objhal.per_question.jsonl").read_text().splitlines()]
    assert [(p["question_id"], p["image_id"]) for p in per] == [("0", 1), ("1", 2), ("2", 3)]

def test_parse_object_list():
    assert parse_object_list('```json\n["dog", "red frisbee"]\n```') == ["dog", "red frisbee"]
    assert parse_object_list('Objects:\n["cat"]') == ["cat"]
    with pytest.raises(ValueError):
        parse_object_list("a dog and a cat")


def test_llm_phrases_to_objects(coco):
    # pair rule first; else the whole phrase if it is a synonym, else its last word
    assert coco.from_phrases(["baby elephant", "red frisbee", "dining table", "dog", "dog", "toilet", "seat"]) == \
        [("elephant", "elephant"), ("frisbee", "frisbee"), ("dining table", "dining table"), ("dog", "dog"),
         ("toilet", "toilet")]


def test_extract_prompt_fills_question_and_answer_in_one_pass():
    """The answer was put into the prompt wherever the question held '{answer}' (two chained replaces)."""
    from eval.chair import llm_objects
    sent = []

    class Judge:
        def chat(self, messages, **kw):
            sent.append(messages[0]["content"])
            return '["dog"]'
    assert llm_objects(Judge(), "Write {answer} and \\1 here", "A dog sits on a red mat.", {}) == ["dog"]
    assert "<image> Write {answer} and \\1 here\n" in sent[0] and sent[0].count("A dog sits on a red mat.") == 1


def test_an_object_list_the_judge_never_gives_names_the_question(tmp_path):
    """After three unparsable replies the error named neither the question nor its image."""
    import json
    from types import SimpleNamespace

    from eval import chair

    class Judge:
        def chat(self, messages, **kw):
            return "I cannot list objects."
    (tmp_path / "gt.json").write_text(json.dumps({"42": ["dog"]}))
    args = SimpleNamespace(synonyms=str(chair.SYNONYMS), objhal_extractor="llm", gt_objects=str(tmp_path / "gt.json"),
                           coco_annotations="", coco_instances=[], coco_captions=[])
    items = [{"question_id": "q7", "image_id": 42, "text": "Describe the image."}]
    answers = {"": {"q7": "A dog sits on a red mat in the sun."}}
    with pytest.raises(ValueError, match=r"question 'q7' \(image 42\): the judge's object list could not be parsed"):
        chair.score(args, {"": items}, answers, judge=Judge(), decoding={})


@pytest.mark.parametrize("row, want", [({"image": "COCO_val2014_000000310196.jpg"}, 310196),
                                       ({"image": "val2014/COCO_val2014_000000000042.png"}, 42),
                                       ({"image_id": "17", "image": "COCO_val2014_000000310196.jpg"}, 17)])
def test_the_image_id_is_the_number_ending_a_coco_file_name(row, want):
    """The COCO image number is the one before the extension, not the first in the name (2014)."""
    from eval.chair import image_id_of
    assert image_id_of(row) == want
