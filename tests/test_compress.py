"""``vggnet compress``: SVD against numpy's, int8 against a hand-written quantisation, float16 storage, run
directories that load everywhere, and one-line refusals that write nothing. Everything runs on device "cpu"."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vggnet
from vggnet.use.compress import (Compression, Int8Linear, LowRankLinear, compress_model, energy_rank, int8_backend,
                             parameter_count)
from vggnet.data import load_dataset
from vggnet.base.errors import CheckpointError
from vggnet.evaluation.metrics import evaluate
from vggnet.base.files import load_tensors, safetensors_bytes
from vggnet.store.card import CARD_KEY
from vggnet.store.rundir import RunDir, load, read_json, save_model

needs_int8 = pytest.mark.skipif(int8_backend() is None, reason="torch has no x86/fbgemm quantized engine")


def tiny(head="classic", seed=1, fill=None):
    """A two-stage VGG on 1x32x32 input with a 64-wide head: fc6 784 -> 64, fc7 64 -> 64, fc8 64 -> 10."""
    model = vggnet.VGG([8, "M", 16, "M"], in_channels=1, num_classes=10, input_size=32, head=head, hidden=64)
    return fill(model, seed) if fill else model.eval()


def batch(n=4, seed=0):
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def orthogonal(n, k, rng):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


# ------------------------------------------------------------------------------------------------------ SVD
def test_full_rank_svd_equals_the_original_logits(fill_reference):
    model = tiny(fill=fill_reference)
    done = compress_model(model, svd={"fc6": 64, "fc7": 64, "fc8": 10})
    assert [type(done.model.classifier[i]) for i in (0, 3, 6)] == [LowRankLinear] * 3
    assert done.record.svd == {"fc6": 64, "fc7": 64, "fc8": 10}
    assert [round(c.energy, 12) for c in done.layers] == [1.0, 1.0, 1.0]
    x = batch()
    with torch.no_grad():
        reference, compressed = model(x), done.model(x)
    assert (compressed - reference).abs().max().item() < 1e-4 * max(1.0, reference.abs().max().item())
    assert type(model.classifier[0]) is nn.Linear  # the source is not modified


def test_low_rank_layer_equals_numpys_truncated_svd():
    torch.manual_seed(0)
    linear = nn.Linear(20, 12)
    layer = LowRankLinear.from_linear(linear, 3)
    assert (layer.first.weight.shape, layer.second.weight.shape, layer.first.bias) == ((3, 20), (12, 3), None)
    w, b = linear.weight.detach().double().numpy(), linear.bias.detach().double().numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    w3 = u[:, :3] @ np.diag(s[:3]) @ vt[:3]
    x = np.random.default_rng(0).standard_normal((5, 20))
    expected = x @ w3.T + b
    with torch.no_grad():
        got = layer(torch.from_numpy(x).float()).double().numpy()
    assert np.abs(got - expected).max() < 1e-5
    weight, bias = layer.dense_weight()
    assert np.abs(weight.double().numpy() - w3).max() < 1e-6 and torch.equal(bias, linear.bias)


def test_energy_rule_picks_the_hand_computed_rank():
    # singular values 8, 4, 2, 1, 0.5: s^2 = 64, 16, 4, 1, 0.25 of 85.25; kept after r = 1..5:
    # 0.7507, 0.9384, 0.9853, 0.9971, 1
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    assert [energy_rank(s, e)[0] for e in (0.5, 0.75, 0.76, 0.9, 0.95, 0.99, 0.998, 1.0)] == [1, 1, 2, 2, 3, 4, 5, 5]
    assert energy_rank(s, 0.95)[1] == pytest.approx(84 / 85.25)
    rng = np.random.default_rng(0)
    model = tiny()
    fc6 = model.classifier[0]
    with torch.no_grad():  # fc6 with exactly those singular values
        fc6.weight.copy_(torch.from_numpy(orthogonal(64, 5, rng) @ np.diag(s.numpy()) @ orthogonal(784, 5, rng).T))
    done = compress_model(model, svd_energy=0.95)
    chosen = {c.name: c for c in done.layers}
    assert chosen["fc6"].rank == 3 and chosen["fc6"].factorised
    assert chosen["fc6"].params_after == 3 * (784 + 64)
    # fc7 and fc8 are random (full-spectrum) 64x64 and 10x64: 95% needs a rank whose factors are not smaller
    assert not chosen["fc7"].factorised and not chosen["fc8"].factorised
    assert "left whole" in chosen["fc8"].describe()
    assert done.record.svd == {"fc6": 3} and done.record.svd_energy == 0.95
    assert type(done.model.classifier[3]) is nn.Linear


# ------------------------------------------------------------------------------------------------------ int8
def reference_int8(x, q, scale, bias):
    """The dynamic-int8 linear by hand: activations to unsigned 7-bit codes (range including 0, one scale and zero
    point for the whole batch), integer products, scaled back."""
    x = x.astype(np.float32)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = np.float32(hi - lo) / np.float32(127)
    zero = int(np.clip(np.round(-lo / step), 0, 127))
    codes = np.clip(np.round(x / step) + zero, 0, 127).astype(np.int64)
    acc = (codes - zero) @ q.astype(np.int64).T  # exact integers
    return acc * (np.float64(step) * scale.astype(np.float64))[None, :] + bias.astype(np.float64)


def test_symmetric_quantisation_equals_the_hand_computed_one():
    torch.manual_seed(0)
    linear = nn.Linear(300, 64)
    with torch.no_grad():
        linear.weight[5] = 0  # an all-zero row gets scale 1
    layer = Int8Linear.from_linear(linear)
    w = linear.weight.detach().numpy()
    scale = np.abs(w).max(axis=1) / np.float32(127)
    scale[scale == 0] = 1
    q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
    assert layer.weight.dtype == torch.int8 and layer.scale.dtype == torch.float32
    assert np.array_equal(layer.weight.numpy(), q) and np.array_equal(layer.scale.numpy(), scale)
    assert torch.equal(layer.bias, linear.bias.detach()) and np.abs(q).max() == 127


@needs_int8
@pytest.mark.parametrize("relu", [False, True], ids=["signed", "after-relu"])
def test_int8_linear_equals_a_hand_written_dequantise_and_activation_quantise(relu):
    torch.manual_seed(0)
    linear = nn.Linear(300, 64)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(5, 300) * 3 + 0.5
    x = x.relu() if relu else x
    with torch.no_grad():
        got = layer(x)
    expected = reference_int8(x.numpy(), layer.weight.numpy(), layer.scale.numpy(), layer.bias.numpy())
    # float32 accumulation of the scaled int32 sums: within 1e-5 of the largest output
    assert np.abs(got.double().numpy() - expected).max() < 1e-5 * np.abs(expected).max()
    # the exact path (other devices, export): dequantised weights, float activations
    layer.use_kernel = False
    with torch.no_grad():
        exact = layer(x)
    dequantised = layer.weight.double() * layer.scale.double()[:, None]
    assert (exact.double() - (x.double() @ dequantised.T + layer.bias.double())).abs().max() < 1e-4
    # activation rounding: at most half a code step per input times sum |w| per output
    step = float(x.max() - min(float(x.min()), 0)) / 127
    bound = 0.5 * step * dequantised.abs().sum(1).max().item() + 1e-4
    assert (got - exact).abs().max().item() <= bound


@needs_int8
@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_int8_linear_survives_copy_to_dtype_state_dict_and_tracing():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(40, 8))
    x = torch.randn(3, 40)
    with torch.no_grad():
        y = layer(x)
        clone = copy.deepcopy(layer)
        assert clone._packed is None and torch.equal(clone(x), y)  # the packed weight is not copied, but rebuilt
        half = copy.deepcopy(layer).to(torch.bfloat16)
        assert half.weight.dtype == torch.int8 and half.scale.dtype == torch.bfloat16
        out = half(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16 and (out.float() - y).abs().max() < 0.05 * y.abs().max()
        fresh = Int8Linear(40, 8)
        fresh.load_state_dict(layer.state_dict())
        assert sorted(layer.state_dict()) == ["bias", "scale", "weight"] and torch.equal(fresh(x), y)
        before = fresh(x)
        fresh.load_state_dict({**layer.state_dict(), "bias": layer.bias + 1})  # in place: the cache is rebuilt
        assert torch.allclose(fresh(x), before + 1, atol=1e-5)
        # tracing takes the dequantised path: int8 weights, a cast, a multiply
        traced = torch.jit.trace(layer, x, check_trace=False)
        assert "quantized::" not in str(traced.graph)
        layer.use_kernel = False
        assert torch.allclose(traced(x), layer(x), atol=1e-6)


@needs_int8
def test_compressed_model_through_optimize_for_inference_and_bf16(fill_reference):
    model = compress_model(tiny(fill=fill_reference), svd={"fc6": 16}, int8=True).model
    x = batch()
    with torch.inference_mode():
        y = model(x)
        fast = vggnet.optimize_for_inference(model, "fp32")
        assert torch.allclose(fast(x), y, atol=1e-4, rtol=1e-4)
        in_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        assert in_bf16.classifier[0].first.weight.dtype == torch.int8
        logits = in_bf16.classifier(torch.flatten(model.avgpool(model.features(x)), 1).to(torch.bfloat16))
        assert logits.dtype == torch.bfloat16 and (logits.float() - y).abs().max() < 0.05 * y.abs().max()


# ------------------------------------------------------------------------------------------------------ half
def card_like(run_dir, model, out):
    """``run_dir``'s card (classes, preprocessing, dataset, training config) for ``model``; creates ``out``."""
    out.mkdir(parents=True)
    card = RunDir(run_dir).read_card()
    card.model, card.image_size = model.config, 32
    return card


