"""The paper's test protocols on a prepared (streamed) test set (vggnet.evaluation.multiscale_streamed): every image
decoded from its own bytes with its smallest side at Q, whole and not square, against oracles written here with
Pillow and torch directly; and ``vggnet eval --dataset PREPARED --scales`` against the library call."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet import VGG, to_dense
from vggnet.data import Preprocess
from vggnet.data.paper import TestTransform
from vggnet.data.shards import prepare
from vggnet.data.stream import evaluation_set, open_prepared
from vggnet.evaluation.multiscale import Protocol, crop_grid, evaluate_multiscale, multiscale_log_probs
from vggnet.evaluation.multiscale_streamed import evaluate_multiscale_streamed, streamed_log_probs

S = 16  # the tiny models' training size
PREP = Preprocess(S, (0.5, 0.4, 0.3), (0.25, 0.3, 0.2))
# (width, height) of the test images of the mixed set: landscape, portrait, square, a second landscape of the first
# one's shape (the two go through the nets together), and a JPEG.
MIXED = {"a/wide.png": (30, 20), "b/tall.png": (20, 27), "c/square.png": (16, 16), "a/wide2.png": (30, 20),
         "b/photo.jpg": (24, 18)}


def write_image(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))


def prepared_set(root, test_images, classes=("a", "b", "c")):
    """A prepared set of ``test_images`` ({"CLASS/NAME": (width, height)}) and one training image per class."""
    for i, name in enumerate(classes):
        write_image(root / "images" / "train" / name / "0.png", (S, S), 100 + i)
    for i, (rel, size) in enumerate(test_images.items()):
        write_image(root / "images" / "test" / rel, size, i)
    prepare(root / "images", root / "prepared", max_side=64, shard_samples=3, progress=False)
    return root / "prepared"


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """The test split of a set of four S x S images."""
    root = prepared_set(tmp_path_factory.mktemp("square"),
                        {"a/0.png": (S, S), "b/1.png": (S, S), "c/2.jpg": (S, S), "a/3.png": (S, S)})
    return open_prepared(root)[1]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return open_prepared(prepared_set(tmp_path_factory.mktemp("mixed"), MIXED))[1]


def tiny_model(head, fill_reference, seed=1):
    model = VGG([8, "M", 16, "M"], batch_norm=True, num_classes=3, in_channels=3, head=head, input_size=S,
                hidden=16, name="tiny")
    return fill_reference(model, seed)


def original(split, i):
    """Sample ``i``'s stored bytes decoded by Pillow, as RGB."""
    with Image.open(io.BytesIO(split.sample(i)[0])) as image:
        return image.convert("RGB")


def rescaled(image, q):
    """``image`` with its shorter side at ``q``, the longer int(q * long / short), Pillow bilinear."""
    w, h = image.size
    size = (q, int(q * h / w)) if w <= h else (int(q * w / h), q)
    return image if min(w, h) == q else image.resize(size, Image.Resampling.BILINEAR)


def normalised(image):
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return (x - torch.tensor(PREP.mean).view(1, 3, 1, 1)) / torch.tensor(PREP.std).view(1, 3, 1, 1)


def index_of(split, size):
    return [i for i in range(len(split)) if original(split, i).size == size]


@torch.no_grad()
def oracle(model, split, scales, flip, crops=None, offsets=None):
    """log of the averaged probabilities, image by image, scale by scale: the dense net on the whole rescaled image
    (``crops`` None), or the original net on the crops at ``offsets[(height, width)]`` ((rows, columns) by hand)."""
    dense = model if model.head == "gap" else to_dense(model).eval()
    rows = []
    for i in range(len(split)):
        per_scale = []
        for q in scales:
            x = normalised(rescaled(original(split, i), q))
            if crops is None:
                views = [x]
            else:
                tops, lefts = offsets[tuple(x.shape[-2:])]
                views = [x[..., t:t + S, l:l + S] for t in tops for l in lefts]
            net = dense if crops is None else model
            probs = [net(v).softmax(1) for v in views] + ([net(v.flip(3)).softmax(1) for v in views] if flip else [])
            per_scale.append(torch.stack(probs).mean(0))
        rows.append(torch.stack(per_scale).mean(0))
    return torch.cat(rows).log()


