"""The ``e2e`` section: one Fashion-MNIST epoch plus evaluation on the test set, from the files on disk to the test
accuracy.

Reference: :func:`.reference.reference_epoch` (a ``Dataset`` with per-sample PIL transforms, a ``DataLoader`` with 2
workers, the same model, ``vggnet train``'s default architecture, in eager fp32, the same optimiser recipe).
vggnet: ``vggnet train --epochs 1`` (:func:`vggnet.training.build_run` then :func:`vggnet.training.fit`, writing its run
directory), with the ``train_images_per_second`` it records.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from vggnet.bench.config import TARGETS, BenchConfig
from vggnet.bench.reference import reference_epoch
from vggnet.bench.runs import fit_quietly, make_run

WORKERS = 2  # the reference's DataLoader workers


def vggnet_epoch(cfg: BenchConfig, subset: int | None, **overrides: Any) -> dict[str, Any]:
    """``vggnet train --epochs 1`` in this process: wall time from the files to the test accuracy."""
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-") as tmp:
        start = time.perf_counter()
        run = make_run(cfg, Path(tmp) / "run", shared_data=False, subset=subset, **overrides)
        setup = time.perf_counter()
        result = fit_quietly(run)
        end = time.perf_counter()
    record = result["history"][-1]
    return {"seconds": end - start, "setup_seconds": setup - start, "train_seconds": record["epoch_seconds"],
            "eval_and_files_seconds": end - setup - record["epoch_seconds"],
            "train_images": int(round(record["train_images_per_second"] * record["epoch_seconds"])),
            "test_images": len(run.test_set), "train_images_per_second": record["train_images_per_second"],
            "recorded_train_images_per_second": record["train_images_per_second"], "test_acc": record["test_acc"],
            "precision": run.runtime.precision, "channels_last": run.runtime.channels_last,
            "model": run.model.config, "train_config": run.config.to_dict()}


def bench_e2e(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    subset = cfg.e2e_subset if cfg.e2e_subset is not None else cfg.pick(None, 1024)
    batch = cfg.pick(None, 128)
    overrides = {"batch_size": batch} if batch else {}
    cfg.log("e2e: vggnet train --epochs 1")
    fast = vggnet_epoch(cfg, subset, **overrides)
    cfg.log(f"e2e: reference pipeline (Dataset + per-sample PIL transforms + DataLoader(num_workers={WORKERS}), "
            "eager fp32)")
    reference = reference_epoch(cfg.data_dir, fast["model"], fast["train_config"], subset, workers=WORKERS)
    model = fast.pop("model")
    train_config = fast.pop("train_config")
    for side in (reference, fast):
        side["images_per_second"] = (side["train_images"] + side["test_images"]) / side["seconds"]
    return {"reference": reference, "vggnet": fast, "ratio": reference["seconds"] / fast["seconds"],
            "train_phase_ratio": fast["train_images_per_second"] / reference["train_images_per_second"],
            "model": {k: model[k] for k in ("name", "width", "head", "dropout", "in_channels", "input_size")},
            "batch_size": train_config["batch_size"], "subset": subset, "workers": WORKERS,
            "ratio_definition": "reference wall seconds / vggnet wall seconds, data files to test accuracy",
            "target_ratio": TARGETS["e2e_ratio"]}
