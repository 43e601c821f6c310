"""Export a trained VGG to a file other runtimes load (ONNX, TorchScript, torch.export), checked against the eager
model before anything is written.

Typical use (the Python side of ``vggnet export``)::

    loaded = vggnet.load("runs/RUN")
    images, note, random = check_images_of(loaded, "runs/RUN")        # the run's own test images, uint8
    result = export_checked(loaded, "onnx", "model.onnx", images=images, images_note=note, random=random,
                            dynamic_batch=True)
    result.check.max_abs_error, result.size_bytes                      # model.onnx and model.onnx.json written
    export_model(loaded.model, "exported", "model.pt2", any_size=True)   # the file alone: no check, no card

What is exported is the eager fp32 :class:`~vggnet.net.models.VGG` on the CPU (not :mod:`vggnet.evaluation.inference`'s optimised
copy), or with ``any_size`` :func:`vggnet.to_dense` of it: fully convolutional, so the file takes any input at least
the training size (the dense head's kernel was sized for it; a ``gap`` head needs only ``2 ** num_pools``).

Formats:

- ``onnx``: :func:`torch.onnx.export` with ``dynamo=True``, the torch.export-based exporter. The TorchScript-based
  one (``dynamo=False``) is deprecated since torch 2.9 (it warns that it will be removed) and fails on the classic
  head's ``AdaptiveAvgPool2d((7, 7))`` whenever the feature map is not a multiple of 7 ("output size that are not
  factor of input size", e.g. the 1 x 1 map of a five-pool model at 32 px); the dynamo exporter lowers that pooling
  to exact gathers and means. Needs the optional ``onnx``, ``onnxscript`` and ``onnxruntime`` packages
  (``pip install 'vggnet[onnx]'``); one file, weights inside (at most 2 GB: protobuf's limit).
- ``torchscript``: :func:`torch.jit.trace` (deprecated by torch in favour of torch.export, still loadable from C++
  with libtorch; the deprecation warnings are silenced here).
- ``exported``: :func:`torch.export.export` + :func:`torch.export.save` (``.pt2``), loaded back with
  ``torch.export.load(path).module()``, which checks the input shape against the declared ranges.

Dynamic dimensions are declared with :class:`torch.export.Dim` (batch >= 1, height/width >= the minimum size) and
traced on an example that is not 1 in any of them (torch.export specialises sizes 0 and 1); size-oblivious
reasoning (``backed_size_oblivious``) keeps the dense head's 1 x 1 class-score map at the minimum size from being
guarded away. TorchScript traces are shape-generic anyway; the card states what is guaranteed.

The check: the exported bytes are loaded back (onnxruntime, :func:`torch.jit.load`, :func:`torch.export.load`) and
run on real images, preprocessed as in training, next to the eager model: max absolute logit error, the relative
error (max abs / max |eager logit|) and top-1 agreement. It passes when the relative error is at most the tolerance
(default :data:`DEFAULT_TOLERANCE`, fp32 against fp32) and every image whose top-1 class changed had an eager top-2
margin below the max abs error (a tie the rounding may break). Then the file and its JSON card (``FILE.json``: input
spec, classes, preprocessing as plain numbers and a recipe, source, check results) are written atomically, the card
last: both files or neither (:func:`commit`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from vggnet.base.errors import ConfigError, DataError, VggnetError
from vggnet.base.files import atomic_write_bytes, atomic_write_json, check_out_path
from vggnet.net.models import VGG
from vggnet.net.dense import to_dense
from vggnet.store.card import LoadedModel

FORMATS = ("onnx", "torchscript", "exported")
#: The usual file extension of each format (any name is accepted).
EXTENSIONS = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
#: Default relative tolerance: max |exported - eager| / max |eager| over the check images, fp32 against fp32.
DEFAULT_TOLERANCE = 1e-4
#: Test-set images checked for a run directory; random images when there are no real ones.
CHECK_IMAGES, RANDOM_IMAGES, RANDOM_SEED = 256, 8, 0
#: Images per call when the batch is dynamic.
CHECK_BATCH = 32
INPUT_NAME, OUTPUT_NAME = "image", "logits"
ONNX_HINT = "pip install 'vggnet[onnx]'"
#: The most weight bytes one ONNX file holds (protobuf's 2 GB limit, less room for the graph).
ONNX_MAX_BYTES = 2**31 - 2**26


class ExportError(VggnetError):
    """An export that cannot be made, or whose file does not compute what the eager model computes."""


# ------------------------------------------------------------------------------------------------ preconditions
def require_onnx() -> None:
    """Import the optional ONNX packages (exporter, its script library, the runtime that checks the file); one-line
    :class:`ExportError` with the install hint when one is missing."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise ExportError(f"--format onnx needs the {name} package, which is not installed: {ONNX_HINT}") from None


