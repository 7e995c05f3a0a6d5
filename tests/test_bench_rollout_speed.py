"""benchmarks.rollout_speed on a prompt file of fewer prompts than --n."""
import json

from benchmarks.rollout_speed import main


def test_fewer_prompts_than_n_are_all_timed_both_ways(world, tiny, tmp_path):
    """One at a time went on past the file's last prompt and stopped with 'max() arg is an empty sequence'."""
    rows = json.loads((world / "ppo_prompts.json").read_text())[:2]
    (tmp_path / "prompts.json").write_text(json.dumps(rows))
    out = main(["--model", str(tiny), "--data", str(tmp_path / "prompts.json"), "--image_folder",
                str(world / "images"), "--n", "5", "--max_new_tokens", "2", "--device", "cpu"])
    assert out["batched"] > 0 and out["one_at_a_time"] > 0
