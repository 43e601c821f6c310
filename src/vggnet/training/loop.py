"""The training loop: :func:`fit` reads top to bottom (epochs of steps, then evaluation and a checkpoint).

The hot loop has no per-sample Python: uint8 batches are sliced from in-memory tensors, preprocessed and augmented
as whole batches, and run in channels_last with bf16 autocast where the CPU supports bf16 natively. It has no
per-step host synchronisation of its own: the loss and accuracy sums and the non-finite-loss flag accumulate on the
device and are read every :data:`SYNC_STEPS` steps, at the end of an epoch and before a stop saves.

fp16 (CUDA only) runs with a gradient scaler (``Run.scaler``): the loss is multiplied by the scale before
``backward`` so that small gradients do not underflow to 0 in fp16, and the gradients are divided by it again
before clipping and the step. A step whose gradients hold an inf or NaN (the scale was too high) is skipped and the
scale halved; that is normal, not divergence: only a non-finite loss raises :class:`TrainingDiverged`. The scale is
checkpointed, so a resumed run continues with it. (``GradScaler.step`` reads its inf flag on the host: one wait for
the GPU per fp16 step that PyTorch imposes on optimizers without fused AMP support, such as the foreach SGD here.)

Selection: with a validation split (``--val-split``) the best checkpoint and the plateau schedule follow the
validation accuracy; the test set is evaluated after every epoch and only reported.

Signals: SIGINT/SIGTERM set a flag that a single process checks after each step; under torchrun the ranks vote on
it (a collective, so all ranks stop at the same step) only at the sync points, every :data:`SYNC_STEPS` steps and at
the epoch's last batch, so that no step waits for the others. The state is then saved and :class:`Interrupted`
raised, and ``--resume`` continues bit-identically, mid-epoch too.

A time budget (``--budget``): when the measured epoch times predict that the next epoch would end past it
(:class:`vggnet.training.deadline.Deadline`), the current epoch is the last: evaluated (with its test-time
augmentation), saved and reported as the run's end, and the result says ``stopped_by_budget``.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from vggnet.base.errors import ConfigError, VggnetError
from vggnet.evaluation.metrics import EvalResult
from vggnet.store.checkpoint import RunState
from vggnet.base.schedule import Plateau, lr_factor
from vggnet.training.build import Run
from vggnet.training.deadline import session_deadline
from vggnet.training.state import load_state, rng_state, save_epoch, save_state


#: The plots (curves.png, confusion.png) are redrawn after an epoch only when the last drawing is this many seconds
#: old, and always after the last epoch and before a stop: drawing them takes 0.3-1 s, which on a GPU is a 15-epoch
#: run's largest cost after the training itself (issue 12).
PLOT_SECONDS = 30.0
#: Steps between two reads of the device's running sums (the progress bar's refresh; divergence is caught there)
#: and, under torchrun, between two stop votes.
SYNC_STEPS = 10


class TrainingDiverged(VggnetError):
    """The loss became NaN or infinite."""


class Interrupted(VggnetError):
    """SIGINT or SIGTERM arrived; the state was saved for --resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[dict]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step or votes on at sync points (main thread
    only)."""
    flag: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        flag["signum"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------------------ one step
def learning_rate(run: Run, state: RunState) -> float:
    factor = lr_factor(run.config.schedule, state.step, run.total_steps, run.warmup_steps)
    return run.config.lr * factor * state.plateau["scale"]


def seed_epoch(run: Run, epoch: int, saved_rng: tuple | None = None) -> None:
    """Seed every random source from (seed, epoch, rank), or restore ``saved_rng`` when resuming mid-epoch."""
    run.loader.set_epoch(epoch)
    if saved_rng is not None:
        cpu_rng, aug_rng, cuda_rng = saved_rng
        torch.set_rng_state(cpu_rng)
        run.generator.set_state(aug_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, run.runtime.device)
        return
    base = run.config.seed * 1_000_003 + epoch * 7919 + run.dist.rank
    torch.manual_seed(base)
    run.generator.manual_seed(base + 1)


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a uint8 batch; returns the (0-dim) loss and number of correct predictions.

    With ``run.scaler`` (fp16) the step goes through the gradient scaler and is skipped when a gradient is not
    finite. The network must be in training mode (``run.net.train()``)."""
    x = run.augment(run.preprocess(images), run.generator)
    if run.runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for group in run.optimizer.param_groups:  # a group's lr_scale: --loaded-lr-scale for loaded layers, else 1
        group["lr"] = lr * group.get("lr_scale", 1.0)
    with run.runtime.autocast():
        logits = run.net(x)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=run.config.label_smoothing)
    run.optimizer.zero_grad(set_to_none=True)
    scaler = run.scaler
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(run.optimizer)  # the true gradients for --grad-clip (and the inf check, on the device)
    if run.config.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    if scaler is None:
        run.optimizer.step()
    else:
        scaler.step(run.optimizer)  # skipped when a gradient is inf or NaN
        scaler.update()  # halve the scale after a skip, double it after growth_interval good steps (on the device)
    return loss.detach(), (logits.detach().argmax(1) == labels).sum()


