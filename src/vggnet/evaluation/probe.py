"""Precision ``auto`` for inference on the CPU (``vggnet eval``, ``vggnet predict``), chosen by a short measurement
instead of a rule.

Where the CPU runs bf16 natively (AVX512_BF16 or AMX), bf16 inference is a candidate, not a given: oneDNN's bf16
kernels are much faster than fp32 with AMX, but can be slower with AVX512_BF16 alone (0.97x of fp32 inference on
the AMX Xeon with AMX hidden; issue 22). So once the model is loaded, :func:`decide` times eval-mode forward passes
of it in each of :data:`vggnet.base.probecache.VARIANTS` (:func:`measure_candidates`), each the way evaluation runs
it (:func:`vggnet.evaluation.metrics.inference_form`): fp32, the model itself; bf16, the folded, fused bf16 copy
of :func:`vggnet.evaluation.inference.optimize_for_inference` with its small-map GEMM convolutions
(:class:`vggnet.net.cpu_bf16.SmallMapConv2d`, a rule tuned on an AMX Xeon); and the same copy with oneDNN for every
convolution, only where some layer would take the GEMM path at the model's input size
(:func:`vggnet.net.cpu_bf16.small_map_layers`); each in channels_last and in NCHW
(:func:`vggnet.base.probecache.candidate_names`). On a random stand-in batch of the model's input size (the verb's
batch, or fewer images: :func:`probe_batch`); warm-up calls excluded, interleaved rounds, medians; the fastest bf16
variant only when at least 5% faster than fp32, NCHW only when at least 5% faster than channels_last
(:func:`vggnet.base.probecache.winner`). The global random state is forked, and the model leaves in the mode it came
in. The choice is the runtime's precision, its ``small_map_convs`` and its ``channels_last``
(:class:`vggnet.runtime.Runtime`), which every evaluation path passes on to
:func:`~vggnet.evaluation.metrics.inference_form` and its batches.

The decision is cached beside training's (:mod:`vggnet.training.probe`) in ``$XDG_CACHE_HOME/vggnet/probe.json``
(:mod:`vggnet.base.probecache`), with its own key kind, ``inference``: the CPU, torch, the model's configuration and
layers (a compressed copy is measured on its own), the stand-in batch's shape, the threads, whether bf16 is a
candidate and the inference path's version (:data:`INFERENCE_PATH`); ``--reprobe`` measures again. The probe times
the eager paths, also for ``--compile``. An explicit ``--precision`` never probes (and runs in channels_last); a
CPU without native bf16 runs fp32 and times only the two layouts; a CUDA device takes its rule
(:func:`vggnet.runtime.pick_precision`), without measuring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from vggnet.base import probecache
from vggnet.base.errors import ConfigError
from vggnet.base.probecache import (cache_path, cached_or_measured, candidate_of, decision_record, home_relative, label,
                                    measured_entry, probe_candidates, runs_channels_last, timings,
                                    uses_small_map_convs, variant_of)
from vggnet.evaluation.metrics import auto_batch_size, inference_form
from vggnet.net.cpu_bf16 import SMALL_MAP_RULE, small_map_layers
from vggnet.runtime import Runtime, bf16_candidate, cpu_identity
from vggnet.store.card import LoadedModel

#: The version of what the candidates run (:func:`vggnet.evaluation.metrics.inference_form`): a change to the
#: inference copies bumps it, and the cached decisions are measured again (2: bf16 without the small-map GEMM is
#: a third candidate; 3: each candidate in both memory layouts).
INFERENCE_PATH = 3
#: The stand-in batch holds at most this many pixels (128 images of 32x32, 2 of 224x224): the default model's probe
#: takes well under a second on 2 cores.
PROBE_PIXELS = 128 * 32 * 32
#: Untimed calls of each candidate first (oneDNN builds its kernels for the shape), then timed rounds that call each
#: once: at least MIN_ROUNDS, and more up to MAX_ROUNDS while the rounds so far took less than ROUND_SECONDS.
WARMUP_CALLS = 1
MIN_ROUNDS, MAX_ROUNDS = 3, 7
ROUND_SECONDS = 0.4


@dataclass(frozen=True)
class Choice:
    """What :func:`decide` chose: the runtime to run in, the record of the decision (None: an explicit precision,
    used as given) and the line the verb prints on stderr (None: nothing was measured or read from the cache)."""

    runtime: Runtime
    record: dict[str, Any] | None
    line: str | None = None


def probe_batch(batch: int, image_size: int) -> int:
    """The stand-in batch: the verb's ``batch``, or fewer images when it holds more than :data:`PROBE_PIXELS`
    pixels (at least one)."""
    return max(1, min(batch, PROBE_PIXELS // (image_size * image_size)))


def refuse_reprobe(verb: str, precision: str, reprobe: bool) -> None:
    """ConfigError for ``--reprobe`` beside an explicit precision, which is never measured."""
    if reprobe and precision != "auto":
        raise ConfigError(f"--reprobe measures which precision 'auto' runs {verb} in, but --precision {precision} was "
                          "given: add --precision auto, or leave out --reprobe")


# ---------------------------------------------------------------------------------------------------- measuring
def candidate_forward(model: torch.nn.Module, name: str, shape: tuple[int, ...]) -> Callable[[], None]:
    """One eval-mode forward pass of ``model`` as candidate ``name`` (:func:`vggnet.base.probecache.variant_of`: a
    precision, in bf16 whether small maps take the GEMM path, and the memory layout) on a random batch of ``shape``
    per call, as :func:`vggnet.evaluation.metrics.predict_logits` runs it (the network and context of
    :func:`~vggnet.evaluation.metrics.inference_form`, the input in the candidate's layout, float32 logits)."""
    device = next(model.parameters()).device
    precision, small_maps, channels_last = variant_of(name)
    net, mixed = inference_form(model, device, precision, channels_last, small_maps=small_maps)
    x = torch.randn(shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.no_grad(), mixed:
            net(x).float()

    return forward


def median_forward_seconds(calls: dict[str, Callable[[], None]],
                           clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds per call of each candidate, the median over interleaved rounds after :data:`WARMUP_CALLS`
    (:func:`vggnet.base.probecache.median_seconds`). ``clock``: seconds, injectable."""
    return probecache.median_seconds(calls, WARMUP_CALLS, MIN_ROUNDS, MAX_ROUNDS, ROUND_SECONDS, clock)


def measure_candidates(model: torch.nn.Module, shape: tuple[int, ...], channels_last: bool | str = "auto",
                       measure: Callable[[dict], dict[str, float]] | None = None,
                       bf16: bool = True) -> dict[str, float]:
    """Seconds per forward pass of each candidate (:func:`vggnet.base.probecache.probe_candidates`; ``measure``:
    :func:`median_forward_seconds`): ``bf16_onednn`` only where some map is small enough for the GEMM path, both
    layouts where ``channels_last`` is ``auto``, fp32 alone without ``bf16`` (a CPU without native bf16); the model
    runs in eval mode and leaves in its own, and the global random state is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            names = probe_candidates(bf16 and bool(small_map_layers(model, shape)), channels_last, bf16)
            calls = {name: candidate_forward(model, name, shape) for name in names}
            return (measure or median_forward_seconds)(calls)
    finally:
        model.train(was_training)


def probe_key(model: torch.nn.Module, shape: tuple[int, ...], threads: int, channels_last: bool | str = "auto",
              bf16: bool = True) -> dict[str, Any]:
    """Everything a measurement depends on (:func:`vggnet.base.probecache.probe_key`, kind ``inference``): the CPU,
    torch, the model's configuration and layers, the stand-in batch, the threads, the memory layout (``auto``: both
    timed), whether bf16 is a candidate, the inference path and the small-map rule."""
    return probecache.probe_key("inference", cpu_identity(), model, shape, threads, channels_last, bf16=bf16,
                                layers=probecache.layer_signature(model), path=INFERENCE_PATH,
                                small_map_rule=list(SMALL_MAP_RULE))


# ----------------------------------------------------------------------------------------------------- deciding
def decide(loaded: LoadedModel, runtime: Runtime, requested: str, batch: int | None = None, images: int | None = None,
           reprobe: bool = False, verb: str = "eval",
           measure: Callable[[dict], dict[str, float]] | None = None) -> Choice:
    """The runtime to run ``loaded`` in when the user asked for precision ``requested``: as given unless ``auto``;
    for ``auto`` the rule where there is nothing to compare, else the cached decision, else a measurement (cached).
    ``batch``: the verb's batch (default :func:`vggnet.evaluation.metrics.auto_batch_size`), at most ``images``."""
    refuse_reprobe(verb, requested, reprobe)
    if requested != "auto":
        return Choice(runtime, None)
    device = runtime.device
    if device.type != "cpu":  # a GPU's rule
        return Choice(runtime, {"precision": runtime.precision, "by": "rule", "device": device.type})
    size = loaded.preprocess.image_size
    batch = batch or auto_batch_size(size, size, device)
    shape = (probe_batch(min(batch, images or batch), size), int(loaded.model.in_channels), size, size)
    record, problem = choose(loaded.model, runtime, shape, reprobe, measure)
    line = announcement(verb, record, None if problem else cache_path())
    return Choice(replace(runtime, precision=record["precision"], small_map_convs=uses_small_map_convs(record),
                          channels_last=runs_channels_last(record, runtime.channels_last)), record, line)


def choose(model: torch.nn.Module, runtime: Runtime, shape: tuple[int, ...], reprobe: bool = False,
           measure: Callable[[dict], dict[str, float]] | None = None) -> tuple[dict[str, Any], str | None]:
    """The record of the cached decision for this key (unless ``reprobe``), else of a measurement, cached; and why
    the cache could not be written (None: it was, or was only read)."""
    adaptive = getattr(runtime, "adaptive", None)
    if adaptive is not None:  # first the thread count the load leaves, which the verb runs with (a key field)
        adaptive.settle()
    bf16 = bf16_candidate(runtime.device)
    key = probe_key(model, shape, torch.get_num_threads(), bf16=bf16)
    entry, how, problem = cached_or_measured(
        cache_path(), key, lambda: measured_entry(measure_candidates(model, shape, measure=measure, bf16=bf16)),
        reprobe)
    record = decision_record(entry, how, device=runtime.device.type, batch=shape[0], threads=key["threads"])
    return record, problem


def announcement(verb: str, record: dict[str, Any], cache: Path | None) -> str:
    """``vggnet eval: precision auto: fp32 (fp32 4.1 ms, fp32 NCHW 4.3 ms, bf16 5.3 ms, ... per batch of 128,
    measured in 0.42 s; cached in ~/.cache/vggnet/probe.json)``; ``cache``: where the decision was read or written
    (None: not written)."""
    times = timings(record, " ms") + f" per batch of {record['batch']}"
    where = home_relative(cache) if cache is not None else None
    if record["by"] == "cache":
        how = f"cached in {where}, measured {record.get('measured') or 'earlier'}; --reprobe measures again"
    else:
        how = f"measured in {record['probe_seconds']:.2f} s" + (f"; cached in {where}" if where else "")
    return f"vggnet {verb}: precision auto: {label(candidate_of(record))} ({times}, {how})"
