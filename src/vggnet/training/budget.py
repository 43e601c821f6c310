"""A time budget instead of a guess: ``vggnet train --budget 10m`` trains the most accurate measured recipe that this
machine is predicted to finish within the budget, and stops on time if the prediction was wrong.

**The candidates** (:data:`RECIPES`) are the default recipe's variants whose Fashion-MNIST test top-1
docs/RESULTS.md measured, each citing its row: the default recipe itself, the ``hour_avx2`` preset, the sweep
"What accuracy costs" (model, width, epochs; random erasing 0.3 and flip test-time augmentation, whose score is the
one promised) and two shorter runs of the same recipe on the CPU, "Finer steps for --budget".

**The prediction** (:func:`predict`): epochs x (images trained per epoch x seconds per training image + images
evaluated per epoch x seconds per evaluated image + :data:`SAVE_SECONDS`), plus a flip-TTA pass at the end where the
recipe has one. The seconds per image are this machine's, for each model shape (model, width): a few training steps
of a copy of that model at the run's batch and precision, and a few forward passes in eval mode, timed like
precision ``auto``'s probe (:func:`vggnet.training.probe.median_step_seconds`: warm-up excluded, interleaved
rounds, medians). Under precision ``auto`` on a CPU with native bf16 both fp32 and bf16 steps are timed and the
faster (:func:`vggnet.training.probe.faster`) is the run's precision, recorded as given. Shapes are probed cheapest
first (:data:`SHAPE_ORDER`); a shape is skipped when a cheaper one's speed already shows none of its recipes can fit,
or none can beat a recipe that fits. The probe is not cached: it takes seconds (the whole probe, data loading
included, counts against the budget and is printed).

**The choice** (:func:`choose`): the most accurate recipe predicted to end within :data:`MARGIN` of the budget,
counting the time already spent; if none does, the cheapest recipe with its epochs cut to fit (its accuracy is then
not a measured one, and the announcement says so); if not even one epoch fits, a one-line :class:`ConfigError`
naming the least budget that would. The choice is recorded in config.json's ``budget_record``: a resumed run keeps
it and never probes again.

The loop keeps to the budget: :mod:`vggnet.training.deadline`.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from vggnet.base.errors import ConfigError, VggnetError
from vggnet.base.probecache import candidate_of, label
from vggnet.data import ImageDataset, load_dataset
from vggnet.data.catalogue import canonical_name
from vggnet.runtime import Runtime, adaptive_threads, resolve_runtime
from vggnet.training.budget_probe import Speed, measure_shape, prepare_seconds
from vggnet.training.build import build_data
from vggnet.training.config import TrainConfig, format_duration, option_name, resolve_config
from vggnet.training.deadline import wall_clock
from vggnet.training.probe import LOAD_SECONDS

#: A recipe fits when its predicted time is within this share of the budget (after the time already spent). The
#: rest covers what the probe does not see: the loop's own work per step, a machine that gets busier, the start of
#: the process; the deadline catches the rest, at the price of an epoch schedule cut short.
MARGIN = 0.9
#: Seconds per epoch for the checkpoint, metrics and plots, modelled rather than measured: the hour preset's runs
#: spent 6-8 s per epoch on evaluation, checkpoint and plots, about 5 s of it evaluating (docs/RESULTS.md).
SAVE_SECONDS = 1.5
DATASET = "fashion-mnist"
_SWEEP = 'docs/RESULTS.md "What accuracy costs", seed 0, with flip TTA'
_FINER = 'docs/RESULTS.md "Finer steps for --budget", seed 0, with flip TTA (CPU, bf16)'


@dataclass(frozen=True)
class Recipe:
    """One measured recipe: the default recipe's training (one-cycle SGD, GAP head, no dropout) on ``model`` at
    ``width`` for ``epochs``; ``top1``: the measured test top-1 in percent (with flip TTA where ``tta``), None for a
    recipe with its epochs cut (not measured); ``source``: where docs/RESULTS.md measured it."""

    model: str
    width: float
    epochs: int
    top1: float | None
    source: str
    erasing: float = 0.3
    tta: str | None = "flip"

    @property
    def shape(self) -> tuple[str, float]:
        return (self.model, self.width)

    def options(self) -> dict[str, Any]:
        """The TrainConfig fields this recipe sets (:data:`vggnet.training.config.BUDGET_CHOOSES`)."""
        return dict(model=self.model, arch=None, batch_norm=None, width=self.width, head="gap", dropout=0.0,
                    epochs=self.epochs, erasing=self.erasing, tta=self.tta)

def model_name(model: str) -> str:
    """``vgg13_bn`` -> ``VGG-13-BN``."""
    return model.upper().replace("VGG", "VGG-").replace("_", "-")


RECIPES: tuple[Recipe, ...] = (
    Recipe("vgg11_bn", 0.25, 15, 93.1, 'docs/RESULTS.md "The default recipe": 93.03%, 93.07% (AMX, bf16), '
           '93.09% (AVX2, fp32)', erasing=0.0, tta=None),
    Recipe("vgg11_bn", 0.25, 25, 93.63, _FINER),
    Recipe("vgg11_bn", 0.25, 50, 93.89, _SWEEP),
    Recipe("vgg11_bn", 0.25, 95, 94.03, _SWEEP),
    Recipe("vgg13_bn", 0.25, 18, 94.23, _FINER),
    Recipe("vgg13_bn", 0.25, 34, 94.74, 'docs/RESULTS.md "95% within an hour": seeds 0 and 1, 94.68% and 94.80% '
           "with flip TTA (AVX2, fp32; preset hour_avx2)"),
    Recipe("vgg13_bn", 0.25, 38, 94.81, _SWEEP),
    Recipe("vgg16_bn", 0.25, 30, 94.63, _SWEEP),
    Recipe("vgg16_bn", 0.25, 50, 94.72, _SWEEP),
    Recipe("vgg19_bn", 0.25, 40, 94.64, _SWEEP),
    Recipe("vgg13_bn", 0.375, 33, 94.96, _SWEEP),
    Recipe("vgg16_bn", 0.375, 27, 94.59, _SWEEP),
    Recipe("vgg13_bn", 0.5, 22, 94.68, _SWEEP),
    Recipe("vgg16_bn", 0.5, 16, 94.42, _SWEEP),
    Recipe("vgg16_bn", 0.5, 30, 94.92, 'docs/RESULTS.md "What accuracy costs", seeds 0-2: 95.09%, 94.95%, 94.73% '
           "with flip TTA (mean)"),
    Recipe("vgg16_bn", 0.5, 60, 95.06, _SWEEP),
)

#: The random-erasing probabilities of the recipes: a batch's preparation is priced at each.
ERASINGS = tuple(sorted({recipe.erasing for recipe in RECIPES}))
#: The model shapes from the cheapest to the dearest training step, by docs/RESULTS.md's CPU images/s (1,895, 1,239,
#: 995, 799, 587, 506, 400, 295): a shape is assumed no faster per image than any before it (more MACs per image).
SHAPE_ORDER = (("vgg11_bn", 0.25), ("vgg13_bn", 0.25), ("vgg16_bn", 0.25), ("vgg19_bn", 0.25), ("vgg13_bn", 0.375),
               ("vgg16_bn", 0.375), ("vgg13_bn", 0.5), ("vgg16_bn", 0.5))
#: Options whose value in the measured recipes is the default recipe's: a run that changes one still gets its
#: budget, but the measured accuracies are not promised for it (the announcement names them).
RECIPE_OPTIONS = ("image_size", "normalize", "classes", "val_split", "subset", "crop_padding", "flip", "scale_jitter",
                  "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule",
                  "warmup_epochs", "label_smoothing", "grad_clip", "init", "init_from", "freeze")


@dataclass(frozen=True)
class Counts:
    """Images per epoch: ``trained`` (whole batches), ``evaluated`` (test and validation sets), ``test``; and
    ``prepare``: the seconds per trained image of a batch's preparation (preprocessing and augmentation) for each
    random-erasing probability measured (:func:`vggnet.training.budget_probe.prepare_seconds`; none: free)."""

    trained: int
    evaluated: int
    test: int
    prepare: tuple[tuple[float, float], ...] = ()

    def prepare_seconds(self, erasing: float) -> float:
        return dict(self.prepare).get(erasing, 0.0)


def predict(recipe: Recipe, speed: Speed, counts: Counts) -> float:
    """Seconds ``recipe`` takes at ``speed``: epochs of training, evaluation and saving, and the final flip-TTA pass
    (both views of the test set)."""
    return recipe.epochs * epoch_seconds(speed, counts, recipe.erasing) + tta_seconds(recipe, speed, counts)


def epoch_seconds(speed: Speed, counts: Counts, erasing: float = 0.0) -> float:
    """An epoch's seconds: training (the step and the batch preparation with random erasing at ``erasing``), then
    :func:`epoch_overhead`."""
    return counts.trained * (speed.train + counts.prepare_seconds(erasing)) + epoch_overhead(speed, counts)


def epoch_overhead(speed: Speed, counts: Counts) -> float:
    """An epoch's seconds after its training: evaluation and :data:`SAVE_SECONDS`."""
    return counts.evaluated * speed.eval + SAVE_SECONDS


