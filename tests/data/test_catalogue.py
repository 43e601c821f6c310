"""The dataset catalogue."""

from vggnet.data import DATASETS


def test_catalogue_metadata():
    assert DATASETS["cifar10"]["files"] == {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
    assert DATASETS["cifar100"]["files"] == {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}
    assert len(DATASETS["cifar100"]["classes"]) == len(set(DATASETS["cifar100"]["classes"])) == 100
    assert DATASETS["fashion-mnist"]["classes"][6] == "Shirt"
    for info in DATASETS.values():
        assert all(len(md5) == 32 for md5 in info["files"].values())
        assert info["channels"] in (1, 3) and info["size"] in (28, 32)
