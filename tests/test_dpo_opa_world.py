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