def tta_seconds(recipe: Recipe, speed: Speed, counts: Counts) -> float:
    return 2 * counts.test * speed.eval if recipe.tta else 0.0


# -------------------------------------------------------------------------------------------------- the choice
@dataclass(frozen=True)
class Row:
    """One candidate as the announcement shows it: predicted seconds (a lower bound when not probed), fits."""

    recipe: Recipe
    predicted: float
    fits: bool
    probed: bool


@dataclass(frozen=True)
class Choice:
    recipe: Recipe  # with its epochs cut when ``cut_from``
    predicted: float
    rows: tuple[Row, ...]
    limit: float  # seconds a recipe had: MARGIN x budget - spent
    cut_from: int | None = None  # the cheapest recipe's measured epochs, when none fitted


def choose(recipes: tuple[Recipe, ...], speeds: dict[tuple[str, float], Speed], counts: Counts, budget: float,
           spent: float) -> Choice:
    """The most accurate recipe predicted to end within :data:`MARGIN` of ``budget`` after ``spent`` seconds (a tie
    goes to the quicker); else the cheapest recipe with its epochs cut to fit; ConfigError when one epoch does not."""
    limit = MARGIN * budget - spent
    rows = tuple(Row(r, predict(r, speeds[r.shape], counts), speeds[r.shape].measured
                     and predict(r, speeds[r.shape], counts) <= limit, speeds[r.shape].measured)
                 for r in recipes if r.shape in speeds)
    fitting = [row for row in rows if row.fits]
    if fitting:
        best = max(fitting, key=lambda row: (row.recipe.top1, -row.predicted))
        return Choice(best.recipe, best.predicted, rows, limit)
    cheapest = min((row for row in rows if row.probed), key=lambda row: row.predicted)
    recipe, speed = cheapest.recipe, speeds[cheapest.recipe.shape]
    per_epoch = epoch_seconds(speed, counts, recipe.erasing)
    epochs = min(recipe.epochs - 1, math.floor((limit - tta_seconds(recipe, speed, counts)) / per_epoch))
    if epochs < 1:
        least = (spent + per_epoch + tta_seconds(recipe, speed, counts)) / MARGIN
        raise ConfigError(f"--budget {format_duration(budget)} does not fit one epoch of the cheapest recipe "
                          f"({model_name(recipe.model)} x{recipe.width:g}: {per_epoch / 60:.1f} min per epoch on this "
                          f"machine, after {spent:.0f} s of loading and probing): give at least --budget "
                          f"{format_duration(60 * math.ceil(least / 60))}")
    cut = replace(recipe, epochs=epochs, top1=None, source=f"{recipe.source}; cut from {recipe.epochs} epochs")
    return Choice(cut, predict(cut, speed, counts), rows, limit, cut_from=recipe.epochs)


