"""Image-folder datasets: layout, decoding, deterministic split, cache (and its decoder version), error reporting."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vggnet.data import decode_image, load_dataset, load_folder
from vggnet.data.folder import cache_dir, plan_split
from vggnet.data.images import DECODER_VERSION
from vggnet.base.errors import DataError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(mode, size, colour):
    return Image.new(mode, size, colour)


def filled(colour, size):
    """The (3, size, size) uint8 tensor of one RGB colour."""
    return torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "images"
    for name in ("cat", "dog", "eel", ".hidden"):
        (root / name).mkdir(parents=True)
    for i, size in enumerate([(40, 30), (30, 40), (64, 48)]):
        solid("RGB", size, RED).save(root / "cat" / f"cat{i}.png")
    for i, size in enumerate([(50, 50), (20, 28), (33, 17)]):
        solid("L", size, 77).save(root / "dog" / f"dog{i}.jpg", quality=95)
    rgba = solid("RGBA", (20, 60), (*BLUE, 255))
    rgba.save(root / "eel" / "eel0.png")
    rgba.convert("P").save(root / "eel" / "eel1.png")  # palette mode
    (root / "eel" / "notes.txt").write_text("not an image, ignored by extension")
    (root / "eel" / ".DS_Store").write_bytes(b"\0junk")
    solid("RGB", (8, 8), GREEN).save(root / ".hidden" / "x.png")  # hidden class folder: ignored
    return root


def test_load_shapes_classes_and_pixels(tree, data_env):
    train, test = load_folder(tree, image_size=16)
    assert train.classes == ["cat", "dog", "eel"] and test.classes == train.classes
    assert train.images.shape == (5, 3, 16, 16) and test.images.shape == (3, 3, 16, 16)
    assert train.images.dtype == torch.uint8 and train.name == "images"
    # at least one test image per class with >= 2 images: round(0.2 * 3) -> 1, round(0.2 * 2) -> 0 -> 1
    assert sorted(test.labels.tolist()) == [0, 1, 2]
    assert sorted(train.labels.tolist()) == [0, 0, 1, 1, 2]
    colours = {0: RED, 2: BLUE}
    for ds in (train, test):
        for image, label in zip(ds.images, ds.labels.tolist()):
            if label == 1:  # grayscale JPEG -> three equal channels, ~77
                assert (image.int() - 77).abs().max() <= 2 and torch.equal(image[0], image[1])
            else:
                assert torch.equal(image, filled(colours[label], 16))


def test_shorter_side_resize_then_centre_crop(tmp_path, data_env):
    root = tmp_path / "crop"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            wide = solid("RGB", (40, 20), BLUE)  # 40x20: the centre 20x20 (columns 10..29) is green
            wide.paste(GREEN, (6, 0, 34, 20))
            wide.save(root / name / f"{i}.png")
    train, _ = load_folder(root, image_size=16, cache=False)
    assert torch.equal(train.images[0], filled(GREEN, 16))


def test_split_deterministic_and_disjoint(tree, data_env):
    classes_a, splits_a = plan_split(tree, 0.2)
    classes_b, splits_b = plan_split(tree, 0.2)
    assert classes_a == classes_b and splits_a == splits_b
    train_files = {rel for rel, _ in splits_a["train"]}
    test_files = {rel for rel, _ in splits_a["test"]}
    assert not train_files & test_files and len(train_files | test_files) == 8
    assert all(not rel.startswith(".hidden") and rel.endswith((".png", ".jpg")) for rel in train_files | test_files)
    first = load_folder(tree, image_size=8, cache=False)
    second = load_folder(tree, image_size=8, cache=False)
    for a, b in zip(first, second):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_cache_hit_and_invalidation(tree, data_env, monkeypatch):
    train, test = load_folder(tree, image_size=12)
    cached = list(cache_dir(tree).glob("folder-12px-*.safetensors"))
    assert len(cached) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr("vggnet.data.folder.Image.open", refuse)
    again_train, again_test = load_dataset(f"folder:{tree}", image_size=12)  # cache hit: nothing decoded
    assert torch.equal(again_train.images, train.images) and torch.equal(again_test.labels, test.labels)
    assert again_train.classes == ["cat", "dog", "eel"]

    stamp = (tree / "cat" / "cat0.png").stat()
    os.utime(tree / "cat" / "cat0.png", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="unreadable"):  # changed file -> new fingerprint -> decodes again
        load_folder(tree, image_size=12)


def old_decoder_cache_name(root, image_size, test_fraction=0.2):
    """The cache file name the loader used before the shared decoder (fingerprint without a decoder version)."""
    _, splits = plan_split(root, test_fraction)
    files = [[split, rel, label, (root / rel).stat().st_size, (root / rel).stat().st_mtime_ns]
             for split in ("train", "test") for rel, label in splits[split]]
    digest = hashlib.sha256(json.dumps([1, image_size, test_fraction, files]).encode("utf-8")).hexdigest()
    return f"folder-{image_size}px-{digest[:20]}.safetensors", splits


def test_cache_of_the_old_decoder_is_not_served(tree, data_env):
    """A cache written by the old decoder (file name and fingerprint without the decoder version) is ignored
    and replaced, even though it matches the files and classes."""
    name, splits = old_decoder_cache_name(tree, 12)
    cache_dir(tree).mkdir(parents=True)
    stale = {f"{split}_{kind}": tensor for split in ("train", "test") for kind, tensor in (
        ("images", torch.full((len(splits[split]), 3, 12, 12), 123, dtype=torch.uint8)),
        ("labels", torch.tensor([label for _, label in splits[split]])))}
    save_file(stale, str(cache_dir(tree) / name), metadata={"classes": json.dumps(["cat", "dog", "eel"])})
    train, test = load_folder(tree, image_size=12)
    assert not (train.images == 123).all() and torch.equal(train.images, load_folder(tree, 12, cache=False)[0].images)
    cached = [p.name for p in cache_dir(tree).glob("*.safetensors")]
    assert cached == [p for p in cached if p.startswith(f"folder-12px-dec{DECODER_VERSION}-")] and len(cached) == 1


def test_cache_is_keyed_by_the_decoder_version(tree, data_env, monkeypatch):
    load_folder(tree, image_size=12)
    (first,) = cache_dir(tree).glob("folder-12px-*.safetensors")
    decoded = []
    monkeypatch.setattr("vggnet.data.folder.DECODER_VERSION", DECODER_VERSION + 1)
    monkeypatch.setattr("vggnet.data.folder.decode_image", lambda *a, **k: decoded.append(a) or decode_image(*a, **k))
    load_folder(tree, image_size=12)
    assert len(decoded) == 8  # another decoder: every image decoded again, not served from the first cache
    (second,) = cache_dir(tree).glob("folder-12px-*.safetensors")
    assert second.name != first.name and f"-dec{DECODER_VERSION + 1}-" in second.name


def test_unreadable_images_reported_by_path(tree, data_env):
    (tree / "cat" / "broken.jpg").write_bytes(b"this is not a jpeg")
    png = (tree / "dog" / "cut.png")
    solid("RGB", (30, 30), RED).save(png)
    png.write_bytes(png.read_bytes()[:60])  # truncated
    with pytest.raises(DataError) as info:
        load_folder(tree, image_size=8)
    message = str(info.value)
    assert "2 unreadable image(s)" in message and "cat/broken.jpg" in message and "dog/cut.png" in message
    assert "\n" not in message
    assert not any(cache_dir(tree).glob("*.safetensors"))  # nothing cached from a failed decode


def test_train_test_subfolders(tmp_path, data_env):
    root = tmp_path / "split"
    for split, n in (("train", 3), ("test", 1)):
        for name, colour in (("b", RED), ("a", GREEN)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                solid("RGB", (10, 10), colour).save(root / split / name / f"{i}.png")
    train, test = load_folder(root, image_size=4)
    assert train.classes == ["a", "b"] and len(train) == 6 and len(test) == 2
    assert sorted(test.labels.tolist()) == [0, 1]
    assert torch.equal(test.images[test.labels == 1][0, :, 0, 0], torch.tensor(RED, dtype=torch.uint8))


@pytest.mark.parametrize("layout, match", [
    ({"only": 2}, r"found 1 class folder\(s\), need at least 2"),
    ({}, r"found 0 class folder\(s\)"),
    ({"a": 2, "b": 0}, r"class folder\(s\) b hold no images"),
    ({"a": 1, "b": 1}, "no test images"),
])
def test_bad_layouts(tmp_path, data_env, layout, match):
    root = tmp_path / "bad"
    root.mkdir()
    for name, n in layout.items():
        (root / name).mkdir()
        for i in range(n):
            solid("RGB", (4, 4), RED).save(root / name / f"{i}.png")
    with pytest.raises(DataError, match=match):
        load_folder(root)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="has no path"):
        load_dataset("folder:")


def test_grayscale_decode_option(tmp_path):
    solid("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "x.png")
    gray = decode_image(tmp_path / "x.png", 8, channels=1)
    rgb = decode_image(tmp_path / "x.png", 8)
    assert gray.shape == (8, 8, 1) and rgb.shape == (8, 8, 3)
    assert np.all(rgb == np.array([10, 200, 30], np.uint8))