@pytest.mark.parametrize("head", ["classic", "gap"])
@pytest.mark.parametrize("crops", [None, (2, 2)])
def test_square_images_at_their_own_size_give_exactly_the_in_memory_result(square, head, crops, fill_reference):
    model = tiny_model(head, fill_reference)
    images = evaluation_set(square, TestTransform(scale=S, crop=S), S).images.to("cpu")  # the in-memory tensor
    protocol = Protocol((S,), dense=True, crops=crops, flip=True)
    expected = multiscale_log_probs(model, images, PREP, protocol, "cpu", batch_size=4)
    got = streamed_log_probs(model, square, PREP, protocol, "cpu", batch_size=4, threads=2)
    assert torch.equal(got, expected)
    result, memory = (evaluate_multiscale_streamed(model, square, PREP, protocol, "cpu", batch_size=4),
                      evaluate_multiscale(model, _InMemory(images, square), PREP, protocol, "cpu", batch_size=4))
    assert result.to_dict() == memory.to_dict()


class _InMemory:
    def __init__(self, images, split):
        self.images, self.labels, self.classes = images, split.labels, list(split.classes)


@pytest.mark.parametrize("head", ["classic", "gap"])
@pytest.mark.parametrize("batch_size, threads", [(2, 2), (None, 1)])
def test_non_square_images_are_evaluated_whole_at_each_scale(mixed, head, batch_size, threads, fill_reference):
    """Dense + flip at two scales on landscape, portrait and square images against Pillow and the dense net by hand;
    chunks of 2 (decoded ahead by two threads) and one chunk of all."""
    model = tiny_model(head, fill_reference, seed=2)
    assert sorted(original(mixed, i).size for i in range(len(mixed))) == sorted(MIXED.values())
    expected = oracle(model, mixed, (16, 20), flip=True)
    got = streamed_log_probs(model, mixed, PREP, Protocol((16, 20), dense=True, flip=True), "cpu",
                             batch_size=batch_size, threads=threads)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert model.training is False


def test_same_shape_images_share_passes(mixed, fill_reference):
    """At Q = 20 the two 30x20 images go through the net together; each other image alone, its mirror beside it."""
    model = tiny_model("gap", fill_reference)
    passes = []
    model.register_forward_pre_hook(lambda module, args: passes.append(tuple(args[0].shape)))
    streamed_log_probs(model, mixed, PREP, Protocol((20,), dense=True, flip=True), "cpu", threads=1)
    assert sorted(passes) == sorted([(4, 3, 20, 30), (2, 3, 27, 20), (2, 3, 20, 20), (2, 3, 20, 26)])


# The crop grids by hand: rows from 0 to H - 16, columns from 0 to W - 16, three each, rounded half up.
GRIDS = {(20, 30): ([0, 2, 4], [0, 7, 14]),  # 30x20 at Q = 20: 0, 7, 14
         (27, 20): ([0, 6, 11], [0, 2, 4]),  # 20x27 at Q = 20: 0, 5.5, 11
         (20, 20): ([0, 2, 4], [0, 2, 4]),
         (20, 26): ([0, 2, 4], [0, 5, 10]),  # 24x18 at Q = 20 is 26x20
         (16, 24): ([0], [0, 4, 8]),  # at Q = 16: 30x20 is 24x16 (one row: 0 three times, counted once)
         (21, 16): ([0, 3, 5], [0]),  # 20x27 is 16x21: 0, 2.5, 5
         (16, 16): ([0], [0]),
         (16, 21): ([0], [0, 3, 5])}  # 24x18 is 21x16


def test_a_crop_grid_spans_each_side_of_the_rescaled_image(mixed, fill_reference):
    for (h, w), (tops, lefts) in GRIDS.items():
        assert crop_grid(h, w, S, (3, 3)) == [(t, l) for t in tops for l in lefts], (h, w)
    model = tiny_model("fitted", fill_reference, seed=3)
    tall = mixed.take(index_of(mixed, (20, 27)))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    got = streamed_log_probs(model, tall, PREP, Protocol((20,), crops=(3, 3)), "cpu", threads=1)
    x = normalised(original(tall, 0))  # already 20 on its shorter side
    assert len(seen) == 1 and seen[0].shape == (9, 3, S, S)  # the crops of one image in one pass
    expected_crops = torch.cat([x[..., t:t + S, l:l + S] for t in (0, 6, 11) for l in (0, 2, 4)])
    torch.testing.assert_close(seen[0], expected_crops, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, oracle(model, tall, (20,), False, (3, 3), GRIDS), rtol=1e-5, atol=1e-6)


