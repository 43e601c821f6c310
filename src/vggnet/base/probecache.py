"""What the precision probes share: the candidates and the rule between them, the interleaved timer, the cache key
and the cache file.

Precision ``auto`` on a CPU with native bf16 is decided by measurement, for training
(:mod:`vggnet.training.probe`: training steps) and for inference (:mod:`vggnet.evaluation.probe`: eval-mode forward
passes). Both time their candidates (:func:`candidate_names`: the variants of :data:`VARIANTS`, fp32, bf16, and
bf16 without the small-map GEMM where a map is small enough for it, each in channels_last and, where the memory
layout is not given, in NCHW) in interleaved rounds after untimed warm-up calls (:func:`median_seconds`), choose by
:func:`winner` (per variant NCHW only when at least 5% faster than channels_last; then the fastest bf16 variant,
only when at least 5% faster than fp32) and cache the decision in one file,
``$XDG_CACHE_HOME/vggnet/probe.json`` (:func:`cache_path`), written atomically, one entry per key
(:func:`probe_key`: the kind of probe, the CPU, torch, the model's shape, the probe's input, threads and memory
layout, and what else the kind's measurement depends on). An absent, unreadable or foreign cache holds nothing:
the probe measures again.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from vggnet.base.errors import CheckpointError, OutputError
from vggnet.base.files import atomic_write_json, cache_root, make_dirs, read_json

#: What the probes compare, the reference first.
CANDIDATES = ("fp32", "bf16")
#: Every candidate a probe may time, the reference first: its precision and whether bf16's small-map convolutions
#: take the GEMM path (:class:`vggnet.net.cpu_bf16.SmallMapConv2d`) or oneDNN runs every convolution. The third is
#: timed only where some layer would take the GEMM path (:func:`vggnet.net.cpu_bf16.small_map_layers`); elsewhere
#: both bf16 variants are the same computation.
VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", True), "bf16_onednn": ("bf16", False)}
#: A candidate in NCHW is named its variant's name with this suffix (``bf16_nchw``); without it, it runs in
#: channels_last (NHWC, oneDNN's native layout: faster or tied in every case measured on the Zen 5-kind EPYC).
NCHW = "_nchw"
#: The layouts (True: channels_last, the reference, first) a probe times for a memory-layout request: ``auto`` (the
#: run gave none) both, True or False that one.
LAYOUT_REQUESTS = {"auto": (True, False), True: (True,), False: (False,)}


def candidate_names(variants: tuple[str, ...] | dict = tuple(VARIANTS), layouts: tuple[bool, ...] = (True, False)
                    ) -> tuple[str, ...]:
    """The candidates of ``variants`` (names of :data:`VARIANTS`) in ``layouts`` (True: channels_last), each variant's
    layouts together, channels_last first: ``("fp32", "fp32_nchw", "bf16", "bf16_nchw")``."""
    return tuple(name + ("" if channels_last else NCHW) for name in variants for channels_last in layouts)


def split_layout(name: str) -> tuple[str, bool]:
    """A candidate's variant (a name of :data:`VARIANTS`, or a precision outside them: fp16 on a GPU) and whether it
    runs in channels_last."""
    return (name[:-len(NCHW)], False) if name.endswith(NCHW) else (name, True)


def variant_of(name: str) -> tuple[str, bool, bool]:
    """A candidate's precision, whether bf16 takes the small-map GEMM path, and whether it runs in channels_last (a
    precision outside :data:`VARIANTS`, fp16 on a GPU, is its own variant)."""
    variant, channels_last = split_layout(name)
    precision, small_maps = VARIANTS.get(variant, (variant, True))
    return precision, small_maps, channels_last


#: Every candidate a probe may time, in the order times are shown.
ALL_CANDIDATES = candidate_names()
#: What a cache entry holds that the record of a decision copies (:func:`decision_record`).
RECORDED = ("precision", "small_map_convs", "channels_last", *(f"{name}_ms" for name in ALL_CANDIDATES), "measured")
#: How a variant is named on the terminal and in ``vggnet bench`` (:func:`label` adds the layout).
LABELS = {"fp32": "fp32", "bf16": "bf16", "bf16_onednn": "bf16 without small-map GEMM"}


def label(name: str) -> str:
    """How a candidate is named on the terminal: its variant's :data:`LABELS`, with ``NCHW`` where it runs in it (a
    precision outside them, fp16 on a GPU, as it is)."""
    variant, channels_last = split_layout(name)
    return LABELS.get(variant, variant) + ("" if channels_last else " NCHW")


#: bf16 is chosen only when its time is at most this share of fp32's (at least 5% faster), and NCHW only when its
#: time is at most this share of channels_last's. A near tie goes to the reference: a probe of a few calls on a
#: machine that other processes may share is only good to a few percent, the real work pays bf16 costs the probe
#: does not see (a first call per new shape, the bf16 copy of evaluation), and fp32 is the exact arithmetic: nothing
#: is given up for a gain within the noise.
BF16_MAX_SHARE = 0.95
#: The cache file's format; entries of another version are measured again.
CACHE_VERSION = 1
#: Entries the cache keeps, of every kind together (the oldest go first).
MAX_CACHE_ENTRIES = 64


def cache_path() -> Path:
    """The probe cache: ``$XDG_CACHE_HOME/vggnet/probe.json`` (``~/.cache/vggnet/probe.json``), in vggnet's cache
    directory (:func:`vggnet.base.files.cache_root`)."""
    return cache_root() / "probe.json"


def faster(seconds: dict[str, float], candidates: tuple[str, ...] = CANDIDATES) -> str:
    """The candidate to run in, of ``candidates`` (their ``seconds``; the first, fp32, the reference): the fastest of
    the others (bf16 variants; a tie: the one listed first) when its time is at most :data:`BF16_MAX_SHARE` of the
    reference's, else the reference (also where it is the only one)."""
    reference, *others = candidates
    if not others:
        return reference
    best = min(others, key=lambda name: seconds[name])
    return best if seconds[best] <= BF16_MAX_SHARE * seconds[reference] else reference


