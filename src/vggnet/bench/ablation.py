"""The ``ablation`` section, what each optimisation contributes (training step and inference, one change at a
time, each row timed against the same reference in the same rounds), and the ``profile`` section,
``torch.profiler`` tables of vggnet's training step and inference (where the time goes) with the sweep behind the
small-map GEMM convolutions' dispatch rule.

Rows that need bf16 convolutions are recorded as ``{"name", "precision", "skipped": reason}`` on a CPU that cannot
run them (:func:`.conditions.bf16_skip`); so is the whole sweep.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from vggnet.bench.conditions import bf16_skip
from vggnet.bench.config import BenchConfig
from vggnet.bench.infer import inference_call, infer_models, logit_error
from vggnet.bench.reference import forward_macs, reference_train_step
from vggnet.bench.runs import first_batches, make_run, preprocessed, step_setup, vggnet_step
from vggnet.base.timing import interleaved, rows_against
from vggnet.evaluation.inference import optimize_for_inference
from vggnet.net.cpu_bf16 import SmallMapConv2d, gemm_conv3x3

REFERENCE = "reference: eager fp32 NCHW"


def in_order(labels: list[str], timed: list[dict[str, Any]], skipped: dict[str, dict[str, Any]]
             ) -> list[dict[str, Any]]:
    """The timed and the skipped rows, in the order of ``labels``."""
    by_name = {row["name"]: row for row in timed}
    return [by_name[label] if label in by_name else skipped[label] for label in labels]


def ablation_train(cfg: BenchConfig, tmp: Path) -> list[dict[str, Any]]:
    """Training step: fp32 NCHW, + channels_last, + bf16 autocast, + small-map GEMM convs."""
    variants = [("vggnet fp32, NCHW", dict(precision="fp32", channels_last=False), True),
                ("+ channels_last", dict(precision="fp32", channels_last=True), True),
                ("+ bf16 autocast", dict(precision="bf16", channels_last=True), False),
                ("+ small-map GEMM convs (vggnet default)", dict(precision="bf16", channels_last=True), True)]
    skip = bf16_skip()
    skipped = {label: {"name": label, "precision": "bf16", **skip}
               for label, overrides, _ in variants if skip and overrides["precision"] == "bf16"}
    setups = [(label, small_maps, *step_setup(cfg, tmp / f"run{i}", **overrides))
              for i, (label, overrides, small_maps) in enumerate(variants) if label not in skipped]
    first, batches = setups[0][2:]
    steps: dict[str, Callable[[], Any]] = {REFERENCE: reference_train_step(first.model.config,
                                                                           preprocessed(first, batches))}
    precisions = {REFERENCE: "fp32"}
    batch = first.loader.batch_size
    flops = 3 * 2 * forward_macs(first.model.config, 32) * batch
    for label, small_maps, run, batches in setups:
        if not small_maps:
            for m in run.model.modules():
                if isinstance(m, SmallMapConv2d):
                    m.max_pixels = 0
        steps[label] = vggnet_step(run, batches)
        precisions[label] = run.runtime.precision
    times = interleaved(steps, rounds=cfg.pick(5, 1), warmup=cfg.pick(2, 1))
    return in_order([REFERENCE] + [v[0] for v in variants], rows_against(times, REFERENCE, precisions, batch, flops),
                    skipped)


def ablation_infer(cfg: BenchConfig) -> dict[str, Any]:
    """Inference: VGG-16-BN (so that folding BN has something to do), one change at a time."""
    name, size, batch, head = cfg.pick(("vgg16_bn", 224, 8, "classic"), ("vgg11_bn", 32, 2, "gap"))
    reference, model = infer_models(name, size, head)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    flops = 2 * forward_macs(model.config, size) * batch
    with torch.no_grad():
        ref_out = reference(x)
    variants: list[tuple[str, Callable[[], torch.nn.Module], str]] = [
        (REFERENCE, lambda: reference, "fp32"),
        ("fold BN (fp32, NCHW)", lambda: optimize_for_inference(model, "fp32", channels_last=False, fuse_relu=False),
         "fp32"),
        ("+ channels_last (fp32)", lambda: optimize_for_inference(model, "fp32", fuse_relu=False), "fp32"),
        ("+ bf16 weights", lambda: optimize_for_inference(model, "bf16", fuse_relu=False), "bf16"),
        ("+ conv+ReLU fused (vggnet default)", lambda: optimize_for_inference(model, "bf16"), "bf16")]
    if not cfg.quick:
        variants.append(("+ torch.compile", lambda: optimize_for_inference(model, "bf16", compile=True), "bf16"))
    skip = bf16_skip()
    skipped = {label: {"name": label, "precision": prec, **skip} for label, _, prec in variants
               if skip and prec == "bf16"}
    fns, errors, precisions = {}, {}, {}
    compile_seconds = None
    for label, build, prec in variants:
        if label in skipped:
            continue
        module = build()
        start = time.perf_counter()
        with torch.inference_mode():
            errors[label] = logit_error(ref_out, module(x))
        if label == "+ torch.compile":  # the first call compiles
            compile_seconds = time.perf_counter() - start
        fns[label], precisions[label] = inference_call(module, x), prec
    times = interleaved(fns, rounds=cfg.pick(4, 1), warmup=1)
    timed = [dict(row, **errors[row["name"]]) for row in rows_against(times, REFERENCE, precisions, batch, flops)]
    out = {"infer": in_order([v[0] for v in variants], timed, skipped),
           "infer_model": {"model": name, "input_size": size, "batch": batch}}
    if compile_seconds is not None:
        out["infer_compile_seconds"] = compile_seconds
    return out


def bench_ablation(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    """One optimisation at a time, each row timed against the same reference in the same rounds."""
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-") as tmp:
        train = ablation_train(cfg, Path(tmp))
    return {"train": train, **ablation_infer(cfg)}


# --------------------------------------------------------------------------------------------------- profile
def profile_table(fn: Callable[[], Any], steps: int = 3, rows: int = 15) -> list[dict[str, Any]]:
    """The ``rows`` most expensive ops (self CPU time) over ``steps`` calls of ``fn``, per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms_per_call": e.self_cpu_time_total / 1000 / steps,
             "share": e.self_cpu_time_total / total, "calls_per_call": e.count / steps} for e in events[:rows]]


