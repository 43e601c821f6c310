"""Fine-tuning: --init-from (matching, input-conv adaptation, the paper's init-from-A), --freeze, --loaded-lr-scale,
and their resume. Oracles: SOURCE's tensors, hand-computed updates, the grey-image identity."""

import json
import shutil

import pytest
import torch

from vggnet import VGG
from vggnet.data import Preprocess
from vggnet.base.errors import ConfigError
from vggnet.base.files import load_tensors
from vggnet.store.card import ModelCard
from vggnet.store.rundir import load, save_model
from vggnet.training import build_run, fit, resolve_config, resume, seed_epoch, train_step
from vggnet.training.transfer import (PAPER_REST, TransferRecord, adapt_input_conv, freeze_choices, init_from_source,
                                      model_layers, transfer_weights)

A_LIKE = [4, "M", 8, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M"]  # VGG-11's layout at 1/16 width
B_LIKE = [4, 4, "M", 8, 8, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M"]  # VGG-13's
TEN = [str(i) for i in range(10)]


def tiny(arch=(8, "M", 16, "M"), **kwargs):
    options = dict(num_classes=10, in_channels=1, input_size=32, head="gap", hidden=16, dropout=0.0)
    return VGG(list(arch), **{**options, **kwargs})


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tensors_of(model, layer):
    """``{tensor name: tensor}`` of one layer, by the model's own layer names."""
    state = model.state_dict()
    return {leaf: state[key] for leaf, key in model_layers(model)[layer].items()}


def randomise_bn(model, seed=0):
    """BN running statistics and affine parameters away from their identity defaults, so BN matters in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3 + (1.0 if t is m.weight else 0.0))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def write_source(path, model, classes, mean=0.5, std=0.25):
    """A run directory holding only ``model``'s weights and card, as ``vggnet.load`` reads it."""
    path.mkdir(parents=True)
    c = model.in_channels
    card = ModelCard(model=model.config, classes=list(classes),
                     preprocess=Preprocess(32, (mean,) * c, (std,) * c).to_dict())
    save_model(path, model, card)
    return path


# --------------------------------------------------------------------------------------------- matching, head
def test_layers_load_by_name_and_shape_and_the_rest_is_listed():
    source = tiny(batch_norm=False)
    target = tiny(batch_norm=True)
    before = snapshot(target)
    record = transfer_weights(target, source, classes=TEN, source_classes=TEN)
    assert record.loaded == ["conv1_1", "conv2_1", "classifier.1"]
    assert record.tensors == 6
    assert record.reinitialised == {"bn1_1": "not in SOURCE", "bn2_1": "not in SOURCE"}
    for layer in record.loaded:  # conv2_1 is features.3 in SOURCE, features.4 here
        mine, theirs = tensors_of(target, layer), tensors_of(source, layer)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    for layer in record.reinitialised:
        key = next(iter(model_layers(target)[layer].values()))
        assert torch.equal(target.state_dict()[key], before[key])
    assert record.summary() == ("loaded 6 tensors from SOURCE; re-initialised: bn1_1, bn2_1 (not in SOURCE)")


def test_a_new_head_for_other_classes_even_when_their_number_is_the_same():
    source, target = tiny(), tiny(num_classes=5)
    record = transfer_weights(target, source, name="src", classes=list("abcde"), source_classes=TEN)
    assert record.reinitialised == {"classifier.1": "new head for 5 classes"}
    record = transfer_weights(tiny(), source, name="src", classes=list("abcdefghij"), source_classes=TEN)
    assert record.reinitialised == {"classifier.1": "new head for 10 classes, named differently from SOURCE's"}
    assert record.summary() == ("loaded 4 tensors from src; re-initialised: classifier.1 (new head for 10 classes, "
                                "named differently from SOURCE's)")
    # Without class names, shapes decide: the last layer's output count names the new head.
    assert transfer_weights(tiny(num_classes=3), source).reinitialised == {"classifier.1": "new head for 3 classes"}


def test_other_input_sizes_keep_the_classic_head_and_refit_a_fitted_one():
    source = tiny(head="classic", input_size=32)
    bigger = tiny(head="classic", input_size=64)
    record = transfer_weights(bigger, source)
    assert record.reinitialised == {} and record.loaded[-3:] == ["classifier.0", "classifier.3", "classifier.6"]
    assert bigger(torch.rand(1, 1, 64, 64)).shape == (1, 10)  # the adaptive 7x7 pooling takes the new size
    fitted = tiny(head="fitted", input_size=64)
    record = transfer_weights(fitted, source)
    assert record.reinitialised == {"classifier.0": "weight shape [16, 4096], SOURCE's classifier.0 has [16, 784]"}
    assert record.loaded[-2:] == ["classifier.3", "classifier.6"]
    gap = tiny(head="gap", input_size=64)
    assert transfer_weights(gap, source).reinitialised == {"classifier.1": "not in SOURCE"}


# ------------------------------------------------------------------------------------------------- input conv
def test_the_channel_rules_by_hand():
    w = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3, 3)
    assert torch.equal(adapt_input_conv(w, 1), w[:, 0:1] + w[:, 1:2] + w[:, 2:3])
    assert torch.equal(adapt_input_conv(w, 3), w)
    assert torch.equal(adapt_input_conv(w, 2), torch.stack([w[:, 0], w[:, 1]], 1) * (3 / 2))
    assert torch.equal(adapt_input_conv(w, 5), torch.stack([w[:, 0], w[:, 1], w[:, 2], w[:, 0], w[:, 1]], 1) * (3 / 5))
    grey = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    assert torch.equal(adapt_input_conv(grey, 3), grey.repeat(1, 3, 1, 1) * (1 / 3))


def test_an_rgb_source_on_a_replicated_grey_image_equals_the_adapted_model_on_the_grey_image():
    torch.manual_seed(0)
    # Xavier init: logits of order 1 (the default N(0, 0.01) head would make any tolerance meaningless).
    rgb = randomise_bn(tiny(A_LIKE, batch_norm=True, in_channels=3, head="fitted", init="xavier"))
    grey = tiny(A_LIKE, batch_norm=True, in_channels=1, head="fitted", init="xavier").eval()
    record = transfer_weights(grey, rgb)
    assert record.adapted == {"conv1_1": "3 -> 1 input channels, the sum of the kernels"}
    assert record.reinitialised == {}
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert grey(x).abs().max() > 0.5
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=0, atol=1e-5)
    # With the preprocessing: exact when SOURCE's mean and std are the same in every channel and equal to the run's.
    pixels = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    same_rgb, same_grey = Preprocess(32, (0.3,) * 3, (0.2,) * 3), Preprocess(32, (0.3,), (0.2,))
    with torch.no_grad():
        torch.testing.assert_close(grey(same_grey(pixels)), rgb(same_rgb(pixels.repeat(1, 3, 1, 1))), rtol=0, atol=1e-5)
        # Other per-channel statistics break the identity: the condition is needed, not a formality.
        other = Preprocess(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        assert (grey(same_grey(pixels)) - rgb(other(pixels.repeat(1, 3, 1, 1)))).abs().max() > 1e-2


def test_a_grey_source_on_an_image_equals_the_three_channel_model_on_it_replicated():
    torch.manual_seed(1)
    source = randomise_bn(tiny(batch_norm=True, in_channels=1, init="xavier"))
    target = tiny(batch_norm=True, in_channels=3, init="xavier").eval()
    record = transfer_weights(target, source)
    assert record.adapted == {"conv1_1": "1 -> 3 input channels, the kernels repeated cyclically, times 1/3"}
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert source(x).abs().max() > 0.5
        torch.testing.assert_close(target(x.repeat(1, 3, 1, 1)), source(x), rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------------- the paper
def test_the_paper_scheme_loads_the_first_four_convs_and_the_three_fc_layers():
    torch.manual_seed(2)
    a = randomise_bn(tiny(A_LIKE, batch_norm=True, head="fitted"))
    b = tiny(B_LIKE, batch_norm=True, head="fitted")
    before = snapshot(b)
    record = transfer_weights(b, a, scheme="paper", name="runs/A", classes=TEN, source_classes=TEN)
    convs = ["conv1_1", "conv2_1", "conv3_1", "conv3_2"]
    assert record.loaded == [x for conv in convs for x in (conv, "bn" + conv[4:])] + \
        ["classifier.0", "classifier.3", "classifier.6"]
    assert set(record.reinitialised) == {f"{kind}{n}" for n in ("1_2", "2_2", "4_1", "4_2", "5_1", "5_2")
                                         for kind in ("conv", "bn")}
    assert set(record.reinitialised.values()) == {PAPER_REST}
    for layer in record.loaded:
        mine, theirs = tensors_of(b, layer), tensors_of(a, layer)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    layers = model_layers(b)
    untouched = [key for layer in record.reinitialised for key in layers[layer].values()]
    assert all(torch.equal(b.state_dict()[key], before[key]) for key in untouched)
    assert record.summary().startswith("loaded 34 tensors from runs/A (paper scheme: conv1_1, bn1_1, conv2_1, bn2_1, "
                                       "conv3_1, bn3_1, conv3_2, bn3_2, classifier.0, classifier.3, classifier.6); "
                                       "re-initialised: conv1_2, bn1_2, conv2_2, bn2_2, conv4_1")


def test_the_paper_scheme_through_build_run(tmp_path, train_run, train_options, capsys):
    config = resolve_config(**train_options(arch=[8, 8, "M", 16, 16, "M"], init_from=str(train_run["dir"]),
                                            init_scheme="paper", out=str(tmp_path / "b")))
    run = build_run(config)
    assert config.init_record is None  # the resolved configuration is never changed: the built run records it
    record = TransferRecord.from_dict(run.config.init_record)
    assert record.loaded == ["conv1_1", "conv2_1", "classifier.1"]  # SOURCE has two convs and one FC layer
    assert record.reinitialised == {"conv1_2": PAPER_REST, "conv2_2": PAPER_REST}
    assert capsys.readouterr().err == f"vggnet train: {record.summary()}\n"
    assert not (tmp_path / "b").exists()  # building writes nothing


# ---------------------------------------------------------------------------------------- another network
def test_a_quarter_width_source_is_refused_not_fine_tuned_from_two_tensors(tmp_path):
    """Only the classic head's FC2 (and FC3) fit a network of another width: that is no fine-tuning, but a user
    error naming how many convolutions fit and the option that builds SOURCE's architecture."""
    source = write_source(tmp_path / "quarter", tiny(A_LIKE, head="classic", width=0.25), TEN)
    target = tiny(A_LIKE, head="classic")
    with pytest.raises(ConfigError) as info:
        init_from_source(target, str(source), classes=TEN)
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"--init-from {source}: only 0 of the 8 convolution layers SOURCE shares with the model to train fit it "
        "(conv1_1: weight shape [4, 1, 3, 3], SOURCE's conv1_1 has [1, 1, 3, 3]); SOURCE is custom (arch")
    assert message.endswith("train SOURCE's architecture (--width 0.25)")
    assert transfer_weights(target, tiny(A_LIKE, head="classic", width=0.25)).tensors == 4  # FC2 and FC3 would load
    with pytest.raises(ConfigError, match="only 0 of the 4 convolution layers"):  # the paper's four
        init_from_source(tiny(B_LIKE, head="classic"), str(source), scheme="paper", classes=TEN)


@pytest.mark.parametrize("target_arch, loaded, refused", [
    ((8, "M", 16, "M", 16, "M"), ["conv1_1", "conv2_1", "conv3_1"], False),  # the same network
    ((8, "M", 16, "M", 32, "M"), ["conv1_1", "conv2_1"], False),  # 2 of 3 convs fit: a partial transfer
    ((8, "M", 32, "M", 32, "M"), None, True),  # 1 of 3: SOURCE is another network
    ((8, 8, "M", 16, 16, "M", 16, 16, "M"), ["conv1_1", "conv2_1", "conv3_1"], False),  # a deeper one: all it shares
    ((8, "M", 16, "M"), ["conv1_1", "conv2_1"], False),  # a shallower one
])
def test_at_least_half_of_the_shared_convolutions_must_fit(tmp_path, target_arch, loaded, refused):
    source = write_source(tmp_path / "src", tiny((8, "M", 16, "M", 16, "M")), TEN)
    target = tiny(target_arch)
    if refused:
        expected = (r"only 1 of the 3 convolution layers .* \(conv2_1: weight shape \[32, 8, 3, 3\], SOURCE's conv2_1 "
                    r"has \[16, 8, 3, 3\]\).*\(--arch 8,M,16,M,16,M\)$")
        with pytest.raises(ConfigError, match=expected):
            init_from_source(target, str(source), classes=TEN)
        return
    record = init_from_source(target, str(source), classes=TEN)
    assert [layer for layer in record.loaded if layer.startswith("conv")] == loaded


def test_the_paper_init_from_a_into_a_deeper_net_and_other_channels_still_load(tmp_path):
    source = write_source(tmp_path / "a", tiny(A_LIKE, head="fitted", in_channels=3), TEN)
    record = init_from_source(tiny(B_LIKE, head="fitted"), str(source), scheme="paper", classes=list("abcde"))
    assert record.loaded == ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "classifier.0", "classifier.3"]
    assert record.adapted == {"conv1_1": "3 -> 1 input channels, the sum of the kernels"}
    assert record.reinitialised["classifier.6"] == "new head for 5 classes"
    record = init_from_source(tiny(B_LIKE, head="fitted"), str(source), classes=TEN)  # scheme all: A's eight convs
    assert [layer for layer in record.loaded if layer.startswith("conv")] == [
        "conv1_1", "conv2_1", "conv3_1", "conv3_2", "conv4_1", "conv4_2", "conv5_1", "conv5_2"]


