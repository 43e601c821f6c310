"""The targets summary, and measurements a CPU cannot make recorded and rendered as skipped."""

import pytest

from vggnet.bench import BenchConfig, render, summarize_targets
from vggnet.bench.conditions import BF16_UNSUPPORTED
from vggnet.bench.peak import apply_peak, bench_peak, keep_best


def test_summarize_targets_marks_met_and_missed():
    results = {"train": {"ratio": 3.0, "vggnet": {"peak_share": 0.5}}, "infer": {"ratio": 2.0},
               "memory": {"rows": [{"tensor_error": -0.1}, {"tensor_error": 0.05}]}}
    rows = {r["target"]: r for r in summarize_targets(results)}
    assert rows["training step, images/s vs reference"]["met"]
    assert not rows["training step, share of same-precision peak"]["met"]
    assert not rows["inference, images/s vs reference"]["met"]
    assert rows["memory estimate, largest error vs profiler tensor peak"]["measured"] == pytest.approx(0.1)
    assert rows["memory estimate, largest error vs profiler tensor peak"]["met"]


def test_peak_skips_bf16_where_the_cpu_cannot_run_it(monkeypatch):
    import vggnet.bench.conditions

    monkeypatch.setattr(vggnet.bench.conditions, "cpu_runs_bf16", lambda: False)
    peak = bench_peak(BenchConfig(quick=True))
    assert peak["bf16"] == {"skipped": BF16_UNSUPPORTED}
    assert peak["fp32"]["flop_per_second"] > 0
    keep_best(peak, {"fp32": {"flop_per_second": 2 * peak["fp32"]["flop_per_second"]}, "bf16": peak["bf16"]})
    results = {"peak": peak, "x": {"precision": "bf16", "flop_per_second": 1.0, "peak_share": 9.0},
               "y": [{"precision": "fp32", "flop_per_second": peak["fp32"]["flop_per_second"], "peak_share": None}]}
    apply_peak(results, peak)
    assert results["x"]["peak_share"] is None and results["y"][0]["peak_share"] == 1.0


def test_render_marks_skipped_measurements():
    skipped = {"skipped": BF16_UNSUPPORTED}
    row = {"name": "ref", "precision": "fp32", "images_per_second": 10.0, "flop_per_second": 2e9,
           "peak_share": 0.5, "ratio": 1.0}
    results = {"conditions": {"cpu": "cpu", "threads": 1, "cores": 2, "torch": "t", "bf16_native": False},
               "peak": {"shape": [1, 2, 3, 3], "fp32": {"flop_per_second": 4e9}, "bf16": skipped},
               "ablation": {"train": [row, {"name": "+ bf16 autocast", "precision": "bf16", **skipped}],
                            "infer": [row], "infer_model": {"model": "vgg11_bn", "input_size": 32, "batch": 2}},
               "profile": {"small_map_sweep": skipped, "train": []}}
    text = render(results)
    assert f"bf16 not measured ({BF16_UNSUPPORTED})" in text and "fp32 4 GFLOP/s" in text
    assert "+ bf16 autocast" in text and f"skipped: {BF16_UNSUPPORTED}" in text
    assert f"oneDNN vs im2col + GEMM: not measured ({BF16_UNSUPPORTED})" in text
