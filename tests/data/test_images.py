"""The shared image decoder: modes, transparency, EXIF, resizing, errors, and the proof that the folder loader
(training) and ``predict_files`` (prediction) give a model exactly the same pixels for the same file."""

import io
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet.data import Preprocess, decode_image, load_folder
from vggnet.data.folder import plan_split
from vggnet.data.images import ImageFileError, decode_bytes, decode_bytes_upright, to_array
from vggnet.base.errors import ConfigError, DataError

ORANGE, BLUE = (200, 100, 50), (10, 20, 250)
# Luminance by hand (ITU-R 601-2, as Pillow's "L" conversion): 0.299 R + 0.587 G + 0.114 B, rounded down.
ORANGE_L, BLUE_L = 124, 43  # 124.2 and 43.23
EXIF_ORIENTATION = 0x0112


def decode(path, channels, size=None):
    """The decoder's result as a (channels, H, W) uint8 tensor, the layout of a batch row."""
    return torch.from_numpy(decode_image(path, size, channels)).permute(2, 0, 1)


def halves(left, right, mode="RGB", size=(28, 28)):
    """An image whose left half is ``left`` and right half ``right``."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def expected_halves(left, right, size=(28, 28)):
    out = torch.full((1, size[1], size[0]), left, dtype=torch.uint8)
    out[:, :, size[0] // 2:] = right
    return out


def pillow_fit(image, size):
    """Independent of the decoder, torchvision's ``Resize(size)`` + ``CenterCrop(size)`` written out: the shorter side
    to ``size`` (the longer one ``int(size * long / short)``, Pillow bilinear), then the centre square, offsets
    rounded half to even as torchvision's ``round``."""
    w, h = image.size
    if min(w, h) != size:
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    w, h = image.size
    left, top = round((w - size) / 2), round((h - size) / 2)
    return np.array(image.crop((left, top, left + size, top + size)))


def exif_jpeg(path, image, orientation):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, exif=exif, quality=95)


@pytest.fixture
def images(image_files):
    return image_files


# ------------------------------------------------------------------------------------------------ modes (no resize)
def test_colour_into_grayscale_and_rgb(images):
    assert torch.equal(decode(images["rgb"], 1), expected_halves(ORANGE_L, BLUE_L))
    rgb = decode(images["rgb"], 3)
    assert rgb.shape == (3, 28, 28) and rgb.dtype == torch.uint8
    assert rgb[:, 0, 0].tolist() == list(ORANGE) and rgb[:, 0, 27].tolist() == list(BLUE)
    assert decode_image(images["large"]).shape == (200, 300, 3)  # no image_size: the file's own size, rows first


def test_other_channel_counts_replicate_the_luminance(images):
    four = decode(images["rgb"], 4)
    assert four.shape == (4, 28, 28)
    assert all(torch.equal(four[c:c + 1], expected_halves(ORANGE_L, BLUE_L)) for c in range(4))


