"""The reward model's figures and loss choice on small hand-made tensors. Each test names the plausible bug (a
mutation of training/rm/trainer.py) that every other test let through."""
import torch

from training.rm.trainer import pair_stats, summarize


def test_a_tie_is_no_correct_pair():
    """accuracy = mean(r_w > r_l) (shared/reference/algorithms.md): a pair scored alike is not ranked right. Counting
    ties as correct (>=) passed every test, and an untrained reward model that scores everything alike read 100%."""
    stats = summarize(pair_stats(torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.ones(2, 2, dtype=torch.bool)))
    assert stats["accuracy"] == 0.5
    assert summarize(pair_stats(torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.bool)))["accuracy"] == 0.0
