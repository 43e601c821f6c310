"""The paper's test protocols (:mod:`vggnet.evaluation.multiscale`) on a prepared (streamed) test set, as the paper
defines them (section 3.2): every test image decoded from its own encoded bytes with its smallest side rescaled to
``Q`` (:class:`vggnet.data.paper.TestTransform` with ``crop=None``: Pillow's bilinear filter, antialiased when
shrinking, the longer side ``int(Q * long / short)``), whole and, in general, not square.

- **dense**: the fully convolutional net on the whole ``H x W`` rescaled image (its shorter side ``Q``), the
  class-score map averaged over space;
- **multi-crop**: the grid of ``S x S`` crops (``S`` the model's training size, ``preprocess.image_size``), the rows'
  offsets evenly spaced from 0 to ``H - S`` and the columns' from 0 to ``W - S``
  (:func:`~vggnet.evaluation.multiscale.crop_grid`);
- flips, the weights of the views and the average over views and scales (in log space) are the in-memory
  evaluation's own: :func:`~vggnet.evaluation.multiscale.scale_views` and
  :func:`~vggnet.evaluation.multiscale.log_mean`.

The pixels are normalised as the model's preprocessing normalises them (:func:`normalise`: channel order, mean, std),
but neither fitted to ``S`` nor centre-cropped: ``fit`` and ``crop_fraction`` (a streamed run's 224-of-256 centre
crop) describe the single-scale test, and these protocols take the whole rescaled image.

Work: images go in chunks of ``batch_size`` (default :func:`~vggnet.evaluation.metrics.auto_batch_size` at ``S x S``).
``threads`` threads decode a chunk's images at every scale (Pillow releases the GIL), the next chunk's while this one
is evaluated. At each scale the images of a chunk that have the same shape go through the nets together; an image
of a shape of its own goes alone, its views (the crops and mirrors) sharing passes of up to ``batch_size`` inputs.

An in-memory test set is not affected: :func:`~vggnet.evaluation.multiscale.evaluate_multiscale` rescales its square
images as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from vggnet.base.errors import InputSizeError
from vggnet.data.paper import TestTransform
from vggnet.data.stream import StreamedDataset, StreamedSplit
from vggnet.evaluation.metrics import EvalResult, auto_batch_size
from vggnet.evaluation.multiscale import Protocol, log_mean, protocol_nets, result_from_log_probs, scale_views
from vggnet.runtime import AdaptiveThreads, available_cores


def is_streamed(dataset) -> bool:
    """Whether ``dataset`` is a prepared set's split (what :func:`vggnet.evaluation.testset.load_test_set` returns
    for a prepared directory), which :func:`evaluate_multiscale_streamed` evaluates."""
    return isinstance(dataset, (StreamedDataset, StreamedSplit))


def normalise(x: torch.Tensor, preprocess) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` of any ``H x W`` -> float32, normalised as ``preprocess`` normalises (its channel order,
    pixels scaled to [0, 1], ``(x - mean) / std``): the same operations, without its fit and centre crop."""
    if x.shape[1] != preprocess.channels:
        raise InputSizeError(f"the preprocessing was set up for {preprocess.channels} channel(s), the images have "
                             f"{x.shape[1]}: decode them with the model's channel count")
    if preprocess.channel_order == "bgr":
        x = x.flip(1)
    x = x.to(torch.float32).div_(255.0)
    mean = torch.tensor(preprocess.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def evaluate_multiscale_streamed(model: torch.nn.Module, dataset: StreamedDataset | StreamedSplit, preprocess,
                                 protocol: Protocol, device: torch.device | str = "cpu", precision: str = "fp32",
                                 batch_size: int | None = None, progress: bool = False, channels_last: bool = True,
                                 threads: int | None = None, adaptive: AdaptiveThreads | None = None,
                                 small_maps: bool = True) -> EvalResult:
    """:func:`~vggnet.evaluation.multiscale.evaluate_multiscale` on a prepared set's split (a
    :class:`~vggnet.data.stream.StreamedDataset` from ``load_test_set``, or a
    :class:`~vggnet.data.stream.StreamedSplit`), every image decoded from its bytes at every scale (module docstring).
    ``threads``: decoding threads (default: the available cores); ``adaptive``: polled before each chunk, so the
    network's CPU thread count follows the load (``Runtime.adaptive``); ``small_maps``: as for
    :func:`vggnet.evaluation.metrics.predict_logits`."""
    split = dataset.images.split if isinstance(dataset, StreamedDataset) else dataset
    log_probs = streamed_log_probs(model, split, preprocess, protocol, device, precision, batch_size, channels_last,
                                   progress, threads, adaptive, small_maps)
    return result_from_log_probs(log_probs, split.labels, list(split.classes))


@torch.no_grad()
def streamed_log_probs(model: torch.nn.Module, split: StreamedSplit, preprocess, protocol: Protocol,
                       device: torch.device | str = "cpu", precision: str = "fp32", batch_size: int | None = None,
                       channels_last: bool = True, progress: bool = False, threads: int | None = None,
                       adaptive: AdaptiveThreads | None = None, small_maps: bool = True) -> torch.Tensor:
    """Float32 ``(N, classes)``: log of the class probabilities averaged as ``protocol`` says for the images of
    ``split``, in its order. ``model`` runs in eval mode and is put back in its own mode after."""
    device = torch.device(device)
    size = preprocess.image_size
    channels = int(getattr(model, "in_channels", preprocess.channels))
    out = []
    with protocol_nets(model, preprocess, protocol, device, precision, channels_last, small_maps) as nets:
        bar = tqdm(total=len(split), unit="img", unit_scale=True, desc="eval", disable=None if progress else True,
                   leave=False)
        try:
            for decoded in _decoded_chunks(split, protocol.scales, channels, batch_size or auto_batch_size(size, size),
                                           threads or available_cores()):
                if adaptive is not None:
                    adaptive.poll()  # the CPU thread count follows the other processes' load
                views = [[] for _ in decoded]  # per image: its log-probabilities (K,) of every view of every scale
                weights = [[] for _ in decoded]  # and their weights
                for s in range(len(protocol.scales)):
                    for members in _same_shape([image[s] for image in decoded]):
                        x = normalise(torch.stack([decoded[i][s] for i in members]).to(device), preprocess)
                        more, shares = scale_views(nets, x, size, protocol, batch_size, channels_last, together=True)
                        for j, i in enumerate(members):
                            views[i] += [view[j] for view in more]
                            weights[i] += shares
                out += [log_mean(torch.stack(v)[:, None], w) for v, w in zip(views, weights)]
                bar.update(len(decoded))
        finally:
            bar.close()
    return torch.cat(out) if out else torch.zeros(0, 0)


def _same_shape(images: list[torch.Tensor]) -> list[list[int]]:
    """The positions of ``images`` grouped by shape, groups in the order of their first image."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return list(groups.values())


def _decoded_chunks(split: StreamedSplit, scales: tuple[int, ...], channels: int, chunk: int,
                    threads: int) -> Iterator[list[list[torch.Tensor]]]:
    """The images of ``split``, ``chunk`` at a time, each as its uint8 ``(channels, H, W)`` at every one of
    ``scales`` (``TestTransform(scale=Q, crop=None)``: one read of its bytes, one decode per scale), decoded by
    ``threads`` threads; the next chunk is decoded while the caller works on this one."""
    transforms = [TestTransform(scale=q, crop=None, channels=channels) for q in scales]

    def one(i: int) -> list[torch.Tensor]:
        data, _, name = split.sample(i)
        return [transform(data, name) for transform in transforms]

    n = len(split)
    pool = ThreadPoolExecutor(max(1, threads))
    try:
        ahead = [pool.submit(one, i) for i in range(min(chunk, n))]
        for start in range(0, n, chunk):
            current = ahead
            ahead = [pool.submit(one, i) for i in range(start + chunk, min(start + 2 * chunk, n))]
            yield [future.result() for future in current]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
