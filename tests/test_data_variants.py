"""Field variants of the published formats (data_formats.md) read through each stage's reader: image fields by
every name a format gives them, and images given as a {bytes, path} struct."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from training.data.formats import read_prompts


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

