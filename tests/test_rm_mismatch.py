"""--mismatched_pairs: a list's best response above another list's best response to the same prompt, read with the
first list's image and facts (training.rm.mismatch), and the reward-model stage training on them."""
import json

import pytest
import torch
from safetensors.torch import load_file
from test_rm import rm_args

from training.data.records import Message, PreferenceRecord, RowRef
from training.rm.main import main
from training.rm.mismatch import mismatched_pairs


def rec(i: int, best: str, question: str = "Describe the image.", facts=None) -> PreferenceRecord:
    return PreferenceRecord(id=f"r{i}", prompt=[Message("user", "<image>\n" + question)],
                            responses=[best, f"worse {i}"], images=[f"img{i}.png"], facts=facts or [f"fact {i}"],
                            source=RowRef("prefs.json", i), margin=0.5, weights=[[["a", 2.0]], None])


def test_each_pair_is_its_own_best_above_another_lists_best_with_its_own_image_and_facts():
    records = [rec(0, "a circle"), rec(1, "a square"), rec(2, "a star")]
    pairs, unmatched = mismatched_pairs(records, 1.0, seed=0)
    assert unmatched == 0 and len(pairs) == 3
    bests = {r.responses[0] for r in records}
    for p, r in zip(pairs, records):
        assert p.responses[0] == r.responses[0]
        assert p.responses[1] in bests - {r.responses[0]}  # another list's best, never its own or a worse one
        other = next(o for o in records if o.responses[0] == p.responses[1])
        assert p.id == f"{r.id}~{other.id}"
        assert (p.images, p.facts, p.prompt, p.source) == (r.images, r.facts, r.prompt, r.source)
        assert p.margin is None and p.weights is None  # the row's margin and weights were of its own pair
        assert f"{other.source}'s best" in p.text_field and p.text_field.startswith("conversations")
    assert len(records) == 3 and records[0].responses == ["a circle", "worse 0"]  # the input is left as it was


def test_partners_share_the_prompt_and_differ_in_their_best_response():
    records = [rec(0, "a circle"), rec(1, "a circle"), rec(2, "a square"), rec(3, "two stars", "How many stars?")]
    pairs, unmatched = mismatched_pairs(records, 1.0, seed=3)
    # r3's question is asked once: no partner; r0 and r1 give the same answer: each one's partner is r2
    assert unmatched == 1
    assert [(p.id, p.responses) for p in pairs] == [("r0~r2", ["a circle", "a square"]),
                                                   ("r1~r2", ["a circle", "a square"]), (pairs[2].id, pairs[2].responses)]
    assert pairs[2].id in ("r2~r0", "r2~r1") and pairs[2].responses == ["a square", "a circle"]


def test_fraction_picks_that_many_lists_reproducibly():
    records = [rec(i, f"answer {i}") for i in range(10)]
    half, _ = mismatched_pairs(records, 0.5, seed=1)
    assert len(half) == 5 and len({p.id.split("~")[0] for p in half}) == 5
    assert [p.id for p in mismatched_pairs(records, 0.5, seed=1)[0]] == [p.id for p in half]
    draws = {tuple(p.id for p in mismatched_pairs(records, 0.5, seed=s)[0]) for s in range(5)}
    assert len(draws) > 1  # the seed decides
    assert mismatched_pairs(records, 0.0, seed=1) == ([], 0)


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_a_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(SystemExit, match="--mismatched_pairs"):
        mismatched_pairs([rec(0, "a"), rec(1, "b")], fraction, seed=0)


def test_the_stage_refuses_a_bad_fraction_before_loading_a_model(tmp_path):
    with pytest.raises(SystemExit, match=r"--mismatched_pairs 2\.0: give a fraction"):
        main(["--from_checkpoint", str(tmp_path / "none"), "--mismatched_pairs", "2", "--output_dir", str(tmp_path)])


SGD = ("--optimizer", "sgd", "--learning_rate", "0.5", "--center_coef", "0", "--per_device_train_batch_size", "2",
       "--eval_data_path", "", "--eval_steps", "0")


def test_the_stage_trains_on_the_mismatched_pairs(world, tiny, tmp_path, capsys):
    """Two SGD steps over two rows with --mismatched_pairs 1 equal two over those rows and their two mismatched
    pairs written out by hand (each row's only partner is the other row; the same four lists in the same shuffled
    order), and differ from one step over the two rows alone."""
    rows = json.loads((world / "preference_train.json").read_text())[:2]
    (tmp_path / "two.json").write_text(json.dumps(rows))
    by_hand = list(rows)
    for a, b in ((0, 1), (1, 0)):
        best = [rows[a]["conversations"][1]["value"][0], rows[b]["conversations"][1]["value"][0]]
        by_hand.append({**rows[a], "id": f"{rows[a]['id']}~{rows[b]['id']}",  # (the facts are shuffled by id)
                        "conversations": [rows[a]["conversations"][0], {"from": "gpt", "value": best}]})
    (tmp_path / "by_hand.json").write_text(json.dumps(by_hand))
    main(rm_args(world, tiny, tmp_path / "option", *SGD, "--max_steps", "2", "--data_path", str(tmp_path / "two.json"),
                 "--mismatched_pairs", "1"))
    assert "--mismatched_pairs 1.0: 2 mismatched pairs added to 2 training lists" in capsys.readouterr().out
    main(rm_args(world, tiny, tmp_path / "by_hand", *SGD, "--max_steps", "2", "--data_path", str(tmp_path / "by_hand.json")))
    main(rm_args(world, tiny, tmp_path / "off", *SGD, "--max_steps", "1", "--data_path", str(tmp_path / "two.json")))
    head = {k: load_file(str(tmp_path / k / "value_head.safetensors"))["weight"] for k in ("option", "by_hand", "off")}
    assert torch.equal(head["option"], head["by_hand"])  # the same lists in the same order: the same arithmetic
    assert not torch.allclose(head["option"], head["off"], rtol=1e-4, atol=1e-6)
