"""Another stage's data file: rows that another kind's format reads whole say so in their bad-row message. SFT
conversations given to DPO failed as "expected a ranked list" and the message offered --skip_bad_rows, which would
have skipped every row of the wrong file."""
import json

import pytest

from training.data.bad_rows import BadRowError, BadRowReport
from training.data.formats import read_preferences


def test_sft_rows_given_as_preferences_are_named_as_sft_data(world):
    with pytest.raises(BadRowError, match=r"row 0: .*expected a ranked list.*; the row reads whole as SFT data: "
                                          r"is this the file this stage wants\?"):
        read_preferences([str(world / "sft_train.json")], str(world / "images"))


def test_a_later_bad_row_of_a_preference_file_gets_no_such_hint(world, tmp_path):
    """A one-answer "ranking" reads whole as a prompt with its reference answer: only the file's first row, where a
    wrong file shows, is read as the other kinds."""
    rows = json.loads((world / "preference_train.json").read_text())[:3]
    rows[1]["conversations"][1]["value"] = [rows[1]["conversations"][1]["value"][0]]  # a one-answer "ranking"
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows))
    report = BadRowReport(skip=True)
    assert len(read_preferences([str(path)], str(world / "images"), report)) == 2
    (skipped,) = report.skipped
    assert skipped["row"] == 1 and "reads whole as" not in skipped["reason"], skipped
