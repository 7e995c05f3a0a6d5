"""The reference cache's key (training/dpo/refcache.py cache_key): every input it stands for changes it, and a rerun
with all of them unchanged finds the same key. tests/test_dpo.py runs whole DPO stages for the model and an image."""
import os
from types import SimpleNamespace

import pytest

from training.dpo.refcache import cache_key


def _touch_later(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))


def test_the_cache_key_follows_the_model_data_images_and_settings(tmp_path):
    model, other = tmp_path / "model", tmp_path / "other"
    for m, w in ((model, "w"), (other, "w2")):
        m.mkdir()
        (m / "config.json").write_text("{}")
        (m / "model.safetensors").write_text(w)
    data, data2 = tmp_path / "pairs.json", tmp_path / "more.json"
    data.write_text("[]")
    data2.write_text("[]")
    (tmp_path / "i.png").write_bytes(b"png")
    records = [SimpleNamespace(images=[str(tmp_path / "i.png")])]
    settings = {"max_seq_len": 64, "K": 2}

    def key(**kw):
        args = {"checkpoint": str(model), "data_paths": [str(data)], "settings": settings, "records": records,
                "image_root": "", **kw}
        return cache_key(**args)

    base = key()
    assert key() == base and len(base) == 16
    changed = [key(checkpoint=str(other)), key(data_paths=[str(data), str(data2)]),
               key(settings={**settings, "max_seq_len": 128}), key(records=[])]
    assert len({base, *changed}) == 1 + len(changed)
    _touch_later(tmp_path / "i.png")  # an image rewritten in place
    assert key() != base
    base = key()
    _touch_later(data)  # the data file rewritten
    assert key() != base
    base = key()
    (model / "model.safetensors").write_text("retrained")  # the model retrained in place
    assert key() != base


def test_reference_batches_are_made_one_ahead_in_order():
    """The reference pass encodes batch i+1 (tokenising, image processing) in a worker thread while batch i runs
    through the model: results come in the jobs' order, the next job starts before the caller is done with the
    current one, and a job's error reaches the caller."""
    import threading

    from training.dpo.refcache import made_ahead

    started = [threading.Event() for _ in range(3)]

    def make(i):
        started[i].set()
        return i * 10

    got = []
    for i, x in enumerate(made_ahead(make, [0, 1, 2])):
        got.append(x)
        assert i + 1 == 3 or started[i + 1].wait(10), f"job {i + 1} not started while job {i}'s result was in use"
    assert got == [0, 10, 20] and list(made_ahead(make, [])) == []

    def bad(i):
        if i == 1:
            raise ValueError("row 1: no image")
        return i

    it = made_ahead(bad, [0, 1, 2])
    assert next(it) == 0
    with pytest.raises(ValueError, match="row 1: no image"):
        next(it)
