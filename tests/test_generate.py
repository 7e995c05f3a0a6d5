"""Generation never emits an image placeholder or padding (a sampled <image> breaks the next forward);
predict reports a question too long for --max_seq_len, or whose sampled answers are too long for the reward
model, as a bad row naming its text field, and refuses duplicate question ids."""
import json

import pytest
import torch

from training.config import LoraArgs, ModelArgs
from training.data.bad_rows import BadRowReport
from training.data.formats import read_prompts
from training.data.images import load_image
from training.model.builder import load_model_and_processor
from training.ppo.rollout import generate_rollouts
from training.predict.generate import DecodeArgs, generate_batch, stop_and_never
from training.templates.chat import ChatEncoder


def _setup(world, tiny):
    model, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(),
                                                      for_training=False)
    records = read_prompts([str(world / "ppo_prompts.json")], str(world / "images"), BadRowReport())[:3]
    images = [[load_image(src, str(world / "images")) for src in r.images] for r in records]
    return model, processor, arch, [r.prompt for r in records], images


def test_image_token_is_suppressed_even_when_it_is_the_likeliest(world, tiny):
    model, processor, arch, prompts, images = _setup(world, tiny)
    image_id = model.config.image_token_id
    eos = processor.tokenizer.eos_token_id
    assert stop_and_never(model, processor.tokenizer) == ([eos], sorted({image_id, processor.tokenizer.pad_token_id}))
    # make <image> the most likely next token everywhere
    model.lm_head.register_forward_hook(lambda m, i, out: out.index_add(
        -1, torch.tensor([image_id]), torch.full((*out.shape[:-1], 1), 1e4)))
    encoder = ChatEncoder(processor, arch, 160)
    decode = DecodeArgs(max_new_tokens=6)
    ro = generate_rollouts(model, processor, encoder, arch.name, prompts, images, decode, "cpu")
    resp = ro.batch.input_ids[ro.batch.labels != -100]
    assert resp.numel() > 0 and image_id not in resp.tolist()
    # the same generation without suppression does emit it (so the check above can fail)
    enc = encoder.encode(prompts[0], images[0], add_generation_prompt=True)
    raw = model.generate(input_ids=enc.input_ids[None], attention_mask=torch.ones_like(enc.input_ids)[None],
                         **enc.vision, max_new_tokens=1, do_sample=False)
    assert raw[0, -1].item() == image_id
    # generate_batch decodes without special tokens: had it sampled only <image>, its texts would be empty
    texts = generate_batch(model, processor, encoder, arch.name, prompts, images, decode)
    assert all(t[0].strip() for t in texts)


def _questions(world, path, rows):
    base = [json.loads(x) for x in (world / "bench_pope_random.jsonl").read_text().splitlines()[:len(rows)]]
    path.write_text("".join(json.dumps({"image": b["image"], **r}) + "\n" for b, r in zip(base, rows)))
    return path


def _predict_argv(world, tiny, qfile, afile, *extra):
    return ["--model_path", str(tiny), "--data_path", str(qfile), "--image_folder", str(world / "images"),
            "--output_file", str(afile), "--max_new_tokens", "2", "--max_seq_len", "200", "--no-progress", *extra]


def test_predict_reports_a_prompt_too_long_as_a_bad_row(tmp_path, world, tiny):
    """A question longer than --max_seq_len is a bad row naming file, row and field: the run stops on it, or
    with --skip_bad_rows the rest of its batch is answered and it is counted; a resumed run does the same.
    Answer rows hold the question text as LLaVA's model_vqa writes it (no "<image>" placeholder)."""
    from training.data.bad_rows import BadRowError
    from training.predict.main import parse, predict

    qfile = _questions(world, tmp_path / "q.jsonl", [
        {"question_id": "a", "text": "Is there a circle?"}, {"question_id": "long", "text": "Is there a dog? " * 200},
        {"question_id": "c", "text": "Is there a square?"}])
    afile = tmp_path / "a.jsonl"
    with pytest.raises(BadRowError, match=r"q\.jsonl: row 1: field 'text': prompt of \d+ tokens .* exceeds"):
        predict(parse(_predict_argv(world, tiny, qfile, afile)))
    argv = _predict_argv(world, tiny, qfile, afile, "--skip_bad_rows")
    predict(parse(argv))
    rows = [json.loads(x) for x in afile.read_text().splitlines()]
    assert [(r["question_id"], r["prompt"]) for r in rows] == [("a", "Is there a circle?"), ("c", "Is there a square?")]
    bad = json.loads((tmp_path / "a.bad_rows.json").read_text())
    assert (bad["n_skipped"], bad["rows"][0]["row"], bad["rows"][0]["field"]) == (1, 1, "text")
    predict(parse(argv))  # resumed: nothing new to answer, the long question skipped again
    assert [json.loads(x) for x in afile.read_text().splitlines()] == rows


