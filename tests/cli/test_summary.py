"""Tests for ``vggnet summary`` and ``vggnet models``: JSON schema, totals, golden table, one-line errors.

The CLI is called in-process through ``vggnet.cli.main`` (fast, output captured with capsys); one test runs
``python -m vggnet`` in a subprocess to prove the module entry point works.

Expected numbers are hand-derived (see tests/test_analysis.py for the formulas): VGG16 at 224x224x3 has
138,357,544 parameters and 15,470,264,320 MACs; its training-memory estimate peaks at the loss: 12 * params
bytes for fp32 weights + last step's gradients + momentum (16 * params with Adam) plus 73,338,696 bytes per image
on CUDA. The tests that use these numbers pass ``--device cuda``: without it the estimate is for the device this
machine would train on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vggnet import runtime
from vggnet.cli import main

GOLDEN = Path(__file__).parent / "golden"

LAYER_KEYS = {"name", "type", "output_shape", "activations", "activation_bytes", "params", "macs"}
LAYER_EXTRA_KEYS = {"module", "trainable_params"}  # module path and per-layer trainable count, also documented
TOTALS_KEYS = {"params", "trainable_params", "macs", "activations", "activation_bytes"}
TOTALS_EXTRA_KEYS = {"frozen_params", "train_extra_bytes_per_image"}
MEMORY_KEYS = {"batch_size", "optimizer", "precision", "device", "peak_at", "weights", "gradients",
               "optimizer_state", "activations", "weight_copies", "backward_workspace", "total"}

VGG16_PARAMS = 138_357_544
VGG16_PER_IMAGE = 73_338_696  # saved for backward 73,326,688 + labels 8 + logits and log-probs 2 x 4,000
# On the CPU dropout keeps a noise tensor of its input's dtype (fp32) instead of CUDA's bool mask: 3 B more for
# each of the 2 x 4,096 dropout values.
VGG16_PER_IMAGE_CPU = VGG16_PER_IMAGE + 3 * 2 * 4096  # 73,363,272
VGG16_FC6_WEIGHT = 25_088 * 4096  # the largest tensor: CPU Adam's two temporaries are this size
VGG16_STEP_PER_IMAGE = 4 * 150_528 + 8 + 4 * 1000  # alive at the optimizer step: the batch, labels and logits


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; argparse errors leave through SystemExit, ours through the return value."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str):
    code, out, err = run(capsys, *argv, "--json")
    assert (code, err) == (0, "")
    return json.loads(out)


# --------------------------------------------------------------------------------------------- summary --json
def test_summary_json_vgg16_keys_and_totals(capsys):
    data = run_json(capsys, "summary", "vgg16", "--input-size", "224", "--device", "cuda")
    assert data["model"] == "vgg16"
    assert data["input_shape"] == [3, 224, 224]
    assert data["dtype"] == "float32"
    assert "one multiply-add" in data["mac_convention"]
    assert data["unsupported"] == [] and data["uncalled"] == []
    layers, totals = data["layers"], data["totals"]
    for layer in layers:
        assert LAYER_KEYS <= set(layer), layer
        assert set(layer) == LAYER_KEYS | LAYER_EXTRA_KEYS, layer
        assert isinstance(layer["output_shape"], list)
    assert TOTALS_KEYS <= set(totals)
    assert set(totals) == TOTALS_KEYS | TOTALS_EXTRA_KEYS
    for key in TOTALS_KEYS:
        assert totals[key] == sum(layer[key] for layer in layers), key
    assert totals["params"] == totals["trainable_params"] == VGG16_PARAMS
    assert totals["macs"] == 15_470_264_320
    assert totals["activations"] == 15_262_696
    assert totals["activation_bytes"] == 61_050_784
    assert [layer["name"] for layer in layers][:3] == ["input", "conv1_1", "relu1_1"]
    assert layers[0] == {"name": "input", "type": "Input", "output_shape": [3, 224, 224], "activations": 150_528,
                         "activation_bytes": 602_112, "params": 0, "macs": 0, "module": "",
                         "trainable_params": 0}
    # Without --batch-size the estimate is for one image, SGD with momentum.
    assert data["training_memory"]["batch_size"] == 1
    assert data["training_memory"]["total"] == 12 * VGG16_PARAMS + VGG16_PER_IMAGE
    assert "max_batch_size" not in data and "memory_budget" not in data


def test_summary_json_training_memory_fields(capsys):
    data = run_json(capsys, "summary", "vgg16", "--batch-size", "32", "--optimizer", "adam",
                    "--memory-budget", "11GiB", "--device", "cuda")
    mem = data["training_memory"]
    assert set(mem) == MEMORY_KEYS
    assert (mem["batch_size"], mem["optimizer"]) == (32, "adam")
    assert mem["weights"] == mem["gradients"] == 4 * VGG16_PARAMS == 553_430_176
    assert mem["optimizer_state"] == 8 * VGG16_PARAMS  # Adam: two fp32 buffers
    assert (mem["precision"], mem["device"], mem["peak_at"]) == ("fp32", "cuda", "loss")
    assert mem["activations"] == 32 * VGG16_PER_IMAGE
    assert mem["weight_copies"] == mem["backward_workspace"] == 0
    assert mem["total"] == sum(mem[k] for k in MEMORY_KEYS - {"batch_size", "optimizer", "precision", "device",
                                                              "peak_at", "total"})
    assert mem["total"] == 16 * VGG16_PARAMS + 32 * VGG16_PER_IMAGE == 4_560_558_976
    assert data["memory_budget"] == 11 * 2**30
    assert data["max_batch_size"] == (11 * 2**30 - 16 * VGG16_PARAMS) // VGG16_PER_IMAGE == 130


@pytest.mark.parametrize("budget,optimizer,expected", [("11GiB", "sgd", 138), ("11GB", "sgd", 127),
                                                       ("11GiB", "sgd-nomomentum", 145), ("1GB", "sgd", 0)])
def test_summary_max_batch_size_for_budgets(capsys, budget, optimizer, expected):
    data = run_json(capsys, "summary", "vgg16", "--memory-budget", budget, "--optimizer", optimizer,
                    "--device", "cuda")
    static = 4 * VGG16_PARAMS * {"sgd": 3, "sgd-nomomentum": 2}[optimizer]
    assert data["max_batch_size"] == max(0, (data["memory_budget"] - static) // VGG16_PER_IMAGE) == expected


def test_summary_fitted_cifar_head(capsys):
    data = run_json(capsys, "summary", "vgg16", "--head", "fitted", "--input-size", "32", "--num-classes", "10")
    t = data["totals"]
    conv_params = sum(layer["params"] for layer in data["layers"] if layer["name"].startswith("conv"))
    assert conv_params == 14_714_688  # the conv stack does not depend on the head or the input size
    assert t["params"] == 14_714_688 + (512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10) == 33_638_218
    assert round(t["params"] / VGG16_PARAMS, 3) == 0.243
    fc6 = next(layer for layer in data["layers"] if layer["name"] == "fc6")
    assert fc6["macs"] == 512 * 4096


def test_summary_text_reports_budget(capsys):
    code, out, err = run(capsys, "summary", "vgg16", "--batch-size", "32", "--memory-budget", "11GiB",
                         "--device", "cuda")
    assert (code, err) == (0, "")
    assert "training memory on cuda (fp32), batch 32, sgd: 3.73 GiB" in out
    assert out.rstrip().endswith("largest batch within 11.00 GiB: 138")
    assert "total                                     15,262,696              58.22 MiB  138,357,544  15,470,264,320" in out


# ------------------------------------------------------------------------------------------ summary --device
@pytest.mark.parametrize("machine", ["cpu", "cuda"], ids=["cpu_only", "with_gpu"])  # an id "cuda" skips as the marker
def test_summary_device_defaults_to_the_device_training_would_use(capsys, monkeypatch, machine):
    """The bug: the estimate was always for CUDA, also on a CPU-only machine. Now the default is the device
    ``vggnet train`` would train on here (``runtime.pick_device("auto")``: cuda when available, else cpu), and the
    JSON and the text say which. ``machine`` stands for what ``auto`` resolves to."""
    asked = []

    def pick_device(requested="auto"):
        asked.append(requested)
        return torch.device(machine if requested == "auto" else requested)

    monkeypatch.setattr(runtime, "pick_device", pick_device)
    data = run_json(capsys, "summary", "vgg16")
    assert asked == ["auto"]
    per_image = VGG16_PER_IMAGE_CPU if machine == "cpu" else VGG16_PER_IMAGE
    assert (data["training_memory"]["device"], data["training_memory"]["peak_at"]) == (machine, "loss")
    assert data["training_memory"]["total"] == 12 * VGG16_PARAMS + per_image
    assert data["training_memory"] == run_json(capsys, "summary", "vgg16", "--device", machine)["training_memory"]
    assert asked == ["auto"]  # an explicit --device is not resolved
    code, out, err = run(capsys, "summary", "vgg16", "--batch-size", "32")
    assert (code, err) == (0, "")
    assert f"training memory on {machine} (fp32), batch 32, sgd: 3.73 GiB" in out


def test_summary_device_default_in_the_tests_is_the_cpu(capsys):
    """The tests' ``auto`` means the CPU (conftest), as on this CPU-only machine: the estimate is for the CPU."""
    data = run_json(capsys, "summary", "vgg16")
    assert data["training_memory"]["device"] == "cpu"
    assert data["training_memory"]["total"] == 12 * VGG16_PARAMS + VGG16_PER_IMAGE_CPU == 1_733_653_800


