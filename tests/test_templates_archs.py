"""The chat-template layer on a tiny checkpoint of EVERY supported architecture (tiny_archs).

As strict as test_template_tiny.py is for the embedded LLaVA: labels checked token by token against
each architecture's real prompt format, truncation that never cuts image tokens, multi-image
conversations, batch collation that equals per-sample results (right padding for training, left
padding for generation), and one real SFT step through `training.sft.main`.
"""
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from training.config import LoraArgs, ModelArgs
from training.data.collate import collate_sft
from training.data.records import Message
from training.logprobs import sequence_logprobs
from training.model.builder import load_model_and_processor
from training.model.architectures import ARCHITECTURES
from training.model.tiny_archs import SUPPORTED_TINY, make_tiny_checkpoint
from training.templates.chat import IGNORE, PER_SAMPLE_VISION, ChatEncoder, PromptTooLong, to_hf_messages

# Per architecture, what its real chat format writes (tiny_archs reproduces it):
#   eot:   the end-of-turn token closing every assistant turn (a target)
#   lead:  text between the generation prompt and the answer, merged into the answer's first token
#   gen:   the generation prompt that ends the text before every answer (never a target)
#   bos:   a BOS the TOKENIZER adds in front of the rendered text (mllama / idefics3 / smolvlm
#          templates write their own BOS text, which must then not be doubled)
#   image: (processor expansion of one image, as a regex; what it collapses to in the rendered text)
#   n_img: image tokens of one 32x32 image (checked by the forward pass, which raises on a mismatch)
ARCH = {
    # LLaVA-1.5: USER: <image>\nQ ASSISTANT: A</s>; (32/8)^2 = 16 patches, CLS dropped
    "llava": dict(eot="</s>", lead=" ", gen=" ASSISTANT:", bos="<s>", image=(r"(<image>)+", "<image>"),
                  n_img=16),
    # LLaVA-NeXT Mistral: [INST] <image>\nQ [/INST] A</s>; 32x32 -> 1 tile of 4x4 + the 4x4 base image
    # + 4 row newlines = 36
    "llava_next": dict(eot="</s>", lead=" ", gen=" [/INST]", bos="<s>", image=(r"(<image>)+", "<image>"),
                       n_img=36),
    # Llama-3.2-Vision: one <|image|> token; the pixels go through cross-attention
    "mllama": dict(eot="<|eot_id|>", lead="", gen="<|start_header_id|>assistant<|end_header_id|>\n\n", bos="",
                   image=(r"<\|image\|>", "<|image|>"), n_img=1),
    # Idefics3 / SmolVLM: User:<image>Q<end_of_utterance>\nAssistant: A<end_of_utterance>\n;
    # 16 patches / scale_factor^2 = 4 tokens, wrapped in <fake_token_around_image><global-img>...
    "idefics3": dict(eot="<end_of_utterance>", lead=" ", gen="\nAssistant:", bos="",
                     image=(r"<fake_token_around_image><global-img>(<image>)+<fake_token_around_image>", "<image>"),
                     n_img=4),
    "smolvlm": dict(eot="<end_of_utterance>", lead=" ", gen="\nAssistant:", bos="",
                    image=(r"<fake_token_around_image><global-img>(<image>)+<fake_token_around_image>", "<image>"),
                    n_img=4),
    # Qwen2-VL / Qwen2.5-VL ChatML: 4x4 patches of 8 px merged 2x2 -> 4 <|image_pad|>
    "qwen2_vl": dict(eot="<|im_end|>", lead="", gen="<|im_start|>assistant\n", bos="",
                     image=(r"(<\|image_pad\|>)+", "<|image_pad|>"), n_img=4),
    "qwen2_5_vl": dict(eot="<|im_end|>", lead="", gen="<|im_start|>assistant\n", bos="",
                       image=(r"(<\|image_pad\|>)+", "<|image_pad|>"), n_img=4),
}
assert sorted(ARCH) == sorted(SUPPORTED_TINY)
# Idefics3 and SmolVLM share one ArchSpec ("idefics3"); smolvlm is its model_type.
params = pytest.mark.parametrize("arch", SUPPORTED_TINY)
# architectures whose ArchSpec says several images per conversation (all of them today)
multi_params = pytest.mark.parametrize(
    "arch", [a for a in SUPPORTED_TINY if ARCHITECTURES[{"smolvlm": "idefics3"}.get(a, a)].multi_image])

