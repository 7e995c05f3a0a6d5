"""Per-token weights for the DPO family's losses (RLAIF-V's option): a preference row's chosen_weights /
rejected_weights ([[text span, weight], ...]) weigh their spans' tokens in each response's log-prob sum."""
import json

import pytest
import torch


def _pair(world):
    row = json.loads((world / "preference_train.json").read_text())[0]
    chosen, rejected = row["conversations"][1]["value"][:2]
    return row["image"], chosen, rejected


def _dataset(world, tiny, rows, tmp_path, report=None):
    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_preferences
    from training.dpo.data import PreferenceDataset
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder

    path = tmp_path / "weighted.json"
    path.write_text(json.dumps(rows))
    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    report = report if report is not None else BadRowReport()
    recs = read_preferences([str(path)], str(world / "images"), report)
    return model, proc, arch, PreferenceDataset(recs, ChatEncoder(proc, arch, 512), str(world / "images"), report)


def test_a_rows_span_weights_reach_its_tokens_and_the_weighted_sums(world, tiny, tmp_path):
    from training.dpo.data import collate_plain, collate_prefix
    from training.dpo.forward import response_logps

    image, chosen, rejected = _pair(world)
    span_w, span_l = chosen.split(" ")[2], rejected.split(" ")[-1].rstrip(".")  # a word of each
    rows = [{"idx": 0, "image": image, "question": "Describe the image.", "chosen": chosen, "rejected": rejected,
             "chosen_weights": [[span_w, 2.0]], "rejected_weights": [[span_l, 3.0]]},
            {"idx": 1, "image": image, "question": "Describe the image.", "chosen": chosen, "rejected": rejected}]
    model, proc, arch, ds = _dataset(world, tiny, rows, tmp_path)
    weighted, plain = ds[0], ds[1]
    tok = proc.tokenizer
    for k, (span, weight) in enumerate([(span_w, 2.0), (span_l, 3.0)]):
        w, ids = weighted.weights[k], weighted.responses[k]
        assert set(w.tolist()) == {1.0, weight}
        assert tok.decode(ids[w == weight]).strip().lower() == span.lower()  # the span's tokens, and only those
    assert plain.weights == [None, None]
    for collate in (collate_prefix, collate_plain):  # both layouts: sum of weight x token log-prob
        with torch.no_grad():
            out = response_logps(model, collate([weighted, plain], tok.pad_token_id, arch.name))
        assert torch.allclose(out.wsum, (out.token_lp * out.weights).sum(-1))
        assert (out.wsum[0] < out.sum[0] - 1e-4).all()  # weights above 1 on negative log-probs
        assert torch.allclose(out.wsum[1], out.sum[1])
        assert torch.allclose(out.sum[0], out.sum[1])  # the same texts: only the weights differ


@pytest.mark.parametrize("weights,field,reason", [
    ([["a purple elephant", 2.0]], "chosen_weights[0]", "is not in the response"),
    ([["x", float("nan")]], "chosen_weights[0]", "expected [text, finite weight >= 0]"),
    ([["x", True]], "chosen_weights[0]", "expected [text, finite weight >= 0]"),
    ([["x", -1.5]], "chosen_weights[0]", "expected [text, finite weight >= 0]"),  # RLAIF-V's weights are >= 0
    ("all of it", "chosen_weights", "expected a list of [text, weight]")])
def test_a_bad_span_weight_is_a_bad_row_naming_its_field(world, tmp_path, weights, field, reason):
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_preferences

    image, chosen, rejected = _pair(world)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"idx": 0, "image": image, "question": "Describe it.", "chosen": chosen,
                                 "rejected": rejected, "chosen_weights": weights}]))
    report = BadRowReport(skip=True)
    assert read_preferences([str(path)], str(world / "images"), report) == []
    assert [(s["row"], s["field"]) for s in report.skipped] == [(0, field)]
    assert reason in report.skipped[0]["reason"]


def test_spans_are_found_in_order_and_a_stage_without_weights_says_so(world, tmp_path):
    from training.data.formats import read_preferences
    from training.data.span_weights import weights_note

    image, chosen, rejected = _pair(world)
    words = chosen.rstrip(".").split(" ")
    path = tmp_path / "w.json"
    rows = [{"idx": 0, "image": image, "question": "Q?", "chosen": chosen, "rejected": rejected,
             "chosen_weights": [[words[1], 2.0], [words[-1], 0.5]]},
            {"idx": 1, "image": image, "question": "Q?", "chosen": chosen, "rejected": rejected}]
    path.write_text(json.dumps(rows))
    recs = read_preferences([str(path)], str(world / "images"))
    assert recs[0].weights == [[[words[1], 2.0], [words[-1], 0.5]], None] and recs[1].weights is None
    assert "1 row(s) carry chosen_weights / rejected_weights, which ORPO does not use" in weights_note(recs, "ORPO")
    assert weights_note(recs[1:], "ORPO") is None


