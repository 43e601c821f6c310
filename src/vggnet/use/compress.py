"""Compression of a trained VGG: low-rank (SVD) classifier layers, int8 classifier weights, float16 storage.

VGG keeps its weight mass in the classifier: of VGG-16's 138.4 M parameters, fc6-fc8 hold 123.6 M (89%), fc6
alone 102.8 M (25088 x 4096). Three tools act on it, alone or together (``vggnet compress``; docs/COMPRESSION.md
has measured sizes, speeds and accuracies):

- **SVD** (:class:`LowRankLinear`): an FC layer's (out, in) weight becomes ``U_r diag(s_r) V_r^T``, the best rank-r
  approximation (Eckart-Young), computed in float64 (:func:`weight_spectrum`) and run as two Linear layers,
  ``in -> r`` (no bias) and ``r -> out`` (the bias), with sqrt(s) in each factor: ``r * (in + out)`` weights instead
  of ``in * out``. Ranks are given per layer (``fc6=1024``) or chosen by an energy rule: per layer the smallest r
  with ``sum(s_1..s_r^2) >= E * sum(s^2)``, and a layer whose factors would not be smaller is left whole.
- **int8** (:class:`Int8Linear`): every Linear layer of the classifier (the SVD factors included) keeps an int8
  weight with a float32 scale per output channel (symmetric: ``scale = max|w_row| / 127``, ``q = round(w / scale)``)
  and its float bias. On the CPU it runs through the fbgemm/x86 dynamic-int8 kernel: the input is quantised per call
  to unsigned 7-bit codes (``reduce_range``; one scale and zero point per call, i.e. per *batch*, from the batch's
  min and max including 0) and the int32 products are scaled back to float32. Elsewhere, and while exporting,
  tracing or compiling, it computes ``F.linear(x, q * scale, bias)`` in float32 (an exported graph holds the int8
  weight, a cast and a multiply: the file stays small). The convolutions are not quantised.
- **half**: every floating tensor is stored as float16 on disk, except the int8 layers' scales (float32: out
  values per layer, and a float16 scale turns subnormal, losing precision, for rows whose weights all lie below
  0.0078), and read back as float32. The model is rounded in memory the same way, so what is measured is what loads.

The choice is recorded in the run's model card (:class:`Compression`, ``model.json``'s ``compression``): loading
builds the card's VGG and :func:`restructure` replaces its classifier layers, on the meta device, by modules of the
recorded shapes before the weights are read. The weights are plain safetensors (int8, float16, float32): no pickle,
and nothing that needs torch's quantized tensor types to read.

:func:`compress_model` compresses a model in memory; :func:`compress_run` makes a run directory from a SOURCE and
measures it against the original (:class:`CompressReport`).
"""

from __future__ import annotations

import copy
import re
import shutil
import statistics
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vggnet.base.errors import ConfigError, OutputError
from vggnet.base.guard import new_folder
from vggnet.evaluation.testset import load_test_set
from vggnet.net.compressed import (Compression, Int8Linear, LowRankLinear, Spectrum, check_int8_backend, dense_weight,
                                   fc_layers, int8_backend, low_rank_factors, quantize_symmetric, replace_linears,
                                   restructure, stored_dtypes, weight_spectrum)
from vggnet.net.models import VGG
from vggnet.base.timing import interleaved
from vggnet.evaluation.metrics import evaluate as run_eval
from vggnet.runtime import AdaptiveThreads, inference_threads
from vggnet.store.load import load
from vggnet.store.rundir import RunDir, load as load_run, save_model


