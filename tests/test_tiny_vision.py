"""The tiny VLM's vision tower: hybrid (conv stem + ViT) config, tagging pre-training, rebuild on change."""
import json
import random

import pytest
import torch

from training.model import tiny
from training.model.tiny_vision import MAX_COUNT, POOL_SEED, _targets, image_tokens, pretrain_vision_tower, scene_pool
from training.world.scenes import BACKGROUNDS, COLORS, KINDS, Obj, Scene, sample_scene


@pytest.mark.parametrize("tower", tiny.VISION_TOWERS)
def test_each_tower_gives_one_token_per_8x8_cell_after_cls(tower):
    from transformers import AutoModel
    enc = AutoModel.from_config(tiny.vision_config(hidden=32, layers=1, tower=tower))
    assert image_tokens(enc, torch.zeros(2, 3, 64, 64)).shape == (2, 64, 32)
    with pytest.raises(ValueError, match="hybrid"):
        tiny.vision_config(tower="resnet")


def test_targets_of_a_known_scene():
    scene = Scene("s", "gray", (Obj("circle", "red", 6, 10, 10), Obj("circle", "blue", 6, 30, 30),
                                Obj("star", "red", 7, 50, 50)))
    tags, counts = _targets(scene)
    assert tags == [1, 0, 0, 0, 0, 1] + [1, 0, 1, 0, 0, 0] + [0, 1, 0, 0]  # kinds, colours, background
    assert len(tags) == len(KINDS) + len(COLORS) + len(BACKGROUNDS)
    assert counts == [2, 0, 0, 0, 0, 1]


def test_pool_is_deterministic_and_not_the_worlds_scenes():
    a, b = scene_pool(6), scene_pool(6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert int(a[2].max()) <= MAX_COUNT and a[0].shape == (6, 3, 64, 64)
    # the world draws its scenes from random.Random(world seed), the pool from its own seed: no pool
    # scene's objects (kinds, colours, sizes, positions) equal a default-world scene's
    rng = random.Random(0)
    world = {sample_scene(rng, f"w{i}").objects for i in range(500)}
    rng = random.Random(POOL_SEED)
    pool = [sample_scene(rng, f"p{i}").objects for i in range(500)]
    assert not world.intersection(pool)
    first = sample_scene(random.Random(POOL_SEED), "x")  # scene_pool draws from that same seed
    assert a[1][0].tolist() == _targets(first)[0] and a[2][0].tolist() == _targets(first)[1]


def test_pretraining_lowers_the_tagging_loss():
    from transformers import AutoModel
    torch.manual_seed(0)
    enc = AutoModel.from_config(tiny.vision_config(hidden=32, layers=1))
    hist = pretrain_vision_tower(enc, 32, steps=150, n_scenes=64, batch=16, lr=3e-3, progress=False)

    def mean(key, part):
        return sum(h[key] for h in part) / len(part)
    assert mean("tag_loss", hist[-10:]) < 0.75 * mean("tag_loss", hist[:10])
    assert mean("count_loss", hist[-10:]) < mean("count_loss", hist[:10])
    assert not enc.training


def test_tiny_vlm_is_rebuilt_when_pretraining_changes(tmp_path, monkeypatch):
    calls = []
    real = tiny.build_tiny_vlm
    monkeypatch.setattr(tiny, "build_tiny_vlm", lambda *a, **k: calls.append(a) or real(*a, **k))
    tiny.ensure_tiny_vlm(tmp_path, hidden=32, layers=1, vision_pretrain_steps=0)
    tiny.ensure_tiny_vlm(tmp_path, hidden=32, layers=1, vision_pretrain_steps=0)
    assert len(calls) == 1
    tiny.ensure_tiny_vlm(tmp_path, hidden=32, layers=1, vision_pretrain_steps=2)
    assert len(calls) == 2
    assert json.loads((tmp_path / "tiny_vlm.json").read_text())["vision_pretrain_steps"] == 2
