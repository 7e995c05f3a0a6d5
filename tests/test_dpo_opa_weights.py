"""OPA-DPO's per-token weights with the tokenizers of real checkpoints: a SentencePiece one (Llama 2 / Vicuna,
Mistral; built as in test_template_sentencepiece) and the byte-level BPE of the tiny architectures. Each token of
a sentence carries that sentence's weight, whatever the tokenizer writes of the space before a word."""
import pytest

from test_template_sentencepiece import llama_tokenizer
from training.dpo.weights import token_weights

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


@pytest.mark.parametrize("legacy", [False, True], ids=["first", "always"])
def test_a_span_inside_one_token_weighs_that_token(legacy):
    """A token stands where its first letter does: a span that starts inside a token ("uares." of "▁squares.") had
    no token standing in it, and its weight was lost without a word. The token it lies in carries it; a token that
    stands in another span keeps that span's weight."""
    tok = llama_tokenizer(legacy)
    ids = tok(FIRST, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    inside = next(i for i, p in enumerate(pieces) if "uares" in p and not p.lstrip("▁").startswith("uares"))
    w = token_weights(tok, FIRST, [["A red", 2.0], ["uares", 3.0]], ids).tolist()
    assert w[inside] == 3.0 and w.count(3.0) == 1, (pieces, w)
    assert w[:2] == [2.0, 2.0] and w.count(2.0) == 2
    w = token_weights(tok, FIRST, [["A re", 2.0], ["d", 5.0]], ids).tolist()  # "d" lies in "▁red", which "A re" owns
    assert w[:2] == [2.0, 2.0] and 5.0 not in w, (pieces, w)


def _tiny_llava_processor():
    from training.model.tiny_archs import _BUILDERS
    return _BUILDERS["llava"]()[1]


@pytest.mark.parametrize("make", ["sp_first", "sp_always", "byte_level"])
def test_an_answers_tokens_carry_their_weights_as_the_conversation_tokenises_them(make, tmp_path):
    """Tokenised alone, the answer began with a token its encoded response does not hold: SentencePiece's "▁ci"
    where it follows the prompt's "A:" directly ("ci"), byte-level "c" where it follows "ASSISTANT: " ("Ġc");
    the answer was not found in its response and every weight was 1."""
    from PIL import Image

    from test_template_sentencepiece import processor
    from training.data.bad_rows import BadRowReport
    from training.dpo.opa.data import OPADataset
    from training.model.architectures import ARCHITECTURES
    from training.templates.chat import ChatEncoder

    proc = _tiny_llava_processor() if make == "byte_level" else processor(make == "sp_always", "joined")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    one, two = "circle and two blue squares.", SECOND
    revised = f"{one} {two}"
    row = {"id": "x", "image": "red.png", "question": "Describe.", "gt": FIRST, "rollout": FIRST, "revised": revised,
           "rollout_weights": [[FIRST, 1.0]], "revised_score_weights": [[one, 2.0], [two, 3.0]],
           "revised_type_weights": [[one, 2.0], [two, 3.0]]}
    ds = OPADataset([row], ChatEncoder(proc, ARCHITECTURES["llava"], 512), str(tmp_path), BadRowReport())
    real, mask = ds[0]
    tok = proc.tokenizer
    for ids, w in ((real.responses[1], real.weights[1]), (real.responses[3], real.weights[3]),
                   (mask.responses[1], mask.weights[1])):
        assert tok.decode(ids[w == 2.0]).strip() == one and tok.decode(ids[w == 3.0]).strip() == two
