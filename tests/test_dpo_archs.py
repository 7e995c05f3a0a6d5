"""Per-response log-probs of the DPO batch layouts on other VLM families equal one full forward per
response: the shared-prefix layout on LLaVA-NeXT, Idefics3 / SmolVLM and Qwen2-VL / 2.5-VL (multimodal positions
from each prompt alone), the plain layout on Llama-3.2-Vision (mllama, cross-attention mask re-fitted per row)."""
import json

import pytest
import torch
from PIL import Image
from sft_helpers import assert_same_grads

from training.config import LoraArgs, ModelArgs
from training.data.collate import collate_sft
from training.data.records import Message
from training.dpo.data import PREFIX_ARCHS, collate_groups, encode_group
from training.dpo.forward import response_logps
from training.dpo.last_layer import last_decoder_layer
from training.logprobs import sequence_logprobs
from training.model.builder import load_model_and_processor
from training.model.tiny_archs import make_tiny_checkpoint
from training.rm.model import RewardModel
from training.templates.chat import ChatEncoder


@pytest.mark.parametrize("arch", ["llava_next", "mllama", "qwen2_vl", "qwen2_5_vl", "idefics3"])
def test_layout_equals_one_forward_per_response(arch, tmp_path):
    path = make_tiny_checkpoint(arch, tmp_path / arch)
    model, proc, spec = load_model_and_processor(ModelArgs(from_checkpoint=path), LoraArgs(), for_training=False)
    enc = ChatEncoder(proc, spec, 4096)
    prompt = [Message("user", "<image>\nWhat is shown?")]
    groups = [(["A red circle.", "A big blue square is here."], (200, 20, 20)),
              (["Two green stars.", "A cross."], (20, 200, 20))]
    items = [encode_group(enc, prompt, resp, [Image.new("RGB", (40, 30), color)], i)
             for i, (resp, color) in enumerate(groups)]
    got = response_logps(model, collate_groups(items, proc.tokenizer.pad_token_id, spec.name, fast=True))
    for n, (resp, color) in enumerate(groups):
        for k, text in enumerate(resp):
            e = enc.encode(prompt + [Message("assistant", text)], [Image.new("RGB", (40, 30), color)])
            out = model(input_ids=e.input_ids[None], attention_mask=torch.ones(1, len(e.input_ids), dtype=torch.long),
                        **e.vision)
            labels = e.labels.clone()
            labels[:e.prompt_len] = -100  # the last assistant turn only
            want = sequence_logprobs(out.logits, labels[None])[0]
            torch.testing.assert_close(got.sum[n, k], want, rtol=0, atol=1e-4, msg=f"{arch} item {n} response {k}")
    assert (spec.name in PREFIX_ARCHS) == (arch != "mllama")


@pytest.mark.parametrize("arch", ["llava_next", "idefics3", "qwen2_vl", "qwen2_5_vl"])
def test_shared_prefix_gradients_and_live_last_layer(arch, tmp_path):
    """On the other shared-prefix families the packed layout's gradients equal the plain layout's too, and the
    language model's last layer runs at the live positions alone (Idefics3's is a Llama layer, Qwen2-VL's a Qwen2
    one with multimodal rotary tables). Qwen2-VL's images of two sizes have grids of their own, and each item's
    multimodal positions restart in the packed row. Idefics3 splits each image into tiles as SmolVLM does (5 and 3
    here, and a text-only item between them: pixel_values (3, 5, ...), zero-padded), and the tiles' features go
    into the one packed row in order."""
    path = make_tiny_checkpoint(arch, tmp_path / arch)
    model, proc, spec = load_model_and_processor(ModelArgs(from_checkpoint=path), LoraArgs(), for_training=False)
    if arch == "idefics3":
        ip = proc.image_processor  # images resized to 64 px on the long side, cut into 32 px tiles + the whole
        ip.do_image_splitting, ip.size, ip.max_image_size = True, {"longest_edge": 64}, {"longest_edge": 32}
    enc = ChatEncoder(proc, spec, 4096)
    items = [encode_group(enc, [Message("user", q)], resp, [Image.new("RGB", size, color)] if size else [], i)
             for i, (q, resp, size, color) in enumerate(
                 [("<image>\nWhat is shown?", ["A red circle.", "A big blue square is here."], (40, 30), (200, 20, 20)),
                  ("What is a star?", ["A shape.", "A bright red cross."], None, None),  # text only, between
                  ("<image>\nDescribe it.", ["Two green stars.", "A cross."], (30, 64), (20, 200, 20))])]
    params = [p.requires_grad_(True) for p in model.parameters()]
    (plain, g_plain), (fast, g_fast) = (
        (lp.detach(), torch.autograd.grad(lp.sum(), params, allow_unused=True)) for lp in
        (response_logps(model, collate_groups(items, proc.tokenizer.pad_token_id, spec.name, fast=f)).sum
         for f in (False, True)))
    if arch == "idefics3":
        assert [it.vision["pixel_values"].shape[1] if it.vision else 0 for it in items] == [5, 0, 3]
    assert plain.abs().min() > 1.0
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)
    assert type(last_decoder_layer(model)).__name__ == {
        "llava_next": "LiveMistralDecoderLayer", "idefics3": "LiveLlamaDecoderLayer",
        "qwen2_vl": "LiveQwen2VLDecoderLayer", "qwen2_5_vl": "LiveQwen2_5_VLDecoderLayer"}[arch]
    assert_same_grads(g_fast, g_plain)


