"""training.rm.expert_pairs: the expert's corrections of a policy's rollouts (run_opa_dpo.sh's rollout and correct
steps) as ranked lists [revised, rollout] that the reward model's reader takes."""
import json

import pytest

from test_dpo_opa import FACTS, GT, _opa_main_args

HALLUCINATED = "The image shows one blue circle, three crosses (red and blue) and one red square on a cyan background."
OMITTED = "The image shows one blue circle on a cyan background."
QUESTION = "<image>\nDescribe the image in detail."


def _rollouts(work, answers, prompt=None):
    work.mkdir(parents=True, exist_ok=True)
    prompt = prompt or [{"role": "user", "content": QUESTION}]
    rows = [{"key": f"pref00000#{i}", "id": "pref00000", "image": "pref00000.png", "prompt": prompt,
             "question": "Describe the image in detail.", "gt": GT, "facts": FACTS, "rollout": r}
            for i, r in enumerate(answers)]
    (work / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _corrected(world, tmp_path, answers, prompt=None):
    """The OPA correct step (the ground-truth expert) run on hand-written rollouts; its work folder."""
    import training.dpo.opa.main as opa
    out = tmp_path / "opa"
    _rollouts(out / "work", answers, prompt)
    opa.main(_opa_main_args(world, out, "--step", "correct"))
    return out / "work"


def test_each_corrected_rollout_is_one_ranked_list_the_reward_model_reads(world, tmp_path, capsys):
    from training.data.formats import read_preferences
    from training.rm.expert_pairs import main

    work = _corrected(world, tmp_path, [GT, HALLUCINATED, OMITTED])
    out = tmp_path / "expert_pairs.json"
    main(["--work", str(work), "--out", str(out)])
    assert "2 pairs (revised > rollout)" in capsys.readouterr().out
    turn = {"from": "human", "value": QUESTION}
    assert json.loads(out.read_text()) == [
        {"id": "pref00000#1", "image": "pref00000.png", "facts": FACTS,
         "conversations": [turn, {"from": "gpt", "value": [GT, HALLUCINATED]}]},
        {"id": "pref00000#2", "image": "pref00000.png", "facts": FACTS,
         "conversations": [turn, {"from": "gpt", "value": [GT, OMITTED]}]}]
    records = read_preferences(str(out), str(world / "images"))
    assert [r.responses for r in records] == [[GT, HALLUCINATED], [GT, OMITTED]]
    assert [r.facts for r in records] == [FACTS, FACTS]
    assert [(m.role, m.content) for m in records[0].prompt] == [("user", QUESTION)]


def test_a_conversation_keeps_its_earlier_turns(world, tmp_path):
    from training.rm.expert_pairs import expert_pairs

    prompt = [{"role": "user", "content": "<image>\nIs there a star?"}, {"role": "assistant", "content": "No."},
              {"role": "user", "content": "Describe the image in detail."}]
    rows, unchanged = expert_pairs(_corrected(world, tmp_path, [OMITTED, GT], prompt))
    assert unchanged == 1
    assert rows[0]["conversations"] == [{"from": "human", "value": "<image>\nIs there a star?"},
                                        {"from": "gpt", "value": "No."},
                                        {"from": "human", "value": "Describe the image in detail."},
                                        {"from": "gpt", "value": [GT, OMITTED]}]


def test_files_of_two_runs_or_a_missing_step_are_refused(world, tmp_path):
    from training.rm.expert_pairs import expert_pairs

    with pytest.raises(SystemExit, match=r"rollouts.jsonl: not found: run `bash run_opa_dpo.sh --step rollout`"):
        expert_pairs(tmp_path / "none")
    work = _corrected(world, tmp_path, [HALLUCINATED])
    pairs = json.loads((work / "opa_pairs.json").read_text())
    pairs[0]["rollout"] = OMITTED  # another run's rollout
    (work / "opa_pairs.json").write_text(json.dumps(pairs))
    with pytest.raises(SystemExit, match=r"opa_pairs.json: row 0: field 'rollout' differs from .*rollouts.jsonl's"):
        expert_pairs(work)
    del pairs[0]["revised"]
    (work / "opa_pairs.json").write_text(json.dumps(pairs))
    with pytest.raises(SystemExit, match=r"opa_pairs.json: row 0: field 'revised': missing or not text"):
        expert_pairs(work)
    with (work / "rollouts.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"rollouts.jsonl: line 2: invalid JSON"):
        expert_pairs(work)
