"""LLaVA-RLHF's reward shaping beyond the KL penalty: the stop-token penalty, the length bonus and the
symbolic correct-option reward, applied to the reward model's score of each response."""
from __future__ import annotations

import torch


def option_bonus(response: str, correct) -> float:
    """LLaVA-RLHF's symbolic reward. A letter option (A-Z): 1 when the answer starts with "B." or says
    "correct option is B.", else 0. A yes/no question whose answer is No: 0.5 for an answer starting
    with "No", -0.5 for one starting with "Yes" (none is given when Yes is right, as there). Another
    correct answer: 1 when the response starts with it (case-insensitive). No correct answer: 0."""
    if correct is None or str(correct).strip() == "":
        return 0.0
    r, c = response.strip(), str(correct).strip().rstrip(".")
    if len(c) == 1 and c.isalpha():
        letter = c.upper() + "."
        return 1.0 if r.startswith(letter) or f"correct option is {letter}" in r else 0.0
    if c.lower() == "no":
        return 0.5 if r.startswith("No") else -0.5 if r.startswith("Yes") else 0.0
    if c.lower() == "yes":
        return 0.0
    return 1.0 if r.lower().startswith(c.lower()) else 0.0


def stop_token_penalty(score: torch.Tensor, ended: torch.Tensor, penalty: float, relative: bool) -> torch.Tensor:
    """Responses that never emitted EOS (ended False) get the score -penalty, or with `relative` their
    score minus penalty; penalty 0 leaves the scores."""
    if not penalty:
        return score
    missing = ~ended.to(device=score.device, dtype=torch.bool)  # rollouts keep `ended` on the CPU
    return score - penalty * missing.to(score) if relative else torch.where(missing, -penalty, score)
