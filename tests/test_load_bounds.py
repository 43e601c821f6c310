"""Loading is bounded by what is on disk (issue 14, load side): a forged model.json, a sparse or forged safetensors
file, a header that lies about dtypes, and a folder dataset named by a run all cost no memory or writes beyond what
the real files justify. All on the CPU, with a tiny model written by save_model (no training)."""

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import vggnet
from vggnet.store import card as card_module
from vggnet.store import rundir
from vggnet.use.compress import compress_model
from vggnet.data import Preprocess, load_dataset
from vggnet.base.errors import CheckpointError
from vggnet.evaluation.testset import load_test_set
from vggnet.base.files import MAX_HEADER_BYTES, read_header
from vggnet.base.limits import MAX_CLASSES
from vggnet.store.rundir import save_model
from vggnet.store.card import ModelCard

CLASSES = ["cat", "dog", "eel"]


def tiny_model(**overrides):
    torch.manual_seed(0)
    options = dict(num_classes=3, input_size=32, width=0.125, head="gap", in_channels=3)
    return vggnet.create_model("vgg11", **{**options, **overrides})


def write_run(path, model, compression=None, dataset=None, image_size=32):
    card = ModelCard(model=model.config, classes=list(CLASSES), dataset=dataset, image_size=image_size,
                     preprocess=Preprocess(image_size, (0.5,) * 3, (0.25,) * 3).to_dict(), compression=compression)
    path.mkdir(parents=True)
    save_model(path, model, card)
    return path


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run", tiny_model().eval())


def edit_card(run_dir, **model_keys):
    """Forge the card where loading reads it, inside model.safetensors (the header's metadata, tensors untouched),
    and in its mirror model.json."""
    card = json.loads((run_dir / "model.json").read_text())
    card["model"].update(model_keys)
    (run_dir / "model.json").write_text(json.dumps(card))
    header, data = split_file(run_dir / "model.safetensors")
    header["__metadata__"] = {card_module.CARD_KEY: json.dumps(card)}
    write_file(run_dir / "model.safetensors", header, data)


def split_file(path):
    """(header dict, data bytes) of a safetensors file, parsed by hand."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_file(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def refuse_reading(monkeypatch):
    """Make reading any tensor data through vggnet fail loudly: what is refused must be refused from the header."""
    def read(*args, **kwargs):
        raise AssertionError("tensor data was read before the header was checked")

    monkeypatch.setattr(rundir, "load_tensors", read)
    monkeypatch.setattr(card_module, "read_safetensors", read)


# ------------------------------------------------------------------------------------------- memory, in a subprocess
CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import vggnet
    from vggnet.base.errors import VggnetError

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    vggnet.load(sys.argv[1])  # every import and first-call cost of a load, on a valid run
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 2**30, vm + 2 * 2**30))  # a regression fails, not the machine
    outcomes, before, start = [], rss_mb(), time.perf_counter()
    for source in sys.argv[2:]:
        try:
            vggnet.load(source)
            outcomes.append("loaded")
        except VggnetError as err:
            outcomes.append(f"{type(err).__name__}: {err}")
        except MemoryError:
            outcomes.append("MemoryError")
    print(json.dumps({"outcomes": outcomes, "grown_mb": rss_mb() - before, "seconds": time.perf_counter() - start}))
""")


