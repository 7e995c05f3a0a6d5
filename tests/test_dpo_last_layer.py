"""training.dpo.last_layer: in the packed layout the language model's last layer runs whole only at the live
positions (each item's last prompt token and its responses, where logits are taken); keys and values everywhere.
The log-probs and gradients equal the plain layout's in tests/test_dpo.py (LLaMA, LoRA, gradient checkpointing) and
tests/test_dpo_archs.py (Mistral's and Qwen2's sliding windows); here, that the last layer does take that path."""
import pytest
import torch

from training.dpo.data import GroupItem, collate_plain, collate_prefix
from training.dpo.forward import response_logps
from training.dpo.last_layer import last_decoder_layer


def _item(index, prompt, responses):
    t = [torch.tensor(r) for r in responses]
    return GroupItem(index, torch.tensor(prompt), {}, t, [x.clone() for x in t])


def test_live_positions_by_hand():
    # item 0: prompt 3 tokens, responses 2 and 1 -> 6 tokens at packed 0..5, live slots 2..5 (its prompt's last and
    # its responses); item 1: prompt 2, responses 1 and 1 -> packed 6..9, live slots 1..3 (packed 7..9)
    b = collate_prefix([_item(0, [1, 2, 3], [[4, 5], [6]]), _item(1, [7, 8], [[9], [10]])], 0, "llava")
    lay = b.layout
    assert lay["live_rows"].tolist() == [2, 3, 4, 5, 7, 8, 9]
    assert lay["live_gather"].tolist() == [0, 1, 2, 3, 4, 5, 6, 6]  # item 1's spare slot repeats its last
    assert lay["live_scatter"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    # positions restart after the prompt for each response: item 0's slots 2..5 hold positions 2, 3, 4, 3
    assert lay["live_positions"].tolist() == [[2, 3, 4, 3], [1, 2, 2, 2]]
    assert torch.equal(lay["live_mask"][0, 0], lay["mask"][0, 0, 2:6])
    assert torch.equal(lay["live_mask"][1, 0], lay["mask"][1, 0, [1, 2, 3, 3]])
    # every logit taken is at a live position (spare label slots included)
    assert set(b.keep.view(-1).tolist()) <= set(lay["live_rows"].tolist())


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    from training.model.tiny import ensure_tiny_vlm
    return ensure_tiny_vlm(tmp_path_factory.mktemp("tiny2"), hidden=32, layers=2, vision_pretrain_steps=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_last_layer_runs_whole_at_live_positions_only(world, two_layers, checkpointing):
    from sft_helpers import pref_dataset
    from training.config import LoraArgs, ModelArgs
    from training.model.builder import load_model_and_processor

    model, proc, arch = load_model_and_processor(
        ModelArgs(from_checkpoint=str(two_layers), gradient_checkpointing=checkpointing), LoraArgs())
    model.train()
    items = [pref_dataset(world, two_layers, 160, n_responses=2)[i] for i in range(3)]
    live = sum(sum(len(r) for r in it.responses) + 1 for it in items)
    packed = sum(len(it.prompt_ids) + sum(len(r) for r in it.responses) for it in items)
    rows = {"first mlp": [], "last mlp": [], "last q": [], "last k": []}
    layers = model.get_decoder().layers
    hooks = [m.register_forward_hook(lambda m, i, o, key=key: rows[key].append(i[0].shape[:-1].numel()))
             for key, m in (("first mlp", layers[0].mlp), ("last mlp", layers[-1].mlp),
                            ("last q", layers[-1].self_attn.q_proj), ("last k", layers[-1].self_attn.k_proj))]
    lp = response_logps(model, collate_prefix(items, proc.tokenizer.pad_token_id, arch.name)).sum
    lp.sum().backward()  # under checkpointing the backward runs the layers again, on the same rows
    assert type(last_decoder_layer(model)).__name__ == "LiveLlamaDecoderLayer"
    assert {k: set(v) for k, v in rows.items()} == {"first mlp": {packed}, "last mlp": {live}, "last q": {live},
                                                    "last k": {packed}}
    assert len(rows["last mlp"]) == (2 if checkpointing else 1)  # the recomputation takes the live path too
    for v in rows.values():
        v.clear()
    response_logps(model, collate_plain(items, proc.tokenizer.pad_token_id, arch.name))  # any other forward: whole
    rows_plain = 2 * max(len(it.prompt_ids) + len(r) for it in items for r in it.responses) * len(items)
    assert rows["last mlp"] == rows["first mlp"] == [rows_plain]
    for h in hooks:
        h.remove()
