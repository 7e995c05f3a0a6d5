"""A new user's mistakes at the stage scripts, refused with a message naming the option before any model loads."""
import re
import shutil

import pytest

from sft_helpers import ppo_args


def no_model_loads(monkeypatch):
    """Fails the test if a stage gets as far as loading a model."""
    import training.model.builder as builder
    import training.rm.model as rm_model

    def loads(*a, **k):
        raise AssertionError("a model was loaded before the mistake was refused")
    monkeypatch.setattr(builder, "load_model_and_processor", loads)
    monkeypatch.setattr(rm_model, "load_reward_model", loads)


def fake_reward_model(tiny, folder):
    """The tiny VLM's files with a reward model's record: what run_rm_training.sh's output looks like to a check."""
    shutil.copytree(tiny, folder)
    (folder / "reward_model.json").write_text('{"kind": "reward_model", "factual": true}')
    return folder


def test_ppo_refuses_an_actor_given_as_the_reward_model(world, tiny, tmp_path, monkeypatch):
    """--reward_model naming the SFT actor stopped on a FileNotFoundError traceback from load_reward_model, after the
    actor and its reference had loaded."""
    from training.ppo.main import main
    no_model_loads(monkeypatch)
    with pytest.raises(SystemExit, match=re.escape(f"--reward_model {tiny}: not a reward model")):
        main(ppo_args(world, tiny, tiny, tmp_path / "out", "--max_steps", "1"))


@pytest.mark.parametrize("flag", ["from_checkpoint", "reference_model"])
def test_ppo_refuses_a_reward_model_as_its_actor_or_reference(world, tiny, tmp_path, monkeypatch, flag):
    """A reward model's folder (run_rm_training.sh's output: its backbone's weights beside reward_model.json) loads as
    an ordinary VLM: given as PPO's actor (or its reference) it trained, without a word, from the reward model's
    backbone instead of the SFT model."""
    from training.ppo.main import main
    rm = fake_reward_model(tiny, tmp_path / "rm")
    argv = ppo_args(world, tiny, rm, tmp_path / "out", "--max_steps", "1")
    argv += [f"--{flag}", str(rm)]
    no_model_loads(monkeypatch)
    with pytest.raises(SystemExit, match=re.escape(f"--{flag} {rm}: a reward model")):
        main(argv)


def test_dpo_refuses_a_reward_model_as_its_policy(world, tiny, tmp_path, monkeypatch):
    """The same for DPO's --from_checkpoint: it trained the reward model's backbone as the policy."""
    from training.dpo.main import main
    rm = fake_reward_model(tiny, tmp_path / "rm")
    no_model_loads(monkeypatch)
    with pytest.raises(SystemExit, match=re.escape(f"--from_checkpoint {rm}: a reward model")):
        main(["--from_checkpoint", str(rm), "--data_path", str(world / "preference_train.json"), "--image_folder",
              str(world / "images"), "--output_dir", str(tmp_path / "out"), "--no-progress", "--max_steps", "1",
              "--figure_dir", str(tmp_path / "fig")])


@pytest.mark.parametrize("keep, said", [(("config.json", "tokenizer.json"), "no weights (*.safetensors)"),
                                        (("config.json", "value_head.safetensors"), "no weights (*.safetensors)"),
                                        (("run_config.json",), "no config.json")])
def test_a_checkpoint_folder_without_a_model_is_named_as_such(tiny, tmp_path, keep, said):
    """A --from_checkpoint folder with a config and no weights (a copy left half done), or no model at all (an
    interrupted run's output, its run_config.json and checkpoints/ only), stopped on an OSError traceback from deep in
    transformers' from_pretrained."""
    from training.config import ModelArgs
    from training.model.builder import resolve_checkpoint
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in keep:
        (folder / name).write_text((tiny / name).read_text() if (tiny / name).exists() else "{}")
    with pytest.raises(SystemExit, match=re.escape(f"{folder}: {said}")):
        resolve_checkpoint(ModelArgs(from_checkpoint=str(folder)))
    assert resolve_checkpoint(ModelArgs(from_checkpoint=str(tiny))) == str(tiny)  # a whole one is as given