def probe_shapes(recipes: tuple[Recipe, ...], counts: Counts, budget: float,
                 measure: Callable[[tuple[str, float]], Speed], spent: Callable[[], float]) -> dict:
    """Each shape's :class:`Speed`, cheapest shape first (:data:`SHAPE_ORDER`), measured by ``measure`` unless the
    slowest speed measured so far (a lower bound of every later shape's time per image) already shows that none of
    the shape's recipes can both fit and beat the best recipe that fits: then the bound, ``measured`` False.
    ``spent``: seconds of the budget used so far (probing uses it)."""
    speeds: dict[tuple[str, float], Speed] = {}
    bound: Speed | None = None
    best = -math.inf  # the accuracy of the best recipe that fits so far
    for shape in [s for s in SHAPE_ORDER if any(r.shape == s for r in recipes)]:
        own = [r for r in recipes if r.shape == shape]
        limit = MARGIN * budget - spent()
        if bound is not None:
            lower = replace(bound, measured=False, detail=())
            if not any(predict(r, lower, counts) <= limit and r.top1 > best for r in own):
                speeds[shape] = lower
                continue
        speed = speeds[shape] = measure(shape)
        bound = speed if bound is None else replace(bound, train=max(bound.train, speed.train),
                                                    eval=max(bound.eval, speed.eval))
        best = max([best] + [r.top1 for r in own if predict(r, speed, counts) <= limit])
    return speeds


