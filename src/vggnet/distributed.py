"""The process group, from torchrun's environment when there is one; a no-op single process otherwise.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) :func:`setup` joins the process group (gloo on
CPU, nccl on CUDA), and :class:`Dist` wraps the model in DistributedDataParallel and all-reduces metrics. Only
rank 0 logs, draws progress bars and writes files (the trainer checks ``is_main``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import ConfigError

# How long a collective may wait for a missing rank before the job fails with an error instead of hanging.
TIMEOUT = timedelta(seconds=float(os.environ.get("VGGNET_DIST_TIMEOUT", "120")))


@dataclass
class Dist:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module, sync_bn: bool = False) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def all_reduce(self, values: list[float]) -> list[float]:
        """Sum ``values`` over ranks (identity for one process)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def stop_requested(self, local_signum: int | None) -> bool:
        """True on every rank when any rank was asked to stop (so all stop at the same step)."""
        if not self.enabled:
            return False
        return self.all_reduce([1.0 if local_signum is not None else 0.0])[0] > 0


def setup(device: str = "auto") -> Dist:
    """Join the torchrun process group if this process was launched by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    import torch.distributed as tdist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return Dist(True, rank, world, local, dev)


def is_main_process() -> bool:
    import torch.distributed as tdist

    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0
