"""From a :class:`~vggnet.training.config.TrainConfig` to a ready :class:`Run`: runtime, data, preprocessing, model
(with ``--init-from``'s weights and ``--freeze``, :mod:`vggnet.training.transfer`), optimizer and loader, in the
order the data flows. Nothing here trains; :mod:`vggnet.training.loop` does.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vggnet.training import distributed
from vggnet.net.cpu_bf16 import tune_for_cpu_bf16
from vggnet.data import Augment, BatchLoader, ImageDataset, Preprocess, channel_stats, load_dataset, stratified_holdout
from vggnet.base.errors import CheckpointError, ConfigError
from vggnet.net.models import create_model
from vggnet.store.rundir import RunDir
from vggnet.runtime import (AdaptiveThreads, Runtime, adaptive_threads, compile_module, keeps_data_on_device,
                            memory_format, resolve_runtime)
from vggnet.data.stream import StreamedSplit, open_prepared
from vggnet.training import streamed as streamed_data
from vggnet.training.config import TrainConfig
from vggnet.training.probe import decide_precision, runs_channels_last, uses_small_map_convs
from vggnet.training.transfer import TransferRecord, freeze, hold_in_eval, init_from_source, parameter_groups


@dataclass
class Run:
    """Everything one training run works with. ``model`` is the bare module; ``net`` is what a step calls (the
    DistributedDataParallel wrapper under torchrun, else ``model`` itself)."""

    config: TrainConfig
    runtime: Runtime
    dist: distributed.Dist
    rundir: RunDir
    saved_config: dict[str, Any]  # what config.json holds (run-time options of a resumed session excluded)
    train_set: ImageDataset
    val_set: ImageDataset | None
    test_set: ImageDataset
    classes: list[str]
    preprocess: Preprocess
    augment: Augment
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: BatchLoader
    generator: torch.Generator  # the augmentation's random stream
    total_steps: int  # the learning-rate schedule's length in steps
    warmup_steps: int
    scaler: torch.amp.GradScaler | None = None  # fp16's gradient scaler (build_scaler); None otherwise
    threads: AdaptiveThreads | None = None  # the CPU thread count that follows the load (runtime.adaptive_threads)
    # How image files become the model's input, for the card, where it is not ``preprocess`` itself: a streamed
    # run's batches arrive cropped, while a file is decoded at the test scale Q and centre-cropped.
    card_preprocess: Preprocess | None = None


def build_runtime(config: TrainConfig, dist: distributed.Dist) -> Runtime:
    """The run's :class:`Runtime`: under torchrun the device is the rank's own and the threads are shared."""
    if dist.enabled:
        return resolve_runtime(dist.device, config.precision, config.channels_last,
                               config.threads or dist.default_threads(), config.compile, config.deterministic)
    return resolve_runtime(config.device, config.precision, config.channels_last, config.threads, config.compile,
                           config.deterministic)


def build_data(config: TrainConfig, data: tuple[ImageDataset, ImageDataset] | None = None,
               ) -> tuple[ImageDataset, ImageDataset | None, ImageDataset]:
    """``(train, validation or None, test)``: ``--classes`` first (on both sets), then the validation hold-out, then
    ``--subset`` on what is left for training."""
    streamed = data is None and streamed_data.streams(config)
    if streamed:
        train_set, test_set = open_prepared(config.dataset)
    else:
        train_set, test_set = data if data is not None else load_dataset(config.dataset, config.data_dir,
                                                                         config.image_size)
    if config.classes:
        train_set, test_set = train_set.select_classes(config.classes), test_set.select_classes(config.classes)
    val_set = None
    if config.val_split:
        keep, held = stratified_holdout(train_set.labels, config.val_split, len(train_set.classes))
        val_set = train_set.take(held, f"{train_set.name} (validation)")
        train_set = train_set.take(keep)
    if config.subset:
        train_set = train_set.subset(config.subset)
    if streamed:  # evaluation reads them decoded by the test transform; training by the loader's
        return train_set, streamed_data.for_evaluation(config, val_set), streamed_data.for_evaluation(config, test_set)
    return train_set, val_set, test_set


def place_data(runtime: Runtime, *datasets: ImageDataset | None) -> tuple[ImageDataset | None, ...]:
    """The datasets on the run's GPU for the whole run when they fit (:func:`vggnet.runtime.keeps_data_on_device`):
    batches are then indexed, preprocessed and augmented there and never cross the host bus; else where they are."""
    resident = [ds for ds in datasets if isinstance(ds, ImageDataset)]  # streamed sets stay on their shards
    nbytes = sum(ds.images.nbytes + ds.labels.nbytes for ds in resident)
    if not resident or not keeps_data_on_device(runtime.device, nbytes):
        return datasets
    return tuple(ds.to(runtime.device) if isinstance(ds, ImageDataset) else ds for ds in datasets)


def build_preprocess(config: TrainConfig, train: ImageDataset) -> Preprocess:
    """Per-channel statistics of the training images (validation images excluded; of a streamed set, a sample of
    them: :func:`vggnet.training.streamed.preprocess_stats`)."""
    channels, streamed = image_channels(train), isinstance(train, StreamedSplit)
    if config.normalize == "none":
        mean, std = (0.0,) * channels, (1.0,) * channels
    else:
        mean, std = streamed_data.preprocess_stats(config, train) if streamed else channel_stats(train)
        if config.normalize == "mean":
            std = (1.0,) * channels
    in_size = config.image_size if streamed else int(train.images.shape[-1])
    return Preprocess(config.image_size, mean, std, fit="auto", in_size=in_size)


def image_channels(train: ImageDataset | StreamedSplit) -> int:
    """The channels of the training images: a prepared dataset's are RGB."""
    return 3 if isinstance(train, StreamedSplit) else int(train.images.shape[1])


