"""training/engine/checkpoints.py rotate_checkpoints: which resumable checkpoints a save keeps (save_total_limit)."""
import pytest

from training.engine.checkpoints import rotate_checkpoints


def _root(tmp_path, steps, files=()):
    root = tmp_path / "ck"
    for k in steps:
        (root / f"step{k}").mkdir(parents=True)
    for name in files:
        (root / name).write_text("x")
    return root


def _left(root):
    return sorted(p.name for p in root.iterdir())


def test_the_newest_are_kept_by_step_number_not_by_name(tmp_path):
    """step9 < step10 < step11: keeping 2 after step 11 keeps step10 and step11 (by name, "step9" sorts last and
    step10 / step11 were deleted)."""
    root = _root(tmp_path, (1, 2, 9, 10, 11))
    rotate_checkpoints(root, 11, 2)
    assert _left(root) == ["step10", "step11"]


@pytest.mark.parametrize("keep", [0, -1])
def test_a_limit_of_zero_or_less_keeps_every_one_up_to_the_step(tmp_path, keep):
    """save_total_limit 0 or less keeps every checkpoint (as transformers), but never one after the step saved."""
    root = _root(tmp_path, (1, 2, 9, 10, 11))
    rotate_checkpoints(root, 9, keep)
    assert _left(root) == ["step1", "step2", "step9"]


def test_only_checkpoint_folders_count(tmp_path):
    """A file named like a step (and `latest`) takes no place among the kept checkpoints and stays."""
    root = _root(tmp_path, (1, 3), files=("step2", "latest"))
    (root / "stepx").mkdir()
    rotate_checkpoints(root, 3, 2)
    assert _left(root) == ["latest", "step1", "step2", "step3", "stepx"]
