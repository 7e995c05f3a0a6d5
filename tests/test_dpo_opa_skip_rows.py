"""--skip_bad_rows reaches the rows --loss_type opa reads (the published OPA-DPO set, opa_pairs.json): a bad one is
skipped and counted with its file, row and field, as every other reader's are."""
import json

import pytest

from training.data.bad_rows import BadRowError, BadRowReport
from training.dpo.opa.data import read_opa
from test_data_published import _opa_set, _row


def test_a_bad_published_row_is_skipped_and_counted_when_asked(tmp_path):
    """read_opa stopped the run on the first bad row whatever --skip_bad_rows said: a published set with one
    malformed expert report could not be trained on at all."""
    path = _opa_set(tmp_path / "opadpo", [_row(), _row(AI_json_report="no report here"), _row(idx=9)])
    report = BadRowReport(skip=True)
    rows = read_opa(path, report)
    assert [(r["id"], r["_where"].row) for r in rows] == [("7", 0), ("9", 2)]
    assert [(s["row"], s["field"]) for s in report.skipped] == [(1, "AI_json_report")]
    with pytest.raises(BadRowError, match=r"opadpo: row 1: field 'AI_json_report': "):
        read_opa(path, BadRowReport(skip=False))


def test_a_bad_pairs_row_is_skipped_and_counted_when_asked(tmp_path):
    (good,) = read_opa(_opa_set(tmp_path / "opadpo", [_row()]))
    good = {k: v for k, v in good.items() if k != "_where"}
    path = tmp_path / "opa_pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, dict(good, gt=3), good]) + "\n")
    report = BadRowReport(skip=True)
    assert [r["_where"].row for r in read_opa(str(path), report)] == [0, 2]
    assert [(s["row"], s["field"]) for s in report.skipped] == [(1, "gt")]
