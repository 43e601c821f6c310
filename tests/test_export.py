"""``vggnet export``: every format loads back in its own runtime and computes the eager model's logits (ONNX in
onnxruntime, TorchScript, torch.export), at dynamic batch sizes and, with --any-size, at two input sizes; the card
describes the run; a check that fails, a missing ONNX package or a bad --out exit 2 and leave nothing behind.

Everything runs on device "cpu" (export is CPU-only). The classic-head run has five max-pools at 32 px: a 1 x 1
feature map before ``AdaptiveAvgPool2d((7, 7))``, the case TorchScript-based ONNX export cannot do."""

import dataclasses
import json
import os
import shutil
import sys

import pytest
import torch

import vggnet
from vggnet.data import Preprocess, load_dataset
from vggnet.use.export import ExportError, card_path, commit, compare, export_model, recipe
from vggnet.store.card import ModelCard
from vggnet.store.rundir import load, save_model

ATOL = 1e-5


def first_test_images(run_dir, n):
    """The first ``n`` test images of a run, preprocessed as the run does."""
    loaded = load(run_dir)
    card = loaded.card
    _, test = load_dataset(card.dataset, card.train_config["data_dir"], card.image_size)
    return loaded, loaded.preprocess(test.images[:n])


def jit_load(path):
    """torch.jit.load without its deprecation warning (torch 2.13 deprecates TorchScript)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path))


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def classic_run(tmp_path_factory, train_run, fill_reference):
    """A run directory with a classic head whose feature map is 1 x 1 (five pools at 32 px), He-uniform weights,
    and the tiny Fashion-MNIST of ``train_run`` as its dataset."""
    run_card = load(train_run["dir"]).card
    torch.manual_seed(0)
    model = fill_reference(vggnet.VGG([4, "M", 4, "M", 4, "M", 8, "M", 8, "M"], head="classic", input_size=32,
                                      in_channels=1, num_classes=10, hidden=16))
    assert model.feature_map_size == (1, 1)
    run_dir = tmp_path_factory.mktemp("classic-run") / "run"
    run_dir.mkdir()
    card = ModelCard(model={}, classes=run_card.classes, preprocess=run_card.preprocess, dataset=run_card.dataset,
                     image_size=32, train_config={"data_dir": run_card.train_config["data_dir"]})
    save_model(run_dir, model, card)
    return run_dir


# ------------------------------------------------------------------------------------------------ round trips
def test_onnx_classic_head_at_a_1x1_map_with_dynamic_batch(classic_run, tmp_path, cli):
    import onnxruntime

    out = tmp_path / "model.onnx"
    code, stdout, err = cli(["export", classic_run, "--format", "onnx", "--out", out, "--dynamic-batch"])
    assert code == 0 and err == "", err
    assert "checked on the first 64 images of the fashion-mnist test set" in stdout
    assert files_in(tmp_path) == ["model.onnx", "model.onnx.json"]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, outp.name, outp.shape) == ("image", ["batch", 1, 32, 32], "logits", ["batch", 10])
    loaded, x = first_test_images(classic_run, 4)
    for batch in (x[:1], x[1:4]):
        got = torch.from_numpy(session.run(None, {"image": batch.numpy()})[0])
        with torch.no_grad():
            want = loaded.model(batch)
        assert want.abs().max() > 0.1  # real logits, not a near-zero output that any file would match
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    card = json.loads(card_path(out).read_text())
    assert card["input"]["shape"] == ["batch", 1, 32, 32] and card["input"]["dynamic"] == ["batch"]
    assert card["check"]["passed"] and card["check"]["sizes"][0]["batch_sizes"] == [1, 32]
    assert card["check"]["sizes"][0]["images"] == 64 and card["check"]["top1_agreement"] == 1.0
    assert card["check"]["max_abs_error"] < ATOL and card["opset"] >= 18


def test_onnx_any_size_equals_the_dense_model_at_two_sizes(classic_run, tmp_path, cli):
    import onnxruntime

    out = tmp_path / "dense.onnx"
    code, stdout, err = cli(["export", classic_run, "--format", "onnx", "--out", out, "--any-size"])
    assert code == 0 and err == "", err
    assert "32x32, batch 1:" in stdout and "96x96, batch 1:" in stdout  # 32 + 2 * 2**5
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 1, "height", "width"]
    loaded = load(classic_run)
    dense = vggnet.to_dense(loaded.model).eval()
    gen = torch.Generator().manual_seed(0)
    for h, w in ((32, 32), (72, 40)):
        x = torch.randn(1, 1, h, w, generator=gen)
        with torch.no_grad():
            want = dense(x)
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    card = json.loads(card_path(out).read_text())
    assert card["input"]["min_size"] == [32, 32] and card["model"]["head"] == "dense"


def test_torchscript_round_trip_and_the_card_describes_the_run(train_run, tmp_path, cli):
    out = tmp_path / "model.pt"
    code, stdout, err = cli(["export", train_run["dir"], "--format", "torchscript", "--out", out])
    assert code == 0 and err == "", err  # no torch.jit deprecation warnings on the user's terminal
    loaded, x = first_test_images(train_run["dir"], 2)
    traced = jit_load(out)
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(traced(x[i:i + 1]), loaded.model(x[i:i + 1]), rtol=0, atol=ATOL)
    card = json.loads(card_path(out).read_text())
    run_card = json.loads((train_run["dir"] / "model.json").read_text())
    assert card["classes"] == run_card["classes"] and len(card["classes"]) == 10
    assert Preprocess.from_dict(card["preprocess"]) == Preprocess.from_dict(run_card["preprocess"])
    assert (card["decode_size"], card["fit"], card["format"]) == (28, "pad", "torchscript")
    assert card["input"] == {"name": "image", "shape": [1, 1, 32, 32], "dynamic": [], "dtype": "float32",
                             "layout": "NCHW", "min_size": [32, 32], "note": "the first positional argument"}
    assert card["source"] == str(train_run["dir"]) and card["vggnet_version"] == vggnet.__version__
    assert card["check"]["images"] == "the first 64 images of the fashion-mnist test set"
    assert not card["check"]["random_images"] and card["check"]["sizes"][0]["batch_sizes"] == [1]


def test_exported_program_any_size_and_dynamic_batch(train_run, tmp_path, cli):
    out = tmp_path / "model.pt2"
    code, stdout, err = cli(["export", train_run["dir"], "--format", "exported", "--out", out, "--any-size",
                             "--dynamic-batch"])
    assert code == 0 and err == "", err
    assert "32x32, batch 1 and 32:" in stdout and "40x40, batch 1 and 32:" in stdout  # gap: 32 + 2 * 2**2
    program = torch.export.load(str(out)).module()
    dense = vggnet.to_dense(load(train_run["dir"]).model).eval()
    gen = torch.Generator().manual_seed(0)
    for shape in ((1, 1, 32, 32), (3, 1, 48, 36), (3, 1, 4, 4)):  # 4 = 2**2: the smallest a gap head takes
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(program(x), dense(x), rtol=0, atol=ATOL)
    with pytest.raises(Exception, match=">= 4"):
        program(torch.randn(1, 1, 3, 8))  # below the declared minimum
    card = json.loads(card_path(out).read_text())
    assert card["input"]["shape"] == ["batch", 1, "height", "width"] and card["input"]["min_size"] == [4, 4]
    assert card["input"]["dynamic"] == ["batch", "height", "width"]
    assert [s["size"] for s in card["check"]["sizes"]] == [[32, 32], [40, 40]]


def test_export_model_writes_the_file_alone(train_run, tmp_path):
    loaded = load(train_run["dir"])
    path = export_model(loaded.model, "torchscript", tmp_path / "bare.pt", dynamic_batch=True)
    assert files_in(tmp_path) == ["bare.pt"]
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(jit_load(path)(x), loaded.model(x), rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------ what is checked
def test_a_weights_file_is_checked_on_random_images_and_says_so(train_run, tmp_path, cli):
    weights = tmp_path / "weights.safetensors"
    shutil.copy(train_run["dir"] / "model.safetensors", weights)
    out = tmp_path / "w.pt"
    code, stdout, err = cli(["export", weights, "--format", "torchscript", "--out", out])
    assert code == 0 and err == "", err
    assert "warning: checked on 8 random images (seed 0)" in stdout and "weights file" in stdout
    check = json.loads(card_path(out).read_text())["check"]
    assert check["random_images"] and check["sizes"][0]["images"] == 8


def test_check_images_are_the_given_files(train_run, tmp_path, cli, image_files):
    files = [image_files["rgb"], image_files["jpeg"], image_files["large"]]
    out = tmp_path / "f.pt"
    code, stdout, err = cli(["export", train_run["dir"], "--format", "torchscript", "--out", out,
                             "--check-images", *files])
    assert code == 0 and err == "", err
    check = json.loads(card_path(out).read_text())["check"]
    assert check["images"] == "3 image file(s) given with --check-images" and check["sizes"][0]["images"] == 3


class Logits(torch.nn.Module):
    """A stand-in eager model: the input (N, K, 1, 1) is its own logits."""

    def forward(self, x):
        return x.flatten(1)


def test_top1_rule_allows_only_ties_within_the_error():
    x = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.49, 0.0]]).view(2, 3, 1, 1)  # eager top-2 margins 1.0 and 0.01
    # the second image flips with a max abs error of 0.02 > its margin 0.01: a tie broken by rounding, allowed
    tie = compare(Logits(), lambda t: t.flatten(1) + torch.tensor([0.0, 0.02, 0.0]) * (t.flatten(1)[:, :1] < 1),
                  x, dynamic_batch=False)
    assert tie.max_abs_error == pytest.approx(0.02, abs=1e-6)
    assert (tie.max_abs_logit, tie.top1_agree, tie.top1_allowed) == (1.0, 1, 1)
    # it flips with max abs error 0.008 < margin 0.01: a real change of class, refused at any tolerance
    shift = torch.tensor([-0.008, 0.008, 0.0])
    flip = compare(Logits(), lambda t: t.flatten(1) + shift * (t.flatten(1)[:, :1] < 1), x, dynamic_batch=True)
    assert (flip.max_abs_error, flip.top1_agree, flip.top1_allowed) == (pytest.approx(0.008, abs=1e-6), 1, 0)
    assert flip.batch_sizes == [1, 2] and tie.batch_sizes == [1]
    from vggnet.use.export import ExportCheck

    assert ExportCheck("x", False, 0.05, [tie]).passed and not ExportCheck("x", False, 0.01, [tie]).passed
    assert not ExportCheck("x", False, 1.0, [flip]).passed


def test_recipe_in_plain_numbers():
    prep = Preprocess(32, (0.25,), (0.5,), fit="auto", in_size=28)
    assert recipe(prep, 1) == (
        "decode the image as grayscale (1 channel, ITU-R 601-2 luma) uint8; resize the shorter side to 28 px "
        "(bilinear) and crop the centre 28x28; divide by 255; pad with zeros, centred, to 32x32; subtract mean [0.25] "
        "and divide by std [0.5] per channel; feed float32 NCHW (batch, 1, 32, 32); the outputs are logits, softmax "
        "for probabilities")
    imagenet = Preprocess(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), fit="resize", crop_fraction=0.875,
                          channel_order="bgr")
    text = recipe(imagenet, 3)
    assert "RGB uint8; resize the shorter side to 256 px" in text and "keep the centre 224x224" in text
    assert "reverse the channels to BGR" in text and "resize to" not in text  # 256 * 0.875 = 224: no second resize


# ------------------------------------------------------------------------------------------------ failures
def test_tolerance_exceeded_exits_2_and_writes_nothing(train_run, tmp_path, cli, one_line_error, monkeypatch):
    import vggnet.use.export as export

    real = export.load_runner
    monkeypatch.setattr(export, "load_runner", lambda fmt, data: (lambda x, run=real(fmt, data): run(x) * 1.001))
    code, _, err = cli(["export", train_run["dir"], "--format", "torchscript", "--out", tmp_path / "m.pt"])
    one_line_error(code, err, "does not compute what the eager model computes", "relative error 0.001",
                   "tolerance 0.0001", "nothing written")
    assert files_in(tmp_path) == []
    code, _, err = cli(["export", train_run["dir"], "--format", "torchscript", "--out", tmp_path / "m.pt",
                        "--tolerance", "0.01"])
    assert code == 0 and files_in(tmp_path) == ["m.pt", "m.pt.json"]


def test_missing_onnxruntime_gives_the_install_hint(train_run, tmp_path, cli, one_line_error, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    code, _, err = cli(["export", train_run["dir"], "--format", "onnx", "--out", tmp_path / "m.onnx"])
    one_line_error(code, err, "onnxruntime", "pip install 'vggnet[onnx]'")
    assert files_in(tmp_path) == []


def test_bad_out_and_format(train_run, tmp_path, cli, one_line_error):
    code, _, err = cli(["export", train_run["dir"], "--format", "onnx", "--out", tmp_path / "missing" / "m.onnx"])
    one_line_error(code, err, "the folder", "does not exist")
    code, _, err = cli(["export", train_run["dir"], "--format", "torchscript", "--out", tmp_path])
    one_line_error(code, err, "it is a folder")
    code, _, err = cli(["export", train_run["dir"], "--format", "tflite", "--out", tmp_path / "m.tflite"])
    one_line_error(code, err, "invalid choice: 'tflite'")
    code, _, err = cli(["export", train_run["dir"], "--format", "torchscript", "--out", tmp_path / "m.pt",
                        "--check-images", tmp_path / "nope.png"])
    one_line_error(code, err, "--check-images", "nope.png")
    assert files_in(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_the_work(train_run, tmp_path, cli, one_line_error):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, _, err = cli(["export", train_run["dir"], "--format", "torchscript", "--out", folder / "m.pt"])
        one_line_error(code, err, "is not writable")
        assert files_in(folder) == []
    finally:
        folder.chmod(0o700)


def test_a_features_only_source_is_refused(train_run, tmp_path, cli, one_line_error, monkeypatch):
    import vggnet.store.load

    real = vggnet.store.load.load
    monkeypatch.setattr(vggnet.store.load, "load",
                        lambda *args, **kwargs: dataclasses.replace(real(*args, **kwargs), features_only=True))
    code, _, err = cli(["export", train_run["dir"], "--format", "torchscript", "--out", tmp_path / "m.pt"])
    one_line_error(code, err, "convolutional weights only", "no classes to export")
    assert files_in(tmp_path) == []


def test_a_card_that_cannot_be_written_takes_the_file_with_it(tmp_path, monkeypatch):
    import vggnet.use.export as export

    def fail(path, obj):
        raise vggnet.OutputError(f"cannot write {path}: disk full")

    monkeypatch.setattr(export, "atomic_write_json", fail)
    with pytest.raises(vggnet.OutputError, match="disk full"):
        commit(tmp_path / "m.onnx", b"bytes", {})
    assert files_in(tmp_path) == []


def test_an_unknown_format_in_the_library(train_run, tmp_path):
    with pytest.raises(vggnet.ConfigError, match="unknown export format 'tflite'"):
        export_model(load(train_run["dir"]).model, "tflite", tmp_path / "m.tflite")
    assert issubclass(ExportError, vggnet.VggnetError) and files_in(tmp_path) == []




def test_check_count_sets_how_many_test_images_are_checked(train_run, tmp_path, cli):
    out = tmp_path / "m.pt"
    code, stdout, err = cli(["export", str(train_run["dir"]), "--format", "torchscript", "--out", str(out),
                             "--check-count", "5"])
    assert code == 0, err
    assert "the first 5 images of the fashion-mnist test set" in stdout
    assert json.loads((tmp_path / "m.pt.json").read_text())["check"]["sizes"][0]["images"] == 5

def test_a_compressed_run_exports_int8_weights_and_checks_against_their_arithmetic(train_run, fill_reference,
                                                                                   tmp_path, cli):
    """int8 layers export as int8 initializers (Cast and Mul in the graph), except those onnxscript's optimizer folds
    to float (at most 8192 elements: fc8 here), and the check passes at the default tolerance: the reference runs
    the dequantised arithmetic the file holds, not the kernel that also rounds activations."""
    run_card = load(train_run["dir"]).card
    torch.manual_seed(0)
    model = fill_reference(vggnet.VGG([4, "M", 4, "M", 4, "M", 8, "M", 8, "M"], head="classic", input_size=32,
                                      in_channels=1, num_classes=10, hidden=128))
    source = tmp_path / "source"
    source.mkdir()
    save_model(source, model, ModelCard(model={}, classes=run_card.classes, preprocess=run_card.preprocess,
                                        dataset=run_card.dataset, image_size=32,
                                        train_config={"data_dir": run_card.train_config["data_dir"]}))
    compressed = tmp_path / "compressed"
    code, _, err = cli(["compress", str(source), "--out", str(compressed), "--int8", "--no-eval", "--threads", "1"])
    assert code == 0, err
    out = tmp_path / "int8.onnx"
    code, _, err = cli(["export", str(compressed), "--format", "onnx", "--out", str(out), "--dynamic-batch"])
    assert code == 0, err
    check = json.loads((tmp_path / "int8.onnx.json").read_text())["check"]
    assert check["passed"] is True and check["rel_error"] <= 1e-4 and check["top1_agreement"] == 1.0
    import onnx
    import onnxruntime

    from vggnet.use.compress import Int8Linear

    graph = onnx.load(str(out)).graph
    int8 = sorted(tuple(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert int8 == [(128, 128), (128, 392)]  # fc7 and fc6 travel as int8
    loaded = load(compressed)
    for m in loaded.model.modules():
        if isinstance(m, Int8Linear):
            m.use_kernel = False
    x = torch.randn(3, 1, 32, 32)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = loaded.model(x)
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
