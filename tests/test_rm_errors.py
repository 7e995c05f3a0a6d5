"""benchmarks.rm_errors: the share of scenes where the reward model prefers the faithful description, and the raw
score percentiles PPO's --reward_clip is read against."""
import pytest
import torch
from sft_helpers import make_reward_model

from benchmarks.rm_errors import auroc, main, percentiles


def test_percentiles_hand_worked():
    assert percentiles(torch.arange(11.0)) == pytest.approx([1.0, 2.5, 5.0, 7.5, 9.0])  # linear interpolation


def test_auroc_hand_worked():
    # pairs (3, 2) (3, 1) above, (1, 2) below, (1, 1) a tie: (1 + 1 + 0 + 0.5) / 4
    assert auroc(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 1.0])) == 0.625
    assert auroc(torch.tensor([5.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([0.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert auroc(torch.tensor([]), torch.tensor([1.0])) != auroc(torch.tensor([]), torch.tensor([1.0]))  # NaN


def test_rm_errors_end_to_end(world, tiny, tmp_path, capsys):
    """The faithful row's percentiles are those of the reward model's own scores of the faithful descriptions (scored
    here apart), and the printed table holds the returned figures."""
    import json

    from training.data.images import load_image
    from training.data.records import Message
    from training.rm.data import RewardScorer
    from training.rm.model import load_reward_model
    from training.rm.quality import _scene
    from training.world.generate import DESCRIBE
    from training.world.scenes import describe, facts

    rm = make_reward_model(tiny, tmp_path / "rm")
    scenes = [_scene(s) for s in json.loads((world / "world.json").read_text())["scenes"]["heldout"]]
    # a model's answers to four scenes: two clean, one with a hallucinated object, one missing a present one
    answers = [describe(scenes[0]), describe(scenes[1]) + " and a star", "the image shows nothing", describe(scenes[3])]
    kinds = [([], []), (["star"], []), ([], ["circle"]), ([], [])]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "eval_embedded_val.per_question.jsonl").write_text("".join(
        json.dumps({"bench": "objhal", "question_id": s.id, "answer": text, "gt_objects": [], "n_mentions": 1,
                    "hallucinated": h, "missed": m}) + "\n" for s, text, (h, m) in zip(scenes, answers, kinds)))
    rows = main(["--reward_model", str(rm), "--world", str(world), "--answers", str(tmp_path / "m"),
                 "--run_name", "val"])
    out = capsys.readouterr().out
    model, processor, arch = load_reward_model(str(rm))
    scorer = RewardScorer(model, processor, arch, 512, 64)

    def score(idx, texts):
        return scorer.score([[Message("user", "<image>\n" + DESCRIBE)]] * len(idx),
                            [[load_image(f"{scenes[i].id}.png", str(world / "images"))] for i in idx], texts,
                            [facts(scenes[i]) for i in idx])
    good = score(range(len(scenes)), [describe(s) for s in scenes])
    mine = score(range(4), answers)
    r = rows["answers"][str(tmp_path / "m")]
    assert (r["clean"], r["hallucinated"], r["missed"]) == (2, 1, 1)
    assert r["auroc_hallucinated"] == auroc(mine[[0, 3]], mine[[1]])
    assert r["auroc_missed"] == auroc(mine[[0, 3]], mine[[2]])
    assert f"| {tmp_path / 'm'} | 2 | 1 | {r['auroc_hallucinated']:.3f} | 1 | {r['auroc_missed']:.3f} |" in out
    assert rows["faithful"]["score_percentiles"] == pytest.approx(percentiles(good), abs=1e-4)
    assert rows["faithful"]["scenes"] == len(scenes) == rows["add"]["scenes"]
    for name in ("add", "swap", "count", "omit"):
        r = rows[name]
        assert f"| {name} | {r['scenes']} | {r['faithful_preferred']:.3f} | {r['mean_margin']:+.3f} |" in out


def test_answers_to_another_worlds_scenes_are_refused(world, tiny, tmp_path):
    import json
    rm = make_reward_model(tiny, tmp_path / "rm")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "eval_embedded.per_question.jsonl").write_text(json.dumps(
        {"bench": "objhal", "question_id": "elsewhere7", "answer": "a circle", "gt_objects": ["circle"],
         "n_mentions": 1, "hallucinated": [], "missed": []}) + "\n")
    with pytest.raises(SystemExit, match=r"eval_embedded.per_question.jsonl: 1 answers to scenes that are not .*"
                                         r"held-out ones \(the first: elsewhere7\)"):
        main(["--reward_model", str(rm), "--world", str(world), "--answers", str(tmp_path / "m")])
