"""Keep a dataset's encoded samples in memory, up to a budget, so later passes over the same data
(the reference pass, then each epoch) skip tokenising, chat-template rendering and image processing."""
from __future__ import annotations

import dataclasses
import time

import torch


def nbytes(x) -> int:
    """Bytes held by the tensors inside x (dataclasses, lists, tuples, dicts)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if dataclasses.is_dataclass(x):
        return sum(nbytes(getattr(x, f.name)) for f in dataclasses.fields(x))
    if isinstance(x, (list, tuple)):
        return sum(nbytes(v) for v in x)
    if isinstance(x, dict):
        return sum(nbytes(v) for v in x.values())
    return 0


class EncodedCache(torch.utils.data.Dataset):
    """Wraps a dataset whose items are deterministic; items are kept first come, until budget_mb is used.
    Attributes not defined here (rows_per_item, ...) are the wrapped dataset's. encode_seconds: the time spent
    encoding (the wrapped dataset's items), for a run's timings."""

    def __init__(self, inner, budget_mb: float):
        self.inner, self.budget = inner, int(budget_mb * 2 ** 20)
        self.kept: dict[int, object] = {}
        self.used = 0
        self.encode_seconds = 0.0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        if i in self.kept:
            return self.kept[i]
        t0 = time.perf_counter()
        item = self.inner[i]
        self.encode_seconds += time.perf_counter() - t0
        size = nbytes(item)
        if self.used + size <= self.budget:
            self.kept[i] = item
            self.used += size
        return item

    def __getattr__(self, name):
        if name == "inner":  # not yet set (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)
