"""Row parsers of training/data/sft_formats.py and preference_formats.py, beyond tests/test_data_formats.py."""
import json

import pytest

from training.data.bad_rows import BadRowError
from training.data.formats import read_preferences


def _json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.mark.parametrize("margin", [True, False])
def test_a_trl_margin_of_true_or_false_is_a_bad_row(tmp_path, margin):
    """bool is a number to Python (True == 1): a margin column of booleans went into the loss as 1.0 and 0.0."""
    row = {"images": [], "prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b",
           "margin": margin}
    with pytest.raises(BadRowError, match="row 0: field 'margin': expected a finite number, got " + str(margin)):
        read_preferences(_json(tmp_path / "p.json", [row]), None)
    assert read_preferences(_json(tmp_path / "q.json", [dict(row, margin=0.5)]), None)[0].margin == 0.5


def test_a_prompt_rows_ranked_last_turn_gives_its_best_response_as_the_reference(tmp_path):
    """PPO prompts read from preference data: the gpt turn's ranked list [best, ..., worst] gives its best."""
    from training.data.formats import read_prompts
    turns = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": ["best", "middle", "worst"]}]
    (p,) = read_prompts(_json(tmp_path / "p.json", [{"id": "a", "conversations": turns}]), None)
    assert p.reference == "best" and [(m.role, m.content) for m in p.prompt] == [("user", "Q?")]
    blank = [turns[0], {"from": "gpt", "value": " \n"}]  # a blank reference is none
    assert read_prompts(_json(tmp_path / "b.json", [{"id": "b", "conversations": blank}]), None)[0].reference is None


def test_a_questions_id_is_its_question_id_before_its_id_and_its_facts_are_not_meta(tmp_path):
    """A benchmark row holding both question_id and id (AMBER's id beside a converted file's question_id) is keyed by
    its question_id, which its answers are written under; its facts are facts, every other field meta."""
    from training.data.formats import read_prompts
    row = {"question_id": 7, "id": "amber-3", "text": "Q?", "facts": ["A dog."], "category": "detail"}
    (p,) = read_prompts(_json(tmp_path / "q.json", [row]), None)
    assert (p.id, p.facts, p.meta) == ("7", ["A dog."], {"question_id": 7, "id": "amber-3", "category": "detail"})