def median_seconds(calls: dict[str, Callable[[], Any]], warmup: int, min_rounds: int, max_rounds: int,
                   round_seconds: float, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds per call of each of ``calls``, the median over rounds: ``warmup`` untimed calls each, then rounds that
    call every one once, in turn first (a machine that slows down or speeds up mid-round favours none), at least
    ``min_rounds``, and more up to ``max_rounds`` while the rounds so far took less than ``round_seconds``.
    ``clock``: seconds, injectable."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order, start = list(calls), clock()
    for done in range(max_rounds):
        if done >= min_rounds and clock() - start >= round_seconds:
            break
        for name in order if done % 2 == 0 else order[::-1]:
            begin = clock()
            calls[name]()
            times[name].append(clock() - begin)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def winner(seconds: dict[str, float]) -> str:
    """The candidate to run in, of those measured (``seconds``, names of :func:`candidate_names`): first each
    variant's layout, NCHW only when at least 5% faster than channels_last (where both were timed); then the fastest
    bf16 variant (a tie: the one listed first in :data:`VARIANTS`) when it is at least 5% faster than fp32
    (:func:`faster`), else fp32."""
    layouts = {}  # variant -> the candidate of its faster layout
    for name in VARIANTS:
        timed = tuple(n for n in candidate_names((name,)) if n in seconds)
        if timed:
            layouts[name] = faster(seconds, timed)
    chosen = faster({name: seconds[n] for name, n in layouts.items()}, tuple(layouts))
    return layouts[chosen]


def measured_entry(seconds: dict[str, float]) -> dict[str, Any]:
    """A cache entry of a measurement: the choice (its precision; ``small_map_convs``: whether bf16 runs with the
    small-map GEMM path, only where that was measured against oneDNN alone and won; ``channels_last``: its memory
    layout), each candidate's milliseconds and when it was measured."""
    precision, small_maps, channels_last = variant_of(winner(seconds))
    times = {f"{name}_ms": round(1000 * seconds[name], 3) for name in ALL_CANDIDATES if name in seconds}
    return {"precision": precision, "small_map_convs": precision == "bf16" and small_maps and onednn_timed(times),
            "channels_last": channels_last, **times, "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def candidate_of(record: dict[str, Any]) -> str:
    """The candidate a record (a cache entry, a run's ``precision_record``) chose: its precision, or
    ``bf16_onednn`` where bf16 won without the GEMM path against a measured GEMM variant; with :data:`NCHW` where it
    runs in NCHW (``channels_last`` false)."""
    name = record["precision"]
    if name == "bf16" and record.get("small_map_convs") is False and onednn_timed(record):
        name = "bf16_onednn"
    return name + NCHW if record.get("channels_last") is False else name


def uses_small_map_convs(record: dict[str, Any] | None) -> bool:
    """Whether bf16 on the CPU takes the small-map GEMM path: as a ``precision_record`` says; yes where it says
    nothing (an explicit ``--precision bf16``, a record from before the probe measured it)."""
    return record is None or record.get("small_map_convs", True) is not False


def runs_channels_last(record: dict[str, Any] | None, default: bool) -> bool:
    """Whether the model runs in channels_last: as a ``precision_record`` says; ``default`` (the run's request, or
    the rule) where it says nothing (an explicit precision, a record from before the probe timed the layout)."""
    value = None if record is None else record.get("channels_last")
    return value if isinstance(value, bool) else default


def times_line(record: dict[str, Any], unit: str) -> str:
    """``fp32 56.9, fp32 NCHW 60.2, bf16 37.9, ... ms/step at batch 128`` (``unit``: ``ms/step``), naming that the
    GEMM path was not timed where bf16 was and no map was small enough for it."""
    line = f"{timings(record)} {unit} at batch {record['batch']}"
    bf16_timed = any(f"{name}_ms" in record for name in candidate_names(("bf16",)))
    return line + ", no map small enough for the GEMM path" if bf16_timed and not onednn_timed(record) else line


def timings(record: dict[str, Any], unit: str = "") -> str:
    """``fp32 56.9, fp32 NCHW 60.2, bf16 37.9`` (with `` unit`` after each time): the times a record holds, in the
    order of :data:`ALL_CANDIDATES`."""
    return ", ".join(f"{label(name)} {record[f'{name}_ms']:.1f}{unit}" for name in ALL_CANDIDATES
                     if f"{name}_ms" in record)


def onednn_timed(record: dict[str, Any]) -> bool:
    """Whether a record holds a time of bf16 without the small-map GEMM (some map was small enough for it)."""
    return any(f"{name}_ms" in record for name in candidate_names(("bf16_onednn",)))


# ------------------------------------------------------------------------------------------------------------ keys
def model_shape(model: torch.nn.Module) -> dict[str, Any]:
    """The model's configuration without its initialisation (``model.config``; empty for a model without one)."""
    return {k: v for k, v in getattr(model, "config", {}).items() if k != "init"}


def layer_signature(model: torch.nn.Module) -> str:
    """A short digest of the model's modules (their types) and tensors (names, shapes, dtypes): what a compressed or
    restructured copy changes while its configuration stays the same."""
    parts = [type(m).__name__ for m in model.modules()]
    parts += [f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in model.state_dict().items()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def probe_key(kind: str, cpu: dict[str, Any], model: torch.nn.Module, shape: tuple[int, ...], threads: int,
              channels_last: bool | str, **extra: Any) -> dict[str, Any]:
    """Everything a measurement of ``kind`` (``training``, ``inference``, ``budget``) depends on, as JSON values: the
    CPU (``cpu``: :func:`vggnet.runtime.cpu_identity`), torch, the model's shape, the probe's input, the threads, the
    memory layout (a key of :data:`LAYOUT_REQUESTS`: ``auto`` times both) and ``extra``."""
    key = {"version": CACHE_VERSION, "kind": kind, **cpu, "torch": torch.__version__, "model": model_shape(model),
           "input": list(shape), "threads": threads, "channels_last": channels_last, **extra}
    return json.loads(json.dumps(key))  # tuples as lists: what a read back compares equal to


def digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------------- cache
def _entries(path: Path) -> dict[str, Any]:
    """The cache's entries; an absent, unreadable or foreign file holds none (it is measured again)."""
    try:
        cache = read_json(path)
    except (CheckpointError, OSError, ValueError):
        return {}
    if not isinstance(cache, dict) or cache.get("version") != CACHE_VERSION or not isinstance(cache.get("entries"),
                                                                                             dict):
        return {}
    return cache["entries"]


def read_entry(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cache's entry for ``key`` as written, or None (each kind checks what its entries hold)."""
    entry = _entries(path).get(digest(key))
    return entry if isinstance(entry, dict) and entry.get("key") == key else None


def positive(value: Any) -> bool:
    """Whether ``value`` is a positive number (a time a cache entry holds), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def probe_candidates(small_maps: bool, layout: bool | str, bf16: bool = True) -> tuple[str, ...]:
    """What a probe times: every variant of :data:`VARIANTS` where some map is small enough for the GEMM path
    (``small_maps``), else :data:`CANDIDATES`, or fp32 alone where bf16 is no candidate (``bf16`` False: a CPU
    without native bf16); in the layouts of the request ``layout`` (:data:`LAYOUT_REQUESTS`)."""
    variants = (tuple(VARIANTS) if small_maps else CANDIDATES) if bf16 else ("fp32",)
    return candidate_names(variants, LAYOUT_REQUESTS[layout])


def read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached decision for ``key``, or None when there is none or it does not hold what a decision holds: one
    of :data:`CANDIDATES`, which bf16 variant won (``small_map_convs``) and in which layout (``channels_last``), true
    or false, a time of the chosen candidate and of fp32 (the reference it was chosen against), and only positive
    times."""
    entry = read_entry(path, key)
    if entry is None or entry.get("precision") not in CANDIDATES:
        return None
    if not (isinstance(entry.get("small_map_convs"), bool) and isinstance(entry.get("channels_last"), bool)):
        return None
    times = [entry[f"{name}_ms"] for name in ALL_CANDIDATES if f"{name}_ms" in entry]
    timed = f"{candidate_of(entry)}_ms" in entry and any(f"{name}_ms" in entry for name in candidate_names(("fp32",)))
    return entry if timed and all(positive(t) for t in times) else None


def write_cache(path: Path, key: dict[str, Any], entry: dict[str, Any]) -> str | None:
    """Add ``entry`` for ``key`` to the cache (atomically; the oldest beyond :data:`MAX_CACHE_ENTRIES` dropped);
    returns why it could not be written, or None."""
    entries = _entries(path)
    name = digest(key)
    entries.pop(name, None)
    entries[name] = {"key": key, **entry}
    while len(entries) > MAX_CACHE_ENTRIES:
        entries.pop(next(iter(entries)))
    try:
        make_dirs(path.parent)
        atomic_write_json(path, {"version": CACHE_VERSION, "entries": entries})
    except OutputError as err:
        return str(err)
    return None


def cached_or_measured(path: Path, key: dict[str, Any], measure: Callable[[], dict[str, Any]], reprobe: bool = False,
                       read: Callable[[Path, dict[str, Any]], dict[str, Any] | None] = read_cache
                       ) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """The one decision path of every probe: ``(entry, how, problem)``. ``entry``: the cache's entry for ``key`` in
    ``path`` (``read``; unless ``reprobe``), else ``measure()``'s, written to the cache. ``how``: ``{"by":
    "cache"}``, or ``{"by": "measured", "probe_seconds": ...}``. ``problem``: why the cache could not be written (a
    warning says so), or None."""
    entry = None if reprobe else read(path, key)
    if entry is not None:
        return entry, {"by": "cache"}, None
    start = time.perf_counter()
    entry = measure()
    how = {"by": "measured", "probe_seconds": round(time.perf_counter() - start, 3)}
    problem = write_cache(path, key, entry)
    if problem is not None:
        warnings.warn(f"could not write the precision probe's cache ({problem}); the next run measures again")
    return entry, how, problem


def decision_record(entry: dict[str, Any], how: dict[str, Any], **context: Any) -> dict[str, Any]:
    """The record of a decision (a run's ``precision_record``, eval's): ``context`` (device, batch, threads), then
    the cached entry's choice and times with ``by`` ``cache``, or the measured entry with how it was measured
    (:func:`cached_or_measured`'s ``entry`` and ``how``)."""
    if how["by"] == "cache":
        return {**context, **{k: entry[k] for k in RECORDED if k in entry}, "by": "cache"}
    return {**context, **entry, **how}


def home_relative(path: Path | str) -> str:
    """``path`` with the home directory written ``~``: what a line on the terminal shows."""
    path, home = str(path), os.path.expanduser("~")
    return "~" + path[len(home):] if home not in ("", "/") and path.startswith(home + os.sep) else path
