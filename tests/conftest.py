"""Shared fixtures. Fixtures of the data tests are prefixed ``data_``.

Markers: ``cpu_bf16`` marks a test that runs bf16 convolutions on the CPU; it is skipped where oneDNN cannot
(an AVX2-only CPU: :func:`vggnet.runtime.cpu_runs_bf16`). ``cuda`` marks a test that needs a CUDA device.
"""

import gzip
import struct

import numpy as np
import pytest
import torch


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    """Isolate dataset lookup: no $VGGNET_DATA, caches under tmp_path, no system dataset directories."""
    from vggnet.data import DATASETS

    monkeypatch.delenv("VGGNET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    for info in DATASETS.values():
        monkeypatch.setitem(info, "system_dirs", [str(tmp_path / "no-system-dir")])
    return tmp_path


def _write_idx(path, array, gz=False):
    """Write a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims), gzipped when ``gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">I", 0x800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def data_write_idx():
    """The IDX writer: ``data_write_idx(path, array, gz=False)``."""
    return _write_idx


@pytest.fixture
def data_fake_fashion_mnist():
    """Factory: write a tiny Fashion-MNIST (train 6 / test 4 images of 28x28) into a directory; returns arrays."""

    def make(directory, gz=True, seed=0):
        rng = np.random.default_rng(seed)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for prefix, n in (("train", 6), ("t10k", 4)):
            images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            labels = rng.integers(0, 10, size=n, dtype=np.uint8)
            suffix = ".gz" if gz else ""
            _write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
            _write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
            arrays[prefix] = (images, labels)
        return arrays

    return make


# ------------------------------------------------------------------------------------------- training fixtures
# A tiny Fashion-MNIST (128 train / 64 test, labels i % 10 so every class is in the test set) and a tiny model,
# so that one epoch is 4 steps and a run takes about a second. Fixtures of the training tests are prefixed ``train_``.
TRAIN_N_TRAIN, TRAIN_N_TEST = 128, 64


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory):
    """A directory holding the four gzipped Fashion-MNIST IDX files of the tiny data set."""
    directory = tmp_path_factory.mktemp("train-fashion-mnist")
    rng = np.random.default_rng(1234)
    for prefix, n in (("train", TRAIN_N_TRAIN), ("t10k", TRAIN_N_TEST)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        # A class-dependent brightness on top of noise: learnable, but not trivially.
        images = rng.integers(0, 160, size=(n, 28, 28)) + 9 * labels[:, None, None]
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images.astype(np.uint8), gz=True)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels, gz=True)
    return directory


@pytest.fixture(scope="session")
def train_options(train_data_dir):
    """Factory: the tiny run's training options (every hyperparameter explicit), updated with ``overrides``."""
    base = dict(model="custom", arch=[8, "M", 16, "M"], width=1.0, head="gap", dropout=0.1,
                data_dir=str(train_data_dir), image_size=32, batch_size=32, epochs=2, optimizer="sgd", lr=0.05,
                momentum=0.9, weight_decay=5e-4, schedule="constant", warmup_epochs=0.0, label_smoothing=0.0,
                crop_padding=2, seed=0, progress=False, threads=1, precision="fp32", device="cpu")

    def make(**overrides):
        return {**base, **overrides}

    return make


@pytest.fixture(scope="session")
def train_cli_args(train_data_dir):
    """Factory: ``vggnet train`` arguments equal to ``train_options()`` (plus ``extra``)."""

    def make(*extra):
        return ["train", "--model", "custom", "--arch", "8,M,16,M", "--width", "1", "--head", "gap", "--dropout", "0.1",
                "--data-dir", str(train_data_dir), "--image-size", "32", "--batch-size", "32", "--epochs", "2",
                "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--weight-decay", "5e-4", "--schedule",
                "constant", "--warmup-epochs", "0", "--label-smoothing", "0", "--crop-padding", "2", "--seed", "0",
                "--no-progress", "--threads", "1", "--precision", "fp32", "--device", "cpu", *extra]

    return make


@pytest.fixture(scope="session")
def train_run(tmp_path_factory, train_options):
    """Run A: two epochs straight through ``vggnet.training.train``. Read only: copy it before changing anything."""
    from vggnet.training import resolve_config, train

    run_dir = tmp_path_factory.mktemp("run-a") / "run"
    config = resolve_config(**train_options(out=str(run_dir)))
    result = train(config)
    return {"dir": run_dir, "config": config, "result": result}


@pytest.fixture(scope="session")
def train_run_one_epoch(tmp_path_factory, train_options):
    """The same run stopped after one epoch (built and fitted in steps, keeping the in-memory model). Read only."""
    import copy

    from vggnet.training import build_run, fit, resolve_config

    run_dir = tmp_path_factory.mktemp("run-one") / "run"
    config = resolve_config(**train_options(epochs=1, out=str(run_dir)))
    run = build_run(config)
    result = fit(run)
    return {"dir": run_dir, "config": config, "result": result,
            "model": copy.deepcopy(run.model).eval(), "preprocess": run.preprocess, "test_set": run.test_set}


@pytest.fixture
def train_run_copy(tmp_path, train_run_one_epoch):
    """A writable copy of the one-epoch run's directory."""
    import shutil

    target = tmp_path / "run"
    shutil.copytree(train_run_one_epoch["dir"], target)
    return target


@pytest.fixture
def cli(capsys):
    """Run the ``vggnet`` CLI in-process: ``cli([...]) -> (exit code, stdout, stderr)``."""
    from vggnet.cli import main

    def run(argv):
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:
            code = 0 if stop.code is None else stop.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def train_cli(cli):
    """The CLI runner under the name the training tests use."""
    return cli


def _assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def one_line_error():
    """``one_line_error(code, err, *fragments)``: exit status 2 and one line on stderr holding every fragment."""
    return _assert_one_line_error


def _fill_reference(model, seed=1):
    """Deterministic He-uniform weights and non-trivial BN statistics, so equal outputs mean equal maths."""
    import math

    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                bound = math.sqrt(6.0 / module.weight[0].numel())
                module.weight.uniform_(-bound, bound, generator=gen)
                module.bias.uniform_(-0.1, 0.1, generator=gen)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.uniform_(-0.2, 0.2, generator=gen)
                module.running_mean.uniform_(-0.2, 0.2, generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
                module.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="session")
def fill_reference():
    """``fill_reference(model, seed=1) -> model``: the reference models' deterministic weights (eval mode)."""
    return _fill_reference


@pytest.fixture
def train_snapshot():
    """``train_snapshot(directory) -> {relative path: bytes}`` of every file below ``directory``."""

    def snap(directory):
        return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}

    return snap


