"""Which losses.py function a --loss_type applies to which log-probs, and what it logs.

`objective` returns per-item sums (the trainer divides by the step's global item / token counts,
so any split of a step over micro-batches and ranks gives the same update) and metric sums.
"""
from __future__ import annotations

import torch

from training import losses as L
from training.dpo.forward import ResponseLogps

LOSS_TYPES = ("sigmoid", "cdpo", "ipo", "orpo", "listwise")
REFERENCE_FREE = {"orpo"}


def objective(pol: ResponseLogps, ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, a) -> dict:
    """pol: policy log-probs (N, K); ref: (sum, count, wsum) of the reference, (N, K); a: DPOArgs.
    Returns {"pair_loss_sum": scalar over items, "nll_sum": scalar over chosen tokens (ORPO),
    "nll_tokens": int, "metrics": {name: sum over items}}."""
    beta = a.beta
    m = {}
    out = {"nll_sum": torch.zeros((), device=pol.sum.device), "nll_tokens": 0.0}
    if a.loss_type == "orpo":
        avg = pol.avg
        term, log_odds = L.orpo_odds_ratio_loss(avg[:, 0], avg[:, 1])
        out["pair_loss_sum"] = a.orpo_lambda * term.sum()
        out["nll_sum"] = -pol.sum[:, 0].sum()
        out["nll_tokens"] = float(pol.count[:, 0].sum())
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
