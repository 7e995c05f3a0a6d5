"""The captions file (--captions_file, LLaVA-RLHF's image_to_caption.json) a stage cannot open is refused as a data
file it cannot open is, naming it."""
import pytest

from training.data.formats import read_captions
from training.data.readers import DataFormatError


@pytest.mark.parametrize("name", ["no_such.json", "a_folder"])
def test_a_captions_file_that_cannot_be_opened_is_named(tmp_path, name):
    """A missing captions file stopped the reward model's or PPO's training, after its model was loaded, on a bare
    FileNotFoundError traceback (a folder: IsADirectoryError); a missing data file was a DataFormatError."""
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(DataFormatError, match=rf"{name}: not a JSON file of captions \(\[Errno"):
        read_captions(str(tmp_path / name))
