"""ODIN (--length_head): the reward model's second head, trained on the tiny VLM, saved, reloaded, left out of
everything that reads the reward afterwards; the held-out reward-length correlation of every reward model."""
import json

import pytest
import torch
from safetensors.torch import load_file
from test_rm import _scores, rm_args

from training.losses import pearson
from training.rm.main import main
from training.rm.model import load_reward_model

ODIN = ("--length_head", "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
        "--eval_steps", "0")


@pytest.fixture(scope="module")
def odin(world, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("odin") / "rm"
    return out, main(rm_args(world, tiny, out, *ODIN))


def _held_out_lengths(world, tiny):
    from transformers import AutoTokenizer

    from training.data.formats import read_preferences
    tok = AutoTokenizer.from_pretrained(str(tiny))
    recs = read_preferences([str(world / "preference_heldout.json")], str(world / "images"))
    return torch.tensor([float(len(tok(x, add_special_tokens=False)["input_ids"])) for r in recs for x in r.responses])


def test_odin_saves_both_heads_and_everything_after_reads_the_quality_head(odin, world, tiny):
    out, result = odin
    info = json.loads((out / "reward_model.json").read_text())
    assert info["length_head_file"] == "length_head.safetensors" and (out / "length_head.safetensors").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("odin_loss" in r for r in rows if "loss" in r)
    rm, processor, arch = load_reward_model(out)
    assert rm.length_head is None  # PPO, its critic and best-of-n read the quality head alone
    scores = _scores(rm, processor, arch, world)
    # the held-out evaluation scored with the quality head too (not the sum the ranking loss saw)
    saved = torch.tensor(json.loads((out / "eval_rewards.json").read_text())["ranked_rewards"], dtype=torch.float64)
    torch.testing.assert_close(scores.double(), saved.flatten(), rtol=0, atol=1e-5)
    both, _, _ = load_reward_model(out, length_head=True)
    torch.testing.assert_close(both.length_head.weight.float(), load_file(str(out / "length_head.safetensors"))["weight"])
    # the reward's correlation with length, as held-out responses' token counts give it
    assert result["eval"]["eval/length_corr"] == pytest.approx(float(pearson(scores, _held_out_lengths(world, tiny))),
                                                               abs=1e-5)


def test_odin_terms_reach_both_heads(world, tiny, tmp_path):
    """One SGD step from the same start: with the ODIN terms weighed 0 the length head still trains (the ranking
    loss reads the sum of both heads), and the quality head moves otherwise than with them."""
    common = ("--length_head", "--max_steps", "1", "--optimizer", "sgd", "--learning_rate", "0.5",
              "--per_device_train_batch_size", "4", "--eval_data_path", "", "--center_coef", "0")
    main(rm_args(world, tiny, tmp_path / "odin", *common))
    main(rm_args(world, tiny, tmp_path / "off", *common, "--length_coef", "0", "--orthogonal_coef", "0"))
    main(rm_args(world, tiny, tmp_path / "still", *common[:-4], "--learning_rate", "0", *common[-4:]))
    heads = {k: {f: load_file(str(tmp_path / k / f"{f}.safetensors")) for f in ("value_head", "length_head")}
             for k in ("odin", "off", "still")}
    assert not torch.allclose(heads["off"]["length_head"]["weight"], heads["still"]["length_head"]["weight"])
    assert not torch.allclose(heads["odin"]["value_head"]["weight"], heads["off"]["value_head"]["weight"], atol=1e-6)
    logged = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["odin_loss"] == 0.0


def test_more_odin_training_starts_from_both_heads(odin, world, tiny, tmp_path):
    """--from_checkpoint naming an ODIN reward model with --length_head: both trained heads carry on (learning rate 0:
    the saved heads are the checkpoint's)."""
    out, _ = odin
    main(rm_args(world, tiny, tmp_path / "more", "--from_checkpoint", str(out), "--length_head", "--max_steps", "1",
                 "--optimizer", "sgd", "--learning_rate", "0", "--per_device_train_batch_size", "4",
                 "--eval_data_path", ""))
    for f in ("value_head", "length_head"):
        before, after = (load_file(str(p / f"{f}.safetensors")) for p in (out, tmp_path / "more"))
        for k in before:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=f"{f}.{k}")


def test_odin_at_zero3_equals_zero_stage_0(world, tiny, tmp_path):
    """The ODIN terms read both heads' weights in the reward model's forward, where ZeRO-3 gathers them: read
    outside it they are empty placeholders, and their dot product 0 without an error. The first step's ODIN loss at
    stage 3 equals stage 0's (the heads' initial dot product is about 0.1 on the tiny model), and the saved heads
    are whole."""
    logged = {}
    for stage in ("0", "3"):
        main(rm_args(world, tiny, tmp_path / stage, *ODIN[:-2], "--eval_data_path", "", "--zero_stage", stage))
        logged[stage] = [json.loads(x) for x in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
    assert logged["3"][0]["odin_loss"] == pytest.approx(logged["0"][0]["odin_loss"], abs=1e-5)
    for f in ("value_head", "length_head"):
        a, b = (load_file(str(tmp_path / stage / f"{f}.safetensors"))["weight"] for stage in ("0", "3"))
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4, msg=f)


@pytest.mark.parametrize("flag", ["--length_coef", "--orthogonal_coef"])
def test_negative_odin_weights_are_refused(world, tiny, tmp_path, flag):
    with pytest.raises(SystemExit, match=f"{flag} -1.0"):
        main(rm_args(world, tiny, tmp_path / "rm", "--length_head", flag, "-1"))
