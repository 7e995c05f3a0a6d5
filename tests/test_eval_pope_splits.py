"""POPE's split files (eval/pope.py split_files): which split a file is, and a folder of more than one dataset."""
import pytest

from eval.pope import split_files


@pytest.mark.parametrize("name, split", [("coco_pope_random.json", "random"), ("aokvqa_pope_popular.jsonl", "popular"),
                                         ("gqa_pope_adversarial.json", "adversarial"), ("mine.json", "mine")])
def test_one_file_is_the_split_its_name_says(tmp_path, name, split):
    """--data FILE: the split is named by the file (its results' keys: random_f1, ...), else the file's stem (it was
    the stem always: coco_pope_random_f1)."""
    f = tmp_path / name
    f.write_text("")
    assert split_files(f) == {split: f}