# ------------------------------------------------------------------------------------------ runs and records
def test_a_fine_tuning_run_starts_from_source_and_records_it(tmp_path, train_run, train_options):
    source = train_run["dir"]
    config = resolve_config(**train_options(batch_norm=True, init_from=str(source), epochs=1, out=str(tmp_path / "r")))
    run = build_run(config)
    theirs = load(source).model
    for layer in ("conv1_1", "conv2_1", "classifier.1"):
        mine = tensors_of(run.model, layer)
        assert all(torch.equal(mine[k], v) for k, v in tensors_of(theirs, layer).items())
    fit(run)
    expected = {"source": str(source), "scheme": "all", "loaded": ["conv1_1", "conv2_1", "classifier.1"],
                "tensors": 6, "adapted": {}, "reinitialised": {"bn1_1": "not in SOURCE", "bn2_1": "not in SOURCE"}}
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["init_record"] == expected
    assert (saved["init_from"], saved["init_scheme"], saved["freeze"], saved["loaded_lr_scale"]) == \
        (str(source), "all", [], 1.0)
    assert load(tmp_path / "r").card.train_config["init_record"] == expected


def test_the_cli_prints_one_line_with_the_new_head(tmp_path, train_cli, train_cli_args):
    source = write_source(tmp_path / "rgb", tiny(in_channels=3, num_classes=5), list("abcde"))
    code, out, err = train_cli(train_cli_args("--init-from", source, "--epochs", "1", "--out", tmp_path / "r"))
    assert code == 0, err
    assert err == (f"vggnet train: loaded 4 tensors from {source}; conv1_1 adapted: 3 -> 1 input channels, the sum of "
                   "the kernels; re-initialised: classifier.1 (new head for 10 classes)\n")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["init_record"]["adapted"] == \
        {"conv1_1": "3 -> 1 input channels, the sum of the kernels"}


