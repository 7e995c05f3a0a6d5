"""The DeepSpeed configuration a run gets, with and without a user's --deepspeed_config."""
import json

import pytest

from training.config import DeepSpeedArgs, OptimArgs
from training.engine.strategy import Strategy


def _strategy(tmp_path, user: dict | None, precision="fp32", **ds):
    path = ""
    if user is not None:
        path = str(tmp_path / "ds.json")
        (tmp_path / "ds.json").write_text(json.dumps(user))
    return Strategy(DeepSpeedArgs(deepspeed_config=path, **ds), OptimArgs(per_device_train_batch_size=4), precision)


def test_a_user_config_wins_where_it_sets_values_and_ours_fill_the_rest(tmp_path):
    user = {"zero_optimization": {"stage": 2, "overlap_comm": True}, "gradient_clipping": 0.3,
            "communication_data_type": "fp32"}
    s = _strategy(tmp_path, user)
    cfg = s.config()
    assert s.ds.zero_stage == 2  # the run's code (saving, gathering) follows the file's stage
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True} and cfg["gradient_clipping"] == 0.3
    assert cfg["communication_data_type"] == "fp32" and cfg["train_micro_batch_size_per_gpu"] == 4
    plain = _strategy(tmp_path, None).config()
    assert plain["zero_optimization"] == {"stage": 0} and plain["gradient_clipping"] == 1.0


@pytest.mark.parametrize("user, kw, match", [
    ({"zero_optimization": {"stage": 2}}, {"zero_stage": 3}, "ZeRO stage 2, but --zero_stage 3"),
    ({"fp16": {"enabled": True}}, {}, "enables fp16, but --precision is fp32"),
    ({"bf16": {"enabled": True}}, {}, "enables bf16, but --precision is fp32"),
    ({"train_micro_batch_size_per_gpu": 16}, {}, "differs from the run's 4"),
])
def test_a_user_config_contradicting_a_flag_stops(tmp_path, user, kw, match):
    with pytest.raises(SystemExit, match=match):
        _strategy(tmp_path, user, **kw)
