"""What ``--budget`` knows of this machine: the speed of each model shape (:class:`Speed`), measured by a short probe
and cached.

For one model shape (model, width) :func:`measure_shape` times a few training steps of a copy of the model at the
run's batch, and a few evaluation batches of a copy in the run's layout as the inference probe times them
(:func:`vggnet.evaluation.probe.candidate_forward`: the form evaluation runs), like precision ``auto``'s probe
(:func:`vggnet.training.probe.median_step_seconds`: warm-up excluded, interleaved rounds, medians). Under precision
``auto`` on a CPU with native bf16 the candidates are those of :data:`vggnet.base.probecache.VARIANTS`: fp32, bf16,
and bf16 without the small-map GEMM where some layer would take that path at the run's image size, each in
channels_last and, where the run does not give the layout, in NCHW (:func:`vggnet.base.probecache.probe_candidates`);
the winner (:func:`vggnet.base.probecache.winner`: NCHW only when at least 5% faster than channels_last, the
fastest bf16 variant when at least 5% faster than fp32) is the shape's precision, variant and layout, and its step
and evaluation times price the shape. Elsewhere the run's precision is timed alone, in the run's layout.

The times are cached in the probe cache (:mod:`vggnet.base.probecache`, kind ``budget``), per CPU, torch, model
shape, batch, evaluation batch, image size, threads, memory layout, optimizer, candidates and small-map rule: a
second ``--budget`` on the same machine prices without probing; ``vggnet train --budget ... --reprobe`` measures
again.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from vggnet.base import probecache
from vggnet.base.probecache import NCHW, cache_path, cached_or_measured, positive, probe_candidates, variant_of, winner
from vggnet.base.timing import synchronize
from vggnet.data import ImageDataset
from vggnet.evaluation.metrics import auto_batch_size
from vggnet.evaluation.probe import candidate_forward
from vggnet.net.cpu_bf16 import SMALL_MAP_RULE, small_map_layers
from vggnet.runtime import Runtime, bf16_candidate, cpu_identity, memory_format
from vggnet.training.build import build_augment, build_model, build_optimizer, build_preprocess, image_channels
from vggnet.training.config import TrainConfig
from vggnet.training.probe import candidate_step, median_step_seconds

#: The version of what the budget's probe times: a change measures the cached speeds again (2: both memory layouts).
BUDGET_PROBE = 2
#: Timed calls of a batch's preparation (after an untimed one); their median prices the epochs' augmentation.
PREPARE_CALLS = 5


@dataclass(frozen=True)
class Speed:
    """One model shape on this machine: seconds per ``train``-ed and per ``eval``-uated image, in ``precision``
    (in bf16 on the CPU with the small-map GEMM path where ``small_map_convs``) and in channels_last where
    ``channels_last`` (else NCHW); ``measured`` False: not probed, a lower bound (a cheaper shape's speed).
    ``detail``: what was timed (ms per step), recorded."""

    train: float
    eval: float
    precision: str
    measured: bool = True
    detail: tuple[tuple[str, Any], ...] = ()
    small_map_convs: bool = True
    channels_last: bool = True


def candidates(config: TrainConfig, runtime: Runtime, model: torch.nn.Module, shape: tuple[int, ...]) -> tuple:
    """What the shape's probe times: under precision ``auto`` on the CPU what the run's probe would
    (:func:`vggnet.base.probecache.probe_candidates`: with native bf16 every variant, bf16 without the GEMM path only
    where a map is small enough for it; fp32 without; NCHW too where the run does not give the layout), else the
    run's precision in the run's layout."""
    if config.precision != "auto" or runtime.device.type != "cpu":
        return (runtime.precision + ("" if runtime.channels_last else NCHW),)
    bf16 = bf16_candidate(runtime.device)
    return probe_candidates(bf16 and bool(small_map_layers(model, shape)), config.channels_last, bf16)


def measure_shape(config: TrainConfig, train_set: ImageDataset, runtime: Runtime, shape: tuple[str, float],
                  reprobe: bool = False) -> Speed:
    """This machine's :class:`Speed` for ``shape`` (model, width): read from the cache unless ``reprobe``, else
    measured (module docstring) and cached; the global random state is kept."""
    trial = replace(config, model=shape[0], arch=None, batch_norm=None, width=shape[1], head="gap", dropout=0.0)
    channels, side = image_channels(train_set), config.image_size
    batch, eval_batch = config.batch_size, config.eval_batch_size or auto_batch_size(side, side, runtime.device)
    with torch.random.fork_rng(devices=[]):
        model = build_model(trial, train_set).to(runtime.device)
        names = candidates(config, runtime, model, (batch, channels, side, side))
        key = probecache.probe_key("budget", cpu_identity(), model, (batch, channels, side, side),
                                   torch.get_num_threads(), config.channels_last, eval_batch=eval_batch,
                                   optimizer=config.optimizer, candidates=list(names),
                                   small_map_rule=list(SMALL_MAP_RULE), path=BUDGET_PROBE)
        entry, how, _ = cached_or_measured(
            cache_path(), key, lambda: timed(model, trial, runtime, names, (batch, channels, side, side), eval_batch),
            reprobe, read=read_speeds)
    return speed_of(entry, names, batch, eval_batch, how["by"])


def timed(model: torch.nn.Module, trial: TrainConfig, runtime: Runtime, names: tuple[str, ...],
          size: tuple[int, ...], eval_batch: int) -> dict[str, Any]:
    """A cache entry: ms per training step (batch ``size``) and per evaluation batch of each candidate."""
    steps: dict[str, Callable[[], None]] = {}
    for name in names:
        precision, small_maps, channels_last = variant_of(name)
        steps[name] = candidate_step(model, lambda net: build_optimizer(trial, net), precision, size,
                                     channels_last, small_map_convs=small_maps)
        # evaluation as the run's own: the model in the run's layout, in the form evaluation runs it
        steps[f"eval_{name}"] = candidate_forward(copy.deepcopy(model).eval().to(
            memory_format=memory_format(channels_last)), name, (eval_batch, *size[1:]))
    seconds = median_step_seconds({name: synchronized(step, runtime.device) for name, step in steps.items()})
    ms = {name: round(1000 * s, 3) for name, s in seconds.items()}
    return {"train_ms": {n: ms[n] for n in names}, "eval_ms": {n: ms[f"eval_{n}"] for n in names},
            "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def read_speeds(path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached times for ``key``, or None where there are none or they are not a positive time per candidate."""
    entry = probecache.read_entry(path, key)
    if entry is None:
        return None
    for field in ("train_ms", "eval_ms"):
        times = entry.get(field)
        if not isinstance(times, dict) or sorted(times) != sorted(key["candidates"]):
            return None
        if not all(positive(t) for t in times.values()):
            return None
    return entry


def speed_of(entry: dict[str, Any], names: tuple[str, ...], batch: int, eval_batch: int, by: str) -> Speed:
    """The :class:`Speed` of the winning candidate of ``entry`` (the only one where one was timed)."""
    train = {name: entry["train_ms"][name] / 1000 for name in names}
    chosen = winner(train) if len(names) > 1 else names[0]
    precision, small_maps, channels_last = variant_of(chosen)
    detail = tuple((f"{name}_ms", entry["train_ms"][name]) for name in names) + tuple(
        (f"eval_{name}_ms", entry["eval_ms"][name]) for name in names) + (
        ("threads", torch.get_num_threads()), ("by", by), ("measured_at", entry.get("measured")))
    return Speed(train[chosen] / batch, entry["eval_ms"][chosen] / 1000 / eval_batch, precision, True, detail,
                 small_maps, channels_last)


def prepare_seconds(config: TrainConfig, train_set: ImageDataset, runtime: Runtime,
                    erasings: tuple[float, ...]) -> tuple[tuple[float, float], ...]:
    """Seconds per trained image of a batch's preparation, for each random-erasing probability of ``erasings``:
    what the loop does before the network (:func:`vggnet.training.loop.train_step`), the run's first uint8 batch
    preprocessed, augmented (the run's crop and flip, and erasing) and put in the run's layout; the median of
    :data:`PREPARE_CALLS` calls. The shapes' steps run on ready float batches, so without it an epoch ran about 8%
    over its price on the Zen 5-kind EPYC (4.4 ms of a 58 ms step at batch 256)."""
    preprocess = build_preprocess(config, train_set)
    images = train_set.images[:config.batch_size].to(runtime.device)
    generator = torch.Generator(runtime.device).manual_seed(0)
    prices = []
    for erasing in erasings:
        augment = build_augment(replace(config, erasing=erasing), train_set)

        def prepare() -> None:
            augment(preprocess(images), generator).contiguous(memory_format=memory_format(runtime.channels_last))

        seconds = probecache.median_seconds({"prepare": synchronized(prepare, runtime.device)}, 1, PREPARE_CALLS,
                                            PREPARE_CALLS, 0.0)["prepare"]
        prices.append((erasing, seconds / len(images)))
    return tuple(prices)


def synchronized(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``step`` that returns when the device has finished it (CUDA queues work; a CPU step is done when it returns)."""
    if device.type != "cuda":
        return step

    def call() -> None:
        step()
        synchronize(device)

    return call
