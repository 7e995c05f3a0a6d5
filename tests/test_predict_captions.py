"""Prediction with a factual reward model trained on LLaVA-RLHF's captions (--captions_file): best-of-n and
reward recording give the reward model each question's captions (and a multiple-choice question's correct answer)
as PPO reads them, a question whose image has no caption is a bad row as in PPO, and the answers' settings record
the captions file."""
import json

import pytest

from training.data.bad_rows import BadRowError, BadRowReport
from training.data.formats import read_prompts
from training.data.images import load_image
from training.predict.main import parse, predict


@pytest.fixture(scope="module")
def factual_rm(tiny, tmp_path_factory):
    from sft_helpers import make_reward_model
    return make_reward_model(tiny, tmp_path_factory.mktemp("rm") / "rm", factual=True)


def _files(world, tmp_path, n=3):
    """LLaVA-RLHF PPO prompts (conversations) on the world's images, and an image_to_caption.json keyed by stem."""
    base = [json.loads(x) for x in (world / "bench_objhal.jsonl").read_text().splitlines()[:n]]
    rows = [{"id": f"q{i}", "image": b["image"], "choices": ["no", "yes"], "correct_choice_idx": i % 2,
             "conversations": [{"from": "human", "value": "<image>\nIs there a circle? A. no B. yes"}]}
            for i, b in enumerate(base)]
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(rows))
    caps = tmp_path / "image_to_caption.json"
    caps.write_text(json.dumps({b["image"].rsplit("/", 1)[-1].rsplit(".", 1)[0]: [f"A picture {i}.", "Shapes."]
                                for i, b in enumerate(base)}))
    return qfile, caps


def _argv(world, tiny, qfile, afile, *extra):
    return ["--model_path", str(tiny), "--data_path", str(qfile), "--image_folder", str(world / "images"),
            "--output_file", str(afile), "--max_new_tokens", "2", "--max_seq_len", "200", "--no-progress", *extra]


def _rewards(afile) -> dict:
    return {r["question_id"]: r["reward"] for r in map(json.loads, afile.read_text().splitlines())}


def test_best_of_n_and_recorded_rewards_read_the_captions_as_ppo_does(world, tiny, factual_rm, tmp_path):
    """Prediction had no --captions_file: a reward model trained with LLaVA-RLHF's captions scored every answer
    without its factual block. Each answer's reward is now the reward model's score with the question's captions and
    correct answer, as PPO's reader gives them."""
    from training.config import ModelArgs
    from training.rm.data import RewardScorer
    from training.rm.model import load_reward_model

    qfile, caps = _files(world, tmp_path)
    afile = tmp_path / "a.jsonl"
    predict(parse(_argv(world, tiny, qfile, afile, "--reward_model", str(factual_rm), "--captions_file", str(caps))))
    rows = [json.loads(x) for x in afile.read_text().splitlines()]
    records = read_prompts([str(qfile)], str(world / "images"), BadRowReport(), str(caps))
    assert records[1].facts == ["A picture 1.", "Shapes.", "correct answer: yes"]
    rm, proc, arch = load_reward_model(factual_rm, ModelArgs())
    scorer = RewardScorer(rm, proc, arch, 200, 4, device="cpu", factual=True)
    images = [[load_image(s, str(world / "images")) for s in r.images] for r in records]
    texts = [r["text"] for r in rows]
    want = scorer.score([r.prompt for r in records], images, texts, [r.facts for r in records])
    plain = scorer.score([r.prompt for r in records], images, texts, None)
    assert [r["reward"] for r in rows] == pytest.approx(want.tolist(), abs=1e-4)
    assert (want - plain).abs().max() > 1e-3  # the block changes the reward: the check above can fail
    best = tmp_path / "best.jsonl"
    predict(parse(_argv(world, tiny, qfile, best, "--best_of_n", "2", "--reward_model", str(factual_rm),
                        "--captions_file", str(caps))))
    rows = [json.loads(x) for x in best.read_text().splitlines()]
    want = scorer.score([r.prompt for r in records], images, [r["text"] for r in rows], [r.facts for r in records])
    assert [r["reward"] for r in rows] == pytest.approx(want.tolist(), abs=1e-4)


