"""The paper's per-sample transforms (vggnet.data.paper): every expected value here is computed by the test itself,
from Pillow directly and from the published ImageNet PCA constants typed in again below."""

import hashlib
import io
import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet.base.errors import ConfigError
from vggnet.data.images import ImageFileError, decode_bytes, decode_bytes_upright
from vggnet.data.paper import Draw, TestTransform, TrainTransform, colour_shift

BILINEAR = Image.Resampling.BILINEAR
# ImageNet's RGB PCA as fb.resnet.torch publishes it (datasets/imagenet.lua): eigenvalues, eigenvectors as columns.
EIGVAL = [0.2175, 0.0188, 0.0045]
EIGVEC = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]


def encode(array, fmt="PNG", **options):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **options)
    return buf.getvalue()


def photo(width, height, seed=0):
    """A photo-like RGB array: a smooth colour field plus grain."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height),
                                                                                    Image.Resampling.BICUBIC)
    return np.clip(np.asarray(field, np.int16) + rng.integers(-12, 13, (height, width, 3)), 0, 255).astype(np.uint8)


def hwc(tensor):
    return tensor.permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def noise():
    """A 150x100 RGB PNG of noise (the worst case for resampling) and its pixels."""
    pixels = np.random.default_rng(1).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    return encode(pixels), pixels


def rescaled(w, h, scale):
    """The shorter side to ``scale``, the longer ``int(scale * long / short)`` (torchvision's rounding)."""
    return (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)


def crop_oracle(pixels, scale, crop, top_fraction, left_fraction):
    """Pillow directly. The crop's source window: ``ceil(crop * side / new_side)`` source pixels per axis, at the
    top-left pixel ``floor(fraction * positions)`` of the source; its content is Pillow's resampling of the source box
    that starts there and spans ``crop`` output pixels at the exact rescaling factor. Also resize-then-crop of the
    whole rescaled image, at the window's position in it (for a window at the origin the two are the same pixels)."""
    image = Image.fromarray(pixels)
    w, h = image.size
    new_w, new_h = rescaled(w, h, scale)
    win_w, win_h = math.ceil(Fraction(crop * w, new_w)), math.ceil(Fraction(crop * h, new_h))
    top, left = int(top_fraction * (h - win_h + 1)), int(left_fraction * (w - win_w + 1))
    box = (left, top, left + crop * w / new_w, top + crop * h / new_h)
    one_pass = np.asarray(image.resize((crop, crop), BILINEAR, box=box))
    return one_pass, (top, left), (win_h, win_w)


def assert_resampled_alike(out, expected):
    """torch's antialiased uint8 bilinear against Pillow's, away from the window's first and last row and column
    (there torch's filter stops at the window, Pillow's reaches into the pixels around it): both round the same
    filter in fixed point, with an 8-bit image between the two passes, so on noise (the worst case) a pixel may
    differ by two levels and few differ at all."""
    diff = np.abs(out.astype(int) - expected.astype(int))[1:-1, 1:-1]
    assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())


# ------------------------------------------------------------------------------------------------ shapes
def test_output_shapes_and_layout(noise):
    data, _ = noise
    assert TrainTransform(64, 48)(data, "a", 0).shape == (3, 48, 48)
    out = TrainTransform((60, 90), 40, channels=1)(data, "a", 3)
    assert out.shape == (1, 40, 40) and out.dtype == torch.uint8 and out.is_contiguous()
    four = TrainTransform(64, 48, channels=4)(data, "a", 0)
    assert four.shape == (4, 48, 48) and all(torch.equal(four[0], four[c]) for c in range(4))
    assert TestTransform(64, 48)(data, "a").shape == (3, 48, 48)
    assert TestTransform(64, None)(data, "a").shape == (3, 64, 96)  # 150x100 -> 96x64: dense evaluation
    assert TestTransform(64, None, channels=1)(data, "a").shape == (1, 64, 96)


# ------------------------------------------------------------------------------------------------ scale and crop
@pytest.mark.parametrize("scale", [56, 70, 77, 100, 130])  # shrinking, unchanged (100) and enlarging
def test_fixed_scale_is_a_crop_of_the_rescaled_image(noise, scale):
    data, pixels = noise
    t = TrainTransform(scale, 48, flip=False, colour=0)
    for seed in range(6):
        draw = t.draw(seed)
        assert draw.scale == scale and draw.alpha == (0.0, 0.0, 0.0)
        one_pass, (top, left), _ = crop_oracle(pixels, scale, 48, draw.top, draw.left)
        out = hwc(t(data, "noise.png", seed))
        if scale == 100:
            assert np.array_equal(out, pixels[top:top + 48, left:left + 48])  # no rescaling: a plain crop
        else:
            assert_resampled_alike(out, one_pass)


