"""Field variants of the published formats (data_formats.md) read through each stage's reader: image fields by
every name a format gives them, and images given as a {bytes, path} struct."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from training.data.formats import read_preferences, read_prompts


def _png(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, "PNG")
    return buf.getvalue()


RED = _png()


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "images"
    r.mkdir()
    (r / "a.png").write_bytes(RED)
    (r / "b.png").write_bytes(_png((0, 255, 0)))
    return r


def _json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def test_a_question_files_images_list_is_its_images(tmp_path, root):
    """A question row whose images are under `images` (a list) became a text-only question: the field was left out
    of the meta as an image field, but never read as one."""
    path = _json(tmp_path / "q.json", [{"question_id": 1, "images": ["a.png", "b.png"], "text": "Which is red?"}])
    (q,) = read_prompts(path, str(root))
    assert q.images == [str(root / "a.png"), str(root / "b.png")]
    assert q.prompt[0].content == "<image>\n<image>\nWhich is red?"
    assert q.meta == {"question_id": 1}


def _rlhf_row(image, **kw):
    return {"id": "p0", "image": image, "preference": 2,
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": ""}],
            "output_1": {"from": "llava", "value": "A car."}, "output_2": {"from": "llava", "value": "A bus."}, **kw}


def test_captions_of_an_image_struct_are_looked_up_by_its_path(tmp_path, root):
    """LLaVA-RLHF rows in parquet (or a saved / Hub dataset) hold the image as a {bytes, path} struct: its captions
    were looked up by the struct's text (bytes and all), so every row was bad, its message the image's bytes."""
    captions = _json(tmp_path / "image_to_caption.json", {"a.png": ["A red square."]})
    path = _parquet(tmp_path / "pref.parquet", [_rlhf_row({"bytes": RED, "path": "a.png"})])
    (rec,) = read_preferences(path, str(root), captions_file=captions)
    assert (rec.responses, rec.facts, rec.images) == (["A bus.", "A car."], ["A red square."], [RED])
    prompts = _parquet(tmp_path / "ppo.parquet", [{"id": "q", "image": {"bytes": RED, "path": "a.png"},
                                                   "conversations": [{"from": "human", "value": "<image>\nQ?"}]}])
    (p,) = read_prompts(prompts, str(root), captions_file=captions)
    assert p.facts == ["A red square."]


def test_an_image_without_a_name_has_no_captions_and_says_so_briefly(tmp_path, root):
    from training.data.bad_rows import BadRowError
    captions = _json(tmp_path / "image_to_caption.json", {"a.png": ["A red square."]})
    path = _parquet(tmp_path / "pref.parquet", [_rlhf_row({"bytes": RED, "path": None})])
    with pytest.raises(BadRowError, match=r"row 0: field 'image': .*no file name") as err:
        read_preferences(path, str(root), captions_file=captions)
    assert len(str(err.value)) < 400  # not the image's bytes



@pytest.mark.parametrize("preference", [1, 2])
def test_a_bad_llava_rlhf_output_is_named_by_its_own_field(tmp_path, root, preference):
    """A bad output of a LLaVA-RLHF row was named by its place in the ranked pair under both fields' names: the
    output_2 of a row preferring it was 'output_1/output_2[0]', read as output_1."""
    from training.data.bad_rows import BadRowError
    row = _rlhf_row("a.png", preference=preference, output_2={"from": "llava", "value": "A <image> bus."})
    with pytest.raises(BadRowError, match=r"row 0: field 'output_2': '<image>' in a response"):
        read_preferences(_json(tmp_path / "pref.json", [row]), str(root))
