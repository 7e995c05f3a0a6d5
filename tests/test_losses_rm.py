"""Reward-model losses against hand-derived values, and Bradley-Terry against TRL's RewardTrainer."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from training.losses import bradley_terry_loss, plackett_luce_loss, ranked_pairs, reward_centering


def test_bradley_terry_hand_derived():
    """r_w = (2, 0), r_l = (0, 0):
        pair 1: -log sigmoid(2) = log(1 + e^-2) = 0.1269280110
        pair 2: -log sigmoid(0) = log 2          = 0.6931471806
        mean = 0.4100375958
    margin m = 1: log(1 + e^-1) = 0.3132616875 and log(1 + e^1) = 1.3132616875, mean 0.8132616875
    centering c = 0.1: |mean(r_w + r_l)| = |(2 + 0) / 2| = 1 -> + 0.1."""
    w, lo = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    assert bradley_terry_loss(w, lo).item() == pytest.approx(0.4100375958, abs=1e-7)
    assert bradley_terry_loss(w, lo, reduction="sum").item() == pytest.approx(0.8200751916, abs=1e-7)
    torch.testing.assert_close(bradley_terry_loss(w, lo, reduction="none"),
                               torch.tensor([0.1269280110, 0.6931471806]), rtol=0, atol=1e-7)
    assert bradley_terry_loss(w, lo, margin=1.0).item() == pytest.approx(0.8132616875, abs=1e-7)
    assert bradley_terry_loss(w, lo, center_coef=0.1).item() == pytest.approx(0.5100375958, abs=1e-7)
    assert reward_centering(torch.tensor([1.0, -3.0]), torch.tensor([0.0, 0.0]), 0.5).item() == pytest.approx(0.5)


def test_bradley_terry_equals_llava_rlhf_bce():
    """LLaVA-RLHF: BCEWithLogits(r1 - r0, choice); choice 1 means r1 is the chosen one."""
    g = torch.Generator().manual_seed(0)
    w, lo = torch.randn(16, generator=g) * 3, torch.randn(16, generator=g) * 3
    bce = torch.nn.functional.binary_cross_entropy_with_logits(w - lo, torch.ones(16))
    torch.testing.assert_close(bradley_terry_loss(w, lo), bce, rtol=0, atol=1e-6)


def _trl_reward_loss(chosen, rejected, margin=None):
    """TRL 1.16 RewardTrainer.compute_loss, run on a stub model whose outputs are the given rewards."""
    from trl import RewardTrainer

    logits = torch.cat([chosen, rejected])[:, None]  # TRL batches chosen then rejected
    stub = SimpleNamespace(
        model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=None),
        accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(len(logits), 1, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(stub, lambda **kw: SimpleNamespace(logits=logits), inputs)


def test_bradley_terry_equals_trl():
    g = torch.Generator().manual_seed(1)
    w, lo = torch.randn(32, generator=g) * 2, torch.randn(32, generator=g) * 2
    torch.testing.assert_close(bradley_terry_loss(w, lo), _trl_reward_loss(w, lo), rtol=0, atol=1e-6)
    m = torch.rand(32, generator=g)
    torch.testing.assert_close(bradley_terry_loss(w, lo, margin=m), _trl_reward_loss(w, lo, m), rtol=0, atol=1e-6)


def test_plackett_luce_hand_derived():
    """r = (1, 0, -1), best first:
        i=0: log(e^1 + e^0 + e^-1) - 1 = log(4.0861612696) - 1 = 0.4076059644
        i=1: log(e^0 + e^-1) - 0       = log(1.3678794412)     = 0.3132616875
        i=2: log(e^-1) - (-1)          = 0
        sum = 0.7208676519
    A list of two, r = (3, 1), padded to 3: log(e^3 + e^1) - 3 = log(1 + e^-2) = 0.1269280110."""
    R = torch.tensor([[1.0, 0.0, -1.0], [3.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    torch.testing.assert_close(plackett_luce_loss(R, mask, reduction="none"),
                               torch.tensor([0.7208676519, 0.1269280110]), rtol=0, atol=1e-7)
    assert plackett_luce_loss(R, mask).item() == pytest.approx((0.7208676519 + 0.1269280110) / 2, abs=1e-7)


def test_plackett_luce_of_two_is_bradley_terry():
    g = torch.Generator().manual_seed(2)
    R = torch.randn(10, 2, generator=g) * 4
    torch.testing.assert_close(plackett_luce_loss(R), bradley_terry_loss(R[:, 0], R[:, 1]), rtol=0, atol=1e-6)


def test_plackett_luce_stable_for_large_rewards_and_padding_grads():
    """exp(1000) overflows float32; logsumexp does not: (1000, 999) -> log(1 + e^-1) = 0.3132616875."""
    R = torch.tensor([[1000.0, 999.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss = plackett_luce_loss(R, mask)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-4)  # float32 ulp at 1000: 6e-5
    loss.backward()
    assert torch.isfinite(R.grad).all() and R.grad[0, 2] == 0


def test_ranked_pairs():
    assert ranked_pairs(3) == ([0, 0, 1], [1, 2, 2])
    assert ranked_pairs(2) == ([0], [1])


def test_the_trainers_loss_and_accuracy_read_the_first_response_as_the_best():
    """The stage's loss and accuracy by hand: rewards (2, 0) with the best first give -log sigmoid(2) = 0.1269280110
    for Bradley-Terry and Plackett-Luce, and accuracy 1; swapped, -log sigmoid(-2) = 2.1269280110 and accuracy 0
    (a reversed pair or comparison passed every test before)."""
    from training.rm.trainer import pair_stats, rank_loss, summarize

    mask = torch.tensor([[True, True]])
    for kind in ("bradley_terry", "plackett_luce"):
        loss, units, _ = rank_loss(torch.tensor([[2.0, 0.0]]), mask, kind, 0.0, 0.0)
        assert (loss.item(), units) == (pytest.approx(0.1269280110, abs=1e-7), 1)
        loss, _, _ = rank_loss(torch.tensor([[0.0, 2.0]]), mask, kind, 0.0, 0.0)
        assert loss.item() == pytest.approx(2.1269280110, abs=1e-7)
    stats = summarize(pair_stats(torch.tensor([[2.0, 0.0], [1.0, 3.0]]), torch.ones(2, 2, dtype=torch.bool)))
    assert stats == {"accuracy": 0.5, "reward_chosen": 1.5, "reward_rejected": 1.5, "reward_margin": 0.0}
    three = torch.tensor([[3.0, 2.0, 1.0]])  # every pair of a ranking in order
    assert summarize(pair_stats(three, torch.ones(1, 3, dtype=torch.bool)))["accuracy"] == 1.0


def test_per_row_margins_apply_to_each_of_the_rows_pairs():
    """Rows (2, 0) with margin 1 and (0, 0) with margin 0: log(1 + e^-1) + log 2 = 0.3132616875 + 0.6931471806;
    a ranked list of three with margin 1 puts it on its three pairs; per-row margins equal TRL's margin column."""
    from training.rm.trainer import list_margins, rank_loss

    two = torch.ones(2, 2, dtype=torch.bool)
    loss, units, _ = rank_loss(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), two, "bradley_terry", [1.0, 0.0], 0.0)
    assert (loss.item(), units) == (pytest.approx(1.0064088681, abs=1e-7), 2)
    three = torch.tensor([[3.0, 2.0, 1.0]])
    loss, units, _ = rank_loss(three, torch.ones(1, 3, dtype=torch.bool), "bradley_terry", [1.0], 0.0)
    assert units == 3 and loss.item() == pytest.approx(2 * math.log(2) + math.log1p(math.exp(-1)), abs=1e-6)
    assert list_margins([None, 0.5], 2, 3.0) == [3.0, 0.5] and list_margins(None, 2, 3.0) == [3.0, 3.0]
    g = torch.Generator().manual_seed(2)
    w, lo, m = torch.randn(8, generator=g), torch.randn(8, generator=g), torch.rand(8, generator=g)
    loss, units, _ = rank_loss(torch.stack([w, lo], 1), torch.ones(8, 2, dtype=torch.bool), "bradley_terry",
                               m.tolist(), 0.0)
    torch.testing.assert_close(loss / units, _trl_reward_loss(w, lo, m), rtol=0, atol=1e-6)


