"""CPU-bf16 speed-ups that keep the numbers: what training applies to a model trained in bf16 on the CPU
(:func:`tune_for_cpu_bf16`, called by :func:`vggnet.training.build_run` where :func:`vggnet.runtime.uses_cpu_bf16_path`
says so), and what :func:`vggnet.evaluation.inference.optimize_for_inference` builds on.

1. **Small-map convolutions as one GEMM** (:class:`SmallMapConv2d`). oneDNN's bf16 convolution kernels
   (AMX/AVX512-BF16) are fast on large maps but lose most of their speed on maps of a few pixels, where VGG spends a
   large share of its FLOPs at CIFAR/Fashion-MNIST sizes (the 4x4 and 2x2 maps of VGG-11 at 32x32). For a 3x3
   kernel with padding 1 the whole layer is ``cols (B*H*W, 9*Cin) @ W (9*Cin, Cout)``; ``cols`` is nine shifted
   copies of the zero-padded NHWC input, small exactly when the map is small. Measured on the 2-core AMX Xeon,
   batch 128, forward + backward of a 512->512 conv on a 2x2 map: oneDNN about 60 GFLOP/s, the GEMM about 250
   (one thread; ``vggnet bench --only profile`` has the sweep, docs/BENCHMARKS.md the table).
2. **Out-of-place ReLU** (:func:`out_of_place_relus`): in torch 2.13 an in-place ReLU on a large bf16 tensor is
   about 2x slower than writing a new one, and in training it saves nothing (BN does not keep its output).
3. **Max-pool before ReLU** (:func:`pool_before_relu`): ``maxpool(relu(x)) == relu(maxpool(x))`` exactly, and the
   gradients are equal too (both route the gradient to the same first maximum; where the maximum is <= 0 both
   give 0), so the ReLU in front of a 2x2 max-pool runs, forward and backward, on a quarter of the values.

:class:`SmallMapConv2d` is an ``nn.Conv2d`` (same parameters, same state-dict keys, same results up to rounding)
that takes the GEMM path only when all of these hold, and otherwise calls ``nn.Conv2d.forward``:

- kernel 3x3, stride 1, padding 1, dilation 1, one group, zero padding;
- the input is on the CPU and its map has at most 4 pixels (2x2), or at most ``max_pixels`` (16: 4x4) pixels
  and ``in_channels * out_channels >= MIN_CHANNEL_PRODUCT`` (at 4x4 oneDNN still wins for narrow layers);
- the arithmetic is bf16: CPU autocast to bf16 is on, or input and weight are already bf16.

fp32 inputs always take the ordinary oneDNN path, so fp32 results are unchanged. The backward pass is explicit:
``dW = dY^T @ cols``, ``db = sum(dY)``, and ``dX`` is the same GEMM convolution of ``dY`` with the flipped,
transposed kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Largest map (H * W pixels) that takes the GEMM path: 4x4. Measured on the 2-core AMX Xeon (forward + backward,
#: bf16, batch 128-256, 2 threads; docs/BENCHMARKS.md): at 8x8 and larger oneDNN is 1.3-4x faster than the GEMM;
#: at 4x4 the GEMM wins from 128->128 channels up (512->512: 2.2x) and is within noise of oneDNN below; at 2x2 it
#: wins at every width (2-4.7x).
DEFAULT_MAX_PIXELS = 16
#: Maps of at most this many pixels take the GEMM path whatever the width.
ALWAYS_PIXELS = 4
#: Between ALWAYS_PIXELS and max_pixels, the GEMM path needs in_channels * out_channels at least this.
MIN_CHANNEL_PRODUCT = 128 * 128
#: The rule's numbers, as the probes' cache keys hold them: a changed rule is measured again.
SMALL_MAP_RULE = (ALWAYS_PIXELS, DEFAULT_MAX_PIXELS, MIN_CHANNEL_PRODUCT)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> contiguous (B, H, W, C); free when ``x`` is channels_last."""
    x = x.permute(0, 2, 3, 1)
    return x if x.is_contiguous() else x.contiguous()