def test_predict_question_ids_are_unique(tmp_path, world, tiny):
    """Several questions about one image share its image_id, which is no question id (fresh runs wrote
    duplicate ids, resumed ones skipped questions); two rows with one question_id are refused."""
    from eval.answers import read_answers
    from training.predict.main import parse, predict

    qfile = _questions(world, tmp_path / "objhal.jsonl", [{"image_id": 7, "question": f"Is there a {x}?"}
                                                          for x in ("circle", "square", "cross")])
    afile = tmp_path / "a.jsonl"
    predict(parse(_predict_argv(world, tiny, qfile, afile)))
    assert sorted(read_answers(afile)) == ["0", "1", "2"]  # the row index, as eval numbers such questions
    assert {json.loads(x)["image_id"] for x in afile.read_text().splitlines()} == {7}  # kept for CHAIR
    dup = _questions(world, tmp_path / "dup.jsonl", [{"question_id": 1, "text": "A?"}, {"question_id": 2, "text": "B?"},
                                                     {"question_id": 1, "text": "C?"}])
    with pytest.raises(SystemExit, match=r"dup\.jsonl, row 0 and .*dup\.jsonl, row 2: both have question_id '1'"):
        predict(parse(_predict_argv(world, tiny, dup, tmp_path / "b.jsonl")))


def test_a_question_id_left_empty_is_the_rows_id_as_the_benchmarks_number_it(tmp_path, world, tiny):
    """A question file whose question_id column is empty (null) on some rows: those rows are keyed as the benchmarks'
    scoring keys them (their id, else their row index). Predict keyed them "None": two such rows were refused as one
    question asked twice, and one row's answer joined no question."""
    from eval.answers import read_answers
    from training.data.prompt_formats import question_id
    from training.predict.main import parse, predict

    rows = [{"question_id": None, "text": "Is there a circle?"}, {"question_id": None, "text": "Is there a cross?"},
            {"question_id": "q2", "text": "Is there a star?"}]
    qfile = _questions(world, tmp_path / "q.jsonl", rows)
    afile = tmp_path / "a.jsonl"
    predict(parse(_predict_argv(world, tiny, qfile, afile)))
    assert sorted(read_answers(afile)) == sorted(question_id(r, i) for i, r in enumerate(rows)) == ["0", "1", "q2"]


@pytest.mark.parametrize("bad", [["--batch_size", "0"], ["--rm_batch_size", "0"], ["--max_new_tokens", "0"],
                                 ["--num_beams", "0"], ["--max_seq_len", "0"], ["--best_of_n", "0"],
                                 ["--do_sample", "--temperature", "0"], ["--best_of_n", "2", "--top_p", "0"],
                                 ["--do_sample", "--top_p", "1.5"], ["--do_sample", "--temperature", "inf"]])
def test_predict_refuses_counts_below_one_and_sampling_it_cannot_do_as_it_reads_its_options(bad, capsys):
    """--batch_size 0 stopped the run after the model had loaded, on "range() arg 3 must not be zero"; --best_of_n 0
    answered greedily and printed "-4 sampled answers did not fit the reward model", writing best_of_n 0 in every
    row; a temperature of 0 or a top_p outside (0, 1] stopped generation on transformers' error; an infinite
    temperature answered every question with one word repeated. Each is refused as the options are read, naming the
    option."""
    from training.predict.main import parse

    with pytest.raises(SystemExit):
        parse(["--model_path", "m", "--data_path", "q.jsonl", *bad])
    assert bad[-2] in capsys.readouterr().err
    parse(["--model_path", "m", "--data_path", "q.jsonl", "--temperature", "0"])  # not sampling: never read


def test_prompt_too_long_names_the_field_its_row_holds_the_text_in(tmp_path, world, tiny):
    """A question file's rows may hold their text in different fields: the bad row names its own (the field was
    once guessed from the file's first row)."""
    from training.data.bad_rows import BadRowError
    from training.predict.main import parse, predict

    qfile = _questions(world, tmp_path / "q.jsonl", [{"question": "Is there a circle?"},
                                                     {"query": "Is there a dog? " * 200}])
    with pytest.raises(BadRowError, match=r"q\.jsonl: row 1: field 'query': prompt of \d+ tokens"):
        predict(parse(_predict_argv(world, tiny, qfile, tmp_path / "a.jsonl")))