@pytest.mark.parametrize("scale", [56, 77, 130])
def test_a_window_at_the_origin_is_the_corner_of_the_whole_rescaled_image(noise, scale):
    """The window's scale is the whole image's, exactly: at the top-left corner the crop is the corner of the
    rescaled image, computed by torch over the whole image (its own first row and column included)."""
    data, pixels = noise
    t = TrainTransform(scale, 48, flip=False, colour=0)
    corner = Draw(scale, top=0.0, left=0.0, flip=False, alpha=(0.0, 0.0, 0.0))
    whole = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    new_w, new_h = rescaled(150, 100, scale)
    expected = torch.nn.functional.interpolate(whole, size=(new_h, new_w), mode="bilinear", antialias=True)
    assert crop_oracle(pixels, scale, 48, 0.0, 0.0)[1] == (0, 0)
    assert torch.equal(t.apply(Image.fromarray(pixels), corner), expected[0, :, :48, :48])


def test_windows_are_as_small_as_the_crop_needs_and_fit_the_image():
    """ceil(crop * side / new_side) source pixels: the fewest whose rescaling covers the crop."""
    from vggnet.data.paper import _factor, _window
    assert _window(48, _factor(100, 56)) == 86  # 48 * 100 / 56 = 85.7
    assert _window(48, _factor(100, 130)) == 37  # enlarging: 48 * 100 / 130 = 36.9
    assert _window(50, _factor(100, 50)) == 100  # crop == the rescaled side: the whole side, not one pixel more
    assert _window(224, _factor(375, 256)) == 329  # 224 * 375 / 256 = 328.1
    for side in range(30, 400, 7):
        for new in range(28, 300, 11):
            if new >= 28:
                n = _window(28, _factor(side, new))
                assert n == math.ceil(Fraction(28 * side, new)) and (new > 28 or n == side)


def test_crop_positions_cover_every_offset():
    t = TrainTransform(64, 60)  # 150x100 -> 96x64: offsets 0..4 down, 0..36 across
    offsets = [t.draw(seed).offsets(64, 96, 60) for seed in range(2000)]
    assert {top for top, _ in offsets} == set(range(5))
    assert {left for _, left in offsets} == set(range(37))
    counts = np.bincount([top for top, _ in offsets])
    assert counts.min() > 2000 / 5 * 0.8  # uniform, roughly
    assert {t.draw(seed).offsets(64, 96, 62, 60)[0] for seed in range(200)} == {0, 1, 2}  # a window of 62 x 60


def test_jittered_scale_stays_in_range_and_covers_it(noise):
    data, pixels = noise
    t = TrainTransform((60, 64), 48, flip=False, colour=0)
    scales = [t.draw(seed).scale for seed in range(300)]
    assert set(scales) == {60, 61, 62, 63, 64}
    seed = next(s for s in range(300) if t.draw(s).scale == 63)
    one_pass, _, _ = crop_oracle(pixels, 63, 48, t.draw(seed).top, t.draw(seed).left)
    assert_resampled_alike(hwc(t(data, "noise.png", seed)), one_pass)


