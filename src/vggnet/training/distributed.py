"""The process group, from torchrun's environment when there is one; a no-op single process otherwise.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) :func:`setup` joins the process group (gloo on
CPU, nccl on CUDA, one GPU per local rank), and :class:`Dist` wraps the model in DistributedDataParallel,
all-reduces metrics and evaluates on a share of the test set per rank. Nothing here is home-made communication:
DDP averages the gradients, torch.distributed's collectives do the rest. Only rank 0 logs, draws progress bars and
writes files (the trainer checks ``is_main``). See docs/DISTRIBUTED.md.

Failure behaviour: a rank that dies closes its sockets, so the others fail in their next collective at once; a
rank that hangs makes the others fail after ``VGGNET_DIST_TIMEOUT`` seconds. :func:`peer_failures` turns either
into a :class:`PeerLost` error with a one-line message, and torchrun then stops the remaining processes and
names the rank that failed first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from vggnet.base.errors import ConfigError, VggnetError
from vggnet.runtime import GPU_HOST_THREADS, available_cores
from vggnet.evaluation.metrics import evaluate, metrics_from_logits, predict_logits
from vggnet.store.rundir import RunDir

# Seconds a collective waits for a missing rank before the job fails instead of hanging. It must be longer than
# the longest stretch one rank works alone while the others wait: rank 0 writing checkpoints and plots at the end
# of an epoch. Override with $VGGNET_DIST_TIMEOUT (seconds).
DEFAULT_TIMEOUT_S = 120.0


def timeout() -> timedelta:
    """The collective timeout: ``$VGGNET_DIST_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT_S`."""
    text = os.environ.get("VGGNET_DIST_TIMEOUT", "")
    if not text:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ConfigError(f"VGGNET_DIST_TIMEOUT must be a positive number of seconds, got {text!r}")
    return timedelta(seconds=seconds)


class PeerLost(VggnetError):
    """Another process of the distributed job died or stopped answering."""


@dataclass
class Dist:
    """This process's place in the job. ``Dist()`` is a single process: every method is then a no-op."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def default_threads(self) -> int | None:
        """Intra-op threads when none were asked for: this machine's cores shared among its ranks, at most
        :data:`~vggnet.runtime.GPU_HOST_THREADS` beside a GPU (None alone)."""
        if not self.enabled:
            return None
        share = max(1, available_cores() // self.local_world_size)
        return min(GPU_HOST_THREADS, share) if self.device.type == "cuda" else share

    def wrap(self, model: torch.nn.Module, sync_bn: bool = False) -> torch.nn.Module:
        """DistributedDataParallel around ``model`` (which keeps its parameters: optimizers built on it still work).

        DDP broadcasts rank 0's parameters and buffers now and averages gradients over ranks in ``backward``.
        """
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if sync_bn:
            if self.device.type != "cuda":
                raise ConfigError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on the CPU): "
                                  "leave it out on the CPU, where each process normalises over its own share of the "
                                  "batch")
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
        """True on every rank when any rank was asked to stop (so all stop at the same step).

        A collective: under torchrun every rank must call it at the same point, whatever its own flag says.
        """
        if not self.enabled:
            return local_signum is not None
        return self.all_reduce([1.0 if local_signum is not None else 0.0])[0] > 0

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. the default run directory, which holds a timestamp)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """``[rank 0's obj, rank 1's obj, ...]`` on every rank (small things only: RNG states)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_rng(self, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The other ranks' RNG ``states`` as ``{name/rankR: state}`` (a collective; empty for one process).

        Rank 0 saves its own under the plain names, so a state file reads the same with or without torchrun.
        """
        if not self.enabled:
            return {}
        gathered = self.gather_objects({name: state.cpu() for name, state in states.items()})
        return {f"{name}/rank{r}": state for r, d in enumerate(gathered) if r for name, state in d.items()}

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        Without SyncBatchNorm each rank updates its running statistics from its own share of the batch; DDP
        broadcasts rank 0's at the start of every forward, but after an epoch's last step they differ until then.
        """
        if self.enabled:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def evaluate(self, model: torch.nn.Module, dataset, preprocess, precision: str, batch_size: int | None,
                 channels_last: bool = True, progress: bool = False, tta: str | None = None, threads=None,
                 small_maps: bool = True):
        """Every rank scores a contiguous share of ``dataset`` with rank 0's weights; all get the whole result.

        The same :class:`~vggnet.evaluation.metrics.EvalResult` as a single process would compute (every sample counts once),
        on every rank, so decisions taken from it (plateau schedule, best checkpoint) agree across ranks.
        ``threads``: a single process's :class:`~vggnet.runtime.AdaptiveThreads`, polled before each batch (ranks
        share the cores by rank and never adapt). ``small_maps``: in bf16 on the CPU, the small-map GEMM path
        (:func:`vggnet.evaluation.metrics.predict_logits`).
        """
        if not self.enabled:  # on the model's own device (a single process may use any one)
            device = next(model.parameters()).device
            return evaluate(model, dataset, preprocess, device, precision, batch_size, tta=tta,
                            channels_last=channels_last, progress=progress, threads=threads, small_maps=small_maps)
        self.sync_buffers(model)
        n, k = len(dataset), len(dataset.classes)
        lo, hi, share = eval_share(n, self.rank, self.world_size)
        padded = torch.zeros(share, k, device=self.device)
        if hi > lo:
            logits = predict_logits(model, dataset.images[lo:hi], preprocess, self.device, precision, batch_size,
                                    tta=tta, channels_last=channels_last, progress=progress and self.is_main,
                                    small_maps=small_maps)
            padded[:hi - lo] = logits.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        return metrics_from_logits(torch.cat(parts)[:n].cpu(), dataset.labels, k, dataset.classes)


def eval_share(n: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """``(lo, hi, share)``: rank ``rank`` scores samples ``lo:hi``, at most ``share = ceil(n / world_size)``.

    Shares are contiguous and in rank order; only the last ones are short (or empty), so the all-gathered,
    ``share``-padded blocks hold the ``n`` real rows first.
    """
    share = -(-n // world_size)
    return min(n, rank * share), min(n, (rank + 1) * share), share


def env_rank() -> int:
    """This process's global rank from torchrun's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup(device: str = "auto") -> Dist:
    """Join the torchrun process group if this process was launched by torchrun (idempotent)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    import torch.distributed as tdist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but no CUDA device is available")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda and local >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local} has no GPU of its own: this machine has {torch.cuda.device_count()}; "
                          "start at most that many processes per node (--nproc-per-node)")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout())
    return Dist(True, rank, world, local, local_world, dev)


def teardown(in_step: bool = False) -> None:
    """Leave the process group (if this process joined one).

    ``in_step``: every rank got here at the same point (a finished or voted-to-stop run), so they first meet at a
    barrier: no rank closes its connections while a peer's last collective may still be sending to it."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        if in_step:
            tdist.barrier()
        tdist.destroy_process_group()


# What gloo and NCCL say when a peer is gone: "Connection reset by peer", "Connection closed by peer", "Timed out
# waiting 5000ms for recv operation", "Watchdog caught collective operation timeout: WorkNCCL(...)".
_PEER_SIGNS = ("connection reset", "connection closed", "broken pipe", "timed out", "gloo", "nccl", "socket")


def is_peer_failure(err: BaseException) -> bool:
    """True for the errors a collective raises when another rank died or hung (inside a process group only)."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return False
    if isinstance(err, getattr(tdist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(sign in str(err).lower() for sign in _PEER_SIGNS)


def _short(err: BaseException) -> str:
    """The gist of a gloo/nccl error: no source location, no advice paragraph."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # [/path/to/pair.cc:537]
    return text.split(". This is typically")[0].rstrip(".")


@contextmanager
def peer_failures(run_dir: Callable[[], str | Path | None]) -> Iterator[None]:
    """Turn a collective's failure into :class:`PeerLost`, naming this rank, the cause and how to go on.

    ``run_dir()`` gives the run directory (known only once training has started) for the resume hint.
    """
    try:
        yield
    except Exception as err:
        if not is_peer_failure(err):
            raise
        import torch.distributed as tdist

        rank, world = tdist.get_rank(), tdist.get_world_size()
        directory = run_dir()

        if directory and RunDir(directory).has_state():
            hint = (f"the last checkpoint is in {directory}: continue with torchrun ... -m vggnet train --resume "
                    f"{directory}")
        else:
            hint = "no checkpoint was written yet"
        raise PeerLost(
            f"rank {rank} of {world} lost contact with the other processes ({_short(err)}): another rank died, or "
            f"did not answer within {timeout().total_seconds():g} s ($VGGNET_DIST_TIMEOUT); torchrun's summary names "
            f"the rank that failed first (its own error, if it printed one, is above); {hint}") from err