def card_path(path: str | os.PathLike) -> Path:
    """The JSON card beside an exported file: ``model.onnx`` -> ``model.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


# ------------------------------------------------------------------------------------------------ input spec
@dataclass
class InputSpec:
    """What the exported file takes: ``(batch, channels, height, width)`` float32, some dimensions dynamic."""

    channels: int
    size: tuple[int, int]  # the fixed size, or the smallest when any_size
    step: int  # 2 ** num_pools: the model's size granularity
    dynamic_batch: bool = False
    any_size: bool = False

    @property
    def dynamic(self) -> list[str]:
        return (["batch"] if self.dynamic_batch else []) + (["height", "width"] if self.any_size else [])

    def shape(self) -> list[int | str]:
        """The input shape, a dynamic dimension by its name."""
        return ["batch" if self.dynamic_batch else 1, self.channels,
                "height" if self.any_size else self.size[0], "width" if self.any_size else self.size[1]]

    def example(self) -> torch.Tensor:
        """A traced example: batch 2 when dynamic (torch.export specialises 1), else 1; with any_size,
        ``size + 2 * step`` (never the minimum, whose dense score map is 1 x 1)."""
        h, w = (s + 2 * self.step for s in self.size) if self.any_size else self.size
        gen = torch.Generator().manual_seed(RANDOM_SEED)
        return torch.randn(2 if self.dynamic_batch else 1, self.channels, h, w, generator=gen)

    def dynamic_shapes(self) -> tuple[dict[int, Any]] | None:
        from torch.export import Dim

        dims: dict[int, Any] = {}
        if self.dynamic_batch:
            dims[0] = Dim("batch", min=1)
        if self.any_size:
            dims[2] = Dim("height", min=self.size[0])
            dims[3] = Dim("width", min=self.size[1])
        return (dims,) if dims else None


def export_module(model: VGG, *, dynamic_batch: bool = False, any_size: bool = False) -> tuple[VGG, InputSpec]:
    """The eager fp32 CPU module that is exported (``to_dense(model)`` with ``any_size``) and its input spec."""
    if not isinstance(model, VGG):
        raise ConfigError(f"export needs a vggnet VGG model, got {type(model).__name__}")
    int8 = [m for m in model.modules() if hasattr(m, "use_kernel")]  # vggnet.use.compress.Int8Linear layers
    if int8 or model.training or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float().cpu().eval()  # the caller's model stays as it was
        for module in model.modules():
            if hasattr(module, "use_kernel"):
                # The exporters see the dequantised form (int8 weights, Cast, Mul: the file stays small); the eager
                # reference runs the same arithmetic, not the kernel that also rounds activations to int8.
                module.use_kernel = False
    if any_size:
        module = to_dense(model).eval()
        size = module.input_size if model.head in ("classic", "fitted", "dense") else (model.min_size,) * 2
    else:
        module, size = model, model.input_size
    return module, InputSpec(model.in_channels, tuple(size), model.min_size, dynamic_batch, any_size)


# ------------------------------------------------------------------------------------------------ exporting
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings, exporter progress lines or logger chatter on the user's terminal while torch exports and loads
    (deprecations of torch.jit, onnxscript's pytree notice, "torchvision is not installed" from the registry)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _size_oblivious() -> contextlib.AbstractContextManager:
    """torch's size-oblivious shape reasoning where this torch has it: a dynamic size is not assumed to differ from 1
    (the dense head's 1 x 1 score map at the minimum size would otherwise be guarded out of the range)."""
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    if not hasattr(fx_config, "backed_size_oblivious"):  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return fx_config.patch(backed_size_oblivious=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def export_bytes(module: nn.Module, fmt: str, spec: InputSpec) -> bytes:
    """The file of ``module`` in format ``fmt`` as bytes (nothing is written)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
        weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        if weight_bytes > ONNX_MAX_BYTES:
            raise ExportError(f"this model has {weight_bytes / 2**30:.2f} GB of weights, more than one ONNX file holds "
                              "(2 GB, protobuf's limit): use --format exported or torchscript")
    example = spec.example()
    buffer = io.BytesIO()
    try:
        with _quiet(), torch.no_grad():
            if fmt == "torchscript":
                traced = torch.jit.trace(module, (example,), check_trace=False)
                torch.jit.save(traced, buffer)
                return buffer.getvalue()
            with _size_oblivious():
                if fmt == "exported":
                    program = torch.export.export(module, (example,), dynamic_shapes=spec.dynamic_shapes())
                    torch.export.save(program, buffer)
                    return buffer.getvalue()
                onnx_program = torch.onnx.export(module, (example,), None, dynamo=True, verbose=False,
                                                 input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                                 dynamic_shapes=spec.dynamic_shapes())
            return onnx_program.model_proto.SerializeToString()
    except VggnetError:
        raise
    except Exception as err:  # noqa: BLE001 - an exporter failure is one line, never a traceback
        raise ExportError(f"torch could not export this model to {fmt}: {_first_line(err)}; try another --format "
                          "(set VGGNET_DEBUG=1 for the traceback)") from err


def load_runner(fmt: str, data: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function float32 NCHW -> logits running the exported ``data`` as its own runtime does."""
    with _quiet():
        if fmt == "onnx":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])

            def run_onnx(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])

            return run_onnx
        if fmt == "torchscript":
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        else:
            module = torch.export.load(io.BytesIO(data)).module()

    def run_torch(x: torch.Tensor) -> torch.Tensor:
        with _quiet(), torch.no_grad():
            return module(x)

    return run_torch


