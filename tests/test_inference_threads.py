"""Inference follows the other processes' load (issue 22): ``vggnet eval``, ``predict`` and ``compress`` without
``--threads`` poll :attr:`vggnet.runtime.Runtime.adaptive` between batches and latency rounds; with ``--threads``
the count never changes. The load is injected (a window that always reads one busy core), on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vggnet import runtime
from vggnet.base.cpuload import LoadWindow
from vggnet.data.dataset import ImageDataset
from vggnet.evaluation.metrics import evaluate
from vggnet.runtime import (INFERENCE_WINDOW_SECONDS, AdaptiveThreads, Runtime, available_cores, inference_threads,
                            resolve_runtime)
from vggnet.use import compress

CPU = torch.device("cpu")


def sequence(*values):
    it = iter(values)
    return lambda: next(it)


@pytest.fixture
def one_busy_core(monkeypatch, restore_threads, fake_window):
    """A 2-core machine on which another process always keeps one core busy."""
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    monkeypatch.setattr(runtime, "LoadWindow", lambda cpus=None: fake_window(*[1.0] * 10_000))


class Recording(nn.Module):
    """A linear classifier of 1x4x4 images that records the intra-op thread count of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 3)
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(torch.get_num_threads())
        return self.fc(x.flatten(1))


def tiny_set(n: int) -> ImageDataset:
    images = torch.arange(n * 16, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 4, 4)
    return ImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"], "tiny")


def test_resolve_runtime_adapts_on_the_cpu_only_without_threads(restore_threads):
    rt = resolve_runtime("cpu", "fp32")
    assert isinstance(rt.adaptive, AdaptiveThreads)
    assert (rt.adaptive.cores, rt.adaptive.seconds) == (available_cores(), INFERENCE_WINDOW_SECONDS)
    assert resolve_runtime("cpu", "fp32", threads=1).adaptive is None
    assert resolve_runtime("cpu", "fp32", deterministic=True).adaptive is None
    assert Runtime(CPU, "fp32", True, 2).adaptive is None  # a runtime built by hand keeps its count
    assert inference_threads(torch.device("cuda"), threads_given=False) is None
    assert rt == Runtime(CPU, "fp32", True, rt.threads)  # not one of the resolved values
    assert "adaptive" not in rt.to_dict()


def test_evaluation_polls_the_load_before_every_batch(restore_threads, fake_window):
    torch.set_num_threads(2)
    model = Recording()
    window = fake_window(1.0, 1.0, 0.0, None)  # busy, busy, quiet, no reading
    result = evaluate(model, tiny_set(40), lambda x: x.float() / 255, "cpu", "fp32", batch_size=10,
                      threads=AdaptiveThreads(2, window, seconds=0.0))
    assert model.seen == [1, 1, 2, 2] and window.reads == 4 and result.n == 40
    model.seen.clear()
    evaluate(model, tiny_set(40), lambda x: x.float() / 255, "cpu", "fp32", batch_size=10)  # nothing to poll
    assert model.seen == [2, 2, 2, 2]


def test_settle_waits_out_the_window_then_adapts(monkeypatch, restore_threads):
    slept = []
    monkeypatch.setattr(runtime.time, "sleep", slept.append)
    # opened at 0.0; settle looks at 0.1 (sleeps the 0.15 s left), then reads at 0.25: 0.25 busy s of others / 0.25 s
    window = LoadWindow(busy=sequence(0.0, 0.25), own=sequence(0.0, 0.0), clock=sequence(0.0, 0.1, 0.25, 0.25))
    torch.set_num_threads(2)
    assert AdaptiveThreads(2, window, seconds=0.25).settle() == 1
    assert slept == [pytest.approx(0.15)] and torch.get_num_threads() == 1


def test_vggnet_eval_drops_to_one_thread_beside_a_busy_process(cli, train_run, tmp_path, one_busy_core):
    code, text, err = cli(["eval", train_run["dir"], "--device", "cpu", "--batch-size", "16", "--json",
                           "--out", tmp_path / "adapted"])
    assert code == 0, err
    assert torch.get_num_threads() == 1
    adapted = json.loads(text)
    code, text, err = cli(["eval", train_run["dir"], "--device", "cpu", "--batch-size", "16", "--json",
                           "--out", tmp_path / "pinned", "--threads", "2"])
    assert code == 0, err
    assert torch.get_num_threads() == 2  # --threads given: the count never changes
    assert json.loads(text)["n"] == adapted["n"] == 64


