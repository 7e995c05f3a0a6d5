"""OPA-DPO's work files across reruns: a step resumed after an interrupt, and a step rerun with another option or
input (another data file, another expert) that must not reuse what the first wrote."""
import json

from test_dpo_opa import GT, _opa_main_args, _refused_then_skipped, _write_rollouts


def test_a_last_row_killed_before_its_newline_is_resumed_after(tmp_path):
    """A step killed between a row and its newline: the next append joined its first row to that line, and the
    file after it stopped every later run ("line 2: invalid JSON")."""
    from training.dpo.opa.main import _read_jsonl

    path = tmp_path / "rollouts.jsonl"
    rows = [json.dumps({"key": f"p#{i}", "id": "p", "rollout": "A."}) for i in range(4)]
    path.write_text(rows[0] + "\n" + rows[1])  # killed before the second row's "\n"
    assert list(_read_jsonl(path)) == ["p#0", "p#1"]
    with path.open("a") as f:  # the step resumes: appends its new rows
        f.write(rows[2] + "\n" + rows[3] + "\n")
    assert list(_read_jsonl(path)) == ["p#0", "p#1", "p#2", "p#3"]


def test_a_rollout_step_rerun_on_another_data_file_is_refused(world, tiny, tmp_path):
    """The rollout step kept the first data file's rollouts and appended the second's: the pairs mixed both files
    (pref00000#0, pref00001#1, heldout00000#0, heldout00001#1 from --n_prompts 2)."""
    import pytest

    from training.dpo.opa.main import main
    out = tmp_path / "opa"
    args = ["--step", "rollout", "--from_checkpoint", str(tiny), "--image_folder", str(world / "images"),
            "--output_dir", str(out), "--max_new_tokens", "4", "--n_prompts", "2", "--no-progress"]
    main(args + ["--data_path", str(world / "preference_train.json")])
    with pytest.raises(SystemExit, match=r"other settings \(data_path, data_sha256 differ"):
        main(args + ["--data_path", str(world / "preference_heldout.json")])
    main(args + ["--data_path", str(world / "preference_train.json"), "--n_prompts", "3"])  # the same: resumed
    assert len((out / "work" / "rollouts.jsonl").read_text().splitlines()) == 3


def test_another_expert_reviews_the_rollouts_again(world, tmp_path, monkeypatch):
    """The correct step rerun with --expert chat (or another endpoint or model) reused the first expert's reports:
    no request, the ground-truth reviser's pairs kept."""
    import training.dpo.opa.main as opa
    from training.dpo.opa.expert import GroundTruthReviser

    asked = []

    class Chat:
        def review(self, response, **kw):
            asked.append(response)
            return GroundTruthReviser().review(response, **kw)

    out = tmp_path / "opa"
    _write_rollouts(out / "work", [GT, "A red star."])
    path = out / "work" / "rollouts.jsonl"  # an image the chat expert is sent
    path.write_text(path.read_text().replace('"x.png"', '"pref00000.png"'))
    opa.main(_opa_main_args(world, out, "--step", "correct"))  # the ground-truth reviser
    monkeypatch.setattr(opa, "make_expert", lambda a, work: Chat())
    chat = ["--step", "correct", "--expert", "chat", "--expert_url", "http://127.0.0.1:9/v1"]
    opa.main(_opa_main_args(world, out, *chat))
    assert asked == [GT, "A red star."]
    opa.main(_opa_main_args(world, out, *chat))  # the same expert: its reports kept
    assert len(asked) == 2
    opa.main(_opa_main_args(world, out, *chat, "--expert_model", "other"))
    assert len(asked) == 4


def test_only_corrected_keeps_a_rollout_the_expert_added_a_sentence_to(world, tmp_path, monkeypatch):
    """An expert answer in the OPA-DPO release's layout with an "Added" sentence (score 4, nothing copied) revises
    the rollout, but --only_corrected dropped it ("0 of 1 rollouts corrected; 0 prompts' pairs")."""
    import training.dpo.opa.main as opa
    from training.dpo.opa.expert import parse_report

    answer = json.dumps({"0": {"copied_content": "A blue circle.", "score": 4, "error_type": "correct",
                               "rewritten_content": "A blue circle."},
                         "Added": {"rewritten_content": "There are three crosses."}})

    class Expert:
        def review(self, response, **_):
            return parse_report(answer)

    monkeypatch.setattr(opa, "make_expert", lambda a, work: Expert())
    out = tmp_path / "opa"
    _write_rollouts(out / "work", ["A blue circle."])
    opa.main(_opa_main_args(world, out, "--step", "correct", "--only_corrected"))
    pairs = json.loads((out / "work" / "opa_pairs.json").read_text())
    assert [p["revised"] for p in pairs] == ["A blue circle. There are three crosses."]


