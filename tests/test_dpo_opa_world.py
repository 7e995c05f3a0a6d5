"""OPA-DPO's default data is the embedded world the other stages use: where --world_dir and --world_seed say."""
import json

import training.world.generate as gen
from training.dpo.opa.main import parse, resolve_paths


def test_the_default_data_is_the_world_of_world_dir_and_world_seed(tmp_path, monkeypatch):
    """run_opa_dpo.sh took no --world_dir / --world_seed: it always made and read data/world with seed 0 (in the
    working folder), whatever world the SFT model it starts from was trained on."""
    small = gen.WorldConfig
    monkeypatch.setattr(gen, "WorldConfig", lambda seed=0: small(seed=seed, n_sft=4, n_pref=2, n_ppo=2, n_heldout=2))
    monkeypatch.chdir(tmp_path)
    a = parse(["--world_dir", str(tmp_path / "w3"), "--world_seed", "3"])
    resolve_paths(a)
    assert (a.data_path, a.image_folder) == (str(tmp_path / "w3" / "preference_train.json"),
                                             str(tmp_path / "w3" / "images"))
    assert json.loads((tmp_path / "w3" / "world.json").read_text())["config"]["seed"] == 3
    assert not (tmp_path / "data").exists()
    a = parse([])  # the other stages' defaults
    assert (a.world_dir, a.world_seed) == ("data/world", 0)


def test_the_sft_and_dpo_steps_get_paths_that_resolve_where_they_run(world, tmp_path, monkeypatch):
    """The SFT and DPO steps run through run_sft.sh / run_dpo_training.sh in the repository's folder, but were given
    the paths as written: `python -m training.dpo.opa.main --output_dir out ...` started from another folder had
    them read the work files from, and write their models into, the repository's out/ (or fail to find them)."""
    import os
    from pathlib import Path

    import training.dpo.opa.main as opa
    calls = []
    monkeypatch.setattr(opa.subprocess, "run", lambda cmd, cwd: calls.append((cmd, cwd)) or
                        type("Done", (), {"returncode": 0})())
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    for step in ("sft", "dpo"):
        opa.main(["--step", step, "--from_checkpoint", "ckpt", "--data_path", str(world / "preference_train.json"),
                  "--image_folder", "imgs", "--output_dir", "out", "--figure_dir", "figs"])
    assert len(calls) == 2
    for cmd, cwd in calls:
        values = {k: v for k, v in zip(cmd, cmd[1:]) if k in ("--from_checkpoint", "--data_path", "--image_folder",
                                                               "--output_dir", "--figure_dir")}
        assert len(values) == 5
        for flag, value in values.items():
            assert str(Path(os.path.join(cwd, value))).startswith(str(tmp_path)), (flag, value, cwd)


def test_rollouts_of_another_world_in_the_same_folder_are_refused(tmp_path, monkeypatch):
    """The rollouts' settings held the data file's path, not what it holds: a world made again in the same folder
    with another --world_seed has rows of the same keys ("pref00000#0") over other scenes, and the first world's
    rollouts were paired with them."""
    import pytest

    from training.dpo.opa.main import rollout_settings
    from training.files import check_settings

    small = gen.WorldConfig
    monkeypatch.setattr(gen, "WorldConfig", lambda seed=0: small(seed=seed, n_sft=4, n_pref=2, n_ppo=2, n_heldout=2))
    monkeypatch.setattr("training.model.fingerprint.model_fingerprint", lambda path: "the same policy")
    out = tmp_path / "rollouts.jsonl"
    settings = rollout_settings(parse(["--world_dir", str(tmp_path / "w")]))
    check_settings(out, {}, settings, ".settings.json")
    check_settings(out, {"pref00000#0": "a rollout"}, rollout_settings(parse(["--world_dir", str(tmp_path / "w")])),
                   ".settings.json")  # the same world: resumed
    with pytest.raises(SystemExit, match="data_sha256"):
        check_settings(out, {"pref00000#0": "a rollout"},
                       rollout_settings(parse(["--world_dir", str(tmp_path / "w"), "--world_seed", "1"])),
                       ".settings.json")
