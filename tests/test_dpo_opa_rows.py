"""Rows of an OPA-DPO pairs file (or the published OPA-DPO set) that make no pairs."""
import base64
import json

import pytest

from test_dpo_opa import _opa_row


def test_an_empty_answer_is_a_bad_row_not_a_pair(world, tmp_path):
    """A published row whose expert report is empty (so its revised answer is empty), or a pairs row with an empty
    ground truth, was trained on: pairs 2 and 4 preferred the bare end of the answer to the rollout (the policy was
    taught to say nothing, with the sentence weights), as the correct step, which drops such rows, never does."""
    from training.data.bad_rows import BadRowError, BadRowReport
    from training.dpo.opa.data import OPADataset, read_opa

    png = (world / "images" / "pref00000.png").read_bytes()
    (tmp_path / "ok.png").write_bytes(png)
    published = {"queries": "<image>\nDescribe.", "image_bytes": base64.b64encode(png).decode(),
                 "standard_response": "A red cross.", "original_generate_response": "A red star.",
                 "AI_json_report": "[]"}
    (tmp_path / "published.json").write_text(json.dumps([published]))
    (tmp_path / "pairs.json").write_text(json.dumps([_opa_row("ok.png"), _opa_row("ok.png", gt=" ")]))
    fake = type("Enc", (), {"tokenizer": None})()
    with pytest.raises(BadRowError, match=r"published.json: row 0: field 'revised'"):
        OPADataset(read_opa(str(tmp_path / "published.json")), fake, "", BadRowReport())
    report = BadRowReport(skip=True)
    ds = OPADataset(read_opa(str(tmp_path / "pairs.json")), fake, "", report)
    assert len(ds) == 1 and [(s["row"], s["field"]) for s in report.skipped] == [(1, "gt")]


def test_a_weighted_sentence_not_in_its_answer_is_a_bad_row(world, tmp_path):
    """A sentence of rollout_weights not in the rollout (an expert that did not copy it verbatim), or one of the
    revised answer's weights out of order, was passed over: its tokens weighed 1, without a word. Sentences are
    looked for stripped, in order, as a preference row's spans are; such a row is bad, naming the weight's field."""
    from training.data.bad_rows import BadRowError, BadRowReport
    from training.dpo.opa.data import OPADataset, read_opa
    from training.dpo.weights import WeightsNotPlaced, token_weights
    from training.model.tiny_archs import _BUILDERS

    (tmp_path / "ok.png").write_bytes((world / "images" / "pref00000.png").read_bytes())
    rows = [_opa_row("ok.png", rollout_weights=[["A red star.", 1.0], ["A purple elephant.", 2.5]]),
            _opa_row("ok.png", revised="One red. Two blue.", revised_score_weights=[["One red. Two blue.", 1.0]],
                     revised_type_weights=[["Two blue.", 3.0], ["One red.", 1.0]]),
            _opa_row("ok.png", rollout_weights=[[" A red star.\n", 2.5]], revised_score_weights=[["", 1.0]])]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    fake = type("Enc", (), {"tokenizer": None})()
    with pytest.raises(BadRowError, match=r"pairs.json: row 0: field 'rollout_weights\[1\]': 'A purple elephant.' "
                                          "is not in the rollout"):
        OPADataset(read_opa(str(tmp_path / "pairs.json")), fake, "", BadRowReport())
    report = BadRowReport(skip=True)
    ds = OPADataset(read_opa(str(tmp_path / "pairs.json")), fake, "", report)
    assert len(ds) == 1 and ds.rows[0]["id"] == rows[2]["id"]
    assert [(s["row"], s["field"]) for s in report.skipped] == [(0, "rollout_weights[1]"),
                                                                (1, "revised_type_weights[1]")]
    tok = _BUILDERS["llava"]()[1].tokenizer
    ids = tok("A red star.", add_special_tokens=False)["input_ids"]
    with pytest.raises(WeightsNotPlaced) as err:  # the same rule where the answer's tokens are weighed
        token_weights(tok, "A red star.", [["red", 2.0], ["A", 1.0]], ids)
    assert err.value.sentence == 1


def test_a_negative_sentence_weight_is_refused_as_in_preference_rows(tmp_path):
    """A preference row's negative span weight is refused (it would push the span's log-probs against its own
    answer); an opa_pairs.json row's was read and trained on."""
    from training.data.readers import DataFormatError
    from training.dpo.opa.data import read_opa

    rows = [_opa_row("ok.png"), _opa_row("ok.png", revised_score_weights=[["A red cross.", -2.0]])]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    with pytest.raises(DataFormatError, match=r"pairs.json: row 1: field 'revised_score_weights\[0\]': expected "
                                              r"\[sentence, finite weight >= 0\], got \['A red cross.', -2.0\]"):
        read_opa(str(tmp_path / "pairs.json"))
    rows[1]["revised_score_weights"][0][1] = 0.0  # zero: the sentence weighs nothing, as a preference row allows
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    assert len(read_opa(str(tmp_path / "pairs.json"))) == 2


def test_a_jsonl_pairs_row_is_named_by_its_line_past_blank_lines(tmp_path):
    """Rows of a JSON Lines file are numbered by line (the line number minus one), as every other reader numbers
    them; opa_pairs rows were numbered by their count, so a row after a blank line was named one row early, in the
    error and in every bad-row report."""
    from training.data.readers import DataFormatError
    from training.dpo.opa.data import read_opa

    good, bad = json.dumps(_opa_row("ok.png")), json.dumps(_opa_row("ok.png", gt=None))
    (tmp_path / "pairs.jsonl").write_text(f"{good}\n\n{bad}\n")
    with pytest.raises(DataFormatError, match=r"pairs.jsonl: row 2: field 'gt'"):
        read_opa(str(tmp_path / "pairs.jsonl"))
    (tmp_path / "pairs.jsonl").write_text(f"{good}\n\n{good}\n")
    assert [r["_where"].row for r in read_opa(str(tmp_path / "pairs.jsonl"))] == [0, 2]
