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


def test_a_folder_of_two_datasets_is_refused_naming_both_files(tmp_path):
    """POPE ships COCO, A-OKVQA and GQA files of each split: a folder of two took the first by name, silently."""
    for name in ("coco/coco_pope_random.json", "gqa/gqa_pope_random.json", "coco/coco_pope_popular.json",
                 "coco/coco_pope_adversarial.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    with pytest.raises(ValueError, match=r"2 files for POPE's random split .*coco_pope_random.*gqa_pope_random"):
        split_files(tmp_path)
    assert split_files(tmp_path / "coco") == {s: tmp_path / "coco" / f"coco_pope_{s}.json"
                                              for s in ("random", "popular", "adversarial")}
