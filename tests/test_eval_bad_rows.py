"""A benchmark file with a row that lacks a field the scorer reads is refused before any answer is generated, by an
error naming the file, the row and the field (it was a bare KeyError, some only after every answer was made)."""
import argparse
import json

import pytest

from eval import pope


def test_pope_row_without_image_or_text(tmp_path):
    f = tmp_path / "coco_pope_random.json"
    f.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"}) + "\n"
                 + json.dumps({"question_id": 2, "text": "Is there a cat?", "label": "no"}) + "\n")
    with pytest.raises(ValueError, match=r"coco_pope_random\.json: row 1: no 'image' field"):
        pope.questions(argparse.Namespace(data=str(f), pope_suffix=""))
