"""The hardware profiles in configs/: every key is an argument of the stage they are for, and what the README
says of them holds (the T4 ones fit LLaVA-1.6's image tokens and evaluate in small batches)."""
import importlib
import json
from pathlib import Path

import pytest

from training.config import parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE = {"llava16_7b_qlora_2xT4.json": "sft", "rm_llava16_7b_qlora_2xT4.json": "rm",
         "llava15_7b_full_8xA100.json": "sft"}


def test_every_profile_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.json")) == sorted(STAGE)
    readme = (CONFIGS / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in STAGE)


@pytest.mark.parametrize("name", sorted(STAGE))
def test_a_profile_parses_for_its_stage(name):
    main = importlib.import_module(f"training.{STAGE[name]}.main")
    cfg = parse_config(main.CONCEPTS, ["--config", str(CONFIGS / name)], main.DEFAULTS)
    profile = json.loads((CONFIGS / name).read_text())
    values = {k: v for section in cfg.values() for k, v in vars(section).items()}
    assert all(values[k] == v for k, v in profile.items())
    if "T4" in name:  # LLaVA-1.6 at COCO sizes: ~2,150-2,350 image tokens (configs/README.md)
        assert values["max_seq_len"] >= 4096 and values["precision"] == "fp16" and values["qlora"]
        assert values["per_device_eval_batch_size"] <= 4