@pytest.fixture(scope="module")
def factual_rm(tiny, tmp_path_factory):
    from sft_helpers import make_reward_model
    return make_reward_model(tiny, tmp_path_factory.mktemp("rm") / "rm", factual=True)


def test_best_of_n_answers_too_long_for_the_reward_model_are_a_bad_row(tmp_path, world, tiny, factual_rm):
    """Every sampled answer of the middle question, read with its many facts, exceeds the reward model's
    max_seq_len (the question alone fits): a bad row naming file, row and field (was an uncaught PromptTooLong),
    or with --skip_bad_rows skipped and counted while the others are answered, each with n_scored."""
    from training.data.bad_rows import BadRowError
    from training.predict.main import parse, predict

    fact = "The image contains one green diamond."
    qfile = _questions(world, tmp_path / "q.jsonl", [{"question_id": q, "text": f"Is there a {x}?", "facts": [fact] * k}
                                                     for q, x, k in (("a", "circle", 1), ("b", "cross", 20),
                                                                     ("c", "star", 1))])
    afile = tmp_path / "a.jsonl"
    argv = _predict_argv(world, tiny, qfile, afile, "--best_of_n", "2", "--reward_model", str(factual_rm))
    with pytest.raises(BadRowError, match=r"q\.jsonl: row 1: field 'text': none of its 2 sampled answer\(s\) fits "
                                          r"the reward model whole \(image, prompt, answer and factual block\) "
                                          r"within max_seq_len=200"):
        predict(parse(argv))
    predict(parse([*argv, "--skip_bad_rows"]))
    rows = [json.loads(x) for x in afile.read_text().splitlines()]
    assert [(r["question_id"], r["best_of_n"], r["n_scored"]) for r in rows] == [("a", 2, 2), ("c", 2, 2)]
    bad = json.loads((tmp_path / "a.bad_rows.json").read_text())
    assert (bad["n_skipped"], bad["rows"][0]["row"], bad["rows"][0]["field"]) == (1, 1, "text")


def test_an_answer_too_long_for_the_reward_model_is_kept_without_a_reward_when_only_recording_it(tmp_path, world,
                                                                                                   tiny, factual_rm):
    """--reward_model without --best_of_n records each (greedy) answer's reward: an answer the reward model could not
    read whole was a bad row, so the answer was lost; it is kept with reward null and n_scored 0."""
    from training.predict.main import parse, predict

    fact = "The image contains one green diamond."
    qfile = _questions(world, tmp_path / "q.jsonl", [{"question_id": q, "text": f"Is there a {x}?", "facts": [fact] * k}
                                                     for q, x, k in (("a", "circle", 1), ("b", "cross", 20))])
    afile = tmp_path / "a.jsonl"
    predict(parse(_predict_argv(world, tiny, qfile, afile, "--reward_model", str(factual_rm))))
    rows = {r["question_id"]: r for r in map(json.loads, afile.read_text().splitlines())}
    assert set(rows) == {"a", "b"} and not (tmp_path / "a.bad_rows.json").exists()
    assert isinstance(rows["a"]["reward"], float) and rows["a"]["n_scored"] == 1
    assert rows["b"]["reward"] is None and rows["b"]["n_scored"] == 0 and rows["b"]["text"]


def test_whether_the_reward_model_reads_facts_is_decided_for_the_whole_file(tmp_path, world, tiny, factual_rm):
    """A factual reward model reads the factual block only when every question has facts. That was decided over the
    questions left to answer: a run resumed (or a chunk) where only questions with facts were left scored them with
    the block, the uninterrupted run without it, so one answer file held rewards of two kinds."""
    from training.predict.main import parse, predict

    qfile = _questions(world, tmp_path / "q.jsonl", [{"question_id": "a", "text": "Is there a circle?"},
                                                     {"question_id": "b", "text": "Is there a cross?",
                                                      "facts": ["The image contains one green diamond."]}])

    def rewards(afile, *extra):
        predict(parse(_predict_argv(world, tiny, qfile, afile, "--batch_size", "1", "--reward_model",
                                    str(factual_rm), *extra)))
        return {r["question_id"]: r["reward"] for r in map(json.loads, afile.read_text().splitlines())}

    full = rewards(tmp_path / "full.jsonl")
    cut = tmp_path / "cut.jsonl"
    cut.write_text((tmp_path / "full.jsonl").read_text().splitlines(True)[0])  # stopped after question a
    assert rewards(cut) == full
    assert rewards(tmp_path / "chunk.jsonl", "--num_chunks", "2", "--chunk_idx", "1") == {"b": full["b"]}


