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

from vggnet.bench.config import TARGETS, BenchConfig
from vggnet.bench.reference import forward_macs, reference_train_step
from vggnet.bench.runs import layout, preprocessed, step_setup, vggnet_step
from vggnet.base.timing import Timing, comparison, interleaved


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
                          target_ratio=TARGETS["train_ratio"], target_peak_share=TARGETS["train_peak_share"])