# ------------------------------------------------------------------------------------------------ flip
def test_flip_mirrors_exactly(noise):
    data, _ = noise
    flipping = TrainTransform(70, 48, flip=True, colour=0.1)
    fixed = TrainTransform(70, 48, flip=False, colour=0.1)
    flips = [flipping.draw(seed).flip for seed in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55 and not any(fixed.draw(seed).flip for seed in range(200))
    seed = flips.index(True)
    mirrored = flipping(data, "a", seed)
    assert torch.equal(mirrored, fixed(data, "a", seed).flip(-1))  # the same crop and colour, mirrored
    assert not torch.equal(mirrored, fixed(data, "a", seed))
    unflipped = flips.index(False)
    assert torch.equal(flipping(data, "a", unflipped), fixed(data, "a", unflipped))


# ------------------------------------------------------------------------------------------------ colour
def test_colour_shift_vector_by_hand():
    # alpha = (1, 0, 0): 255 * lambda_1 * p_1 = 55.4625 * (-0.5675, -0.5808, -0.5836)
    assert np.allclose(colour_shift((1, 0, 0)), [-31.47496875, -32.21262, -32.367915], rtol=0, atol=1e-9)
    # alpha = (0, 0, 2): 2 * 255 * 0.0045 * p_3 = 2.295 * (0.4009, -0.8140, 0.4203)
    assert np.allclose(colour_shift((0, 0, 2)), [0.92006550, -1.868130, 0.96458850], rtol=0, atol=1e-9)
    grey = 0.299 * -31.47496875 + 0.587 * -32.21262 + 0.114 * -32.367915
    assert np.allclose(colour_shift((1, 0, 0), channels=1), [grey])


def gradient_png():
    """A 256x256 RGB image holding every level in every channel (so every entry of the shift table is used)."""
    levels = np.arange(256, dtype=np.uint8)
    pixels = np.stack([np.tile(levels, (256, 1)), np.tile(levels[:, None], (1, 256)),
                       np.tile(levels[::-1], (256, 1))], axis=2)
    return encode(pixels), pixels


def test_colour_zero_is_the_identity():
    data, pixels = gradient_png()
    t = TrainTransform(256, 256, flip=False, colour=0)
    assert np.array_equal(hwc(t(data, "g", 5)), pixels)


@pytest.mark.parametrize("colour", [0.1, 1.0])  # 1.0: shifts of tens of levels, so 0 and 255 clip
def test_colour_shift_adds_the_pca_vector_rounded_and_clipped(colour):
    data, pixels = gradient_png()
    t = TrainTransform(256, 256, flip=False, colour=colour)
    def shift(seed):
        alpha = t.draw(seed).alpha
        return np.array([255 * sum(EIGVEC[c][i] * alpha[i] * EIGVAL[i] for i in range(3)) for c in range(3)])

    seeds = [seed for seed in range(100) if np.abs(shift(seed)).max() > 1][:3]  # shifts that change a level
    for seed in seeds:
        expected = np.clip(np.rint(pixels + shift(seed)), 0, 255).astype(np.uint8)
        assert np.array_equal(hwc(t(data, "g", seed)), expected)
        assert not np.array_equal(expected, pixels)
    assert len(seeds) == 3


def test_grey_images_get_the_luminance_of_the_shift():
    data, pixels = gradient_png()
    t = TrainTransform(256, 256, flip=False, colour=1.0, channels=1)
    alpha = t.draw(4).alpha
    rgb = [255 * sum(EIGVEC[c][i] * alpha[i] * EIGVAL[i] for i in range(3)) for c in range(3)]
    luminance = np.asarray(Image.fromarray(pixels).convert("L"))  # the decoder's grey: ITU-R 601-2
    expected = np.clip(np.rint(luminance + 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]), 0, 255)
    assert np.array_equal(t(data, "g", 4)[0].numpy(), expected.astype(np.uint8))


def test_alpha_is_normal_with_the_given_deviation():
    alphas = np.array([TrainTransform(colour=0.1).draw(seed).alpha for seed in range(4000)])
    assert np.all(np.abs(alphas.mean(0)) < 0.01) and np.all(np.abs(alphas.std(0) - 0.1) < 0.005)


# ------------------------------------------------------------------------------------------------ seeds
AUGMENT = """
import hashlib, sys
from vggnet.data.paper import TrainTransform
data = open(sys.argv[1], "rb").read()
for seed in sys.argv[2:]:
    print(hashlib.sha256(TrainTransform((40, 60), 32)(data, "p.jpg", int(seed)).numpy().tobytes()).hexdigest())
"""


