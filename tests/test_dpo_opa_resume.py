"""OPA-DPO's work files across reruns: a step resumed after an interrupt, and a step rerun with another option or
input (another data file, another expert) that must not reuse what the first wrote."""
import json


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
    with pytest.raises(SystemExit, match=r"other settings \(data_path differ"):
        main(args + ["--data_path", str(world / "preference_heldout.json")])
    main(args + ["--data_path", str(world / "preference_train.json"), "--n_prompts", "3"])  # the same: resumed
    assert len((out / "work" / "rollouts.jsonl").read_text().splitlines()) == 3