def test_a_stage_whose_data_changed_is_made_again(world, tmp_path, monkeypatch):
    """The SFT and DPO steps were skipped whenever their folder held a model: after the correct step made other pairs
    (new rollouts, another expert) the run ended on the models of the old pairs without a word."""
    import training.dpo.opa.main as opa
    from test_dpo_opa import _record_steps

    calls = _record_steps(opa, monkeypatch)
    out = tmp_path / "opa"

    def stages(*extra):
        calls.clear()
        opa.main(_opa_main_args(world, out, *extra))
        return [c for c in calls if c[0].startswith("run_")]

    work = out / "work"
    work.mkdir(parents=True)
    for name in ("opa_sft.json", "opa_pairs.json"):
        (work / name).write_text("[1]")
    assert stages() == [("run_sft.sh", True), ("run_dpo_training.sh", True)]
    (work / "opa_sft").mkdir()
    for f in (work / "opa_sft" / "model.safetensors", out / "model.safetensors"):  # both stages finished
        f.write_text("{}")
    assert stages() == []  # their data as before: kept
    for name in ("opa_sft.json", "opa_pairs.json"):
        (work / name).write_text("[2]")  # the correct step made other pairs
    assert stages() == [("run_sft.sh", False), ("run_dpo_training.sh", False)]  # made again, from the start
    assert stages() == []
    assert stages("--dpo_args", "--beta 0.2") == [("run_dpo_training.sh", False)]
    monkeypatch.setattr(opa, "DPO_EPOCHS", opa.DPO_EPOCHS + 1)  # the step's default settings, not only --dpo_args
    assert stages("--dpo_args", "--beta 0.2") == [("run_dpo_training.sh", False)]


def test_the_dpo_step_trains_its_epochs_unless_dpo_args_say_otherwise(world, tmp_path, monkeypatch):
    """The OPA-DPO step runs DPO_EPOCHS epochs with SFT_WEIGHT's added SFT term; --dpo_args come after both, so they
    override them (argparse keeps an option's last value)."""
    import training.dpo.opa.main as opa
    from training.config import parse_config
    from training.dpo.main import CONCEPTS

    seen = []
    monkeypatch.setattr(opa, "_stage", lambda script, args, in_process: seen.append(args))
    out = tmp_path / "opa"
    (out / "work").mkdir(parents=True)
    (out / "work" / "opa_pairs.json").write_text("[1]")
    for extra, epochs, sft_weight in (([], opa.DPO_EPOCHS, opa.SFT_WEIGHT),
                                      (["--dpo_args", "--num_train_epochs 1 --sft_weight 0"], 1, 0.0)):
        opa.main(_opa_main_args(world, out, "--step", "dpo", "--force", *extra))
        cfg = parse_config(CONCEPTS, seen[-1])
        assert (cfg["optim"].num_train_epochs, cfg["dpo"].sft_weight) == (epochs, sft_weight)


def test_a_rollout_step_rerun_with_fewer_prompts_pairs_those_alone(world, tiny, tmp_path):
    """--n_prompts 3, then 2: the correct step paired every rollout in the file, the 3 of the first run."""
    from training.dpo.opa.main import main
    out = tmp_path / "opa"
    args = ["--from_checkpoint", str(tiny), "--image_folder", str(world / "images"), "--output_dir", str(out),
            "--data_path", str(world / "preference_train.json"), "--max_new_tokens", "4", "--no-progress"]
    main(args + ["--step", "rollout", "--n_prompts", "3"])
    for n in ("2", "3"):
        main(args + ["--step", "rollout", "--n_prompts", n])
        main(args + ["--step", "correct", "--n_prompts", n])
        pairs = json.loads((out / "work" / "opa_pairs.json").read_text())
        assert len(pairs) == int(n) and len((out / "work" / "rollouts.jsonl").read_text().splitlines()) == 3