# -------------------------------------------------------------------------------------------------------- plan
def plan(config: TrainConfig, data: tuple[ImageDataset, ImageDataset] | None = None,
         measure: Callable[[tuple[str, float]], Speed] | None = None, reprobe: bool = False
         ) -> tuple[TrainConfig, tuple]:
    """``config`` (with ``budget`` set) with the chosen recipe, its precision, ``budget_record`` and
    ``precision_record`` (the bf16 variant the probe chose, which the run trains and evaluates with), and the data
    loaded to price it (``(train, test)``, for :func:`vggnet.training.train` to reuse); the choice is announced on
    stderr. ``measure``: a shape's :class:`Speed` (default :func:`~vggnet.training.budget_probe.measure_shape`,
    cached unless ``reprobe``; tests inject one)."""
    started = wall_clock()
    check_plannable(config)
    runtime = resolve_runtime(config.device, config.precision, config.channels_last, config.threads, False,
                              config.deterministic)
    threads = adaptive_threads(runtime, config.threads is not None, False)  # its first window spans the loading
    if data is None:
        data = load_dataset(config.dataset, config.data_dir, config.image_size)
    train_set, counts = count_images(config, data)

    # A layout the run does not give is timed on the first (cheapest) shape probed, and the others are priced in the
    # layout it chose: timing both on every shape tripled the probe (34 s for 3 shapes on the Zen 5-kind EPYC, where
    # 10 minutes then afforded a smaller recipe), and the layout that wins is the CPU's, not the width's.
    layout: dict[str, Any] = {"channels_last": config.channels_last, "decided_on": None}

    def measure_here(shape: tuple[str, float]) -> Speed:
        if threads is not None:
            threads.poll(LOAD_SECONDS)  # the threads the load leaves now, as the run's precision probe does
        speed = measure_shape(replace(config, channels_last=layout["channels_last"]), train_set, runtime, shape,
                              reprobe)
        if layout["channels_last"] == "auto":
            layout.update(channels_last=speed.channels_last, decided_on=list(shape))
        return speed

    probe_start = wall_clock()
    counts = replace(counts, prepare=prepare_seconds(config, train_set, runtime, ERASINGS))
    speeds = probe_shapes(RECIPES, counts, config.budget, measure or measure_here, lambda: wall_clock() - started)
    probed = wall_clock() - probe_start
    choice = choose(RECIPES, speeds, counts, config.budget, wall_clock() - started)
    record = dict(budget_record(config, choice, speeds, counts, started, probed, runtime), layout=layout)
    print(announcement(record), file=sys.stderr, flush=True)
    return replace(config, **choice.recipe.options(), precision=record["precision"], budget_record=record,
                   precision_record=precision_record(record, speeds[choice.recipe.shape])), data


def precision_record(record: dict[str, Any], speed: Speed) -> dict[str, Any]:
    """config.json's ``precision_record`` of a budget run: the precision and bf16 variant its probe chose for the
    chosen shape (:func:`vggnet.training.probe.decide_precision` keeps it, a resume too)."""
    return {"precision": speed.precision, "small_map_convs": speed.small_map_convs,
            "channels_last": speed.channels_last, "by": "budget",
            "device": record["device"], "batch": record["batch"], "threads": record["threads"],
            **{k: v for k, v in speed.detail if k.endswith("_ms") and not k.startswith("eval_")}}


def count_images(config: TrainConfig, data: tuple[ImageDataset, ImageDataset]) -> tuple[ImageDataset, Counts]:
    """The run's training set (classes, hold-out and subset applied, as the run will) and its :class:`Counts`."""
    train_set, val_set, test_set = build_data(config, data)
    counts = Counts(len(train_set) // config.batch_size * config.batch_size,
                    len(test_set) + (len(val_set) if val_set is not None else 0), len(test_set))
    if counts.trained == 0:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the training set ({len(train_set)} "
                          "images): lower it or raise --subset")
    return train_set, counts


def check_plannable(config: TrainConfig) -> None:
    """ConfigError where the measured recipes say nothing: another dataset, or several torchrun processes."""
    if config.budget is None:
        raise ConfigError("a budget plan needs TrainConfig.budget (seconds), e.g. vggnet train --budget 10m")
    shown = f"--budget {format_duration(config.budget)}"
    try:
        dataset = canonical_name(config.dataset)
    except VggnetError:  # an image folder or a prepared dataset
        dataset = None
    if dataset != DATASET:
        raise ConfigError(f"{shown} chooses by accuracies measured on Fashion-MNIST (docs/RESULTS.md), none on "
                          f"{config.dataset}: choose the recipe yourself (--model, --epochs)")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise ConfigError(f"{shown} measures and chooses in one process; under torchrun give the recipe yourself "
                          "(--model, --epochs)")


