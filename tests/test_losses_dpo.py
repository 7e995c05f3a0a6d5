"""DPO family and ORPO losses: hand-derived values, identities, and TRL 1.16 on identical log-probs.

TRL keeps its DPO losses inline in `DPOTrainer._compute_loss`; we call that very method with a stub
trainer and a stub model whose forward returns our per-token log-probs, so TRL's own code path
(sums, IPO length normalisation, label smoothing, metrics) runs on the same numbers as ours.
"""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from training import losses as L


def _ls(x):  # log sigmoid of a float
    return -math.log1p(math.exp(-x))


# ---- hand-derived values ------------------------------------------------------------------------

def test_sigmoid_dpo_hand_value():
    """pi_w=-3, pi_l=-5, ref_w=-4, ref_l=-4: h = (-3+4) - (-5+4) = 2; beta=.5 -> -log s(1) = log(1+e^-1)."""
    h = L.dpo_margin(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0]))
    assert h.item() == 2.0
    got = L.sigmoid_dpo_loss(h, beta=0.5)
    assert got.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-7)  # 0.31326168752
    assert got.item() == pytest.approx(0.3132616875, abs=1e-9)


def test_cdpo_hand_value_and_limits():
    """eps=.25, beta*h=1: 0.75*log(1+e^-1) + 0.25*log(1+e) = 0.75*.3132617 + .25*1.3132617 = .5632617."""
    h = torch.tensor([2.0])
    got = L.sigmoid_dpo_loss(h, beta=0.5, label_smoothing=0.25).item()
    assert got == pytest.approx(0.5632616875, abs=1e-9)
    # eps = .5: the loss is even in h (no preference), minimal at h = 0 where the gradient vanishes
    h = torch.tensor([1.7, -1.7, 0.0], requires_grad=True)
    loss = L.sigmoid_dpo_loss(h, beta=0.3, label_smoothing=0.5)
    assert loss[0].item() == pytest.approx(loss[1].item(), abs=1e-7) and loss[2] < loss[0]
    loss.sum().backward()
    assert abs(h.grad[2].item()) < 1e-7


def test_ipo_hand_value_and_minimum():
    """(h - 1/(2 beta))^2: h=2, beta=.5 -> (2-1)^2 = 1; the minimum sits at h = 1/(2 beta)."""
    assert L.ipo_loss(torch.tensor([2.0]), 0.5).item() == 1.0
    assert L.ipo_loss(torch.tensor([5.0]), 0.1).item() == 0.0


def test_plackett_luce_hand_value_and_pairwise_limit():
    """r = beta(pi - ref) = (1, 0, -1) (beta=1): L = -log(e/(e+1+e^-1)) - log(1/(1+e^-1))
    = log(1 + e^-1 + e^-2) + log(1 + e^-1) = 0.4076059644 + 0.3132616875 = 0.7208676519."""
    pi, ref = torch.tensor([[1.0, 0.0, -1.0]]), torch.zeros(1, 3)
    assert L.plackett_luce_dpo_loss(pi, ref, beta=1.0).item() == pytest.approx(0.7208676519, abs=1e-7)
    # N = 2 is sigmoid DPO
    pi, ref = torch.randn(5, 2), torch.randn(5, 2)
    h = L.dpo_margin(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1])
    torch.testing.assert_close(L.plackett_luce_dpo_loss(pi, ref, 0.3), L.sigmoid_dpo_loss(h, 0.3))
    # ragged lists: a padded third candidate changes nothing; huge rewards do not overflow
    valid = torch.tensor([[True, True, False]] * 5)
    padded = torch.cat([pi, torch.full((5, 1), 1e4)], 1), torch.cat([ref, torch.zeros(5, 1)], 1)
    torch.testing.assert_close(L.plackett_luce_dpo_loss(*padded, 0.3, valid), L.sigmoid_dpo_loss(h, 0.3))
    assert torch.isfinite(L.plackett_luce_dpo_loss(torch.tensor([[1e4, -1e4, 3e4]]), torch.zeros(1, 3), 1.0)).all()


