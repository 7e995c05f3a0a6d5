"""Tests never reach the network: the Hub and datasets run offline; they write nothing into the working folder's
figure/ (a stage run without --figure_dir plots there)."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from sft_helpers import make_world
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from sft_helpers import make_tiny
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session", autouse=True)
def no_plots_in_the_working_folder():
    figure = Path(__file__).parents[1] / "figure"
    before = set(figure.glob("*.png"))
    yield
    added = sorted(p.name for p in set(figure.glob("*.png")) - before)
    assert not added, f"tests wrote {added} into {figure}: pass --figure_dir under tmp_path"
