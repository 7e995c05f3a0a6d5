"""Options a user can mistype, refused as the command line is read (before any model loads), naming the option."""
import re

import pytest

from training.config import parse_config
from training.dpo.main import CONCEPTS as DPO
from training.sft.main import CONCEPTS as SFT


def refused(concepts, argv: list[str], said: str) -> None:
    with pytest.raises(SystemExit, match=re.escape(said)):
        parse_config(concepts, argv)


@pytest.mark.parametrize("flag", ["per_device_train_batch_size", "per_device_eval_batch_size",
                                  "gradient_accumulation_steps"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_batch_sizes_below_one_are_refused(flag, value):
    """0 stopped SFT, the reward model and DPO on a division by zero after the model had loaded (the eval batch
    size at the first evaluation, DPO's reference pass)."""
    refused(SFT, [f"--{flag}", value], f"--{flag} {value}: give N >= 1")


@pytest.mark.parametrize("argv, said", [(["--num_warmup_steps", "-3"], "--num_warmup_steps -3: give N >= 0"),
                                        (["--warmup_ratio", "-0.5"], "--warmup_ratio -0.5: give a share in [0, 1]"),
                                        (["--warmup_ratio", "3"], "--warmup_ratio 3.0: give a share in [0, 1]")])
def test_warm_up_outside_its_range_is_refused(argv, said):
    """A negative --warmup_ratio ran without warm-up, a negative --num_warmup_steps started the cosine part way down,
    a ratio above 1 never reached the peak learning rate: all without a word (transformers refuses them)."""
    refused(SFT, ["--lr_scheduler_type", "cosine", *argv], said)


@pytest.mark.parametrize("flag", ["learning_rate", "weight_decay", "max_grad_norm"])
def test_negative_optimizer_settings_are_refused(flag):
    """A negative --weight_decay grew the weights and a negative --max_grad_norm turned clipping off (DeepSpeed clips
    above 0 only), without a word; a negative --learning_rate stopped on torch's 'Invalid learning rate' after the
    model had loaded."""
    refused(SFT, [f"--{flag}", "-1"], f"--{flag} -1.0: give a value >= 0")


@pytest.mark.parametrize("argv, said", [(["--lora_r", "-1"], "--lora_r -1: give a rank >= 1, or 0"),
                                        (["--lora_r", "4", "--lora_alpha", "0"], "--lora_alpha 0: give alpha > 0"),
                                        (["--lora_r", "4", "--lora_dropout", "-0.1"], "--lora_dropout -0.1: give"),
                                        (["--lora_r", "4", "--lora_dropout", "1.5"], "--lora_dropout 1.5: give")])
def test_lora_settings_that_cannot_train_are_refused(argv, said):
    """A negative --lora_r trained the whole model instead of adapters; --lora_alpha 0 scaled the adapters to 0 (no
    gradient reaches them); a negative --lora_dropout was none; one above 1 stopped in torch after the model loaded."""
    refused(SFT, argv, said)


def test_a_negative_reward_centering_coefficient_is_refused():
    """A negative --center_coef paid the reward model for moving its rewards' mean away from 0, without a word."""
    from training.rm.main import CONCEPTS as RM
    refused(RM, ["--center_coef", "-0.001"], "--center_coef -0.001: give a value >= 0")


@pytest.mark.parametrize("argv, said", [(["--n_prompts", "-1"], "--n_prompts -1: give N >= 1"),
                                        (["--n_prompts", "0"], "--n_prompts 0: give N >= 1"),
                                        (["--rollout_batch_size", "0"], "--rollout_batch_size 0: give N >= 1"),
                                        (["--max_new_tokens", "0"], "--max_new_tokens 0: give N >= 1"),
                                        (["--max_pairs", "-1"], "--max_pairs -1: give N >= 0"),
                                        (["--temperature", "0"], "--temperature 0.0: rollouts sample"),
                                        (["--temperature", "nan"], "--temperature nan: rollouts sample"),
                                        (["--seed", "-1"], "--seed -1: give a seed in [0, 2**32)"),
                                        (["--seed", "100000000000000"], "give a seed in [0, 2**32)")])
def test_opa_dpo_counts_and_temperature_it_cannot_use_are_refused(argv, said):
    """OPA-DPO's own options: a negative --n_prompts used every prompt of the file and a negative --max_pairs kept
    no pairs, without a word; --rollout_batch_size 0 or a temperature of 0 stopped once the model had loaded."""
    from training.dpo.opa.main import parse
    with pytest.raises(SystemExit, match=re.escape(said)):
        parse(argv)


@pytest.mark.parametrize("argv, said", [(["--max_seq_len", "0"], "--max_seq_len 0: give N >= 1"),
                                        (["--max_seq_len", "-5"], "--max_seq_len -5: give N >= 1"),
                                        (["--encoded_cache_mb", "-1"], "--encoded_cache_mb -1: give N >= 0")])
def test_data_sizes_below_their_range_are_refused(argv, said):
    """A --max_seq_len below 1 made every row a bad row (found row by row after the model had loaded; with
    --skip_bad_rows, 'none of the rows makes a batch'); a negative --encoded_cache_mb was read as 0, no cache."""
    refused(DPO, argv, said)


@pytest.mark.parametrize("name", ["/no/such/checkpoint", "./out/sft_typo", "output/runs/sft"])
def test_a_missing_checkpoint_folder_is_named_as_one(name):
    """A mistyped local --from_checkpoint (or --model_path) that no Hub id could be stopped on transformers' "Repo id
    must be in the form 'repo_name' or 'namespace/repo_name'", which did not say the folder was missing."""
    from training.config import ModelArgs
    from training.model.builder import resolve_checkpoint
    with pytest.raises(SystemExit, match=re.escape(f"{name}: no such checkpoint folder")):
        resolve_checkpoint(ModelArgs(from_checkpoint=name))


@pytest.mark.parametrize("seed", ["-1", "100000000000000", str(2**32)])
def test_a_seed_outside_what_the_random_generators_take_is_refused(seed, capsys):
    """--seed 1e14 stopped the first training step on torch's 'Overflow when unpacking long long' (the step's seed
    is seed x 1,000,003 + ...) after the model had loaded, prediction's first batch too; a negative one
    stopped OPA-DPO's image masking in numpy. Seeds are 0 .. 2**32 - 1, as transformers' set_seed takes them."""
    refused(SFT, ["--seed", seed], f"--seed {seed}: give a seed in [0, 2**32)")
    from training.predict.main import parse
    with pytest.raises(SystemExit):
        parse(["--model_path", "m", "--data_path", "q.jsonl", "--do_sample", "--seed", seed])
    assert f"--seed {seed}: give a seed in [0, 2**32)" in capsys.readouterr().err


def test_an_image_folder_that_is_a_file_is_refused(tmp_path):
    """--image_folder naming a file (the data file, say) made every row's image "file not found", row by row, after
    the model had loaded."""
    (tmp_path / "data.json").write_text("[]")
    refused(SFT, ["--image_folder", str(tmp_path / "data.json")], f"--image_folder {tmp_path / 'data.json'}: a file")
    parse_config(SFT, ["--image_folder", str(tmp_path)])  # a folder is read as given


@pytest.mark.parametrize("flag", ["output_dir", "figure_dir"])
@pytest.mark.parametrize("below", ["", "sub"])
def test_an_output_folder_that_is_a_file_is_refused(tmp_path, flag, below):
    """--output_dir naming an existing file (or a folder under one) stopped SFT on FileExistsError from pathlib, deep in
    open_run, after the model had loaded; --figure_dir one stopped the run at its plots, after training."""
    (tmp_path / "notes.txt").write_text("x")
    path = tmp_path / "notes.txt" / below if below else tmp_path / "notes.txt"
    refused(SFT, [f"--{flag}", str(path)], f"--{flag} {path}: {tmp_path / 'notes.txt'} is a file")
    parse_config(SFT, [f"--{flag}", str(tmp_path / "new" / "run")])  # a folder still to make is fine


@pytest.mark.parametrize("argv", [["--learning_rat", "1e-4"], ["--conf", "profile.json"], ["--fig=plots"],
                                  ["--stop_after", "2"]])
def test_an_abbreviated_option_is_refused(argv, capsys):
    """argparse took any unambiguous prefix: --learning_rat trained with it as --learning_rate, and a prefix that
    a later option made ambiguous would have broken a saved command; run_pipeline.sh had to read prefixes as the
    stages did to fingerprint its runs."""
    with pytest.raises(SystemExit) as e:
        parse_config(SFT, argv)
    assert e.value.code == 2 and f"unrecognized arguments: {' '.join(argv)}" in capsys.readouterr().err


def test_every_command_line_parser_refuses_abbreviations():
    """Each argparse parser of the project's commands (stages, predict, eval, benchmarks, tools) is built with
    allow_abbrev=False (a parser without it reads --out as --output_dir)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found, lax = 0, []
    for path in sorted(p for d in ("training", "eval", "benchmarks", "scripts") for p in (root / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(name, "attr", getattr(name, "id", "")) == "ArgumentParser":
                found += 1
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("allow_abbrev"), ast.Constant) and kw["allow_abbrev"].value is False):
                    lax.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found >= 15 and not lax, lax