def onnx_opset(data: bytes) -> int | None:
    import onnx

    proto = onnx.load_model_from_string(data)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


# ------------------------------------------------------------------------------------------------ checking
@dataclass
class SizeCheck:
    """The comparison at one input size, over every batch size run."""

    size: tuple[int, int]
    batch_sizes: list[int]
    images: int
    max_abs_error: float
    max_abs_logit: float
    top1_agree: int  # images with the same argmax (counted on the largest batch run)
    top1_allowed: int  # of the others, those whose eager top-2 margin is below max_abs_error

    @property
    def rel_error(self) -> float:
        return self.max_abs_error / self.max_abs_logit if self.max_abs_logit > 0 else self.max_abs_error

    @property
    def top1_agreement(self) -> float:
        return self.top1_agree / self.images


@dataclass
class ExportCheck:
    """How the exported file compares with the eager model (:func:`check_export`)."""

    images: str  # what was checked on, in words
    random: bool  # random pixels, no real images were available
    tolerance: float
    sizes: list[SizeCheck] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        return max(s.max_abs_error for s in self.sizes)

    @property
    def rel_error(self) -> float:
        return max(s.rel_error for s in self.sizes)

    @property
    def top1_agreement(self) -> float:
        return min(s.top1_agreement for s in self.sizes)

    @property
    def passed(self) -> bool:
        return self.rel_error <= self.tolerance and all(
            s.top1_agree + s.top1_allowed == s.images for s in self.sizes)

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "random_images": self.random, "tolerance": self.tolerance,
                "rule": f"relative error (max |exported - eager| / max |eager|) <= {self.tolerance:g}, and top-1 "
                        "classes equal except where the eager top-2 margin is below the max abs error",
                "passed": self.passed, "max_abs_error": self.max_abs_error, "rel_error": self.rel_error,
                "top1_agreement": self.top1_agreement,
                "sizes": [dict(asdict(s), size=list(s.size), rel_error=s.rel_error, top1_agreement=s.top1_agreement)
                          for s in self.sizes]}


