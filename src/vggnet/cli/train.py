"""``vggnet train``: train a VGG on real images (also under torchrun), writing a self-describing run directory."""

from __future__ import annotations

import argparse
from typing import Callable

from vggnet.base.errors import ConfigError
from vggnet.net.models import INITS
from vggnet.runtime import GPU_HOST_THREADS, PRECISIONS
from vggnet.base.schedule import SCHEDULES
from vggnet.training import (DECAYING, NORMALIZE, OPTIMIZERS, PRESETS, RUNTIME_OPTIONS, Interrupted, resolve_config,
                        resume, train)
from vggnet.base.limits import IMAGE_SIZE, MAX_CLASSES, Range
from vggnet.training.config import TTAS, parse_duration
from vggnet.training.transfer import INIT_SCHEMES
from vggnet.cli.common import (add_model_options, device_name, fraction, in_range, integer, number, one_line, print_json,
                     shown, unit_interval, user_path)


def name_list(text: str) -> list[str]:
    """``features,conv5_1`` -> ``["features", "conv5_1"]``."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer names, e.g. block1,conv2_1")
    return names


def duration(text: str) -> float:
    """``90s``, ``10m``, ``1h``, ``1h30m`` -> seconds (:func:`vggnet.training.config.parse_duration`)."""
    try:
        return parse_duration(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--budget ")) from None


def class_list(text: str) -> list[int]:
    """``0-4``, ``5,7,9`` or a mix (``0-2,7``): class indices, in the order written."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:  # not digits, or thousands of them
            raise argparse.ArgumentTypeError(f"{shown(text)} is not a class list: write indices and ranges, e.g. 0-4 "
                                             "or 5,6,7") from None
        if first < 0 or last < first:
            raise argparse.ArgumentTypeError(f"{shown(part.strip())}: a range runs from a smaller to a larger index "
                                             ">= 0")
        if last >= MAX_CLASSES or len(out) + last - first >= MAX_CLASSES:
            raise argparse.ArgumentTypeError(f"{shown(text)}: at most {MAX_CLASSES} classes, indices 0 to "
                                             f"{MAX_CLASSES - 1}")
        out.extend(range(first, last + 1))
    return out


def _shown_value(value) -> str:
    """A default as --help writes it: ``15``, ``0.0005``, ``onecycle``, ``none``."""
    if value is None or value == []:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(_shown_value(v) for v in value)
    return str(value)


def preset_defaults() -> Callable[[str], str]:
    """``default("epochs")`` -> ``"(default 15; --preset d2l 10, hour 34, paper 74)"``: what the default recipe
    resolves an option to, and each preset that resolves it otherwise (read from :func:`resolve_config`, so --help
    cannot drift from the recipes)."""
    resolved = {name: resolve_config(name) for name in sorted(PRESETS)}
    recipe = resolve_config()

    def default(field: str) -> str:
        value = getattr(recipe, field)
        others = [f"{name} {_shown_value(getattr(config, field))}" for name, config in resolved.items()
                  if getattr(config, field) != value]
        return f"(default {_shown_value(value)}" + (f"; --preset {', '.join(others)})" if others else ")")

    return default


def add_parser(sub: argparse._SubParsersAction) -> None:
    default = preset_defaults()
    p = sub.add_parser("train", help="train on Fashion-MNIST, CIFAR-10/100 or an image folder",
                       description="Options left out come from --preset (default 'fast'), then the built-in defaults. "
                                   "The model: without --model, the preset's (default: quarter-width vgg11_bn with a "
                                   "GAP head, no dropout); a named --model is that model's own architecture (full "
                                   "width, classic head, dropout 0.5) unless --width/--head/--dropout are given.")
    _add_model_and_data_arguments(p, default)
    _add_recipe_arguments(p, default)
    _add_run_arguments(p)
    p.set_defaults(run=run)


