"""Text a JSON file spells with an escape that is no Unicode character: a lone surrogate ("\\ud83d" of an emoji cut in
half) is valid JSON, but no tokenizer takes it."""
import json

import pytest
from test_data_formats import GOOD_SFT, RED, _turns

from training.data.bad_rows import BadRowError, BadRowReport
from training.data.formats import read_preferences, read_sft
from training.data.records import RowRef


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_lone_surrogate_in_a_text_is_a_bad_row_naming_its_field(tmp_path, suffix):
    """It was read, and training then stopped inside the tokenizer on a bare TypeError ("TextEncodeInput must be
    Union[TextInputSequence, ...]") naming no file, row or field."""
    root = tmp_path
    (root / "a.jpg").write_bytes(RED)
    bad = {"image": "a.jpg", "conversations": _turns("<image>\nQ", "A cut emoji \ud83d")}
    emoji = {"image": "a.jpg", "conversations": _turns("<image>\nQ", "A whole one \ud83d\ude00")}  # a pair: read
    rows = [GOOD_SFT, bad, emoji]
    path = tmp_path / f"data{suffix}"  # json.dumps writes non-ASCII text as \\u escapes, as many published files
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows))
    with pytest.raises(BadRowError) as info:
        read_sft(str(path), str(root))
    assert (info.value.where, info.value.field_name) == (RowRef(str(path), 1), "conversations[1].value")
    report = BadRowReport(skip=True)
    kept = read_sft(str(path), str(root), report)
    assert [r.source.row for r in kept] == [0, 2] and kept[1].messages[1].content == "A whole one \U0001F600"
    assert [(s["row"], s["field"]) for s in report.skipped] == [(1, "conversations[1].value")]
    pref = tmp_path / "pref.json"
    pref.write_text(json.dumps([{"image": "a.jpg", "conversations": _turns("<image>\nQ", ["good", "b\udc00d"])}]))
    with pytest.raises(BadRowError, match=r"row 0: field 'conversations\[1\]\.value\[1\]'"):
        read_preferences(str(pref), str(root))
