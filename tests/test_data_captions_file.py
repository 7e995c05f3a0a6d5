"""The captions file (--captions_file, LLaVA-RLHF's image_to_caption.json) a stage cannot open is refused as a data
file it cannot open is, naming it."""
import pytest

from training.data.formats import read_captions
from training.data.readers import DataFormatError


@pytest.mark.parametrize("name", ["no_such.json", "a_folder"])
def test_a_captions_file_that_cannot_be_opened_is_named(tmp_path, name):
    """A missing captions file stopped the reward model's or PPO's training, after its model was loaded, on a bare
    FileNotFoundError traceback (a folder: IsADirectoryError); a missing data file was a DataFormatError."""
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(DataFormatError, match=rf"{name}: not a JSON file of captions \(\[Errno"):
        read_captions(str(tmp_path / name))


def test_captions_are_looked_up_by_path_then_file_name_then_stem():
    """A captions file keying both "COCO_1.jpg" and "COCO_1" gives the file name's entry for COCO_1.jpg; a path
    key wins over both; a row of several images is looked up by its first."""
    from training.data.captions import caption_facts
    caps = {"images/COCO_1.jpg": ["by path"], "COCO_1.jpg": ["by name"], "COCO_1": ["by stem"], "COCO_2": ["two"]}
    assert caption_facts(["images/COCO_1.jpg"], "image", {"captions": caps}) == ["by path"]
    assert caption_facts(["other/COCO_1.jpg"], "image", {"captions": caps}) == ["by name"]
    assert caption_facts(["other/COCO_2.png"], "image", {"captions": caps}) == ["two"]
    assert caption_facts(["other/COCO_2.png", "images/COCO_1.jpg"], "image", {"captions": caps}) == ["two"]


def test_one_caption_as_text_is_a_list_of_one_and_an_empty_captions_file_has_none():
    """An entry may be one caption (text) or a list; an empty captions file ({}) holds no image's captions: a bad
    row, not a row without facts."""
    from training.data.captions import caption_facts
    from training.data.readers import RowProblem
    assert caption_facts(["a.jpg"], "image", {"captions": {"a.jpg": "A bus."}}) == ["A bus."]
    with pytest.raises(RowProblem, match="no captions for image 'a.jpg'"):
        caption_facts(["a.jpg"], "image", {"captions": {}})
    assert caption_facts(["a.jpg"], "image", {}) == []
