"""PerceptualLoss: the model's own normalisation, hand-computed feature and Gram distances, a VGG that stays frozen.

Oracles: maps equal ``VGG.forward_named`` on ``(x - mean) / std``; the loss equals the weighted sum of
``F.mse_loss`` / ``F.l1_loss`` of those maps or of Gram matrices computed by hand in float64; equal inputs give
exactly 0; after ``backward`` the input has a gradient and no VGG parameter has one."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vggnet
from vggnet.data import Preprocess
from vggnet.base.errors import ConfigError, InputSizeError
from vggnet.use.perceptual import PerceptualLoss, colour_transform, gram_matrix
from vggnet.store.rundir import load

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
LAYERS = ("relu1_2", "relu2_1", "pool2", "conv3_1")


def tiny_bn_model():
    """Three blocks with BN (non-trivial running statistics), 3 channels, eval mode."""
    torch.manual_seed(0)
    model = vggnet.create_model("custom", arch=[4, 4, "M", 8, "M", 8, "M"], batch_norm=True, in_channels=3,
                                num_classes=5, input_size=16, head="gap")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def model():
    return tiny_bn_model()


@pytest.fixture
def prep():
    return Preprocess(16, MEAN, STD, fit="resize")


def images(seed, shape=(2, 3, 16, 16), requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g).requires_grad_(requires_grad)


def by_hand(model, x, layers):
    """forward_named of the model on (x - mean) / std."""
    mean = torch.tensor(MEAN).view(1, -1, 1, 1)
    std = torch.tensor(STD).view(1, -1, 1, 1)
    with torch.no_grad():
        return model.forward_named((x - mean) / std, list(layers))


def hand_gram(f):
    b, c, h, w = f.shape
    f = f.double()
    return torch.stack([torch.stack([torch.stack([(f[n, i] * f[n, j]).sum() for j in range(c)]) for i in range(c)])
                        for n in range(b)]) / (c * h * w)


# ------------------------------------------------------------------------------------------------ normalisation
def test_normalisation_is_the_preprocess_mean_and_std(model, prep):
    loss = PerceptualLoss(model, LAYERS, preprocess=prep)
    assert torch.allclose(loss.norm_matrix, torch.diag(1 / torch.tensor(STD)), atol=1e-6)
    assert torch.allclose(loss.norm_bias, -torch.tensor(MEAN) / torch.tensor(STD), atol=1e-6)
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(loss.normalize(pixels / 255.0), prep(pixels), rtol=0, atol=1e-5)


def test_maps_are_forward_named_of_the_normalised_input(model, prep):
    loss = PerceptualLoss(model, LAYERS, preprocess=prep)
    x = images(1, (2, 3, 24, 16))
    with torch.no_grad():
        maps = loss.forward_layers(x)
        exact = model.forward_named(loss.normalize(x), list(LAYERS))
    expected = by_hand(model, x, LAYERS)
    for name in LAYERS:
        assert torch.equal(maps[name], exact[name])
        assert torch.allclose(maps[name], expected[name], rtol=1e-5, atol=1e-5)


def test_a_bare_model_takes_its_input_as_is(model):
    loss = PerceptualLoss(model, ["relu1_1"])
    x = images(2)
    assert torch.equal(loss.normalize(x), x)


class SwappedPreprocess(Preprocess):
    """A Preprocess that also reverses the channel order (as for BGR weights), to show that it is honoured."""

    def __call__(self, x):
        return super().__call__(x).flip(1)


def test_a_channel_order_in_the_preprocessing_is_honoured(model):
    prep = SwappedPreprocess(16, MEAN, STD)
    matrix, bias = colour_transform(prep)
    expected = torch.diag(1 / torch.tensor(STD)).flip(0)  # output channel 0 reads input channel 2
    assert torch.allclose(matrix, expected, atol=1e-6)
    loss = PerceptualLoss(model, ["relu1_1"], preprocess=prep)
    pixels = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(loss.normalize(pixels / 255.0), prep(pixels), rtol=0, atol=1e-5)


def preprocess_has(name):
    from dataclasses import fields

    return name in {f.name for f in fields(Preprocess)}


@pytest.mark.skipif(not preprocess_has("channel_order"), reason="Preprocess has no channel_order")
def test_the_bgr_channel_order_and_a_centre_crop_are_honoured(model):
    """Caffe-style weights: BGR, 0..255 with the mean subtracted (std 1/255), decoded larger and centre-cropped."""
    mean = (0.406, 0.458, 0.485)  # in the model's (BGR) order
    prep = Preprocess(16, mean, (1 / 255,) * 3, channel_order="bgr", crop_fraction=0.875)
    loss = PerceptualLoss(model, ["relu1_1"], preprocess=prep)
    x = images(20, (1, 3, 16, 16))
    expected = (x.flip(1) - torch.tensor(mean).view(1, 3, 1, 1)) * 255
    assert torch.allclose(loss.normalize(x), expected, rtol=1e-5, atol=1e-3)


class SquaringPreprocess(Preprocess):
    def __call__(self, x):
        return super().__call__(x) ** 2


def test_a_non_affine_preprocessing_is_refused(model):
    with pytest.raises(ConfigError, match="not affine"):
        PerceptualLoss(model, ["relu1_1"], preprocess=SquaringPreprocess(16, MEAN, STD))


# ------------------------------------------------------------------------------------------------ the loss
def test_equal_inputs_give_exactly_zero(model, prep):
    x = images(3)
    for style in (False, True):
        for criterion in ("mse", "l1"):
            loss = PerceptualLoss(model, LAYERS, style=style, criterion=criterion, preprocess=prep)
            assert loss(x, x.clone()).item() == 0.0


@pytest.mark.parametrize("criterion", ["mse", "l1"])
def test_loss_is_the_weighted_sum_of_per_layer_distances(model, prep, criterion):
    weights = [0.5, 2.0, 1.0, 0.25]
    loss = PerceptualLoss(model, LAYERS, weights=weights, criterion=criterion, preprocess=prep)
    x, y = images(4), images(5)
    a, b = by_hand(model, x, LAYERS), by_hand(model, y, LAYERS)
    distance = F.mse_loss if criterion == "mse" else F.l1_loss
    expected = sum(w * distance(a[n].double(), b[n].double()) for w, n in zip(weights, LAYERS))
    with torch.no_grad():
        assert loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)
        per_layer = loss.layer_losses(x, y)
    assert list(per_layer) == list(LAYERS)


def test_gram_matrix_by_hand():
    f = torch.randn(2, 3, 4, 5)
    assert torch.allclose(gram_matrix(f).double(), hand_gram(f), rtol=1e-5, atol=1e-7)


def test_style_loss_compares_gram_matrices_computed_by_hand(model, prep):
    layers = ("relu1_2", "relu2_1")
    loss = PerceptualLoss(model, layers, weights=[1.0, 3.0], style=True, preprocess=prep)
    x, y = images(6), images(7)
    a, b = by_hand(model, x, layers), by_hand(model, y, layers)
    expected = sum(w * ((hand_gram(a[n]) - hand_gram(b[n])) ** 2).mean() for w, n in zip((1.0, 3.0), layers))
    with torch.no_grad():
        assert loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_style_target_of_one_image_of_another_size(model, prep):
    loss = PerceptualLoss(model, ["relu2_1"], style=True, preprocess=prep)
    x, style = images(8, (3, 3, 16, 16)), images(9, (1, 3, 24, 32))
    a, b = by_hand(model, x, ["relu2_1"])["relu2_1"], by_hand(model, style, ["relu2_1"])["relu2_1"]
    expected = ((hand_gram(a) - hand_gram(b)) ** 2).mean()
    with torch.no_grad():
        assert loss(x, style).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(InputSizeError, match="a target batch of one"):
        loss(x, images(9, (2, 3, 16, 16)))


def test_gradients_reach_the_input_and_never_the_vgg(model, prep):
    loss_fn = PerceptualLoss(model, LAYERS, preprocess=prep)
    for style in (False, True):
        loss_fn.style = style
        x = images(10, requires_grad=True)
        loss_fn(x, images(11)).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert all(not p.requires_grad and p.grad is None for p in loss_fn.parameters())
    # the caller's model is copied, not frozen
    assert all(p.requires_grad for p in model.parameters())
    assert loss_fn.features[0].weight is not model.features[0].weight


def test_target_needing_a_gradient_gets_one(model, prep):
    loss_fn = PerceptualLoss(model, ["relu2_1"], preprocess=prep)
    x, y = images(12, requires_grad=True), images(13, requires_grad=True)
    loss_fn(x, y).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_the_copy_stays_frozen_and_in_eval_mode_inside_a_training_parent(model, prep):
    parent = nn.ModuleDict({"net": nn.Conv2d(3, 3, 1), "loss": PerceptualLoss(model, LAYERS, preprocess=prep)})
    loss_fn = parent["loss"]
    running = [m.running_mean.clone() for m in loss_fn.features if isinstance(m, nn.BatchNorm2d)]
    parent.train()
    assert parent.training and loss_fn.training and parent["net"].training
    assert not any(m.training for m in loss_fn.features.modules())
    x = images(14, requires_grad=True)
    loss_fn(parent["net"](x).sigmoid(), images(15)).backward()
    after = [m.running_mean for m in loss_fn.features if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after))  # BN used its running statistics
    assert parent["net"].weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in loss_fn.features.parameters())
    parent.eval()
    parent.train(True)
    assert not loss_fn.features.training


def test_only_the_features_up_to_the_deepest_layer_are_kept(model):
    loss = PerceptualLoss(model, ["relu1_2"])
    assert len(loss.features) == model.layer_names["relu1_2"] + 1
    assert not hasattr(loss, "classifier")


# ------------------------------------------------------------------------------------------------ sources
def test_a_run_directory_brings_its_own_preprocessing(train_run_one_epoch):
    run_dir = train_run_one_epoch["dir"]
    loaded = load(run_dir)
    prep = loaded.preprocess
    for source in (str(run_dir), run_dir, loaded):
        loss = PerceptualLoss(source, ["relu1_1", "relu2_1"])
        assert loss.norm_matrix.shape == (1, 1)
        assert loss.norm_matrix.item() == pytest.approx(1 / prep.std[0], rel=1e-6)
        assert loss.norm_bias.item() == pytest.approx(-prep.mean[0] / prep.std[0], rel=1e-5, abs=1e-6)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = loaded.model.forward_named((x - prep.mean[0]) / prep.std[0], ["relu2_1"])["relu2_1"]
        assert torch.allclose(loss.forward_layers(x)["relu2_1"], expected, rtol=1e-5, atol=1e-5)
    assert loss(x, x.clone()).item() == 0.0


def test_package_level_name():
    assert vggnet.PerceptualLoss is PerceptualLoss


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, fragment", [
    (dict(layers=["relu5_3"]), "unknown layer 'relu5_3'"),
    (dict(layers=["relu1_1", "relu1_1"]), "must not repeat"),
    (dict(layers=["relu1_1"], weights=[1.0, 2.0]), "one number per layer (1: relu1_1), got 2"),
    (dict(layers=["relu1_1"], criterion="huber"), "criterion must be one of mse, l1"),
])
def test_construction_errors(model, kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        PerceptualLoss(model, **kwargs)
    assert fragment in str(err.value)
    if "unknown" in fragment:
        assert all(name in str(err.value) for name in model.layer_names)


def test_not_a_model():
    with pytest.raises(ConfigError, match="takes a run directory"):
        PerceptualLoss(nn.Conv2d(1, 1, 1))


@pytest.mark.parametrize("shape, fragment", [
    ((2, 1, 16, 16), "3 channel(s)"),
    ((2, 3, 1, 1), "at least 2x2"),
    ((3, 16, 16), "batch (B, C, H, W)"),
])
def test_input_errors(model, shape, fragment):
    loss = PerceptualLoss(model, ["relu2_1"])
    x = torch.rand(shape)
    with pytest.raises(InputSizeError) as err:
        loss(x, x)
    assert fragment in str(err.value)


def test_input_and_target_must_match_for_feature_distances(model):
    loss = PerceptualLoss(model, ["relu2_1"])
    with pytest.raises(InputSizeError, match="input and target of one shape"):
        loss(images(1), images(2, (2, 3, 16, 20)))


def test_the_default_layers_exist_in_every_vgg(train_run):
    """The default was VGG-16's four layers, so PerceptualLoss(RUN) failed on the default (VGG-11) run: it is the
    last ReLU of each of the model's first four blocks."""
    from vggnet.net.models import create_model
    from vggnet.use.perceptual import DEFAULT_LAYERS, PerceptualLoss, default_layers

    assert tuple(default_layers(create_model("vgg16"))) == DEFAULT_LAYERS
    assert default_layers(create_model("vgg11_bn")) == ["relu1_1", "relu2_1", "relu3_2", "relu4_2"]
    assert PerceptualLoss(train_run["dir"]).layers == ("relu1_1", "relu2_1")  # the tiny run's two blocks
