"""The fast inference path: fold batch norm into the convolutions, channels_last, bf16 weights, GEMM small maps.

``optimize_for_inference(model)`` returns a new eval-mode module (the input model is not modified) that takes the
same float32 NCHW batches and returns float32 logits. What it does, each step optional:

1. ``fold_bn``: every ``Conv2d`` directly followed by an eval-mode ``BatchNorm2d`` (with running statistics) in an
   ``nn.Sequential`` gets ``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``,
   computed in float64; the BN is replaced by ``nn.Identity`` so layer indices (and ``layer_names``) stay valid.
   In fp32 the folded model equals the original within 1e-5 (relative to the logits' scale; tested).
2. ``fuse_relu``: every ``Conv2d`` followed (after folded BNs) by a ``ReLU`` becomes a :class:`ConvReLU` that runs
   both in one oneDNN call (ReLU as a post-op, ``torch.ops.mkldnn._convolution_pointwise``, what inductor emits),
   saving a pass over every activation; the ReLU becomes ``nn.Identity``. Where that op is missing or does not
   apply (GPU, other dtypes), it computes ``relu(conv(x))``. State-dict keys do not change.
3. ``channels_last``: weights and input in NHWC, the layout oneDNN's convolution and pooling kernels run natively.
4. ``precision``: ``"bf16"`` converts the weights to bfloat16 once (no per-call casts as under autocast) and runs
   the input in bf16; ``"auto"`` picks bf16 where the CPU has AVX512_BF16/AMX (:func:`vggnet.runtime.cpu_has_bf16`)
   and fp32 elsewhere. Tolerance of bf16 against fp32: relative L2 error of the logits below 3% (``BF16_RTOL``;
   typically about 0.5-1%) and the same top-1 class on all but near-tied inputs.
5. ``small_maps``: 3x3 convs on maps of at most 16 pixels run as one GEMM in bf16 (:mod:`vggnet.net.cpu_bf16`); False
   leaves every convolution to oneDNN (precision ``auto``'s probe measures both, :mod:`vggnet.evaluation.probe`).
6. ``compile``: ``torch.compile`` of the result (off by default: it costs tens of seconds of compilation; see
   docs/BENCHMARKS.md for when it pays). Step 2 is then left to inductor, which fuses conv + ReLU itself.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vggnet.base.errors import ConfigError
from vggnet.net.cpu_bf16 import DEFAULT_MAX_PIXELS, SmallMapConv2d, rewrite_pairs, use_small_map_convs
from vggnet.runtime import compile_module, pick_precision, uses_cpu_bf16_path
#: Documented tolerance of the bf16 path: ||logits_bf16 - logits_fp32|| / ||logits_fp32|| below this.
BF16_RTOL = 3e-2
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_precision(precision: str = "auto", device: torch.device | str = "cpu") -> str:
    """The precision of the inference copy: :func:`vggnet.runtime.pick_precision`'s choice, except that there is no
    fp16 inference path (``auto`` on a GPU without bf16 runs fp32; fp16 stays refused on the CPU)."""
    chosen = pick_precision(torch.device(device), precision)
    return "fp32" if chosen == "fp16" else chosen


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d equal to ``bn(conv(x))`` with ``bn`` in eval mode (computed in float64)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError("cannot fold a BatchNorm2d without running statistics (track_running_stats=False)")
    if conv.out_channels != bn.num_features:
        raise ConfigError(f"cannot fold BatchNorm2d({bn.num_features}) into a conv with {conv.out_channels} outputs")
    weight = conv.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64,
                                                                        device=weight.device)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(bias)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(bias)
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    fused = copy.deepcopy(conv)
    if fused.bias is None:
        fused.bias = nn.Parameter(torch.empty(conv.out_channels, dtype=conv.weight.dtype, device=weight.device))
    fused.weight.copy_((weight * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    fused.bias.copy_(((bias - bn.running_mean.double()) * scale + beta).to(conv.weight.dtype))
    return fused


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every ``Conv2d`` -> ``BatchNorm2d`` pair inside an ``nn.Sequential`` of ``model`` in place.

    The BN becomes ``nn.Identity``. The model must be in eval mode (folding uses the running statistics).
    Returns the number of folded pairs.
    """
    if model.training:
        raise ConfigError("fold_batch_norms needs an eval-mode model (call model.eval()): training-mode BN uses "
                          "batch statistics, which cannot be folded")
    return rewrite_pairs(
        model, lambda conv, bn: (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d
                                 and bn.track_running_stats and bn.running_mean is not None),
        lambda conv, bn: (fold_conv_bn(conv, bn), nn.Identity()))


