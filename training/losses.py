"""Every loss of the pipeline, as small pure functions: tensors in, tensors out.

Losses never see images, DeepSpeed or data loaders. Each is tested against hand-derived values
(tests/test_losses*.py) and, where TRL has the same loss, against TRL on identical inputs.
Formulas: shared/reference/algorithms.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401  (used by the sections below)

# ---- reward model ------------------------------------------------------------------------------

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0,
                       center_coef: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Pairwise Bradley-Terry loss of a reward model.

    chosen, rejected: (P,) rewards r_w, r_l of P pairs; margin: scalar or (P,), how far r_w should
    exceed r_l (0: plain BT; TRL's `margin` column).
        per pair  l_p = -log sigmoid(r_w - r_l - m) = softplus(-(r_w - r_l - m))
        L = reduce_p(l_p) + center_coef * |mean_p(r_w + r_l)|
    The second term is LLaVA-RLHF's reward centering (their coefficient 1e-3): it keeps the
    rewards near zero without changing which response wins. reduction "mean" | "sum" | "none"
    applies to the pairwise term only; the centering term is always over this batch's mean.
    Equals LLaVA-RLHF's BCEWithLogits(r1 - r0, choice) with (r1, r0) = (r_w, r_l), choice = 1.
    """
    per_pair = -F.logsigmoid(chosen.float() - rejected.float() - margin)  # (P,)
    loss = {"mean": per_pair.mean, "sum": per_pair.sum, "none": lambda: per_pair}[reduction]()
    return loss + reward_centering(chosen, rejected, center_coef) if center_coef else loss


