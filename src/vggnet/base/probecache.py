"""What the precision probes share: the candidates and the rule between them, the interleaved timer, the cache key
and the cache file.

Precision ``auto`` on a CPU with native bf16 is decided by measurement, for training
(:mod:`vggnet.training.probe`: training steps) and for inference (:mod:`vggnet.evaluation.probe`: eval-mode forward
passes). Both time their candidates (:data:`VARIANTS`: fp32, bf16, and bf16 without the small-map GEMM where a map
is small enough for it) in interleaved rounds after untimed warm-up calls (:func:`median_seconds`), choose by
:func:`winner` (the fastest bf16 variant, only when at least 5% faster than fp32) and cache the decision in one file,
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
#: What a cache entry holds that the record of a decision copies (:func:`decision_record`).
RECORDED = ("precision", "small_map_convs", *(f"{name}_ms" for name in VARIANTS), "measured")
#: How a candidate is named on the terminal and in ``vggnet bench``.
LABELS = {"fp32": "fp32", "bf16": "bf16", "bf16_onednn": "bf16 without small-map GEMM"}
#: bf16 is chosen only when its time is at most this share of fp32's (at least 5% faster). A near tie goes to fp32:
#: a probe of a few calls on a machine that other processes may share is only good to a few percent, the real work
#: pays bf16 costs the probe does not see (a first call per new shape, the bf16 copy of evaluation), and fp32 is the
#: exact arithmetic: nothing is given up for a gain within the noise.
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
    reference's, else the reference."""
    reference, *others = candidates
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
    """The candidate to run in: the fastest bf16 variant of those measured (a tie: the one listed first in
    :data:`VARIANTS`) when it is at least 5% faster than fp32 (:func:`faster`), else fp32."""
    return faster(seconds, tuple(name for name in VARIANTS if name in seconds))


def measured_entry(seconds: dict[str, float]) -> dict[str, Any]:
    """A cache entry of a measurement: the choice (its precision, and ``small_map_convs``: whether bf16 runs with
    the small-map GEMM path, only where that was measured against oneDNN alone and won), each candidate's
    milliseconds and when it was measured."""
    chosen = winner(seconds)
    return {"precision": VARIANTS[chosen][0], "small_map_convs": chosen == "bf16" and "bf16_onednn" in seconds,
            **{f"{name}_ms": round(1000 * seconds[name], 3) for name in VARIANTS if name in seconds},
            "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def candidate_of(record: dict[str, Any]) -> str:
    """The candidate a record (a cache entry, a run's ``precision_record``) chose: its precision, or
    ``bf16_onednn`` where bf16 won without the GEMM path against a measured GEMM variant."""
    if record.get("precision") == "bf16" and record.get("small_map_convs") is False and "bf16_onednn_ms" in record:
        return "bf16_onednn"
    return record["precision"]


def uses_small_map_convs(record: dict[str, Any] | None) -> bool:
    """Whether bf16 on the CPU takes the small-map GEMM path: as a ``precision_record`` says; yes where it says
    nothing (an explicit ``--precision bf16``, a record from before the probe measured it)."""
    return record is None or record.get("small_map_convs", True) is not False


def times_line(record: dict[str, Any], unit: str) -> str:
    """``fp32 56.9, bf16 37.9, bf16 without small-map GEMM 41.2 ms/step at batch 128`` (``unit``: ``ms/step``),
    naming that the GEMM path was not timed where no map was small enough for it."""
    times = ", ".join(f"{LABELS[name]} {record[f'{name}_ms']:.1f}" for name in VARIANTS if f"{name}_ms" in record)
    line = f"{times} {unit} at batch {record['batch']}"
    return line if "bf16_onednn_ms" in record else line + ", no map small enough for the GEMM path"


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
              channels_last: bool, **extra: Any) -> dict[str, Any]:
    """Everything a measurement of ``kind`` (``training``, ``inference``) depends on, as JSON values: the CPU
    (``cpu``: :func:`vggnet.runtime.cpu_identity`), torch, the model's shape, the probe's input, the threads, the
    memory layout and ``extra``."""
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


def read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached decision for ``key``, or None when there is none or it does not hold what a decision holds: one
    of :data:`CANDIDATES`, a positive time of each (and of ``bf16_onednn`` where it has one) and which bf16 variant
    won (``small_map_convs``, true or false)."""
    entry = read_entry(path, key)
    if entry is None or entry.get("precision") not in CANDIDATES:
        return None
    if not all(positive(t) for t in [entry.get(f"{p}_ms") for p in CANDIDATES] + [entry.get("bf16_onednn_ms", 1.0)]):
        return None
    return entry if isinstance(entry.get("small_map_convs"), bool) else None


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