def test_half_stores_float16_and_loads_float32(tmp_path, fill_reference, train_run):
    model = tiny(fill=fill_reference)
    done = compress_model(model, int8=int8_backend() is not None, half=True)
    save_model(tmp_path / "run", done.model, done.card(card_like(train_run["dir"], model, tmp_path / "run")))
    stored = load_file(tmp_path / "run" / "model.safetensors")
    original = model.state_dict()
    for key in ("features.0.weight", "features.3.bias"):
        assert stored[key].dtype == torch.float16 and torch.equal(stored[key], original[key].half())
    if done.record.int8:
        assert stored["classifier.0.weight"].dtype == torch.int8
        assert stored["classifier.0.scale"].dtype == torch.float32  # scales stay float32
        assert torch.equal(stored["classifier.0.bias"], original["classifier.0.bias"].half())
    loaded = load(tmp_path / "run").model
    for key, value in loaded.state_dict().items():
        assert value.dtype == done.model.state_dict()[key].dtype and torch.equal(value, done.model.state_dict()[key])
    assert json.loads((tmp_path / "run" / "model.json").read_text())["compression"]["half"] is True
    # exactly float16 is accepted: a float32 tensor where the record says float16 is refused by name
    stored["features.0.weight"] = stored["features.0.weight"].float()
    from safetensors.torch import save_file

    save_file(stored, tmp_path / "run" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"wrong dtype \['features.0.weight'\]"):
        load(tmp_path / "run")


