"""Which losses.py function a --loss_type applies to which log-probs, and what it logs.

`objective` returns per-item sums (the trainer divides by the step's global item / token counts,
so any split of a step over micro-batches and ranks gives the same update) and metric sums.
"""
from __future__ import annotations

import torch

from training import losses as L
from training.dpo.forward import ResponseLogps

LOSS_TYPES = ("sigmoid", "cdpo", "ipo", "orpo", "listwise", "opa")
REFERENCE_FREE = {"orpo"}


def objective(pol: ResponseLogps, ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, a) -> dict:
    """pol: policy log-probs (N, K); ref: (sum, count, wsum) of the reference, (N, K); a: DPOArgs.
    Returns {"pair_loss_sum": scalar over items, "nll_sum": scalar over chosen tokens (ORPO),
    "nll_tokens": chosen target tokens (ORPO; a tensor), "metrics": {name: sum over items}}."""
    beta = a.beta
    m = {}
    out = {"nll_sum": torch.zeros((), device=pol.sum.device), "nll_tokens": 0.0}
    if a.loss_type == "opa":
        return opa_objective(pol, ref, a, out)
    if a.loss_type == "orpo":
        avg = pol.avg
        term, log_odds = L.orpo_odds_ratio_loss(avg[:, 0], avg[:, 1])
        out["pair_loss_sum"] = a.orpo_lambda * term.sum()
        out["nll_sum"] = -pol.sum[:, 0].sum()
        out["nll_tokens"] = pol.count[:, 0].sum()
        rw, rl = (a.orpo_lambda * avg[:, 0]).detach(), (a.orpo_lambda * avg[:, 1]).detach()
        m.update({"log_odds_ratio": -term.detach().sum(), "log_odds_chosen": log_odds.detach().sum(),
                  "logps/chosen": avg[:, 0].detach().sum(), "logps/rejected": avg[:, 1].detach().sum()})
    else:
        ref_sum, ref_count, ref_wsum = ref
        pi, rf = pol.wsum, ref_wsum  # weights are 1 unless the data carries per-token weights
        if a.loss_type == "listwise":
            valid = pol.count > 0
            loss = L.plackett_luce_dpo_loss(pi, rf, beta, valid)
            r = L.implicit_rewards(pi, rf, beta)
            others = r.masked_fill(~valid, 0.0)[:, 1:]
            n_others = valid[:, 1:].sum(-1).clamp(min=1)
            rw, rl = r[:, 0], others.sum(-1) / n_others
            acc = (r[:, 0:1] > r[:, 1:].masked_fill(~valid[:, 1:], float("-inf"))).all(-1)
            m["rewards/accuracies"] = acc.float().sum()
            lp_rej = (pi.detach().masked_fill(~valid, 0.0)[:, 1:].sum(-1) / n_others)
        else:
            if a.loss_type == "ipo" and a.ipo_average:  # TRL's IPO: per-token log-ratios
                n = pol.count.clamp(min=1)
                h = L.dpo_margin(pi[:, 0] / n[:, 0], pi[:, 1] / n[:, 1], rf[:, 0] / n[:, 0], rf[:, 1] / n[:, 1])
            else:
                h = L.dpo_margin(pi[:, 0], pi[:, 1], rf[:, 0], rf[:, 1])
            if a.loss_type == "ipo":
                loss = L.ipo_loss(h, beta)
            else:
                loss = L.sigmoid_dpo_loss(h, beta, a.label_smoothing if a.loss_type == "cdpo" else 0.0)
            rw, rl = L.implicit_rewards(pi[:, 0], rf[:, 0], beta), L.implicit_rewards(pi[:, 1], rf[:, 1], beta)
            lp_rej = pi[:, 1].detach()
        if a.sft_weight:
            sft = L.sft_term(pi[:, 0], a.sft_weight)
            loss = loss + sft
            m["sft_loss"] = sft.detach().sum()
        out["pair_loss_sum"] = loss.sum()
        m.update({"logps/chosen": pi[:, 0].detach().sum(), "logps/rejected": lp_rej.sum()})
    m.update({"rewards/chosen": rw.sum(), "rewards/rejected": rl.sum(), "rewards/margins": (rw - rl).sum()})
    m.setdefault("rewards/accuracies", (rw > rl).float().sum())
    out["metrics"] = m
    return out


