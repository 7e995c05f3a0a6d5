"""The reward model on every architecture the builder supports (full, LoRA, QLoRA): the reward is
read at the last non-pad token, gradients reach head and backbone, and a saved reward model reloads
with the same scores."""
import numpy as np
import pytest
import torch
from PIL import Image

from training.config import LoraArgs, ModelArgs
from training.data.records import Message
from training.losses import bradley_terry_loss
from training.model.builder import load_model_and_processor, save_model
from training.model.tiny_archs import SUPPORTED_TINY, make_tiny_checkpoint
from training.rm.data import collate_ranked, encode_for_rm
from training.rm.model import RewardModel, load_reward_model
from training.templates.chat import ChatEncoder

PROMPT = [Message("user", "<image>\nDescribe the image in detail.")]
PAIR = ["The image shows one red circle.", "The image shows two red circles and one blue star on a white table."]
FACTS = ["a red circle on a white table.", "there is no star."]


def _img(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def _pair_batch(processor, spec):
    enc = ChatEncoder(processor, spec, 512)
    items = [[encode_for_rm(enc, PROMPT, r, [_img(0)], FACTS, factual=True) for r in PAIR]]
    return collate_ranked(items, processor.tokenizer.pad_token_id, spec.name)


@pytest.mark.parametrize("arch,lora", [(a, LoraArgs()) for a in SUPPORTED_TINY]
                         + [("llava", LoraArgs(lora_r=4)), ("qwen2_vl", LoraArgs(lora_r=4)),
                            ("llava", LoraArgs(lora_r=4, qlora=True))])
def test_reward_model_every_architecture(arch, lora, tmp_path):
    ckpt = make_tiny_checkpoint(arch, tmp_path / "base")
    torch.manual_seed(0)
    backbone, processor, spec = load_model_and_processor(
        ModelArgs(from_checkpoint=ckpt, freeze_vision_tower=lora.qlora), lora)
    rm = RewardModel(backbone, factual=True)
    b = _pair_batch(processor, spec)
    R, _ = b.as_matrix(rm(**b.seqs.model_inputs()))
    assert R.shape == (1, 2) and R.dtype == torch.float32
    v = rm.values(**b.seqs.model_inputs())  # (S, T) critic values; the reward is the last real one
    last = b.seqs.attention_mask.sum(-1) - 1
    torch.testing.assert_close(v[torch.arange(2), last], R[0], rtol=0, atol=1e-6)
    bradley_terry_loss(R[:, 0], R[:, 1]).backward()
    assert rm.value_head.weight.grad.abs().sum() > 0
    trained = [n for n, p in rm.backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(spec.param_group(n) == "lm" for n in trained)
    if lora.lora_r:  # the language model trains through its adapters only
        assert all("lora_" in n for n in trained if spec.param_group(n) == "lm")
    lm_head = rm.backbone.get_output_embeddings() if not lora.lora_r else rm.backbone.get_base_model().lm_head
    assert not any(p.requires_grad for p in lm_head.parameters())

    if lora.qlora:  # a 4-bit model reloads merged in full precision: only reload == reload is exact
        save_model(rm, processor, tmp_path / "rm")
        a = _scores(tmp_path / "rm")
        assert torch.equal(a, _scores(tmp_path / "rm"))
        return
    rm.eval()
    with torch.no_grad():
        before = rm(**b.seqs.model_inputs())
    save_model(rm, processor, tmp_path / "rm")
    torch.testing.assert_close(_scores(tmp_path / "rm"), before, rtol=0, atol=1e-5 if lora.lora_r else 0)


def _scores(path):
    rm, processor, spec = load_reward_model(path)
    b = _pair_batch(processor, spec)
    with torch.no_grad():
        return rm(**b.seqs.model_inputs())


def test_non_factual_reward_is_read_at_the_answers_end_token(tmp_path):
    """ChatML writes a newline after <|im_end|>: the reward was read at that newline when it fit and at
    <|im_end|> when only it was cut (a different token for the same answer). It is read at the end token always."""
    ckpt = make_tiny_checkpoint("qwen2_vl", tmp_path / "base")
    _, processor, spec = load_model_and_processor(ModelArgs(from_checkpoint=ckpt), LoraArgs(), for_training=False)
    tok = processor.tokenizer
    full = encode_for_rm(ChatEncoder(processor, spec, 4096), PROMPT, PAIR[0], [_img(0)], whole=True)
    assert tok.convert_ids_to_tokens(int(full.input_ids[-1])) == "<|im_end|>"
    tight = encode_for_rm(ChatEncoder(processor, spec, len(full.input_ids)), PROMPT, PAIR[0], [_img(0)], whole=True)
    assert torch.equal(tight.input_ids, full.input_ids) and not tight.truncated


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "mllama"])
def test_scorer_reads_a_response_spelling_the_image_placeholder_without_it(arch, tmp_path):
    """A sampled answer (best-of-n, PPO) can spell the placeholder from ordinary tokens; the scorer's encoder took
    it for a second image and stopped. The reward model reads the answer without it: the architecture's token
    and the messages' "<image>" (on Qwen2-VL and mllama that one stopped scoring: "2 image placeholders")."""
    from training.rm.data import RewardScorer

    backbone, processor, spec = load_model_and_processor(ModelArgs(from_checkpoint=make_tiny_checkpoint(
        arch, tmp_path / "base")), LoraArgs())
    scorer = RewardScorer(RewardModel(backbone, factual=False).eval(), processor, spec, 512, batch_size=1)
    for mark in {spec.image_token, "<image>"}:
        text = f"one red circle {mark}."
        spelled, plain = scorer.score([PROMPT] * 2, [[_img(0)]] * 2, [text, text.replace(mark, "")])
        assert float(spelled) == float(plain)


def test_last_token_index_with_right_and_left_padding():
    """The reward is read at each row's last attended position, whichever side is padded (the model's doc says
    both): the count of attended positions minus one passed every test, and is wrong for left padding."""
    from training.rm.model import last_token_index
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 3]