def test_a_data_file_smaller_than_one_step_names_the_options_to_lower(world, tiny, tmp_path):
    """A one-row data file (16 rows per step by default) stopped SFT on a ValueError traceback ('1 samples are fewer
    than one optimizer step (16 x 1 x 1 ranks)') that named no option."""
    import json

    from sft_helpers import sft_args
    from training.sft.main import main
    rows = json.loads((world / "sft_train.json").read_text())
    (tmp_path / "one.json").write_text(json.dumps(rows[:1]))
    argv = sft_args(world, tiny, tmp_path / "out")
    argv[argv.index("--data_path") + 1] = str(tmp_path / "one.json")
    with pytest.raises(SystemExit, match=re.escape("1 samples are fewer than one optimizer step: "
                                                   "--per_device_train_batch_size 16 x --gradient_accumulation_steps 1"
                                                   " x 1 rank(s)")):
        main(argv)


def test_a_data_error_is_its_message_without_a_traceback(world, tiny, tmp_path):
    """A data file's error (DataFormatError, BadRowError) printed a Python traceback through the stage's internals
    before its message, unlike the stages' own refusals (SystemExit)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from sft_helpers import free_port, sft_args
    bad = tmp_path / "bad.json"
    bad.write_text('[{"foo": 1}]')
    argv = sft_args(world, tiny, tmp_path / "out")
    argv[argv.index("--data_path") + 1] = str(bad)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(root), "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-m", "training.sft.main", *argv], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"error: {bad}: row 0 has fields ['foo'], which match no known SFT format" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_predict_refuses_a_reward_model_that_is_none(tiny, tmp_path):
    """run_predict.sh --reward_model naming the SFT model stopped on a FileNotFoundError traceback once the policy
    had loaded."""
    from training.predict.main import parse
    said = f"--reward_model {tiny}: not a reward model (no reward_model.json)"
    with pytest.raises(SystemExit, match=re.escape(said)):
        parse(["--model_path", str(tiny), "--data_path", str(tmp_path / "q.jsonl"), "--best_of_n", "2",
               "--reward_model", str(tiny)])


def test_a_world_of_one_takes_a_free_port(tmp_path):
    """A stage run with plain `python -m` took port 29500 + pid % 1000 for its process group's store: a second run
    (or any service) on that port stopped it on EADDRINUSE before anything else (seen in this file's own test)."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent("""
        import os, socket
        held = socket.socket()
        held.bind(("127.0.0.1", 29500 + os.getpid() % 1000))  # the port the pid chose
        held.listen()
        from training.engine.distributed import start_distributed
        start_distributed()
        print("joined on", os.environ["MASTER_PORT"])
    """)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "joined on" in proc.stdout, proc.stderr[-3000:]


def test_a_stage_refuses_to_replace_another_stages_model(world, tiny, tmp_path, monkeypatch):
    """DPO given --output_dir output/sft (the SFT run's folder) removed the SFT model at its start, the one the later
    stages load; another stage's finished folder is refused before any model loads. The same stage's is not."""
    import json

    from dist_dpo_driver import dpo_args
    from training.config import parse_config
    from training.dpo.main import main
    from training.sft.main import CONCEPTS as SFT
    sft_out = tmp_path / "sft"
    shutil.copytree(tiny, sft_out)  # a finished model's weights
    (sft_out / "run_config.json").write_text(json.dumps({k: {} for k in SFT}))
    no_model_loads(monkeypatch)
    with pytest.raises(SystemExit, match=re.escape(f"--output_dir {sft_out}: holds a finished SFT run's model")):
        main(dpo_args(world, tiny, sft_out, "--max_steps", "1"))
    assert (sft_out / "model.safetensors").is_file()
    parse_config(SFT, ["--output_dir", str(sft_out)])  # SFT again there: it replaces its own model, as before