def metric_keys(a) -> list[str]:
    """The metric names objective() returns for these arguments, from one call on zeros: a rank that has
    no batch in a step knows them too, so every rank reduces the same values in the same order."""
    n, k, length = 2, 4, 1  # OPA reads rows in pairs and 4 responses; pairs and lists read the first 2+
    z, one = torch.zeros(n, k, length), torch.ones(n, k, length)
    pol = ResponseLogps(z.sum(-1), one.sum(-1), z.sum(-1), z, one, one)
    ref = (pol.sum, pol.count, pol.wsum) + ((z,) if a.loss_type == "opa" and a.opa_token_level else ())
    return sorted(objective(pol, None if a.loss_type in REFERENCE_FREE else ref, a)["metrics"])


def opa_objective(pol: ResponseLogps, ref, a, out: dict) -> dict:
    """OPA-DPO on rows alternating real image [gt, revised(score w), rollout(score w), revised(type w)]
    and masked image [gt, revised(type w)] (training.dpo.opa.data). Sums for unweighted responses,
    weighted sums where the pair is weighted, for policy and reference alike."""
    beta = a.beta
    ref_sum, _, ref_wsum = ref[:3]
    s, w = pol.sum - ref_sum, pol.wsum - ref_wsum  # log-ratios (2N, K)
    real_s, real_w, mask_s, mask_w = s[0::2], w[0::2], s[1::2], w[1::2]
    h = [real_s[:, 0] - real_s[:, 2],  # 1: ground truth > rollout
         real_w[:, 1] - real_w[:, 2],  # 2: revised > rollout, sentence-score weights
         real_s[:, 0] - mask_s[:, 0],  # 3: ground truth, real image > masked image
         real_w[:, 3] - mask_w[:, 1]]  # 4: revised, real image > masked image, error-type weights
    # AncPO's r_k as published: beta x the chosen response's UNWEIGHTED log-ratio, also for the weighted pairs
    # 2 and 4 (the released dpo_loss returns beta * chosen_logratios; weights enter the pair logits only)
    chosen = [beta * real_s[:, 0], beta * real_s[:, 1], beta * real_s[:, 0], beta * real_s[:, 3]]
    pair_losses, anchor_r, unions = None, chosen, None
    if a.opa_token_level:  # the released code's per-token sigmoid; needs per-token reference log-probs
        t = pol.token_lp - ref[3]  # (2N, K, L)
        tw = t * pol.weights
        k = pol.mask
        pairs = [(t[0::2, 0], t[0::2, 2], k[0::2, 0], k[0::2, 2]), (tw[0::2, 1], tw[0::2, 2], k[0::2, 1], k[0::2, 2]),
                 (t[0::2, 0], t[1::2, 0], k[0::2, 0], k[1::2, 0]), (tw[0::2, 3], tw[1::2, 1], k[0::2, 3], k[1::2, 1])]
        pair_losses = [L.token_level_dpo_loss(*p, beta) for p in pairs]
        # the anchor per token too: each chosen response's unweighted per-token reward over its pair's positions
        anchor_r = [beta * t[0::2, j] * k[0::2, j] for j in (0, 1, 0, 3)]
        unions = [((p[2] + p[3]) > 0).to(t.dtype) for p in pairs]
    loss = L.opa_dpo_loss(h, anchor_r, beta, a.opa_c_std, a.opa_c_ai, a.opa_anchor, pair_losses, unions)
    m = {}
    if a.sft_weight:  # the DPO family's added SFT term, on the ground-truth answer with the real image
        sft = L.sft_term(pol.sum[0::2, 0], a.sft_weight)
        loss = loss + sft
        m["sft_loss"] = sft.detach().sum()
    out["pair_loss_sum"] = loss.sum()
    rw, rl = chosen[0].detach(), (beta * real_s[:, 2]).detach()
    m |= {"rewards/chosen": rw.sum(), "rewards/rejected": rl.sum(), "rewards/margins": (rw - rl).sum(),
         "rewards/accuracies": (rw > rl).float().sum(),
         "logps/chosen": pol.sum[0::2, 0].detach().sum(), "logps/rejected": pol.sum[0::2, 2].detach().sum()}
    for k, x in enumerate(h, 1):
        m[f"opa/margin{k}"] = (beta * x).detach().sum()
        m[f"opa/accuracy{k}"] = (x > 0).float().detach().sum()
    out["metrics"] = m
    return out