A1, A2 = "The image shows one red circle.", "No, there is no star."
CONV = [Message("system", "You are a helpful assistant."),
        Message("user", "<image>\nDescribe the image in detail."), Message("assistant", A1),
        Message("user", "Is there a star?"), Message("assistant", A2)]

TWO_IN_ONE_TURN = [Message("user", "<image>\n<image>\nWhat is different between the two images?"),
                   Message("assistant", "The second image is larger.")]
ONE_PER_TURN = [Message("user", "<image>\nDescribe the image."), Message("assistant", "A small picture."),
                Message("user", "<image>\nAnd this one?"), Message("assistant", "A larger picture, also red.")]
ONE = [Message("user", "<image>\nWhat color is it?"), Message("assistant", "It is red.")]


def _img(seed: int, size=(32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_archs")
    return {a: make_tiny_checkpoint(a, root / a) for a in SUPPORTED_TINY}


@pytest.fixture(scope="module")
def models(ckpts):
    """arch -> (model in eval mode, fp32, frozen; processor; ArchSpec), loaded on first use."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load_model_and_processor(ModelArgs(from_checkpoint=ckpts[arch]), LoraArgs(),
                                                   for_training=False)
        return cache[arch]
    return get


def _spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of target positions."""
    on = (labels != IGNORE).tolist() + [False]
    out, start = [], None
    for i, t in enumerate(on):
        if t and start is None:
            start = i
        elif not t and start is not None:
            out.append((start, i))
            start = None
    return out


def _check_rendered(arch, enc, conv, e) -> None:
    """The tokens are the rendered conversation: images expanded by the processor, one BOS."""
    tok, a = enc.tokenizer, ARCH[arch]
    text = tok.decode(e.input_ids.tolist(), skip_special_tokens=False)
    assert re.sub(a["image"][0], lambda m: a["image"][1], text) == a["bos"] + enc.render(conv, False)
    if tok.bos_token and text.startswith(tok.bos_token):  # one BOS, never doubled or repeated mid-text
        assert int((e.input_ids == tok.bos_token_id).sum()) == 1 and int(e.input_ids[0]) == tok.bos_token_id


def _per_sample_nll(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    return -sequence_logprobs(logits.float(), batch.labels)


def _n_image_tokens(proc, spec, ids) -> int:
    return int((ids == proc.tokenizer.convert_tokens_to_ids(spec.image_token)).sum())


# ---- 1. labels, token by token ------------------------------------------------------------------

@params
def test_labels_are_exactly_the_assistant_turns_and_their_end_of_turn(arch, models):
    model, proc, spec = models(arch)
    tok, a = proc.tokenizer, ARCH[arch]
    enc = ChatEncoder(proc, spec, 512)
    e = enc.encode(CONV, [_img(0)])
    ids, labels = e.input_ids, e.labels

    # the whole sequence is the rendered conversation (one BOS, images expanded by the processor)
    _check_rendered(arch, enc, CONV, e)

    # exactly two target runs: each answer (+ the space the template puts before it) and its end-of-turn
    eot_id = tok.convert_tokens_to_ids(a["eot"])
    spans = _spans(labels)
    assert len(spans) == 2, spans
    for (s, t), answer in zip(spans, (A1, A2)):
        want = tok(a["lead"] + answer + a["eot"], add_special_tokens=False)["input_ids"]
        assert ids[s:t].tolist() == want
        assert int(ids[t - 1]) == eot_id
        assert tok.decode(ids[s:t].tolist(), skip_special_tokens=False) == a["lead"] + answer + a["eot"]
        # what precedes every answer is the generation prompt, not a target
        assert tok.decode(ids[:s].tolist(), skip_special_tokens=False).endswith(a["gen"])
    # labels copy input_ids on targets, -100 everywhere else (prompts, system, headers, images, BOS)
    target = labels != IGNORE
    assert torch.equal(labels[target], ids[target])
    assert (labels[~target] == IGNORE).all()
    assert int(target.sum()) == sum(t - s for s, t in spans)
    img_pos = ids == tok.convert_tokens_to_ids(spec.image_token)
    assert (labels[img_pos] == IGNORE).all()
    assert e.prompt_len == spans[-1][0] and not e.truncated

    # image tokens: as many as the model makes features (it raises "Image features and image tokens
    # do not match" otherwise)
    assert _n_image_tokens(proc, spec, ids) == a["n_img"]
    batch = collate_sft([e], tok.pad_token_id, spec.name)
    nll = _per_sample_nll(model, batch)
    assert torch.isfinite(nll).all()

    # the generation prompt: ends with the generation header, no targets
    g = enc.encode(CONV[:2], [_img(0)], add_generation_prompt=True)
    assert (g.labels == IGNORE).all()
    if arch != "llava_next":  # the Mistral format has no generation prompt: the prompt ends with [/INST]
        assert tok.decode(g.input_ids.tolist(), skip_special_tokens=False).endswith(a["gen"])
    else:
        assert tok.decode(g.input_ids.tolist(), skip_special_tokens=False).endswith("[/INST]")


# ---- 2. truncation --------------------------------------------------------------------------------

@params
def test_truncation_cuts_the_response_never_the_image_tokens(arch, models):
    model, proc, spec = models(arch)
    tok = proc.tokenizer
    full = ChatEncoder(proc, spec, 512).encode(CONV, [_img(0)])
    first = _spans(full.labels)[0][0]  # tokens of the first prompt, image tokens included
    e = ChatEncoder(proc, spec, first + 3).encode(CONV, [_img(0)])
    assert e.truncated and len(e.input_ids) == first + 3
    assert torch.equal(e.input_ids, full.input_ids[:first + 3])
    assert _n_image_tokens(proc, spec, e.input_ids) == ARCH[arch]["n_img"]
    assert e.labels[e.labels != IGNORE].tolist() == full.input_ids[first:first + 3].tolist()
    for k, v in full.vision.items():  # same pixels; token-aligned inputs cut with the tokens
        if k in ("mm_token_type_ids", "cross_attention_mask"):
            assert torch.equal(e.vision[k], v[:, :first + 3]), k
        else:
            assert torch.equal(e.vision[k], v), k
    nll = _per_sample_nll(model, collate_sft([e], tok.pad_token_id, spec.name))
    assert torch.isfinite(nll).all() and float(nll) > 0
    for too_short in (first, first - 1, first // 2):  # no room for a single response token
        with pytest.raises(PromptTooLong):
            ChatEncoder(proc, spec, too_short).encode(CONV, [_img(0)])

    # a later turn whose image does not fit is dropped whole, with its image: the sample is then
    # exactly the first exchange with the first image (up to its end-of-turn token)
    images = [_img(3, (40, 30)), _img(4)]
    whole = ChatEncoder(proc, spec, 512).encode(ONE_PER_TURN, images)
    end1 = _spans(whole.labels)[0][1]
    cut = ChatEncoder(proc, spec, end1 + 5).encode(ONE_PER_TURN, images)
    first_only = ChatEncoder(proc, spec, 512).encode(ONE_PER_TURN[:2], images[:1])
    assert cut.truncated and len(cut.input_ids) == end1
    assert torch.equal(cut.input_ids, first_only.input_ids[:end1])
    assert torch.equal(cut.labels, first_only.labels[:end1])
    assert (first_only.labels[end1:] == IGNORE).all()  # only the separator after the end-of-turn follows
    assert _n_image_tokens(proc, spec, cut.input_ids) == _n_image_tokens(proc, spec, first_only.input_ids)
    assert sorted(cut.vision) == sorted(first_only.vision)
    for k, v in first_only.vision.items():
        assert torch.equal(cut.vision[k], v[:, :end1] if k in ("mm_token_type_ids", "cross_attention_mask") else v), k
    nll = _per_sample_nll(model, collate_sft([cut], tok.pad_token_id, spec.name))
    assert torch.isfinite(nll).all()


# ---- 3. multi-image -------------------------------------------------------------------------------



@multi_params
def test_multi_image_conversations_batch_forward_and_backward(arch, ckpts, models):
    _, proc, spec = models(arch)
    tok = proc.tokenizer
    model, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=ckpts[arch]), LoraArgs())  # trainable
    model.eval()  # no dropout: the batch must equal the samples alone
    enc = ChatEncoder(proc, spec, 512)
    two = enc.encode(TWO_IN_ONE_TURN, [_img(1), _img(2, (64, 32))])
    turns = enc.encode(ONE_PER_TURN, [_img(3, (40, 30)), _img(4)])
    one = enc.encode(ONE, [_img(5, (48, 48))])
    for e, conv, n_targets in ((two, TWO_IN_ONE_TURN, 1), (turns, ONE_PER_TURN, 2), (one, ONE, 1)):
        assert len(_spans(e.labels)) == n_targets
        _check_rendered(arch, enc, conv, e)
    # images in different turns: the second image's tokens lie in the second user turn
    img_pos = (turns.input_ids == tok.convert_tokens_to_ids(spec.image_token)).nonzero().flatten()
    s1, s2 = _spans(turns.labels)
    assert (img_pos < s1[0]).any() and ((img_pos > s1[1]) & (img_pos < s2[0])).any()
    if arch == "mllama":  # text after the 2nd image attends to it only; before it, to the 1st image
        cam = turns.vision["cross_attention_mask"][0, :, :, 0]
        assert cam[s1[0]].tolist() == [1, 0] and cam[s2[0]].tolist() == [0, 1] and cam[0].tolist() == [0, 0]
    for pair in ([two, one], [turns, one], [one, turns]):
        batch = collate_sft(pair, tok.pad_token_id, spec.name)
        assert batch.input_ids.shape[1] == max(len(e.input_ids) for e in pair)
        model.zero_grad(set_to_none=True)
        logits = model(**batch.model_inputs()).logits
        nll = -sequence_logprobs(logits.float(), batch.labels)
        nll.sum().backward()
        assert torch.isfinite(nll).all()
        grads = [p.grad for n, p in model.named_parameters() if spec.param_group(n) == "vision" and p.requires_grad]
        assert grads and any(g is not None and float(g.abs().sum()) > 0 for g in grads)  # images reach the loss
        assert all(torch.isfinite(g).all() for g in grads if g is not None)
        with torch.no_grad():
            alone = torch.cat([_per_sample_nll(model, collate_sft([e], tok.pad_token_id, spec.name)) for e in pair])
        torch.testing.assert_close(nll.detach(), alone, rtol=0, atol=1e-4)


@params
@pytest.mark.parametrize("conv", ["one_image", "two_in_one_turn", "one_per_turn"])
def test_segmentwise_encoding_equals_the_processor_on_the_whole_conversation(arch, conv, models):
    """ChatEncoder tokenises turn by turn (to place the labels); the result must be what the processor
    makes of the whole rendered conversation at once: same tokens, same pixel inputs, incl. the
    token-aligned ones (Qwen2-VL mm_token_type_ids, mllama cross_attention_mask across turns)."""
    _, proc, spec = models(arch)
    messages, images = {"one_image": (CONV, [_img(0)]),
                        "two_in_one_turn": (TWO_IN_ONE_TURN, [_img(1), _img(2, (64, 32))]),
                        "one_per_turn": (ONE_PER_TURN, [_img(3, (40, 30)), _img(4)])}[conv]
    enc = ChatEncoder(proc, spec, 512)
    e = enc.encode(messages, images)
    text, bos = enc.render(messages, False), proc.tokenizer.bos_token
    out = proc(text=[text], images=[images] if spec.name in PER_SAMPLE_VISION else images,
               add_special_tokens=not (bos and text.startswith(bos)), return_tensors="pt")
    assert e.input_ids.tolist() == out.pop("input_ids")[0].tolist()
    out.pop("attention_mask")
    assert sorted(e.vision) == sorted(out)
    for k, v in out.items():
        assert torch.equal(e.vision[k], v), k


# ---- 4. padding: right for training, left for generation ------------------------------------------

SHORT = [Message("user", "<image>\nWhat is it?"), Message("assistant", "A red circle.")]


@params
def test_right_padded_batch_loss_equals_each_sample_alone(arch, models):
    model, proc, spec = models(arch)
    pad = proc.tokenizer.pad_token_id
    enc = ChatEncoder(proc, spec, 512)
    long, short = enc.encode(CONV, [_img(6)]), enc.encode(SHORT, [_img(7, (48, 32))])
    assert len(long.input_ids) != len(short.input_ids)
    for pair in ([long, short], [short, long]):
        batch = collate_sft(pair, pad, spec.name)
        n = [len(e.input_ids) for e in pair]
        assert batch.attention_mask.sum(1).tolist() == n
        for i, e in enumerate(pair):
            assert (batch.input_ids[i, n[i]:] == pad).all() and (batch.labels[i, n[i]:] == IGNORE).all()
        together = _per_sample_nll(model, batch)
        alone = torch.cat([_per_sample_nll(model, collate_sft([e], pad, spec.name)) for e in pair])
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)
    # the images matter (a different image changes the loss), so equality above is not vacuous
    other = _per_sample_nll(model, collate_sft([enc.encode(SHORT, [_img(8, (48, 32))])], pad, spec.name))
    assert abs(float(other) - float(alone[0])) > 1e-5


TEXT_ONLY = [Message("user", "What is a circle?"), Message("assistant", "A round shape.")]


@params
def test_text_only_sample_batched_with_image_samples(arch, models):
    """A text-only row (no pixel inputs at all) in a batch with image rows: per-sample losses unchanged. For mllama
    this holds through training.model.mllama_rows (transformers' cross-attention layer masks only the MLP branch of
    a row with no image, whose attention then read the batch's zero-padded image tiles; it was a strict xfail)."""
    model, proc, spec = models(arch)
    pad = proc.tokenizer.pad_token_id
    enc = ChatEncoder(proc, spec, 512)
    text, image = enc.encode(TEXT_ONLY, []), enc.encode(SHORT, [_img(11)])
    assert not text.vision and len(_spans(text.labels)) == 1
    for pair in ([text, image], [image, text]):
        together = _per_sample_nll(model, collate_sft(pair, pad, spec.name))
        alone = torch.cat([_per_sample_nll(model, collate_sft([e], pad, spec.name)) for e in pair])
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)


