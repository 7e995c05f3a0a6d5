"""Row pieces the format parsers share (training/data/row_parts.py), beyond tests/test_data_formats.py."""
import json

import pytest
from PIL import Image

from training.data.bad_rows import BadRowError
from training.data.formats import read_prompts, read_sft


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "images"
    r.mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "green")):
        Image.new("RGB", (8, 8), colour).save(r / name)
    return r


def _json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def test_a_rows_own_answer_field_wins_over_its_choice_index(tmp_path, root):
    """A row with an answer field and choices + correct_choice_idx keeps the answer as given: the option's letter
    was added beside it, and PPO's --correct_bonus (the first of ANSWER_FIELDS) read the letter, not the answer."""
    rows = _json(tmp_path / "p.json", [{"id": "a", "image": "a.png", "conversations": _turns("<image>\nWhich?"),
                                        "choices": ["cat", "dog"], "correct_choice_idx": 1, "gt_answer": "dog"}])
    assert read_prompts(rows, str(root))[0].meta == {"gt_answer": "dog"}


def test_comma_separated_images_may_have_spaces_after_the_commas(tmp_path, root):
    """Vision-LLM-Alignment's "a.png, b.png": each name without its spaces (" b.png" was no file)."""
    rows = _json(tmp_path / "s.json", [{"id": "m", "image": "a.png, b.png",
                                        "conversations": _turns("<image>\nQ?", "A.")}])
    (r,) = read_sft(rows, str(root))
    assert r.images == [str(root / "a.png"), str(root / "b.png")]
    assert r.messages[0].content == "<image>\n<image>\nQ?"


@pytest.mark.parametrize("key", ["image", "url", "path"])
def test_trl_images_inline_in_the_content_count_where_the_images_column_is_empty(tmp_path, root, key):
    """TRL messages whose image parts name their source ({"type": "image", "url": ...}, transformers' chat format)
    and an empty images column: the parts' sources are the row's images (the empty column won: no image)."""
    content = [{"type": "image", key: "b.png"}, {"type": "text", "text": "Colour?"}]
    rows = _json(tmp_path / "t.json", [{"messages": [{"role": "user", "content": content},
                                                     {"role": "assistant", "content": "Green."}], "images": []}])
    (r,) = read_sft(rows, str(root))
    assert r.images == [str(root / "b.png")] and r.messages[0].content == "<image>\nColour?"


def test_a_trl_assistant_message_of_blanks_is_a_bad_row(tmp_path, root):
    """An assistant message of white space alone has no response to train on: a bad row naming its content."""
    rows = _json(tmp_path / "t.json", [{"messages": [{"role": "user", "content": "Hi?"},
                                                     {"role": "assistant", "content": " \n "}], "images": []}])
    with pytest.raises(BadRowError, match=r"messages\[1\]\.content.*empty response"):
        read_sft(rows, None)
