"""RL numerics shared by PPO: KL estimators, reward shaping, GAE and whitening (pure functions).

Shapes: B rollouts, T response positions; `mask` (B, T) is 1 on response tokens (up to and
including EOS), 0 on padding after it.
"""
from __future__ import annotations

import torch



def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from samples of pi, (B, T).

    k1 = log pi - log ref (unbiased, can be negative);
    k3 = (r - 1) - log r with r = ref / pi (unbiased, always >= 0, lower variance; Schulman 2020).
    """
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r} (k1 | k3)")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * kl_t on every response token, plus the sequence score at the last one. (B, T)."""
    r = -kl_coef * kl * mask
    T = mask.shape[-1]
    last = T - 1 - mask.flip(-1).long().argmax(-1)  # (B,) last response position
    return r.scatter_add(1, last[:, None], score[:, None].to(r.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens. Returns (advantages, returns), (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t   (V after the last response token is 0)
    A_t     = sum_k (gamma * lam)^k delta_{t+k},   returns = A + V
    """
    values = values * mask
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        last = last * mask[:, t]  # padding positions carry nothing back
        adv[:, t] = last
    return adv, (adv + values) * mask


def masked_moments(x: torch.Tensor, mask: torch.Tensor, reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) variance of x over masked positions. reduce: sums a tensor over ranks (e.g. the
    strategy's all_reduce); with it the moments are those of every rank's positions together."""
    total = reduce or (lambda t: t)
    m = mask.to(x.dtype)
    count = total(m.sum().double()).clamp(min=1)  # no position anywhere: zeros, not NaN
    mean = (total((x * m).sum().double()) / count).to(x.dtype)
    var = (total((((x - mean) ** 2) * m).sum().double()) / count).to(x.dtype)
    return mean, var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           reduce=None) -> torch.Tensor:
    """(x - mean) / std over masked positions (mean kept when shift_mean is False); with `reduce` (see
    masked_moments) two ranks whiten as one rank with the whole batch."""
    mean, var = masked_moments(x, mask, reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def explained_variance(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, reduce=None) -> float:
    """1 - Var(returns - values) / Var(returns) over masked positions (of all ranks with `reduce`): 1 for a
    critic that predicts the returns, 0 for one that predicts their mean, negative for worse."""
    _, var_ret = masked_moments(returns, mask, reduce)
    _, var_err = masked_moments(returns - values, mask, reduce)
    return float(1 - var_err / var_ret.clamp(min=1e-8))


class RunningMoments:
    """Running mean / std of scalar scores for reward normalisation: over the whole run (Chan et al.
    parallel update), or with `window` > 0 over the last `window` scores only (Vision-LLM-Alignment's
    running window), so early scores of a policy that has since moved stop weighing in."""

    def __init__(self, window: int = 0):
        self.window = window
        self.mean, self.var, self.count = 0.0, 1.0, 0
        self.recent: list[float] = []

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        if self.window > 0:
            self.recent = (self.recent + x.tolist())[-self.window:]
            r = torch.tensor(self.recent, dtype=torch.float64)
            self.mean, self.var, self.count = float(r.mean()), float(r.var(unbiased=False)), self.count + n
            return
        m, v = float(x.mean()), float(x.var(unbiased=False))
        tot = self.count + n
        delta = m - self.mean
        self.mean += delta * n / tot
        self.var = (self.var * self.count + v * n + delta ** 2 * self.count * n / tot) / tot
        self.count = tot

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count, "window": self.window,
                "recent": list(self.recent)}

    def load_state_dict(self, d: dict) -> None:
        if d.get("window", 0) != self.window:
            raise ValueError(f"the checkpoint's reward statistics have window {d.get('window', 0)}, this run "
                             f"{self.window}: resume with the same --reward_norm_window")
        self.mean, self.var, self.count = d["mean"], d["var"], d["count"]
        self.recent = list(d.get("recent", []))


class AdaptiveKLController:
    """Ziegler et al. 2019: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon.
    With target None the coefficient stays fixed."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        err = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + err * n_steps / self.horizon