@params
def test_left_padded_generation_equals_each_prompt_alone(arch, models):
    model, proc, spec = models(arch)
    tok = proc.tokenizer
    enc = ChatEncoder(proc, spec, 512)
    prompts = [enc.encode(CONV[:4], [_img(9)], add_generation_prompt=True),
               enc.encode(SHORT[:1], [_img(10, (48, 32))], add_generation_prompt=True)]
    assert len(prompts[0].input_ids) != len(prompts[1].input_ids)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id,
              return_dict_in_generate=True, output_logits=True)

    def gen(items):
        """(new tokens, raw logits of every step (B, 5, V)) for a left-padded batch of prompts."""
        batch = collate_sft(items, tok.pad_token_id, spec.name, left_pad=True)
        with torch.no_grad():
            out = model.generate(**batch.model_inputs(), **kw)
        return out.sequences[:, batch.input_ids.shape[1]:].tolist(), torch.stack(out.logits, 1).float()

    batch = collate_sft(prompts, tok.pad_token_id, spec.name, left_pad=True)
    T = batch.input_ids.shape[1]
    n1 = len(prompts[1].input_ids)
    assert not batch.attention_mask[1, :T - n1].any() and torch.equal(batch.input_ids[1, T - n1:], prompts[1].input_ids)
    together, logits = gen(prompts)
    alone = [gen([p]) for p in prompts]
    assert together == [toks[0] for toks, _ in alone]
    # not only the argmax: the logits of every step match too (positions, masks, images per row)
    torch.testing.assert_close(logits, torch.cat([lg for _, lg in alone]), rtol=0, atol=1e-4)


