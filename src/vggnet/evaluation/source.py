"""``vggnet eval`` as a library function: a SOURCE (run directory or weights file) scored on a test set, plainly or
with the paper's multi-scale protocols, and where its results are written.

The protocols (``protocol``) on an in-memory test set rescale its decoded square images
(:func:`~vggnet.evaluation.multiscale.evaluate_multiscale`); on a prepared (streamed) one they decode every image from
its own bytes with its smallest side at each scale, whole
(:func:`~vggnet.evaluation.multiscale_streamed.evaluate_multiscale_streamed`).

Where the results go: beside a run's own files, never over training's eval.json and confusion.png:
``RUN/evals/NAME.json`` and ``RUN/evals/NAME.png`` (:meth:`vggnet.store.rundir.RunDir.eval_files`), NAME naming what
was measured (:func:`eval_name`: ``test``, ``test-flip``, ``best-test``, ``scales-32-40-dense-crops-5x5-flip``,
``test-on-cifar10``, ...). ``out=DIR`` writes ``DIR/eval.json`` and ``DIR/confusion.png`` instead, unless DIR is a
run directory: then only the evaluated run itself (its evals/), never another run. A weights file has no dataset
and no folder of its own: ``dataset`` is required, and the results are written only with ``out``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vggnet.base.errors import ConfigError, DataError
from vggnet.evaluation.metrics import EvalResult, evaluate
from vggnet.evaluation.multiscale import Protocol, check_protocol, evaluate_multiscale
from vggnet.evaluation.multiscale_streamed import evaluate_multiscale_streamed, is_streamed
from vggnet.evaluation.testset import load_test_set
from vggnet.runtime import Runtime
from vggnet.store.load import load
from vggnet.store.rundir import RunDir, write_evaluation


@dataclass
class SourceEval:
    """What :func:`evaluate_source` measured, recorded and wrote."""

    result: EvalResult
    record: dict[str, Any]  # eval.json's content
    dataset: str
    files: tuple[Path, Path] | None  # (json, png) written; None: nothing written


def evaluate_source(source: str | os.PathLike, runtime: Runtime, *, weights: str | None = None,
                    model: str | None = None, dataset: str | None = None, data_dir: str | None = None,
                    tta: str | None = None, protocol: Protocol | None = None, batch_size: int | None = None,
                    out: str | os.PathLike | None = None, progress: bool = False, decide=None) -> SourceEval:
    """Score ``source`` on ``dataset`` (default: a run's own) and write the record (see the module docstring).
    ``decide(loaded, runtime) -> (runtime, record)``: precision auto by measurement (:mod:`vggnet.evaluation.probe`)."""
    is_run = Path(source).is_dir()
    if not is_run and Path(source).is_file() and not dataset:
        raise DataError(f"{source} is a weights file, which has no dataset of its own: name one with --dataset "
                        "(fashion-mnist, cifar10, cifar100 or folder:PATH, one subfolder per class in the model's "
                        "class order)")
    in_run = _writes_into_run(source, out, is_run)  # refused before any work when out is someone else's run
    if protocol is not None and runtime.compile:
        raise ConfigError("--compile applies to plain evaluation; the multi-scale protocols (--scales) run eagerly: "
                          "drop one of them")
    loaded = load(source, weights or "model", runtime.device, model=model)
    loaded.require_head(source, "eval")
    card, prep = loaded.card, loaded.preprocess
    if protocol is not None:
        check_protocol(loaded.model, prep, protocol)  # before the test set is read
    dataset = dataset or card.dataset or "fashion-mnist"
    test = load_test_set(loaded, dataset, data_dir, source)
    runtime, chosen = decide(loaded, runtime) if decide is not None else (runtime, None)
    if protocol is None:
        result = evaluate(loaded.model, test, prep, runtime.device, runtime.precision, batch_size, tta=tta,
                          channels_last=runtime.channels_last, progress=progress, compile=runtime.compile,
                          threads=runtime.adaptive, small_maps=runtime.small_map_convs)
    else:  # a prepared set: each image decoded from its own bytes at each scale, whole (the paper's protocol)
        scored = evaluate_multiscale_streamed if is_streamed(test) else evaluate_multiscale
        result = scored(loaded.model, test, prep, protocol, runtime.device, runtime.precision, batch_size,
                        progress=progress, channels_last=runtime.channels_last, adaptive=runtime.adaptive,
                        small_maps=runtime.small_map_convs)
    result.classes = loaded.classes or test.classes
    record = dict(result.to_dict(), dataset=dataset, weights=(weights or "model") if is_run else str(source),
                  tta=tta, precision=runtime.precision, **({"precision_record": chosen} if chosen else {}))
    if protocol is not None:
        record["protocol"] = protocol.to_dict()
    named = f", {protocol.describe()}" if protocol is not None else ""
    title = f"{loaded.model.name} on {dataset}{named}: top-1 {100 * result.top1:.2f}%"
    if in_run:
        files = RunDir(source).eval_files(eval_name(protocol, tta, weights or "model", dataset, card.dataset))
    else:
        files = (Path(out) / "eval.json", Path(out) / "confusion.png") if out else None
    if files is not None:
        write_evaluation(record, title, *files)
    return SourceEval(result, record, dataset, files)


def _writes_into_run(source: str | os.PathLike, out: str | os.PathLike | None, is_run: bool) -> bool:
    """Whether the results go into the evaluated run's evals/ (a run without ``out``, or with ``out`` naming the run
    itself); a ConfigError when ``out`` is another run directory, which eval never writes into."""
    if out is None:
        return is_run
    if is_run and _same_folder(out, source):
        return True
    if RunDir(out).is_run():
        raise ConfigError(f"--out {out} is another run directory: vggnet eval writes into a run only when it "
                          f"evaluates it (its evals/ folder); choose a folder that is not a run")
    return False


def _same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def eval_name(protocol: Protocol | None, tta: str | None, weights: str, dataset: str, own: str | None) -> str:
    """The name of an evaluation's files in RUN/evals/: its protocol (``test``, ``test-flip``,
    ``scales-32-40-dense-crops-5x5-flip``), after ``best-`` for the best weights and before ``-on-DATASET`` for a
    dataset that is not the run's own; so that different measurements never overwrite each other."""
    if protocol is None:
        parts = ["test"] + (["flip"] if tta == "flip" else [])
    else:
        parts = (["scales", *map(str, protocol.scales)] + (["dense"] if protocol.dense else [])
                 + ([f"crops-{protocol.crops[0]}x{protocol.crops[1]}"] if protocol.crops else [])
                 + (["flip"] if protocol.flip else []))
    if weights == "best":
        parts.insert(0, "best")
    if dataset != own:
        parts += ["on", re.sub(r"[^A-Za-z0-9.]+", "-", dataset).strip("-.")[:80] or "dataset"]
    return "-".join(parts)
