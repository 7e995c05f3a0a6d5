"""Format detection when a file's first rows are bad or are no objects: bad rows, not a refused file, read in
linear time; an image name with a comma (split from test_data_formats.py)."""
import json

import pytest
from test_data_formats import BAD_ROWS, GOOD_SFT, _json, _turns, root  # noqa: F401  (root: the image-root fixture)

from training.data.bad_rows import BadRowError, BadRowReport
from training.data.formats import DataFormatError, read_sft
from training.data.records import RowRef


@pytest.mark.parametrize("case", ["trl row lacks prompt", "rlhf row lacks conversations",
                                  "question row lacks question"])
def test_a_bad_first_row_is_a_bad_row_not_a_refused_file(case, tmp_path, root):
    """The format was taken from the first row only: a first row lacking a field of its format refused the whole
    file ("match no known format") even with skipping on. It is that row's bad field now."""
    reader, good, bad, field, reason = BAD_ROWS[case]
    path = _json(tmp_path / "data.json", ["not a row", bad, good, good])
    with pytest.raises(BadRowError) as info:
        reader(path, str(root))
    assert (info.value.where, info.value.field_name) == (RowRef(path, 0), "<row>")
    report = BadRowReport(skip=True)
    assert [r.source.row for r in reader(path, str(root), report)] == [2, 3]
    assert [(s["row"], s["field"]) for s in report.skipped] == [(0, "<row>"), (1, field)]
    assert reason in report.skipped[1]["reason"]


def test_a_file_with_no_row_of_a_known_format_is_refused_naming_its_first(tmp_path, root):
    path = _json(tmp_path / "foo.json", [{"foo": k} for k in range(100)] + [GOOD_SFT])
    with pytest.raises(DataFormatError, match=r"foo\.json: row 0 has fields \['foo'\], which match no known SFT"):
        read_sft(path, str(root), BadRowReport(skip=True))
    path = _json(tmp_path / "bar.json", [3, {"bar": 1}])
    with pytest.raises(DataFormatError, match=r"bar\.json: row 1 has fields \['bar'\]"):
        read_sft(path, str(root), BadRowReport(skip=True))


def test_rows_that_are_no_objects_are_read_in_linear_time(tmp_path):
    """Rows read before the format was known were all held and recounted per row: 20,000 invalid JSON Lines lines
    took 12 s (quadratic); they are bad rows at once, and a stopping report names the first."""
    import time
    path = tmp_path / "junk.jsonl"
    path.write_text("".join(f"not json {k}\n" for k in range(20000)))
    t = time.time()
    with pytest.raises(BadRowError, match=r"junk\.jsonl: row 0: field '<row>'"):
        read_sft(str(path), None)
    report = BadRowReport(skip=True)
    assert read_sft(str(path), None, report) == [] and len(report.skipped) == 20000
    assert time.time() - t < 5


def test_first_bad_row_in_file_order_and_line_numbers(tmp_path, root):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        GOOD_SFT, dict(GOOD_SFT, conversations=_turns("<image>\nQ", "")), dict(GOOD_SFT, image="nope.jpg")]))
    with pytest.raises(BadRowError, match=r"d\.jsonl: row 1: field 'conversations\[1\]\.value'"):
        read_sft(str(path), str(root))
    report = BadRowReport(skip=True)
    assert len(read_sft([str(path), str(path)], str(root), report)) == 2
    assert [(s["row"], s["field"]) for s in report.skipped] == [(1, "conversations[1].value"), (2, "image")] * 2
    assert report.counts() == {"conversations[1].value: empty response": 2, "image: file not found": 2}


def test_an_image_name_with_a_comma_that_is_a_file_is_one_image(tmp_path):
    """Vision-LLM-Alignment writes two images as "a.png,b.png"; a LLaVA image named "x,1.png" that is a file in the
    image root is that one image (it was split and refused: 'file not found: x')."""
    from PIL import Image

    from training.data.formats import read_prompts
    for name in ("x,1.png", "a.png", "b.png"):
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / name)
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Red."}]
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "one", "image": "x,1.png", "conversations": turns},
                                {"id": "two", "image": "a.png,b.png", "conversations": turns}]))
    one, two = read_sft(str(data), str(tmp_path))
    assert one.images == [str(tmp_path / "x,1.png")]
    assert two.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert [len(r.images) for r in read_prompts(str(data), None)] == [1, 2]  # root: the data file's folder


def test_two_data_files_each_read_their_own_folders_image_of_one_name(tmp_path):
    """Without --image_folder a file's images are in its own folder; the images checked are remembered by name for
    the rows that reuse them. Remembering them by name alone (not with their folder) passed every test, and gave
    the second file the first one's "a.png", another image, without a word."""
    from PIL import Image
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Red."}]
    paths = []
    for name, colour in (("one", (255, 0, 0)), ("two", (0, 0, 255))):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), colour).save(tmp_path / name / "a.png")
        paths.append(_json(tmp_path / name / "d.json", [{"image": "a.png", "conversations": turns}]))
    first, second = read_sft(paths, None)
    assert (first.images, second.images) == ([str(tmp_path / "one" / "a.png")], [str(tmp_path / "two" / "a.png")])