def test_an_image_the_chat_expert_cannot_open_names_its_rollout(world, tmp_path, monkeypatch):
    """The chat expert's image was opened outside the step's bad-row handling: a missing one stopped the step with a
    bare 'file not found' naming no rollout, and --skip_bad_rows did not skip it."""
    import training.dpo.opa.main as opa
    from training.dpo.opa.expert import GroundTruthReviser

    monkeypatch.setattr(opa, "make_expert", lambda a, work: GroundTruthReviser())
    out = tmp_path / "opa"
    _write_rollouts(out / "work", [GT, "A red star."])  # x.png: not in the world's images
    path = out / "work" / "rollouts.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0].replace('"x.png"', '"pref00000.png"') + "\n" + lines[1] + "\n")
    _refused_then_skipped(world, out, r"rollouts.jsonl: rollout p#1: file not found", ["p#0"], "--expert", "chat",
                          "--expert_url", "http://127.0.0.1:9/v1")


def test_an_empty_report_is_no_review(world, tmp_path, monkeypatch):
    """An answer whose first JSON list was "[]" (prose before the report) read as a report of no sentences: stored as
    valid, it made no pairs and was never asked again. The report after it is read; an answer of "[]" alone for a
    rollout with text is that rollout's bad row."""
    import training.dpo.opa.main as opa
    from training.dpo.opa.expert import parse_report

    ok = [{"copied_content": "A red star.", "score": 1, "error_type": "image_recognition_error",
           "rewritten_content": "A blue circle."}]
    assert parse_report(f"No sentences [] are dropped. Report: {json.dumps(ok)}")[0]["score"] == 1

    class Expert:
        def review(self, response, **_):
            return parse_report("[]" if response == GT else json.dumps(ok))

    monkeypatch.setattr(opa, "make_expert", lambda a, work: Expert())
    out = tmp_path / "opa"
    _write_rollouts(out / "work", [GT, "A red star."])
    _refused_then_skipped(world, out, r"rollout p#0: expert answer reviews no sentence of the rollout", ["p#1"])


def test_a_rollout_step_resumed_after_a_skipped_row_samples_as_an_uninterrupted_one(world, tiny, tmp_path):
    """The rollout step seeded each batch by the rollouts already written: a run stopped after a batch holding a
    skipped bad row (too long a prompt) resumed with that row again at the head of its batches, so every later
    prompt was sampled in another batch under another seed than an uninterrupted run samples it."""
    from training.dpo.opa.main import main
    rows = json.loads((world / "preference_train.json").read_text())[:6]
    rows[1]["conversations"][0]["value"] = "<image>\n" + "Describe the image in great detail. " * 20
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    args = ["--step", "rollout", "--from_checkpoint", str(tiny), "--data_path", str(data), "--image_folder",
            str(world / "images"), "--max_new_tokens", "8", "--rollout_batch_size", "2", "--max_seq_len", "120",
            "--skip_bad_rows", "--no-progress"]
    main(args + ["--output_dir", str(tmp_path / "whole"), "--n_prompts", "6"])
    main(args + ["--output_dir", str(tmp_path / "resumed"), "--n_prompts", "2"])  # as if stopped after a batch
    main(args + ["--output_dir", str(tmp_path / "resumed"), "--n_prompts", "6"])

    def rollouts(name):
        lines = (tmp_path / name / "work" / "rollouts.jsonl").read_text().splitlines()
        return {r["key"]: r["rollout"] for r in map(json.loads, lines)}
    whole = rollouts("whole")
    assert len(whole) == 5 and "pref00001#1" not in whole
    assert rollouts("resumed") == whole


def test_a_correct_step_killed_as_it_writes_the_pairs_leaves_the_last_ones_whole(world, tmp_path, monkeypatch):
    """opa_pairs.json and opa_sft.json were written in place: a kill part-way left half a file that a later --step sft
    or dpo alone read. Killed here before a whole new file is renamed into place, the last pairs stay as they were."""
    import os

    from training.dpo.opa.main import main
    out = tmp_path / "opa"
    _write_rollouts(out / "work", ["A red star.", GT])
    main(_opa_main_args(world, out, "--step", "correct", "--only_corrected"))
    pairs = out / "work" / "opa_pairs.json"
    before = pairs.read_text()

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", killed)
    try:
        main(_opa_main_args(world, out, "--step", "correct"))  # would pair both rollouts
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert pairs.read_text() == before and len(json.loads(before)) == 1