def build_model(config: TrainConfig, train: ImageDataset) -> torch.nn.Module:
    return create_model(config.model, arch=config.arch, batch_norm=config.batch_norm, num_classes=len(train.classes),
                        in_channels=image_channels(train), input_size=config.image_size, width=config.width,
                        head=config.head, dropout=config.dropout, init=config.init)


def build_optimizer(config: TrainConfig, model: torch.nn.Module, loaded: list[str] | tuple = ()
                    ) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only (not on biases or BN parameters); frozen parameters left out; the
    ``loaded`` layers (from ``--init-from``) in groups of their own at ``--loaded-lr-scale`` times the rate."""
    groups = parameter_groups(model, config.weight_decay, loaded, config.loaded_lr_scale)
    if config.optimizer == "sgd":
        # foreach: the whole update in a few multi-tensor kernels, not ~5 per tensor (CPU default: per tensor); 1.7x
        # faster steps. Not fused=True: torch's fused CPU SGD ignores a momentum buffer whose memory format differs
        # from its channels_last parameter, as after resuming from a checkpoint, and silently updates wrong values.
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0, foreach=True)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr)


def start_weights(config: TrainConfig, model: torch.nn.Module, rundir: RunDir, classes: list[str],
                  announce: bool) -> tuple[list[str], dict[str, Any] | None]:
    """``--init-from``: a new run loads SOURCE's weights into ``model`` and prints what it did on one line to stderr
    when ``announce`` (rank 0); a resumed run's weights come from its state file, so SOURCE is never read again,
    only the record. Returns the loaded layers and the record (config.json's ``init_record``)."""
    if not config.init_from:
        return [], None
    if rundir.has_state():
        if config.init_record is None:
            raise CheckpointError(f"{rundir.config} names --init-from {config.init_from} but has no init_record: it "
                                  "was not written by this vggnet")
        return TransferRecord.from_dict(config.init_record).loaded, config.init_record
    record = init_from_source(model, config.init_from, config.init_scheme, classes)
    if announce:
        print(f"vggnet train: {record.summary()}", file=sys.stderr, flush=True)
    return record.loaded, record.to_dict()


def build_scaler(runtime: Runtime) -> torch.amp.GradScaler | None:
    """fp16's gradient scaler (fp16 gradients underflow to 0 without one); None for fp32 and bf16, whose range is
    fp32's. Its state is checkpointed with the run (:func:`vggnet.training.state.save_state`)."""
    if runtime.precision != "fp16":
        return None
    return torch.amp.GradScaler(runtime.device.type)


def build_loader(config: TrainConfig, train: ImageDataset | StreamedSplit, dist: distributed.Dist,
                 runtime: Runtime) -> BatchLoader:
    """The rank's batches: from memory, or streamed (decoded and augmented per sample in worker processes)."""
    if isinstance(train, StreamedSplit):
        return streamed_data.loader(config, train, config.batch_size // dist.world_size, dist.rank, dist.world_size,
                                    runtime.device)
    return BatchLoader(train, config.batch_size // dist.world_size, shuffle=True, drop_last=True, seed=config.seed,
                       rank=dist.rank, world_size=dist.world_size, device=runtime.device)


def build_augment(config: TrainConfig, train: ImageDataset | StreamedSplit) -> Augment:
    """Whole-batch augmentation; a streamed set's crops and flips were made per sample, so only erasing remains."""
    if isinstance(train, StreamedSplit):
        return Augment(crop_padding=0, flip=False, scale_jitter=None, erasing=config.erasing)
    return Augment(crop_padding=config.crop_padding, flip=config.flip, scale_jitter=config.scale_jitter,
                   erasing=config.erasing)


def default_run_dir(config: TrainConfig) -> Path:
    dataset = config.dataset.replace("folder:", "").rstrip("/").split("/")[-1] or "folder"
    return Path("runs") / f"{config.model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def recorded_paths(runtime: Runtime, record: dict[str, Any] | None) -> Runtime:
    """``runtime`` with the paths precision auto's probe chose (``record``, config.json's ``precision_record``), in
    training and in its evaluation: GEMM small-map convs where they were faster, pool before ReLU, the same numbers
    (:mod:`vggnet.net.cpu_bf16`); and the memory layout, where the record is of this kind of device."""
    here = record is not None and record.get("device") == runtime.device.type
    return replace(runtime, small_map_convs=uses_small_map_convs(record),
                   channels_last=runs_channels_last(record if here else None, runtime.channels_last))


def build_run(config: TrainConfig, data: tuple[ImageDataset, ImageDataset] | None = None,
              saved_config: dict[str, Any] | None = None, reprobe: bool = False) -> Run:
    """A ready run for ``config`` (completed and validated here). ``data``: ``(train, test)`` already loaded.
    ``saved_config``: what config.json is to hold when it differs from ``config`` (a resumed session's).
    ``reprobe``: precision ``auto`` measured again rather than read from the cache (:mod:`vggnet.training.probe`)."""
    config = config.validate()  # a new, completed object: what this run records (config.json)
    dist = distributed.setup(config.device)
    rundir = RunDir(dist.broadcast_object(str(config.out or default_run_dir(config))))  # rank 0's timestamp
    config = replace(config, out=str(rundir.path))
    runtime = build_runtime(config, dist)
    # Its first window spans the data loading and model building below, so the first sync point (step 0) already
    # knows the load: a busy machine costs no slow steps at the start.
    threads = adaptive_threads(runtime, config.threads is not None, dist.enabled)
    if config.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {config.batch_size} (global) does not divide among {dist.world_size} "
                          f"processes: use a multiple of {dist.world_size}")
    train_set, val_set, test_set = build_data(config, data)
    if isinstance(train_set, StreamedSplit) and dist.is_main:  # the rule that chose the path, said once
        print(f"vggnet train: {config.dataset}: {len(train_set)} training images streamed from their shards "
              f"({streamed_data.RULE})", file=sys.stderr, flush=True)
    preprocess = build_preprocess(config, train_set)
    train_set, val_set, test_set = place_data(runtime, train_set, val_set, test_set)
    torch.manual_seed(config.seed)
    model = build_model(config, train_set)
    # Fail now, with the model's own message, if the images cannot go through it.
    model.check_input(torch.zeros(1, image_channels(train_set), config.image_size, config.image_size))
    loaded, init_record = start_weights(config, model, rundir, list(train_set.classes), dist.is_main)
    model = model.to(runtime.device)
    # precision auto: on a CPU with native bf16, measured on copies of this model (vggnet.training.probe)
    runtime, precision_record = decide_precision(config, runtime, dist, model, image_channels(train_set),
                                                 lambda net: build_optimizer(config, net), rundir.has_state(), reprobe,
                                                 threads=threads)
    runtime = recorded_paths(runtime, precision_record)
    model = model.to(memory_format=memory_format(runtime.channels_last))
    if runtime.cpu_bf16:
        tune_for_cpu_bf16(model, runtime.small_map_convs)
    frozen = freeze(model, config.freeze)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"--freeze {','.join(config.freeze)} leaves no parameter to train: freeze fewer layers")
    optimizer = build_optimizer(config, model, loaded)
    loader = build_loader(config, train_set, dist, runtime)
    if len(loader) == 0:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the training set ({len(train_set)} "
                          "images): lower it or raise --subset")
    # Recorded: the schedule's length (so that extending the run does not stretch it), what --init-from loaded and
    # what precision auto chose.
    config = replace(config, schedule_epochs=config.schedule_epochs or config.epochs, init_record=init_record,
                     precision_record=precision_record)
    net = dist.wrap(model, config.sync_bn)
    if runtime.compile:
        net = compile_module(net)  # the step's network; evaluation and checkpoints use the bare model
    hold_in_eval(model, frozen)  # after wrapping: SyncBatchNorm replaces the BN modules
    return Run(config=config, runtime=runtime, dist=dist, rundir=rundir,
               saved_config=saved_config if saved_config is not None else config.to_dict(),
               train_set=train_set, val_set=val_set, test_set=test_set, classes=list(train_set.classes),
               preprocess=preprocess,
               augment=build_augment(config, train_set),
               model=model, net=net, optimizer=optimizer, loader=loader,
               generator=torch.Generator(runtime.device), total_steps=config.schedule_epochs * len(loader),
               warmup_steps=int(config.warmup_epochs * len(loader)), scaler=build_scaler(runtime),
               threads=threads, card_preprocess=streamed_data.card_preprocess(config, preprocess)
               if isinstance(train_set, StreamedSplit) else None)