def reward_centering(chosen: torch.Tensor, rejected: torch.Tensor, coef: float) -> torch.Tensor:
    """LLaVA-RLHF's centering term  coef * |mean_p(r_w + r_l)|  over this batch's P pairs."""
    return coef * (chosen.float() + rejected.float()).mean().abs()


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two (n,) tensors, in float32; 0 where either is constant (it is then undefined)."""
    xc, yc = x.float() - x.float().mean(), y.float() - y.float().mean()
    denom = xc.norm() * yc.norm()
    return torch.where(denom > 0, (xc * yc).sum() / denom.clamp_min(1e-12), denom.new_zeros(()))


def odin_loss(quality: torch.Tensor, length_reward: torch.Tensor, lengths: torch.Tensor, heads_dot: torch.Tensor,
              length_coef: float = 1.0, orthogonal_coef: float = 1.0) -> torch.Tensor:
    """ODIN's disentangling terms (Chen et al., ICML 2024, arXiv 2402.07319), added to the ranking loss of the sum
    r = r_Q + r_L of a reward model's two heads over a batch of n responses:

        length_coef * (|rho(r_Q, L)| - rho(r_L, L)) + orthogonal_coef * |w_Q . w_L|

    rho the Pearson correlation over the batch, L the responses' lengths in tokens, w_Q and w_L the two linear heads'
    weights (heads_dot: w_Q . w_L, computed where the weights are gathered: the reward model's forward). The quality
    head is pushed to carry no linear trace of length, the length head to carry all of it, and the two to read
    orthogonal directions of the shared features; RL then reads r_Q alone."""
    decorrelate = pearson(quality, lengths).abs() - pearson(length_reward, lengths)
    return length_coef * decorrelate + orthogonal_coef * heads_dot.float().abs()


def plackett_luce_loss(rewards: torch.Tensor, mask: torch.Tensor | None = None,
                       reduction: str = "mean") -> torch.Tensor:
    """Plackett-Luce loss of N ranked candidates (Vision-LLM-Alignment's ranked-list reward model).

    rewards: (B, N), candidates ranked best first; mask: (B, N) bool, False on padding candidates
    of shorter lists (a list's valid candidates come first).
        per list  l_b = sum_i -log( exp(r_i) / sum_{j>=i} exp(r_j) )
                      = sum_i ( logsumexp_{j>=i} r_j - r_i )       over valid i
    computed with a reversed cumulative logsumexp, so large rewards never overflow (their code
    sums raw exp). The last position contributes 0. With N = 2 this is Bradley-Terry.
    """
    r = rewards.float()
    valid = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.bool()
    r = r.masked_fill(~valid, torch.finfo(r.dtype).min)  # exp() of it is 0; -inf would give NaN grads
    tail = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)  # (B, N): logsumexp_{j>=i} r_j
    per_list = torch.where(valid, tail - r, torch.zeros_like(r)).sum(-1)  # (B,)
    return {"mean": per_list.mean, "sum": per_list.sum, "none": lambda: per_list}[reduction]()


def ranked_pairs(n: int) -> tuple[list[int], list[int]]:
    """Every (better, worse) index pair of a ranking of n candidates (InstructGPT's K-choose-2)."""
    better = [i for i in range(n) for j in range(i + 1, n)]
    worse = [j for i in range(n) for j in range(i + 1, n)]
    return better, worse


# ---- DPO family and ORPO -----------------------------------------------------------------------
# Inputs are per-response log-probs (B,) (sums over response tokens unless a docstring says mean),
# outputs per-pair losses (B,): the trainer averages them over every pair of an optimizer step.

def weighted_logps(token_lp: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) sum_t w_t * lp_t over target tokens; token_lp, mask, weights (B, T). No weights: w = 1."""
    lp = token_lp * mask
    return (lp if weights is None else lp * weights).sum(-1)


def dpo_margin(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor) -> torch.Tensor:
    """h = (pi_w - ref_w) - (pi_l - ref_l), (B,)."""
    return (pi_w - ref_w) - (pi_l - ref_l)


def sigmoid_dpo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO: -log sigmoid(beta h); cDPO (label_smoothing eps > 0): -(1-eps) log s(beta h) - eps log s(-beta h)."""
    loss = -F.logsigmoid(beta * h)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * h)
    return loss


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (eq. 17): (h - 1/(2 beta))^2. TRL's variant feeds h built from mean (not summed) log-probs."""
    return (h - 1.0 / (2.0 * beta)) ** 2


def implicit_rewards(pi: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * (pi - ref), detached: what DPO logs as rewards/chosen and rewards/rejected."""
    return (beta * (pi - ref)).detach()


def plackett_luce_dpo_loss(pi: torch.Tensor, ref: torch.Tensor, beta: float,
                           valid: torch.Tensor | None = None) -> torch.Tensor:
    """Listwise DPO over N candidates ranked best first; pi, ref (B, N); valid (B, N) bool for ragged lists
    (valid entries first). r = beta (pi - ref);  L = sum_i -log( exp(r_i) / sum_{j>=i} exp(r_j) ),
    with a reversed logcumsumexp (never a raw exp). N = 2 is exactly sigmoid DPO."""
    r = beta * (pi - ref)
    if valid is not None:
        r = r.masked_fill(~valid, float("-inf"))
    tail = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)  # log sum_{j>=i} exp(r_j)
    terms = tail - r
    if valid is not None:
        terms = terms.masked_fill(~valid, 0.0)
    return terms.sum(-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) far from it. x is clamped just below 0 so a mean log-prob of exactly 0 stays finite."""
    x = x.clamp(max=-1e-7 if x.dtype == torch.float64 else -1e-6)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log odds(y) = avg_logp - log(1 - exp(avg_logp)) with avg_logp the MEAN token log-prob, (B,)."""
    return avg_logp - log1mexp(avg_logp)


def orpo_odds_ratio_loss(avg_w: torch.Tensor, avg_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term per pair: (-log sigmoid(log_odds(w) - log_odds(l)), log_odds(w) - log_odds(l)).
    The full loss is NLL(w) + lambda * mean(first); computed in float32 at least."""
    avg_w, avg_l = avg_w.float(), avg_l.float()
    log_odds = orpo_log_odds(avg_w) - orpo_log_odds(avg_l)
    return -F.logsigmoid(log_odds), log_odds


def sft_term(pi_w: torch.Tensor, weight: float) -> torch.Tensor:
    """RLAIF-V's added SFT term per pair: -weight * pi_logp(w); its mean over pairs is added to the loss."""
    return -weight * pi_w


def anchor_loss(rewards_up: list[torch.Tensor], rewards_down: list[torch.Tensor],
                masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """mDPO's anchor (delta = 0) per pair: sum -log s(r) over rewards pushed up + sum -log s(-r) over
    rewards pushed down; each r = beta (pi - ref) of one response, (B,).
    masks (OPA-DPO's per-token form): each r is (B, L) per token, 0 past its response's end, and its
    term is the mean over the positions of its mask (rewards_up's masks, then rewards_down's)."""
    terms = [-F.logsigmoid(r) for r in rewards_up] + [-F.logsigmoid(-r) for r in rewards_down]
    if masks is not None:
        terms = [(t * m).sum(-1) / m.sum(-1).clamp(min=1) for t, m in zip(terms, masks, strict=True)]
    return sum(terms)


def token_level_dpo_loss(ratio_w: torch.Tensor, ratio_l: torch.Tensor, mask_w: torch.Tensor, mask_l: torch.Tensor,
                         beta: float) -> torch.Tensor:
    """OPA-DPO's released per-token form, (B,): -log sigmoid(beta (ratio_w_t - ratio_l_t)) averaged over the
    positions t where either response has a token; ratio_* (B, L) per-token (weighted) log-ratios
    pi - ref aligned by response position, 0 where the response has ended (so a position only one
    response reaches still counts, as in their padded tensors; positions neither reaches do not)."""
    union = ((mask_w + mask_l) > 0).to(ratio_w.dtype)
    per_token = -F.logsigmoid(beta * (ratio_w * mask_w - ratio_l * mask_l))
    return (per_token * union).sum(-1) / union.sum(-1).clamp(min=1)


def opa_dpo_loss(h: list[torch.Tensor], chosen_rewards: list[torch.Tensor], beta: float, c_std: float = 1.0,
                 c_ai: float = 1.0, anchor: str = "paper", pair_losses: list[torch.Tensor] | None = None,
                 anchor_masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """OPA-DPO per item. h = [h1..h4]: DPO margins of its four pairs (1 ground truth > rollout, 2 revised >
    rollout, 3 ground truth > same text with a masked image, 4 revised > revised with a masked image);
    chosen_rewards = [r1..r4], beta (pi - ref) of each pair's chosen response.
      L = c_std L1 + c_AI L2 + 0.2 (c_std L3 + c_AI L4) + AncPO,  Lk = -log sigmoid(beta hk)
    AncPO (mDPO anchor, delta 0): "paper" pushes every chosen reward up, -sum_k log sigmoid(r_k), which
    is the anchor's stated purpose (the preferred response's likelihood must not fall); "published"
    reproduces the released code, -log s(r1) - log s(-r2) - log s(r3) - log s(-r4).
    pair_losses (optional): L1..L4 computed otherwise (token_level_dpo_loss) instead of from h.
    anchor_masks (the per-token form, with pair_losses): r_k are (B, L) per-token rewards and each anchor
    term is averaged over pair k's positions, as its pair loss is (the released code's sigmoid per token)."""
    lk = pair_losses if pair_losses is not None else [sigmoid_dpo_loss(x, beta) for x in h]
    loss = c_std * lk[0] + c_ai * lk[1] + 0.2 * (c_std * lk[2] + c_ai * lk[3])
    r1, r2, r3, r4 = chosen_rewards
    m = anchor_masks
    if anchor == "published":
        return loss + anchor_loss([r1, r3], [r2, r4], None if m is None else [m[0], m[2], m[1], m[3]])
    return loss + anchor_loss([r1, r2, r3, r4], [], m)

# ---- PPO -----------------------------------------------------------------------------------------

def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate, masked mean over response tokens; returns (loss, clip fraction).

    ratio = exp(logp - old_logp);  l_t = max(-A_t * ratio, -A_t * clip(ratio, 1-eps, 1+eps))
    """
    ratio = torch.exp(logp - old_logp)
    l1, l2 = -advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    m = mask.to(logp.dtype)
    loss = (torch.maximum(l1, l2) * m).sum() / m.sum().clamp(min=1)
    clipfrac = ((l2 > l1).to(logp.dtype) * m).sum() / m.sum().clamp(min=1)
    return loss, clipfrac


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_eps: float = 0.2) -> torch.Tensor:
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (V_clip - R)^2),
    V_clip = old_V + clip(V - old_V, -eps, eps)."""
    v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    per = torch.maximum((values - returns) ** 2, (v_clip - returns) ** 2)
    m = mask.to(values.dtype)
    return 0.5 * (per * m).sum() / m.sum().clamp(min=1)
