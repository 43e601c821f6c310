"""Small hostile inputs end as one-line vggnet errors, not crashes (issue 14): absurd JSON in a run's files, a
device index of 20 digits, ``~user`` paths of users that do not exist, non-UTF-8 file names."""

import pytest

from vggnet.data import load_dataset
from vggnet.data.folder import _hash
from vggnet.base.errors import CheckpointError, ConfigError, DataError
from vggnet.base.files import read_json
from vggnet.runtime import pick_device


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "1" * 5000, "{\"a\": 1", "\xff"])
def test_absurd_json_is_a_corrupt_file(tmp_path, text):
    path = tmp_path / "state.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match="state.json is corrupt"):
        read_json(path)


def test_a_device_index_of_twenty_digits_is_a_config_error():
    with pytest.raises(ConfigError, match="--device must be"):
        pick_device("cuda:" + "9" * 20)


def test_home_of_a_user_that_does_not_exist_is_a_missing_folder(data_env, monkeypatch):
    monkeypatch.setenv("VGGNET_DATA", "~no-such-user-xyz/data")
    with pytest.raises(DataError, match="not found"):
        load_dataset("fashion-mnist")
    with pytest.raises(DataError, match="~no-such-user-xyz"):
        load_dataset("folder:~no-such-user-xyz/images")
    with pytest.raises(DataError, match="~no-such-user-xyz"):
        load_dataset("fashion-mnist", data_dir="~no-such-user-xyz/data")


def test_undecodable_file_names_hash_as_their_bytes():
    name = b"caf\xe9.png".decode("utf-8", "surrogateescape")  # what os.listdir gives for a Latin-1 name
    assert _hash(name) != _hash("caf.png") and len(_hash(name)) == 40