# ----------------------------------------------------------------------------------------------------- the loop
def fit(run: Run, resume: bool = False) -> dict[str, Any]:
    """Train ``run`` to ``config.epochs`` (from its saved state with ``resume``); returns the result summary."""
    config, dist = run.config, run.dist
    board = TensorBoard(run) if config.tensorboard and dist.is_main else None  # fails before any file is written
    if resume:
        state, history, saved_rng = load_state(run)
    else:
        state, history, saved_rng = RunState(plateau=Plateau(patience=config.plateau_patience).to_dict()), [], None
        if dist.is_main:
            run.rundir.create(run.saved_config)
    deadline = session_deadline(config, history, state.seconds, resume, run.rundir)  # None without --budget
    last_plots, cut = time.monotonic(), False
    with stop_on_signals() as stop:
        for epoch in range(state.epoch, config.epochs):
            train_epoch(run, state, history, epoch, stop, saved_rng)
            saved_rng = None
            # rank 0's clock decides for every rank (a collective under torchrun, like the stop votes)
            cut = epoch + 1 < config.epochs and deadline is not None and dist.broadcast_object(
                deadline.last_epoch(state.seconds))
            record, val, test = end_epoch(run, state, epoch, last=cut)
            if deadline is not None:
                record["budget_seconds"] = round(deadline.elapsed(), 3)
            history.append(record)
            best = val is not None and val.top1 > state.best_acc
            if best:
                state.best_acc = val.top1
            if config.schedule == "plateau":
                plateau = Plateau(**state.plateau)
                plateau.update(val.top1)
                state.plateau = plateau.to_dict()
            stopping = dist.stop_requested(stop["signum"])  # a collective, like the votes at the sync points
            if dist.is_main:
                now = time.monotonic()
                plots = stopping or cut or epoch + 1 == config.epochs or now - last_plots >= PLOT_SECONDS
                save_epoch(run, state, history, test, best, plots)
                last_plots = now if plots else last_plots
                if board is not None:
                    board.log(record)
                if config.progress:
                    print(epoch_line(record, config.epochs), flush=True)
            if deadline is not None:
                deadline.epoch_saved()
            if cut and not stopping:
                if dist.is_main:
                    print(deadline.stop_message(epoch + 1, config.epochs), file=sys.stderr, flush=True)
                break
            if stopping:
                signum = stop["signum"] or signal.SIGTERM
                raise Interrupted(f"stopped by {signal.Signals(signum).name} after epoch {epoch + 1}; resume with "
                                  f"vggnet train --resume {run.rundir}", signum)
    if board is not None:
        board.close()
    return summary(run, state, history, cut)


def summary(run: Run, state: RunState, history: list[dict[str, Any]], stopped_by_budget: bool) -> dict[str, Any]:
    """:func:`fit`'s result: the run directory, the final scores and epochs, the history."""
    final = history[-1] if history else {}
    result = {"run_dir": str(run.rundir), "test_acc": final.get("test_acc"), "epochs": state.epoch,
              "history": history}
    if "test_acc_tta" in final:
        result["test_acc_tta"] = final["test_acc_tta"]
    if run.val_set is not None:
        result["val_acc"] = final.get("val_acc")
        result["best_val_acc"] = state.best_acc
    if stopped_by_budget:
        result["stopped_by_budget"] = True
    return result


def train_epoch(run: Run, state: RunState, history: list[dict[str, Any]], epoch: int, stop: dict,
                saved_rng: tuple | None = None) -> None:
    """The steps of one epoch (from batch ``state.batch`` when resuming mid-epoch), with a progress bar."""
    from tqdm.auto import tqdm

    dist, loader = run.dist, run.loader
    run.net.train()
    seed_epoch(run, epoch, saved_rng if state.batch > 0 else None)
    ranks = dist.world_size
    bar = tqdm(total=len(loader) * loader.batch_size * ranks, initial=state.seen, unit="img", unit_scale=True,
               desc=f"epoch {epoch + 1}/{run.config.epochs}", dynamic_ncols=True,
               disable=None if run.config.progress and dist.is_main else True)  # None: terminals only
    start = time.perf_counter() - state.seconds
    # The running sums and the divergence flag live on the device: a step never waits for the GPU; the host reads
    # them every SYNC_STEPS steps (the progress bar), at the end of the epoch and before a stop saves (sync_sums).
    sums = torch.tensor([state.loss_sum, float(state.correct)], dtype=torch.float64, device=run.runtime.device)
    diverged = torch.zeros((), dtype=torch.bool, device=run.runtime.device)
    synced_step = state.step
    # Resuming mid-epoch: the batches before state.batch were already trained on, and are not even computed.
    for i, (images, labels) in enumerate(loader.iterate(state.batch), start=state.batch):
        loss, correct = train_step(run, images, labels, learning_rate(run, state))
        state.step += 1
        n = labels.numel()
        sums += torch.stack((loss.double() * n, correct.double()))  # the same float64 sums as on the host
        diverged |= ~torch.isfinite(loss)
        state.seen += n * ranks
        state.batch = i + 1
        state.seconds = time.perf_counter() - start
        bar.update(n * ranks)
        at_sync = i % SYNC_STEPS == 0 or state.batch == len(loader)
        # Under torchrun a collective, so every rank votes at the same sync points; alone, the local flag every step.
        stopping = (at_sync or not dist.enabled) and dist.stop_requested(stop["signum"])
        if stopping or at_sync:
            if run.threads is not None:
                run.threads.poll()  # the CPU thread count follows the other processes' load
            sync_sums(run, state, sums, diverged, epoch, synced_step)
            synced_step = state.step
            bar.set_postfix(loss=f"{state.loss_sum / (state.seen / ranks):.3f}",
                            acc=f"{state.correct / (state.seen / ranks):.3f}", lr=f"{learning_rate(run, state):.3g}")
        if stopping:
            bar.close()
            sums = dist.all_reduce([state.loss_sum, float(state.correct)])  # rank 0 saves the global sums
            state.loss_sum, state.correct = sums[0], int(sums[1])
            save_state(run, state, history, dist.gather_rng(rng_state(run)))
            signum = stop["signum"] or signal.SIGTERM
            raise Interrupted(f"stopped by {signal.Signals(signum).name} at epoch {epoch + 1}, batch {state.batch}/"
                              f"{len(loader)}; state saved: resume with vggnet train --resume {run.rundir}", signum)
    bar.close()