def test_ordinary_cards_do_not_gain_a_compression_key(train_run):
    card = RunDir(train_run["dir"]).read_card()
    assert card.compression is None and "compression" not in card.to_dict()
    assert card.to_dict() == read_json(train_run["dir"] / "model.json")


# ------------------------------------------------------------------------------------------------------ runs
@needs_int8
def test_compressed_run_loads_through_load_eval_and_predict(tmp_path, cli, train_run, image_files):
    out = tmp_path / "small"
    code, text, err = cli(["compress", train_run["dir"], "--out", out, "--svd", "fc=4", "--int8", "--half",
                           "--rounds", "2", "--threads", "1"])
    assert code == 0, err
    assert "fc: 10x16 -> rank 4" in text and "1 thread(s)" in text
    source = load(train_run["dir"])
    state = torch.random.get_rng_state()
    done = compress_model(source.model, svd={"fc": 4}, int8=True, half=True)
    loaded = vggnet.load(out)
    assert torch.equal(torch.random.get_rng_state(), state)  # neither compressing nor loading draws random numbers
    assert loaded.card.compression.to_dict() == dict(done.record.to_dict(), source=str(train_run["dir"]))
    assert (loaded.classes, loaded.card.preprocess, loaded.card.train_config, loaded.card.metrics) == (
        source.classes, source.card.preprocess, source.card.train_config, source.card.metrics)
    for key, value in done.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    _, test = load_dataset("fashion-mnist", train_run["config"].data_dir, 32)
    expected = evaluate(done.model, test, source.preprocess, "cpu", "fp32")
    code, text, err = cli(["eval", out, "--json", "--device", "cpu"])
    assert code == 0, err
    assert json.loads(text)["top1"] == expected.top1
    code, text, err = cli(["compress", train_run["dir"], "--out", tmp_path / "again", "--svd", "fc=4", "--int8",
                           "--half", "--rounds", "1", "--json"])
    assert code == 0, err
    report = json.loads(text)
    assert report["compressed"]["top1"] == expected.top1 and report["test_images"] == len(test.labels)
    convs, factors = (8 * 1 * 9 + 8) + (16 * 8 * 9 + 16), 4 * 16 + (10 * 4 + 10)  # fc 16 -> 10 at rank 4
    assert report["compressed"]["params"] == parameter_count(done.model) == convs + factors
    code, text, err = cli(["predict", out, image_files["rgb"], "--json", "--device", "cpu", "--top-k", "3",
                           "--precision", "fp32"])  # auto measures which precision runs (vggnet.evaluation.probe)
    assert code == 0, err
    from vggnet.use.predict import predict_files
    from vggnet.store.card import LoadedModel
    from vggnet.runtime import resolve_runtime

    in_memory = predict_files(LoadedModel(done.model, source.card, None), [str(image_files["rgb"])], 3,
                              resolve_runtime("cpu", "fp32", threads=torch.get_num_threads()))
    assert json.loads(text)[0]["top"] == in_memory[0].to_dict()["top"]


