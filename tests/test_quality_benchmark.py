"""benchmarks.quality's seed handling (the training runs themselves are the benchmark, not a test)."""
import pytest

from benchmarks.quality import mean_sd, seed_runs


def test_seed_runs_first_is_the_default_then_named_seeds():
    runs = seed_runs("output/ppo", ["--from_checkpoint", "s"], 3, "--seed", 1234)
    assert runs == [("output/ppo", ["--from_checkpoint", "s"]),
                    ("output/ppo_seed1", ["--from_checkpoint", "s", "--seed", "1235"]),
                    ("output/ppo_seed2", ["--from_checkpoint", "s", "--seed", "1236"])]
    assert seed_runs("output/dpo", [], 1, "--seed", 1234) == [("output/dpo", [])]


def test_mean_and_sample_sd_over_seeds():
    mean, sd = mean_sd([{"recall": 0.94, "CHAIRi": 0.02}, {"recall": 0.96, "CHAIRi": 0.04}])
    assert mean == pytest.approx({"recall": 0.95, "CHAIRi": 0.03})
    assert sd["recall"] == pytest.approx(0.02 / 2 ** 0.5)  # sample sd of two values: |a - b| / sqrt(2)
    assert mean_sd([{"recall": 0.9}])[1] == {"recall": 0.0}
