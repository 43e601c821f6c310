"""Prepared datasets streamed from their shards (issue 21): exact order and augmentation whatever the workers and
ranks, resume from any batch, training and evaluation through the same CLI, and one-line errors for bad input."""

import functools
import http.server
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet.base.errors import DataError
from vggnet.data.loader import BatchLoader
from vggnet.data.paper import TestTransform, TrainTransform
from vggnet.data.shards import prepare
from vggnet.data.stream import StreamLoader, evaluation_set, is_prepared, open_prepared, sample_seed

CLASSES = ("ant", "bee", "cat")


def write_folder(root, per_class=8, size=(40, 30), seed=0):
    """A class-per-folder tree of PNG and JPEG images whose brightness follows the class (learnable)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.integers(0, 120, (size[1], size[0], 3)) + 60 * c, 0, 255).astype(np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(root / name / f"{i}.{ext}")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    folder = write_folder(root / "images")
    prepare(folder, root / "prepared", max_side=32, shard_samples=5, progress=False)
    return root / "prepared"


def decode_all(loader, start=0):
    return [(x.clone(), y.clone()) for x, y in loader.iterate(start)]


def test_a_prepared_directory_is_recognised_and_opened_without_reading_images(prepared, tmp_path):
    assert is_prepared(str(prepared)) and not is_prepared(str(tmp_path))
    train, test = open_prepared(prepared)
    assert train.classes == list(CLASSES) and len(train) + len(test) == 24
    assert sorted(torch.bincount(train.labels, minlength=3).tolist() + torch.bincount(test.labels).tolist()) != []
    data, label, name = train.sample(0)
    assert data[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb") and label == int(train.labels[0])


def test_the_order_is_batch_loaders_and_the_same_for_any_workers(prepared):
    """The same images, bit for bit, with 0 and 2 worker processes; the sample order is BatchLoader's."""
    train, _ = open_prepared(prepared)
    transform = TrainTransform(scale=(20, 32), crop=16, colour=0.1)
    runs = []
    for workers in (0, 2):
        loader = StreamLoader(train, transform, 4, shuffle=True, drop_last=True, seed=3, workers=workers)
        loader.set_epoch(1)
        runs.append(decode_all(loader))
    assert len(runs[0]) == len(train) // 4
    for (x0, y0), (x2, y2) in zip(*runs):
        assert torch.equal(x0, x2) and torch.equal(y0, y2) and x0.dtype == torch.uint8 and x0.shape == (4, 3, 16, 16)
    reference = BatchLoader(train, 4, shuffle=True, drop_last=True, seed=3)
    reference.set_epoch(1)
    order = reference.indices()[:len(runs[0]) * 4]
    assert torch.equal(torch.cat([y for _, y in runs[0]]), train.labels[order])
    # each sample's augmentation is its own seed's: (seed, epoch, sample) alone
    first = int(order[0])
    data, _, name = train.sample(first)
    assert torch.equal(runs[0][0][0][0], transform(data, name, sample_seed(3, 1, first)))


def test_ranks_read_disjoint_equal_shares_whose_union_is_the_global_batches(prepared):
    train, _ = open_prepared(prepared)
    transform = TestTransform(scale=16, crop=16)
    single = StreamLoader(train, transform, 4, shuffle=True, drop_last=True, seed=5)
    ranks = [StreamLoader(train, transform, 2, shuffle=True, drop_last=True, seed=5, rank=r, world_size=2)
             for r in range(2)]
    mine = [set(r.indices()[:len(r) * 2].tolist()) for r in ranks]
    assert not mine[0] & mine[1] and len(ranks[0]) == len(ranks[1]) == len(single)
    batches = [decode_all(r) for r in ranks]
    for step, (x, y) in enumerate(decode_all(single)):
        assert torch.equal(x, torch.cat([batches[0][step][0], batches[1][step][0]]))


def test_a_resumed_epoch_continues_with_the_same_batches(prepared):
    train, _ = open_prepared(prepared)
    loader = StreamLoader(train, TrainTransform(scale=24, crop=16), 3, shuffle=True, drop_last=True, seed=1)
    loader.set_epoch(2)
    whole = decode_all(loader)
    later = decode_all(loader, start=2)
    assert len(later) == len(whole) - 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[2:], later))


