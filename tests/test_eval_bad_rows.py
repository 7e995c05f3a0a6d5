"""A benchmark file with a row that lacks a field the scorer reads is refused before any answer is generated, by an
error naming the file, the row and the field (it was a bare KeyError, some only after every answer was made)."""
import argparse
import json

import pytest

from eval import amber, chair, llava_bench, mmhal, pope


def test_pope_row_without_image_or_text(tmp_path):
    f = tmp_path / "coco_pope_random.json"
    f.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"}) + "\n"
                 + json.dumps({"question_id": 2, "text": "Is there a cat?", "label": "no"}) + "\n")
    with pytest.raises(ValueError, match=r"coco_pope_random\.json: row 1: no 'image' field"):
        pope.questions(argparse.Namespace(data=str(f), pope_suffix=""))


def test_objhal_row_without_a_usable_image_id(tmp_path):
    f = tmp_path / "objhal.jsonl"
    f.write_text(json.dumps({"question": "Describe.", "image_id": 1}) + "\n"
                 + json.dumps({"question": "Describe.", "image_id": "COCO_val2014_000000000001.jpg"}) + "\n")
    with pytest.raises(ValueError, match=r"objhal\.jsonl: row 1: image_id 'COCO_val2014_000000000001\.jpg' is not"):
        chair.questions(argparse.Namespace(data=str(f)))
    f.write_text(json.dumps({"question": "Describe.", "image": "picture.png"}) + "\n")
    with pytest.raises(ValueError, match=r"objhal\.jsonl: row 0: .*no image_id"):
        chair.questions(argparse.Namespace(data=str(f)))


def _mmhal_record(**drop):
    r = {"question_type": "attribute", "question_topic": "t", "image_id": "i", "image_src": "http://x/a.jpg",
         "image_content": ["Dog"], "question": "What?", "gt_answer": "A dog.", "model_answer": ""}
    return {k: v for k, v in r.items() if k not in drop}


@pytest.mark.parametrize("missing", ["image_content", "gt_answer", "question"])
def test_mmhal_record_without_a_judged_field(tmp_path, missing):
    f = tmp_path / "response_template.json"
    f.write_text(json.dumps([_mmhal_record(), _mmhal_record(**{missing: 1})]))
    with pytest.raises(ValueError, match=rf"response_template\.json, record 1: no '{missing}' field"):
        mmhal.questions(argparse.Namespace(data=str(f)))


def test_mmhal_image_content_must_be_a_list(tmp_path):
    f = tmp_path / "response_template.json"
    f.write_text(json.dumps([{**_mmhal_record(), "image_content": "Dog, Cat"}]))
    with pytest.raises(ValueError, match=r"record 0: 'image_content' must be a list"):
        mmhal.questions(argparse.Namespace(data=str(f)))


def test_llava_bench_question_without_context_or_field(tmp_path):
    (tmp_path / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 1, "text": "ref"}) + "\n")
    (tmp_path / "context.jsonl").write_text(json.dumps({"image": "002.jpg", "caption": "c"}) + "\n")
    args = argparse.Namespace(data=str(tmp_path), llava_rule_file=str(llava_bench.RULES))
    q = {"question_id": 1, "image": "001.jpg", "text": "q", "category": "conv"}
    (tmp_path / "questions.jsonl").write_text(json.dumps(q) + "\n")
    with pytest.raises(ValueError, match=r"questions\.jsonl, line 1: image '001\.jpg' is not in .*context\.jsonl"):
        llava_bench.questions(args)
    (tmp_path / "questions.jsonl").write_text(json.dumps({**q, "image": "002.jpg", "question_id": 2}) + "\n")
    with pytest.raises(ValueError, match=r"answers_gpt4\.jsonl: no reference answer for question 2"):
        llava_bench.questions(args)
    (tmp_path / "questions.jsonl").write_text(json.dumps({k: v for k, v in q.items() if k != "category"}) + "\n")
    with pytest.raises(ValueError, match=r"questions\.jsonl, line 1: no 'category' field"):
        llava_bench.questions(args)


