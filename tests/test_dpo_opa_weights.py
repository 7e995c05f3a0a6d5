"""OPA-DPO's per-token weights with the tokenizers of real checkpoints: a SentencePiece one (Llama 2 / Vicuna,
Mistral; built as in test_template_sentencepiece) and the byte-level BPE of the tiny architectures. Each token of
a sentence carries that sentence's weight, whatever the tokenizer writes of the space before a word."""
import pytest

from test_template_sentencepiece import llama_tokenizer
from training.dpo.opa.data import token_weights

FIRST, SECOND = "A red circle and two blue squares.", "No, there is no star."


@pytest.mark.parametrize("legacy", [False, True], ids=["first", "always"])
def test_a_sentences_first_word_holding_the_space_before_it_has_the_sentences_weight(legacy):
    tok = llama_tokenizer(legacy)
    text = f"{FIRST} {SECOND}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert "▁No," in pieces  # the premise: the second sentence starts with a token holding the space before it
    w = token_weights(tok, text, [[FIRST, 2.0], [SECOND, 3.0]], ids).tolist()
    n1 = pieces.index("▁No,")
    assert w == [2.0] * n1 + [3.0] * (len(ids) - n1)  # "▁No," had weight 1