def test_summary_device_cpu_and_cuda_follow_their_own_kernels(capsys):
    """``--device`` picks the rules that differ per device, whatever this machine has: dropout's mask (CUDA 1 B,
    CPU 4 B per value) and Adam's temporaries at the step (CUDA: 4 B per parameter; CPU: 2 x the largest tensor)."""
    cpu = run_json(capsys, "summary", "vgg16", "--device", "cpu")["training_memory"]
    cuda = run_json(capsys, "summary", "vgg16", "--device", "cuda")["training_memory"]
    assert (cpu["device"], cuda["device"]) == ("cpu", "cuda")
    assert cpu["total"] - cuda["total"] == VGG16_PER_IMAGE_CPU - VGG16_PER_IMAGE == 24_576
    # Adam at batch 1 peaks at the optimizer step; a budget of CUDA's peak fits one image there, none on the CPU.
    cuda_step = 20 * VGG16_PARAMS + VGG16_STEP_PER_IMAGE
    cpu_step = 16 * VGG16_PARAMS + 2 * 4 * VGG16_FC6_WEIGHT + VGG16_STEP_PER_IMAGE
    assert (cuda_step, cpu_step) == (2_767_757_000, 3_036_410_408)
    for device, step, workspace, fits in (("cuda", cuda_step, 4 * VGG16_PARAMS, 1),
                                          ("cpu", cpu_step, 8 * VGG16_FC6_WEIGHT, 0)):
        data = run_json(capsys, "summary", "vgg16", "--optimizer", "adam", "--memory-budget", str(cuda_step),
                        "--device", device)
        mem = data["training_memory"]
        assert (mem["peak_at"], mem["backward_workspace"], mem["total"]) == ("optimizer step", workspace, step)
        assert data["max_batch_size"] == fits, device