def test_a_reference_cache_from_before_data_weights_is_not_reused(tmp_path):
    """Before rows' chosen_weights / rejected_weights were read, the cached weighted sums were the plain sums; the
    same data and model kept the same key (numerics 4), so such a cache was loaded and its unweighted reference
    paired with a weighted policy. The key's numerics version moved on with that change."""
    from training.config import DataArgs, DPOArgs, LoraArgs, ModelArgs, OptimArgs
    from training.dpo.main import reference_settings

    cfg = {"model": ModelArgs(), "data": DataArgs(), "dpo": DPOArgs(), "lora": LoraArgs(), "optim": OptimArgs()}
    assert reference_settings(cfg, None, 2, "llava", 1)["numerics"] >= 5


def _answer_weights(template: str, answer: str, spans: list, change=lambda proc: proc):
    """(tokens, weights) of `answer`'s encoded response under `template` (the tiny LLaVA's byte-level tokenizer, as
    `change` makes it)."""
    from training.data.records import Message
    from training.dpo.weights import answer_weights
    from training.model.architectures import ARCHITECTURES
    from training.model.tiny_archs import _BUILDERS
    from training.templates.chat import ChatEncoder

    proc = change(_BUILDERS["llava"]()[1])
    encoder = ChatEncoder(proc, ARCHITECTURES["llava"], 512, template)
    prompt = [Message("user", "Describe the image in detail.")]
    e = encoder.encode(prompt + [Message("assistant", answer)], [])
    ids = e.input_ids[e.prompt_len:]
    return proc.tokenizer.convert_ids_to_tokens(ids.tolist()), answer_weights(encoder, prompt, answer, spans, ids)


