"""Augment: per-sample randomness, determinism, and the exact effect of each transform."""

import pytest
import torch
import torch.nn.functional as F

from vggnet.data import Augment
from vggnet.base.errors import ConfigError, InputSizeError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def distinct(b=16, c=3, s=12):
    """Images with no symmetry: every pixel value is unique."""
    return torch.arange(b * c * s * s, dtype=torch.float32).view(b, c, s, s) / (b * c * s * s)


def test_shapes_kept_with_everything_on():
    x = distinct(8, 3, 16)
    out = Augment(crop_padding=4, flip=True, scale_jitter=(0.5, 1.0), erasing=0.5)(x, gen())
    assert out.shape == x.shape and out.dtype == x.dtype


def test_per_sample_randomness_on_identical_images():
    x = distinct(1, 3, 12).expand(32, 3, 12, 12).contiguous()
    out = Augment(crop_padding=4, flip=True)(x, gen())
    different = {tuple(out[i].flatten().tolist()) for i in range(32)}
    assert len(different) > 10


def test_deterministic_with_same_seed():
    x = distinct()
    aug = Augment(crop_padding=3, flip=True, scale_jitter=(0.6, 0.9), erasing=0.5)
    assert torch.equal(aug(x, gen(7)), aug(x, gen(7)))
    assert not torch.equal(aug(x, gen(7)), aug(x, gen(8)))


def test_padding_zero_no_flip_is_identity():
    x = distinct()
    assert torch.equal(Augment(crop_padding=0, flip=False)(x, gen()), x)


def test_flip_is_exact_mirror_per_sample():
    x = distinct(64)
    out = Augment(crop_padding=0, flip=True)(x, gen(1))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept))  # each sample is exactly one of the two
    assert 10 < sum(flipped) < 54


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_crop_is_a_window_of_the_padded_image(pad_mode):
    p, s = 3, 10
    x = distinct(24, 2, s)
    out = Augment(crop_padding=p, flip=False, pad_mode=pad_mode)(x, gen(2))
    padded = F.pad(x, (p, p, p, p), mode=pad_mode)
    offsets = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.equal(out[i], padded[i, :, dy:dy + s, dx:dx + s])]
        assert len(hits) == 1
        offsets.append(hits[0])
    assert len(set(offsets)) > 8  # offsets drawn per sample


def test_scale_jitter_full_window_is_identity_and_zoom_varies():
    x = distinct(6, 3, 8)
    assert torch.allclose(Augment(crop_padding=0, flip=False, scale_jitter=(1.0, 1.0))(x, gen()), x, atol=1e-6)
    same = distinct(1, 3, 8).expand(6, 3, 8, 8).contiguous()
    out = Augment(crop_padding=0, flip=False, scale_jitter=(0.4, 0.9))(same, gen())
    assert len({tuple(o.flatten().tolist()) for o in out}) == 6
    # zooming in never reaches outside the image: values stay within the input's range
    assert out.min() >= same.min() - 1e-6 and out.max() <= same.max() + 1e-6


def test_erasing_sets_one_rectangle_per_sample_to_zero():
    x = torch.ones(32, 3, 20, 20)
    out = Augment(crop_padding=0, flip=False, erasing=1.0)(x, gen(3))
    for sample in out:
        zero = (sample == 0).all(dim=0)
        assert torch.equal((sample == 0).any(dim=0), zero)  # the same pixels in every channel
        rows, cols = zero.any(dim=1).nonzero().flatten(), zero.any(dim=0).nonzero().flatten()
        box = zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and int(zero.sum()) == box.numel()  # exactly one filled rectangle
        assert 4 <= int(zero.sum()) <= 160  # 2-33 % of 400 pixels, give or take rounding of the sides
    assert torch.equal(Augment(crop_padding=0, flip=False, erasing=0.0)(x, gen(3)), x)
    half = Augment(crop_padding=0, flip=False, erasing=0.5)(x, gen(3))
    erased = sum(bool((s == 0).any()) for s in half)
    assert 4 < erased < 28


@pytest.mark.parametrize("kwargs, match", [
    ({"crop_padding": -1}, "crop_padding must be >= 0"),
    ({"scale_jitter": (0.0, 1.0)}, "scale_jitter must be"),
    ({"scale_jitter": (0.9, 0.5)}, "scale_jitter must be"),
    ({"erasing": 1.5}, "probability"),
    ({"pad_mode": "wrap"}, "pad_mode must be one of"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Augment(**kwargs)


def test_bad_inputs():
    with pytest.raises(InputSizeError, match="float batch"):
        Augment()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(InputSizeError, match="reflect padding of 4 needs images larger than 4x4"):
        Augment(crop_padding=4)(torch.zeros(2, 3, 4, 4))


def test_to_dict():
    assert Augment(scale_jitter=(0.5, 1.0)).to_dict() == {
        "crop_padding": 4, "flip": True, "scale_jitter": [0.5, 1.0], "erasing": 0.0, "pad_mode": "reflect"}
