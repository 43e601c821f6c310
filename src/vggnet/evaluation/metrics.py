"""Evaluation: top-1 / top-5, per-class accuracy and the confusion matrix, over a whole dataset."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vggnet.evaluation.inference import optimize_for_inference
from vggnet.runtime import AdaptiveThreads, autocast, compile_module, uses_cpu_bf16_path


@dataclass
class EvalResult:
    """Counts and fractions for one pass over a dataset (accuracies are fractions in [0, 1])."""

    n: int
    loss: float
    top1: float
    top5: float
    per_class: list[float]
    confusion: list[list[int]]  # confusion[true][predicted]
    classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "loss": self.loss, "top1": self.top1, "top5": self.top5, "per_class": self.per_class,
                "per_class_named": dict(zip(self.classes, self.per_class)), "confusion": self.confusion,
                "classes": self.classes}


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        classes: list[str] | None = None, loss: float | None = None) -> EvalResult:
    """Top-1/top-5/per-class/confusion from a (N, K) score matrix; top-5 becomes top-K when K < 5."""
    labels = labels.to(torch.int64).cpu()
    logits = logits.float().cpu()
    n = labels.numel()
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    pred = topk[:, 0]
    top1 = (pred == labels).sum().item()
    top5 = (topk == labels[:, None]).any(dim=1).sum().item()
    confusion = torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    support = confusion.sum(dim=1)
    per_class = [confusion[c, c].item() / support[c].item() if support[c] else float("nan") for c in range(num_classes)]
    if loss is None:
        loss = F.cross_entropy(logits, labels, reduction="mean").item() if n else float("nan")
    return EvalResult(n, loss, top1 / max(n, 1), top5 / max(n, 1), per_class, confusion.tolist(),
                      list(classes or [str(c) for c in range(num_classes)]))


#: Pixels per evaluation batch when no batch size is given: 16 images at 224x224 (about 400 MiB of fp32
#: activations for VGG-16), capped at :data:`MAX_EVAL_BATCH` images for small ones.
EVAL_PIXELS = 16 * 224 * 224
#: On the default model at 32x32 batches of 256-512 evaluate fastest on the CPU (1024: 1.6x slower).
MAX_EVAL_BATCH = 256
#: On a GPU: 4x the pixels and up to 1024 images a batch (a GPU needs large batches to be busy; its memory holds them).
GPU_EVAL_SCALE, MAX_GPU_EVAL_BATCH = 4, 1024


def auto_batch_size(height: int, width: int, device: torch.device | str = "cpu") -> int:
    """Evaluation batch for images of ``height`` x ``width``: on the CPU 256 at 32x32, 196 at 64x64, 16 at 224x224;
    on a GPU 1024, 784 and 64."""
    pixels, cap = EVAL_PIXELS, MAX_EVAL_BATCH
    if torch.device(device).type == "cuda":
        pixels, cap = GPU_EVAL_SCALE * EVAL_PIXELS, MAX_GPU_EVAL_BATCH
    return max(1, min(cap, pixels // max(1, height * width)))


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, preprocess, device: torch.device,
                   precision: str = "fp32", batch_size: int | None = None, tta: str | None = None,
                   channels_last: bool = True, progress: bool = False, compile: bool = False,
                   threads: AdaptiveThreads | None = None, small_maps: bool = True) -> torch.Tensor:
    """Float32 logits for uint8 ``images`` (N, C, H, W), in batches (default :func:`auto_batch_size`);
    ``tta="flip"`` averages with the mirror. ``model`` runs in eval mode and is put back in its own mode after.
    ``threads``: polled before every batch, so the CPU thread count follows the other processes' load
    (:attr:`vggnet.runtime.Runtime.adaptive`; None: the count stays as it is).
    ``compile``: the network is ``torch.compile``d first (on the CPU the folded copy below, in fp32 or bf16); the
    first batch then pays the compilation. ``small_maps``: in bf16 on the CPU, small maps take the GEMM path
    (:class:`vggnet.runtime.Runtime`'s ``small_map_convs``; False: oneDNN for every convolution).

    In bf16 on the CPU the batches run through :func:`vggnet.evaluation.inference.optimize_for_inference` (a folded, fused
    bf16 copy of ``model``; about 2x faster than autocast on the default model and 6x on VGG-16) instead of under
    autocast; the logits agree with autocast's to bf16 rounding.
    """
    was_training = model.training
    model.eval()
    batch_size = batch_size or auto_batch_size(*images.shape[-2:], device)
    net, mixed = inference_form(model, device, precision, channels_last, compile, small_maps)
    try:
        return _logits(net, images, preprocess, device, batch_size, mixed, tta, channels_last, progress, threads)
    finally:
        model.train(was_training)  # the caller's model leaves in the mode it came in


def inference_form(model: torch.nn.Module, device: torch.device, precision: str, channels_last: bool = True,
                   compile: bool = False, small_maps: bool = True
                   ) -> tuple[torch.nn.Module, contextlib.AbstractContextManager]:
    """The network evaluation runs and the context it runs under: in bf16 on the CPU (or compiled there) the folded,
    fused copy of :func:`vggnet.evaluation.inference.optimize_for_inference` with no autocast; elsewhere ``model``
    (compiled with ``compile``) under :func:`vggnet.runtime.autocast`. The one choice of plain and multi-scale
    evaluation alike. ``small_maps``: whether the bf16 copy's small maps take the GEMM path."""
    if device.type == "cpu" and (compile or uses_cpu_bf16_path(device, precision)):
        net = optimize_for_inference(model, "bf16" if uses_cpu_bf16_path(device, precision) else "fp32",
                                     channels_last, compile=compile, small_maps=small_maps)
        return net, contextlib.nullcontext()
    return (compile_module(model) if compile else model), autocast(device, precision)


def preprocessed_batches(images: torch.Tensor, preprocess, device: torch.device, batch_size: int,
                         progress: bool, threads: AdaptiveThreads | None = None) -> Iterator[torch.Tensor]:
    """``images`` (uint8, on any device) preprocessed on ``device`` in batches of ``batch_size``, with a progress
    bar (drawn only on a terminal) when ``progress``: the one batched loop of every evaluation. ``threads`` is
    polled before each batch (:meth:`vggnet.runtime.AdaptiveThreads.poll`)."""
    bar = tqdm(total=len(images), unit="img", unit_scale=True, desc="eval", disable=None if progress else True,
               leave=False)
    try:
        for start in range(0, len(images), batch_size):
            if threads is not None:
                threads.poll()  # the CPU thread count follows the other processes' load
            x = preprocess(images[start:start + batch_size].to(device, non_blocking=True))
            yield x
            bar.update(len(x))
    finally:
        bar.close()


def _logits(model, images, preprocess, device, batch_size, mixed, tta, channels_last, progress,
            threads) -> torch.Tensor:
    out = []
    for x in preprocessed_batches(images, preprocess, device, batch_size, progress, threads):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with mixed:
            logits = model(x).float()
            if tta == "flip":
                logits = (logits.softmax(1) + model(x.flip(3)).float().softmax(1)).div_(2).log_()
        out.append(logits)  # kept on the device: one transfer at the end, not a host wait per batch
    return torch.cat(out).cpu() if out else torch.zeros(0, 0)


def evaluate(model: torch.nn.Module, dataset, preprocess, device: torch.device | str = "cpu",
             precision: str = "fp32", batch_size: int | None = None, tta: str | None = None,
             channels_last: bool = True, progress: bool = False, compile: bool = False,
             threads: AdaptiveThreads | None = None, small_maps: bool = True) -> EvalResult:
    """Evaluate ``model`` on a whole :class:`~vggnet.data.ImageDataset` (``threads``, ``small_maps`` as for
    :func:`predict_logits`)."""
    device = torch.device(device)
    logits = predict_logits(model, dataset.images, preprocess, device, precision, batch_size, tta, channels_last,
                            progress, compile, threads, small_maps)
    return metrics_from_logits(logits, dataset.labels, len(dataset.classes), dataset.classes)