def _has_pointwise_conv() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class ConvReLU(SmallMapConv2d):
    """``relu(conv(x))`` in one oneDNN call on the CPU (inference only: the fused op has no backward).

    Small bf16 maps still take the GEMM path of :class:`~vggnet.net.cpu_bf16.SmallMapConv2d` (then a ReLU).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gemm_dtype(x) is not None:
            return F.relu(super().forward(x))
        if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dtype == self.weight.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and self.padding_mode == "zeros" and not isinstance(self.padding, str) and _has_pointwise_conv()):
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, list(self.padding),
                                                           list(self.stride), list(self.dilation), self.groups,
                                                           "relu", [], "")
        return F.relu(nn.Conv2d.forward(self, x))


def fuse_conv_relu(model: nn.Module, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """In every ``nn.Sequential``: ``Conv2d`` [``Identity``...] ``ReLU`` -> ``ConvReLU`` [``Identity``...]
    ``Identity``, in place; returns the number of fused pairs. ``max_pixels`` as for the small-map GEMM path."""
    return rewrite_pairs(
        model, lambda conv, relu: type(conv) in (nn.Conv2d, SmallMapConv2d) and type(relu) is nn.ReLU,
        lambda conv, relu: (ConvReLU.from_conv(conv, max_pixels), nn.Identity()), skip=(nn.Identity,))


class InferenceModel(nn.Module):
    """Wraps an optimised copy: float32 NCHW in, float32 logits out; runs in ``dtype`` and ``memory_format``."""

    def __init__(self, model: nn.Module, precision: str, channels_last: bool, steps: list[str]) -> None:
        super().__init__()
        self.model = model
        self.precision = precision
        self.channels_last = channels_last
        self.steps = steps  # what was applied, in order (for reports)
        self.dtype = _DTYPES[precision]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float()

    def train(self, mode: bool = True) -> "InferenceModel":
        if mode:
            raise ConfigError("an InferenceModel is for inference only (BN is folded, weights may be bf16): "
                              "train the original model instead")
        return super().train(False)


def optimize_for_inference(model: nn.Module, precision: str = "auto", channels_last: bool = True,
                           fold_bn: bool = True, fuse_relu: bool = True, small_maps: bool = True,
                           compile: bool = False) -> nn.Module:
    """A fast eval-mode copy of ``model`` (see the module docstring); call it under ``torch.inference_mode()``."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    precision = resolve_precision(precision, device)
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    steps: list[str] = []
    if fold_bn and fold_batch_norms(fast):
        steps.append("fold_bn")
    gemm_pixels = DEFAULT_MAX_PIXELS if small_maps and uses_cpu_bf16_path(device, precision) else 0
    # Compiling: inductor fuses conv + ReLU itself, and the hand-fused oneDNN op's fake kernel assumes contiguous
    # NCHW strides, which breaks tracing of a channels_last model.
    if fuse_relu and not compile and fuse_conv_relu(fast, gemm_pixels):
        steps.append("fuse_conv_relu")
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
        steps.append("channels_last")
    if precision == "bf16":
        fast = fast.to(torch.bfloat16)
        steps.append("bf16")
    if gemm_pixels and (use_small_map_convs(fast, gemm_pixels) or any(
            isinstance(m, SmallMapConv2d) for m in fast.modules())):
        steps.append("small_map_gemm")
    for conv in fast.modules():  # without the GEMM path, a model tuned for bf16 training leaves its convs to oneDNN
        if not gemm_pixels and isinstance(conv, SmallMapConv2d):
            conv.max_pixels = 0
    wrapped: nn.Module = InferenceModel(fast, precision, channels_last, steps).eval()
    if compile:
        wrapped = compile_module(wrapped)
        steps.append("compile")
    return wrapped
