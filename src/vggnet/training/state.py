"""What a checkpoint of the training loop holds and how a run resumes from it: the state's tensors (model,
optimizer, RNG) and record (counters, history, gradient scaler), committed through the run directory
(:meth:`vggnet.store.rundir.RunDir.commit`), and loaded back exactly."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from vggnet.base.errors import CheckpointError
from vggnet.base.files import optimizer_from_tensors, optimizer_to_tensors
from vggnet.evaluation.metrics import EvalResult
from vggnet.store.card import ModelCard
from vggnet.store.checkpoint import Checkpoint, RunState
from vggnet.training.build import Run


def epoch_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """The metrics a model card carries for the weights of the epoch of ``record``."""
    keys = ("epoch", "val_acc", "val_top5", "val_loss", "test_acc", "test_top5", "test_loss", "test_acc_tta",
            "test_top5_tta", "test_loss_tta")
    return {k: record[k] for k in keys if k in record}


def save_epoch(run: Run, state: RunState, history: list[dict[str, Any]], test: EvalResult, best: bool,
               plots: bool = True) -> None:
    """The end-of-epoch checkpoint, committed as one (:meth:`vggnet.store.rundir.RunDir.commit`): the state with the
    epoch's card (its weights, also the best ones when ``best``) and test evaluation, then the files derived from
    it: weights and cards, metrics, eval.json, with ``plots`` the confusion matrix and curves (see
    :data:`PLOT_SECONDS`), config.json and state.json."""
    card = ModelCard(model=run.model.config, classes=run.classes, preprocess=(run.card_preprocess or run.preprocess).to_dict(),
                     dataset=run.config.dataset, image_size=run.config.image_size, metrics=epoch_metrics(history[-1]),
                     train_config=run.saved_config)
    tensors, record = snapshot(run, state, history)
    checkpoint = Checkpoint(state=record, config=run.saved_config, card=card.to_dict(), best=best,
                            evaluation=test.to_dict(), title=f"{run.config.model} on {run.config.dataset}")
    run.rundir.commit(tensors, checkpoint, plots)


def rng_state(run: Run) -> dict[str, torch.Tensor]:
    states = {"rng/torch": torch.get_rng_state(), "rng/augment": run.generator.get_state()}
    if run.runtime.device.type == "cuda":
        states["rng/cuda"] = torch.cuda.get_rng_state(run.runtime.device)
    return states


def snapshot(run: Run, state: RunState, history: list[dict[str, Any]],
             extra: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state's tensors (model, optimizer, RNG; ``extra``: under torchrun every rank's random streams) and its
    record (state.json's: the counters, the optimizer's non-tensor state, the history and the gradient scaler's
    few numbers: scale, growth tracker, factors)."""
    tensors, rest = optimizer_to_tensors(run.optimizer)
    tensors.update(rng_state(run))
    tensors.update({f"model/{k}": v for k, v in run.model.state_dict().items()})
    record = {"run": asdict(state), "optimizer": rest, "history": history}
    if run.scaler is not None:
        record["scaler"] = run.scaler.state_dict()  # reads the scale from the device: a sync, at saves only
    return {**tensors, **(extra or {})}, record


def save_state(run: Run, state: RunState, history: list[dict[str, Any]],
               extra: dict[str, torch.Tensor] | None = None) -> None:
    """A checkpoint where the loop stands (a stop mid-epoch): model, optimizer, gradient scaler, RNG and counters,
    enough for --resume to continue exactly here (rank 0 writes). It carries no card: its weights are not an
    epoch's, and model.safetensors stays the last epoch's."""
    if not run.dist.is_main:
        return
    tensors, record = snapshot(run, state, history, extra)
    run.rundir.commit(tensors, Checkpoint(state=record, config=run.saved_config))


def load_state(run: Run) -> tuple[RunState, list[dict[str, Any]], tuple]:
    """The committed state (state.safetensors alone; state.json is its mirror) loaded into ``run``'s model, optimizer
    and gradient scaler; the counters, history and random states. A state without a scaler (an fp32 or bf16 run's)
    leaves a new scaler at its initial scale."""
    record, tensors = run.rundir.read_state()
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    check_state_dtypes(run, model_state, tensors)
    try:
        run.model.load_state_dict(model_state)
        optimizer_from_tensors(run.optimizer, tensors, record["optimizer"])
        if run.scaler is not None and "scaler" in record:
            run.scaler.load_state_dict(record["scaler"])
        state = RunState(**record["run"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{run.rundir} holds a training state that does not fit this run: {err}") from None
    # Under torchrun rank r continues its own random streams (saved as rng/.../rankR when the run stopped mid-epoch;
    # rank 0's when it had fewer ranks) and rank 0 alone carries the epoch's running sums (saved summed over ranks).
    saved_rng = tuple(tensors.get(f"{k}/rank{run.dist.rank}", tensors.get(k))
                      for k in ("rng/torch", "rng/augment", "rng/cuda"))
    if not run.dist.is_main:
        state.loss_sum, state.correct = 0.0, 0
    return state, list(record.get("history", [])), saved_rng


def check_state_dtypes(run: Run, model_state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """CheckpointError when a state tensor's dtype is not what this run keeps there (the model's own dtypes, float32
    optimizer buffers, uint8 random states): ``load_state_dict`` would convert a header's lie silently."""
    expected = run.model.state_dict()
    wrong = [(f"model/{k}", v.dtype, expected[k].dtype) for k, v in model_state.items()
             if k in expected and v.dtype != expected[k].dtype]
    wrong += [(k, v.dtype, torch.float32) for k, v in tensors.items()
              if k.startswith("optimizer/") and v.dtype != torch.float32]
    wrong += [(k, v.dtype, torch.uint8) for k, v in tensors.items() if k.startswith("rng/") and v.dtype != torch.uint8]
    if wrong:
        key, found, want = wrong[0]
        raise CheckpointError(f"{run.rundir.state_tensors} is corrupt: {key} is {str(found).replace('torch.', '')}, "
                              f"this run keeps {str(want).replace('torch.', '')} there ({len(wrong)} tensor(s) of "
                              "another dtype); start again from an intact run")
