"""The reward model's figures and loss choice on small hand-made tensors. Each test names the plausible bug (a
mutation of training/rm/trainer.py) that every other test let through."""
import torch

from training.rm.trainer import pair_stats, resolve_rank_loss, summarize


def test_a_tie_is_no_correct_pair():
    """accuracy = mean(r_w > r_l) (shared/reference/algorithms.md): a pair scored alike is not ranked right. Counting
    ties as correct (>=) passed every test, and an untrained reward model that scores everything alike read 100%."""
    stats = summarize(pair_stats(torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.ones(2, 2, dtype=torch.bool)))
    assert stats["accuracy"] == 0.5
    assert summarize(pair_stats(torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.bool)))["accuracy"] == 0.0


def test_auto_takes_plackett_luce_when_any_list_is_longer_than_two():
    """--rank_loss auto: Bradley-Terry only when every row is a pair; a file of pairs and ranked lists of three is
    ranked with Plackett-Luce (taking Bradley-Terry when any row was a pair passed every test)."""
    assert resolve_rank_loss("auto", [2, 2, 2]) == "bradley_terry"
    assert resolve_rank_loss("auto", [2, 3, 2]) == "plackett_luce"
    assert resolve_rank_loss("auto", [3, 4]) == "plackett_luce"
    assert resolve_rank_loss("bradley_terry", [3]) == "bradley_terry"
    assert resolve_rank_loss("plackett_luce", [2]) == "plackett_luce"