def _top2_margin(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] < 2:
        return torch.full((logits.shape[0],), math.inf)
    top = logits.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def compare(reference: nn.Module, runner: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
            dynamic_batch: bool) -> SizeCheck:
    """Run the float32 batch ``x`` through the eager ``reference`` and the exported ``runner``: one image at a time
    for a fixed batch of 1; with a dynamic batch, the first image alone and then batches of up to
    :data:`CHECK_BATCH` (a single image is repeated so that a batch above 1 runs too)."""
    n = x.shape[0]
    with torch.no_grad():
        eager = torch.cat([reference(x[i:i + CHECK_BATCH]) for i in range(0, n, CHECK_BATCH)]).double()
    runs: list[tuple[int, torch.Tensor]] = []
    try:
        if dynamic_batch:
            runs.append((1, runner(x[:1]).double()))
            xs = x if n > 1 else x.repeat(2, 1, 1, 1)
            batch = min(CHECK_BATCH, xs.shape[0])
            out = torch.cat([runner(xs[i:i + batch]) for i in range(0, xs.shape[0], batch)]).double()[:n]
            runs.append((batch, out))
        else:
            runs.append((1, torch.cat([runner(x[i:i + 1]) for i in range(n)]).double()))
    except Exception as err:  # noqa: BLE001 - a file that cannot run its own input is a failed export
        raise ExportError(f"the exported file fails on a {tuple(x.shape[1:])} input: {_first_line(err)}; nothing "
                          "written") from err
    max_abs = max(float((out - eager[:out.shape[0]]).abs().max()) for _, out in runs)
    final = runs[-1][1]
    same = final.argmax(1) == eager.argmax(1)
    allowed = (~same) & (_top2_margin(eager) < max_abs)
    return SizeCheck(size=(int(x.shape[2]), int(x.shape[3])), batch_sizes=[b for b, _ in runs], images=n,
                     max_abs_error=max_abs, max_abs_logit=float(eager.abs().max()), top1_agree=int(same.sum()),
                     top1_allowed=int(allowed.sum()))


def check_sizes(prep, spec: InputSpec) -> list[int]:
    """The square sizes checked: the training size, and with ``any_size`` also ``training size + 2 * step``."""
    return [prep.image_size] + ([prep.image_size + 2 * spec.step] if spec.any_size else [])


def check_export(reference: nn.Module, runner: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, prep,
                 spec: InputSpec, tolerance: float = DEFAULT_TOLERANCE, note: str = "",
                 random: bool = False) -> ExportCheck:
    """Compare ``runner`` (the reloaded file) with ``reference`` (the eager module that was exported) on the uint8
    ``images``, preprocessed by ``prep`` at each of :func:`check_sizes` (a larger size by the same preprocessing
    with a larger ``image_size``)."""
    from vggnet.data import Preprocess

    check = ExportCheck(note or f"{images.shape[0]} image(s)", random, tolerance)
    for size in check_sizes(prep, spec):
        at_size = prep if size == prep.image_size else Preprocess.from_dict(dict(asdict(prep), image_size=size))
        check.sizes.append(compare(reference, runner, at_size(images), spec.dynamic_batch))
    return check


def random_images(loaded: LoadedModel, n: int = RANDOM_IMAGES) -> torch.Tensor:
    """``n`` seeded random uint8 images at the model's decode size: the check when no real images are at hand."""
    prep = loaded.preprocess
    gen = torch.Generator().manual_seed(RANDOM_SEED)
    return torch.randint(0, 256, (n, prep.channels, prep.decode_size, prep.decode_size), dtype=torch.uint8,
                         generator=gen)


def check_images_of(loaded: LoadedModel, source: str | os.PathLike, files: Sequence[str] | None = None,
                    limit: int = CHECK_IMAGES) -> tuple[torch.Tensor, str, bool]:
    """The uint8 images to check an export on, what they are in words, and whether they are random.

    ``files`` (decoded as ``vggnet predict`` decodes them; an unreadable one is an error); else, for a run
    directory, the first ``limit`` images of its own test set (found as ``vggnet eval`` finds it); else
    :func:`random_images`, saying why."""
    if files:

        images, _, errors = loaded.decode_files(files)
        if errors:
            raise DataError(f"--check-images: {errors[0][1]}")
        return images, f"{len(files)} image file(s) given with --check-images", False
    card = loaded.card
    if loaded.run_dir is not None and card.dataset:
        from vggnet.evaluation.metrics import load_test_set

        try:
            test = load_test_set(loaded, card.dataset)
        except DataError as err:
            why = f"the run's test set could not be loaded ({err})"
        else:
            if test.images.shape[1] == loaded.model.in_channels and len(test):
                images = test.images[:limit]
                return images, f"the first {images.shape[0]} images of the {card.dataset} test set", False
            why = f"the run's test set ({card.dataset}) does not fit the model"
    elif loaded.run_dir is not None:
        why = "the run directory names no dataset"
    else:
        why = f"{source} is a weights file, with no test set of its own (give images with --check-images)"
    return random_images(loaded), f"{RANDOM_IMAGES} random images (seed {RANDOM_SEED}): {why}", True


