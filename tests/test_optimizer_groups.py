"""training/engine/optimizer.py build_optimizer: SGD and DeepSpeed's CPU Adam (offload) keep the weight-decay groups
(tests/test_strategy.py checks AdamW's)."""
import pytest
import torch

from training.config import OptimArgs
from training.engine.optimizer import build_optimizer


@pytest.mark.parametrize("optimizer, offloaded", [("sgd", False), ("adamw", True), ("adamw", False)])
def test_every_optimizer_decays_weights_but_not_biases_or_norms(optimizer, offloaded):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    o = OptimArgs(optimizer=optimizer, weight_decay=0.1, learning_rate=0.5)
    opt = build_optimizer(model, list(model.named_parameters()), o, offloaded)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay == {id(model[0].weight): 0.1, id(model[2].weight): 0.1, id(model[0].bias): 0.0,
                     id(model[1].weight): 0.0, id(model[1].bias): 0.0}
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
    frozen = [(n, p) for n, p in model.named_parameters() if n.startswith("2.")]  # only some parameters trained
    opt = build_optimizer(model, frozen, o, offloaded)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(model[2].weight)]]
