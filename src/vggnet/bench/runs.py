"""The vggnet side of the training benchmarks: runs built, stepped and fitted with the public functions
``vggnet train`` itself uses (:func:`vggnet.training.build_run`, :func:`~vggnet.training.seed_epoch`,
:func:`~vggnet.training.train_step`, :func:`~vggnet.training.fit`). Only this module and :mod:`.gpu` (a run on
random 224x224 images) import them.

The ``train``, ``ablation`` and ``profile`` sections build several runs on Fashion-MNIST; :func:`fashion_mnist`
loads it once for all of them (the runner clears it at the end). The ``e2e`` section does not use it: its vggnet
epoch reads the files itself, like its reference.
"""

from __future__ import annotations

import contextlib
import io
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from vggnet.bench.config import BenchConfig
from vggnet.data import load_dataset
from vggnet.training import build_run, fit, resolve_config, seed_epoch, train_step


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Training prints epoch lines; keep them out of ``--json`` output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@lru_cache(maxsize=1)
def fashion_mnist(data_dir: str | None) -> tuple[Any, Any]:
    """Fashion-MNIST's (train, test) :class:`vggnet.data.ImageDataset` pair, loaded once per ``data_dir``."""
    return load_dataset("fashion-mnist", data_dir)


def make_run(cfg: BenchConfig, run_dir: Path, shared_data: bool = True, **overrides: Any):
    """A :func:`vggnet.training.build_run` run on Fashion-MNIST (``vggnet train``'s defaults, then ``overrides``),
    writing under ``run_dir``; on the data set :func:`fashion_mnist` loaded unless ``shared_data`` is False."""
    options = {"epochs": 1, "progress": False, "out": str(run_dir), "data_dir": cfg.data_dir,
               "threads": cfg.threads, **overrides}
    config = resolve_config(None, **options)
    with quiet_stdout():
        return build_run(config, data=fashion_mnist(cfg.data_dir) if shared_data else None)


def step_setup(cfg: BenchConfig, run_dir: Path, **overrides: Any):
    """The training-step benchmark's run (VGG-11-BN, GAP head, full width, no dropout) and a few real batches."""
    batch = cfg.pick(128, 16)
    run = make_run(cfg, run_dir, width=1.0, batch_size=batch, head="gap", dropout=0.0, **overrides)
    return run, first_batches(run)


def first_batches(run, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Put ``run`` in training mode at epoch 0 and take the first ``n`` (images, labels) batches of its loader."""
    run.net.train()
    seed_epoch(run, 0)
    return [batch for _, batch in zip(range(n), run.loader)]


def preprocessed(run, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` through ``run``'s preprocessing once, as float NCHW: what the reference training step is fed."""
    return [(run.preprocess(images).contiguous(), labels) for images, labels in batches]


def vggnet_step(run, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], float]:
    """One :func:`vggnet.training.train_step` per call (at the configured learning rate), cycling through ``batches``."""
    lr = run.config.lr
    state = {"i": 0}

    def step() -> float:
        images, labels = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss, _ = train_step(run, images, labels, lr)
        return loss.item()  # training reads the loss every step too

    return step


def fit_quietly(run) -> dict[str, Any]:
    """:func:`vggnet.training.fit`: train ``run`` to the end and write its run directory, printing nothing."""
    with quiet_stdout():
        return fit(run)


def layout(run) -> str:
    return "channels_last" if run.runtime.channels_last else "NCHW"
