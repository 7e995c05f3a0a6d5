"""The reference cache's key (training/dpo/refcache.py cache_key): every input it stands for changes it, and a rerun
with all of them unchanged finds the same key. tests/test_dpo.py runs whole DPO stages for the model and an image."""
import os
from types import SimpleNamespace

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
