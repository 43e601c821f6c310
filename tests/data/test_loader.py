"""BatchLoader: exact coverage, deterministic epochs, disjoint equal rank shards."""

import pytest
import torch

from vggnet.data import BatchLoader, ImageDataset
from vggnet.base.errors import ConfigError


def numbered(n):
    """Image i is filled with i % 256 and labelled i: batches reveal which samples they hold."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageDataset(images, torch.arange(n), [str(i) for i in range(n)], "numbered")


def epoch_labels(loader):
    return torch.cat([labels for _, labels in loader]).tolist()


def test_every_index_once_per_epoch():
    loader = BatchLoader(numbered(103), batch_size=10, shuffle=True, seed=1)
    assert len(loader) == 11
    batches = list(loader)
    assert len(batches) == 11 and [len(y) for _, y in batches] == [10] * 10 + [3]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(103)) and seen.tolist() != list(range(103))
    for images, labels in batches:  # images travel with their labels
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images[:, 0, 0, 0].long(), labels % 256)


def test_drop_last_and_no_shuffle():
    loader = BatchLoader(numbered(25), batch_size=10, shuffle=False, drop_last=True)
    assert len(loader) == 2
    assert epoch_labels(loader) == list(range(20))


def test_epochs_differ_and_repeat_for_same_seed():
    ds = numbered(50)
    a = BatchLoader(ds, batch_size=8, shuffle=True, seed=3)
    b = BatchLoader(ds, batch_size=8, shuffle=True, seed=3)
    first = epoch_labels(a)
    assert epoch_labels(a) == first  # no set_epoch: same order
    a.set_epoch(1)
    second = epoch_labels(a)
    assert second != first and sorted(second) == sorted(first)
    b.set_epoch(1)
    assert epoch_labels(b) == second
    assert epoch_labels(BatchLoader(ds, batch_size=8, shuffle=True, seed=4)) != first


@pytest.mark.parametrize("n, world", [(103, 2), (100, 4), (7, 3)])
def test_rank_shards_disjoint_equal_and_cover_trimmed_order(n, world):
    ds = numbered(n)
    loaders = [BatchLoader(ds, batch_size=4, shuffle=True, seed=9, rank=r, world_size=world) for r in range(world)]
    for loader in loaders:
        loader.set_epoch(5)
    shards = [epoch_labels(loader) for loader in loaders]
    usable = n - n % world
    assert all(len(s) == usable // world for s in shards)
    assert len({len(loader) for loader in loaders}) == 1
    union = [i for s in shards for i in s]
    assert len(set(union)) == usable  # disjoint
    order = loaders[0].epoch_order().tolist()
    assert len(order) == usable and set(union) == set(order)
    # Step i of the ranks together is the i-th global batch of the trimmed order, rank r holding its r-th slice.
    steps = list(zip(*[[labels.tolist() for _, labels in loader] for loader in loaders]))
    assert [i for step in steps for batch in step for i in batch] == order
    assert all(len({len(batch) for batch in step}) == 1 for step in steps)


@pytest.mark.parametrize("n, world, per_rank", [(103, 2, 8), (100, 4, 5), (64, 2, 16)])
def test_ranks_together_draw_the_batches_of_one_process_with_the_global_batch(n, world, per_rank):
    ds = numbered(n)
    single = BatchLoader(ds, batch_size=per_rank * world, shuffle=True, drop_last=True, seed=2)
    ranks = [BatchLoader(ds, batch_size=per_rank, shuffle=True, drop_last=True, seed=2, rank=r, world_size=world)
             for r in range(world)]
    for loader in [single, *ranks]:
        loader.set_epoch(3)
    expected = [labels.tolist() for _, labels in single]
    assert all(len(loader) == len(expected) for loader in ranks)
    for i, step in enumerate(zip(*ranks)):
        assert [j for _, labels in step for j in labels.tolist()] == expected[i]


def test_bad_arguments():
    ds = numbered(4)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        BatchLoader(ds, batch_size=0, shuffle=False)
    with pytest.raises(ConfigError, match=r"rank must be in \[0, world_size\)"):
        BatchLoader(ds, batch_size=1, shuffle=False, rank=2, world_size=2)