def test_same_seed_same_bytes_in_any_process_and_different_seeds_differ(tmp_path):
    data = encode(photo(90, 70, seed=7), "JPEG", quality=90)
    (tmp_path / "p.jpg").write_bytes(data)

    def digest(seed):
        return hashlib.sha256(TrainTransform((40, 60), 32)(data, "p.jpg", seed).numpy().tobytes()).hexdigest()

    here = [digest(seed) for seed in (11, 12)]
    assert digest(11) == here[0] and here[0] != here[1]
    assert len({digest(seed) for seed in range(20, 30)}) == 10
    with pytest.raises(ConfigError, match="seed must be a non-negative integer, got -1"):
        TrainTransform().draw(-1)
    other = subprocess.run([sys.executable, "-c", AUGMENT, str(tmp_path / "p.jpg"), "11", "12"], check=True,
                           capture_output=True, text=True)  # a fresh interpreter: nothing shared but the seed
    assert other.stdout.split() == here


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("transform", [TrainTransform(64, 48), TestTransform(64, 48)])
def test_broken_bytes_give_one_line_naming_the_sample(transform):
    with pytest.raises(ImageFileError) as info:
        transform(b"not an image", "train-000003.tar:000000042.jpg", 0)
    assert str(info.value) == ("train-000003.tar:000000042.jpg: not a readable image (not in any image format "
                               "Pillow reads)")
    truncated = encode(photo(90, 70), "JPEG")[:300]
    with pytest.raises(ImageFileError, match=r"^cut\.jpg: not a readable image \(") as info:
        transform(truncated, "cut.jpg", 0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("make, message", [
    (lambda: TrainTransform(256, 300), "crop 300 does not fit in an image rescaled to S = 256"),
    (lambda: TrainTransform((512, 256)), r"Smin <= Smax, got \(512, 256\)"),
    (lambda: TrainTransform((256, 384, 512)), "one side S or a pair"),
    (lambda: TrainTransform(colour=-0.1), "colour must be >= 0, got -0.1"),
    (lambda: TrainTransform(channels=0), "channels must be >= 1, got 0"),
    (lambda: TrainTransform(0), "scale must be >= 1, got 0"),
    (lambda: TestTransform(200, 224), "crop 224 does not fit in an image rescaled to Q = 200"),
])
def test_bad_options_are_one_line_errors(make, message):
    with pytest.raises(ConfigError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ grey, test, draft
def test_grey_training_crop_is_the_luminance_crop(noise):
    data, pixels = noise
    t = TrainTransform(70, 48, flip=False, colour=0, channels=1)
    draw = t.draw(2)
    luminance = np.asarray(Image.fromarray(pixels).convert("L"))
    one_pass, _, _ = crop_oracle(luminance, 70, 48, draw.top, draw.left)
    assert_resampled_alike(t(data, "a", 2)[0].numpy(), one_pass)


@pytest.mark.parametrize("channels", [1, 3])
def test_test_transform_is_resize_then_centre_crop(noise, channels):
    data, pixels = noise
    image = Image.fromarray(pixels).convert("RGB" if channels == 3 else "L")
    resized = np.asarray(image.resize((105, 70), BILINEAR)).reshape(70, 105, -1)  # int(70 * 150 / 100) = 105
    top, left = round((70 - 48) / 2), round((105 - 48) / 2)  # 11, 28 (28.5 rounds to even)
    assert np.array_equal(hwc(TestTransform(70, 48, channels=channels)(data, "a")),
                          resized[top:top + 48, left:left + 48])
    assert np.array_equal(hwc(TestTransform(70, None, channels=channels)(data, "a")), resized)
    assert np.array_equal(hwc(TestTransform(70, 70, channels=channels)(data, "a")),
                          decode_bytes(data, "a", 70, channels))  # the predict path's pixels


def test_draft_decodes_large_jpegs_at_a_reduced_size():
    pixels = photo(1200, 900, seed=3)
    data = encode(pixels, "JPEG", quality=92)
    assert decode_bytes_upright(data, "big.jpg", draft=256).size == (600, 450)  # 900 // 256 = 3: scale 1/2
    assert decode_bytes_upright(data, "big.jpg", draft=100).size == (150, 113)  # 1/8, rounded up
    assert decode_bytes_upright(data, "big.jpg").size == (1200, 900)
    drafted = Image.open(io.BytesIO(data))
    drafted.draft(None, (256, 256))
    drafted = np.asarray(drafted.convert("RGB"))
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    fast, exact = TrainTransform(256, 224, colour=0), TrainTransform(256, 224, colour=0, draft=False)
    for seed in range(3):
        draw = fast.draw(seed)
        expected = np.flip(crop_oracle(drafted, 256, 224, draw.top, draw.left)[0], 1) if draw.flip else \
            crop_oracle(drafted, 256, 224, draw.top, draw.left)[0]
        out = hwc(fast(data, "big.jpg", seed))
        assert_resampled_alike(out, expected)
        full_crop = crop_oracle(full, 256, 224, draw.top, draw.left)[0]
        assert_resampled_alike(hwc(exact(data, "big.jpg", seed)), np.flip(full_crop, 1) if draw.flip else full_crop)
        assert np.abs(out.astype(int) - hwc(exact(data, "big.jpg", seed))).mean() < 3  # close to the full decode
    small = encode(photo(300, 200), "JPEG")  # smaller than twice S: decoded in full either way
    assert torch.equal(fast(small, "s.jpg", 1), exact(small, "s.jpg", 1))
