"""The chat-template layer on the embedded tiny VLM: labels token by token, truncation, generation."""
import json

import pytest
import torch
from PIL import Image

from training.data.collate import collate_sft
from training.data.records import Message
from training.model.architectures import ARCHITECTURES
from training.model.tiny import build_processor
from training.templates.chat import IGNORE, RENDERS_KEPT, ChatEncoder, PromptTooLong

N_IMG = 64  # (64 / 8)^2 patches; LLaVA's "default" strategy drops CLS


@pytest.fixture(scope="module")
def proc():
    return build_processor()


def _img():
    return Image.new("RGB", (64, 64), (200, 10, 10))


CONV = [Message("user", "<image>\nDescribe the image in detail."), Message("assistant", "The image shows one red circle."),
        Message("user", "Is there a star?"), Message("assistant", "No, there is no star.")]


def _tokens(proc, ids):
    return proc.tokenizer.convert_ids_to_tokens(ids)


def test_labels_cover_exactly_every_assistant_turn_and_its_eos(proc):
    e = ChatEncoder(proc, ARCHITECTURES["llava"], 200).encode(CONV, [_img()])
    toks = _tokens(proc, e.input_ids.tolist())
    expected = (["user", ":"] + ["<image>"] * N_IMG + "describe the image in detail . assistant :".split()
                + "the image shows one red circle . </s>".split()
                + "user : is there a star ? assistant :".split() + "no , there is no star . </s>".split())
    assert toks == expected
    target = [t != IGNORE for t in e.labels.tolist()]
    want = ([False] * (2 + N_IMG + 8) + [True] * 8 + [False] * 9 + [True] * 8)
    assert target == want
    assert (e.labels[e.labels != IGNORE] == e.input_ids[e.labels != IGNORE]).all()
    assert e.prompt_len == len(expected) - 8  # the last assistant turn starts here
    assert e.vision["pixel_values"].shape == (1, 3, 64, 64)


def test_truncation_cuts_response_text_never_image_tokens(proc):
    first = 2 + N_IMG + 8
    enc = ChatEncoder(proc, ARCHITECTURES["llava"], first + 3)
    e = enc.encode(CONV, [_img()])
    assert e.truncated and len(e.input_ids) == first + 3
    assert int((e.input_ids == proc.tokenizer.convert_tokens_to_ids("<image>")).sum()) == N_IMG
    assert _tokens(proc, e.input_ids[e.labels != IGNORE].tolist()) == ["the", "image", "shows"]
    # a later turn that does not fit whole is dropped with its prompt, not half-kept
    e2 = ChatEncoder(proc, ARCHITECTURES["llava"], first + 8 + 4).encode(CONV, [_img()])
    assert len(e2.input_ids) == first + 8 and int((e2.labels != IGNORE).sum()) == 8


def test_prompt_that_cannot_fit_is_an_error_not_a_cut_image(proc):
    with pytest.raises(PromptTooLong):
        ChatEncoder(proc, ARCHITECTURES["llava"], 40).encode(CONV, [_img()])


def test_placeholder_count_must_match_images(proc):
    with pytest.raises(ValueError, match="1 image placeholders but 2 images"):
        ChatEncoder(proc, ARCHITECTURES["llava"], 300).encode(CONV, [_img(), _img()])


def test_generation_prompt_ends_with_assistant_and_has_no_labels(proc):
    e = ChatEncoder(proc, ARCHITECTURES["llava"], 200).encode(CONV[:1], [_img()], add_generation_prompt=True)
    assert _tokens(proc, e.input_ids.tolist())[-2:] == ["assistant", ":"]
    assert (e.labels == IGNORE).all()


def test_collate_pads_right_for_training_left_for_generation(proc):
    enc = ChatEncoder(proc, ARCHITECTURES["llava"], 200)
    a, b = enc.encode(CONV, [_img()]), enc.encode(CONV[:2], [_img()])
    pad = proc.tokenizer.pad_token_id
    batch = collate_sft([a, b], pad, "llava")
    n = len(b.input_ids)
    assert batch.attention_mask[1, :n].all() and not batch.attention_mask[1, n:].any()
    assert (batch.input_ids[1, n:] == pad).all() and (batch.labels[1, n:] == IGNORE).all()
    left = collate_sft([a, b], pad, "llava", left_pad=True)
    T = left.input_ids.shape[1]
    assert not left.attention_mask[1, :T - n].any() and torch.equal(left.input_ids[1, T - n:], b.input_ids)
    assert batch.vision["pixel_values"].shape == (2, 3, 64, 64)