def test_selections_relabel_as_in_memory_sets_do(prepared):
    train, _ = open_prepared(prepared)
    picked = train.select_classes([2, 0])
    assert picked.classes == ["cat", "ant"] and set(picked.labels.tolist()) <= {0, 1}
    assert len(picked) == int((train.labels == 2).sum() + (train.labels == 0).sum())
    data, label, _ = picked.sample(0)
    assert label == int(picked.labels[0])
    assert len(picked.subset(3)) == 3 and picked.subset(3).labels.tolist() == picked.labels[:3].tolist()


def test_evaluation_reads_the_test_split_decoded_on_demand(prepared):
    _, test = open_prepared(prepared)
    view = evaluation_set(test, TestTransform(scale=20, crop=16), 16)
    assert view.images.shape == (len(test), 3, 16, 16) and len(view) == len(test)
    part = view.images[2:5].to("cpu")
    data, _, name = test.sample(3)
    assert part.shape == (3, 3, 16, 16) and torch.equal(part[1], TestTransform(scale=20, crop=16)(data, name, 0))


def test_train_and_eval_stream_from_a_prepared_directory(prepared, tmp_path, cli):
    run = tmp_path / "run"
    code, out, err = cli(["train", "--dataset", str(prepared), "--model", "custom", "--arch", "8,M,16,M",
                          "--head", "gap", "--image-size", "16", "--scale", "18", "24", "--batch-size", "4",
                          "--epochs", "2", "--lr", "0.05", "--schedule", "constant", "--workers", "0",
                          "--threads", "1", "--device", "cpu", "--precision", "fp32", "--json", "--out", str(run)])
    assert code == 0, err
    assert "streamed from their shards" in err
    result = json.loads(out)
    card = json.loads((run / "model.json").read_text())
    assert card["preprocess"]["crop_fraction"] == 16 / 21 and card["dataset"] == str(prepared)
    code, out, err = cli(["eval", str(run), "--json", "--device", "cpu"])
    assert code == 0, err
    record = json.loads(out)
    _, test = open_prepared(prepared)
    assert record["n"] == len(test)
    assert record["top1"] == pytest.approx(result["test_acc"], abs=1e-9)  # the same images, the same model
    code, out, err = cli(["eval", str(run), "--scales", "16,20", "--dense", "--json", "--device", "cpu"])
    assert code == 0, err
    assert json.loads(out)["n"] == len(test) and json.loads(out)["protocol"]["scales"] == [16, 20]


def test_a_truncated_shard_is_one_line_naming_it(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:600])
    train, _ = open_prepared(copy)
    with pytest.raises(DataError, match=r"train-000000.tar is truncated"):
        for i in range(len(train)):
            train.sample(i)


def test_a_remote_base_streams_and_a_dead_one_is_one_line(prepared):
    handler = functools.partial(QuietHandler, directory=str(prepared))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        train, _ = open_prepared(url)
        local, _ = open_prepared(prepared)
        assert train.sample(4)[0] == local.sample(4)[0] and torch.equal(train.labels, local.labels)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(DataError, match=rf"^{url}/manifest.json does not answer"):
        open_prepared(url)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with byte ranges (the reader asks for one sample's bytes) and logs nothing."""

    def log_message(self, *args):
        pass

    def send_head(self):
        ranged = self.headers.get("Range")
        if not ranged:
            return super().send_head()
        path = self.translate_path(self.path)
        start, end = (int(v) for v in ranged.split("=")[1].split("-"))
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        import io

        return io.BytesIO(body)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_sample_is_one_line_naming_it_also_from_a_worker(prepared, tmp_path, workers):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    train, _ = open_prepared(copy)
    row = train.index[1]
    shard = copy / train.reader.files[int(row["shard"])]
    data = bytearray(shard.read_bytes())
    data[int(row["offset"]):int(row["offset"]) + int(row["size"])] = b"\0" * int(row["size"])  # not an image any more
    shard.write_bytes(bytes(data))
    loader = StreamLoader(open_prepared(copy)[0], TestTransform(scale=16, crop=16), 4, shuffle=False, workers=workers)
    with pytest.raises(DataError) as caught:
        list(loader)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message and f"{int(row['shard']):06d}.tar:000000001" in message
