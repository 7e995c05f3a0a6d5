"""Rows as their projects publish them: the OPA-DPO set (datasets saved to disk) read for OPA-DPO training, and
a prompt's reference answer (a PPO prompt's, an OPA set's ground truth) that is not text."""
import base64
import io
import json

import pytest
from PIL import Image

from training.data.bad_rows import BadRowError
from training.data.formats import read_prompts
from training.data.readers import DataFormatError
from training.dpo.opa.data import read_opa, revised_with_weights, rollout_weights

REPORT = [{"copied_content": "There is one red star. ", "score": 4, "error_type": "correct", "object": "",
           "rewritten_content": "There is one red star. ", "reason": ""},
          {"copied_content": "There is a blue cross.", "score": 1, "error_type": "image_recognition_error",
           "object": "cross", "rewritten_content": "There is a blue circle.", "reason": "no cross"}]


def _png(color=(200, 20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "PNG")
    return buf.getvalue()


def _opa_set(folder, rows):
    from datasets import Dataset
    Dataset.from_list(rows).save_to_disk(str(folder))
    return str(folder)


def _row(**kw):
    row = {"idx": 7, "queries": "Describe the image.", "image_bytes": _png(),
           "standard_response": "There is one red star. There is a blue circle.",
           "AI_pseudo_response": "There is one red star. There is a blue circle.",
           "original_generate_response": "There is one red star. There is a blue cross.",
           "AI_json_report": json.dumps(REPORT)}
    return {**row, **kw}


def test_the_published_opa_dpo_set_reads_as_opa_rows(tmp_path):
    """It was read only as plain preference pairs (revised over rollout, the report and the ground truth
    dropped); --loss_type opa stopped on it with a bare IsADirectoryError."""
    (r,) = read_opa(_opa_set(tmp_path / "opadpo", [_row()]))
    revised, score_w, type_w = revised_with_weights(REPORT)
    assert (r["id"], r["question"], r["gt"]) == ("7", "Describe the image.", _row()["standard_response"])
    assert r["rollout"] == _row()["original_generate_response"] and r["revised"] == revised
    assert revised == "There is one red star. There is a blue circle."  # the report's rewrite of the bad sentence
    assert r["rollout_weights"] == rollout_weights(REPORT) and r["rollout_weights"][1][1] != r["rollout_weights"][0][1]
    assert (r["revised_score_weights"], r["revised_type_weights"]) == (score_w, type_w)
    assert r["_where"].file == str(tmp_path / "opadpo") and r["_where"].row == 0
    from training.data.images import load_image
    assert load_image(r["image"], None).getpixel((0, 0)) == (200, 20, 20)


def test_a_bad_row_of_the_published_set_names_its_field(tmp_path):
    for bad, field in ((_row(AI_json_report="no report here"), "AI_json_report"),
                       (_row(image_bytes="../../etc/passwd"), "image_bytes")):
        with pytest.raises(DataFormatError, match=f"row 0: field '{field}'"):
            read_opa(_opa_set(tmp_path / field, [bad]))
    missing = {k: v for k, v in _row().items() if k != "original_generate_response"}  # the OPA set, not OPA-DPO's
    with pytest.raises(DataFormatError, match="field 'original_generate_response': missing"):
        read_opa(_opa_set(tmp_path / "opa_only", [missing]))


def test_a_reference_answer_that_is_not_text_is_a_bad_row(tmp_path):
    """It was dropped without a word (the prompt kept, reference None)."""
    (tmp_path / "a.png").write_bytes(_png())
    rows = [{"id": "p6", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ6"},
                                                             {"from": "gpt", "value": 123}]}]
    path = tmp_path / "ppo.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(BadRowError, match=r"row 0: field 'conversations\[1\].value': expected text, got int"):
        read_prompts(str(path), str(tmp_path))


@pytest.mark.parametrize("value", [123, ["one", "two"]])
def test_an_opa_sets_ground_truth_that_is_not_text_is_a_bad_row(tmp_path, value):
    """OPA's rollouts read the OPA set as prompts whose standard_response is the reference the expert corrects
    against: one that was not text was dropped without a word (reference None)."""
    path = tmp_path / "opa.jsonl"
    path.write_text(json.dumps({"queries": "Describe the image.", "image_bytes": base64.b64encode(_png()).decode(),
                                "standard_response": value}) + "\n")
    with pytest.raises(BadRowError, match=r"row 0: field 'standard_response': expected text"):
        read_prompts(str(path), str(tmp_path))


def test_opa_pairs_rows_read_from_any_table_file(tmp_path):
    """Rows are told apart by the expert's report, not by the file type: run_opa_dpo.sh's rows in JSON Lines
    were taken for the published set (field 'queries' missing)."""
    (r,) = read_opa(_opa_set(tmp_path / "opadpo", [_row()]))
    r.pop("_where")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(r) + "\n")
    (again,) = read_opa(str(tmp_path / "pairs.jsonl"))
    assert {k: v for k, v in again.items() if k != "_where"} == r


