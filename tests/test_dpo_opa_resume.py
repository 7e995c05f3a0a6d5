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
