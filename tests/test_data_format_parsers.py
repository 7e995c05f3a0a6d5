"""Row parsers of training/data/sft_formats.py and preference_formats.py, beyond tests/test_data_formats.py."""
import json

import pytest

from training.data.bad_rows import BadRowError
from training.data.formats import read_preferences


def _json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.mark.parametrize("margin", [True, False])
def test_a_trl_margin_of_true_or_false_is_a_bad_row(tmp_path, margin):
    """bool is a number to Python (True == 1): a margin column of booleans went into the loss as 1.0 and 0.0."""
    row = {"images": [], "prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b",
           "margin": margin}
    with pytest.raises(BadRowError, match="row 0: field 'margin': expected a finite number, got " + str(margin)):
        read_preferences(_json(tmp_path / "p.json", [row]), None)
    assert read_preferences(_json(tmp_path / "q.json", [dict(row, margin=0.5)]), None)[0].margin == 0.5