def test_frozen_layers_stay_bit_identical_through_training(tmp_path, train_options):
    config = resolve_config(**train_options(batch_norm=True, freeze="block1,classifier", out=str(tmp_path / "r")))
    run = build_run(config)
    before = snapshot(run.model)
    frozen = {p for name in ("features.0", "features.1", "classifier.1")
              for p in run.model.get_submodule(name).parameters()}
    assert all(not p.requires_grad for p in frozen)
    in_optimizer = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in frozen}
    fit(run)
    after = load_tensors(tmp_path / "r" / "model.safetensors")
    fixed = [k for k in before if k.startswith(("features.0.", "features.1.", "classifier.1."))]
    assert len(fixed) == 9  # conv weight, bias; BN weight, bias, running mean and var, batches tracked; FC weight, bias
    assert all(torch.equal(after[k], before[k]) for k in fixed)
    assert not torch.equal(after["features.4.weight"], before["features.4.weight"])  # conv2_1 trained
    assert not torch.equal(after["features.5.running_mean"], before["features.5.running_mean"])  # bn2_1 tracked
    assert after["features.5.num_batches_tracked"] == 8 and after["features.1.num_batches_tracked"] == 0


def test_freeze_choices_name_blocks_convs_and_the_two_parts():
    assert freeze_choices(tiny(A_LIKE)) == ["features", "block1", "block2", "block3", "block4", "block5", "conv1_1",
                                            "conv2_1", "conv3_1", "conv3_2", "conv4_1", "conv4_2", "conv5_1",
                                            "conv5_2", "classifier"]