def test_to_dense_of_a_compressed_model_equals_it_at_the_training_size(fill_reference):
    model = tiny(fill=fill_reference)
    x = batch()
    int8 = int8_backend() is not None
    for options in ({"svd": {"fc6": 8, "fc7": 16}, "half": True}, {"svd": {"fc6": 8}, "int8": int8}):
        compressed = compress_model(model, **options).model
        dense = vggnet.to_dense(compressed)
        assert dense.head == "dense" and dense.classifier[0].weight.dtype == torch.float32
        with torch.no_grad():
            for m in compressed.modules():
                if isinstance(m, Int8Linear):
                    m.use_kernel = False  # the exact dequantised path: what to_dense materialises
            expected = compressed(x)
            assert (dense(x) - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())


# ------------------------------------------------------------------------------------------------------ refusals
@pytest.fixture
def classic_run(tmp_path, train_run, fill_reference):
    model = tiny(fill=fill_reference)
    save_model(tmp_path / "classic", model, card_like(train_run["dir"], model, tmp_path / "classic"))
    return tmp_path / "classic"


@pytest.mark.parametrize("options, fragments", [
    (["--svd", "fc6=65"], ["fc6 is 64x784, so its rank is at most 64"]),
    (["--svd", "fc9=4"], ["'fc9'", "fc6, fc7, fc8"]),
    (["--svd", "fc6=0"], ["LAYER=RANK"]),
    (["--svd-energy", "1.5"], ["(0, 1]"]),
    ([], ["nothing to compress"]),
])
def test_bad_requests_are_one_line_and_write_nothing(tmp_path, cli, one_line_error, classic_run, options, fragments):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli(["compress", classic_run, "--out", tmp_path / "out", *options, "--no-eval"])
    one_line_error(code, err, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_dense_heads_refuse_svd_and_int8_but_take_half(tmp_path, cli, one_line_error, train_run, fill_reference):
    model = tiny("dense", fill=fill_reference)
    save_model(tmp_path / "dense", model, card_like(train_run["dir"], model, tmp_path / "dense"))
    for option in (["--svd", "fc6=4"], ["--int8"]):
        code, _, err = cli(["compress", tmp_path / "dense", "--out", tmp_path / "out", *option, "--no-eval"])
        one_line_error(code, err, "convolutional", "--half works for any model")
        assert not (tmp_path / "out").exists()
    code, _, err = cli(["compress", tmp_path / "dense", "--out", tmp_path / "out", "--half", "--no-eval",
                        "--rounds", "1"])
    assert code == 0, err
    with torch.no_grad():
        x = batch()
        expected = model(x)
        assert (load(tmp_path / "out").model(x) - expected).abs().max() < 1e-2 * expected.abs().max()


def test_an_existing_out_is_refused_unless_empty(tmp_path, cli, one_line_error, classic_run):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, _, err = cli(["compress", classic_run, "--out", tmp_path / "full", "--half", "--no-eval"])
    one_line_error(code, err, "not empty", "give a new path or an empty folder")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    code, _, err = cli(["compress", classic_run, "--out", tmp_path / "empty", "--half", "--no-eval", "--rounds", "1"])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["model.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_missing_int8_backend_is_one_line(tmp_path, cli, one_line_error, classic_run, monkeypatch):
    monkeypatch.setattr(torch._C, "_supported_qengines", lambda: [])
    assert torch.backends.quantized.supported_engines == []
    code, _, err = cli(["compress", classic_run, "--out", tmp_path / "out", "--int8", "--no-eval"])
    one_line_error(code, err, "backend missing")
    assert not (tmp_path / "out").exists()


def test_an_unknown_compression_record_is_one_line(tmp_path, cli, one_line_error, classic_run):
    code, _, err = cli(["compress", classic_run, "--out", tmp_path / "out", "--half", "--no-eval", "--rounds", "1"])
    assert code == 0, err
    card = read_json(tmp_path / "out" / "model.json")
    card["compression"]["prune"] = 0.5
    weights = tmp_path / "out" / "model.safetensors"  # the card loading reads is the one inside the weights file
    weights.write_bytes(safetensors_bytes(load_tensors(weights), {CARD_KEY: json.dumps(card)}))
    (tmp_path / "out" / "model.json").write_text(json.dumps(card))
    code, _, err = cli(["eval", tmp_path / "out", "--device", "cpu"])
    one_line_error(code, err, "prune", "does not know")
    with pytest.raises(CheckpointError, match="svd must map layer names to positive ranks"):
        Compression.from_dict({"svd": {"fc6": 0}})


def test_a_compressed_run_is_not_compressed_again(tmp_path, cli, one_line_error, classic_run):
    code, _, err = cli(["compress", classic_run, "--out", tmp_path / "once", "--half", "--no-eval", "--rounds", "1"])
    assert code == 0, err
    code, _, err = cli(["compress", tmp_path / "once", "--out", tmp_path / "twice", "--half", "--no-eval"])
    one_line_error(code, err, "already compressed")
    assert not (tmp_path / "twice").exists()
