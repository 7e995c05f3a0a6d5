"""benchmarks.dpo_layouts: both layouts time the same pairs and agree on their log-probs, on prompts of a few
hundred image tokens (the family's processor set to larger images)."""
import json

import benchmarks.dpo_speed as speed
from benchmarks.dpo_layouts import main


def test_both_layouts_score_the_same_pairs_alike(world, tmp_path, monkeypatch, capsys):
    rows = json.loads((world / "preference_train.json").read_text())[:4]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    monkeypatch.setattr(speed, "make_data", lambda work, n: (tmp_path / "pairs.json", world / "images"))
    (r,) = main(["--archs", "qwen2_vl", "--pairs", "4", "--batch", "2", "--repeats", "1", "--work",
                 str(tmp_path / "work")])
    assert r["pairs"] == 4 and r["prompt_tokens"] > 256  # 256 image tokens per prompt
    assert r["max_logp_diff"] < 1e-4 and r["fast_pairs_s"] > 0 and r["plain_pairs_s"] > 0
    assert r["ratio"] == r["runs"][0] and "| qwen2_vl |" in capsys.readouterr().out
