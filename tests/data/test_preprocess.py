"""Preprocess (fit + normalise) and channel_stats, against hand-computed numbers."""

import json
import math

import pytest
import torch

from vggnet.data import ImageDataset, Preprocess, channel_stats
from vggnet.base.errors import ConfigError, DataError, InputSizeError


def batch(*shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_pad_28_to_32_centres_pixels_exactly():
    x = batch(3, 1, 28, 28)
    out = Preprocess(32, mean=(0.0,), std=(1.0,), fit="pad")(x)
    assert out.shape == (3, 1, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out[:, :, 2:30, 2:30], x.float() / 255)
    border = out.clone()
    border[:, :, 2:30, 2:30] = 0
    assert torch.count_nonzero(border) == 0


def test_pad_border_is_black_after_normalisation_and_odd_padding():
    x = torch.full((1, 1, 29, 29), 255, dtype=torch.uint8)
    out = Preprocess(32, mean=(0.5,), std=(0.5,), fit="pad")(x)
    # 3 pixels to add: 1 before, 2 after; black (0) -> (0 - 0.5) / 0.5 = -1, white -> 1
    assert out[0, 0, 0, 0] == -1 and out[0, 0, 1, 1] == 1 and out[0, 0, 29, 29] == 1 and out[0, 0, 30, 30] == -1


def test_auto_fit_rule():
    prep = Preprocess(32, (0.5,), (0.5,), fit="auto", in_size=28)
    assert prep.resolved_fit() == "pad"
    assert prep.resolved_fit(24) == "pad" and prep.resolved_fit(23) == "resize" and prep.resolved_fit(40) == "resize"
    assert prep.resolved_fit(32) == "none"
    assert Preprocess(224, (0.5,), (0.5,), in_size=28).resolved_fit() == "resize"
    x = batch(2, 1, 28, 28)
    assert torch.equal(prep(x), Preprocess(32, (0.5,), (0.5,), fit="pad")(x))


def test_resize_shape_and_constant_image():
    x = torch.full((2, 3, 28, 28), 51, dtype=torch.uint8)
    out = Preprocess(64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), fit="resize")(x)
    assert out.shape == (2, 3, 64, 64)
    assert torch.allclose(out, torch.full_like(out, 0.2), atol=1e-6)
    down = Preprocess(16, (0.0,) * 3, (1.0,) * 3)(batch(2, 3, 40, 40))
    assert down.shape == (2, 3, 16, 16)


def test_normalisation_hand_checked():
    x = torch.tensor([255, 0, 102], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    out = Preprocess(2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))(x)
    # (1 - 0.5) / 0.25 = 2; (0 - 0.5) / 0.5 = -1; (0.4 - 0.5) / 1 = -0.1
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.0, -1.0, -0.1]), atol=1e-6)


def test_dict_round_trip():
    prep = Preprocess(32, (0.2860406,), (0.3530242,), fit="pad", in_size=28)
    d = json.loads(json.dumps(prep.to_dict()))
    assert d == {"image_size": 32, "mean": [0.2860406], "std": [0.3530242], "fit": "pad", "in_size": 28}
    again = Preprocess.from_dict(d)
    assert again == prep and again.mean == (0.2860406,)
    x = batch(2, 1, 28, 28)
    assert torch.equal(again(x), prep(x))
    with pytest.raises(ConfigError, match=r"missing \['std'\]"):
        Preprocess.from_dict({"image_size": 32, "mean": [0.5]})


@pytest.mark.parametrize("kwargs, match", [
    ({"fit": "stretch"}, "fit must be one of auto, pad, resize"),
    ({"std": (0.0,)}, r"std must be > 0"),
    ({"std": (1.0, 1.0)}, "one mean and one std per channel"),
    ({"image_size": 0}, "positive integer"),
])
def test_bad_settings(kwargs, match):
    settings = {"image_size": 32, "mean": (0.5,), "std": (0.5,), **kwargs}
    with pytest.raises(ConfigError, match=match):
        Preprocess(**settings)


def test_bad_inputs():
    prep = Preprocess(32, (0.5,), (0.5,), fit="pad")
    with pytest.raises(InputSizeError, match="set up for 1 channel"):
        prep(batch(1, 3, 28, 28))
    with pytest.raises(InputSizeError, match="expects uint8"):
        prep(torch.zeros(1, 1, 28, 28))
    with pytest.raises(InputSizeError, match=r"cannot pad a 40x40 image to 32x32"):
        prep(batch(1, 1, 40, 40))
    with pytest.raises(InputSizeError, match=r"batch \(B, C, H, W\)"):
        prep(batch(1, 28, 28))


def test_channel_stats_hand_checked():
    images = torch.tensor([[[[0, 255]]], [[[255, 255]]]], dtype=torch.uint8)  # values 0, 1, 1, 1
    ds = ImageDataset(images, torch.tensor([0, 1]), ["a", "b"], "tiny")
    mean, std = channel_stats(ds)
    assert mean == pytest.approx((0.75,), abs=1e-15) and std == pytest.approx((math.sqrt(0.75 * 0.25),), abs=1e-15)


def test_channel_stats_chunked_matches_direct():
    images = batch(10, 3, 5, 7, seed=3)
    ds = ImageDataset(images, torch.zeros(10, dtype=torch.int64), ["only"], "rand")
    mean, std = channel_stats(ds, chunk=3)
    x = images.double() / 255
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)
    with pytest.raises(DataError, match="empty dataset"):
        channel_stats(ds.subset(0))


def test_paper_style_mean_subtraction_and_standardisation():
    images = batch(10, 3, 6, 6, seed=4)
    ds = ImageDataset(images, torch.zeros(10, dtype=torch.int64), ["only"], "rand")
    mean, std = channel_stats(ds)
    centred = Preprocess(6, mean, (1.0, 1.0, 1.0))(images)  # the paper: subtract the mean RGB only
    assert centred.mean(dim=(0, 2, 3)).abs().max() < 1e-6
    assert torch.allclose(centred.std(dim=(0, 2, 3), unbiased=False), torch.tensor(std, dtype=torch.float32))
    standard = Preprocess(6, mean, std)(images)
    assert torch.allclose(standard.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)