# ------------------------------------------------------------------------------------------------ device markers
def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_bf16: runs bf16 convolutions on the CPU (skipped where they cannot run)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    import torch

    from vggnet.runtime import cpu_runs_bf16

    skips = {"cpu_bf16": (cpu_runs_bf16(), "this CPU cannot run bf16 convolutions (oneDNN needs AVX512 or AMX)"),
             "cuda": (torch.cuda.is_available(), "no CUDA device")}
    for item in items:
        for marker, (available, reason) in skips.items():
            if marker in item.keywords and not available:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def auto_device_means_cpu(request, monkeypatch):
    """Every test means a device: the CPU, unless it is marked ``cuda``. A test that leaves ``--device`` at its default
    ``auto`` (the in-process CLI of eval, predict, features ...) would otherwise put its model on a GPU where there is
    one and compare it with numbers computed on the CPU; here ``auto`` resolves to the CPU instead."""
    if request.node.get_closest_marker("cuda") is not None:
        return
    from vggnet import runtime

    pick = runtime.pick_device
    monkeypatch.setattr(runtime, "pick_device", lambda requested="auto": pick("cpu" if requested == "auto" else requested))


# ------------------------------------------------------------------------------------------------ image files
IMAGE_ORANGE, IMAGE_BLUE = (200, 100, 50), (10, 20, 250)  # the colours of the two halves (tests repeat them)


@pytest.fixture
def image_files(tmp_path):
    """Files of every kind predict must read: colour, transparency, palette, large, tiny, JPEG. ``rgb``, ``rgba``
    and ``palette`` are 28x28 with an orange left half and a blue right half (transparent in ``rgba`` and
    ``palette``)."""
    from PIL import Image

    def halves(left, right, mode="RGB", size=(28, 28)):
        image = Image.new(mode, size, left)
        image.paste(right, (size[0] // 2, 0, size[0], size[1]))
        return image

    rng = np.random.default_rng(0)
    files = {name: tmp_path / filename for name, filename in (
        ("rgb", "rgb.png"), ("rgba", "rgba.png"), ("palette", "palette.png"), ("large", "large.png"),
        ("tiny", "tiny.png"), ("jpeg", "photo.jpg"))}
    halves(IMAGE_ORANGE, IMAGE_BLUE).save(files["rgb"])
    halves(IMAGE_ORANGE + (255,), IMAGE_BLUE + (0,), "RGBA").save(files["rgba"])
    palette = Image.new("P", (28, 28), 0)
    palette.putpalette(IMAGE_ORANGE + IMAGE_BLUE + (0, 0, 0) * 254)
    palette.paste(1, (14, 0, 28, 28))
    palette.save(files["palette"], transparency=1)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(files["large"])  # 300 wide, 200 high
    Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(files["tiny"])
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(files["jpeg"])
    return files


@pytest.fixture(autouse=True)
def probe_cache_outside_home(tmp_path_factory, monkeypatch):
    """precision auto's measurements (vggnet.training.probe, vggnet.evaluation.probe) are cached in the session's
    temporary folder, never in the user's cache: a training, eval, predict or bench test on a CPU with native bf16
    probes."""
    from vggnet.evaluation import probe as inference_probe
    from vggnet.training import probe

    path = tmp_path_factory.getbasetemp() / "probe-cache" / "probe.json"
    for module in (probe, inference_probe):
        monkeypatch.setattr(module, "cache_path", lambda: path)


@pytest.fixture(scope="session")
def small_prepared(tmp_path_factory):
    """A prepared (sharded) set of 36 noisy 32x24 PNGs, 12 in each of 3 classes told apart by brightness, 7 samples
    a shard (``vggnet.data.shards.prepare`` with max side 24): for streamed training across processes."""
    from PIL import Image

    from vggnet.data.shards import prepare
    root = tmp_path_factory.mktemp("small-prepared")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "images" / f"c{c}").mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.integers(0, 120, (24, 32, 3)) + 60 * c, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"c{c}" / f"{i}.png")
    prepare(root / "images", root / "prepared", max_side=24, shard_samples=7, progress=False)
    return root / "prepared"


@pytest.fixture
def restore_threads():
    """The intra-op thread count put back after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class FakeWindow:
    """A LoadWindow (:class:`vggnet.base.cpuload.LoadWindow`) whose windows have always ended and whose readings are
    given."""

    def __init__(self, *readings):
        self.readings, self.reads = list(readings), 0

    def elapsed(self):
        return 1e9

    def read(self):
        self.reads += 1
        return self.readings.pop(0)


@pytest.fixture
def fake_window():
    """Factory: ``fake_window(*readings)``, a :class:`FakeWindow`."""
    return FakeWindow