# llava-hf's LLaVA-1.5 template closes an answer with text + " " and no end token
NO_EOS = ("{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
          "{{ '<image>\\n' }}{% else %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_an_answer_the_template_leaves_without_an_end_token_ends_with_eos(proc):
    """Without an end token as a target the model never learns to stop: each answer gets the EOS."""
    e = ChatEncoder(proc, ARCHITECTURES["llava"], 300, NO_EOS).encode(CONV, [_img()])
    eos = proc.tokenizer.eos_token_id
    targets = e.labels[e.labels != IGNORE].tolist()
    assert targets.count(eos) == 2 and targets[-1] == eos
    answer = _tokens(proc, [t for t in targets[:targets.index(eos)]])
    assert answer == "the image shows one red circle .".split()
    # the next turn's prompt follows the EOS; the generation prompt of the same template is unchanged
    toks = _tokens(proc, e.input_ids.tolist())
    i = toks.index("</s>")
    assert toks[i + 1:i + 3] == ["user", ":"]
    g = ChatEncoder(proc, ARCHITECTURES["llava"], 300, NO_EOS).encode(CONV[:1], [_img()], add_generation_prompt=True)
    assert _tokens(proc, g.input_ids.tolist())[-2:] == ["assistant", ":"] and eos not in g.input_ids.tolist()


def test_an_empty_answer_is_the_eos_alone_under_a_template_without_an_end_token(proc):
    """An empty answer (a PPO rollout that stopped at once, as the reward model reads it) under llava-hf's LLaVA-1.5
    template had no target at all and ended on "ASSISTANT:", where the same answer under a template that writes the
    end token, and every non-empty answer, ends with the EOS: the reward model scored it at another token."""
    conv = [CONV[0], Message("assistant", "")]
    eos = proc.tokenizer.eos_token_id
    for template in (NO_EOS, None):  # None: the tiny model's own template, which writes "</s>"
        e = ChatEncoder(proc, ARCHITECTURES["llava"], 300, template).encode(conv, [_img()], end_at_last_target=True)
        assert e.labels[e.labels != IGNORE].tolist() == [eos], template
        assert _tokens(proc, e.input_ids.tolist())[-3:] == ["assistant", ":", "</s>"], template


# llava-hf's LLaVA-NeXT-Mistral template (its shape), and the same writing the real EOS
MISSPELT_EOS = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' }}{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                "{{ ' [/INST]' }}{% else %}{{ ' ' + m['content'][0]['text'] + '<\\\\s> ' }}{% endif %}{% endfor %}")
REAL_EOS = MISSPELT_EOS.replace("<\\\\s>", "</s>")


def test_a_template_that_writes_the_eos_as_other_text_trains_the_real_eos(proc):
    """llava-hf's LLaVA-NeXT-Mistral template closes answers with the text "<\\s>" (not "</s>"): trained as is,
    the model learns to write that text and never stops. Each answer ends with the EOS instead, and the
    text is gone from the sample."""
    assert "<\\s>" in ChatEncoder(proc, ARCHITECTURES["llava"], 300, MISSPELT_EOS).render(CONV, False)
    e = ChatEncoder(proc, ARCHITECTURES["llava"], 300, MISSPELT_EOS).encode(CONV, [_img()])
    reference = ChatEncoder(proc, ARCHITECTURES["llava"], 300, REAL_EOS).encode(CONV, [_img()])
    assert e.input_ids.tolist() == reference.input_ids.tolist() and e.labels.tolist() == reference.labels.tolist()
    assert "\\" not in "".join(_tokens(proc, e.input_ids.tolist()))


def test_a_prompt_to_answer_that_does_not_fit_is_an_error_not_a_cut(proc):
    """Generation (no targets): a multi-turn prompt cut at max_seq_len would lose its question and the
    model would answer an earlier turn (or nothing): an error instead."""
    enc = ChatEncoder(proc, ARCHITECTURES["llava"], 2 + N_IMG + 20)
    with pytest.raises(PromptTooLong, match="exceeds max_seq_len"):
        enc.encode(CONV[:3], [_img()], add_generation_prompt=True)
    assert len(ChatEncoder(proc, ARCHITECTURES["llava"], 300).encode(CONV[:3], [_img()], True).input_ids) < 300


def test_kept_renderings_are_those_of_the_same_conversation_and_prompt_flag(proc):
    """The encoder keeps recent renderings (a pair's prompt is rendered once per response): each one returned
    is the template's rendering of exactly those messages, with or without the generation prompt."""
    enc = ChatEncoder(proc, ARCHITECTURES["llava"], 200)
    convs = [CONV[:1], CONV[:2], CONV, [CONV[0], Message("assistant", "Another answer.")], CONV[:1]]
    for conv in convs + convs:
        for gen in (True, False):
            assert enc.render(conv, gen) == ChatEncoder(proc, ARCHITECTURES["llava"], 200).render(conv, gen)
    assert enc.render(CONV[:1], True) != enc.render(CONV[:1], False)
    for i in range(200):  # many conversations: the kept renderings stay bounded
        enc.render([Message("user", f"Question {i}?")], True)
    assert len(enc._rendered) <= RENDERS_KEPT
    assert enc.render([Message("user", "Question 3?")], True).count("Question 3?") == 1


def test_a_prompt_completion_row_trains_its_completion_alone(proc, tmp_path):
    """TRL prompt-completion rows (the OPA-SFT step writes them): the prompt's earlier answers are context. OPA-SFT
    wrote LLaVA conversations, so a multi-turn prompt's earlier answers were trained too."""
    from training.data.formats import read_sft

    msg = lambda m: {"role": m.role, "content": m.content}  # noqa: E731
    _img().save(tmp_path / "x.png")
    path = tmp_path / "pc.json"
    path.write_text(json.dumps([{"images": ["x.png"], "prompt": [msg(m) for m in CONV[:3]],
                                 "completion": [msg(CONV[3])]}, {"prompt": "Q?", "completion": "A."}]))
    first, second = read_sft([str(path)], str(tmp_path))
    assert (first.messages, first.images, first.last_answer_only) == (CONV, [str(tmp_path / "x.png")], True)
    assert (second.messages, second.images) == ([Message("user", "Q?"), Message("assistant", "A.")], [])
    e = ChatEncoder(proc, ARCHITECTURES["llava"], 200).encode(first.messages, [_img()], last_answer_only=True)
    assert [t != IGNORE for t in e.labels.tolist()] == [False] * (2 + N_IMG + 8 + 8 + 9) + [True] * 8


def test_an_answer_spelling_the_placeholder_is_a_bad_row_not_a_stopped_run(tmp_path):
    """OPA-DPO trains on sampled rollouts (and an expert's revisions): one spelling "<image>" became a second image
    (LLaVA's template renders an assistant's image part too) and a bare ValueError stopped the DPO step even with
    --skip_bad_rows. It is a bad row, skipped and counted."""
    from transformers import AutoProcessor

    from training.data.bad_rows import BadRowReport
    from training.dpo.opa.data import OPADataset, read_opa
    from training.model.tiny_archs import make_tiny_checkpoint
    from training.templates.chat import RowNotEncodable

    proc = AutoProcessor.from_pretrained(make_tiny_checkpoint("llava", tmp_path / "llava"))
    enc = ChatEncoder(proc, ARCHITECTURES["llava"], 300)
    with pytest.raises(RowNotEncodable, match="2 image placeholders but 1 images"):
        enc.encode([CONV[0], Message("assistant", "A red <image> star.")], [_img()])
    _img().save(tmp_path / "red.png")
    gt, rollout = "The image shows one red circle.", "A red <image> star."
    row = {"id": "x", "image": "red.png", "question": "Describe.", "gt": gt, "rollout": rollout, "revised": gt,
           "rollout_weights": [[rollout, 2.5]], "revised_score_weights": [[gt, 1.0]],
           "revised_type_weights": [[gt, 1.0]]}
    (tmp_path / "pairs.json").write_text(json.dumps([row]))
    report = BadRowReport(skip=True)
    data = OPADataset(read_opa(str(tmp_path / "pairs.json")), enc, str(tmp_path), report)
    assert data[0] is None and "image placeholders" in report.skipped[0]["reason"]