def _add_model_and_data_arguments(p: argparse.ArgumentParser, default: Callable[[str], str]) -> None:
    """The model, its starting weights and the data; ``default`` (:func:`preset_defaults`) writes the defaults."""
    p.add_argument("--model", help=f"model name or 'custom' with --arch {default('model')}")
    add_model_options(p, training=True)
    p.add_argument("--dropout", type=fraction, help="dropout probability on the head's FC layers (default: the named "
                   "model's 0.5; without --model, the default recipe's 0)")
    p.add_argument("--init", choices=INITS, help=f"weight initialisation {default('init')}")
    p.add_argument("--init-from", metavar="SOURCE",
                   help="start from the weights of a run directory (or a weights file vggnet.load reads): every layer "
                        "whose name and shapes fit loads, the rest (a new head for the dataset's classes) keeps its "
                        "fresh initialisation and is listed; the first conv adapts to the image's channels (3 -> 1: "
                        "the sum of its kernels) (default: none, a fresh initialisation)")
    p.add_argument("--init-scheme", choices=INIT_SCHEMES,
                   help="with --init-from: all (default) layers that fit; paper: SOURCE's first four convs and last "
                        "three FC layers, the rest random (the paper's init from net A, section 3.1)")
    p.add_argument("--freeze", type=name_list, metavar="NAME[,NAME]",
                   help="keep these layers fixed (their BN in eval mode): features, block1..block5, conv1_1..conv5_3 "
                        "(with its BN), classifier (default: none)")
    p.add_argument("--loaded-lr-scale", type=number, metavar="F",
                   help="learning-rate multiplier for the layers --init-from loaded (e.g. 0.1: they move gently while "
                        "new layers learn at the full rate; default 1)")
    p.add_argument("--dataset", help="fashion-mnist (default), cifar10, cifar100 or folder:PATH")
    p.add_argument("--data-dir", type=user_path,
                   help="where the dataset files are (searched alone; default: $VGGNET_DATA, then the usual places)")
    p.add_argument("--image-size", type=integer, metavar="N", help=f"input size in pixels {default('image_size')}")
    p.add_argument("--normalize", choices=NORMALIZE, help="per-channel standardisation, the paper's mean subtraction, "
                   f"or none {default('normalize')}")