def im2col3x3(x: torch.Tensor) -> torch.Tensor:
    """NHWC (B, H, W, C) -> (B*H*W, 9*C): the 3x3 neighbourhoods (zero padding 1), taps in (kh, kw) order."""
    b, h, w, c = x.shape
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    s = padded.stride()
    windows = padded.as_strided((b, h, w, 3, 3, c), (s[0], s[1], s[2], s[1], s[2], s[3]))
    return windows.reshape(b * h * w, 9 * c)


def is_plain_3x3(conv: nn.Conv2d) -> bool:
    """A 3x3 conv with stride 1, zero padding 1, dilation 1 and one group: the convs the GEMM path computes."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def small_map(conv: nn.Conv2d, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether a bf16 CPU input of ``height`` x ``width`` pixels takes the GEMM path of ``conv`` as a
    :class:`SmallMapConv2d` with ``max_pixels`` (the rule of the module docstring; ``max_pixels`` 0: never)."""
    pixels = height * width
    return (pixels <= max_pixels and is_plain_3x3(conv)
            and (pixels <= ALWAYS_PIXELS or conv.in_channels * conv.out_channels >= MIN_CHANNEL_PRODUCT))


class _GemmConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        out_c = weight.shape[0]
        cols = im2col3x3(_nhwc(x))
        w_mat = weight.permute(0, 2, 3, 1).reshape(out_c, 9 * c)  # [co, (kh, kw, ci)]
        out = torch.addmm(bias, cols, w_mat.t()) if bias is not None else cols @ w_mat.t()
        ctx.save_for_backward(cols, weight)
        ctx.has_bias = bias is not None
        ctx.in_shape = (b, c, h, w)
        return out.view(b, h, w, out_c).permute(0, 3, 1, 2)  # a channels_last view

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cols, weight = ctx.saved_tensors
        b, c, h, w = ctx.in_shape
        out_c = weight.shape[0]
        g = _nhwc(grad_out.to(cols.dtype))
        g_mat = g.view(b * h * w, out_c)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            # A contiguous dY^T makes this GEMM about 1.7x faster than passing the transposed view.
            grad_w = (g_mat.t().contiguous() @ cols).view(out_c, 3, 3, c).permute(0, 3, 1, 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_mat.sum(0, dtype=torch.float32).to(g_mat.dtype)
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3).permute(2, 3, 0, 1).reshape(9 * out_c, c)  # [(kh, kw, co), ci]
            grad_x = (im2col3x3(g) @ flipped).view(b, h, w, c).permute(0, 3, 1, 2)
        return grad_x, grad_w, grad_b