def test_amber_query_without_an_annotation(tmp_path):
    (tmp_path / "query").mkdir()
    (tmp_path / "annotations.json").write_text(json.dumps([{"id": 1, "type": "generative", "truth": [], "hallu": []}]))
    rows = [{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."},
            {"id": 2, "image": "AMBER_2.jpg", "query": "Is there a dog in this image?"}]
    (tmp_path / "query" / "query_all.json").write_text(json.dumps(rows))
    args = argparse.Namespace(data=str(tmp_path), amber_query="", amber_disc_suffix="")
    with pytest.raises(ValueError, match=r"query_all\.json, row 1: id 2 has no annotation in .*annotations\.json"):
        amber.questions(args)
    (tmp_path / "query" / "query_all.json").write_text(json.dumps([{"id": 1, "query": "Describe this image."}]))
    with pytest.raises(ValueError, match=r"query_all\.json, row 0: no 'image' field"):
        amber.questions(args)


def test_a_benchmark_json_file_that_is_not_json_names_the_file(tmp_path):
    """COCO annotations, a ground-truth objects file, MMHal's records, LLaVA-Bench's rules and AMBER's annotations
    that were not valid JSON stopped with a bare JSONDecodeError naming no file."""
    from eval.chair import CocoObjects, SYNONYMS, load_gt_objects
    bad = tmp_path / "broken.json"
    bad.write_text('{"annotations": [1, 2,]}')
    where = r"broken\.json: invalid JSON at line 1, column 23"
    for call in (lambda: load_gt_objects(CocoObjects(SYNONYMS), [1], instances=[bad]),
                 lambda: load_gt_objects(CocoObjects(SYNONYMS), [1], captions=[bad]),
                 lambda: load_gt_objects(CocoObjects(SYNONYMS), [1], gt_file=bad),
                 lambda: mmhal._records(argparse.Namespace(data=str(bad)))):
        with pytest.raises(ValueError, match=where):
            call()
    (tmp_path / "annotations.json").write_text("[{]")
    with pytest.raises(ValueError, match=r"annotations\.json: invalid JSON at line 1"):
        amber.load_amber(tmp_path)
    (tmp_path / "query_all.json").write_text('[{"id": 1,]')  # the queries, read with their annotations
    with pytest.raises(ValueError, match=r"query_all\.json: invalid JSON at line 1"):
        amber.questions(argparse.Namespace(data=str(tmp_path), amber_query=str(tmp_path / "query_all.json"),
                                           amber_disc_suffix=""))


@pytest.mark.parametrize("text, where", [('{"question_id": 1, "text": null}\n', r"row 1: field 'text'"),
                                         ('[{"id": 1, "response": 5}]', r"row 0: field 'response'"),
                                         ('[{"model_answer": ["yes"]}]', r"row 0: field 'model_answer'")])
def test_an_answer_that_is_not_text_names_its_row(tmp_path, text, where):
    """A null, a number or a list as an answer was read, and scoring it stopped on a bare AttributeError
    ('NoneType' object has no attribute 'split') naming no file, row or field."""
    from eval.answers import read_answers
    (tmp_path / "answers.jsonl").write_text(text)
    with pytest.raises(ValueError, match=rf"answers\.jsonl, {where}: expected text, got"):
        read_answers(tmp_path / "answers.jsonl")


@pytest.mark.parametrize("data", [b'[{"id": 1, "response": "x"},', b'{"question_id": 1, "text": "\xff"}\n'])
def test_an_answers_file_that_is_not_json_or_utf8_names_the_file(tmp_path, data):
    """A JSON list cut short stopped on a bare JSONDecodeError, a byte that is not UTF-8 on a bare UnicodeDecodeError:
    neither named the file."""
    from eval.answers import read_answers
    (tmp_path / "answers.json").write_bytes(data)
    with pytest.raises(ValueError, match=r"answers\.json: (invalid JSON|not UTF-8)"):
        read_answers(tmp_path / "answers.json")


@pytest.mark.parametrize("text", ['[{"id": 1, "response": "x", "model_id": "m"}]',
                                  '{"question_id": 1, "text": "x", "model_id": "m"}\n'])
def test_an_answers_file_with_a_byte_order_mark_reads(tmp_path, text):
    """Data files and benchmark files with the byte order mark some editors write are read; an answers file with
    one was refused ("Unexpected UTF-8 BOM"), and its model_id was not seen."""
    from eval.answers import answers_model_ids, read_answers
    (tmp_path / "answers.json").write_text("\ufeff" + text, encoding="utf-8")
    assert read_answers(tmp_path / "answers.json") == {"1": "x"}
    assert answers_model_ids(tmp_path / "answers.json") == ([] if text.startswith("[") else ["m"])


def test_a_question_text_that_is_not_text_names_its_row(tmp_path):
    """A number as a POPE question's text, an AMBER query or a LLaVA-Bench category stopped on a bare TypeError
    (unsupported operand type(s) for +: 'int' and 'str') naming no file, row or field."""
    f = tmp_path / "coco_pope_random.json"
    f.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": 5, "label": "yes"}) + "\n")
    with pytest.raises(ValueError, match=r"coco_pope_random\.json: row 0: field 'text': expected text, got int"):
        pope.questions(argparse.Namespace(data=str(f), pope_suffix=" Answer yes or no."))
    (tmp_path / "annotations.json").write_text(json.dumps([{"id": 1, "type": "discriminative", "truth": []}]))
    (tmp_path / "query.json").write_text(json.dumps([{"id": 1, "image": "AMBER_1.jpg", "query": 3}]))
    with pytest.raises(ValueError, match=r"query\.json, row 0: field 'query': expected text, got int"):
        amber.questions(argparse.Namespace(data=str(tmp_path), amber_query=str(tmp_path / "query.json"),
                                           amber_disc_suffix=" Answer yes or no."))
    (tmp_path / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 1, "text": "ref"}) + "\n")
    (tmp_path / "context.jsonl").write_text(json.dumps({"image": "001.jpg", "caption": "c"}) + "\n")
    q = {"question_id": 1, "image": "001.jpg", "text": "q", "category": 2}
    (tmp_path / "questions.jsonl").write_text(json.dumps(q) + "\n")
    with pytest.raises(ValueError, match=r"questions\.jsonl, line 1: field 'category': expected text, got int"):
        llava_bench.questions(argparse.Namespace(data=str(tmp_path), llava_rule_file=str(llava_bench.RULES)))