@pytest.mark.parametrize("lm", ["gemma2", "mistral", "qwen2"])
def test_packed_layout_keeps_sliding_windows_and_soft_capping(lm, tmp_path):
    """A LLaVA checkpoint holds any causal LM (built from parts). The packed layout computed plain causal SDPA for
    every layer: Mistral's and Gemma 2's sliding windows (6 tokens here, shorter than the rows) and Gemma 2's
    soft-capped attention logits (its eager attention) were lost: the log-probs differed by nats. Mistral's and
    Qwen2's last layers run whole at the live positions alone (training.dpo.last_layer), under their windows (Qwen2's
    on its last layer only); Gemma 2's runs whole everywhere."""
    import transformers

    path = make_tiny_checkpoint("llava", tmp_path / "llava")
    _, proc, spec = load_model_and_processor(ModelArgs(from_checkpoint=path), LoraArgs(), for_training=False)
    cfg = transformers.AutoConfig.from_pretrained(path)
    common = dict(vocab_size=cfg.text_config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, sliding_window=6, initializer_range=0.5)
    cfg.text_config = {"gemma2": lambda: transformers.Gemma2Config(**common, head_dim=8, attn_logit_softcapping=1.0),
                       "mistral": lambda: transformers.MistralConfig(**common),
                       "qwen2": lambda: transformers.Qwen2Config(**common, use_sliding_window=True,
                                                                 max_window_layers=1)}[lm]()
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    if lm == "gemma2":
        model.config.text_config._attn_implementation = "eager"  # (transformers' choice for Gemma 2: soft-capping)
    enc = ChatEncoder(proc, spec, 4096)
    image = Image.new("RGB", (40, 30), (200, 20, 20))
    items = [encode_group(enc, [Message("user", q)], resp, [image], i) for i, (q, resp) in enumerate(
        [("<image>\nWhat is shown?", ["A red circle.", "A big blue square is here."]),
         ("<image>\nDescribe the image in a lot of detail, please.", ["Two green stars.", "A cross."])])]
    params = list(model.parameters())
    (plain, g_plain), (fast, g_fast) = (
        (lp.detach(), torch.autograd.grad(lp.sum(), params, allow_unused=True)) for lp in
        (response_logps(model, collate_groups(items, proc.tokenizer.pad_token_id, spec.name, fast=f)).sum
         for f in (False, True)))
    assert plain.abs().min() > 1.0
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)
    layer = type(last_decoder_layer(model)).__name__
    assert layer == {"gemma2": "Gemma2DecoderLayer", "mistral": "LiveMistralDecoderLayer",
                     "qwen2": "LiveQwen2DecoderLayer"}[lm]
    for a, b in zip(g_fast, g_plain):  # the backward too (the packed layout's padding slots get no gradient out)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_an_mllama_text_only_pair_scores_as_alone_beside_pairs_with_images(tmp_path):
    """transformers' Llama-3.2-Vision lets a text row that attends to no image attend to every vision token of
    its sample (its cross-attention output is not masked, only the MLP's): a text-only pair batched with pairs
    with images read the zero-padded images, its log-probs off by 0.0076 nats from the same pair alone."""
    path = make_tiny_checkpoint("mllama", tmp_path / "mllama")
    model, proc, spec = load_model_and_processor(ModelArgs(from_checkpoint=path), LoraArgs(), for_training=False)
    enc = ChatEncoder(proc, spec, 4096)
    items = [encode_group(enc, [Message("user", "<image>\nWhat is shown?")], ["A red circle.", "A cross."],
                          [Image.new("RGB", (30, 64), (200, 20, 20))], 0),
             encode_group(enc, [Message("user", "What is two plus two?")], ["four", "It is five, surely."], [], 1)]
    batched = response_logps(model, collate_groups(items, proc.tokenizer.pad_token_id, spec.name, fast=False)).sum
    alone = response_logps(model, collate_groups(items[1:], proc.tokenizer.pad_token_id, spec.name, fast=False)).sum
    torch.testing.assert_close(batched[1], alone[0], rtol=0, atol=1e-5)
    # the reward model and the critic call the inner model alone: its states are the same fix's
    rm = RewardModel(model, factual=False)
    rows = [enc.encode([Message("user", "<image>\nWhat is shown?"), Message("assistant", "A cross.")],
                       [Image.new("RGB", (30, 64), (200, 20, 20))]),
            enc.encode([Message("user", "What is two plus two?"), Message("assistant", "four")], [])]
    scores = [rm.values(b.input_ids, b.attention_mask, **b.vision) for b in
              (collate_sft(rows, proc.tokenizer.pad_token_id, spec.name), collate_sft(rows[1:], 0, spec.name))]
    n = len(rows[1].input_ids)
    torch.testing.assert_close(scores[0][1, :n], scores[1][0, :n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["idefics3", "qwen2_vl"])
def test_stage_fast_and_plain_paths_train_alike(arch, world, tmp_path):
    """The DPO stage on a tiny Idefics3 / SmolVLM and Qwen2-VL: batch 4 in the shared-prefix layout (reference
    cached) == batch 1 x accumulation 4 in the plain layout (reference recomputed each step): one SGD step is the
    gradient, so the losses and the weights agree."""
    from dist_dpo_driver import dpo_args
    from sft_helpers import weights

    from training.dpo.main import main

    tiny = make_tiny_checkpoint(arch, tmp_path / arch)
    sgd = ["--optimizer", "sgd", "--learning_rate", "2.0", "--max_steps", "2"]
    main(dpo_args(world, tiny, tmp_path / "a", *sgd, "--per_device_train_batch_size", "4"))
    main(dpo_args(world, tiny, tmp_path / "b", *sgd, "--per_device_train_batch_size", "1",
                  "--gradient_accumulation_steps", "4", "--no-fast_path", "--no-precompute_ref"))
    a, b, init = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tiny)
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert len(rows[0]) == 2 and rows[0] == pytest.approx(rows[1], rel=1e-4)