def sync_sums(run: Run, state: RunState, sums: torch.Tensor, diverged: torch.Tensor, epoch: int,
              since_step: int) -> None:
    """Read the device's running sums into ``state`` (one host synchronisation), or raise TrainingDiverged when a
    loss since the last read was not finite (before anything is saved: the last checkpoint stays the good one)."""
    if bool(diverged):
        kept = (f"the last good checkpoint (epoch {state.epoch}) is kept in {run.rundir}" if state.epoch else
                "no checkpoint was saved yet")
        raise TrainingDiverged(f"the loss became nan or inf at epoch {epoch + 1}, between steps {since_step + 1} and "
                               f"{state.step}: lower --lr (now {run.config.lr}) or set --grad-clip; {kept}")
    loss_sum, correct = sums.tolist()
    state.loss_sum, state.correct = loss_sum, int(correct)


def evaluate(run: Run, dataset, tta: str | None = None) -> EvalResult:
    """``dataset`` scored by the model (under torchrun every rank scores a share and gets the whole result)."""
    return run.dist.evaluate(run.model, dataset, run.preprocess, run.runtime.precision, run.config.eval_batch_size,
                             run.runtime.channels_last, run.config.progress, tta=tta, threads=run.threads,
                             small_maps=run.runtime.small_map_convs)


def end_epoch(run: Run, state: RunState, epoch: int, last: bool = False
              ) -> tuple[dict[str, Any], EvalResult | None, EvalResult]:
    """The epoch's record (train sums over ranks, validation and test scores); resets the running sums. The final
    epoch (``epochs``, or ``last``: the budget's last) is also scored with the run's test-time augmentation."""
    sums = run.dist.all_reduce([state.loss_sum, float(state.correct)])
    seen = state.seen
    val = evaluate(run, run.val_set) if run.val_set is not None else None
    test = evaluate(run, run.test_set)
    record = {"epoch": epoch + 1, "train_loss": sums[0] / seen, "train_acc": sums[1] / seen}
    if val is not None:
        record.update(val_loss=val.loss, val_acc=val.top1, val_top5=val.top5)
    record.update(test_loss=test.loss, test_acc=test.top1, test_top5=test.top5, lr=learning_rate(run, state),
                  epoch_seconds=state.seconds,
                  train_images_per_second=seen / state.seconds if state.seconds else float("nan"), step=state.step,
                  threads=torch.get_num_threads())
    if run.config.tta and (last or epoch + 1 == run.config.epochs):  # the final model, also with TTA
        tta = evaluate(run, run.test_set, run.config.tta)
        record.update(test_loss_tta=tta.loss, test_acc_tta=tta.top1, test_top5_tta=tta.top5)
    state.epoch, state.batch, state.loss_sum, state.correct, state.seen, state.seconds = epoch + 1, 0, 0.0, 0, 0, 0.0
    return record, val, test


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    val = (f" | val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}%" if "val_acc" in record
           else "")
    return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} acc "
            f"{100 * record['train_acc']:.2f}%{val} | test loss {record['test_loss']:.4f} acc "
            f"{100 * record['test_acc']:.2f}% | {record['train_images_per_second']:.0f} img/s, "
            f"{record['epoch_seconds']:.1f} s")


# ------------------------------------------------------------------------------------------- files (rank 0 only)
class TensorBoard:
    """TensorBoard scalars per epoch in ``RUN/tensorboard`` (``--tensorboard``; needs the tensorboard extra)."""

    def __init__(self, run: Run) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'vggnet[tensorboard]' (in a "
                              "clone of vggnet: pip install -e '.[tensorboard]')") from None
        self.writer = SummaryWriter(str(run.rundir.tensorboard))  # creates the run directory too

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
