"""Downloads through file:// URLs: checksum verification, atomic placement, error messages."""

import hashlib
import io

import pytest

from vggnet.data import DATASETS, fetch, find_fashion_mnist, load_dataset
from vggnet.base.errors import DataError

FM_FILES = list(DATASETS["fashion-mnist"]["files"])


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def mirror(data_env, data_fake_fashion_mnist):
    """A local 'server' directory holding the four Fashion-MNIST files, and their md5s."""
    source = data_env / "mirror"
    data_fake_fashion_mnist(source)
    return source, {name: md5(source / name) for name in FM_FILES}


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


def test_fetch_fashion_mnist_file_url(mirror, data_env):
    source, sums = mirror
    dest = fetch("fashion-mnist", to=data_env / "dest", url=source.as_uri() + "/", progress=False, checksums=sums)
    assert dest == data_env / "dest"
    assert sorted(p.name for p in dest.iterdir()) == sorted(FM_FILES)
    assert all(md5(dest / name) == sums[name] for name in FM_FILES)
    train, test = load_dataset("fashion-mnist", data_dir=dest)
    assert len(train) == 6 and len(test) == 4
    for name in FM_FILES:  # already present and verified: not downloaded again
        (source / name).unlink()
    assert fetch("fashion-mnist", to=dest, url=source.as_uri(), progress=False, checksums=sums) == dest


def test_default_destination_is_found_by_the_loader(mirror, data_env, monkeypatch):
    source, sums = mirror
    monkeypatch.setenv("VGGNET_DATA", str(data_env / "vdata"))
    dest = fetch("fashion-mnist", url=source.as_uri(), progress=False, checksums=sums)
    assert dest == data_env / "vdata" / "fashion-mnist"
    assert find_fashion_mnist() == dest
    monkeypatch.delenv("VGGNET_DATA")
    dest = fetch("fashion-mnist", url=source.as_uri(), progress=False, checksums=sums)
    assert dest == data_env / "xdg-cache" / "vggnet" / "data" / "fashion-mnist"
    assert find_fashion_mnist() == dest


def test_checksum_mismatch_leaves_nothing(mirror, data_env):
    source, sums = mirror
    wrong = {**sums, "t10k-images-idx3-ubyte.gz": "0" * 32}
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: md5 [0-9a-f]{32} does not match the published "
                                        "0{32}"):
        fetch("fashion-mnist", to=data_env / "dest", url=source.as_uri(), progress=False, checksums=wrong)
    assert not (data_env / "dest" / "t10k-images-idx3-ubyte.gz").exists()
    assert leftovers(data_env / "dest") == []


def test_published_checksums_are_used_by_default(mirror, data_env):
    source, _ = mirror  # fake files cannot match the real Fashion-MNIST md5s
    with pytest.raises(DataError, match="8d4fb7e6c68d591d4c3dfef9ec88bf0d"):
        fetch("fashion-mnist", to=data_env / "dest", url=source.as_uri(), progress=False)
    assert not (data_env / "dest" / "train-images-idx3-ubyte.gz").exists()


def test_missing_url(data_env):
    url = (data_env / "nowhere").as_uri()
    with pytest.raises(DataError, match=rf"{url}/train-images-idx3-ubyte\.gz: download failed"):
        fetch("fashion-mnist", to=data_env / "dest", url=url, progress=False)
    assert leftovers(data_env / "dest") == []


def test_truncated_download(data_env, monkeypatch):
    class ShortResponse(io.BytesIO):
        headers = {"Content-Length": "100"}

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: ShortResponse(b"x" * 60))
    with pytest.raises(DataError, match="download truncated, got 60 of 100 bytes"):
        fetch("cifar10", to=data_env / "dest", progress=False)
    assert list((data_env / "dest").iterdir()) == []


def test_cifar_archive_url(data_env, monkeypatch):
    archive = data_env / "some-mirror-name.tar.gz"
    archive.write_bytes(b"pretend archive")
    monkeypatch.setitem(DATASETS["cifar10"], "files", {"cifar-10-python.tar.gz": md5(archive)})
    dest = fetch("cifar-10", to=data_env / "dest", url=archive.as_uri(), progress=False)
    assert (dest / "cifar-10-python.tar.gz").read_bytes() == b"pretend archive"


def test_unknown_dataset(data_env):
    with pytest.raises(DataError, match="unknown dataset 'imagenet'; known: fashion-mnist, cifar10, cifar100"):
        fetch("imagenet", to=data_env)
