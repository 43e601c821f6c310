"""The compressed layer types and the record that rebuilds a compressed VGG: what loading needs.

:class:`LowRankLinear` (an SVD-factored Linear), :class:`Int8Linear` (int8 weights, per-channel float32 scales,
torch's x86 dynamic-int8 kernel on the CPU), :class:`Compression` (model.json's ``compression`` record),
:func:`restructure` (replace a VGG's classifier layers by the recorded shapes before its weights load) and
:func:`stored_dtypes` (which tensors the file holds as float16). How a model is compressed and measured is the verb's
(:mod:`vggnet.use.compress`); docs/COMPRESSION.md has the method and the measurements.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vggnet.base.errors import CheckpointError, ConfigError
from vggnet.net.models import VGG

#: Classifier Linear layers by name: index in ``model.classifier``, per head (a dense head has none).
FC_LAYERS = {"classic": {"fc6": 0, "fc7": 3, "fc8": 6}, "fitted": {"fc6": 0, "fc7": 3, "fc8": 6},
             "gap": {"fc": 1}, "dense": {}}
#: The quantized engines whose dynamic-int8 linear kernel :class:`Int8Linear` uses.
INT8_ENGINES = ("x86", "fbgemm")
#: Largest int8 code of the symmetric weight quantisation (-127..127; -128 is not used).
QMAX = 127
#: The one deprecation warning of torch 2.13's quantized-tensor constructors, suppressed where Int8Linear uses them.
_QTENSOR_DEPRECATION = re.escape("torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor "
                                 "creation functions")


# ------------------------------------------------------------------------------------------------------ modules
class LowRankLinear(nn.Module):
    """``second(first(x))``: a rank-``rank`` Linear layer, ``first`` in -> rank without bias, ``second`` rank -> out
    with the bias. :meth:`from_linear` makes it the best rank-r approximation of an ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int, spectrum: "Spectrum | None" = None) -> "LowRankLinear":
        """The best rank-``rank`` approximation of ``linear`` (:func:`low_rank_factors`; ``spectrum``: its
        :func:`weight_spectrum` if already computed), in the layer's dtype."""
        first, second = low_rank_factors(linear.weight, rank, spectrum)
        weight = linear.weight
        with torch.device("meta"):  # no initialisation (nor random numbers) for values about to be overwritten
            layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None)
        layer = layer.to_empty(device=weight.device).to(weight.dtype)
        layer.first.weight.copy_(first)
        layer.second.weight.copy_(second)
        if linear.bias is not None:
            layer.second.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @torch.no_grad()
    def dense_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The effective (out, in) weight ``second @ first`` (multiplied in float64, returned in float32) and the
        bias: what :func:`vggnet.to_dense` puts into its convolution."""
        (w1, _), (w2, bias) = dense_weight(self.first), dense_weight(self.second)
        return (w2.double() @ w1.double()).float(), bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass
class Spectrum:
    """The singular values of an (out, in) weight W and the singular vectors of its shorter side."""

    values: torch.Tensor  # all min(out, in) singular values, descending, float64
    vectors: torch.Tensor  # (m, m) float64: left singular vectors of W (m = out), or right ones (m = in) if transposed
    transposed: bool  # out > in: the vectors are W^T's left singular vectors


@torch.no_grad()
def weight_spectrum(weight: torch.Tensor) -> Spectrum:
    """Singular values and vectors of ``weight`` from the eigendecomposition of its Gram matrix ``W W^T`` (over the
    shorter side), in float64: the same U and s as the SVD (within 2e-14 of s_1 on VGG-16's fc6), and 5x faster than
    ``torch.linalg.svd`` there (124 s against 669 s on the 2-core AVX2 machine of docs/COMPRESSION.md). Squaring
    costs resolution at the bottom of the spectrum only: singular values below about 1e-7 of the largest are not
    resolved, and no truncation keeps those; the energy fractions are exact to about 1e-12."""
    w = weight.detach().double()
    transposed = w.shape[0] > w.shape[1]
    if transposed:
        w = w.T
    eigenvalues, vectors = torch.linalg.eigh(w @ w.T)  # ascending
    return Spectrum(eigenvalues.flip(0).clamp_min(0).sqrt(), vectors.flip(1), transposed)


@torch.no_grad()
def low_rank_factors(weight: torch.Tensor, rank: int, spectrum: Spectrum | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first (rank, in), second (out, rank))`` in float64 with ``second @ first = U_r U_r^T W``, the best rank-r
    approximation ``U_r diag(s_r) V_r^T`` (Eckart-Young), each factor carrying sqrt(s_i) (rows of ``first`` and
    columns of ``second`` of norm sqrt(s_i); the product does not depend on that balance, so singular values too
    small to divide by are floored)."""
    spectrum = spectrum if spectrum is not None else weight_spectrum(weight)
    w = weight.detach().double()
    w = w.T if spectrum.transposed else w
    u = spectrum.vectors[:, :rank]
    floor = max(spectrum.values[0].item() * 1e-6, 1e-300)
    root = spectrum.values[:rank].clamp_min(floor).sqrt()
    left, right = u * root, (u.T @ w) / root[:, None]  # left @ right = u u^T w
    return (left.T, right.T) if spectrum.transposed else (right, left)


def int8_backend() -> str | None:
    """The quantized engine :class:`Int8Linear` runs on (``x86`` or ``fbgemm``), or None when torch has neither, or
    lacks the ops that pack and run it (their quantized-tensor input is deprecated in torch 2.13: a later torch
    may drop it; int8 runs then still load and compute, on the dequantised path)."""
    engines = torch.backends.quantized.supported_engines
    if not (hasattr(torch, "_make_per_channel_quantized_tensor") and hasattr(torch.ops.quantized, "linear_dynamic")
            and hasattr(torch.ops.quantized, "linear_prepack")):
        return None
    return next((e for e in INT8_ENGINES if e in engines), None)


def check_int8_backend() -> str:
    engine = int8_backend()
    if engine is None:
        raise ConfigError(f"--int8 needs torch's x86/fbgemm dynamic-int8 kernels, but this torch has the quantized "
                          f"backends {torch.backends.quantized.supported_engines} only (backend missing): use an x86 "
                          "build of torch, or compress without --int8")
    return engine


def quantize_symmetric(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 of an (out, in) weight, in float32: ``scale = max|w_row| / 127`` (1 for an
    all-zero row), ``q = round(w / scale)`` (half to even) in -127..127. Returns ``(q int8, scale float32)``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version counter
        return -1


class Int8Linear(nn.Module):
    """A Linear layer with an int8 (out, in) ``weight``, a float32 per-output-channel ``scale`` and a float ``bias``
    (all buffers: the layer is for inference), computing ``x @ (weight * scale)^T + bias``.

    On the CPU, for float32 or bfloat16 input, it runs torch's fbgemm/x86 dynamic-int8 kernel
    (``torch.ops.quantized.linear_dynamic``, activations quantised per call to 7-bit codes): VGG-16's fc6-fc8 ran
    2.6x faster than in fp32 at batch 1 on one thread of a busy AVX2 CPU, fc6 alone 4-6x on an idle one
    (docs/COMPRESSION.md). Its weight is packed once (``linear_prepack``) and cached outside the state dict; the cache
    is rebuilt when a buffer changes (``.to()``, ``load_state_dict``) and dropped by ``copy.deepcopy``. Otherwise --
    another device, ``use_kernel = False``, a tensor that needs a gradient, ONNX export, ``torch.jit`` tracing or
    scripting, ``torch.compile``, ``torch.export`` -- it computes ``F.linear(x, weight.float() * scale, bias)`` in
    float32: exact dequantised weights, unquantised activations. Output has the input's dtype.

    Deprecation status in torch 2.13: ``torch.ao.quantization``'s Python front end (``quantize_dynamic`` and
    friends, not used here) warns that it is deprecated in favour of torchao; the quantized tensor types
    (``torch.qint8``), which ``linear_prepack`` takes, warn that their constructors will be removed
    (pytorch/pytorch#184982) -- that one warning is silenced here, where a quantized tensor is built only to pack
    the weight; the ops ``quantized::linear_prepack`` and ``quantized::linear_dynamic`` themselves do not warn. The
    files do not depend on any of it (plain int8 and float32 tensors): without the ops (:func:`int8_backend` is
    None) a run still loads and computes, on the dequantised path. torchao's int8 CPU path and
    ``aten._weight_int8pack_mm`` were measured slower than fp32 on an AVX2 CPU and are not used.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        self.use_kernel = True  # False: always the dequantised float32 path (for comparisons)
        self._packed: Any = None
        self._packed_key: tuple | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """The symmetric per-channel quantisation of ``linear`` (:func:`quantize_symmetric`); the bias is kept as
        float32."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, scale = quantize_symmetric(linear.weight)
        layer.weight, layer.scale = q, scale
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer.to(linear.weight.device)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_packed"], state["_packed_key"] = None, None  # a packed weight is a C++ object: rebuilt on use
        return state

    @torch.no_grad()
    def dense_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dequantised (out, in) float32 weight and the float32 bias (see :func:`vggnet.to_dense`)."""
        bias = self.bias.float() if self.bias is not None else None
        return self.weight.float() * self.scale.float()[:, None], bias

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return (self.use_kernel and x.device.type == "cpu" and self.weight.device.type == "cpu"
                and x.dtype in (torch.float32, torch.bfloat16)
                and not (torch.is_grad_enabled() and x.requires_grad)
                and not (torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting()
                         or torch.compiler.is_compiling() or torch.compiler.is_exporting())
                and int8_backend() is not None)

    def _packed_weight(self) -> Any:
        tensors = (self.weight, self.scale) + ((self.bias,) if self.bias is not None else ())
        key = tuple((t.data_ptr(), _version(t), t.dtype) for t in tensors)
        if self._packed is None or self._packed_key != key:
            engine = check_int8_backend()
            previous = torch.backends.quantized.engine
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_QTENSOR_DEPRECATION, category=UserWarning)
                try:
                    if previous not in INT8_ENGINES:
                        torch.backends.quantized.engine = engine
                    zero = torch.zeros(self.out_features, dtype=torch.long)
                    qweight = torch._make_per_channel_quantized_tensor(self.weight, self.scale.double(), zero, 0)
                    bias = self.bias.float() if self.bias is not None else None
                    self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
                finally:
                    torch.backends.quantized.engine = previous
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel(x):
            flat = x.reshape(-1, self.in_features).float().contiguous()
            y = torch.ops.quantized.linear_dynamic(flat, self._packed_weight(), True)  # reduce_range on x86
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        weight, bias = self.dense_weight()
        return F.linear(x.float(), weight, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, per-channel scale"


def dense_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The effective (out, in) weight and bias of a classifier layer: an ``nn.Linear``'s own, or a compressed
    layer's ``dense_weight()``."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias
    return layer.dense_weight()


# ------------------------------------------------------------------------------------------------------ record
@dataclass(frozen=True)
class Compression:
    """What was done to a model, as recorded under ``compression`` in its ``model.json``."""

    svd: dict[str, int] = field(default_factory=dict)  # layer name -> rank of its LowRankLinear
    svd_energy: float | None = None  # the energy fraction the ranks were chosen by (None: given by hand)
    int8: bool = False  # every classifier Linear (SVD factors included) is an Int8Linear
    half: bool = False  # floating tensors are float16 on disk (int8 scales float32), float32 when loaded
    source: str | None = None  # what was compressed (for the reader; not used to load)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "model.json") -> "Compression":
        known = list(cls.__dataclass_fields__)
        if not isinstance(d, dict):
            raise CheckpointError(f"{where} is corrupt: compression must be an object with keys {', '.join(known)}")
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise CheckpointError(f"{where} records a compression this vggnet does not know ({', '.join(unknown)}; "
                                  f"known: {', '.join(known)}): use the vggnet version that wrote it")
        svd, energy = d.get("svd", {}), d.get("svd_energy")
        checks = [(isinstance(svd, dict) and all(isinstance(k, str) and _is_count(v) for k, v in svd.items()),
                   "svd must map layer names to positive ranks"),
                  (energy is None or (isinstance(energy, (int, float)) and 0 < energy <= 1),
                   "svd_energy must be a fraction in (0, 1]"),
                  (isinstance(d.get("int8", False), bool) and isinstance(d.get("half", False), bool),
                   "int8 and half must be true or false"),
                  (d.get("source") is None or isinstance(d.get("source"), str), "source must be a string")]
        for ok, message in checks:
            if not ok:
                raise CheckpointError(f"{where} is corrupt: compression {message}")
        return cls(**d)

    def describe(self) -> str:
        parts = []
        if self.svd:
            ranks = ",".join(f"{k}={v}" for k, v in self.svd.items())
            parts.append(f"svd {ranks}" + (f" (energy {self.svd_energy:g})" if self.svd_energy is not None else ""))
        parts += [name for name, on in (("int8", self.int8), ("half", self.half)) if on]
        return ", ".join(parts) or "none"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def fc_layers(model: VGG) -> dict[str, int]:
    """The classifier's FC layers by name (fc6/fc7/fc8, or fc for the gap head): index in ``model.classifier``."""
    return dict(FC_LAYERS.get(model.head, {}))


def restructure(model: VGG, record: Compression) -> VGG:
    """Replace ``model``'s classifier layers, in place, by the compressed modules ``record`` describes, with
    placeholder values (build it on the meta device, then load the weights). Returns ``model``."""
    names = fc_layers(model)
    for name, rank in record.svd.items():
        if name not in names:
            raise CheckpointError(f"compression names layer {name!r}, which a {model.head} head does not have "
                                  f"(it has {', '.join(names) or 'no FC layers'})")
        linear = model.classifier[names[name]]
        if rank > min(linear.in_features, linear.out_features):
            raise CheckpointError(f"compression gives {name} rank {rank}, more than its "
                                  f"{linear.out_features}x{linear.in_features} weight has")
        model.classifier[names[name]] = LowRankLinear(linear.in_features, linear.out_features, rank,
                                                      linear.bias is not None)
    if record.int8:
        if not names:
            raise CheckpointError(f"compression says int8, but a {model.head} head has no FC layers")
        replace_linears(model.classifier, lambda lin: Int8Linear(lin.in_features, lin.out_features,
                                                                  lin.bias is not None))
    return model


def replace_linears(module: nn.Module, make) -> None:
    """Replace every ``nn.Linear`` below ``module`` (at any depth) by ``make(linear)``."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            replace_linears(child, make)


def stored_dtypes(model: nn.Module, record: Compression) -> dict[str, torch.dtype]:
    """State-dict key -> dtype in the weights file, for the keys stored in another dtype than the model's: with
    ``half``, every float32 tensor except Int8Linear scales is float16 on disk."""
    if not record.half:
        return {}
    scales = {f"{name}.scale" for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    return {k: torch.float16 for k, v in model.state_dict().items() if v.dtype == torch.float32 and k not in scales}