def _template(answer_filter: str = "", generation_prompt: bool = True) -> str:
    from training.model.tiny_archs import _content_macro
    return _content_macro("<image>\n") + (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{ 'USER: ' + render(m['content']) + ' ' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + render(m['content'])" + answer_filter
        + " + eos_token }}"
        "{%- endif -%}{%- endfor -%}"
        + ("{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}" if generation_prompt else ""))


def test_a_template_that_trims_the_answer_keeps_the_span_weights_of_an_answer_ending_in_a_newline():
    """Llama 3.2 Vision's template writes the answer `| trim`: an answer ending in a newline was then not found in
    its segment, was tokenised alone (with a trailing newline token its response does not hold) and every weight
    was 1, without a word."""
    answer = "A red circle and two blue squares.\n"
    tokens, w = _answer_weights(_template("|trim"), answer, [["two blue squares.", 2.0]])
    assert "Ċ" not in tokens  # the premise: the template wrote the answer without its newline
    weighted = [t for t, x in zip(tokens, w.tolist()) if x == 2.0]
    assert "".join(weighted).replace("Ġ", " ").strip() == "two blue squares."


def test_a_span_is_found_in_the_answer_not_in_the_template_text_before_it():
    """A template without a generation prompt writes "ASSISTANT: " in the answer's own segment: a span "A" was
    found in that text, so its weight went to the first letter of "ASSISTANT" and the answer's "A" weighed 1."""
    tokens, w = _answer_weights(_template(generation_prompt=False), "A red circle.", [["A", 2.0]])
    assert "".join(tokens[:4]).startswith("ASSI")  # the premise: the template's text is in the response
    at = tokens.index("Ġ", tokens.index(":")) + 1  # the answer's first token, after "ASSISTANT:" and its space
    assert tokens[at] == "A"
    assert [i for i, x in enumerate(w.tolist()) if x != 1.0] == [at]


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _merging_tokenizer(proc):
    """The tiny LLaVA's tokenizer split as Llama 3's is (a point and the newlines after it are one piece) and given a
    token ".Ċ": a point that ends an answer merges with the newline a template writes after it."""
    from tokenizers import Tokenizer

    spec = json.loads(proc.tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    vocab[".Ċ"] = max(vocab.values()) + 1
    merges.append([".", "Ċ"] if isinstance(merges[0], list) else ". Ċ")
    proc.tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return proc


def test_an_answers_last_token_merged_with_the_template_text_after_it_keeps_the_span_weights():
    """A template that writes a newline after the answer, under a tokenizer that makes ".\\n" one token: the answer's
    tokens alone end in "." where its response holds ".Ċ", so the answer was not found in its response and every
    weight stayed 1, without a word. The merged token starts in the span: it carries the span's weight."""
    answer, spans = "A red circle and two blue squares.", [["two blue squares.", 2.0]]
    tokens, w = _answer_weights(_template(" + '\\n'"), answer, spans, _merging_tokenizer)
    assert ".Ċ" in tokens  # the premise: the answer's last token holds the template's newline
    weighted = [t for t, x in zip(tokens, w.tolist()) if x == 2.0]
    assert "".join(weighted).replace("Ġ", " ").strip() == "two blue squares.Ċ"


@pytest.mark.parametrize("skip", [True, False])
def test_weights_that_cannot_be_placed_on_their_answer_are_a_bad_row(world, tmp_path, skip):
    """A template that rewrites the answer (here upper-cased): its tokens are not in the encoded response, and every
    weight stayed 1, without a word. The row is bad, naming its weights' field; --skip_bad_rows skips and counts it."""
    from training.data.bad_rows import BadRowError, BadRowReport
    from training.data.formats import read_preferences
    from training.dpo.data import PreferenceDataset
    from training.model.architectures import ARCHITECTURES
    from training.model.tiny_archs import _BUILDERS
    from training.templates.chat import ChatEncoder

    image, chosen, rejected = _pair(world)
    path = tmp_path / "w.json"
    path.write_text(json.dumps([{"idx": 0, "image": image, "question": "Q?", "chosen": chosen, "rejected": rejected,
                                 "rejected_weights": [[rejected.split(" ")[1], 2.0]]}]))
    report = BadRowReport(skip=skip)
    recs = read_preferences([str(path)], str(world / "images"), report)
    encoder = ChatEncoder(_BUILDERS["llava"]()[1], ARCHITECTURES["llava"], 512, _template("|upper"))
    ds = PreferenceDataset(recs, encoder, str(world / "images"), report)
    if not skip:
        with pytest.raises(BadRowError, match=r"w\.json: row 0: field 'rejected_weights': .*not found"):
            ds[0]
        return
    assert ds[0] is None and ds[0] is None
    assert [(s["row"], s["field"]) for s in report.skipped] == [(0, "rejected_weights")]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "listwise"])
def test_weighted_sums_are_what_the_objectives_compare(loss_type):
    """The DPO family's objectives read the weighted log-prob sums (policy and reference), not the plain sums, by
    hand: chosen tokens -1, -2, -3 weighted 1, 0.5, 2 (-8; plain -6); rejected -2, -1 weighted 2, 1 (-5; plain -3);
    reference weighted sums -7, -6 (plain -4, -4). h = (-8 + 7) - (-5 + 6) = -2 (from the plain sums: -3)."""
    import math

    from training.config import DPOArgs
    from training.dpo.forward import ResponseLogps
    from training.dpo.objective import objective

    lp = torch.tensor([[[-1.0, -2.0, -3.0], [-2.0, -1.0, 0.0]]])
    mask = torch.tensor([[[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]])
    w = torch.tensor([[[1.0, 0.5, 2.0], [2.0, 1.0, 0.0]]])
    pol = ResponseLogps(lp.sum(-1), mask.sum(-1), (lp * w).sum(-1), lp, mask, w)
    ref = (torch.tensor([[-4.0, -4.0]]), torch.tensor([[3.0, 2.0]]), torch.tensor([[-7.0, -6.0]]))
    out = objective(pol, ref, DPOArgs(loss_type=loss_type, beta=0.1, ipo_average=False, sft_weight=0.0))
    want = {"sigmoid": math.log1p(math.exp(0.2)), "ipo": (-2 - 1 / (2 * 0.1)) ** 2,
            "listwise": math.log1p(math.exp(0.2))}[loss_type]  # two candidates: Plackett-Luce is sigmoid DPO
    assert float(out["pair_loss_sum"]) == pytest.approx(want, rel=1e-6)
    m = out["metrics"]
    assert float(m["rewards/margins"]) == pytest.approx(-0.2, rel=1e-6)
    assert float(m["logps/chosen"]) == -8.0 and float(m["logps/rejected"]) == -5.0
