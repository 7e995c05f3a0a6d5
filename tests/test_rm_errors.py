"""benchmarks.rm_errors: the share of scenes where the reward model prefers the faithful description, and the raw
score percentiles PPO's --reward_clip is read against."""
import pytest
import torch
from sft_helpers import make_reward_model

from benchmarks.rm_errors import main, percentiles


def test_percentiles_hand_worked():
    assert percentiles(torch.arange(11.0)) == pytest.approx([1.0, 2.5, 5.0, 7.5, 9.0])  # linear interpolation


def test_rm_errors_end_to_end(world, tiny, tmp_path, capsys):
    """The faithful row's percentiles are those of the reward model's own scores of the faithful descriptions (scored
    here apart), and the printed table holds the returned figures."""
    import json

    from training.data.images import load_image
    from training.data.records import Message
    from training.rm.data import RewardScorer
    from training.rm.model import load_reward_model
    from training.rm.quality import _scene
    from training.world.generate import DESCRIBE
    from training.world.scenes import describe, facts

    rm = make_reward_model(tiny, tmp_path / "rm")
    rows = main(["--reward_model", str(rm), "--world", str(world)])
    out = capsys.readouterr().out
    scenes = [_scene(s) for s in json.loads((world / "world.json").read_text())["scenes"]["heldout"]]
    model, processor, arch = load_reward_model(str(rm))
    good = RewardScorer(model, processor, arch, 512, 64).score(
        [[Message("user", "<image>\n" + DESCRIBE)]] * len(scenes),
        [[load_image(f"{s.id}.png", str(world / "images"))] for s in scenes],
        [describe(s) for s in scenes], [facts(s) for s in scenes])
    assert rows["faithful"]["score_percentiles"] == pytest.approx(percentiles(good), abs=1e-4)
    assert rows["faithful"]["scenes"] == len(scenes) == rows["add"]["scenes"]
    for name in ("add", "swap", "count", "omit"):
        r = rows[name]
        assert f"| {name} | {r['scenes']} | {r['faithful_preferred']:.3f} | {r['mean_margin']:+.3f} |" in out
