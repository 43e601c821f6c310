"""A validation set held out of the training set: deterministic and stratified (every class keeps its share)."""

from __future__ import annotations

import torch

from vggnet.base.errors import ConfigError

#: The hold-out is drawn with this seed whatever the training seed, so runs with different seeds validate on the
#: same images.
SPLIT_SEED = 20141409


def stratified_holdout(labels: torch.Tensor, n: int, num_classes: int,
                       seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, held_out)`` index tensors (each sorted) with ``len(held_out) == n``.

    Class ``c`` gives ``n * count_c / N`` images, rounded by largest remainder (ties to the lower class index), so
    the held-out class shares equal the training set's to within one image per class.
    """
    total = len(labels)
    if not 1 <= n < total:
        raise ConfigError(f"--val-split {n}: must hold out at least 1 and fewer than the {total} training images")
    labels = labels.to(torch.int64).cpu()
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    quota = [n * c // total for c in counts]  # integer arithmetic: remainders compare exactly
    by_remainder = sorted(range(num_classes), key=lambda c: (-(n * counts[c] % total), c))
    for c in by_remainder[:n - sum(quota)]:
        quota[c] += 1
    generator = torch.Generator().manual_seed(seed)
    held = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        held.append(members[torch.randperm(len(members), generator=generator)[:quota[c]]])
    held_out = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.int64)
    mask = torch.ones(total, dtype=torch.bool)
    mask[held_out] = False
    return torch.nonzero(mask).flatten(), held_out
