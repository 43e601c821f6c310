"""The bench's ``contention`` section (issue 13) and the oneDNN dispatch record, on the CPU at tiny sizes."""

import contextlib
import platform

import pytest
import torch

from vggnet.bench import contention, summarize_targets
from vggnet.bench.conditions import onednn_dispatch, parse_onednn_log
from vggnet.bench.config import TARGETS, BenchConfig
from vggnet.bench.render import render_contention
from vggnet.runtime import available_cores


def test_three_runs_in_order_quiet_then_beside_the_busy_process(monkeypatch):
    calls, busy = [], {"now": False}
    infer_rates = {None: [2000.0, 1200.0], available_cores(): [400.0]}

    class FakePasses:
        def __init__(self, cfg, images):
            self.images, self.batch_size = [0] * images, 256

        def run(self, threads):
            calls.append(("infer", threads, busy["now"], len(self.images)))
            return {"images_per_second": infer_rates[threads].pop(0), "seconds": 1.0, "threads_given": threads,
                    "adapts": threads is None, "threads_at_end": 1}

    @contextlib.contextmanager
    def fake_busy():
        busy["now"] = True
        yield None
        busy["now"] = False

    rates = {None: [1000.0, 600.0], available_cores(): [250.0]}

    def fake_epoch(cfg, subset, threads, **overrides):
        calls.append((threads, busy["now"], subset, overrides["batch_size"]))
        return {"train_images_per_second": rates[threads].pop(0), "train_seconds": 1.0, "threads_given": threads,
                "adapts": threads is None, "threads_at_end": 1}

    monkeypatch.setattr(contention, "busy_process", fake_busy)
    monkeypatch.setattr(contention, "epoch_throughput", fake_epoch)
    monkeypatch.setattr(contention, "EvalPasses", FakePasses)
    r = contention.bench_contention(BenchConfig(sections=("contention",), quick=True, e2e_subset=96), {})
    assert calls == [(None, False, 96, 64), ("infer", None, False, 256), (available_cores(), True, 96, 64),
                     (None, True, 96, 64), ("infer", available_cores(), True, 256), ("infer", None, True, 256)]
    assert r["share_default"] == 0.6 and r["share_all_cores"] == 0.25 and r["target_share"] == 0.5
    assert r["infer"]["share_default"] == 0.6 and r["infer"]["share_all_cores"] == 0.2
    assert (r["infer"]["images"], r["infer"]["batch_size"]) == (256, 256)
    row = [s for s in summarize_targets({"contention": r}) if "busy process" in s["target"]]
    assert row == [{"target": "training beside one busy process, share of quiet images/s", "measured": 0.6,
                    "goal": TARGETS["contention_share"], "met": True},
                   {"target": "inference beside one busy process, share of quiet images/s", "measured": 0.6,
                    "goal": TARGETS["contention_share"], "met": True}]
    text = "\n".join(render_contention(r))
    assert "60%" in text and "25%" in text and "100%" in text
    assert "inference: vggnet eval's forward passes over 256 test images, batch 256, fp32" in text
    infer_table = text.split("inference:")[1]
    assert "2000" in infer_table and "400" in infer_table and "20%" in infer_table and "60%" in infer_table
    old = {key: value for key, value in r.items() if key != "infer"}  # results recorded before issue 22
    assert "inference" not in "\n".join(render_contention(old))
    assert len([s for s in summarize_targets({"contention": old}) if "busy process" in s["target"]]) == 1


def test_real_runs_record_who_adapted_and_leave_the_benchs_threads(train_data_dir):
    before = torch.get_num_threads()
    cfg = BenchConfig(sections=("contention",), quick=True, data_dir=str(train_data_dir), e2e_subset=128)
    r = contention.bench_contention(cfg, {})
    assert torch.get_num_threads() == before
    assert (r["idle"]["adapts"], r["busy_all_cores"]["adapts"], r["busy_default"]["adapts"]) == (True, False, True)
    assert r["busy_all_cores"]["threads_given"] == r["cores"] == available_cores()
    assert r["busy_all_cores"]["threads_at_end"] == available_cores()
    for key in ("idle", "busy_all_cores", "busy_default"):
        assert r[key]["train_images_per_second"] * r[key]["train_seconds"] == pytest.approx(128, rel=1e-9)
    assert r["share_default"] == r["busy_default"]["train_images_per_second"] / r["idle"]["train_images_per_second"]
    infer = r["infer"]
    assert (infer["idle"]["adapts"], infer["busy_all_cores"]["adapts"], infer["busy_default"]["adapts"]) == (
        True, False, True)
    assert infer["busy_all_cores"]["threads_at_end"] == available_cores()
    assert infer["images"] == 64  # the tiny test set, whole (quick asks for 256)
    for key in ("idle", "busy_all_cores", "busy_default"):
        assert infer[key]["images_per_second"] * infer[key]["seconds"] == pytest.approx(64, rel=1e-9)
    assert infer["share_default"] == infer["busy_default"]["images_per_second"] / infer["idle"]["images_per_second"]


def test_the_competitor_is_killed_after_the_block():
    with contention.busy_process() as proc:
        assert proc.poll() is None
    assert proc.returncode is not None


LOG = """onednn_verbose,v1,info,oneDNN v3.12.0 (commit 80afa71049cd69a3df32adcccb623b12cd7baa22)
onednn_verbose,v1,info,cpu,runtime:OpenMP,nthr:2
onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with Intel DL Boost and bfloat16 support
onednn_verbose,v1,primitive,exec,cpu,reorder,jit:blk,undef,src:f32::blocked:acdb::f0 dst:f32::blocked:Acdb16a::f0,,,1
onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx512_core_bf16,forward_training,src:bf16,,,2
"""


def test_the_dispatch_record_is_read_from_onednns_log():
    assert parse_onednn_log(LOG) == {"isa": "Intel AVX-512 with Intel DL Boost and bfloat16 support",
                                     "convolution": "brg_conv_fwd:avx512_core_bf16"}
    assert parse_onednn_log("") == {"isa": None, "convolution": None}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's log checked on x86-64 only")
def test_the_probe_gets_a_log_from_this_cpu():
    fp32 = onednn_dispatch("fp32")
    assert fp32["isa"].startswith("Intel") and fp32["convolution"].endswith(("avx2", "avx512_core", "amx",
                                                                             "avx512_core_amx", "avx2_vnni_2"))
