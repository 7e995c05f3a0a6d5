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