def test_bradley_terry_gradient_matches_closed_form():
    """d/dr_w mean_p -log s(r_w - r_l) = -s(r_l - r_w) / P, and the opposite for r_l (with and without centering
    at coefficient 0: the loss must stay attached to the rewards)."""
    w, lo = torch.tensor([2.0, -1.0, 0.5], requires_grad=True), torch.tensor([0.0, 1.0, 0.5], requires_grad=True)
    bradley_terry_loss(w, lo).backward()
    want = -torch.sigmoid(lo.detach() - w.detach()) / 3
    torch.testing.assert_close(w.grad, want)
    torch.testing.assert_close(lo.grad, -want)


def test_the_trainers_loss_and_figures_of_a_ragged_batch_by_hand():
    """A list of three (4, 2, 0) and a list of two (2, 0) padded with a reward of 9: the pairs are (4, 2), (4, 0),
    (2, 0) and (2, 0), never one with the padding: 3 log(1 + e^-2) + log(1 + e^-4) over 4 units; centering is over
    those pairs, 0.1 |mean(6, 4, 2, 2)| = 0.35; the rejected reward is the mean of the 3 real others, 2/3."""
    from training.rm.trainer import pair_stats, rank_loss, summarize

    R, mask = torch.tensor([[4.0, 2.0, 0.0], [2.0, 0.0, 9.0]]), torch.tensor([[True, True, True], [True, True, False]])
    loss, units, center = rank_loss(R, mask, "bradley_terry", 0.0, 0.1)
    assert units == 4 and loss.item() == pytest.approx(3 * math.log1p(math.exp(-2)) + math.log1p(math.exp(-4)))
    assert center.item() == pytest.approx(0.35)
    assert summarize(pair_stats(R, mask)) == {"accuracy": 1.0, "reward_chosen": 3.0,
                                              "reward_rejected": pytest.approx(2 / 3),
                                              "reward_margin": pytest.approx(3 - 2 / 3)}