def load_in_subprocess(valid, sources):
    """Load each of ``sources`` with vggnet.load in a fresh interpreter (after a warm-up load of ``valid``): their
    outcomes, how much the peak RSS grew over all of them (MB) and the seconds they took."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(valid), *map(str, sources)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


FORGERIES = [  # model.json key, forged value, what the one-line error names
    ({"num_classes": 10**7}, "model.num_classes must be an integer from 1 to 100000, got 10000000"),
    ({"in_channels": 10**6}, "model.in_channels must be an integer from 1 to 8192"),
    ({"hidden": 10**7}, "model.hidden must be an integer from 1 to 65536"),
    ({"input_size": [100_000, 100_000]}, "model.input_size must be an integer from 1 to 8192, got 100000"),
    ({"arch": [[10**7, 8]]}, "model.arch must have at most 256 layers, got 10000001"),
    ({"arch": [1024, "M"], "width": 16}, "model.arch at model.width gives a convolution 16384 channels wide"),
]


def test_forged_model_json_is_refused_in_one_line_at_no_memory_cost(tmp_path, run):
    """Each forged value is refused by name before anything is built; over all of them the peak RSS grows < 100 MB
    (the arch one alone would expand to 10 million layer objects, about 1 GB, if it were parsed)."""
    forged = []
    for i, (keys, _) in enumerate(FORGERIES):
        target = tmp_path / f"forged{i}"
        shutil.copytree(run, target)
        edit_card(target, **keys)
        forged.append(target)
    result = load_in_subprocess(run, forged)
    for outcome, target, (keys, message) in zip(result["outcomes"], forged, FORGERIES):
        where = target / "model.safetensors"
        assert outcome.startswith(f"CheckpointError: {where} (its card) is corrupt: {message}"), (keys, outcome)
        assert "\n" not in outcome
    assert result["grown_mb"] < 100, result


def test_card_bounds_accept_the_largest_allowed_values(run):
    """The bounds are inclusive: 100,000 classes, 8192-pixel inputs, 256 layers, 8192 channels after the width."""
    card = json.loads((run / "model.json").read_text())
    card["model"].update(num_classes=MAX_CLASSES, input_size=[8192, 8192], arch=[[255, 8]], width=16.0)
    card["preprocess"].update(image_size=8192, crop_fraction=1.0)
    assert ModelCard.from_dict(card).model.num_classes == MAX_CLASSES
    card["model"]["arch"] = [512, "M"]  # 512 x 16 = 8192 channels
    ModelCard.from_dict(card)
    card["preprocess"]["crop_fraction"] = 0.5  # decodes at 16384 pixels
    with pytest.raises(CheckpointError, match=r"^model\.json is corrupt: preprocess\.crop_fraction 0\.5 decodes"):
        ModelCard.from_dict(card)


def test_sparse_weights_file_is_refused_without_being_read(tmp_path, run):
    """model.safetensors grown to 6 GB of holes after its valid header and data: refused from its size alone, by the
    run loader and the weights-file loader, instantly and without the peak RSS growing 100 MB."""
    sparse = tmp_path / "sparse"
    shutil.copytree(run, sparse)
    weights = sparse / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(6 * 2**30)
    result = load_in_subprocess(run, [sparse, weights])
    header, data = split_file(run / "model.safetensors")
    for outcome in result["outcomes"]:
        assert outcome == (f"CheckpointError: {weights} is not a readable safetensors file (the tensors take "
                           f"{len(data)} bytes of data, the file holds {6 * 2**30 - size + len(data)}); it is "
                           "truncated, padded or forged")
    assert result["grown_mb"] < 100 and result["seconds"] < 5, result


# ------------------------------------------------------------------------------------------- the header, read alone
def test_read_header_gives_what_safetensors_wrote(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(5, dtype=torch.float16),
               "c": torch.zeros(0, 4, dtype=torch.int8), "d": torch.tensor(7, dtype=torch.int64)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"note": "kept out"})
    entries = read_header(tmp_path / "x.safetensors")
    assert sorted(entries) == ["a", "b", "c", "d"]
    for name, tensor in tensors.items():
        entry = entries[name]
        assert (entry.dtype, entry.shape) == (tensor.dtype, tuple(tensor.shape))
        assert entry.end - entry.start == tensor.numel() * tensor.element_size()
    header, data = split_file(tmp_path / "x.safetensors")
    assert {k: [entries[k].start, entries[k].end] for k in entries} == {
        k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    assert max(e.end for e in entries.values()) == len(data) == 24 + 10 + 0 + 8


@pytest.mark.parametrize("forge, message", [
    (lambda h, d: (h | {"a": h["a"] | {"dtype": "F16"}}, d),  # same shape: half the bytes it spans
     "its header is inconsistent: tensor 'a' spans 16 bytes, but F16 [2, 2] takes 8)"),
    (lambda h, d: (h | {"a": h["a"] | {"dtype": "Q4"}}, d),
     "its header is inconsistent: tensor 'a' has dtype 'Q4', not one of"),
    (lambda h, d: (h | {"a": h["a"] | {"shape": [2, -2]}}, d),
     "its header is inconsistent: tensor 'a' has shape [2, -2], not a list of sizes"),
    (lambda h, d: (h, d + b"\0" * 4),  # trailing bytes
     "the tensors take 24 bytes of data, the file holds 28); it is truncated, padded or forged"),
    (lambda h, d: (h, d[:-4]),  # cut short
     "the tensors take 24 bytes of data, the file holds 20"),
    (lambda h, d: ({"a": h["a"], "b": h["b"] | {"data_offsets": [12, 20]}}, d[:20]),  # b overlaps a
     "tensor 'b' at bytes 12-20 overlaps the tensor before it"),
    (lambda h, d: ({"a": h["a"], "b": h["b"] | {"data_offsets": [20, 28]}}, d + b"\0" * 4),  # a hole before b
     "tensor 'b' at bytes 20-28 leaves bytes 16-20 unused"),
])
def test_read_header_refuses_a_lying_header(tmp_path, forge, message):
    """A hand-written file (a: 4 float32, b: 1 float64, back to back) is read; each forgery of it is refused."""
    header = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "F64", "shape": [1], "data_offsets": [16, 24]}}
    data = torch.ones(4).numpy().tobytes() + torch.ones(1, dtype=torch.float64).numpy().tobytes()
    write_file(tmp_path / "ok.safetensors", header, data)
    assert sorted(read_header(tmp_path / "ok.safetensors")) == ["a", "b"]  # the untouched file is fine
    write_file(tmp_path / "bad.safetensors", *forge(header, data))
    with pytest.raises(CheckpointError) as err:
        read_header(tmp_path / "bad.safetensors")
    assert str(err.value).startswith(f"{tmp_path / 'bad.safetensors'} is not a readable safetensors file")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_header_length_over_the_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{")
        f.truncate(8 + MAX_HEADER_BYTES + 64)  # sparse: the claimed header is there, in holes
    with pytest.raises(CheckpointError, match=rf"claims {MAX_HEADER_BYTES + 1} bytes, more than the "
                                              rf"{MAX_HEADER_BYTES} vggnet reads"):
        vggnet.base.files.load_tensors(path)


# ------------------------------------------------------------------------------------------- header against model
def test_a_card_that_disagrees_with_the_header_is_refused_before_any_tensor_is_read(run, monkeypatch):
    edit_card(run, num_classes=50_000)  # within the bounds; the file holds 3 classes
    refuse_reading(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        vggnet.load(run)
    assert str(err.value) == (f"{run / 'model.safetensors'} does not match the architecture in model.json: wrong "
                              "shape ['classifier.1.bias', 'classifier.1.weight']")


def test_a_header_lying_about_a_dtype_is_refused_before_any_tensor_is_read(run, monkeypatch):
    """classifier.1.weight relabelled I32 (same 4 bytes an element, so the file is well formed): refused by name."""
    header, data = split_file(run / "model.safetensors")
    header["classifier.1.weight"]["dtype"] = "I32"
    write_file(run / "model.safetensors", header, data)
    refuse_reading(monkeypatch)
    with pytest.raises(CheckpointError, match=r"model\.json: wrong dtype \['classifier\.1\.weight'\]$"):
        vggnet.load(run)


def test_compressed_runs_check_their_stored_dtypes_from_the_header(tmp_path, monkeypatch):
    """An int8 + half run stores int8 weights, float32 scales and float16 everything else; it loads bit-exactly as
    saved, and a float16 tensor relabelled BF16 (same size) is refused before any tensor is read."""
    model = tiny_model(head="classic", hidden=16).eval()
    done = compress_model(model, int8=True, half=True)
    path = write_run(tmp_path / "compressed", done.model, compression=done.record.to_dict())
    loaded = vggnet.load(path)
    for key, value in done.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    header, data = split_file(path / "model.safetensors")
    dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert (dtypes["classifier.0.weight"], dtypes["classifier.0.scale"], dtypes["features.0.weight"]) == (
        "I8", "F32", "F16")
    header["features.0.weight"]["dtype"] = "BF16"
    write_file(path / "model.safetensors", header, data)
    refuse_reading(monkeypatch)
    with pytest.raises(CheckpointError, match=r"wrong dtype \['features\.0\.weight'\]$"):
        vggnet.load(path)


# ------------------------------------------------------------------------------------------- folder datasets
@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "images"
    for name, colour in zip(CLASSES, ((200, 0, 0), (0, 200, 0), (0, 0, 200))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20 + i, 18), colour).save(root / name / f"{name}{i}.png")
    return root


def files_under(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_a_runs_folder_dataset_is_read_not_written(tmp_path, data_env, image_tree):
    """A run whose model.json names folder:PATH is evaluated on it (as vggnet eval does by default): nothing is
    written into PATH; the decode cache goes to $XDG_CACHE_HOME/vggnet/folders/<sha1 of the resolved path>[:16]."""
    before = files_under(image_tree)
    path = write_run(tmp_path / "folder-run", tiny_model().eval(), dataset=f"folder:{image_tree}", image_size=32)
    loaded = vggnet.load(path)
    test = load_test_set(loaded, loaded.card.dataset)
    assert test.images.shape[1:] == (3, 32, 32) and test.classes == CLASSES
    assert files_under(image_tree) == before
    key = hashlib.sha1(str(image_tree.resolve()).encode()).hexdigest()[:16]
    cached = list((data_env / "xdg-cache" / "vggnet" / "folders" / key).glob("folder-32px-*.safetensors"))
    assert len(cached) == 1
    again = load_dataset(f"folder:{image_tree}", image_size=32)[1]  # served from that cache
    assert torch.equal(again.images, test.images) and files_under(image_tree) == before