def test_reward_scorer_does_not_score_a_cut_response(world, tiny, factual_rm):
    """A response the reward model cannot read whole is an error, or with skip_unfit has reward NaN (it was cut
    and scored silently)."""
    from training.rm.data import RewardScorer
    from training.rm.model import load_reward_model
    from training.templates.chat import PromptTooLong

    rm, processor, arch = load_reward_model(factual_rm)
    _, _, _, prompts, images = _setup(world, tiny)
    args = ([prompts[0]] * 2, [images[0]] * 2, ["a circle", "a circle " * 100])
    with pytest.raises(PromptTooLong, match="exceed max_seq_len=200"):
        RewardScorer(rm, processor, arch, 200, factual=False).score(*args)
    r = RewardScorer(rm, processor, arch, 200, factual=False, skip_unfit=True).score(*args)
    assert r[0].isfinite() and r[1].isnan()
    # factual: the message names the factual block (the encoder's own called the whole input a "prompt")
    with pytest.raises(PromptTooLong, match="response and factual block exceed max_seq_len=200"):
        RewardScorer(rm, processor, arch, 200).score(*args, facts=[["The image contains one circle."]] * 2)


def test_best_of_n_chooses_among_the_scored_answers(world, tiny):
    """Answers the scorer did not score (NaN) are passed over (argmax took the NaN); predict records n_scored and
    reports a question with no scored answer as a bad row."""
    from training.predict.generate import best_of_n

    class LongestUnscored:  # reward = length, but the longest answer is not scored
        factual = False

        def score(self, prompts, imgs, responses, facts=None):
            lengths = torch.tensor([float(len(t)) for t in responses]).view(-1, 4)
            return lengths.masked_fill(lengths == lengths.max(-1, keepdim=True).values, float("nan")).view(-1)

    model, processor, arch, prompts, images = _setup(world, tiny)
    torch.manual_seed(0)
    best, _, r_all = best_of_n(model, processor, ChatEncoder(processor, arch, 512), arch.name, prompts, images,
                               DecodeArgs(max_new_tokens=6), 4, LongestUnscored())
    assert [len(t) for t in best] == r_all.nan_to_num(-1).max(-1).values.tolist()

    from training.predict.main import rewarded
    recs = read_prompts([str(world / "ppo_prompts.json")], str(world / "images"))[:2]
    report = BadRowReport(skip=True)
    scorer = LongestUnscored()
    scorer.encoder = ChatEncoder(processor, arch, 200)
    rows, unscored = rewarded(recs, [{"question_id": "x"}, {"question_id": "y"}],
                              torch.tensor([[float("nan"), 0.5, 0.25], [float("nan")] * 3]), 3, report, scorer)
    assert rows == [{"question_id": "x", "reward": 0.5, "best_of_n": 3, "n_scored": 2}] and unscored == 4
    assert [(b["row"], b["field"]) for b in report.skipped] == [(1, "conversations")]


def test_generation_stops_at_the_templates_end_of_turn_token(tmp_path):
    """Idefics3-8B's generation config names <|end_of_text|> as EOS, while every trained answer ends with
    <end_of_utterance>: generation (predict, best-of-n, PPO rollouts) ran past the answer to max_new_tokens."""
    import numpy as np
    from PIL import Image

    from training.data.records import Message
    from training.model.architectures import ARCHITECTURES
    from training.model.tiny_archs import make_tiny_checkpoint

    ck = make_tiny_checkpoint("idefics3", tmp_path / "idefics3")
    model, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=ck), LoraArgs(), for_training=False)
    tok = processor.tokenizer
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    other_eos = tok.convert_tokens_to_ids(tok.bos_token)  # a stand-in for <|end_of_text|>: not the turn's end
    model.generation_config.eos_token_id = [other_eos]
    encoder = ChatEncoder(processor, ARCHITECTURES["idefics3"], 512)
    assert encoder.end_of_turn_id == eou
    enc = encoder.encode([Message("user", "<image>\nWhat?"), Message("assistant", "Red.")],
                         [Image.new("RGB", (32, 32))])
    assert enc.input_ids[enc.labels != -100][-1] == eou  # trained answers end with it
    stop, _ = stop_and_never(model, tok, encoder.end_of_turn_id)
    assert set(stop) == {other_eos, eou}
    # make <end_of_utterance> the likeliest token: the rollout ends at its first token
    model.lm_head.register_forward_hook(lambda m, i, out: out.index_add(
        -1, torch.tensor([eou]), torch.full((*out.shape[:-1], 1), 1e4)))
    image = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    ro = generate_rollouts(model, processor, encoder, arch.name, [[Message("user", "<image>\nWhat?")]], [[image]],
                           DecodeArgs(max_new_tokens=6), "cpu")
    assert ro.lengths.tolist() == [1] and ro.ended.tolist() == [True]