def test_combined_protocol_on_every_shape(mixed, fill_reference):
    """Dense + 3x3 crops + flips at two scales: the mean of the dense and multi-crop oracles."""
    model = tiny_model("classic", fill_reference, seed=4)
    protocol = Protocol((16, 20), dense=True, crops=(3, 3), flip=True)
    got = streamed_log_probs(model, mixed, PREP, protocol, "cpu", batch_size=3, threads=2)
    dense = oracle(model, mixed, (16, 20), True).exp()
    crops = oracle(model, mixed, (16, 20), True, (3, 3), GRIDS).exp()
    torch.testing.assert_close(got, ((dense + crops) / 2).log(), rtol=1e-5, atol=1e-6)
    result = evaluate_multiscale_streamed(model, mixed, PREP, protocol, "cpu", batch_size=3)
    assert result.n == len(mixed) and result.classes == ["a", "b", "c"]
    pred = got.argmax(1)
    assert result.top1 == int((pred == mixed.labels).sum()) / len(mixed)
    assert result.confusion == [[int(((mixed.labels == t) & (pred == p)).sum()) for p in range(3)] for t in range(3)]
    assert result.loss == pytest.approx(-got[torch.arange(len(mixed)), mixed.labels].mean().item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------------------ CLI
def test_cli_eval_scales_on_a_prepared_set_is_the_library_call(cli, train_run, tmp_path):
    """``vggnet eval RUN --dataset PREPARED --scales 32,40 --dense --flip`` (a 1-channel Fashion-MNIST run on a
    10-class prepared set of non-square colour images, decoded grey) records what the library computes, and not the
    rescaled centre squares of the single-scale decode."""
    import vggnet
    from vggnet.evaluation.testset import load_test_set

    sizes = [(40, 30), (30, 44), (36, 36), (50, 32), (32, 41), (45, 33), (33, 33), (60, 40), (34, 48), (38, 35)]
    classes = [f"c{i}" for i in range(10)]
    prepared = prepared_set(tmp_path / "set", {f"c{i}/{i}.png": size for i, size in enumerate(sizes)}, classes)
    out = tmp_path / "ev"
    code, stdout, err = cli(["eval", train_run["dir"], "--dataset", prepared, "--scales", "32,40", "--dense",
                             "--flip", "--device", "cpu", "--threads", "1", "--json", "--out", out])
    assert code == 0, err
    record = json.loads(stdout)
    loaded = vggnet.load(train_run["dir"], device="cpu")
    test = load_test_set(loaded, str(prepared))
    protocol = Protocol((32, 40), dense=True, flip=True)
    api = evaluate_multiscale_streamed(loaded.model, test, loaded.preprocess, protocol, "cpu")
    assert record["protocol"] == protocol.to_dict() and record["n"] == 10
    assert (record["top1"], record["top5"], record["confusion"]) == (api.top1, api.top5, api.confusion)
    assert record["loss"] == pytest.approx(api.loss, rel=1e-6)
    assert json.loads((out / "eval.json").read_text())["loss"] == record["loss"]
    squares = evaluate_multiscale(loaded.model, test, loaded.preprocess, protocol, "cpu")  # the old way
    assert squares.loss != pytest.approx(api.loss, rel=1e-3)


def test_the_load_is_polled_before_each_chunk(mixed, fill_reference, monkeypatch):
    """``adaptive`` (``Runtime.adaptive``) is polled once per chunk, so the net's CPU thread count follows the load."""
    model = tiny_model("gap", fill_reference)
    polls = []

    class Load:
        def poll(self):
            polls.append(1)

    streamed_log_probs(model, mixed, PREP, Protocol((16,), dense=True), "cpu", batch_size=2, threads=1,
                       adaptive=Load())
    assert len(polls) == (len(mixed) + 1) // 2