def test_summary_custom_arch(capsys):
    data = run_json(capsys, "summary", "custom", "--arch", "16,LRN,M,conv1-32,32,M", "--in-channels", "1",
                    "--input-size", "64x96", "--head", "gap", "--num-classes", "7", "--width", "0.5")
    names = [layer["name"] for layer in data["layers"]]
    assert names == ["input", "conv1_1", "relu1_1", "lrn1_1", "pool1", "conv2_1", "relu2_1", "conv2_2",
                     "relu2_2", "pool2", "avgpool", "drop", "fc"]
    assert data["input_shape"] == [1, 64, 96]
    # width 0.5: 8 and 16 channels
    assert data["layers"][1]["params"] == 1 * 9 * 8 + 8
    assert data["layers"][5]["params"] == 8 * 1 * 16 + 16  # the 1x1 conv
    assert data["totals"]["params"] == 80 + 144 + (16 * 9 * 16 + 16) + (16 * 7 + 7) == 2_663


# ------------------------------------------------------------------------------------------------------ golden
GOLDEN_ARGS = ["summary", "vgg11", "--input-size", "32", "--num-classes", "10", "--in-channels", "1",
               "--device", "cuda"]


def test_summary_golden_table(capsys):
    """``vggnet summary vgg11 --input-size 32 --num-classes 10 --in-channels 1 --device cuda`` equals the stored
    table exactly.

    After an intended change to the table, regenerate the file with

        VGGNET_REGEN_GOLDEN=1 .venv/bin/pytest tests/cli/test_summary.py -k golden

    and review the diff by hand. The hand-checked numbers asserted below guard against accepting a wrong table.
    """
    code, out, err = run(capsys, *GOLDEN_ARGS)
    assert (code, err) == (0, "")
    path = GOLDEN / "summary_vgg11_32.txt"
    if os.environ.get("VGGNET_REGEN_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(out)
    assert out == path.read_text()
    # conv1_1: 1*9*64 + 64 params, 32*32*64*1*9 MACs; fc6 keeps 25088 inputs (7x7 adaptive pooling of a 1x1 map).
    assert "conv1_1  Conv2d             64x32x32        65,536             256.00 KiB          640      589,824" in out
    assert "avgpool  AdaptiveAvgPool2d  512x7x7         25,088" in out
    # params: convs 9,219,328 + FC 102,764,544 + 16,781,312 + 40,970; MACs 151,584,768 conv + 119,578,624 FC.
    assert "total                                      217,098             848.04 KiB  128,806,154  271,163,392" in out


# ------------------------------------------------------------------------------------------------------ models
def test_models_json(capsys):
    data = run_json(capsys, "models")
    assert len(data) == 12
    by_name = {r["name"]: r for r in data}
    expected = {"vgg11": (132_863_336, 7.609), "vgg11_bn": (132_868_840, 7.609), "vgg11_lrn": (132_863_336, 7.609),
                "vgg11_lrn_bn": (132_868_840, 7.609), "vgg13": (133_047_848, 11.308),
                "vgg13_bn": (133_053_736, 11.308), "vgg16_c": (133_638_952, 11.771),
                "vgg16_c_bn": (133_647_400, 11.771), "vgg16": (138_357_544, 15.470),
                "vgg16_bn": (138_365_992, 15.470), "vgg19": (143_667_240, 19.632), "vgg19_bn": (143_678_248, 19.632)}
    assert set(by_name) == set(expected)
    for name, (params, gmacs) in expected.items():
        assert by_name[name]["params"] == params, name
        assert round(by_name[name]["gmacs_224"], 3) == gmacs, name
    assert by_name["vgg16"]["gmacs_224"] == 15.47026432
    assert {r["weight_layers"] for r in data if r["config"] == "C"} == {16}


def test_models_pattern_and_table(capsys):
    code, out, err = run(capsys, "models", "vgg16*")
    assert (code, err) == (0, "")
    assert [line.split()[0] for line in out.splitlines()[2:6]] == ["vgg16", "vgg16_bn", "vgg16_c", "vgg16_c_bn"]
    assert "138,357,544     15.470" in out


# ------------------------------------------------------------------------------------------------------ errors
BAD = {
    "unknown model": (["summary", "vgg99"], "unknown model 'vgg99'"),
    "too small for vgg16": (["summary", "vgg16", "--input-size", "16"], "at least 32x32"),
    "size not a number": (["summary", "vgg16", "--input-size", "abc"], "'abc' is not a size"),
    "zero width": (["summary", "vgg16", "--width", "0"], "must be > 0"),
    "budget not a size": (["summary", "vgg16", "--memory-budget", "lots"], "'lots' is not a size"),
    "unknown head": (["summary", "vgg16", "--head", "nope"], "invalid choice: 'nope'"),
    "custom without arch": (["summary", "custom"], "needs arch="),
    "bad arch token": (["summary", "custom", "--arch", "64,X,M"], "architecture token 'X' is not a layer"),
    "arch on a fixed model": (["summary", "vgg16", "--arch", "64,M"], "fixed architecture"),
    "zero batch": (["summary", "vgg16", "--batch-size", "0"], "must be >= 1"),
    "unknown optimizer": (["summary", "vgg16", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    "unknown device": (["summary", "vgg16", "--device", "mps"], "invalid choice: 'mps'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_exit_2_with_one_line(capsys, case):
    argv, message = BAD[case]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert err.startswith("vggnet summary: error: ")
    assert message in err


# ------------------------------------------------------------------------------------------ module entry point
def test_python_dash_m_vggnet():
    env = {k: v for k, v in os.environ.items() if k != "VGGNET_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "vggnet", "summary", "vgg16", "--json"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    totals = json.loads(proc.stdout)["totals"]
    assert (totals["params"], totals["macs"]) == (VGG16_PARAMS, 15_470_264_320)