def test_rollout_log_probs_are_those_of_the_distribution_sampled(world, tiny):
    """PPO's ratios, KL and entropy take log-probs under softmax(logits / T) without the suppressed tokens; the
    rollout sampled under transformers' default top_k of 50 (and the log-probs kept the suppressed tokens in the
    softmax): on this 77-token vocabulary, a token outside the top 50 was never drawn though its log-prob counted."""
    from training.logprobs import token_logprobs
    model, processor, arch, prompts, images = _setup(world, tiny)
    assert len(processor.tokenizer) > 50  # so a top-50 cut is a real cut here
    encoder = ChatEncoder(processor, arch, 160)
    scores, real_generate = [], model.generate

    def generate(**kw):  # the sampler's own processed scores: the distribution each token was drawn from
        out = real_generate(**kw, output_scores=True, return_dict_in_generate=True)
        scores.extend(out.scores)
        return out.sequences
    model.generate = generate
    model.generation_config.repetition_penalty = 1.5  # a checkpoint's own setting: not of the policy's distribution
    torch.manual_seed(0)
    T = 1.7
    ro = generate_rollouts(model, processor, encoder, arch.name, prompts, images,
                           DecodeArgs(max_new_tokens=5, do_sample=True, temperature=T), "cpu")
    sampler = torch.log_softmax(torch.stack(scores, 1).float(), -1)  # (B, steps, V)
    with torch.no_grad():
        lp, mask = token_logprobs(model(**ro.batch.model_inputs()).logits, ro.batch.labels, T, ro.suppressed)
    prompt_lens = [int((row != -100).nonzero()[0]) for row in ro.batch.labels]  # where each response starts
    for b, (n, p) in enumerate(zip(ro.lengths.tolist(), prompt_lens)):
        tokens = ro.batch.input_ids[b, p:p + n]
        want = sampler[b, torch.arange(n), tokens]
        torch.testing.assert_close(lp[b, p - 1:p - 1 + n], want, rtol=0, atol=2e-4)
    assert torch.isfinite(sampler[..., ro.suppressed]).sum() == 0  # the suppressed ids: never drawable


def test_sampling_ignores_the_checkpoints_own_filters(world, tiny):
    """Qwen2-VL ships generation_config.json with top_k 1 (and do_sample true): best-of-n, predict's sampling and
    OPA-DPO's rollouts then drew n copies of the greedy answer; elsewhere transformers' top_k of 50 cut them."""
    model, processor, arch, prompts, images = _setup(world, tiny)
    model.generation_config.update(do_sample=True, top_k=1, top_p=0.001, temperature=0.01)
    encoder = ChatEncoder(processor, arch, 160)
    torch.manual_seed(0)
    texts = generate_batch(model, processor, encoder, arch.name, prompts[:1], images[:1],
                           DecodeArgs(max_new_tokens=6, do_sample=True, temperature=1.0, num_return_sequences=6))
    assert len(set(texts[0])) > 1
    assert (model.generation_config.top_k, model.generation_config.top_p) == (1, 0.001)  # put back after it


def test_an_unscored_answer_never_beats_negative_rewards_and_a_changed_image_is_a_changed_question():
    """The reward of best-of-n is the best scored one: an unscored answer counted as 0 beat every negative reward and
    passed the test above, whose rewards are positive. A question file rewritten with another image for a
    question_id was resumed with the old answer: only a changed prompt was tested."""
    from types import SimpleNamespace

    from training.data.records import Message
    from training.predict.main import answer_row, changed_questions, rewarded
    rows, unscored = rewarded([None], [{"question_id": "x"}], torch.tensor([[-2.0, float("nan"), -1.5]]), 3,
                              BadRowReport(), SimpleNamespace(factual=False))
    assert rows == [{"question_id": "x", "reward": -1.5, "best_of_n": 3, "n_scored": 2}] and unscored == 1

    def question(image):
        return SimpleNamespace(id="q1", meta={}, images=[image], prompt=[Message("user", "<image>\nIs it red?")])
    done = {"q1": answer_row(question("/data/a.png"), "Yes.", "m")}
    assert changed_questions([question("/data/a.png")], done) == []
    assert changed_questions([question("/data/b.png")], done) == ["q1"]