# ------------------------------------------------------------------------------------------------ the card
def fitted_from(prep) -> tuple[int, str]:
    """The side of a decoded file after the centre crop, and how it is then fitted to ``image_size``: ``"pad"``,
    ``"resize"`` or ``"none"``."""
    side = prep.decode_size
    if prep.crop_fraction < 1.0:
        side = max(1, int(round(side * prep.crop_fraction)))
    return side, prep.resolved_fit(side, side)


def recipe(prep, channels: int) -> str:
    """The preprocessing in one line of plain English, for a user without vggnet."""
    colour = {1: "grayscale (1 channel, ITU-R 601-2 luma)", 3: "RGB"}.get(
        channels, f"grayscale (ITU-R 601-2 luma) repeated into {channels} channels")
    d, s = prep.decode_size, prep.image_size
    steps = [f"decode the image as {colour} uint8", f"resize the shorter side to {d} px (bilinear) and crop the centre "
             f"{d}x{d}"]
    cropped, fit = fitted_from(prep)
    if prep.crop_fraction < 1.0:
        steps.append(f"keep the centre {cropped}x{cropped} (crop fraction {prep.crop_fraction:g})")
    if prep.channel_order == "bgr":
        steps.append("reverse the channels to BGR")
    steps.append("divide by 255")
    if fit == "pad":
        steps.append(f"pad with zeros, centred, to {s}x{s}")
    elif fit == "resize":
        steps.append(f"resize to {s}x{s} (bilinear)")
    numbers = lambda values: "[" + ", ".join(f"{v:.6g}" for v in values) + "]"  # noqa: E731
    steps.append(f"subtract mean {numbers(prep.mean)} and divide by std {numbers(prep.std)} per channel")
    steps.append(f"feed float32 NCHW (batch, {channels}, {s}, {s}); the outputs are logits, softmax for probabilities")
    return "; ".join(steps)


def make_card(loaded: LoadedModel, fmt: str, spec: InputSpec, check: ExportCheck, *, source: str, size_bytes: int,
              export_seconds: float, opset: int | None = None) -> dict[str, Any]:
    """The JSON card of an exported file: what a user of another runtime needs, and how it was checked."""
    from vggnet.base.version import __version__

    prep = loaded.preprocess
    classes = list(loaded.classes) or [str(i) for i in range(loaded.model.num_classes)]
    card: dict[str, Any] = {
        "format": fmt,
        "input": {"name": INPUT_NAME, "shape": spec.shape(), "dynamic": spec.dynamic, "dtype": "float32",
                  "layout": "NCHW", "min_size": list(spec.size),
                  "note": "the first positional argument" if fmt != "onnx" else "the ONNX graph input"},
        "output": {"name": OUTPUT_NAME, "shape": [spec.shape()[0], len(classes)],
                   "meaning": "class logits in the order of classes; softmax gives probabilities"},
        "classes": classes,
        "preprocess": dict(asdict(prep), mean=list(prep.mean), std=list(prep.std)),
        "decode_size": prep.decode_size,
        "fit": fitted_from(prep)[1],
        "recipe": recipe(prep, spec.channels),
        "model": dict(loaded.model.config, head="dense" if spec.any_size and loaded.model.head != "gap"
                      else loaded.model.head),
        "converted": "vggnet.to_dense (fully convolutional)" if spec.any_size else None,
        "source": source,
        "weights": loaded.weights if loaded.run_dir is not None else None,
        "vggnet_version": __version__,
        "torch_version": torch.__version__,
        "size_bytes": size_bytes,
        "export_seconds": round(export_seconds, 3),
        "check": check.to_dict(),
    }
    if opset is not None:
        card["opset"] = opset
    return card


def commit(path: str | os.PathLike, data: bytes, card: dict[str, Any]) -> tuple[Path, Path]:
    """Write the file and then its card, each atomically; a card that cannot be written takes the file with it, so
    both are there or neither is new."""
    path = Path(path)
    atomic_write_bytes(path, data)
    try:
        atomic_write_json(card_path(path), card)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, card_path(path)


