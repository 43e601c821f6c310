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
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError, OutputError
from .models import VGG

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
        _replace_linears(model.classifier, lambda lin: Int8Linear(lin.in_features, lin.out_features,
                                                                  lin.bias is not None))
    return model


def _replace_linears(module: nn.Module, make) -> None:
    """Replace every ``nn.Linear`` below ``module`` (at any depth) by ``make(linear)``."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _replace_linears(child, make)


def stored_dtypes(model: nn.Module, record: Compression) -> dict[str, torch.dtype]:
    """State-dict key -> dtype in the weights file, for the keys stored in another dtype than the model's: with
    ``half``, every float32 tensor except Int8Linear scales is float16 on disk."""
    if not record.half:
        return {}
    scales = {f"{name}.scale" for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    return {k: torch.float16 for k, v in model.state_dict().items() if v.dtype == torch.float32 and k not in scales}


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
        """``source_card`` (a :class:`vggnet.rundir.ModelCard`) with this compression recorded: save it with the model
        (:func:`vggnet.rundir.save_model`) and the run loads as compressed."""
        return replace(source_card, compression=self.record.to_dict())


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
        _replace_linears(out.classifier, Int8Linear.from_linear)
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
    ``warmup`` calls each (the bench's harness, :func:`vggnet.bench.timing.interleaved`), on the current intra-op
    thread count."""
    from functools import partial

    from .bench.timing import interleaved

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
    """``out`` must not exist, or be an empty folder."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        kind = "folder that is not empty" if out.is_dir() else "file"
        raise OutputError(f"--out {out} is a {kind}: vggnet compress writes a new run directory; give a new path "
                          "or an empty folder")
    return out


def _test_set(loaded, source: Path, dataset: str | None, data_dir: str | None):
    """The test set to measure accuracy on, as ``vggnet eval`` picks it (None and a note when there is none)."""
    from .evaluation import check_fits, load_test_set

    card, is_run = loaded.card, loaded.run_dir is not None
    if not dataset and not (is_run and card.dataset):
        what = "the run's model.json names no dataset" if is_run else "a weights file has no dataset of its own"
        return None, None, f"n/a: {what} (give --dataset)"
    name = dataset or card.dataset
    test = load_test_set(loaded, name, data_dir)
    check_fits(test, loaded.model, name, source)
    return name, test, ""


def _weights_bytes(loaded, source: Path, weights: str) -> int:
    from .rundir import RunDir

    return (RunDir(source).weights(weights) if loaded.run_dir is not None else source).stat().st_size


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
    the CPU with ``threads`` intra-op threads (default: the current count; the SVD and the evaluation always run on
    the current count), the median of ``rounds`` interleaved runs."""
    from .evaluation import evaluate as run_eval
    from .rundir import load as load_run
    from .rundir import save_model
    from .source import load

    out, source = check_out(out), Path(source)
    loaded = load(source, weights, "cpu", model=model)
    loaded.require_head(source, "compress")
    if loaded.card.compression is not None:
        raise ConfigError(f"{source} is already compressed ({Compression.from_dict(loaded.card.compression).describe()}"
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
        accuracy = {}
        if test is not None:
            for label, net in (("original", loaded.model), ("compressed", reloaded)):
                accuracy[label] = run_eval(net, test, loaded.preprocess, "cpu", "fp32", batch_size,
                                           progress=progress).top1
        shape = (1, loaded.model.in_channels, *loaded.model.input_size)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads or previous)
        try:
            times = latency({"original": loaded.model, "compressed": reloaded}, shape, rounds)
        finally:
            torch.set_num_threads(previous)
        rows = {label: Measurement(label, size, parameter_count(net), accuracy.get(label),
                                   statistics.median(times[label]))
                for label, size, net in (("original", _weights_bytes(loaded, source, weights), loaded.model),
                                         ("compressed", (tmp / "model.safetensors").stat().st_size, reloaded))}
        if out.exists():
            out.rmdir()  # an empty folder (check_out), replaced by the finished run
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompressReport(out, done.record, done.layers, rows["original"], rows["compressed"],
                          threads or torch.get_num_threads(), rounds, name, 0 if test is None else len(test.labels),
                          note)


__all__ = ["Compressed", "Compression", "CompressReport", "Int8Linear", "LayerRank", "LowRankLinear", "Measurement",
           "check_int8_backend", "compress_model", "compress_run", "dense_weight", "energy_rank", "fc_layers",
           "int8_backend", "latency", "low_rank_factors", "parameter_count", "parse_ranks", "quantize_symmetric",
           "restructure", "Spectrum", "stored_dtypes", "weight_spectrum"]
