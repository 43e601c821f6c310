"""The check of :mod:`vggnet.use.export`: the exported bytes, loaded back in their own runtime, against the eager
model on real images (:func:`check_images_of`), preprocessed as in training.

It measures the max absolute logit error, the relative error (max abs / max |eager logit|) and top-1 agreement, at
the training size and, for an ``any_size`` export, at a larger size too (:func:`check_sizes`). It passes when the
relative error is at most the tolerance (default :data:`DEFAULT_TOLERANCE`, fp32 against fp32) and every image whose
top-1 class changed had an eager top-2 margin below the max abs error (a tie the rounding may break).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vggnet.base.errors import DataError
from vggnet.store.card import LoadedModel
from vggnet.use.export_formats import RANDOM_SEED, ExportError, InputSpec, first_line
from vggnet.data import Preprocess
from vggnet.evaluation.testset import load_test_set

#: Default relative tolerance: max |exported - eager| / max |eager| over the check images, fp32 against fp32.
DEFAULT_TOLERANCE = 1e-4
#: Test-set images checked for a run directory; random images when there are no real ones.
CHECK_IMAGES, RANDOM_IMAGES = 256, 8
#: Images per call when the batch is dynamic.
CHECK_BATCH = 32


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
        raise ExportError(f"the exported file fails on a {tuple(x.shape[1:])} input: {first_line(err)}; nothing "
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


__all__ = ["CHECK_BATCH", "CHECK_IMAGES", "DEFAULT_TOLERANCE", "RANDOM_IMAGES", "ExportCheck", "SizeCheck",
           "check_export", "check_images_of", "check_sizes", "compare", "random_images"]
