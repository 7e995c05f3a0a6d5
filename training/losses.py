"""Every loss of the pipeline, as small pure functions: tensors in, tensors out.

Losses never see images, DeepSpeed or data loaders. Each is tested against hand-derived values
(tests/test_losses*.py) and, where TRL has the same loss, against TRL on identical inputs.
Formulas: shared/reference/algorithms.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401  (used by the sections below)

# ---- reward model ------------------------------------------------------------------------------

# ---- DPO family and ORPO -----------------------------------------------------------------------

# ---- PPO -----------------------------------------------------------------------------------------
