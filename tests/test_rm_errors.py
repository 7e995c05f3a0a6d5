"""benchmarks.rm_errors: the share of scenes where the reward model prefers the faithful description, and the raw
score percentiles PPO's --reward_clip is read against."""
import pytest
import torch
from sft_helpers import make_reward_model

from benchmarks.rm_errors import main, percentiles


def test_percentiles_hand_worked():
    assert percentiles(torch.arange(11.0)) == pytest.approx([1.0, 2.5, 5.0, 7.5, 9.0])  # linear interpolation


def test_rm_errors_end_to_end(world, tiny, tmp_path, capsys):
    rm = make_reward_model(tiny, tmp_path / "rm")
    rows = main(["--reward_model", str(rm), "--world", str(world)])
    out = capsys.readouterr().out
    assert "| (none: faithful) |" in out and "--reward_clip" in out
    for name in ("faithful", "add", "swap", "count", "omit"):
        q = rows[name]["score_percentiles"]
        assert len(q) == 5 and q == sorted(q), name
    assert 0 <= rows["add"]["faithful_preferred"] <= 1 and rows["add"]["scenes"] == rows["faithful"]["scenes"]