def small_map_sweep(cfg: BenchConfig) -> list[dict[str, Any]] | dict[str, str]:
    """Forward + backward of each 3x3 conv of VGG-11 at 32x32 (full and quarter width), bf16 channels_last:
    oneDNN against the im2col + GEMM path of :mod:`vggnet.net.cpu_bf16` (the evidence for its dispatch rule)."""
    skip = bf16_skip()
    if skip:
        return skip

    batch = cfg.pick(128, 8)
    shapes = [(64, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 2),
              (32, 64, 8), (64, 128, 4), (128, 128, 4), (128, 128, 2)]
    rows = []
    for cin, cout, size in shapes if not cfg.quick else shapes[4:6]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, cin, size, size, generator=gen).bfloat16()
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        w = (torch.randn(cout, cin, 3, 3, generator=gen) * 0.05).bfloat16()
        w = w.contiguous(memory_format=torch.channels_last).requires_grad_()
        b = torch.zeros(cout, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(batch, cout, size, size, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)

        def onednn() -> None:
            F.conv2d(x, w, b, padding=1).backward(g)

        def gemm() -> None:
            gemm_conv3x3(x, w, b).backward(g)

        times = interleaved({"onednn": onednn, "gemm": gemm}, rounds=cfg.pick(5, 1), warmup=1)
        flops = 3 * 2 * batch * cout * cin * 9 * size * size
        onednn_s, gemm_s = statistics.median(times["onednn"]), statistics.median(times["gemm"])
        rows.append({"in_channels": cin, "out_channels": cout, "size": size, "batch": batch,
                     "onednn_ms": 1e3 * onednn_s, "gemm_ms": 1e3 * gemm_s, "onednn_flop_per_second": flops / onednn_s,
                     "gemm_flop_per_second": flops / gemm_s, "gemm_speedup": onednn_s / gemm_s})
    return rows


def bench_profile(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"small_map_sweep": small_map_sweep(cfg)}
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-") as tmp:
        run, batches = step_setup(cfg, Path(tmp) / "run")
        out["train"] = profile_table(vggnet_step(run, batches))
        out["train_reference"] = profile_table(reference_train_step(run.model.config, preprocessed(run, batches)))
        # The e2e model: `vggnet train`'s defaults (quarter width, batch 256).
        run = make_run(cfg, Path(tmp) / "default", batch_size=cfg.pick(None, 16))
        out["train_default_model"] = profile_table(vggnet_step(run, first_batches(run)))
    name, size, batch, head = cfg.pick(("vgg16", 224, 8, "classic"), ("vgg11", 32, 2, "gap"))
    _, model = infer_models(name, size, head)
    out["infer"] = profile_table(inference_call(optimize_for_inference(model), torch.randn(batch, 3, size, size)),
                                 steps=2)
    return out