def test_pearson_hand_derived():
    """x = (1, 2, 3), y = (2, 4, 7): centred (-1, 0, 1) and (-7/3, -1/3, 8/3); sum of products 7/3 + 8/3 = 5;
    norms sqrt(2) and sqrt(114)/3: rho = 15 / sqrt(228) = 0.9933992678. A constant: 0 (undefined)."""
    from training.losses import pearson
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 7])).item() == pytest.approx(0.9933992678, abs=1e-6)
    assert pearson(torch.tensor([2.0, 4, 7]), torch.tensor([1.0, 2, 3])).item() == pytest.approx(0.9933992678, abs=1e-6)
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([-2.0, -4, -7])).item() == pytest.approx(-0.9933992678,
                                                                                                   abs=1e-6)
    assert pearson(torch.tensor([5.0, 5, 5]), torch.tensor([1.0, 2, 3])).item() == 0.0


def test_odin_loss_hand_derived():
    """lengths L = (1, 2, 3), centred (-1, 0, 1), norm sqrt(2).
    quality r_Q = (3, 1, 2): centred (1, -1, 0), sum of products with L's -1, norm sqrt(2): rho -0.5, |rho| 0.5.
    length head r_L = (1, 2, 4): centred (-4/3, -1/3, 5/3), sum of products 3, norm sqrt(42)/3: rho = 9 / sqrt(84)
    = 0.9819805061. Weights w_Q = (1, 2), w_L = (3, -1): w_Q . w_L = 1.
        length_coef 1, orthogonal_coef 0.5: (0.5 - 0.9819805061) + 0.5 * 1 = 0.0180194939
        length_coef 2, orthogonal_coef 0:   2 * (0.5 - 0.9819805061)     = -0.9639610122
    Sign checks: a quality head that follows length is penalised, a length head that follows it is paid."""
    from training.losses import odin_loss
    q, lr, L = torch.tensor([3.0, 1, 2]), torch.tensor([1.0, 2, 4]), torch.tensor([1.0, 2, 3])
    dot = torch.tensor([1.0, 2]) @ torch.tensor([3.0, -1])
    assert odin_loss(q, lr, L, dot, 1.0, 0.5).item() == pytest.approx(0.0180194939, abs=1e-6)
    assert odin_loss(q, lr, L, dot, 2.0, 0.0).item() == pytest.approx(-0.9639610122, abs=1e-6)
    # the two heads swapped: the quality head now follows length (|0.98|), the length head does not (-(-0.5))
    assert odin_loss(lr, q, L, dot, 1.0, 0.0).item() == pytest.approx(0.9819805061 + 0.5, abs=1e-6)
    assert odin_loss(q, lr, L, -dot, 0.0, 1.0).item() == pytest.approx(1.0)  # |w_Q . w_L|