def test_the_set_as_released_base64_images_and_the_report_object(tmp_path):
    """The release keeps each image as base64 text and the expert's report as a JSON object ("image_description",
    "0", "1", ..., "Added"; pseudo_rollout_coco's output format), its queries start with "<image>\\n". Every row was
    refused (image_bytes not bytes); given bytes, the object report read as [] (an empty revision, no weights), and
    the question's own placeholder made a second one."""
    import base64

    from training.data.bad_rows import BadRowReport
    from training.dpo.opa.data import OPADataset
    from training.model.architectures import ARCHITECTURES
    from training.model.tiny import build_processor
    from training.templates.chat import ChatEncoder
    report = {"image_description": "A red star and a blue circle.",
              "0": {"copied_content": "There is one red star.", "score": 4, "error_type": "correct", "object": [],
                    "rewritten_content": "There is one red star.", "reason": ""},
              "1": {"copied content": "There is a blue cross.", "score": "1", "error type": "Image_recognition_error",
                    "object": ["cross -> circle"], "rewritten content": "There is a blue circle.", "reason": "r"},
              "Added": {"rewritten_content": "The background is white.", "reason": "missing"}}
    row = _row(queries="<image>\nDescribe the image.", image_bytes=base64.b64encode(_png()).decode(),
               AI_json_report=json.dumps(report, indent=4))
    (r,) = read_opa(_opa_set(tmp_path / "released", [row]))
    assert r["question"] == "Describe the image."
    assert r["revised"] == "There is one red star. There is a blue circle. The background is white."
    assert r["revised_score_weights"] == [["There is one red star.", 1.0], ["There is a blue circle.", 2.5],
                                          ["The background is white.", 1.0]]
    assert [w for _, w in r["revised_type_weights"]] == [1.0, 3.0, 1.0]  # "Image_recognition_error" is one
    assert r["rollout_weights"] == [["There is one red star.", 1.0], ["There is a blue cross.", 2.5]]
    ds = OPADataset([r], ChatEncoder(build_processor(), ARCHITECTURES["llava"], 400), None, BadRowReport())
    real, masked = ds[0]
    assert len(real.responses) == 4 and len(masked.responses) == 2  # encoded with one image placeholder


def test_llava_rlhf_ppo_prompts_get_the_factual_block_of_the_reward_models_training(tmp_path):
    """LLaVA-RLHF's reward model trains with each image's captions (and a multiple-choice row's correct answer)
    from image_to_caption.json; PPO read facts only from a `facts` field and had no --captions_file, so
    Fact-RLHF on its data stopped with every prompt a bad row. Both now read the same block."""
    from training.data.formats import read_preferences
    from training.rm.factual import rm_messages

    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "0001.jpg").write_bytes(_png())
    captions = tmp_path / "image_to_caption.json"
    captions.write_text(json.dumps({"0001": ["A red square.", "Something red."]}))
    turns = [{"from": "human", "value": "<image>\nColour? A. blue B. red"}]
    mc = {"choices": ["blue", "red"], "correct_choice_idx": 1}
    pref = tmp_path / "pref.json"
    pref.write_text(json.dumps([{"id": "q", "image": "coco/0001.jpg", "conversations": turns, "output_1":
                                 {"from": "gpt", "value": "B"}, "output_2": {"from": "gpt", "value": "A"},
                                 "preference": 1, **mc}]))
    prompts = tmp_path / "ppo.json"
    prompts.write_text(json.dumps([{"id": "q", "image": "coco/0001.jpg", "conversations": turns, **mc}]))
    (p,) = read_preferences(str(pref), str(tmp_path), captions_file=str(captions))
    (r,) = read_prompts(str(prompts), str(tmp_path), captions_file=str(captions))
    assert r.facts == p.facts == ["A red square.", "Something red.", "correct answer: red"]
    assert rm_messages(r.prompt, "B", r.facts, True, "s") == rm_messages(p.prompt, "B", p.facts, True, "s")
    assert r.meta == {"correct_option": "B"}  # --correct_bonus reads the letter
    assert read_prompts(str(prompts), str(tmp_path))[0].facts is None  # no captions file: as before


def test_a_llava_rlhf_preference_read_as_a_float_is_its_number(tmp_path):
    """A preference column of floats (parquet or pandas: 1.0, 2.0) was refused as a bad row ("expected 1 or 2")."""
    from training.data.formats import read_preferences
    (tmp_path / "a.png").write_bytes(_png())
    turns = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "x"}]
    rows = [{"image": "a.png", "conversations": turns, "output_1": "a", "output_2": "b", "preference": pref}
            for pref in (2.0, 1.0)]
    (tmp_path / "rlhf.json").write_text(json.dumps(rows))
    assert [r.responses for r in read_preferences([str(tmp_path / "rlhf.json")], str(tmp_path))] == \
        [["b", "a"], ["a", "b"]]