def budget_record(config: TrainConfig, choice: Choice, speeds: dict, counts: Counts, started: float, probed: float,
                  runtime: Runtime) -> dict[str, Any]:
    """config.json's ``budget_record``: what was chosen and why, the candidates as priced, the speeds measured."""
    recipe, speed = choice.recipe, speeds[choice.recipe.shape]
    return {
        "budget_s": config.budget, "margin": MARGIN, "started_at": round(started, 3),
        "spent_s": round(MARGIN * config.budget - choice.limit, 3), "probe_s": round(probed, 3),
        "device": runtime.device.type, "threads": torch.get_num_threads(), "batch": config.batch_size,
        "precision": speed.precision, "small_map_convs": speed.small_map_convs, "channels_last": speed.channels_last,
        "variant": candidate_of({**dict(speed.detail), "precision": speed.precision,
                                 "small_map_convs": speed.small_map_convs, "channels_last": speed.channels_last}),
        "images": {"trained": counts.trained, "evaluated": counts.evaluated, "test": counts.test},
        "chosen": {**{k: recipe.options()[k] for k in ("model", "width", "epochs", "erasing", "tta")},
                   "top1": recipe.top1, "source": recipe.source, "predicted_s": round(choice.predicted, 1),
                   "cut_from": choice.cut_from},
        "epoch_overhead_s": round(epoch_overhead(speed, counts), 3),
        "prepare_us_per_image": [{"erasing": erasing, "us": round(1e6 * seconds, 3)} for erasing, seconds in
                                 counts.prepare],
        "candidates": [{"model": row.recipe.model, "width": row.recipe.width, "epochs": row.recipe.epochs,
                        "tta": row.recipe.tta, "top1": row.recipe.top1, "predicted_s": round(row.predicted, 1),
                        "fits": row.fits, "probed": row.probed} for row in choice.rows],
        "speeds": [{"model": shape[0], "width": shape[1], "train_images_s": round(1 / s.train, 1),
                    "eval_images_s": round(1 / s.eval, 1), "precision": s.precision, "measured": s.measured,
                    **dict(s.detail)} for shape, s in speeds.items()],
        "changed": [name for name in RECIPE_OPTIONS if getattr(config, name) != getattr(resolve_config(), name)],
    }


def announcement(record: dict[str, Any]) -> str:
    """The candidates as priced (a table) and the choice with its reason, for stderr."""
    budget = format_duration(record["budget_s"])
    probed = sum(s["measured"] for s in record["speeds"])
    cached = sum(s.get("by") == "cache" for s in record["speeds"])
    read = f", {cached} of them read from the cache (--reprobe measures again)" if cached else ""
    lines = [f"vggnet train: --budget {budget}: {len(record['candidates'])} measured recipes priced on this machine "
             f"({record['device']}, {label(record['variant'])}, {record['threads']} threads, "
             f"batch {record['batch']}; model shapes probed: {probed} in {record['probe_s']:.1f} s{read}, skipped: "
             f"{len(record['speeds']) - probed})",
             "  model       width  epochs   predicted  measured top-1   fits"]
    for row in record["candidates"]:
        minutes = f"{'' if row['probed'] else '>='}{row['predicted_s'] / 60:.1f} min"
        top1 = f"{row['top1']:.2f}%" + (" with TTA" if row["tta"] else "")
        lines.append(f"  {model_name(row['model']):<10} {row['width']:>6g} {row['epochs']:>7} "
                     f"{minutes:>11}  {top1:<15}  {('yes' if row['fits'] else 'no') if row['probed'] else 'skipped'}")
    lines.append(choice_line(record))
    if record["changed"]:
        flags = ", ".join(option_name(name) for name in record["changed"])
        lines.append(f"vggnet train: note: the measured recipes ran with the default recipe's {flags}, not this run's: "
                     "their accuracies are not promised for it")
    return "\n".join(lines)


def choice_line(record: dict[str, Any]) -> str:
    chosen, budget = record["chosen"], format_duration(record["budget_s"])
    name = f"{model_name(chosen['model'])} x{chosen['width']:g}, {chosen['epochs']} epoch{'s' * (chosen['epochs'] > 1)}"
    fit = (f"{chosen['predicted_s'] / 60:.1f} min predicted, within {MARGIN:.0%} of the budget after "
           f"{record['spent_s']:.0f} s of loading and probing")
    if chosen["cut_from"] is not None:
        return (f"vggnet train: --budget {budget} -> {name}: no measured recipe fits, so the cheapest one with its "
                f"{chosen['cut_from']} epochs cut to {chosen['epochs']} ({fit}); its accuracy is not measured")
    return (f"vggnet train: --budget {budget} -> {name}: the most accurate measured recipe that fits ({fit}); "
            f"measured {chosen['top1']:.2f}% ({chosen['source']})")

