"""Segment-by-segment encoding with a SentencePiece-style tokenizer (Llama 2 / Vicuna, as in LLaVA-1.5, and
Mistral, as in LLaVA-NeXT): such a tokenizer writes a "▁" in front of the first word of what it is given
("first", the current Llama tokenizers) or of every section after a special token ("always", legacy ones).

ChatEncoder tokenises a conversation segment by segment to place its labels; the tokens must still be those of
the whole rendered conversation, which is what the model reads at inference. The tokenizer is built here from a
BPE trained in-process, wrapped as transformers' own LlamaTokenizer (the class a real checkpoint loads into).
"""
import json

import pytest
from PIL import Image

from training.data.records import Message
from training.model.architectures import ARCHITECTURES
from training.model.tiny_archs import LLAVA_V1_TEMPLATE, _clip_image_processor, _content_macro
from training.templates.chat import IGNORE, ChatEncoder

# Mistral's [INST] format (LLaVA-NeXT-Mistral): the answer follows " [/INST]" after a space
MISTRAL = _content_macro("<image>\n") + (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ '[INST] ' + render(m['content']) + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' + render(m['content']) + eos_token }}"
    "{%- endif -%}{%- endfor -%}")
# an answer written straight after the generation prompt's text, with no space between them
JOINED = _content_macro("<image>\n") + (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ 'Q:' + render(m['content']) + '\nA:' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ render(m['content']) + eos_token }}"
    "{%- endif -%}{%- endfor -%}")
TEMPLATES = {"llava_v1": LLAVA_V1_TEMPLATE, "mistral": MISTRAL, "joined": JOINED}

A1, A2, A3 = "A red circle and two blue squares.", "No, there is no star.", "Yes, a green triangle."
CONVERSATIONS = {
    "two_turns": ([Message("user", "<image>\nDescribe the image in detail."), Message("assistant", A1),
                   Message("user", "Is there a star?"), Message("assistant", A2)], 1),
    "image_in_a_later_turn": ([Message("user", "<image>\nDescribe the image."), Message("assistant", A1),
                               Message("user", "<image>\nAnd this one?"), Message("assistant", A3)], 2),
}


def llama_tokenizer(legacy: bool):
    """transformers' LlamaTokenizer (Metaspace "▁", byte fallback) on a BPE learnt from a few sentences; legacy:
    a "▁" before every section (prepend scheme "always"), else before the first only ("first")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [A1, A2, A3, "USER: Describe the image in detail. Is there a star? ASSISTANT:", "[INST] And this one?"]
    bpe.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, pad_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def processor(legacy: bool, template: str):
    from transformers import LlavaProcessor
    return LlavaProcessor(image_processor=_clip_image_processor(), tokenizer=llama_tokenizer(legacy), patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=TEMPLATES[template])


def test_the_tokenizer_writes_a_prefix_as_llama_does():
    """The premise: alone, a segment gets a "▁" that the whole conversation does not have after "</s>"."""
    first, always = llama_tokenizer(legacy=False), llama_tokenizer(legacy=True)
    assert first.tokenize("USER:")[0].startswith("▁") and always.tokenize("USER:")[0].startswith("▁")
    assert not first.tokenize("</s>USER:")[1].startswith("▁")
    assert always.tokenize("</s>USER:")[1].startswith("▁")


@pytest.mark.parametrize("legacy", [False, True], ids=["first", "always"])
@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_segments_are_the_tokens_of_the_whole_conversation(legacy, template, conv):
    proc = processor(legacy, template)
    tok = proc.tokenizer
    messages, n_images = CONVERSATIONS[conv]
    images = [Image.new("RGB", (32, 32), (40 * i, 200, 90)) for i in range(n_images)]
    enc = ChatEncoder(proc, ARCHITECTURES["llava"], 1024)
    e = enc.encode(messages, images)
    whole = proc(text=[enc.render(messages, False)], images=images, return_tensors="pt")
    assert e.input_ids.tolist() == whole["input_ids"][0].tolist()
    # each answer is a target with its EOS, and nothing else is
    labels, answers, run = e.labels.tolist(), [], []
    for t, label in zip(e.input_ids.tolist(), labels):
        if label != IGNORE:
            run.append(t)
        elif run:
            answers, run = answers + [run], []
    answers += [run] if run else []
    said = [m.content for m in messages if m.role == "assistant"]
    assert [tok.decode(a).strip() for a in answers] == [s + "</s>" for s in said]


def test_the_generation_prompt_is_the_whole_prompt_and_the_start_of_the_trained_conversation():
    """What the model is asked at inference is the processor's reading of the whole prompt, and the start of
    what it was trained on."""
    proc = processor(False, "llava_v1")
    messages, _ = CONVERSATIONS["two_turns"]
    image = Image.new("RGB", (32, 32))
    enc = ChatEncoder(proc, ARCHITECTURES["llava"], 1024)
    trained = enc.encode(messages, [image]).input_ids.tolist()
    asked = enc.encode(messages[:3], [image], add_generation_prompt=True).input_ids.tolist()
    whole = proc(text=[enc.render(messages[:3], True)], images=[image], return_tensors="pt")["input_ids"][0]
    assert asked == whole.tolist() and trained[:len(asked)] == asked