def gemm_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A plain 3x3 convolution (stride 1, zero padding 1) as one GEMM, with its explicit backward, whatever the map
    size (:class:`SmallMapConv2d` decides when to use it; the bench's sweep calls it directly)."""
    return _GemmConv3x3.apply(x, weight, bias)


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs 3x3 bf16 convolutions on maps of at most ``max_pixels`` pixels as one GEMM."""

    max_pixels: int = DEFAULT_MAX_PIXELS

    def _gemm_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        if x.device.type != "cpu" or x.dim() != 4 or not small_map(self, x.shape[-2], x.shape[-1], self.max_pixels):
            return None
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            return torch.bfloat16
        if x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16:
            return torch.bfloat16
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._gemm_dtype(x)
        if dtype is None:
            return super().forward(x)
        bias = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast("cpu", enabled=False):
            return _GemmConv3x3.apply(x.to(dtype), self.weight.to(dtype), bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, max_pixels: int = DEFAULT_MAX_PIXELS) -> "SmallMapConv2d":
        """A SmallMapConv2d sharing ``conv``'s parameter tensors (no copy; optimizers keep working)."""
        new = cls.__new__(cls)
        new.__dict__ = conv.__dict__.copy()
        new._parameters = dict(conv._parameters)
        new._buffers = dict(conv._buffers)
        new._modules = dict(conv._modules)
        new.max_pixels = max_pixels
        return new


def rewrite_pairs(model: nn.Module, match, replace, skip: tuple[type, ...] = ()) -> int:
    """In every ``nn.Sequential`` of ``model``, in place: for each layer ``a`` and the next layer ``b`` after any
    layers of the types in ``skip``, where ``match(a, b)``, put ``replace(a, b)`` (a new pair) in their places.
    Returns the number of rewritten pairs."""
    rewritten = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            j = i + 1
            while j < len(seq) and isinstance(seq[j], skip):
                j += 1
            if j < len(seq) and match(seq[i], seq[j]):
                seq[i], seq[j] = replace(seq[i], seq[j])
                rewritten += 1
    return rewritten


class MaxPoolReLU(nn.MaxPool2d):
    """``relu(max_pool2d(x))``: equal to ``max_pool2d(relu(x))`` in value and gradient, on 1/4 of the values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d) -> "MaxPoolReLU":
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)


def pool_before_relu(model: nn.Module) -> int:
    """In every ``nn.Sequential``: ``ReLU``, ``MaxPool2d`` -> ``Identity``, :class:`MaxPoolReLU`, in place.

    Returns the number of rewritten pairs. The model's outputs and gradients do not change; the output of the
    replaced ReLU position (e.g. ``forward_named(["relu1_1"])``) becomes the pre-ReLU values, so use this on a
    model being trained, not on one whose intermediate maps are read.
    """
    return rewrite_pairs(
        model, lambda relu, pool: type(relu) is nn.ReLU and type(pool) is nn.MaxPool2d and not pool.return_indices,
        lambda relu, pool: (nn.Identity(), MaxPoolReLU.from_pool(pool)))


def out_of_place_relus(model: nn.Module) -> int:
    """Make every ``nn.ReLU(inplace=True)`` of ``model`` out of place; returns how many.

    In torch 2.13 on the CPU an in-place ReLU on a large bf16 tensor is about 2x slower than writing a new one
    (``clamp_min_`` 10.7 ms vs ``relu`` 4.7 ms for 8M values, one thread), and in training nothing is saved: BN does
    not keep its output for backward, so the BN output is freed as soon as the ReLU has read it.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.ReLU) and module.inplace:
            module.inplace = False
            changed += 1
    return changed


def small_map_layers(model: nn.Module, shape: tuple[int, ...]) -> int:
    """How many convolutions of ``model`` would take the small-map GEMM path in bf16 at the input ``shape``
    (:func:`small_map`, for the convolutions :func:`use_small_map_convs` swaps): one fp32 forward pass of one
    image in eval mode without gradients, its maps' sizes read on the way; the model is left as it was (its mode
    restored; eval mode updates no batch-norm statistics)."""
    hits: list[bool] = []
    handles = [m.register_forward_pre_hook(lambda conv, args: hits.append(
        args[0].dim() == 4 and small_map(conv, args[0].shape[-2], args[0].shape[-1])))
        for m in model.modules() if type(m) is nn.Conv2d]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape[1:]), device=next(model.parameters()).device))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return sum(hits)


def tune_for_cpu_bf16(model: nn.Module, small_map_convs: bool = True) -> dict[str, int]:
    """What training does to a model that trains in bf16 on the CPU, in place: the same
    parameters, state-dict keys, outputs and gradients (up to bf16 rounding in the GEMM convs). Returns counts.
    ``small_map_convs``: False leaves every convolution to oneDNN (precision ``auto``'s training probe measures both
    and records the faster, :mod:`vggnet.training.probe`); the other two speed-ups are made either way."""
    return {"small_map_convs": use_small_map_convs(model) if small_map_convs else 0,
            "pool_before_relu": pool_before_relu(model), "out_of_place_relus": out_of_place_relus(model)}


def use_small_map_convs(model: nn.Module, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Swap every plain 3x3 stride-1 padding-1 ``nn.Conv2d`` in ``model`` for a :class:`SmallMapConv2d` in place.

    Parameters are shared, so call this before or after building the optimizer. Returns the number of swapped
    layers. Which call takes the GEMM path is decided per call from the input (see the module docstring).
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and is_plain_3x3(child):
                setattr(parent, name, SmallMapConv2d.from_conv(child, max_pixels))
                swapped += 1
    return swapped
