"""``--compile``: torch.compile on the CPU, routed through the one Runtime decision.

One real compilation (inference of a tiny model, about 10 s on 2 cores) checks the numbers; the training and CLI
paths are checked by recording what reaches :func:`vggnet.runtime.compile_module`, so that the suite does not pay a
compilation of the backward pass per test. Device: the CPU throughout.
"""

import json

import pytest
import torch

import vggnet
from vggnet.data import Preprocess
from vggnet.base.errors import ConfigError
from vggnet.evaluation.metrics import predict_logits
from vggnet.runtime import resolve_runtime

CPU = torch.device("cpu")


@pytest.fixture
def recorded(monkeypatch):
    """Replace compile_module where it is used by an identity that records each module it was given."""
    seen = []

    def record(module):
        seen.append(module)
        return module

    import vggnet.evaluation.metrics
    import vggnet.evaluation.inference
    import vggnet.training.build

    for where in (vggnet.evaluation.metrics, vggnet.evaluation.inference, vggnet.training.build):
        monkeypatch.setattr(where, "compile_module", record)
    return seen


def test_compiled_inference_equals_eager_on_the_cpu():
    torch.manual_seed(0)
    # 16 channels at 32 x 32 in channels_last: where the hand-fused conv+ReLU op once broke compilation.
    model = vggnet.VGG([16, "M", 16, "M"], batch_norm=True, num_classes=3, in_channels=1, head="gap",
                       input_size=32).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that folding them matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    images = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    prep = Preprocess(32, (0.5,), (0.25,))
    eager = predict_logits(model, images, prep, CPU)
    # Batches of 4, 4 and 2: the last one recompiles with a dynamic batch size (where the fused op's fake kernel
    # once broke; a single batch did not show it).
    compiled = predict_logits(model, images, prep, CPU, batch_size=4, compile=True)
    assert compiled.shape == (10, 3)
    assert torch.allclose(compiled, eager, rtol=0, atol=1e-5 * eager.abs().max().item())
    assert not model.training and all(p.requires_grad for p in model.parameters())  # the caller's model untouched


def test_runtime_records_compile_and_refuses_it_without_a_cpp_compiler(monkeypatch):
    assert resolve_runtime("cpu", "fp32", threads=1, compile=True).compile is True
    assert resolve_runtime("cpu", "fp32", threads=1).to_dict()["compile"] is False
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler.*apt install g\\+\\+"):
        resolve_runtime("cpu", "fp32", threads=1, compile=True)


def test_train_compile_compiles_the_step_network_and_resume_may_change_it(recorded, train_options, tmp_path):
    from vggnet.training import resume, train

    out = tmp_path / "run"
    result = train(**train_options(out=str(out), epochs=1, compile=True))
    assert len(recorded) == 1 and isinstance(recorded[0], vggnet.VGG)  # the bare model (no DDP here)
    assert json.loads((out / "config.json").read_text())["compile"] is True
    assert 0.0 <= result["test_acc"] <= 1.0
    resume(out, epochs=2, compile=False)
    assert len(recorded) == 1  # the resumed session ran eagerly
    assert json.loads((out / "config.json").read_text())["epochs"] == 2


def test_predict_cli_compile_flag(recorded, cli, train_run, image_files):
    code, out, err = cli(["predict", str(train_run["dir"]), str(image_files["rgb"]), "--device", "cpu",
                          "--precision", "fp32", "--compile", "--json"])
    assert code == 0, err
    assert len(recorded) == 1  # the folded inference copy was handed to torch.compile
    eager_code, eager_out, _ = cli(["predict", str(train_run["dir"]), str(image_files["rgb"]), "--device", "cpu",
                                    "--precision", "fp32", "--json"])
    assert eager_code == 0 and len(recorded) == 1
    compiled_top = json.loads(out)[0]["top"]
    eager_top = json.loads(eager_out)[0]["top"]
    assert [t["index"] for t in compiled_top] == [t["index"] for t in eager_top]
    assert [t["prob"] for t in compiled_top] == pytest.approx([t["prob"] for t in eager_top], abs=1e-5)


def test_train_cli_offers_compile_and_resume_accepts_it(train_cli, train_cli_args, tmp_path, monkeypatch):
    monkeypatch.setattr("vggnet.training.build.compile_module", lambda module: module)
    out = tmp_path / "run"
    code, _, err = train_cli(train_cli_args("--epochs", "1", "--compile", "--out", str(out)))
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["compile"] is True
    code, _, err = train_cli(["train", "--resume", str(out), "--epochs", "2", "--compile"])
    assert code == 0, err


def test_eval_cli_compile_flag_and_its_refusal_with_scales(recorded, cli, train_run, one_line_error):
    code, out, err = cli(["eval", str(train_run["dir"]), "--device", "cpu", "--compile", "--json",
                          "--out", str(train_run["dir"].parent / "eval-compiled")])
    assert code == 0, err
    assert len(recorded) == 1  # the folded inference copy was handed to torch.compile
    compiled = json.loads(out)
    code, out, err = cli(["eval", str(train_run["dir"]), "--device", "cpu", "--json",
                          "--out", str(train_run["dir"].parent / "eval-eager")])
    assert code == 0 and len(recorded) == 1
    assert compiled["top1"] == json.loads(out)["top1"]
    code, _, err = cli(["eval", str(train_run["dir"]), "--device", "cpu", "--compile", "--scales", "32"])
    one_line_error(code, err, "--compile applies to plain evaluation")
