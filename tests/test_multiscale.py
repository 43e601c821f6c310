"""The paper's test protocols (vggnet.evaluation.multiscale, ``vggnet eval --scales``) against a hand-written loop.

The oracle below walks images, scales, crop positions and flips one at a time with torch ops directly
(F.interpolate, slicing, softmax, mean), with the crop offsets listed by hand; the library batches all of that and
averages in log space. Everything runs on the CPU (device "cpu" explicitly).
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from vggnet import VGG, to_dense
from vggnet.data import ImageDataset, Preprocess
from vggnet.base.errors import ConfigError, InputSizeError
from vggnet.evaluation.metrics import evaluate, predict_logits
from vggnet.evaluation.multiscale import (Protocol, crop_positions, evaluate_multiscale, grid_offsets, multiscale_log_probs,
                               parse_crops, parse_scales)

S = 8  # the tiny model's training size; its 6x6 test images are padded to 8x8 by the preprocessing
PREP = Preprocess(S, (0.4,), (0.3,), fit="auto", in_size=6)
# Crop offsets by hand, per test scale and grid side: evenly spaced from 0 to Q - S, rounded half up, no repeats.
OFFSETS = {(8, 2): [0], (8, 3): [0],
           (11, 2): [0, 3], (11, 3): [0, 2, 3],  # 0, 1.5, 3
           (12, 2): [0, 4], (12, 3): [0, 2, 4]}


def tiny_model(head, fill_reference, seed=1):
    model = VGG([8, "M", 16, "M"], batch_norm=True, num_classes=3, in_channels=1, head=head, input_size=S,
                hidden=16, name="tiny")
    return fill_reference(model, seed)


def tiny_dataset(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 6, 6), generator=gen, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1][:n])
    return ImageDataset(images, labels, ["a", "b", "c"], "tiny")


@torch.no_grad()
def oracle_log_probs(model, images, scales, dense, crops, flip):
    """log of the averaged probabilities, image by image, scale by scale, crop by crop, flip by flip."""
    dense_net = model if model.head == "gap" else to_dense(model).eval()
    rows = []
    for image in images:
        x = PREP(image[None])
        per_scale = []
        for q in scales:
            xq = x if q == S else F.interpolate(x, size=(q, q), mode="bilinear", align_corners=False,
                                                antialias=q < S)
            parts = []
            if dense:
                probs = [dense_net(xq).softmax(1)]
                if flip:
                    probs.append(dense_net(xq.flip(3)).softmax(1))
                parts.append(torch.stack(probs).mean(0))
            if crops:
                probs = []
                for top in OFFSETS[(q, crops[0])]:
                    for left in OFFSETS[(q, crops[1])]:
                        crop = xq[:, :, top:top + S, left:left + S]
                        probs.append(model(crop).softmax(1))
                        if flip:
                            probs.append(model(crop.flip(3)).softmax(1))
                parts.append(torch.stack(probs).mean(0))
            per_scale.append(torch.stack(parts).mean(0))
        rows.append(torch.stack(per_scale).mean(0))
    return torch.cat(rows).log()


CASES = [  # head, scales, dense, crops (rows, columns), flip
    ("classic", (8, 12), True, None, False),
    ("fitted", (8, 11, 12), True, None, True),
    ("gap", (6, 8, 11), True, None, True),  # 6 < S: shrunk with antialiasing; a gap head takes any size >= 4
    ("fitted", (8, 12), False, (3, 3), False),
    ("classic", (11, 12), False, (2, 3), True),
    ("fitted", (8, 11, 12), True, (3, 3), True),  # combined (Table 5)
    ("gap", (8, 12), True, (3, 2), False),
]


@pytest.mark.parametrize("head, scales, dense, crops, flip", CASES)
def test_protocols_equal_the_hand_written_loop(head, scales, dense, crops, flip, fill_reference):
    model, data = tiny_model(head, fill_reference), tiny_dataset()
    protocol = Protocol(scales, dense=dense, crops=crops, flip=flip)
    expected = oracle_log_probs(model, data.images, scales, dense, crops, flip)
    got = multiscale_log_probs(model, data.images, PREP, protocol, "cpu", batch_size=2)  # chunks of 2, 2, 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert model.training is False

    result = evaluate_multiscale(model, data, PREP, protocol, "cpu", batch_size=2)
    pred = expected.argmax(1)
    assert result.top1 == int((pred == data.labels).sum()) / 5
    assert result.confusion == [[int(((data.labels == t) & (pred == p)).sum()) for p in range(3)] for t in range(3)]
    assert result.loss == pytest.approx(-expected[torch.arange(5), data.labels].mean().item(), rel=1e-5)
    assert result.n == 5 and result.classes == ["a", "b", "c"]


@pytest.mark.parametrize("head", ["classic", "fitted", "gap"])
@pytest.mark.parametrize("flip", [False, True])
def test_dense_at_the_training_size_is_plain_evaluation(head, flip, fill_reference):
    model, data = tiny_model(head, fill_reference, seed=3), tiny_dataset(8, seed=3)
    tta = "flip" if flip else None
    plain = predict_logits(model, data.images, PREP, torch.device("cpu"), tta=tta).log_softmax(1)
    dense = multiscale_log_probs(model, data.images, PREP, Protocol((S,), dense=True, flip=flip), "cpu")
    torch.testing.assert_close(dense, plain, rtol=1e-5, atol=1e-5)
    a = evaluate(model, data, PREP, "cpu", tta=tta)
    b = evaluate_multiscale(model, data, PREP, Protocol((S,), dense=True, flip=flip), "cpu")
    assert (b.top1, b.top5, b.confusion) == (a.top1, a.top5, a.confusion)
    assert b.loss == pytest.approx(a.loss, rel=1e-5)


def test_the_paper_grid_offsets_by_hand():
    assert grid_offsets(36, 32, 5) == [0, 1, 2, 3, 4]
    assert crop_positions(36, 32, (5, 5)) == [
        (0, 0), (0, 1), (0, 2), (0, 3), (0, 4),
        (1, 0), (1, 1), (1, 2), (1, 3), (1, 4),
        (2, 0), (2, 1), (2, 2), (2, 3), (2, 4),
        (3, 0), (3, 1), (3, 2), (3, 3), (3, 4),
        (4, 0), (4, 1), (4, 2), (4, 3), (4, 4)]
    assert grid_offsets(256, 224, 5) == [0, 8, 16, 24, 32]  # the paper's 224 crops at Q = 256
    assert grid_offsets(35, 32, 5) == [0, 1, 2, 3]  # 0, 0.75, 1.5, 2.25, 3 rounded half up: 2 once
    assert grid_offsets(40, 32, 1) == [4]  # one crop: the centre
    assert crop_positions(44, 32, (2, 3)) == [(0, 0), (0, 6), (0, 12), (12, 0), (12, 6), (12, 12)]


def test_at_the_training_size_the_grid_is_one_crop_counted_once(fill_reference):
    assert grid_offsets(32, 32, 5) == [0] and crop_positions(32, 32, (5, 5)) == [(0, 0)]
    model, data = tiny_model("fitted", fill_reference), tiny_dataset()
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        crops = multiscale_log_probs(model, data.images, PREP, Protocol((S,), crops=(5, 5), flip=True), "cpu")
    finally:
        hook.remove()
    assert sum(seen) == 2 * len(data)  # each image once and its mirror once, not 25 times each
    plain = predict_logits(model, data.images, PREP, torch.device("cpu"), tta="flip").log_softmax(1)
    torch.testing.assert_close(crops, plain, rtol=1e-5, atol=1e-5)


def test_protocol_parsing_and_description():
    assert parse_scales("32,40, 48") == (32, 40, 48) and parse_crops("5x5") == (5, 5) and parse_crops("2x3") == (2, 3)
    for bad in ("", "32,", "32;40", "0,32", "-32", "3.5"):
        with pytest.raises(ConfigError, match="--scales expects"):
            parse_scales(bad)
    with pytest.raises(ConfigError, match="twice"):
        parse_scales("32,40,32")
    for bad in ("5", "5x", "x5", "0x5", "5x5x5", "axb"):
        with pytest.raises(ConfigError, match="--crops expects"):
            parse_crops(bad)
    with pytest.raises(ConfigError, match="dense=True, crops"):
        Protocol((32,))
    assert Protocol((32, 40, 48), dense=True, flip=True).describe() == "dense Q=32,40,48 + flip"
    assert Protocol((32,), crops=(5, 5)).describe() == "5x5 crops Q=32"
    assert Protocol((32, 40), dense=True, crops=(5, 5)).describe() == "dense + 5x5 crops Q=32,40"
    assert Protocol([32, 40], dense=True, crops=[5, 5]).to_dict() == {"scales": [32, 40], "dense": True,
                                                                       "crops": [5, 5], "flip": False}


@pytest.mark.parametrize("head, protocol, smallest", [
    ("classic", Protocol((7, 8), dense=True), 8),  # the dense form of the head was sized for 8x8
    ("fitted", Protocol((8, 12), dense=True), None),
    ("gap", Protocol((4, 8), dense=True), None),  # two max-pools: 4 is enough
    ("gap", Protocol((3,), dense=True), 4),
    ("gap", Protocol((7, 12), crops=(2, 2)), 8),  # 8x8 crops
])
def test_too_small_scales_are_refused_before_running(head, protocol, smallest, fill_reference):
    model, data = tiny_model(head, fill_reference), tiny_dataset(2)
    if smallest is None:
        assert multiscale_log_probs(model, data.images, PREP, protocol, "cpu").shape == (2, 3)
        return
    ran = []
    model.register_forward_pre_hook(lambda module, args: ran.append(True))
    with pytest.raises(InputSizeError, match=f"at least {smallest}"):
        multiscale_log_probs(model, data.images, PREP, protocol, "cpu")
    assert not ran  # refused before any forward pass


# ------------------------------------------------------------------------------------------------------------ CLI
def test_cli_records_the_protocol_and_prints_the_api_top1(cli, train_run, train_data_dir, tmp_path):
    import vggnet
    from vggnet.data import load_dataset

    out = tmp_path / "ev"
    code, stdout, err = cli(["eval", train_run["dir"], "--data-dir", train_data_dir, "--scales", "32,40",
                             "--dense", "--crops", "2x2", "--flip", "--device", "cpu", "--threads", "1", "--out",
                             out])
    assert code == 0, err
    loaded = vggnet.load(train_run["dir"], device="cpu")
    _, test = load_dataset("fashion-mnist", str(train_data_dir), 32)
    protocol = Protocol((32, 40), dense=True, crops=(2, 2), flip=True)
    api = evaluate_multiscale(loaded.model, test, loaded.preprocess, protocol, "cpu")
    headline = re.search(r"dense \+ 2x2 crops Q=32,40 \+ flip: top-1 ([\d.]+)%", stdout)
    assert headline, stdout
    assert headline.group(1) == f"{100 * api.top1:.2f}"
    record = json.loads((out / "eval.json").read_text())
    assert record["protocol"] == {"scales": [32, 40], "dense": True, "crops": [2, 2], "flip": True}
    assert record["top1"] == api.top1 and record["confusion"] == api.confusion and record["n"] == 64


def test_cli_dense_is_the_default_with_scales(cli, train_run, train_data_dir, tmp_path):
    code, stdout, err = cli(["eval", train_run["dir"], "--data-dir", train_data_dir, "--scales", "32",
                             "--device", "cpu", "--threads", "1", "--json", "--out", tmp_path / "ev-default"])
    assert code == 0, err
    record = json.loads(stdout)
    assert record["protocol"] == {"scales": [32], "dense": True, "crops": None, "flip": False}
    # A gap model at its training size: dense evaluation is plain evaluation.
    code, plain_out, err = cli(["eval", train_run["dir"], "--data-dir", train_data_dir, "--device", "cpu",
                                "--threads", "1", "--json", "--out", tmp_path / "ev-plain"])
    assert code == 0, err
    assert json.loads(plain_out)["top1"] == record["top1"] and "protocol" not in json.loads(plain_out)


@pytest.mark.parametrize("extra, fragments", [
    (["--scales", "2,32"], ["test scale 2 is too small", "at least 4"]),  # two max-pools
    (["--scales", "24,32", "--crops", "5x5"], ["test scale 24", "32x32 crops", "at least 32"]),
    (["--scales", "32,x"], ["--scales expects", "'32,x'"]),
    (["--scales", "32,32"], ["twice"]),
    (["--scales", "32", "--crops", "5"], ["--crops expects", "5x5"]),
    (["--flip"], ["--tta flip", "--scales"]),
    (["--dense"], ["--dense needs the test scales", "--scales"]),
    (["--crops", "5x5", "--flip"], ["--crops and --flip need", "--scales"]),
    (["--scales", "32", "--tta", "flip"], ["--flip instead"]),
])
def test_cli_bad_protocols_are_one_line_errors(cli, one_line_error, train_run, train_data_dir, extra, fragments):
    code, _, err = cli(["eval", train_run["dir"], "--data-dir", train_data_dir, "--device", "cpu", "--threads", "1",
                        *extra])
    one_line_error(code, err, *fragments)