@pytest.mark.parametrize("field", ["queries", "standard_response", "original_generate_response"])
def test_a_published_text_field_that_is_not_text_is_named_as_published(tmp_path, field):
    """The error named the pairs file's field it becomes ('question', 'gt', 'rollout'), which the published set
    does not have, and called a number in 'queries' a NoneType."""
    with pytest.raises(DataFormatError, match=f"row 0: field '{field}': expected text, got int"):
        read_opa(_opa_set(tmp_path / field, [_row(**{field: 3})]))


def test_a_published_row_without_its_report_names_the_report(tmp_path):
    """A row of the published set without AI_json_report was taken for an opa_pairs.json row and refused for a
    missing 'image' (a field the published set does not have), with the hint to make the file with run_opa_dpo.sh."""
    row = _row(image_bytes=base64.b64encode(_png()).decode())  # the set as JSON Lines: its image as base64 text
    rows = [row, {k: v for k, v in row.items() if k != "AI_json_report"}]
    (tmp_path / "opadpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataFormatError, match="row 1: field 'AI_json_report': missing"):
        read_opa(str(tmp_path / "opadpo.jsonl"))


def test_a_negative_or_past_the_letters_choice_index_and_a_non_finite_margin_are_bad_rows(tmp_path):
    """Only an index past the end of `choices` was tried: -1 (which Python reads as the last option) was taken for an
    answer, as was a 27th option with no letter to name it; a margin of NaN or Infinity (JSON and parquet hold them)
    went into the loss. Each is a bad row naming its field."""
    from training.data.formats import read_preferences
    (tmp_path / "a.png").write_bytes(_png())
    turns = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "x"}]
    rlhf = {"image": "a.png", "conversations": turns, "output_1": "a", "output_2": "b", "preference": 1}
    trl = {"images": [], "prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"}
    cases = [(read_preferences, dict(rlhf, choices=["p", "q"], correct_choice_idx=-1), "correct_choice_idx"),
             (read_prompts, {"image": "a.png", "conversations": turns[:1], "choices": ["p", "q"],
                             "correct_choice_idx": -2}, "correct_choice_idx"),
             (read_prompts, {"image": "a.png", "conversations": turns[:1], "choices": [str(i) for i in range(30)],
                             "correct_choice_idx": 26}, "correct_choice_idx"),
             (read_preferences, dict(trl, margin=float("nan")), "margin"),
             (read_preferences, dict(trl, margin=float("inf")), "margin")]
    for i, (reader, row, field) in enumerate(cases):
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps([row]))
        with pytest.raises(BadRowError, match=f"row 0: field '{field}'"):
            reader(str(path), str(tmp_path))


def test_a_published_row_whose_idx_is_null_is_keyed_by_its_place(tmp_path):
    """A null idx (a gap in the table's column) became the id "None", the same for every such row."""
    rows = read_opa(_opa_set(tmp_path / "gaps", [_row(idx=None), _row(idx=None), _row(idx=5)]))
    assert [r["id"] for r in rows] == ["0", "1", "5"]


def test_a_choice_index_read_as_a_float_is_its_number_and_a_boolean_is_none(tmp_path):
    """correct_choice_idx 1.0 (a float column: parquet, pandas) was a bad row, and True was read as option B."""
    from training.data.formats import read_preferences
    (tmp_path / "a.png").write_bytes(_png())
    turns = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "x"}]
    row = {"image": "a.png", "conversations": turns, "output_1": "a", "output_2": "b", "preference": 1,
           "choices": ["red", "green"]}
    (tmp_path / "f.json").write_text(json.dumps([dict(row, correct_choice_idx=1.0)]))
    (r,) = read_preferences([str(tmp_path / "f.json")], str(tmp_path))
    assert r.facts == ["correct answer: green"]
    prompts = [{"id": "p", "image": "a.png", "conversations": turns[:1], "choices": ["red", "green"],
                "correct_choice_idx": 1.0}]
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    assert read_prompts([str(tmp_path / "p.json")], str(tmp_path))[0].meta["correct_option"] == "B"
    for bad, path in ((dict(row, correct_choice_idx=True), "t.json"), (dict(row, correct_choice_idx=1.5), "h.json")):
        (tmp_path / path).write_text(json.dumps([bad]))
        with pytest.raises(BadRowError, match="correct_choice_idx"):
            read_preferences([str(tmp_path / path)], str(tmp_path))