def export_model(model: VGG, fmt: str, path: str | os.PathLike, *, dynamic_batch: bool = False,
                 any_size: bool = False) -> Path:
    """Export ``model`` (eager fp32 on the CPU; ``to_dense`` of it with ``any_size``) to ``path`` in ``fmt``,
    atomically, without checking it or writing a card (:func:`export_checked` does both)."""
    path = check_out_path(path, "model.onnx")
    module, spec = export_module(model, dynamic_batch=dynamic_batch, any_size=any_size)
    atomic_write_bytes(path, export_bytes(module, fmt, spec))
    return path


# ------------------------------------------------------------------------------------------------ all together
@dataclass
class ExportResult:
    path: Path
    card_path: Path
    format: str
    spec: InputSpec
    check: ExportCheck
    size_bytes: int
    export_seconds: float
    card: dict[str, Any]


def export_checked(loaded: LoadedModel, fmt: str, out: str | os.PathLike, *, images: torch.Tensor | None = None,
                   images_note: str = "", random: bool = False, dynamic_batch: bool = False, any_size: bool = False,
                   tolerance: float = DEFAULT_TOLERANCE, source: str | None = None) -> ExportResult:
    """Export ``loaded.model`` to ``out`` in ``fmt``, check the file against the eager model on the uint8
    ``images`` (default :func:`random_images`), and write it with its card (``out.json``) only when the check
    passes; otherwise :class:`ExportError` and nothing written."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not tolerance > 0:
        raise ConfigError(f"the tolerance must be > 0, got {tolerance}")
    out = check_out_path(out, "model.onnx")
    if fmt == "onnx":
        require_onnx()
    source = str(source if source is not None else loaded.run_dir or "model")
    loaded.require_head(source, "export")
    if images is None:
        images, images_note, random = random_images(loaded), f"{RANDOM_IMAGES} random images (seed {RANDOM_SEED})", True
    module, spec = export_module(loaded.model, dynamic_batch=dynamic_batch, any_size=any_size)
    prep = loaded.preprocess
    if not any_size and spec.size != (prep.image_size, prep.image_size):
        raise ExportError(f"the preprocessing makes {prep.image_size}x{prep.image_size} inputs but the model takes "
                          f"{spec.size[0]}x{spec.size[1]}: export with --any-size, or fix the source's preprocessing")
    start = time.perf_counter()
    data = export_bytes(module, fmt, spec)
    seconds = time.perf_counter() - start
    check = check_export(module, load_runner(fmt, data), images, prep, spec, tolerance,
                         images_note, random)
    if not check.passed:
        worst = max(check.sizes, key=lambda s: (s.rel_error, -s.top1_agreement))
        changed = worst.images - worst.top1_agree - worst.top1_allowed
        flips = f", {changed} image(s) change top-1 class by more than the error" if changed else ""
        detail = (f"relative error {check.rel_error:.3g} (max abs {check.max_abs_error:.3g}) against the tolerance "
                  f"{tolerance:g}{flips} at {worst.size[0]}x{worst.size[1]}")
        raise ExportError(f"the exported {fmt} file does not compute what the eager model computes: {detail}, on "
                          f"{check.images}; nothing written (a larger --tolerance accepts it if this is expected)")
    opset = onnx_opset(data) if fmt == "onnx" else None
    card = make_card(loaded, fmt, spec, check, source=source, size_bytes=len(data), export_seconds=seconds,
                     opset=opset)
    path, card_file = commit(out, data, card)
    return ExportResult(path, card_file, fmt, spec, check, len(data), seconds, card)


def human_size(n: int) -> str:
    """``1536`` -> ``"1.5 KB"`` (binary units)."""
    if n < 1024:
        return f"{n} B"
    exponent = min(3, int(math.log(n, 1024)))
    return f"{n / 1024 ** exponent:.1f} {'KMG'[exponent - 1]}B"


__all__ = ["DEFAULT_TOLERANCE", "FORMATS", "ExportCheck", "ExportError", "ExportResult", "InputSpec", "SizeCheck",
           "card_path", "check_export", "check_images_of", "commit", "export_bytes",
           "export_checked", "export_model", "export_module", "load_runner", "make_card", "random_images", "recipe",
           "require_onnx"]