def test_vggnet_predict_drops_to_one_thread_beside_a_busy_process(cli, train_run, image_files, one_busy_core):
    code, text, err = cli(["predict", train_run["dir"], image_files["rgb"], "--device", "cpu", "--precision", "fp32"])
    assert code == 0, err
    assert torch.get_num_threads() == 1
    code, text, err = cli(["predict", train_run["dir"], image_files["rgb"], "--device", "cpu", "--precision", "fp32",
                           "--threads", "2"])
    assert code == 0, err
    assert torch.get_num_threads() == 2


def test_vggnet_compress_measures_on_the_loads_thread_count_and_reports_it(cli, train_run, tmp_path, one_busy_core,
                                                                          monkeypatch):
    latency_threads, eval_threads = [], []
    real_latency, real_eval = compress.latency, compress.run_eval

    def recording_latency(*args, **kwargs):
        latency_threads.append(torch.get_num_threads())
        return real_latency(*args, **kwargs)

    def recording_eval(*args, **kwargs):
        result = real_eval(*args, **kwargs)
        eval_threads.append(torch.get_num_threads())
        return result

    monkeypatch.setattr(compress, "latency", recording_latency)
    monkeypatch.setattr(compress, "run_eval", recording_eval)
    code, text, err = cli(["compress", train_run["dir"], "--out", tmp_path / "adapted", "--half", "--rounds", "3"])
    assert code == 0, err
    assert "median of 3 runs, 1 thread(s)" in text
    assert eval_threads == [1, 1] and latency_threads == [1, 1, 1, 1]  # the warm-up, then one call per round
    assert torch.get_num_threads() == 2  # compress leaves the count as it came
    latency_threads.clear(), eval_threads.clear()
    code, text, err = cli(["compress", train_run["dir"], "--out", tmp_path / "pinned", "--half", "--rounds", "3",
                           "--threads", "2"])
    assert code == 0, err
    assert "median of 3 runs, 2 thread(s)" in text
    assert eval_threads == [2, 2] and latency_threads == [2]  # nothing adapts
    done = json.loads(cli(["compress", train_run["dir"], "--out", tmp_path / "json", "--half", "--rounds", "2",
                           "--json"])[1])
    assert done["threads"] == 1


def test_multiscale_evaluation_polls_the_load_before_every_chunk(restore_threads, fake_window):
    """``vggnet eval --scales`` follows the load as plain evaluation does: the in-memory protocols poll before each
    chunk; the thread count at each forward is the one the window's reading asked for."""
    from vggnet.data.augment import Preprocess
    from vggnet.evaluation.multiscale import Protocol, evaluate_multiscale
    from vggnet.net.models import VGG
    torch.set_num_threads(2)
    model = VGG([4, "M"], num_classes=3, in_channels=1, head="gap", input_size=4).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    window = fake_window(1.0, 0.0, 1.0)
    evaluate_multiscale(model, tiny_set(30), Preprocess(4, (0.5,), (0.25,)),
                        Protocol(scales=(4,), dense=True), batch_size=10,
                        adaptive=AdaptiveThreads(2, window, seconds=0.0))
    assert seen == [1, 2, 1] and window.reads == 3


def test_training_evaluation_polls_the_runs_threads(monkeypatch, fake_window):
    """The end-of-epoch evaluation of a single-process run gets the run's AdaptiveThreads (its batches follow the
    load as the training steps do)."""
    from vggnet.training import distributed, loop
    got = {}
    monkeypatch.setattr(distributed, "evaluate", lambda *a, **k: got.update(k) or "result")

    class Run:
        threads = AdaptiveThreads(2, fake_window(), seconds=0.0)
        model = nn.Linear(1, 1)
        preprocess = None
        dist = distributed.Dist()
        runtime = Runtime(device=CPU, precision="fp32", channels_last=False, threads=2)
        config = type("C", (), {"eval_batch_size": 8, "progress": False})

    assert loop.evaluate(Run, "data") == "result" and got["threads"] is Run.threads