# ------------------------------------------------------------------------------------------------------ compressing
@dataclass
class LayerRank:
    """The SVD decision for one FC layer."""

    name: str
    out_features: int
    in_features: int
    rank: int  # chosen (or given) rank
    energy: float  # fraction of sum(s^2) the rank keeps
    factorised: bool  # False: left whole (its factors would not be smaller)

    @property
    def params_before(self) -> int:
        return self.out_features * self.in_features

    @property
    def params_factored(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @property
    def params_after(self) -> int:
        return self.params_factored if self.factorised else self.params_before

    def describe(self) -> str:
        shape, kept = f"{self.out_features}x{self.in_features}", f"keeps {100 * self.energy:.2f}% of sum(s^2)"
        if self.factorised:
            return (f"{self.name}: {shape} -> rank {self.rank} ({kept}): {self.params_before:,} -> "
                    f"{self.params_after:,} weights")
        return (f"{self.name}: {shape} left whole: rank {self.rank} ({kept}) would need {self.params_factored:,} "
                f"weights, not fewer than its {self.params_before:,}")


def parse_ranks(text: str) -> dict[str, int]:
    """``"fc6=1024,fc7=256"`` -> ``{"fc6": 1024, "fc7": 256}``."""
    ranks: dict[str, int] = {}
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", item)
        if not match or int(match.group(2)) < 1 or match.group(1) in ranks:
            raise ConfigError(f"--svd takes LAYER=RANK pairs with positive ranks, each layer once, e.g. "
                              f"fc6=1024,fc7=256; got {text!r}")
        ranks[match.group(1)] = int(match.group(2))
    return ranks


def energy_rank(singular_values: torch.Tensor, energy: float) -> tuple[int, float]:
    """The smallest r with ``sum(s_1..s_r^2) >= energy * sum(s^2)``, and the fraction it keeps."""
    power = singular_values.double() ** 2
    cumulative = power.cumsum(0)
    total = cumulative[-1].item()
    if total == 0:
        return 1, 1.0
    fractions = cumulative / total
    rank = min(int((fractions < energy).sum().item()) + 1, len(power))
    return rank, fractions[rank - 1].item()


def check_request(model: VGG, svd: dict[str, int] | None = None, svd_energy: float | None = None,
                  int8: bool = False, half: bool = False) -> None:
    """ConfigError for a request that cannot apply to ``model`` (before any work)."""
    if not (svd or svd_energy is not None or int8 or half):
        raise ConfigError("nothing to compress: give --svd LAYER=RANK,..., --svd-energy E, --int8 and/or --half")
    if svd and svd_energy is not None:
        raise ConfigError("--svd gives the ranks and --svd-energy chooses them: give one of the two")
    if svd_energy is not None and not 0 < svd_energy <= 1:
        raise ConfigError(f"--svd-energy is the fraction of sum(s^2) to keep, in (0, 1], got {svd_energy}")
    if any(isinstance(m, (LowRankLinear, Int8Linear)) for m in model.modules()):
        raise ConfigError("this model is already compressed (it has low-rank or int8 layers): compress the original")
    names = fc_layers(model)
    if (svd or svd_energy is not None or int8) and not names:
        raise ConfigError(f"this model's classifier is convolutional (the {model.head} head): --svd and --int8 "
                          "apply to FC layers (classic, fitted or gap heads); --half works for any model")
    for name, rank in (svd or {}).items():
        if name not in names:
            raise ConfigError(f"--svd names layer {name!r}, which the {model.head} head does not have: its FC layers "
                              f"are {', '.join(names)}")
        linear = model.classifier[names[name]]
        full = min(linear.in_features, linear.out_features)
        if not 1 <= rank <= full:
            raise ConfigError(f"--svd {name}={rank}: {name} is {linear.out_features}x{linear.in_features}, so its "
                              f"rank is at most {full}: give a rank from 1 to {full}")
    if int8:
        check_int8_backend()


@dataclass
class Compressed:
    """:func:`compress_model`'s result: the compressed model (eval mode), its record, the SVD decisions."""

    model: VGG
    record: Compression
    layers: list[LayerRank]

    def card(self, source_card):
        """``source_card`` (a :class:`vggnet.store.card.ModelCard`) with this compression recorded: save it with the model
        (:func:`vggnet.store.rundir.save_model`) and the run loads as compressed."""
        return replace(source_card, compression=self.record)


@torch.no_grad()
def compress_model(model: VGG, svd: dict[str, int] | None = None, svd_energy: float | None = None,
                   int8: bool = False, half: bool = False, source: str | None = None) -> Compressed:
    """A compressed copy of ``model`` (which is not modified): SVD of the named layers at the given ranks (``svd``)
    or at the ranks ``svd_energy`` picks, then int8 classifier weights, then float16 rounding of every other floating
    tensor (the copy is what :func:`vggnet.load` returns for the run it is saved as)."""
    check_request(model, svd, svd_energy, int8, half)
    out = copy.deepcopy(model).eval()
    names = fc_layers(out)
    layers: list[LayerRank] = []
    for name in svd or (names if svd_energy is not None else {}):
        linear = out.classifier[names[name]]
        spectrum = weight_spectrum(linear.weight)
        if svd:
            rank = svd[name]
            power = spectrum.values ** 2
            kept = power[:rank].sum().item() / power.sum().item() if power.sum().item() > 0 else 1.0
        else:
            rank, kept = energy_rank(spectrum.values, svd_energy)
        smaller = rank * (linear.in_features + linear.out_features) < linear.in_features * linear.out_features
        choice = LayerRank(name, linear.out_features, linear.in_features, rank, kept, bool(svd) or smaller)
        layers.append(choice)
        if choice.factorised:
            out.classifier[names[name]] = LowRankLinear.from_linear(linear, rank, spectrum)
    if int8:
        replace_linears(out.classifier, Int8Linear.from_linear)
    record = Compression({c.name: c.rank for c in layers if c.factorised}, svd_energy, int8, half, source)
    state = out.state_dict()
    for key, dtype in stored_dtypes(out, record).items():
        state[key].copy_(state[key].to(dtype))  # round in memory as the file will: what loads is what is measured
    return Compressed(out, record, layers)


# ------------------------------------------------------------------------------------------------------ measuring
def parameter_count(model: nn.Module) -> int:
    """Weights and biases: every parameter, plus each Int8Linear's int8 weight and bias (its per-channel scales and
    BN statistics are not counted)."""
    count = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Int8Linear):
            count += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    return count