def _add_recipe_arguments(p: argparse.ArgumentParser, default: Callable[[str], str]) -> None:
    """Optimisation, augmentation, the preset, the validation split and the seed."""
    p.add_argument("--epochs", type=integer, help=f"epochs to train {default('epochs')}")
    p.add_argument("--batch-size", type=integer, help="global batch (divided among torchrun processes) "
                   f"{default('batch_size')}")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=f"optimizer {default('optimizer')}")
    p.add_argument("--lr", type=number, help=f"peak learning rate for the global batch {default('lr')}")
    p.add_argument("--momentum", type=fraction, help=f"SGD momentum {default('momentum')}")
    p.add_argument("--weight-decay", type=number, help=f"on conv and linear weights {default('weight_decay')}")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"learning-rate schedule {default('schedule')}")
    p.add_argument("--warmup-epochs", type=number, help="linear warm-up length (onecycle without warm-up ramps over "
                   f"30 percent of training) {default('warmup_epochs')}")
    p.add_argument("--label-smoothing", type=fraction,
                   help=f"label smoothing of the targets {default('label_smoothing')}")
    p.add_argument("--grad-clip", type=number, metavar="NORM", help=f"max global gradient norm {default('grad_clip')}")
    p.add_argument("--crop-padding", type=integer, metavar="PX", help="padding of the random crops, 0 for no crops "
                   f"{default('crop_padding')}")
    p.add_argument("--no-flip", dest="flip", action="store_false", default=None, help="no horizontal flips")
    p.add_argument("--erasing", type=unit_interval, metavar="P",
                   help=f"random-erasing probability {default('erasing')}")
    p.add_argument("--scale-jitter", type=in_range(Range(0, 1, open_low=True)), nargs=2, metavar=("LO", "HI"),
                   help=f"zoom window as fractions of the side, e.g. 0.44 0.88 {default('scale_jitter')}")
    p.add_argument("--scale", type=in_range(IMAGE_SIZE), nargs="+", metavar="S",
                   help="prepared datasets: the paper's training scale, the shorter side images are rescaled to "
                   "before the random crop: S fixed, or SMIN SMAX jittered per image (default: 8/7 of --image-size, "
                   "256 for 224)")
    p.add_argument("--colour-shift", type=number, metavar="STD", help="prepared datasets: std of AlexNet's RGB colour "
                   f"shift, 0 for none {default('colour_shift')}")
    p.add_argument("--workers", type=in_range(Range(0, 256, integer=True)), metavar="N",
                   help="prepared datasets: processes decoding and augmenting images (default: the available cores)")
    p.add_argument("--tta", choices=TTAS, help="flip: also score the final model on the test set averaged with its "
                   "mirrored images (recorded as test_acc_tta; the per-epoch scores stay plain) "
                   f"{default('tta')}")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the recipe the other options start from "
                   f"(default {resolve_config().preset}: the default recipe; docs/RESULTS.md). hour is --budget 60m; "
                   "hour_avx2 the fixed recipe measured to fit an hour of one AVX2 core (hour before it became a "
                   "budget)")
    p.add_argument("--budget", type=duration, metavar="DURATION",
                   help="a time limit such as 90s, 10m, 1h or 1h30m: train the most accurate recipe docs/RESULTS.md "
                        "measured that this machine is predicted to finish within 90 percent of it (a few training "
                        "steps of each model shape are timed first, and that time counts), print the candidates and "
                        "the choice, record it in config.json (a resumed run keeps it), and stop after the epoch "
                        "that the measured epoch times show to be the last that fits. It chooses --model, --width, "
                        "--head, --dropout, --epochs, --erasing and --tta itself: giving one of them too is an "
                        "error (default: none, the recipe as given)")
    p.add_argument("--val-split", type=integer, metavar="N",
                   help="hold out N training images (stratified, the same for every seed) for validation: the best "
                        "checkpoint and --schedule plateau follow the validation accuracy; without it there is no "
                        "best checkpoint (the test set is only reported, never used to select) "
                        f"{default('val_split')}")
    p.add_argument("--subset", type=integer, metavar="N", help="train on the first N training images only (default: "
                   "all)")
    p.add_argument("--classes", type=class_list, metavar="LIST",
                   help="train and test on these classes only (indices into the dataset's classes, e.g. 0-4 or "
                        "5,6,7,8,9), relabelled 0..k-1 in the order given (default: all)")
    p.add_argument("--seed", type=integer, help=f"random seed of initialisation, order and augmentation "
                   f"{default('seed')}")


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Where the run goes (or which run resumes), the runtime and the output."""
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/MODEL-DATASET-TIME): a new or empty "
                   "folder, or a run of vggnet's own that stopped before its first checkpoint; a folder holding other "
                   "files, or a run with a checkpoint (--resume it), is refused. One process at a time writes a run "
                   "(RUN_DIR/.lock)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run exactly; with --epochs N, extend it to N epochs in total: the learning-"
                        "rate schedule keeps its length (constant, step and plateau go on at their final rate; runs "
                        f"on {'/'.join(DECAYING)}, which end at 0, cannot be extended); config.json records the new "
                        "total at the first checkpoint. A run killed during a save is first brought up to its last "
                        "committed checkpoint (state.safetensors)")
    p.add_argument("--device", type=device_name, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, help="auto (default): on a CPU with native bf16 (AVX512_BF16, "
                   "AMX) the faster of fp32 and bf16, measured on a few training steps of this model before the run "
                   "(bf16 only when at least 5 percent faster; cached per CPU, torch version and model in "
                   "~/.cache/vggnet/probe.json, recorded in the run and kept on resume); fp32 on other CPUs; on a GPU "
                   "bf16 where supported, else fp16. On the CPU the memory layout is measured with it (unless "
                   "--channels-last or --no-channels-last gives it). An explicit precision is used as given")
    p.add_argument("--reprobe", action="store_true", default=None, help="with --precision auto: measure the "
                   "candidates again instead of reading the cached decision")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                        help="train in the channels_last (NHWC) memory layout. Default: with --precision auto on the "
                        "CPU the probe times both layouts and takes NCHW only where at least 5 percent faster; "
                        "channels_last elsewhere")
    layout.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None,
                        help="train in the NCHW memory layout")
    p.add_argument("--threads", type=integer, help="intra-op threads (default: on the CPU one per core that other "
                   "processes leave free, re-read every few seconds, or a fixed count with --deterministic and under "
                   f"torchrun; beside a GPU {GPU_HOST_THREADS})")
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms only "
                   "(cuDNN, cuBLAS workspace): same-seed and resumed runs bit-identical on CUDA too, at some speed; "
                   "recorded in config.json and kept on resume (the CPU path is bit-identical either way)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the training step: the first "
                   "steps pay tens of seconds of compilation (docs/BENCHMARKS.md says when it pays)")
    p.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under torchrun")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also write TensorBoard logs to RUN_DIR/tensorboard (needs the tensorboard extra: pip "
                        "install -e '.[tensorboard]' in a clone, pip install 'vggnet[tensorboard]' for an installed "
                        "vggnet)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


_NOT_CONFIG = {"verb", "run", "resume", "json", "preset", "reprobe"}


def run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and v is not None}
    if args.json:
        options.setdefault("progress", False)  # stdout carries only the JSON result
    if args.resume:
        extra = sorted(set(options) - {"epochs"} - set(RUNTIME_OPTIONS))
        if extra or args.preset:
            flags = ", ".join("--" + k.replace("_", "-") for k in extra + (["preset"] if args.preset else []))
            raise ConfigError(f"--resume continues the saved configuration; {flags} cannot change it (only --epochs "
                              "and the run-time options --threads, --device, --data-dir, --compile, --no-progress can), start a "
                              "new run instead")
        if args.reprobe:
            raise ConfigError("--reprobe measures a new run's precision; a resumed run keeps the precision it started "
                              "with (config.json's precision_record): leave out --reprobe")
        runtime = {k: v for k, v in options.items() if k in RUNTIME_OPTIONS}
        result = _guarded(lambda: resume(args.resume, options.get("epochs"), **runtime), lambda: args.resume)
    else:
        config = resolve_config(args.preset, **options)
        result = _guarded(lambda: train(config, reprobe=True) if args.reprobe else train(config),
                          lambda: config.out)
    if result is None:
        return 0  # not rank 0
    if args.json:
        print_json({k: v for k, v in result.items() if k != "history"})
    else:
        print(summary_line(result))
    return 0


def summary_line(result: dict) -> str:
    val = (f", validation {100 * result['val_acc']:.2f}% (best {100 * result['best_val_acc']:.2f}%)"
           if result.get("best_val_acc") is not None else "")
    tta = (f" ({100 * result['test_acc_tta']:.2f}% with test-time augmentation)"
           if result.get("test_acc_tta") is not None else "")
    budget = " (stopped by its --budget)" if result.get("stopped_by_budget") else ""
    return (f"test accuracy {100 * result['test_acc']:.2f}%{tta}{val} after {result['epochs']} epochs{budget}; run "
            f"directory {result['run_dir']}")


def _guarded(fn, run_dir):
    """Run ``fn`` (train or resume); the result on rank 0, None on the other torchrun ranks.

    A signal leaves with one line (from rank 0) and status 128 + signal; a lost torchrun peer becomes one line
    naming the cause (:func:`vggnet.training.distributed.peer_failures`); the process group is left on the way out, except
    when it is broken.
    """
    import sys

    from vggnet.training import distributed

    broken, together = False, False
    try:
        with distributed.peer_failures(run_dir):
            result = fn()
        together = True
        return result if distributed.env_rank() == 0 else None
    except Interrupted as stop:
        together = True  # every rank stops at the same step (the stop vote)
        if distributed.env_rank() == 0:
            print(one_line(f"vggnet train: {stop}"), file=sys.stderr)
        raise SystemExit(128 + int(stop.signum)) from None
    except distributed.PeerLost:
        broken = True
        raise
    finally:
        if not broken:
            distributed.teardown(in_step=together)