def test_qwen2_vl_packed_positions_reach_the_model_through_lora_and_deepspeed(world, tmp_path):
    """The multimodal positions come from the model's get_rope_index, found beneath the DeepSpeed engine and peft's
    wrapper: a LoRA run's first log-probs on the fast path equal the plain path's (its first loss is log 2 on
    both: the policy is its reference)."""
    from dist_dpo_driver import dpo_args

    from training.dpo.main import main

    tiny = make_tiny_checkpoint("qwen2_vl", tmp_path / "qwen2_vl")
    lora = ["--lora_r", "4", "--lora_dropout", "0", "--max_steps", "1", "--per_device_train_batch_size", "4"]
    main(dpo_args(world, tiny, tmp_path / "a", *lora))
    main(dpo_args(world, tiny, tmp_path / "b", *lora, "--no-fast_path"))
    first = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in "ab"]
    for key in ("logps/chosen", "logps/rejected"):
        assert first[0][key] == pytest.approx(first[1][key], rel=1e-5) and first[0][key] < -1.0


def test_qwen2_vl_items_with_two_images_and_one(tmp_path):
    """get_rope_index takes the batch's image grids in order: an item with two images of other sizes before an item
    with one gets each image's grid in the packed layout as in its own plain forward."""
    path = make_tiny_checkpoint("qwen2_vl", tmp_path / "qwen2_vl")
    model, proc, spec = load_model_and_processor(ModelArgs(from_checkpoint=path), LoraArgs(), for_training=False)
    enc = ChatEncoder(proc, spec, 4096)
    items = [encode_group(enc, [Message("user", "<image>\n<image>\nWhat differs?")], ["The colour.", "Nothing at all."],
                          [Image.new("RGB", (64, 32), (200, 20, 20)), Image.new("RGB", (32, 96), (20, 20, 200))], 0),
             encode_group(enc, [Message("user", "<image>\nWhat is shown?")], ["A cross.", "Two green stars."],
                          [Image.new("RGB", (48, 48), (20, 200, 20))], 1)]
    assert [len(it.vision["image_grid_thw"]) for it in items] == [2, 1]
    fast, plain = (response_logps(model, collate_groups(items, proc.tokenizer.pad_token_id, spec.name, fast=f)).sum
                   for f in (True, False))
    assert plain.abs().min() > 1.0
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)