# ---- 5. one SFT step through the real stage --------------------------------------------------------

@params
def test_one_sft_step_through_the_stage(arch, ckpts, tmp_path):
    from training.sft.main import main
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        _img(20 + i, (32 + 8 * i, 32)).save(images / f"img{i}.png")
    rows = [
        {"id": "0", "image": "img0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the picture?"}, {"from": "gpt", "value": "It is red."}]},
        {"id": "1", "image": "img1.png", "conversations": [
            {"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "A small square."},
            {"from": "human", "value": "Is there a dog?"}, {"from": "gpt", "value": "No, there is no dog."}]},
        {"id": "2", "image": ["img2.png", "img3.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nAre the two images the same?"},
            {"from": "gpt", "value": "No."}]},
        {"id": "3", "image": "img4.png", "conversations": [
            {"from": "human", "value": "<image>\nHow many objects are visible?"}, {"from": "gpt", "value": "Two."}]},
    ]
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "out"
    main(["--from_checkpoint", ckpts[arch], "--data_path", str(data), "--image_folder", str(images),
          "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_seq_len", "256", "--no-progress",
          # 2 micro-batches of 2: the one step sees all 4 rows (multi-turn, two-image, image after text)
          "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--output_dir", str(out),
          "--figure_dir", str(tmp_path / "figure"),  # not the working folder's figure/
          "--num_warmup_steps", "0"])  # (a warm-up's first step is at learning rate 0, as transformers')
    assert (out / "model.safetensors").is_file()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
    assert math.isfinite(metrics[0]["loss"]) and metrics[0]["loss"] > 0
    proc = load_model_and_processor(ModelArgs(from_checkpoint=ckpts[arch]), LoraArgs(), for_training=False)[1]
    answers = ["It is red.", "A small square.", "No, there is no dog.", "No.", "Two."]
    eot = proc.tokenizer.convert_tokens_to_ids(ARCH[arch]["eot"])  # every answer: its tokens + end-of-turn
    want = sum(len(proc.tokenizer(ARCH[arch]["lead"] + a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    assert eot is not None and metrics[0]["target_tokens"] == want
    before, after = load_file(f"{ckpts[arch]}/model.safetensors"), load_file(str(out / "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step updated the weights
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3"])
def test_a_separator_after_the_last_answer_that_does_not_fit_is_no_truncation(models, arch):
    """ChatML's "<|im_end|>\\n" and Idefics3's "<end_of_utterance>\\n": the newline after the last answer is
    a prompt segment of its own; when only it does not fit, every label is kept: not truncated (the
    counts of cut rows in bad_rows.json would be wrong). One token fewer cuts the answer: truncated."""
    _, proc, spec = models(arch)
    conv = [Message("user", "<image>\nWhat is it?"), Message("assistant", "A red square.")]
    full = ChatEncoder(proc, spec, 4096).encode(conv, [_img(0)])
    answer_end = max(i for i, x in enumerate(full.labels.tolist()) if x != IGNORE) + 1
    assert answer_end < len(full.input_ids)  # a separator follows the answer
    fit = ChatEncoder(proc, spec, answer_end).encode(conv, [_img(0)])
    assert not fit.truncated and torch.equal(fit.labels, full.labels[:answer_end])
    assert ChatEncoder(proc, spec, answer_end - 1).encode(conv, [_img(0)]).truncated


# Llama 3.2 Vision's official template in its two respects that matter here: the system block is written only
# when no message holds an image, and a system message's content is printed as a string (`|trim`)
MLLAMA_OFFICIAL_LIKE = (
    "{{- bos_token }}{%- set ns = namespace(has_images=false) %}"
    "{%- for m in messages %}{%- if m['content'] is not string %}{%- for c in m['content'] %}"
    "{%- if c['type'] == 'image' %}{%- set ns.has_images = true %}{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content']|trim %}"
    "{%- set msgs = messages[1:] %}{%- else %}{%- set system = '' %}{%- set msgs = messages %}{%- endif %}"
    "{%- if not ns.has_images %}<|start_header_id|>system<|end_header_id|>\n\n{{ system }}<|eot_id|>{%- endif %}"
    "{%- for m in msgs %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{%- if m['content'] is string %}{{ m['content'] }}{%- else %}{%- for c in m['content'] %}"
    "{%- if c['type'] == 'image' %}<|image|>{%- else %}{{ c['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "<|eot_id|>{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{%- endif %}")


def test_system_prompt_is_text_and_a_later_first_image_is_encoded(tmp_path):
    """With Llama 3.2 Vision's official template a system prompt was trained as the Python repr of its content
    parts ("[{'type': 'text', ...}]"), and a conversation whose first image came in a later turn (the template's
    system block then differs between the first turns alone and the whole) stopped SFT with a bare ValueError,
    then was a bad row; its answers are now found in the whole rendering."""
    ck = make_tiny_checkpoint("mllama", tmp_path / "mllama")
    _, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=ck), LoraArgs(), for_training=False)
    enc = ChatEncoder(processor, arch, 1024, chat_template=MLLAMA_OFFICIAL_LIKE)
    tok = processor.tokenizer
    e = enc.encode([Message("system", "Be brief."), Message("user", "Hello"), Message("assistant", "Hi.")], [])
    text = tok.decode(e.input_ids.tolist())
    assert "system<|end_header_id|>\n\nBe brief.<|eot_id|>" in text and "'type'" not in text
    later = [Message("user", "Hello"), Message("assistant", "Hi."), Message("user", "<image>\nColour?"),
             Message("assistant", "Red.")]
    image = Image.new("RGB", (32, 32), (200, 20, 20))
    e = enc.encode(later, [image])
    # trained on the whole conversation as the template renders it (no system block: it holds an image)
    whole = processor.apply_chat_template(to_hf_messages(later), tokenize=False, chat_template=MLLAMA_OFFICIAL_LIKE)
    assert "system" not in whole and tok.decode(e.input_ids.tolist()) == tok.decode(tok(whole, add_special_tokens=False)["input_ids"])
    on = (e.labels != -100).tolist()  # the targets: two runs of tokens, one per answer
    runs = [k for k in range(len(on)) if on[k] and (k == 0 or not on[k - 1])]
    ends = [k for k in range(len(on)) if on[k] and (k == len(on) - 1 or not on[k + 1])]
    targets = [tok.decode(e.input_ids[a:b + 1].tolist()).replace(" ", "") for a, b in zip(runs, ends)]
    assert targets == ["Hi.<|eot_id|>", "Red.<|eot_id|>"], targets


def test_a_turn_the_whole_rendering_does_not_hold_is_a_bad_row(tmp_path):
    """A template that renders an earlier answer differently once later turns follow (here: it drops earlier
    answers' text, as reasoning templates drop earlier thoughts) cannot be trained on: a bad row naming why."""
    from training.data.bad_rows import BadRowReport
    from training.data.records import ConversationRecord, RowRef
    from training.sft.trainer import SFTDataset
    from training.templates.chat import RowNotEncodable

    ck = make_tiny_checkpoint("mllama", tmp_path / "mllama")
    _, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=ck), LoraArgs(), for_training=False)
    drops = MLLAMA_OFFICIAL_LIKE.replace(
        "{%- if m['content'] is string %}{{ m['content'] }}",
        "{%- if m['role'] == 'assistant' and not loop.last %}...{%- elif m['content'] is string %}{{ m['content'] }}")
    enc = ChatEncoder(processor, arch, 1024, chat_template=drops)
    two = [Message("user", "Hello"), Message("assistant", "Hi."), Message("user", "Colour?"),
           Message("assistant", "Red.")]
    with pytest.raises(RowNotEncodable, match="not prefix-stable"):
        enc.encode(two, [])
    report = BadRowReport(skip=True)
    data = SFTDataset([ConversationRecord("r0", two, [], RowRef("d.json", 0))], enc, str(tmp_path), report)
    assert data[0] is None
    assert report.skipped[0]["row"] == 0 and "not prefix-stable" in report.skipped[0]["reason"]


def test_the_templates_own_refusal_is_a_bad_row_and_its_date_is_fixed(tmp_path):
    """Llama 3.2 Vision's official template raises for a system message beside an image: the jinja2 error stopped
    training even with --skip_bad_rows. It also writes "Today Date: <today>" (strftime_now): the same conversation
    became other tokens the next day (a reference cache, a resumed run)."""
    from training.data.bad_rows import BadRowReport
    from training.data.records import ConversationRecord, RowRef
    from training.sft.trainer import SFTDataset

    ck = make_tiny_checkpoint("mllama", tmp_path / "mllama")
    _, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=ck), LoraArgs(), for_training=False)
    official = MLLAMA_OFFICIAL_LIKE.replace(  # the official template's two lines, as Meta's repository has them
        "{%- if not ns.has_images %}",
        "{%- if ns.has_images and not system == '' %}{{- raise_exception('Prompting with images is incompatible "
        "with system messages.') }}{%- endif %}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
        "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
        "{%- endif %}{%- endif %}{%- if not ns.has_images %}Today Date: {{ date_string }}")
    enc = ChatEncoder(processor, arch, 1024, chat_template=official)
    e = enc.encode([Message("user", "Hello"), Message("assistant", "Hi.")], [])
    assert "Today Date: 26 Jul 2024" in processor.tokenizer.decode(e.input_ids.tolist())
    row = [Message("system", "Be brief."), Message("user", "<image>\nColour?"), Message("assistant", "Red.")]
    report = BadRowReport(skip=True)
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 20, 20)).save(image)
    data = SFTDataset([ConversationRecord("r0", row, [str(image)], RowRef("d.json", 0))], enc, str(tmp_path), report)
    assert data[0] is None
    assert "incompatible with system messages" in report.skipped[0]["reason"]
    import jinja2  # a broken template is no row's fault: it stops the run
    broken = ChatEncoder(processor, arch, 1024, chat_template=official.replace("{%- endfor %}", "{%- endfor }", 1))
    with pytest.raises(jinja2.TemplateSyntaxError):
        broken.encode([Message("user", "Hello"), Message("assistant", "Hi.")], [])


