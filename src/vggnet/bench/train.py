"""The ``train`` section: one training step of VGG-11-BN (GAP head, i.e. one linear layer after global average
pooling, in both) at 32x32, batch 128, on real Fashion-MNIST batches.

Reference: a torchvision-style ``nn.Sequential`` in eager fp32 NCHW with SGD (momentum) and cross-entropy, fed
already-normalised float batches (:func:`.reference.reference_train_step`). vggnet: the real
:func:`vggnet.training.train_step` of ``vggnet train`` (uint8 batch -> preprocess -> augment -> channels_last -> bf16
autocast -> SGD).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from vggnet.bench.config import TARGETS, BenchConfig
from vggnet.bench.reference import forward_macs, reference_train_step
from vggnet.bench.runs import fashion_mnist, layout, preprocessed, step_setup, vggnet_step
from vggnet.base.timing import Timing, comparison, interleaved
from vggnet.training import probe
from vggnet.training.build import build_model, build_optimizer


def bench_train(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-") as tmp:
        run, batches = step_setup(cfg, Path(tmp) / "run")
        batch = run.loader.batch_size
        config = run.model.config
        flops = 3 * 2 * forward_macs(config, config["input_size"][0]) * batch
        ref_step = reference_train_step(config, preprocessed(run, batches))
        times = interleaved({"reference": ref_step, "vggnet": vggnet_step(run, batches)}, cfg.n_rounds,
                            warmup=cfg.pick(3, 1))
        precision = run.runtime.precision
        reference = Timing("reference: eager fp32 NCHW nn.Sequential", "fp32", batch, times["reference"], flops)
        fast = Timing(f"vggnet: train_step ({precision}, {layout(run)})", precision, batch, times["vggnet"], flops)
        return comparison(reference, fast, model=config["name"], head=config["head"], width=config["width"],
                          input_size=config["input_size"], in_channels=config["in_channels"], batch=batch,
                          flops_per_step=flops, flop_convention="3 x forward; 2 FLOPs per MAC",
                          target_ratio=TARGETS["train_ratio"], target_peak_share=TARGETS["train_peak_share"],
                          precision_probe=training_probe(cfg, run))


def training_probe(cfg: BenchConfig, run) -> dict[str, Any]:
    """What precision ``auto``'s training probe (:mod:`vggnet.training.probe`) measures on this section's model and
    batch (each of its candidates: fp32, bf16 where the CPU has it natively, and bf16 without the small-map GEMM where
    some layer takes it, in both layouts where the run's is ``auto``), and would choose: its own functions, called
    once, beside the candidate the vggnet row trains in (the run's, which ``auto`` chose as it was built, perhaps
    from the cache)."""
    record = run.config.precision_record
    runs_in = (probe.candidate_of(record) if record and record.get("precision") == run.runtime.precision
               else run.runtime.precision)
    config = run.config
    if not probe.has_candidates(run.runtime.device, config.channels_last):
        return {"skipped": f"nothing to compare on this {run.runtime.device.type} (a GPU, or no native bf16 and the "
                           f"layout given): auto takes the rule, {runs_in}", "runs_in": runs_in}
    torch.manual_seed(config.seed)
    model = build_model(config, fashion_mnist(cfg.data_dir)[0])  # as build_run's probe sees it: not yet tuned
    size = config.image_size
    shape = (probe.probe_batch(run.loader.batch_size, size), int(model.in_channels), size, size)
    seconds = probe.measure_candidates(model, lambda net: build_optimizer(config, net), shape, config.channels_last,
                                       bf16=probe.bf16_candidate(run.runtime.device))
    return {"batch": shape[0], **{f"{name}_ms": 1000 * s for name, s in seconds.items()},
            "chosen": probe.winner(seconds), "runs_in": runs_in, "unit": "step"}
