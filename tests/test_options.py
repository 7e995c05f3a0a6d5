"""Options a user can mistype, refused as the command line is read (before any model loads), naming the option."""
import pytest

from training.config import parse_config
from training.sft.main import CONCEPTS as SFT


def refused(concepts, argv: list[str], said: str) -> None:
    with pytest.raises(SystemExit, match=said.replace(".", r"\.")):
        parse_config(concepts, argv)


@pytest.mark.parametrize("flag", ["per_device_train_batch_size", "per_device_eval_batch_size",
                                  "gradient_accumulation_steps"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_batch_sizes_below_one_are_refused(flag, value):
    """0 stopped SFT, the reward model and DPO on a division by zero after the model had loaded (the eval batch
    size at the first evaluation, DPO's reference pass)."""
    refused(SFT, [f"--{flag}", value], f"--{flag} {value}: give N >= 1")