@torch.inference_mode()
def latency(models: dict[str, nn.Module], input_shape: tuple[int, ...], rounds: int = 10, warmup: int = 2
            ) -> dict[str, list[float]]:
    """Seconds per batch-1 fp32 forward of each model on the CPU, timed in ``rounds`` interleaved rounds after
    ``warmup`` calls each (the bench's harness, :func:`vggnet.base.timing.interleaved`), on the current intra-op
    thread count."""
    from functools import partial

    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    return interleaved({name: partial(model, x) for name, model in models.items()}, rounds, warmup)


@dataclass
class Measurement:
    """One row of the comparison."""

    name: str
    file_bytes: int  # bytes of the weights file
    params: int  # parameter_count
    top1: float | None  # test accuracy (fraction); None when not measured
    latency_s: float  # median seconds per image, batch 1, fp32, CPU

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompressReport:
    """What :func:`compress_run` made and measured."""

    out: Path
    record: Compression
    layers: list[LayerRank]
    original: Measurement
    compressed: Measurement
    threads: int
    rounds: int
    dataset: str | None  # the test set of top1 (None: not evaluated)
    test_images: int
    accuracy_note: str  # why there is no accuracy, when there is none

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "compression": self.record.to_dict(),
                "layers": [dict(asdict(c), params_after=c.params_after) for c in self.layers],
                "original": self.original.to_dict(), "compressed": self.compressed.to_dict(), "threads": self.threads,
                "rounds": self.rounds, "dataset": self.dataset, "test_images": self.test_images}


def check_out(out: str | Path) -> Path:
    """``out`` must not exist, or be an empty folder (:func:`vggnet.base.guard.new_folder`), in a writable place."""
    return new_folder(out, hint="vggnet compress writes a new run directory; give a new path or an empty folder")


def _test_set(loaded, source: Path, dataset: str | None, data_dir: str | None):
    """The test set to measure accuracy on, as ``vggnet eval`` picks it (None and a note when there is none)."""
    card, is_run = loaded.card, loaded.run_dir is not None
    if not dataset and not (is_run and card.dataset):
        what = "the run's model.json names no dataset" if is_run else "a weights file has no dataset of its own"
        return None, None, f"n/a: {what} (give --dataset)"
    name = dataset or card.dataset
    return name, load_test_set(loaded, name, data_dir, source), ""


def _weights_bytes(loaded, source: Path, weights: str) -> int:
    return (RunDir(source).weights(weights) if loaded.run_dir is not None else source).stat().st_size


def _measure(models: dict[str, nn.Module], sizes: dict[str, int], test, preprocess, batch_size: int | None,
             threads: int | None, adaptive: AdaptiveThreads | None, rounds: int, progress: bool
             ) -> tuple[dict[str, Measurement], int]:
    """One :class:`Measurement` per model: its file size, parameters, test accuracy (fp32, when ``test`` is given)
    and median batch-1 latency on ``threads`` threads, in interleaved rounds; with ``adaptive`` (no ``threads``)
    the evaluation and the latency run on the count the other processes' load leaves (:func:`_latency`). Also the
    thread count of the latency. The thread count leaves as it came."""
    previous = torch.get_num_threads()
    try:
        accuracy = {}
        if test is not None:
            for label, net in models.items():
                accuracy[label] = run_eval(net, test, preprocess, "cpu", "fp32", batch_size, progress=progress,
                                           threads=adaptive).top1
        first = next(iter(models.values()))
        torch.set_num_threads(threads or torch.get_num_threads())
        times, used = _latency(models, (1, first.in_channels, *first.input_size), rounds, adaptive)
    finally:
        torch.set_num_threads(previous)
    return {label: Measurement(label, sizes[label], parameter_count(net), accuracy.get(label),
                               statistics.median(times[label])) for label, net in models.items()}, used


