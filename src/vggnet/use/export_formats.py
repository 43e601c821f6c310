"""The export formats of :mod:`vggnet.use.export`: what is exported (:func:`export_module`, its :class:`InputSpec`),
the exported bytes (:func:`export_bytes`) and a runner of those bytes in their own runtime (:func:`load_runner`).

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
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from vggnet.base.errors import ConfigError, VggnetError
from vggnet.net.dense import to_dense
from vggnet.net.models import VGG

FORMATS = ("onnx", "torchscript", "exported")
#: The usual file extension of each format (any name is accepted).
EXTENSIONS = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
#: The seed of the traced example and of the random check images.
RANDOM_SEED = 0
INPUT_NAME, OUTPUT_NAME = "image", "logits"
ONNX_HINT = "pip install 'vggnet[onnx]' (in a clone of vggnet: pip install -e '.[onnx]')"
#: The most weight bytes one ONNX file holds (protobuf's 2 GB limit, less room for the graph).
ONNX_MAX_BYTES = 2**31 - 2**26


class ExportError(VggnetError):
    """An export that cannot be made, or whose file does not compute what the eager model computes."""


def require_onnx() -> None:
    """Import the optional ONNX packages (exporter, its script library, the runtime that checks the file); one-line
    :class:`ExportError` with the install hint when one is missing."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise ExportError(f"--format onnx needs the {name} package, which is not installed: {ONNX_HINT}") from None



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


def first_line(err: BaseException) -> str:
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
        raise ExportError(f"torch could not export this model to {fmt}: {first_line(err)}; try another --format "
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


__all__ = ["EXTENSIONS", "FORMATS", "ExportError", "InputSpec", "export_bytes", "export_module", "first_line",
           "load_runner", "onnx_opset", "require_onnx"]
