"""The reward model's figures and loss choice on small hand-made tensors. Each test names the plausible bug (a
mutation of training/rm/trainer.py) that every other test let through."""
import pytest
import torch

from training.losses import ranked_pairs
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


class _Engine:
    """An engine stand-in: records the losses handed to backward (and backpropagates them)."""

    def __init__(self):
        self.losses = []

    def get_lr(self):
        return [0.1]

    def backward(self, loss):
        self.losses.append(float(loss.detach()))
        loss.backward()

    def step(self):
        pass


class _OneRank:
    world_size, rank, device = 1, 0, "cpu"

    def all_reduce(self, x, op="sum"):
        return torch.as_tensor(x, dtype=torch.float64).detach().clone()


def _rm_step(center_coef=0.1):
    """RMTrainer._step over two micro-batches (accumulation 2, one rank), Bradley-Terry over every pair: a ranked
    list of three (4, 2, 0), 3 pairs, then a pair (2, 0). -> (trainer, its engine, the step's figures, rewards)."""
    from types import SimpleNamespace

    from training.rm.trainer import RMTrainer

    t = object.__new__(RMTrainer)
    t.s, t.engine, t.loss_kind = _OneRank(), _Engine(), "bradley_terry"
    t.cfg = {"optim": SimpleNamespace(gradient_accumulation_steps=2),
             "rm": SimpleNamespace(margin=0.0, center_coef=center_coef)}
    R = [torch.tensor([[4.0, 2.0, 0.0]], requires_grad=True), torch.tensor([[2.0, 0.0]], requires_grad=True)]
    batches = [SimpleNamespace(sizes=[r.shape[1]], margins=None, n_tokens=10, R=r) for r in R]
    t._rewards = lambda b: (b.R, torch.ones_like(b.R, dtype=torch.bool))
    return t, t.engine, RMTrainer._step(t, batches), R


def _bt(d):
    """-log sigmoid(d) = log(1 + e^-d)."""
    return torch.nn.functional.softplus(-torch.as_tensor(d, dtype=torch.float64))


def test_each_micro_batchs_loss_is_its_share_of_the_mean_over_the_steps_pairs():
    """The step's 4 pairs (3 of the list, 1 of the pair): micro-batch k backpropagates its pairs' summed loss x
    accumulation / 4 (DeepSpeed divides by the accumulation). Counting a list of n as n - 1 units (or n) instead of
    its n (n - 1) / 2 pairs scaled every update and passed every test (the invariance tests scale both runs alike)."""
    _, engine, _, _ = _rm_step(center_coef=0.0)
    list_sum, pair_sum = 2 * _bt(2.0) + _bt(4.0), _bt(2.0)
    assert engine.losses == pytest.approx([float(list_sum * 2 / 4), float(pair_sum * 2 / 4)], rel=1e-6)


def test_the_centering_term_trains_and_is_logged_as_a_mean_over_micro_batches():
    """Centering 0.1 |mean(r_w + r_l)| per micro-batch: 0.1 x (6 + 4 + 2) / 3 = .4 for the list, 0.1 x 2 = .2 for
    the pair; the logged loss is the mean over the 4 pairs plus the mean of the two terms, .3. The term detached
    (no gradient: no centering at all) or logged summed over micro-batches (.6) passed every test."""
    _, engine, out, R = _rm_step(center_coef=0.1)
    list_sum, pair_sum = 2 * _bt(2.0) + _bt(4.0), _bt(2.0)
    assert engine.losses == pytest.approx([float(list_sum / 2 + 0.4), float(pair_sum / 2 + 0.2)], rel=1e-6)
    assert out["loss"] == pytest.approx(float((list_sum + pair_sum) / 4) + 0.3, rel=1e-6)
    for r in R:  # the gradient of loss_sum / 2 + centering, by autograd on fresh leaves
        x = r.detach().clone().requires_grad_(True)
        i, j = ranked_pairs(x.shape[1])
        b, w = x[0, i], x[0, j]
        (torch.nn.functional.softplus(-(b - w)).sum() / 2 + 0.1 * (b + w).mean().abs()).backward()
        torch.testing.assert_close(r.grad, x.grad)