def _latency(models: dict[str, nn.Module], shape: tuple[int, ...], rounds: int, adaptive: AdaptiveThreads | None
             ) -> tuple[dict[str, list[float]], int]:
    """:func:`latency`, on the current thread count, or with ``adaptive`` on the count the load leaves: decided
    before the warm-up (:meth:`~vggnet.runtime.AdaptiveThreads.settle`) and looked at again before every round.
    Also the thread count most rounds ran on."""
    if adaptive is None:
        return latency(models, shape, rounds), torch.get_num_threads()
    adaptive.settle()
    latency(models, shape, rounds=0)  # the warm-up, on the chosen count
    times: dict[str, list[float]] = {name: [] for name in models}
    counts = []
    for _ in range(rounds):
        adaptive.poll()
        counts.append(torch.get_num_threads())
        for name, seconds in latency(models, shape, rounds=1, warmup=0).items():
            times[name] += seconds
    return times, Counter(counts).most_common(1)[0][0]


def compress_run(source: str | Path, out: str | Path, svd: dict[str, int] | None = None,
                 svd_energy: float | None = None, int8: bool = False, half: bool = False, weights: str = "model",
                 model: str | None = None, dataset: str | None = None, data_dir: str | None = None,
                 evaluate: bool = True, rounds: int = 10, threads: int | None = None, batch_size: int | None = None,
                 progress: bool = False) -> CompressReport:
    """Compress the model of ``source`` (a run directory or a weights file; ``weights``/``model`` as for
    :func:`vggnet.load`) into the new run directory ``out``, and measure both.

    ``out`` keeps the source's card (classes, preprocessing, dataset, image size, training config, metrics) with
    the :class:`Compression` record added, and loads like any run (``vggnet eval``/``predict``, :func:`vggnet.load`).
    It is written into a temporary folder beside ``out``, loaded back from there for the measurements, and renamed
    to ``out`` at the end: an error leaves nothing. Accuracy (on the run's own test set, or ``dataset``; ``evaluate``
    False skips it) is of the reloaded model at ``batch_size`` (default: evaluation's); latency is batch 1, fp32, on
    the CPU with ``threads`` intra-op threads, the median of ``rounds`` interleaved runs. Without ``threads`` the
    evaluation and the latency follow the other processes' load (:func:`vggnet.runtime.inference_threads`: every
    core on a quiet machine, one thread fewer per busy core), and the report gives the latency's count; the SVD runs
    on the current count."""
    adaptive = inference_threads(torch.device("cpu"), threads is not None)  # its window opens now
    out, source = check_out(out), Path(source)
    loaded = load(source, weights, "cpu", model=model)
    loaded.require_head(source, "compress")
    if loaded.card.compression is not None:
        raise ConfigError(f"{source} is already compressed ({loaded.card.compression.describe()}"
                          "): compress the original run")
    check_request(loaded.model, svd, svd_energy, int8, half)
    name, test, note = (_test_set(loaded, source, dataset, data_dir) if evaluate
                        else (None, None, "not measured (--no-eval)"))
    done = compress_model(loaded.model, svd, svd_energy, int8, half, str(source))
    card = done.card(loaded.card)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise OutputError(f"cannot create {out}: {err.strerror or err}") from None
    try:
        save_model(tmp, done.model, card)
        reloaded = load_run(tmp).model
        sizes = {"original": _weights_bytes(loaded, source, weights),
                 "compressed": RunDir(tmp).weights("model").stat().st_size}
        rows, used = _measure({"original": loaded.model, "compressed": reloaded}, sizes, test, loaded.preprocess,
                              batch_size, threads, adaptive, rounds, progress)
        if out.exists():
            out.rmdir()  # an empty folder (check_out), replaced by the finished run
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompressReport(out, done.record, done.layers, rows["original"], rows["compressed"], used, rounds, name,
                          0 if test is None else len(test.labels), note)


__all__ = ["Compressed", "Compression", "CompressReport", "Int8Linear", "LayerRank", "LowRankLinear", "Measurement",
           "check_int8_backend", "compress_model", "compress_run", "dense_weight", "energy_rank", "fc_layers",
           "int8_backend", "latency", "low_rank_factors", "parameter_count", "parse_ranks", "quantize_symmetric",
           "restructure", "Spectrum", "stored_dtypes", "weight_spectrum"]