def test_composites_transparency_onto_black(images, tmp_path):
    assert torch.equal(decode(images["rgba"], 1), expected_halves(ORANGE_L, 0))
    assert torch.equal(decode(images["palette"], 1), expected_halves(ORANGE_L, 0))  # palette index 1: clear
    halves((77, 255), (77, 0), "LA").save(tmp_path / "la.png")
    assert torch.equal(decode(tmp_path / "la.png", 1), expected_halves(77, 0))
    gray = decode(tmp_path / "la.png", 3)
    assert gray[:, 0, 0].tolist() == [77, 77, 77] and gray[:, 0, 27].tolist() == [0, 0, 0]
    # RGB and L images with a transparency key (PNG tRNS): the keyed colour is transparent, everything else opaque
    halves(ORANGE, BLUE).save(tmp_path / "keyed.png", transparency=BLUE)
    keyed = decode(tmp_path / "keyed.png", 3)
    assert keyed[:, 0, 0].tolist() == list(ORANGE) and keyed[:, 0, 27].tolist() == [0, 0, 0]
    halves(77, 200, "L").save(tmp_path / "keyed-l.png", transparency=200)
    assert torch.equal(decode(tmp_path / "keyed-l.png", 1), expected_halves(77, 0))
    # every colour of a fully transparent RGBA pixel becomes black, in both layouts
    rgba = np.random.default_rng(1).integers(0, 256, (9, 11, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert not decode_image(tmp_path / "clear.png").any() and not decode_image(tmp_path / "clear.png", 4, 1).any()


def test_partial_alpha_is_blended_over_black(tmp_path):
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (13, 17, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "partial.png")
    expected = rgba[..., :3].astype(np.float64) * rgba[..., 3:].astype(np.float64) / 255  # colour * alpha, over 0
    assert np.abs(decode_image(tmp_path / "partial.png").astype(np.float64) - expected).max() <= 1


def test_exif_orientation_turns_the_image_upright(tmp_path):
    stored = halves(ORANGE, BLUE, size=(40, 24))  # 40 wide, 24 high: orange left, blue right
    exif_jpeg(tmp_path / "rotated.jpg", stored, 6)  # 6: displayed rotated 90 degrees clockwise
    upright = decode_image(tmp_path / "rotated.jpg").astype(int)
    assert upright.shape == (40, 24, 3)  # 24 wide, 40 high
    assert np.abs(upright[:15] - ORANGE).max() <= 8 and np.abs(upright[25:] - BLUE).max() <= 8  # left -> top


# ------------------------------------------------------------------------------------------------ resizing
def test_fit_crops_the_centre_and_keeps_native_sizes(tmp_path):
    image = torch.arange(28 * 42, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, 28, 42)
    Image.fromarray(image[0].numpy()).save(tmp_path / "wide.png")
    Image.fromarray(image[0].T.contiguous().numpy()).save(tmp_path / "tall.png")
    Image.fromarray(image[0, :, :28].contiguous().numpy()).save(tmp_path / "square.png")
    assert torch.equal(decode(tmp_path / "wide.png", 1, 28), image[:, :, 7:35])  # shorter side already 28: crop only
    assert torch.equal(decode(tmp_path / "tall.png", 1, 28), image.transpose(1, 2)[:, 7:35, :])
    assert torch.equal(decode(tmp_path / "square.png", 1, 28), image[:, :, :28])  # native size: unchanged
    for h, w in ((200, 300), (10, 10), (5, 90)):
        Image.new("L", (w, h), 99).save(tmp_path / "flat.png")
        out = decode(tmp_path / "flat.png", 1, 28)
        assert out.shape == (1, 28, 28) and out.dtype == torch.uint8 and bool((out == 99).all())


@pytest.mark.parametrize("name", ["large", "tiny", "jpeg", "rgb"])
@pytest.mark.parametrize("channels", [1, 3])
def test_fit_is_torchvisions_resize_then_centre_crop(images, name, channels):
    """Down- and upscaling, wide and square: exactly the resize-then-crop of torchvision's eval transform."""
    with Image.open(images[name]) as image:
        expected = pillow_fit(image.convert("RGB" if channels == 3 else "L"), 28)
    assert np.array_equal(decode_image(images[name], 28, channels), expected.reshape(28, 28, channels))


# ------------------------------------------------------------------------------------------------ errors
def test_errors_name_the_file(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png: not a readable image"):
        decode_image(tmp_path / "text.png", None, 1)
    with pytest.raises(DataError, match="missing.png: no such file"):
        decode_image(tmp_path / "missing.png", None, 1)
    with pytest.raises(DataError, match="is a directory"):
        decode_image(tmp_path, None, 1)
    halves(ORANGE, BLUE).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    with pytest.raises(ImageFileError, match="cut.png: not a readable image") as info:
        decode_image(tmp_path / "cut.png", 8)
    assert info.value.path == str(tmp_path / "cut.png") and info.value.reason.startswith("not a readable image (")


def test_an_unreadable_file_is_named_as_given_not_by_the_reader_object(tmp_path, monkeypatch):
    """Pillow's "cannot identify image file <_BoundedReads name='imgs/broken.png'>" showed an internal name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageFileError) as info:
        decode_image("imgs/broken.png", 8)
    assert str(info.value) == "imgs/broken.png: not a readable image (not in any image format Pillow reads)"
    assert info.value.path == "imgs/broken.png"


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    Image.new("RGB", (30, 30)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 900 pixels > 2 x 400: Pillow's DecompressionBombError
    with pytest.raises(DataError, match=r"bomb.png: not a readable image \(.*decompression bomb"):
        decode_image(tmp_path / "bomb.png", 8)


# ------------------------------------------------------------------------------------------------ training == predict
S = 16


def awkward_folder(root):
    """Two classes of awkward files: transparency of every kind, EXIF rotation, sizes around S, grayscale."""
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    rgba = rng.integers(0, 256, (23, 37, 4), dtype=np.uint8)
    rgba[:, :10, 3] = 0  # fully transparent strip, partly transparent elsewhere
    Image.fromarray(rgba, "RGBA").save(root / "a" / "rgba.png")
    palette = Image.fromarray(rng.integers(0, 4, (31, 50), dtype=np.uint8), "P")
    palette.putpalette(ORANGE + BLUE + (0, 255, 0) + (255, 255, 255) + (0, 0, 0) * 252)
    palette.save(root / "a" / "palette.png", transparency=2)
    Image.fromarray(rng.integers(0, 256, (29, 13, 2), dtype=np.uint8), "LA").save(root / "a" / "la.png")
    exif_jpeg(root / "a" / "exif6.jpg", Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)), 6)
    exif_jpeg(root / "a" / "exif3.jpg", Image.fromarray(rng.integers(0, 256, (20, 9, 3), dtype=np.uint8)), 3)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(root / "b" / "large.png")
    Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)).save(root / "b" / "small.png")
    Image.fromarray(rng.integers(0, 256, (45, 45), dtype=np.uint8)).save(root / "b" / "gray.png")  # 1 channel
    Image.fromarray(rng.integers(0, 256, (S, S), dtype=np.uint8)).save(root / "b" / "gray.jpg")  # native size
    halves(ORANGE, BLUE, size=(33, 17)).save(root / "b" / "keyed.png", transparency=BLUE)
    halves(ORANGE + (255,), BLUE + (0,), "RGBA", size=(S, S)).save(root / "b" / "clear-right.png")
    return root


def folder_pixels(root):
    """``{relative path: (3, S, S) uint8}`` as the folder loader decodes it for training."""
    train, test = load_folder(root, image_size=S, cache=False)
    _, splits = plan_split(root, 0.2)
    pixels = {}
    for dataset, split in ((train, "train"), (test, "test")):
        assert [rel for rel, _ in splits[split]] and len(splits[split]) == len(dataset)
        pixels.update({rel: image for (rel, _), image in zip(splits[split], dataset.images)})
    return pixels


def predict_pixels(paths, channels, monkeypatch):
    """The uint8 batch ``predict_files`` hands to the model, for a ``channels``-channel model whose input is S."""
    import vggnet.use.predict

    seen = []

    def fake_predict_logits(model, images, preprocess, *args, **kwargs):
        seen.append(images.clone())
        return torch.zeros(len(images), 2)

    monkeypatch.setattr(vggnet.use.predict, "predict_logits", fake_predict_logits)
    model = torch.nn.Identity()
    model.num_classes, model.in_channels = 2, channels
    from vggnet.store.card import LoadedModel, ModelCard

    preprocess = Preprocess(S, (0.5,) * channels, (0.25,) * channels)
    card = ModelCard(model={}, classes=["a", "b"], preprocess=preprocess.to_dict())
    loaded = LoadedModel(model, card, None)
    results = vggnet.use.predict.predict_files(loaded, [str(p) for p in paths], top_k=1)
    assert [r.error for r in results] == [None] * len(paths) and len(seen) == 1
    return seen[0]


def test_training_and_prediction_see_identical_pixels(tmp_path, data_env, monkeypatch):
    root = awkward_folder(tmp_path / "awkward")
    trained = folder_pixels(root)
    assert len(trained) == 11
    rels = sorted(trained)
    predicted = predict_pixels([root / rel for rel in rels], 3, monkeypatch)
    assert predicted.dtype == torch.uint8 and predicted.shape == (11, 3, S, S)
    for rel, image in zip(rels, predicted):
        assert torch.equal(trained[rel], image), rel
    for rel in rels:  # and both are the decoder's own definition
        assert torch.equal(trained[rel], decode(root / rel, 3, S)), rel
    assert torch.equal(trained["b/gray.png"][0], trained["b/gray.png"][1])  # 1-channel file, 3-channel model
    assert torch.equal(trained["b/gray.png"][1], trained["b/gray.png"][2])


def test_transparent_pixels_become_black_in_training_and_prediction(tmp_path, data_env, monkeypatch):
    root = awkward_folder(tmp_path / "awkward")
    trained = folder_pixels(root)
    predicted = predict_pixels([root / "b" / "clear-right.png"], 3, monkeypatch)[0]
    left = torch.tensor(ORANGE, dtype=torch.uint8).view(3, 1, 1).expand(3, S, S // 2)
    for image in (trained["b/clear-right.png"], predicted):
        assert torch.equal(image[:, :, :S // 2], left) and not image[:, :, S // 2:].any()
    assert not decode(root / "a" / "rgba.png", 3)[:, :, :10].any()  # its fully transparent strip, at native size


def test_grayscale_model_predicts_on_the_luminance_of_the_same_decoder(tmp_path, monkeypatch, images):
    paths = [images[k] for k in ("rgb", "rgba", "palette", "large", "tiny", "jpeg")]
    predicted = predict_pixels(paths, 1, monkeypatch)
    assert predicted.shape == (6, 1, S, S)
    for path, image in zip(paths, predicted):
        assert torch.equal(image, decode(path, 1, S))



# ------------------------------------------------------------------------------------------------ bytes in memory
@pytest.mark.parametrize("size", [None, S])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_bytes_in_memory_decode_exactly_as_their_file(tmp_path, size, channels):
    """Every awkward kind of file (transparency, palettes, EXIF rotation, grey, small and large): the same pixels
    from the file's bytes as from the file."""
    root = awkward_folder(tmp_path / "awkward")
    files = sorted(root.rglob("*.*"))
    assert len(files) == 11
    for path in files:
        expected = decode_image(path, size, channels)
        assert np.array_equal(decode_bytes(path.read_bytes(), str(path), size, channels), expected), path
        assert np.array_equal(decode_bytes(memoryview(path.read_bytes()), "x", size, channels), expected)
        if size is None:  # the transforms' entry point: the same upright image, before any resizing
            upright = decode_bytes_upright(path.read_bytes(), "x", channels)
            assert upright.mode == ("RGB" if channels == 3 else "L")
            assert np.array_equal(to_array(upright, channels), expected)


def test_bytes_errors_name_the_sample_in_one_line(tmp_path):
    with pytest.raises(ImageFileError) as info:
        decode_bytes(b"not an image", "train-000001.tar:000000007.png")
    assert str(info.value) == "train-000001.tar:000000007.png: not a readable image (not in any image format " \
                              "Pillow reads)"
    assert info.value.path == "train-000001.tar:000000007.png"
    halves(ORANGE, BLUE).save(tmp_path / "cut.png")
    with pytest.raises(ImageFileError, match=r"^sample 9: not a readable image \(") as info:
        decode_bytes((tmp_path / "cut.png").read_bytes()[:60], "sample 9", 8)
    assert "\n" not in str(info.value)
    with pytest.raises(ImageFileError, match=r"^empty: not a readable image"):
        decode_bytes(b"", "empty")
    with pytest.raises(ConfigError, match="channels must be >= 1, got 0"):
        decode_bytes(b"", "x", None, 0)


def test_bytes_declaring_a_2_gb_png_chunk_are_read_within_the_data(tmp_path):
    """The attack :class:`_BoundedReads` stops for files (a chunk length the data does not hold) on bytes in memory:
    no read allocates what the chunk declares, and the pixels are the file's."""
    buf = io.BytesIO()
    Image.new("L", (5, 7)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[33] = 127  # the IDAT chunk's length, now about 2**31
    (tmp_path / "forged.png").write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        pixels = decode_bytes(bytes(raw), "forged")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2 ** 20
    assert pixels.shape == (7, 5, 3) and np.array_equal(pixels, decode_image(tmp_path / "forged.png"))