@pytest.mark.parametrize("row, match", [(5, r"row 0: no 'question' field \(the row is no object\)"),
                                        ({"image_id": 1, "text": 5}, r"row 0: field 'text': expected text, got int")])
def test_an_objhal_question_row_that_is_no_object_or_no_text_names_its_row(tmp_path, row, match):
    """A row that was no object stopped on a bare AttributeError ('int' object has no attribute 'get'); a number as
    the question went on to the generated question file, which predict then refused naming that file instead."""
    f = tmp_path / "objhal.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"objhal\.jsonl: {match}"):
        chair.questions(argparse.Namespace(data=str(f)))


def test_a_llava_bench_image_that_is_not_a_file_name_names_its_line(tmp_path):
    """A list as a question's or a context row's image stopped on a bare TypeError (unhashable type: 'list')."""
    (tmp_path / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 1, "text": "ref"}) + "\n")
    (tmp_path / "context.jsonl").write_text(json.dumps({"image": "001.jpg", "caption": "c"}) + "\n")
    args = argparse.Namespace(data=str(tmp_path), llava_rule_file=str(llava_bench.RULES))
    q = {"question_id": 1, "image": ["001.jpg"], "text": "q", "category": "conv"}
    (tmp_path / "questions.jsonl").write_text(json.dumps(q) + "\n")
    with pytest.raises(ValueError, match=r"questions\.jsonl, line 1: field 'image': expected text, got list"):
        llava_bench.questions(args)
    (tmp_path / "context.jsonl").write_text(json.dumps({"image": ["001.jpg"], "caption": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"context\.jsonl, line 1: field 'image': expected text, got list"):
        llava_bench.questions(args)


def test_mmhal_answers_in_json_lines_are_keyed_by_position_as_in_a_list(tmp_path):
    """MMHal's answers (model_answer) are keyed by their position, from 0 as its questions are; in a JSON Lines file
    they were keyed by line number, from 1: every answer went to the next question, and the first had none."""
    from eval.answers import read_answers
    (tmp_path / "answers.jsonl").write_text('{"model_answer": "first"}\n\n{"model_answer": "second"}\n')
    (tmp_path / "answers.json").write_text('[{"model_answer": "first"}, {"model_answer": "second"}]')
    assert read_answers(tmp_path / "answers.jsonl") == read_answers(tmp_path / "answers.json") == {
        "0": "first", "1": "second"}
