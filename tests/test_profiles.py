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
    if "T4" in name:  # T4s have no bf16; LLaVA-1.6's images must fit with room for the text
        assert values["precision"] == "fp16" and values["qlora"] and values["per_device_eval_batch_size"] <= 4
        assert values["max_seq_len"] - max(LLAVA16_IMAGE_TOKENS.values()) >= 1024


def test_the_reward_model_profile_runs_on_the_users_data_as_its_readme_says(tmp_path):
    """configs/README.md says to add --data_path and --image_folder; the profile's eval_steps then stopped the run
    for want of held-out data (--eval_data_path, which the embedded default fills in but a user's data does not)."""
    from training.defaults import resolve_defaults
    from training.engine.strategy import Strategy
    from training.rm import main

    cfg = parse_config(main.CONCEPTS, ["--config", str(CONFIGS / "rm_llava16_7b_qlora_2xT4.json"), "--data_path",
                                       str(tmp_path / "pairs.json"), "--image_folder", str(tmp_path)], main.DEFAULTS)
    strategy = Strategy(cfg["ds"], cfg["optim"], "fp32")  # (fp16 needs an accelerator that has it)
    resolve_defaults(cfg["model"], cfg["data"], strategy, "preference_train.json")
    main.resolve_eval_steps(cfg["data"], cfg["run"])  # stopped with "--eval_steps: give the held-out data"
    assert cfg["run"].eval_steps == 0


def _llava16_image_tokens(width: int, height: int) -> int:
    """Image tokens of LLaVA-1.6 (any resolution: 336-pixel tiles on its grid pinpoints, CLIP-L/14 patches, the
    class token dropped, a newline per row) for an image of this size, counted by transformers' own processor
    (configured as llava-hf/llava-v1.6-mistral-7b-hf's, built here: nothing is downloaded)."""
    from tokenizers import Tokenizer, models
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor, PreTrainedTokenizerFast

    images = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                     image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                           [336, 1008]])
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1},
                                                                              unk_token="<unk>")))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    proc = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", image_token="<image>")
    return proc._get_number_of_features(height, width, 336, 336)


# COCO's common sizes and a square 336 image; configs/README.md quotes these counts
LLAVA16_IMAGE_TOKENS = {(640, 480): 2340, (640, 427): 2144, (375, 500): 2352, (336, 336): 1176}


def test_llava16_image_token_counts():
    assert {size: _llava16_image_tokens(*size) for size in LLAVA16_IMAGE_TOKENS} == LLAVA16_IMAGE_TOKENS


@pytest.mark.parametrize("key,value,why", [("precision", "float16", "is not one of"), ("zero_stage", 5, "is not one of"),
                                           ("lr_scheduler_type", "polynomial", "is not one of"),
                                           ("qlora", "false", "is not true or false"),
                                           ("learning_rate", "fast", "is not a number"),
                                           ("max_seq_len", 2048.5, "is not an integer")])
def test_a_profile_value_is_checked_as_the_command_line_checks_it(key, value, why, tmp_path):
    """Profile values went in unchecked: "false" (a true string) turned QLoRA on, an unknown scheduler ran as
    linear, "float16" built an fp16 model under an fp32 DeepSpeed config."""
    from training.sft import main
    path = tmp_path / "p.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(SystemExit, match=f"p.json: {key}: .* {why}"):
        parse_config(main.CONCEPTS, ["--config", str(path)], main.DEFAULTS)


def test_profile_values_the_command_line_would_take_pass(tmp_path):
    """Text for a number goes through the option's type as argparse takes it; null for an option unset by default."""
    from training.rm import main
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"learning_rate": "2e-5", "zero_stage": "2", "eval_steps": None}))
    cfg = parse_config(main.CONCEPTS, ["--config", str(path)], main.DEFAULTS)
    assert (cfg["optim"].learning_rate, cfg["ds"].zero_stage, cfg["run"].eval_steps) == (2e-5, 2, None)


@pytest.mark.parametrize("text,why", [('{"learning_rate": 1e-4,}', "Expecting property name"),
                                      ('["learning_rate"]', "not a JSON object"), (None, "No such file")])
def test_a_profile_that_cannot_be_read_is_named(text, why, tmp_path):
    """A trailing comma, a list, a mistyped name: a JSONDecodeError, AttributeError or FileNotFoundError traceback."""
    from training.sft import main
    path = tmp_path / "p.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit, match=f"--config {path}: .*{why}"):
        parse_config(main.CONCEPTS, ["--config", str(path)], main.DEFAULTS)