def test_orpo_hand_value():
    """avg_w = log .5 -> odds 1 -> log odds 0; avg_l = log .2 -> odds .25 -> log odds -log 4.
    ratio = log 4; term = -log s(log 4) = log(1 + 1/4) = 0.2231435513."""
    term, ratio = L.orpo_odds_ratio_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]))
    assert ratio.item() == pytest.approx(math.log(4.0), abs=1e-6)
    assert term.item() == pytest.approx(math.log(1.25), abs=1e-6)


def test_log_odds_is_stable_at_both_ends():
    """log(p/(1-p)) for p near 1 (avg_logp -> 0-) and p tiny (avg_logp = -80) in float32."""
    x = torch.tensor([-1e-9, -1e-4, -0.5, -5.0, -80.0], dtype=torch.float32)
    got = L.orpo_log_odds(x)
    assert torch.isfinite(got).all()
    exact = torch.tensor([math.log(math.exp(v) / -math.expm1(v)) for v in (-1e-6, -1e-4, -0.5, -5.0, -80.0)])
    torch.testing.assert_close(got[1:], exact[1:].float(), rtol=1e-5, atol=1e-5)
    assert got[0].item() == pytest.approx(exact[0].item(), rel=1e-3)  # clamped at -1e-6: still finite, ~13.8
    # gradients stay finite too
    x = x.clone().requires_grad_(True)
    L.orpo_log_odds(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_weighted_logps_sft_term_and_anchor():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert L.weighted_logps(lp, mask).item() == -3.0
    assert L.weighted_logps(lp, mask, torch.tensor([[2.5, 1.0, 9.0]])).item() == -4.5
    assert L.sft_term(torch.tensor([-4.0]), 0.5).item() == 2.0
    r = torch.tensor([0.0])
    # -log s(0) - log s(-0) = 2 log 2
    assert L.anchor_loss([r], [r]).item() == pytest.approx(2 * math.log(2.0))
    assert L.anchor_loss([torch.tensor([2.0])], []).item() == pytest.approx(-_ls(2.0))


# ---- TRL 1.16 on identical log-probs -------------------------------------------------------------

def _trl_dpo(loss_type: str, beta: float, eps: float, pi_tok, ref_w, ref_l, mask):
    """Run trl.DPOTrainer._compute_loss on per-token log-probs pi_tok (2B, T-1) ([chosen; rejected])."""
    from trl import DPOTrainer

    n2, t1 = pi_tok.shape
    out = SimpleNamespace(log_probs=pi_tok, entropy=torch.zeros(n2, t1), mean_logits=torch.zeros(n2, t1),
                          is_top1=torch.zeros(n2, t1, dtype=torch.bool))
    model = lambda **kw: out  # noqa: E731
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=eps,
                           use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
    completion_mask = torch.cat([torch.zeros(n2, 1, dtype=torch.long), mask.long()], 1)  # (2B, T)
    inputs = {"input_ids": torch.zeros(n2, t1 + 1, dtype=torch.long), "attention_mask": torch.ones(n2, t1 + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_w, "ref_rejected_logps": ref_l}
    loss = DPOTrainer._compute_loss(stub, model, inputs, False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_losses_equal_trl(loss_type, eps):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    mask = (torch.rand(2 * B, T, generator=g) < 0.8).float()
    mask[:, 0] = 1
    pi_tok = -torch.rand(2 * B, T, generator=g) * 3 * mask
    ref_w, ref_l = -torch.rand(B, generator=g) * 10, -torch.rand(B, generator=g) * 10
    beta = 0.1
    trl_loss, trl_m = _trl_dpo(loss_type, beta, 0.0, pi_tok, ref_w, ref_l, mask)
    if eps:
        # TRL 1.16's "sigmoid" ignores label_smoothing (it now only feeds robust DPO and EXO), so cDPO is
        # built from TRL's own sigmoid loss as its definition: (1-eps) L(chosen > rejected) + eps L(swapped)
        swapped = torch.cat([pi_tok[B:], pi_tok[:B]]), ref_l, ref_w, torch.cat([mask[B:], mask[:B]])
        trl_loss = (1 - eps) * trl_loss + eps * _trl_dpo(loss_type, beta, 0.0, *swapped)[0]

    pi = L.weighted_logps(pi_tok, mask)
    pi_w, pi_l = pi[:B], pi[B:]
    if loss_type == "ipo":  # TRL's IPO: log-ratios divided by each response's token count
        n = mask.sum(-1)
        ours = L.ipo_loss(L.dpo_margin(pi_w / n[:B], pi_l / n[B:], ref_w / n[:B], ref_l / n[B:]), beta)
    else:
        ours = L.sigmoid_dpo_loss(L.dpo_margin(pi_w, pi_l, ref_w, ref_l), beta, eps)
    torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-6, atol=1e-6)
    rw, rl = L.implicit_rewards(pi_w, ref_w, beta), L.implicit_rewards(pi_l, ref_l, beta)
    assert rw.mean().item() == pytest.approx(trl_m["rewards/chosen"], abs=1e-6)
    assert rl.mean().item() == pytest.approx(trl_m["rewards/rejected"], abs=1e-6)
    assert (rw - rl).mean().item() == pytest.approx(trl_m["rewards/margins"], abs=1e-6)
    assert (rw > rl).float().mean().item() == pytest.approx(trl_m["rewards/accuracies"])
    assert pi_w.mean().item() == pytest.approx(trl_m["logps/chosen"], abs=1e-6)


def test_orpo_equals_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(1)
    avg_w, avg_l = -torch.rand(8, generator=g) * 2, -torch.rand(8, generator=g) * 4
    avg_w[0], avg_l[0] = -1e-3, -30.0  # the near-certain and near-impossible ends
    lam = 0.1
    stub = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_terms, trl_rw, trl_rl, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(stub, avg_w, avg_l)
    term, log_odds = L.orpo_odds_ratio_loss(avg_w, avg_l)
    nll = torch.tensor(0.7)
    # TRL: loss = nll - mean(beta * logsigmoid(log_odds)); ours: nll + lambda * mean(term)
    torch.testing.assert_close(nll + lam * term.mean(), nll - trl_terms.mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(log_odds.mean(), trl_log_odds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((-term).mean(), trl_ratio, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lam * avg_w, trl_rw)
    torch.testing.assert_close(lam * avg_l, trl_rl)


def test_gradient_of_sigmoid_dpo_matches_closed_form():
    """d/dh -log s(beta h) = -beta s(-beta h)."""
    h = torch.tensor([0.3, -1.2, 4.0], requires_grad=True)
    L.sigmoid_dpo_loss(h, 0.7).sum().backward()
    torch.testing.assert_close(h.grad, -0.7 * torch.sigmoid(-0.7 * h.detach()))
    assert F.logsigmoid(torch.tensor(0.0)).item() == pytest.approx(-math.log(2))


def test_opa_dpo_loss_hand_value():
    """All margins 0 and rewards 0: L = (1 + 1 + .2 (1 + 1)) log 2 + 4 log 2 = 6.4 log 2 (both anchors).
    c_std=2, h1=2, beta=.5, rest 0: L1 = log(1+e^-1) replaces log 2 in the first term, weighted 2."""
    z = torch.zeros(1)
    for anchor in ("paper", "published"):
        got = L.opa_dpo_loss([z] * 4, [z] * 4, beta=0.1, anchor=anchor)
        assert got.item() == pytest.approx(6.4 * math.log(2), abs=1e-6)
    got = L.opa_dpo_loss([torch.tensor([2.0]), z, z, z], [z] * 4, beta=0.5, c_std=2.0)
    want = 2 * math.log1p(math.exp(-1)) + math.log(2) + 0.2 * (2 + 1) * math.log(2) + 4 * math.log(2)
    assert got.item() == pytest.approx(want, abs=1e-6)
    # the anchors differ in the sign of the revised response's reward (pairs 2 and 4)
    r = torch.tensor([1.0])
    paper = L.opa_dpo_loss([z] * 4, [z, r, z, r], 0.1, anchor="paper")
    published = L.opa_dpo_loss([z] * 4, [z, r, z, r], 0.1, anchor="published")
    assert paper.item() == pytest.approx(2.4 * math.log(2) + 2 * math.log(2) + 2 * math.log1p(math.exp(-1)))
    assert published.item() == pytest.approx(2.4 * math.log(2) + 2 * math.log(2) + 2 * math.log1p(math.exp(1)))


def test_anchor_loss_per_token_hand_value():
    """Per-token anchor terms are means over each term's mask: up (2, 0) over 2 positions ->
    (log(1 + e^-2) + log 2) / 2; down (1, 5) over its first position only -> log(1 + e)."""
    got = L.anchor_loss([torch.tensor([[2.0, 0.0]])], [torch.tensor([[1.0, 5.0]])],
                        [torch.ones(1, 2), torch.tensor([[1.0, 0.0]])])
    want = (math.log1p(math.exp(-2.0)) + math.log(2)) / 2 + math.log1p(math.e)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_token_level_dpo_loss_hand_value():
    """ratios w = (1, 1, -), l = (0, -, -) (beta 1): positions 0 and 1 count, 2 does not:
    (-log s(1) - log s(1)) / 2 = log(1 + e^-1) = 0.3132617."""
    rw, rl = torch.tensor([[1.0, 1.0, 7.0]]), torch.tensor([[0.0, 9.0, 9.0]])
    mw, ml = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    got = L.token_level_dpo_loss(rw, rl, mw, ml, beta=1.0)
    assert got.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    # all-zero ratios: log 2 whatever the lengths, and it replaces the sequence-level pair losses
    z = torch.zeros(1, 3)
    lk = [L.token_level_dpo_loss(z, z, mw, ml, 0.1)] * 4
    assert L.opa_dpo_loss([torch.zeros(1)] * 4, [torch.zeros(1)] * 4, 0.1, pair_losses=lk).item() == \
        pytest.approx(6.4 * math.log(2), abs=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "cdpo", "ipo"])
def test_the_trainers_objective_equals_trl(loss_type):
    """What the trainer applies (training.dpo.objective: which log-probs, IPO's per-token averages, the label
    smoothing of cdpo only) equals TRL's loss and metrics on the same per-token log-probs."""
    from training.dpo.forward import ResponseLogps
    from training.dpo.objective import objective

    g = torch.Generator().manual_seed(2)
    B, T, beta, eps = 5, 7, 0.1, 0.2
    mask = (torch.rand(2 * B, T, generator=g) < 0.7).float()
    mask[:, 0] = 1
    pi_tok = -torch.rand(2 * B, T, generator=g) * 3 * mask
    ref = -torch.rand(B, 2, generator=g) * 10
    trl_type = "ipo" if loss_type == "ipo" else "sigmoid"
    trl_loss, trl_m = _trl_dpo(trl_type, beta, 0.0, pi_tok, ref[:, 0], ref[:, 1], mask)
    if loss_type == "cdpo":  # as in test_dpo_losses_equal_trl: TRL 1.16's sigmoid, swapped, weighted eps
        swapped = torch.cat([pi_tok[B:], pi_tok[:B]]), ref[:, 1], ref[:, 0], torch.cat([mask[B:], mask[:B]])
        trl_loss = (1 - eps) * trl_loss + eps * _trl_dpo(trl_type, beta, 0.0, *swapped)[0]
    lp, m = torch.stack([pi_tok[:B], pi_tok[B:]], 1), torch.stack([mask[:B], mask[B:]], 1)
    pol = ResponseLogps(lp.sum(-1), m.sum(-1), lp.sum(-1), lp, m, torch.ones_like(m))
    a = SimpleNamespace(loss_type=loss_type, beta=beta, label_smoothing=eps, ipo_average=True, sft_weight=0.0)
    out = objective(pol, (ref, m.sum(-1), ref), a)
    torch.testing.assert_close(out["pair_loss_sum"] / B, trl_loss, rtol=1e-6, atol=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert float(out["metrics"][k]) / B == pytest.approx(trl_m[k], abs=1e-5), k


def test_the_trainers_orpo_objective_equals_trl():
    """ORPO as the trainer applies it: the odds-ratio term on MEAN token log-probs (TRL's odds_ratio_loss), times
    lambda, and the NLL over the chosen responses' tokens; rewards/* = lambda * mean log-prob, as TRL logs them."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    from training.dpo.forward import ResponseLogps
    from training.dpo.objective import objective

    g = torch.Generator().manual_seed(3)
    B, T, lam = 4, 6, 0.1
    m = (torch.rand(B, 2, T, generator=g) < 0.7).float()
    m[..., 0] = 1
    lp = -torch.rand(B, 2, T, generator=g) * 2 * m
    pol = ResponseLogps(lp.sum(-1), m.sum(-1), lp.sum(-1), lp, m, torch.ones_like(m))
    out = objective(pol, None, SimpleNamespace(loss_type="orpo", orpo_lambda=lam, beta=0.1))
    avg = lp.sum(-1) / m.sum(-1)
    stub = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_terms, trl_rw, trl_rl, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(stub, avg[:, 0], avg[:, 1])
    torch.testing.assert_close(out["pair_loss_sum"] / B, -trl_terms.mean(), rtol=1e-6, atol=1e-7)
    assert float(out["nll_sum"] / out["nll_tokens"]) == pytest.approx(float(-lp[:, 0].sum() / m[:, 0].sum()))
    got = {k: float(v) / B for k, v in out["metrics"].items()}
    assert got["log_odds_ratio"] == pytest.approx(float(trl_ratio), abs=1e-6)
    assert got["log_odds_chosen"] == pytest.approx(float(trl_log_odds), abs=1e-6)
    assert (got["rewards/chosen"], got["rewards/rejected"]) == (pytest.approx(float(trl_rw.mean()), abs=1e-6),
                                                                pytest.approx(float(trl_rl.mean()), abs=1e-6))
    assert got["logps/chosen"] == pytest.approx(float(avg[:, 0].mean()), abs=1e-6)


def test_token_level_dpo_loss_counts_a_position_only_one_response_reaches():
    """w = (1, 3), l = (0, -) (beta 1): position 1 has the chosen token alone, l's ratio counts as 0 there:
    (-log s(1) - log s(3)) / 2 = (log(1 + e^-1) + log(1 + e^-3)) / 2."""
    got = L.token_level_dpo_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 9.0]]), torch.ones(1, 2),
                                 torch.tensor([[1.0, 0.0]]), beta=1.0)
    assert got.item() == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-3.0))) / 2, abs=1e-6)


def test_opa_dpo_weights_the_masked_image_pairs_by_their_own_coefficient():
    """c_std = 2 weighs pairs 1 and 3 (ground truth), c_AI = 1 pairs 2 and 4 (revised): h3 = 2 at beta .5 gives
    L3 = log(1 + e^-1), the others log 2: 2 log 2 + log 2 + .2 (2 L3 + log 2) + 4 log 2 (the anchor at 0)."""
    z = torch.zeros(1)
    got = L.opa_dpo_loss([z, z, torch.tensor([2.0]), z], [z] * 4, beta=0.5, c_std=2.0, c_ai=1.0)
    want = 3 * math.log(2) + 0.2 * (2 * math.log1p(math.exp(-1)) + math.log(2)) + 4 * math.log(2)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_published_per_token_anchor_keeps_each_reward_with_its_pairs_mask():
    """Per-token rewards (0, 2) for all four pairs; pairs 1 and 2 span both positions, 3 and 4 the first only.
    Published anchor: up r1 -> (log 2 + log(1 + e^-2)) / 2, up r3 -> log 2, down r2 -> (log 2 + log(1 + e^2)) / 2,
    down r4 -> log 2."""
    r, both, first = torch.tensor([[0.0, 2.0]]), torch.ones(1, 2), torch.tensor([[1.0, 0.0]])
    z = torch.zeros(1)
    lk = [z] * 4  # pair losses 0: the anchor alone
    got = L.opa_dpo_loss([z] * 4, [r] * 4, 0.1, anchor="published", pair_losses=lk,
                         anchor_masks=[both, both, first, first])
    want = (math.log(2) + math.log1p(math.exp(-2))) / 2 + math.log(2) + (math.log(2) + math.log1p(math.exp(2))) / 2 \
        + math.log(2)
    assert got.item() == pytest.approx(want, abs=1e-6)


def _logps(sums, counts):
    """ResponseLogps of given per-response sums and token counts (N, K), unweighted; per-token views unused."""
    from training.dpo.forward import ResponseLogps
    s, c = torch.tensor(sums), torch.tensor(counts, dtype=torch.float32)
    z = torch.zeros(*s.shape, 1)
    return ResponseLogps(s, c, s.clone(), z, z, torch.ones_like(z))


def test_listwise_metrics_by_hand_with_a_ragged_list():
    """beta 1. Item 0: r = (1, -1, 0): rewards/rejected is the mean of the others, -0.5, and it is accurate.
    Item 1, a list of two padded to three: r = (-1, -3, pad): rejected -3, accurate (the padding, at 0, counts
    for nothing). Sums over items: chosen 0, rejected -3.5, margins 3.5, accuracies 2, logps/rejected -8.5."""
    from training.dpo.objective import objective

    pol = _logps([[-1.0, -3.0, -2.0], [-4.0, -6.0, 0.0]], [[2, 2, 2], [2, 2, 0]])
    ref = _logps([[-2.0, -2.0, -2.0], [-3.0, -3.0, 0.0]], [[2, 2, 2], [2, 2, 0]])
    out = objective(pol, (ref.sum, ref.count, ref.wsum), SimpleNamespace(loss_type="listwise", beta=1.0,
                                                                          sft_weight=0.0))
    got = {k: float(v) for k, v in out["metrics"].items()}
    assert got == {"rewards/chosen": 0.0, "rewards/rejected": -3.5, "rewards/margins": 3.5,
                   "rewards/accuracies": 2.0, "logps/chosen": -5.0, "logps/rejected": -8.5}


def test_opa_metrics_compare_the_ground_truth_with_the_rollout():
    """OPA-DPO logs rewards/chosen of the ground truth and rewards/rejected of the original rollout (pair 1):
    real-image log-ratios (2, 1, -2, 1) at beta 1 give chosen 2, rejected -2, margin 4, logps -1 and -5."""
    from training.dpo.objective import objective

    pol = _logps([[-1.0, -2.0, -5.0, -2.0], [-3.0, -4.0, 0.0, 0.0]], [[2, 2, 2, 2], [2, 2, 0, 0]])
    ref = _logps([[-3.0] * 4, [-3.0, -3.0, 0.0, 0.0]], [[2, 2, 2, 2], [2, 2, 0, 0]])
    a = SimpleNamespace(loss_type="opa", beta=1.0, opa_c_std=1.0, opa_c_ai=1.0, opa_anchor="paper",
                        opa_token_level=False, sft_weight=0.0)
    m = {k: float(v) for k, v in objective(pol, (ref.sum, ref.count, ref.wsum), a)["metrics"].items()}
    assert (m["rewards/chosen"], m["rewards/rejected"], m["rewards/margins"], m["rewards/accuracies"]) == \
        (2.0, -2.0, 4.0, 1.0)
    assert (m["logps/chosen"], m["logps/rejected"], m["opa/margin1"]) == (-1.0, -5.0, 4.0)


def test_cdpo_equals_trls_own_label_smoothed_loss_pair_by_pair():
    """TRL 1.16 writes cDPO's label-smoothed loss, -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h), in its
    "aot" loss, which first sorts the batch's log-ratios: on one pair the sort changes nothing, so TRL's own formula
    is compared pair by pair (the composed check above builds it from TRL's sigmoid loss instead)."""
    g = torch.Generator().manual_seed(1)
    B, T, beta, eps = 5, 7, 0.1, 0.2
    mask = (torch.rand(2 * B, T, generator=g) < 0.8).float()
    mask[:, 0] = 1
    pi_tok = -torch.rand(2 * B, T, generator=g) * 3 * mask
    ref_w, ref_l = -torch.rand(B, generator=g) * 10, -torch.rand(B, generator=g) * 10
    pi = L.weighted_logps(pi_tok, mask)
    ours = L.sigmoid_dpo_loss(L.dpo_margin(pi[:B], pi[B:], ref_w, ref_l), beta, eps)
    for i in range(B):
        rows = [i, B + i]
        trl_loss, _ = _trl_dpo("aot", beta, eps, pi_tok[rows], ref_w[i:i + 1], ref_l[i:i + 1], mask[rows])
        torch.testing.assert_close(ours[i], trl_loss, rtol=1e-6, atol=1e-6)
    assert (ours - L.sigmoid_dpo_loss(L.dpo_margin(pi[:B], pi[B:], ref_w, ref_l), beta, 0.0)).abs().min() > 1e-3
