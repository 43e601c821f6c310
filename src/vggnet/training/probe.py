"""Precision ``auto`` for training on the CPU, chosen by a short measurement instead of a rule.

Where the CPU runs bf16 natively (AVX512_BF16 or AMX), bf16 is a candidate, not a given: with AMX oneDNN's bf16
kernels make a training step about 3x faster than fp32, but with AVX512_BF16 alone they can be slower (0.85x of fp32
on the AMX Xeon with AMX hidden; issue 22). So before a new run trains, :func:`decide_precision` (rank 0) times a
few training steps of the run's own model in each of :data:`TRAINING_CANDIDATES` (:func:`measure_candidates`): fp32;
bf16 with the speed-ups the run would use (:func:`vggnet.net.cpu_bf16.tune_for_cpu_bf16`); and bf16 with the same
speed-ups but oneDNN for every convolution, without the small-map GEMM path
(:class:`vggnet.net.cpu_bf16.SmallMapConv2d`, a rule tuned on an AMX Xeon). The third is measured only where some
layer would take the GEMM path at the run's image size (:func:`small_map_layers`); elsewhere both bf16 variants are
the same computation. Where the run does not give the memory layout (``--channels-last``, ``--no-channels-last``)
each variant is timed in channels_last and in NCHW, and NCHW is chosen only where at least 5% faster
(:func:`vggnet.base.probecache.winner`); the run's model is converted to the chosen layout after the probe. Copies
of the built model (its layer shapes, its input size), the run's optimizer, the run's per-rank batch or a smaller
stand-in (:func:`probe_batch`); warm-up steps excluded, interleaved rounds, medians. The fastest bf16 variant is
chosen when it is at least 5% faster than fp32 (:func:`winner`). The global random state is forked, so the run's
model, its initialisation and its random streams are what they would have been without the probe.

The decision is cached per CPU (model name, bf16/AMX features, ``ONEDNN_MAX_CPU_ISA``), torch version, model
configuration, probe input, threads, memory layout (``auto``: both timed), optimizer, whether bf16 is a candidate,
the candidates and small-map rule (so the entries of earlier probes with fewer candidates are measured again) in
``$XDG_CACHE_HOME/vggnet/probe.json`` (:func:`cache_path`), written atomically, beside the inference probe's
decisions (:mod:`vggnet.evaluation.probe`; the file, the key, the timer and the 5% rule are
:mod:`vggnet.base.probecache`'s); ``vggnet train --reprobe`` measures again. The probe times eager steps, also for
``--compile`` runs. An explicit ``--precision`` never probes (its layout is channels_last unless given); a CPU
without native bf16 trains in fp32 and times only the two layouts (where the run gives one, nothing: fp32 without
measuring), and a CUDA device takes its rule (:func:`vggnet.runtime.pick_precision`) without measuring.

The decision is recorded in config.json's ``precision_record`` (``precision`` stays ``auto`` and ``channels_last``
``auto``, the user's requests; ``small_map_convs``: whether bf16 trains with the GEMM path,
:func:`uses_small_map_convs`; ``channels_last``: the layout) and so in the model card's ``train_config``; a resumed
run takes the recorded precision, variant and layout and never measures again. Under torchrun rank 0 decides and the
other ranks take its record (:meth:`vggnet.training.distributed.Dist.broadcast_object`).
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from vggnet.base import probecache
from vggnet.base.errors import CheckpointError, ConfigError
from vggnet.base.probecache import (ALL_CANDIDATES, BF16_MAX_SHARE, CACHE_VERSION, CANDIDATES, LABELS, VARIANTS,
                                    cache_path, cached_or_measured, candidate_of, decision_record, faster,
                                    home_relative, label, measured_entry, probe_candidates, read_cache,
                                    runs_channels_last, times_line, uses_small_map_convs, variant_of, winner,
                                    write_cache)
from vggnet.net.cpu_bf16 import SMALL_MAP_RULE, small_map_layers, tune_for_cpu_bf16
from vggnet.runtime import (PRECISIONS, AdaptiveThreads, Runtime, autocast, bf16_candidate, cpu_identity,
                            memory_format, pick_precision)
from vggnet.training import distributed
from vggnet.training.config import TrainConfig

__all__ = [  # with what it shares with the inference probe (vggnet.base.probecache), named here too
    "ALL_CANDIDATES", "BF16_MAX_SHARE", "CACHE_VERSION", "CANDIDATES", "LABELS", "LOAD_SECONDS", "MAX_ROUNDS",
    "MIN_ROUNDS", "PROBE_PIXELS", "ROUND_SECONDS", "TRAINING_CANDIDATES", "VARIANTS", "WARMUP_STEPS", "announcement",
    "bf16_candidate", "cache_path", "candidate_of", "candidate_step", "choose", "decide_precision", "faster",
    "has_candidates", "label", "measure_candidates", "measured_entry", "median_step_seconds", "probe_batch",
    "probe_candidates", "probe_key", "read_cache", "recorded", "runs_channels_last", "small_map_layers",
    "uses_small_map_convs", "variant_of", "winner", "write_cache"]

#: The training probe's candidates (:data:`vggnet.base.probecache.VARIANTS` in both layouts), the reference first.
TRAINING_CANDIDATES = ALL_CANDIDATES

#: The stand-in batch holds at most this many pixels (128 images of 32x32): a probe of the default recipe stays
#: well under 2 s on 2 cores, and a large batch at a large image size does not make it longer than a few steps.
PROBE_PIXELS = 128 * 32 * 32
#: Untimed steps of each candidate first (oneDNN builds its kernels, the optimizer its buffers), then timed rounds
#: that step each candidate once: at least MIN_ROUNDS, and more up to MAX_ROUNDS while the rounds so far took less
#: than ROUND_SECONDS (a model whose step takes a second is timed 3 times, the default recipe's 7 times).
WARMUP_STEPS = 1
MIN_ROUNDS, MAX_ROUNDS = 3, 7
ROUND_SECONDS = 0.8
#: Least seconds of the run's load window (:class:`vggnet.runtime.AdaptiveThreads`, opened as the run was built) for
#: the probe to set the thread count the load leaves first: 20 scheduler ticks per core. Two OpenMP threads beside
#: other busy processes on a 2-core AMD EPYC ran a step 6-14x slower than one thread, which the run soon takes: a
#: probe at two threads then measures the contention, not the precision.
LOAD_SECONDS = 0.2


def probe_batch(batch: int, image_size: int) -> int:
    """The probe's batch: the run's per-rank ``batch``, or fewer images when it holds more than :data:`PROBE_PIXELS`
    pixels (never fewer than 4, where the batch has them: batch norm needs more than one value per channel)."""
    return max(1, min(batch, max(4, PROBE_PIXELS // (image_size * image_size))))


# ---------------------------------------------------------------------------------------------------- measuring
def candidate_step(model: torch.nn.Module, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
                   precision: str, shape: tuple[int, ...], channels_last: bool,
                   small_map_convs: bool = True) -> Callable[[], None]:
    """One training step of a copy of ``model`` in ``precision`` on a random batch of ``shape`` per call. The
    copy's optimizer runs at a learning rate of 0: the same arithmetic, and weights that stay as they are.
    ``small_map_convs``: in bf16, whether small maps take the GEMM path (False: oneDNN for every convolution).
    ``channels_last``: the copy's weights and the batch in channels_last, else in NCHW."""
    net = copy.deepcopy(model).train().to(memory_format=memory_format(channels_last))
    if precision == "bf16":
        tune_for_cpu_bf16(net, small_map_convs)  # what build_run does to a model that trains in bf16 on the CPU
    optimizer = make_optimizer(net)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    device = next(net.parameters()).device
    x = torch.randn(shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(shape[0], dtype=torch.long, device=device)

    def step() -> None:
        with autocast(device, precision):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def median_step_seconds(steps: dict[str, Callable[[], None]],
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds per call of each step, the median over rounds (:func:`vggnet.base.probecache.median_seconds`):
    :data:`WARMUP_STEPS` untimed calls each, then from :data:`MIN_ROUNDS` to :data:`MAX_ROUNDS` interleaved rounds
    (:data:`ROUND_SECONDS`). ``clock``: seconds, injectable."""
    return probecache.median_seconds(steps, WARMUP_STEPS, MIN_ROUNDS, MAX_ROUNDS, ROUND_SECONDS, clock)


def measure_candidates(model: torch.nn.Module, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
                       shape: tuple[int, ...], channels_last: bool | str,
                       measure: Callable[[dict], dict[str, float]] | None = None,
                       bf16: bool = True) -> dict[str, float]:
    """Seconds per training step of each of :data:`TRAINING_CANDIDATES` (``measure``: :func:`median_step_seconds`),
    on copies of ``model``, in the same interleaved rounds; ``bf16_onednn`` only where :func:`small_map_layers` finds
    a layer it differs in, NCHW only where ``channels_last`` is ``auto`` (else the layout it gives), fp32 alone
    without ``bf16`` (a CPU without native bf16). The global random state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        steps = {}
        for name in probe_candidates(bf16 and bool(small_map_layers(model, shape)), channels_last, bf16):
            precision, small_maps, name_channels_last = variant_of(name)
            steps[name] = candidate_step(model, make_optimizer, precision, shape, name_channels_last,
                                         small_map_convs=small_maps)
        return (measure or median_step_seconds)(steps)


# -------------------------------------------------------------------------------------------------------- cache
def probe_key(model: torch.nn.Module, shape: tuple[int, ...], threads: int, channels_last: bool | str,
              optimizer: str, bf16: bool = True) -> dict[str, Any]:
    """Everything a measurement depends on, as JSON values (:func:`vggnet.base.probecache.probe_key`, kind
    ``training``): the CPU, torch, the model's shape, the probe's input, the threads, the memory layout (or ``auto``)
    and the optimizer; whether bf16 is a candidate, the candidates and the small-map rule (entries of an earlier
    probe, with fewer candidates, are measured again)."""
    return probecache.probe_key("training", cpu_identity(), model, shape, threads, channels_last, optimizer=optimizer,
                                bf16=bf16, candidates=list(TRAINING_CANDIDATES),
                                small_map_rule=list(SMALL_MAP_RULE))


# ----------------------------------------------------------------------------------------------------- deciding
def decide_precision(config: TrainConfig, runtime: Runtime, dist: distributed.Dist, model: torch.nn.Module,
                     in_channels: int, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
                     resumed: bool = False, reprobe: bool = False,
                     measure: Callable[[dict], dict[str, float]] | None = None,
                     threads: AdaptiveThreads | None = None) -> tuple[Runtime, dict | None]:
    """The run's runtime with precision ``auto`` decided, and the record of the decision (config.json's
    ``precision_record``; None for an explicit precision, which is used as given). A ``resumed`` run takes its
    record's precision (:func:`recorded`); a new one rank 0's :func:`choose`. ``threads``: the run's adaptive
    thread count, set for the load before measuring (:data:`LOAD_SECONDS`)."""
    if config.precision != "auto":  # as given; a --budget run's precision is its probe's choice, recorded
        return runtime, config.precision_record if config.budget_record is not None else None
    if resumed:
        return recorded(config, runtime)
    record = None
    if dist.is_main:
        shape = (probe_batch(config.batch_size // dist.world_size, config.image_size), in_channels,
                 config.image_size, config.image_size)
        record = choose(config, runtime, model, shape, make_optimizer, reprobe, measure, threads)
    record = dist.broadcast_object(record)  # every rank trains in rank 0's choice
    return replace(runtime, precision=record["precision"]), record


def choose(config: TrainConfig, runtime: Runtime, model: torch.nn.Module, shape: tuple[int, ...],
           make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer], reprobe: bool = False,
           measure: Callable[[dict], dict[str, float]] | None = None,
           threads: AdaptiveThreads | None = None) -> dict[str, Any]:
    """Precision ``auto`` for a new run: the rule where there is nothing to compare, else the cached decision for
    this key, else a measurement (cached); the measured or cached choice is announced on stderr."""
    device, bf16 = runtime.device.type, bf16_candidate(runtime.device)
    if not has_candidates(runtime.device, config.channels_last):
        # a GPU's rule; fp32 on a CPU without native bf16 where the run gives the layout: nothing to compare
        return {"precision": runtime.precision if device == "cuda" else "fp32", "by": "rule", "device": device}
    if threads is not None:
        threads.poll(LOAD_SECONDS)  # the threads the load leaves: those the run trains with, and the cache's key
    key = probe_key(model, shape, torch.get_num_threads(), config.channels_last, config.optimizer, bf16)
    path = cache_path()
    entry, how, problem = cached_or_measured(
        path, key, lambda: measured_entry(measure_candidates(model, make_optimizer, shape, config.channels_last,
                                                             measure, bf16)), reprobe)
    # no cache path in the record: cards get shared
    record = decision_record(entry, how, device=device, batch=shape[0], threads=key["threads"])
    print(announcement(record, None if problem else path), file=sys.stderr, flush=True)
    return record


def has_candidates(device: torch.device, channels_last: bool | str) -> bool:
    """Whether the training probe has more than one candidate to time on ``device`` for the layout request
    ``channels_last``: on a CPU with native bf16, or on any CPU where the run gives no layout."""
    return device.type == "cpu" and (bf16_candidate(device) or channels_last == "auto")


def announcement(record: dict[str, Any], cache: Path | None) -> str:
    """``vggnet train: precision auto -> bf16 (fp32 56.9, bf16 37.9, bf16 without small-map GEMM 41.2 ms/step at
    batch 128; cached ~/.cache/...)``; ``cache``: where the decision was read or written (None: it could not be
    written)."""
    times = times_line(record, "ms/step")
    where = home_relative(cache) if cache is not None else None
    if record["by"] == "cache":
        how = f"from {where}, measured {record.get('measured') or 'earlier'}; --reprobe measures again"
    else:
        how = f"measured in {record['probe_seconds']:.1f} s" + (f", cached {where}" if where else "")
    return f"vggnet train: precision auto -> {label(candidate_of(record))} ({times}; {how})"


def recorded(config: TrainConfig, runtime: Runtime) -> tuple[Runtime, dict | None]:
    """A resumed run's precision: its record's, never measured again. A run recorded on another kind of device (or
    started by a vggnet that kept no record) takes the rule for this device, as it did then. The bf16 variant
    (``small_map_convs``) is the record's too: :func:`vggnet.training.build_run` reads it
    (:func:`uses_small_map_convs`)."""
    record = config.precision_record
    if record is None or record.get("device") != runtime.device.type:
        return runtime, record
    precision = record.get("precision")
    if precision not in PRECISIONS[1:]:
        raise CheckpointError(f"{config.out}: config.json's precision_record names precision {precision!r}, not one "
                              f"of {', '.join(PRECISIONS[1:])}; start a new run")
    for name in ("small_map_convs", "channels_last"):
        if not isinstance(record.get(name, True), bool):
            raise CheckpointError(f"{config.out}: config.json's precision_record has {name} {record[name]!r}, not "
                                  "true or false; start a new run")
    try:
        pick_precision(runtime.device, precision)
    except ConfigError as err:
        raise ConfigError(f"{config.out} trains in {precision} (precision auto chose it when the run started) and this "
                          f"machine cannot ({err}): resume it where it started, or start a new run") from None
    return replace(runtime, precision=precision), record
