"""Preprocess's channel_order and crop_fraction (round trip, old model.json dicts, validation) and the ImageNet
evaluation transform: decode at 256 + centre 224 against torchvision's Resize(256) + CenterCrop(224), computed here
with Pillow as torchvision does it on PIL images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet.data import Preprocess, decode_image
from vggnet.base.errors import ConfigError
from vggnet.store.weights import imagenet


def batch(*shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_new_fields_round_trip_and_old_dicts_still_load():
    prep = Preprocess(224, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), fit="resize", channel_order="bgr", crop_fraction=0.875)
    d = json.loads(json.dumps(prep.to_dict()))
    assert d["channel_order"] == "bgr" and d["crop_fraction"] == 0.875
    explicit = Preprocess.from_dict({**d, "channel_order": "rgb", "crop_fraction": 1.0})  # defaults spelled out
    assert explicit.channel_order == "rgb" and "channel_order" not in explicit.to_dict()
    assert Preprocess.from_dict(d) == prep
    old = {"image_size": 32, "mean": [0.2860406], "std": [0.3530242], "fit": "pad", "in_size": 28}  # model.json v1
    again = Preprocess.from_dict(old)
    assert again.to_dict() == old  # defaults are not written: an ordinary run's model.json is unchanged
    assert again.channel_order == "rgb" and again.crop_fraction == 1.0 and again.decode_size == 28
    x = batch(2, 1, 28, 28)
    padded = torch.nn.functional.pad(x.float() / 255, (2, 2, 2, 2))
    torch.testing.assert_close(again(x), (padded - 0.2860406) / 0.3530242, rtol=0, atol=1e-6)  # as before


@pytest.mark.parametrize("kwargs, message", [
    ({"channel_order": "gbr"}, "channel_order must be one of rgb, bgr"),
    ({"crop_fraction": 0.0}, r"crop_fraction must be in \(0, 1\]"),
    ({"crop_fraction": 1.5}, r"crop_fraction must be in \(0, 1\]"),
    ({"channel_order": "bgr", "mean": (0.5,), "std": (0.5,)}, "'bgr' needs 3 channels, got 1"),
])
def test_bad_new_fields(kwargs, message):
    settings = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, **kwargs}
    with pytest.raises(ConfigError, match=message):
        Preprocess(**settings)


def test_bgr_reverses_the_channels_before_normalising():
    x = batch(2, 3, 8, 8)
    prep = Preprocess(8, (0.1, 0.2, 0.3), (0.5, 0.25, 1.0), channel_order="bgr")
    expected = (x.flip(1).float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(prep(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("h, w", [(256, 256), (250, 300), (257, 259)])
def test_centre_crop_is_torchvisions(h, w):
    """The centre crop_fraction of each side, offsets rounded as torchvision's CenterCrop (round half to even), then
    fitted to S; at 256 with 0.875 exactly the centre 224 x 224 pixels."""
    x = batch(1, 3, h, w, seed=1)
    prep = Preprocess(224, (0.0,) * 3, (1.0,) * 3, fit="resize", crop_fraction=0.875)
    ch, cw = int(round(h * 0.875)), int(round(w * 0.875))
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    crop = x[..., top:top + ch, left:left + cw].float() / 255
    expected = crop if (ch, cw) == (224, 224) else torch.nn.functional.interpolate(
        crop, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(prep(x), expected, rtol=0, atol=1e-6)
    if (h, w) == (256, 256):
        assert torch.equal(prep(x), x[..., 16:240, 16:240].float() / 255)


def torchvision_eval(path):
    """torchvision's ImageClassification(crop_size=224) on a PIL image: Resize(256) on the shorter side (the longer
    side int(256 * long / short)), bilinear; CenterCrop(224); to [0, 1]; Normalize."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(256 * long / short)
    new_w, new_h = (256, new_long) if w <= h else (new_long, 256)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
    x = torch.from_numpy(np.array(image.crop((left, top, left + 224, top + 224)))).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(imagenet.MEAN).view(3, 1, 1), torch.tensor(imagenet.STD).view(3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("w, h", [(256, 256), (300, 200), (200, 300), (320, 400), (512, 512), (100, 80)])
def test_decode_256_and_crop_224_equals_torchvisions_eval_transform(tmp_path, w, h):
    """The decoder resizes and crops as torchvision's eval transform does, so the pixels agree exactly up to the
    float arithmetic of normalisation (one grey level is the bound asserted)."""
    rng = np.random.default_rng(w * 1000 + h)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    prep = imagenet.torchvision_preprocess()
    assert prep.decode_size == 256
    ours = prep(torch.from_numpy(decode_image(tmp_path / "x.png", prep.decode_size, 3)).permute(2, 0, 1)[None])[0]
    reference = torchvision_eval(tmp_path / "x.png")
    grey_level = 1 / 255 / min(imagenet.STD)
    assert ours.shape == reference.shape == (3, 224, 224)
    assert (ours - reference).abs().max() <= grey_level + 1e-6


def test_4_to_3_photos_get_torchvisions_pixels_too(tmp_path):
    """500x375 -> 341x256 (the longer side truncated, as torchvision does), then the centre crop."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    prep = imagenet.torchvision_preprocess()
    ours = prep(torch.from_numpy(decode_image(tmp_path / "x.png", prep.decode_size, 3)).permute(2, 0, 1)[None])[0]
    assert (ours - torchvision_eval(tmp_path / "x.png")).abs().max() <= 1 / 255 / min(imagenet.STD) + 1e-6
