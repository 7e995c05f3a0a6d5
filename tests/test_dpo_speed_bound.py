"""benchmarks.dpo_speed: its one-epoch multiply-add bound, against a hand count on a stand-in checkpoint; TRL's
optimizer steps, those of ours."""
import json

import torch
from safetensors.torch import save_file

from benchmarks.dpo_speed import madd_bound


def test_bound_counts_each_part_as_each_side_runs_it(tmp_path):
    # 16/8 -> 4 patches (+1 class token in the tower); vision 10, projector 2, language model 12 (layer 0: 3; the
    # last, layer 1: key and value projections 2 + 2, the rest 5), head 1 weights; embeddings (lookups) do not count
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"image_size": 16, "patch_size": 8}}))
    lm = "model.language_model.layers."
    save_file({"model.vision_tower.w": torch.zeros(2, 5), "model.multi_modal_projector.w": torch.zeros(2),
               lm + "0.w": torch.zeros(3), lm + "1.self_attn.k_proj.weight": torch.zeros(2),
               lm + "1.self_attn.v_proj.weight": torch.zeros(2), lm + "1.mlp.w": torch.zeros(5),
               "lm_head.weight": torch.zeros(1),
               "model.language_model.embed_tokens.weight": torch.zeros(100)}, str(tmp_path / "model.safetensors"))
    whole, shared, lm_only = madd_bound(tmp_path, 10, [1, 2])  # P = 10, R = 3 over both responses
    image = 10 * 5 + 2 * 4
    trl = 2 * image + (12 + 1) * (2 * 10 + 3)  # 415
    sharing = image + 12 * (10 + 3) + 1 * 3  # 217
    ours = image + (3 + 2 + 2) * (10 + 3) + 5 * (3 + 1) + 1 * 3  # 172: the last layer's rest on R + 1 tokens
    assert abs(whole - trl / ours) < 1e-12 and abs(whole - 415 / 172) < 1e-12
    assert abs(shared - trl / sharing) < 1e-12 and abs(shared - 415 / 217) < 1e-12
    assert abs(lm_only - 23 / 13) < 1e-12


def test_trl_takes_the_optimizer_steps_ours_takes(tmp_path):
    """64 pairs in batches of 8 hid it: with pairs not a multiple of the batch TRL also trained on a last, partial
    batch (12 pairs, batch 8: 2 steps, counted as 16 pairs), ours on whole batches only (1 step, 8 pairs)."""
    from types import SimpleNamespace

    from transformers import Trainer

    from benchmarks.dpo_speed import trl_config
    from training.engine.loop import StepPlan

    a = SimpleNamespace(work=str(tmp_path), batch=8, epochs=1, precision="fp32")
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=trl_config(a, cuda=False),
                      train_dataset=[{"x": [float(i)]} for i in range(12)], data_collator=lambda rows: rows)
    assert len(trainer.get_train_dataloader()) == StepPlan.make(12, 8, 1, 1, 1, 0).steps_per_epoch == 1


def test_the_pairs_asked_for_are_the_default_worlds_first_pairs(tmp_path, monkeypatch):
    """A world made in --work for a smaller --pairs was reused: --pairs 6 after --pairs 4 trained 4 pairs under a
    heading of 6. And without data/world the benchmark made a small world of its own, other scenes with shorter
    answers than the default world's: its figures depended on whether the main job had run in the checkout. The
    pairs are now always the default world's first ones (made in data/world when missing, as the stages make it)."""
    import pytest

    import benchmarks.dpo_speed as bench
    import training.world.generate as gen

    small = gen.WorldConfig
    monkeypatch.setattr(gen, "WorldConfig", lambda seed=0: small(seed=seed, n_sft=2, n_pref=8, n_ppo=1, n_heldout=1))
    monkeypatch.setattr(bench, "ROOT", tmp_path / "repo")  # no data/world: made there
    world = tmp_path / "repo" / "data" / "world"
    for n in (4, 6):
        data, images = bench.make_data(tmp_path / "work", n)
        assert json.loads(data.read_text()) == json.loads((world / "preference_train.json").read_text())[:n]
        assert images == world / "images"
    with pytest.raises(SystemExit, match="holds 8 preference pairs, fewer than --pairs 9"):
        bench.make_data(tmp_path / "work", 9)