def test_the_loaded_layers_learn_at_the_scaled_rate(tmp_path, train_run, train_options):
    config = resolve_config(**train_options(batch_norm=True, init_from=str(train_run["dir"]), loaded_lr_scale=0.1,
                                            momentum=0.0, out=str(tmp_path / "r")))
    run = build_run(config)
    model, groups = run.model, run.optimizer.param_groups
    f = model.features
    expected = [([], 5e-4, 1.0), ([f[1].weight, f[1].bias, f[5].weight, f[5].bias], 0.0, 1.0),
                ([f[0].weight, f[4].weight, model.classifier[1].weight], 5e-4, 0.1),
                ([f[0].bias, f[4].bias, model.classifier[1].bias], 0.0, 0.1)]
    assert [([id(p) for p in g["params"]], g["weight_decay"], g["lr_scale"]) for g in groups] == \
        [([id(p) for p in params], decay, scale) for params, decay, scale in expected]
    run.net.train()
    seed_epoch(run, 0)
    images, labels = next(iter(run.loader))
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    train_step(run, images, labels, 0.05)
    assert [g["lr"] for g in groups] == [0.05, 0.05, 0.05 * 0.1, 0.05 * 0.1]
    for g in groups:  # plain SGD: p - lr * scale * (grad + decay * p)
        for p in g["params"]:
            old = before[id(p)]
            step = 0.05 * g["lr_scale"] * (p.grad + g["weight_decay"] * old)
            torch.testing.assert_close(p.detach(), old - step, rtol=0, atol=1e-7)
            assert (p.detach() - old).abs().max() > 0


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("extra, fragments", [
    (["--freeze", "conv1_1,conv9_9"], ["--freeze conv9_9: no such layer in custom; choose from features, block1, "
                                       "block2, conv1_1, conv2_1, classifier"]),
    (["--freeze", "features,classifier"], ["leaves no parameter to train"]),
    (["--init-from", "{tmp}/nowhere"], ["--init-from", "nowhere", "does not exist"]),
    (["--init-from", "{run}", "--width", "2"], ["none of its layers fits", "width 2.0", "width 1.0"]),
    (["--init-scheme", "paper"], ["--init-scheme paper", "give --init-from"]),
    (["--loaded-lr-scale", "0.1"], ["--loaded-lr-scale", "give --init-from"]),
])
def test_bad_input_is_one_line_and_writes_nothing(extra, fragments, tmp_path, train_run, train_cli, train_cli_args):
    extra = [a.format(tmp=tmp_path, run=train_run["dir"]) for a in extra]
    code, out, err = train_cli(train_cli_args(*extra, "--out", tmp_path / "r"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert all(fragment in err for fragment in fragments), err
    assert not (tmp_path / "r").exists()


def test_config_round_trip_and_checks():
    config = resolve_config(init_from="runs/a", freeze="features, conv5_1", loaded_lr_scale=0.5)
    assert config.freeze == ["features", "conv5_1"]
    assert resolve_config(**{k: v for k, v in config.to_dict().items() if k != "preset"}).to_dict() == config.to_dict()
    with pytest.raises(ConfigError, match="--loaded-lr-scale must be a positive number"):
        resolve_config(init_from="runs/a", loaded_lr_scale=0.0)
    with pytest.raises(ConfigError, match="--init-scheme must be one of all, paper"):
        resolve_config(init_from="runs/a", init_scheme="some")


# ------------------------------------------------------------------------------------------------------ resume
def test_resume_of_a_fine_tuned_run_is_bit_identical_and_never_reads_source(tmp_path, train_run, train_options):
    source = tmp_path / "source"
    shutil.copytree(train_run["dir"], source)
    options = dict(batch_norm=True, init_from=str(source), freeze=["conv1_1"], loaded_lr_scale=0.5)
    straight = fit(build_run(resolve_config(**train_options(**options, out=str(tmp_path / "a")))))
    fit(build_run(resolve_config(**train_options(**options, epochs=1, out=str(tmp_path / "b")))))
    shutil.rmtree(source)  # resume must take the weights from the state file
    resumed = resume(tmp_path / "b", epochs=2)
    a, b = load_tensors(tmp_path / "a" / "model.safetensors"), load_tensors(tmp_path / "b" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    state_a, state_b = (load_tensors(tmp_path / d / "state.safetensors") for d in ("a", "b"))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a if k.startswith("optimizer/"))
    timing = ("epoch_seconds", "train_images_per_second")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in straight["history"]]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in resumed["history"]]
    # The frozen, loaded conv1_1 is still SOURCE's, bit for bit.
    theirs = load_tensors(train_run["dir"] / "model.safetensors")
    assert torch.equal(b["features.0.weight"], theirs["features.0.weight"])
    assert torch.equal(b["features.0.bias"], theirs["features.0.bias"])