def test_a_question_whose_image_has_no_caption_is_a_bad_row_as_in_ppo(world, tiny, factual_rm, tmp_path):
    qfile, caps = _files(world, tmp_path)
    kept = json.loads(caps.read_text())
    del kept[next(iter(kept))]  # the first question's image
    caps.write_text(json.dumps(kept))
    afile = tmp_path / "a.jsonl"
    argv = _argv(world, tiny, qfile, afile, "--reward_model", str(factual_rm), "--captions_file", str(caps))
    with pytest.raises(BadRowError, match=r"q\.json: row 0: field 'image': no captions for image"):
        predict(parse(argv))
    predict(parse([*argv, "--skip_bad_rows"]))
    assert set(_rewards(afile)) == {"q1", "q2"}
    bad = json.loads((tmp_path / "a.bad_rows.json").read_text())
    assert (bad["n_skipped"], bad["rows"][0]["row"], bad["rows"][0]["field"]) == (1, 0, "image")


def test_a_question_without_facts_is_a_bad_row_not_a_file_scored_without_them(world, tiny, factual_rm, tmp_path):
    """With a captions file a question with no image (so no caption) and no correct answer has no facts. PPO makes it
    a bad row; prediction scored the whole file without the factual block."""
    qfile, caps = _files(world, tmp_path)
    rows = json.loads(qfile.read_text())
    rows.append({"id": "text", "conversations": [{"from": "human", "value": "Say hello."}]})
    qfile.write_text(json.dumps(rows))
    afile = tmp_path / "a.jsonl"
    argv = _argv(world, tiny, qfile, afile, "--reward_model", str(factual_rm), "--captions_file", str(caps))
    with pytest.raises(BadRowError, match=r"q\.json: row 3: field 'facts': missing"):
        predict(parse(argv))
    predict(parse([*argv, "--skip_bad_rows"]))
    full = tmp_path / "full.jsonl"
    qfile.write_text(json.dumps(rows[:3]))
    predict(parse(_argv(world, tiny, qfile, full, "--reward_model", str(factual_rm), "--captions_file", str(caps))))
    assert _rewards(afile) == pytest.approx(_rewards(full), abs=1e-6)


def test_another_captions_file_is_refused_as_other_settings_are(world, tiny, factual_rm, tmp_path, capsys):
    qfile, caps = _files(world, tmp_path)
    afile = tmp_path / "a.jsonl"
    argv = _argv(world, tiny, qfile, afile, "--reward_model", str(factual_rm))
    predict(parse([*argv, "--captions_file", str(caps)]))
    settings = json.loads((tmp_path / "a.predict.json").read_text())
    assert settings["captions_file"] == str(caps.resolve()) and settings["captions_fingerprint"]
    predict(parse([*argv, "--captions_file", str(caps)]))  # the same: resumed (nothing left to answer)
    caps.write_text(json.dumps({k: ["Other words."] for k in json.loads(caps.read_text())}))
    with pytest.raises(SystemExit, match=r"captions_fingerprint differ"):
        predict(parse([*argv, "--captions_file", str(caps)]))
    with pytest.raises(SystemExit, match=r"captions_file, captions_fingerprint differ"):
        predict(parse(argv))


def test_a_captions_file_without_a_reward_model_or_that_is_not_there_is_refused_as_read(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse(["--model_path", "m", "--data_path", "q.json", "--captions_file", "c.json"])
    assert "--captions_file gives a reward model its factual block" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--model_path", "m", "--data_path", "q.json", "--reward_model", "r", "--captions_file",
               str(tmp_path / "c.json")])
    assert f"--captions_file {tmp_path / 'c.json'}: no such file" in capsys.readouterr().err