def test_a_processor_without_a_chat_template_needs_a_template_file(tmp_path, capfd):
    """--template's help promised a fallback to the architecture's template that does not exist; such a processor
    failed on the first row with transformers' ValueError, as a bad row."""
    ck = make_tiny_checkpoint("llava", tmp_path / "llava")
    _, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=ck), LoraArgs(), for_training=False)
    processor.chat_template = None
    with pytest.raises(SystemExit, match="has no chat template: give one with --template FILE"):
        ChatEncoder(processor, arch, 256)
    enc = ChatEncoder(processor, arch, 256, chat_template=MLLAMA_OFFICIAL_LIKE)  # a file's template is enough
    enc.encode([Message("user", "Hello"), Message("assistant", "Hi.")], [])
    assert "processor_kwargs" not in capfd.readouterr().err  # no date_string for a template without one


def test_an_end_token_the_tokenizer_only_adds_is_not_followed_by_eos(tmp_path):
    """A Llama 3 base tokenizer (Llama-3.2-11B-Vision's) names BOS and EOS (<|end_of_text|>) only: <|eot_id|>, which
    the template closes every answer with, is one of its added tokens. Not taken for an end token, every answer was
    trained as "<|eot_id|><|end_of_text|>" (not the template's text) and generation stopped at <|end_of_text|>."""
    ck = make_tiny_checkpoint("mllama", tmp_path / "mllama")
    config = json.loads((tmp_path / "mllama" / "tokenizer_config.json").read_text())
    config.update(eos_token="<|end_of_text|>", extra_special_tokens=[])
    (tmp_path / "mllama" / "tokenizer_config.json").write_text(json.dumps(config))
    _, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=ck), LoraArgs(), for_training=False)
    tok = processor.tokenizer
    assert "<|eot_id|>" not in tok.all_special_tokens and tok.eos_token == "<|end_of_text|>"
    enc = ChatEncoder(processor, arch, 512)
    e = enc.encode(CONV[1:], [_img(0)])
    assert tok.decode(e.input_ids.tolist()) == enc.render(CONV[1:], False)
    targets = [tok.decode(e.input_ids[s:t].tolist()) for s, t in _spans(e.labels)]
    assert targets == [A1 + "<|eot_id|>", A2 + "<|eot_id|>"]
    assert enc.end_of_turn_id == tok.convert_tokens_to_ids("<|eot_id|>")
