"""The GPU sections of ``vggnet bench --device cuda`` (issue #12), all in one process on the same GPU.

- ``gpu_epoch``: ``vggnet train --epochs 1`` (the default recipe, run by :func:`.e2e.vggnet_epoch` as the ``e2e``
  section runs it) against the typical GPU pipeline (:func:`.reference.reference_gpu_epoch`: per-sample transforms,
  ``DataLoader(num_workers=4, pin_memory=True)``, the same model, bf16 autocast, channels_last, SGD), each timed from
  the files to the test accuracy.
- ``gpu_step``: (a) VGG-16-BN at 224x224 (classic head, 1000 classes) on random images: vggnet's model through
  :func:`vggnet.training.train_step` against the reference in eager fp32 NCHW and in eager bf16 autocast +
  channels_last; (b) the module-overhead check: VGG-16-BN (classic head) at 32x32, batch 512, bf16 +
  channels_last, vggnet's module (:func:`vggnet.net.models.create_model`) and the reference's through the very same SGD
  step (:func:`.reference.sgd_train_step`) with the same weights, so their ratio is the module's own cost.
- ``gpu_infer``: VGG-16 at 224x224: the reference in eager fp32 and in eager bf16 autocast + channels_last against
  :func:`vggnet.evaluation.metrics.predict_logits` (the path of ``vggnet eval --precision auto`` on CUDA), with each one's
  logit error against fp32.

"bf16" is fp16 on a GPU without bf16 (:func:`amp_precision`). The comparison functions take their sizes and device
as arguments, so that the tests run them on the CPU at tiny sizes; the sections (``bench_gpu_*``) pick issue #12's.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from vggnet.bench.config import TARGETS, BenchConfig
from vggnet.bench.e2e import vggnet_epoch
from vggnet.bench.infer import logit_error
from vggnet.bench.reference import ReferenceVGG, epoch_model, forward_macs, reference_gpu_epoch, reference_train_step
from vggnet.bench.reference import autocast_to, sgd_train_step
from vggnet.bench.runs import first_batches, layout, preprocessed, quiet_stdout, vggnet_step
from vggnet.base.timing import Timing, comparison, interleaved
from vggnet.data import ImageDataset, Preprocess
from vggnet.evaluation.metrics import predict_logits
from vggnet.net.models import create_model, model_from_config
from vggnet.training import build_run, resolve_config

WORKERS = 4  # the typical GPU pipeline's DataLoader workers
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def amp_precision(device: str | torch.device) -> str:
    """The reduced precision of the typical GPU pipeline: bf16, fp16 on a GPU without bf16; fp32 off CUDA (tests)."""
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def start_gpu(device: str) -> dict[str, Any]:
    """Make ``device`` current and create its CUDA context now (the first section timed must not pay for it);
    returns what the GPU and its software are, for ``results["conditions"]``."""
    if torch.device(device).index is not None:  # "cuda" is the current device already; set_device needs an index
        torch.cuda.set_device(device)
    torch.ones(1, device=device).add_(1)
    torch.cuda.synchronize(device)
    props = torch.cuda.get_device_properties(device)
    return {"device": str(torch.device(device)), "gpu": props.name, "gpu_memory_bytes": props.total_memory,
            "gpu_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "torch": torch.__version__,
            "bf16_supported": torch.cuda.is_bf16_supported(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark}


def amp_label(precision: str) -> str:
    """How a reference runs at ``precision``: "bf16 autocast", "fp16 autocast", or plain "fp32" (CPU tests)."""
    return precision if precision == "fp32" else f"{precision} autocast"


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------- the epoch
def epoch_comparison(cfg: BenchConfig, device: str, subset: int | None, batch_size: int | None = None,
                     workers: int = WORKERS) -> dict[str, Any]:
    """vggnet's epoch (``vggnet train --epochs 1 --device DEVICE``) against the typical GPU pipeline on the same
    data and architecture; ``ratio``: the reference's wall seconds over vggnet's."""
    overrides = {"batch_size": batch_size} if batch_size else {}
    cfg.log(f"gpu_epoch: vggnet train --epochs 1 --device {device}")
    fast = vggnet_epoch(cfg, subset, device=device, **overrides)
    precision = amp_precision(device)
    cfg.log(f"gpu_epoch: typical GPU pipeline (Dataset + per-sample transforms + DataLoader(num_workers={workers}, "
            f"pin_memory=True), {amp_label(precision)}, channels_last)")
    reference = reference_gpu_epoch(cfg.data_dir, fast["model"], fast["train_config"], subset, device, precision,
                                    workers)
    model, train_config = fast.pop("model"), fast.pop("train_config")
    for side in (reference, fast):
        side["images_per_second"] = (side["train_images"] + side["test_images"]) / side["seconds"]
    with torch.device("meta"):  # the two pipelines' networks, built as each pipeline builds it
        parameters = {"reference": parameter_count(epoch_model(model)),
                      "vggnet": parameter_count(model_from_config(model))}
    return {"reference": reference, "vggnet": fast, "ratio": reference["seconds"] / fast["seconds"],
            "train_phase_ratio": fast["train_images_per_second"] / reference["train_images_per_second"],
            "model": {k: model[k] for k in ("name", "width", "head", "dropout", "in_channels", "input_size")},
            "parameters": parameters, "batch_size": train_config["batch_size"], "subset": subset,
            "workers": workers, "pin_memory": reference["pin_memory"], "device": device,
            "ratio_definition": "reference wall seconds / vggnet wall seconds, data files to test accuracy",
            "target_ratio": TARGETS["gpu_epoch_ratio"]}


def bench_gpu_epoch(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    subset = cfg.e2e_subset if cfg.e2e_subset is not None else cfg.pick(None, 1024)
    return epoch_comparison(cfg, cfg.device, subset, cfg.pick(None, 128))


# ------------------------------------------------------------------------------------------- training steps
def random_run(cfg: BenchConfig, run_dir: Path, device: str, name: str, size: int, batch: int, classes: int,
               width: float, head: str, batches: int = 4):
    """A :func:`vggnet.training.build_run` run of ``vggnet train --model NAME`` at ``size`` x ``size`` on
    ``device``, on random uint8 images: ``batches`` training batches and one test batch."""
    gen = torch.Generator().manual_seed(0)
    n = (batches + 1) * batch
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    names = [f"class {i}" for i in range(classes)]
    train = ImageDataset(images[batch:], labels[batch:], names, "random images")
    test = ImageDataset(images[:batch], labels[:batch], names, "random images (test)")
    config = resolve_config(None, model=name, width=width, head=head, image_size=size, batch_size=batch, epochs=1,
                            device=device, threads=cfg.threads, progress=False, out=str(run_dir))
    with quiet_stdout():
        return build_run(config, data=(train, test))


def step_comparison(cfg: BenchConfig, device: str, name: str = "vgg16_bn", size: int = 224, batch: int = 64,
                    classes: int = 1000, width: float = 1.0, head: str = "classic", rounds: int = 10,
                    warmup: int = 3) -> dict[str, Any]:
    """vggnet's training step (its model through :func:`vggnet.training.train_step`, as ``vggnet train`` runs it)
    against the reference network in eager fp32 NCHW and in eager autocast + channels_last, the same batches."""
    with tempfile.TemporaryDirectory(prefix="vggnet-bench-") as tmp:
        run = random_run(cfg, Path(tmp) / "run", device, name, size, batch, classes, width, head)
        batches = first_batches(run)
        config = run.model.config
        inputs = preprocessed(run, batches)
        amp = amp_precision(device)
        names = {"reference_fp32": "reference: eager fp32 NCHW",
                 "reference_amp": f"reference: eager {amp_label(amp)}, channels_last",
                 "vggnet": f"vggnet: train_step ({run.runtime.precision}, {layout(run)})"}
        fns = {"reference_fp32": reference_train_step(config, inputs, device),
               "reference_amp": reference_train_step(config, inputs, device, amp, channels_last=True),
               "vggnet": vggnet_step(run, batches)}
        times = interleaved(fns, rounds, warmup, device=device)
        flops = 3 * 2 * forward_macs(config, size) * batch
        precisions = {"reference_fp32": "fp32", "reference_amp": amp, "vggnet": run.runtime.precision}
        rows = {key: Timing(names[key], precisions[key], batch, times[key], flops).to_dict() for key in fns}
    ips = {key: row["images_per_second"] for key, row in rows.items()}
    return {**rows, "ratio_vs_fp32": ips["vggnet"] / ips["reference_fp32"],
            "ratio_vs_amp": ips["vggnet"] / ips["reference_amp"], "model": name, "head": head, "width": width,
            "input_size": size, "batch": batch, "classes": classes, "flops_per_step": flops,
            "flop_convention": "3 x forward; 2 FLOPs per MAC", "data": "random uint8 images",
            "target_vs_fp32": TARGETS["gpu_step_vs_fp32"], "target_vs_amp": TARGETS["gpu_step_vs_amp"]}


def module_comparison(device: str, name: str = "vgg16_bn", size: int = 32, batch: int = 512, classes: int = 10,
                      width: float = 1.0, head: str = "classic", precision: str | None = None, rounds: int = 10,
                      warmup: int = 3) -> dict[str, Any]:
    """vggnet's module and the reference's (the same architecture and weights) through the same SGD step
    (:func:`.reference.sgd_train_step`, autocast + channels_last) on the same random batches: ``ratio`` below 1
    is time vggnet's module itself costs per forward/backward."""
    precision = precision or amp_precision(device)
    torch.manual_seed(0)
    reference = ReferenceVGG(name, num_classes=classes, width=width, head=head, input_size=size)
    model = create_model(name, num_classes=classes, width=width, head=head, input_size=size)
    model.load_state_dict(reference.state_dict())  # strict: the same architecture, now the same weights
    gen = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(batch, 3, size, size, generator=gen).to(device),
               torch.randint(0, classes, (batch,), generator=gen).to(device)) for _ in range(2)]
    fns = {"reference": sgd_train_step(reference, inputs, device, precision, channels_last=True),
           "vggnet": sgd_train_step(model, inputs, device, precision, channels_last=True)}
    times = interleaved(fns, rounds, warmup, device=device)
    flops = 3 * 2 * forward_macs(model.config, size) * batch
    ref = Timing("reference: ReferenceVGG (nn.Sequential)", precision, batch, times["reference"], flops)
    fast = Timing("vggnet: vggnet.net.models.create_model", precision, batch, times["vggnet"], flops)
    return comparison(ref, fast, model=name, head=head, width=width, input_size=size, batch=batch, classes=classes,
                      layout="channels_last", flops_per_step=flops,
                      parameters={"reference": parameter_count(reference), "vggnet": parameter_count(model)},
                      target_ratio=TARGETS["gpu_module_ratio"])


def bench_gpu_step(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    rounds, warmup = cfg.n_rounds, cfg.pick(3, 1)
    cfg.log("gpu_step: VGG-16-BN 224x224 training step (vggnet train_step, reference fp32 and autocast)")
    large = step_comparison(cfg, cfg.device, batch=cfg.pick(64, 16), rounds=rounds, warmup=warmup)
    cfg.log("gpu_step: VGG-16-BN 32x32 module overhead (vggnet's module vs the reference's, the same step)")
    module = module_comparison(cfg.device, batch=cfg.pick(512, 128), rounds=rounds, warmup=warmup)
    return {"train_224": large, "module_32": module}


# ------------------------------------------------------------------------------------------------- inference
def infer_comparison(device: str, name: str = "vgg16", size: int = 224, batch: int = 64, classes: int = 1000,
                     width: float = 1.0, head: str = "classic", precision: str | None = None, rounds: int = 10,
                     warmup: int = 3) -> dict[str, Any]:
    """The reference (eager fp32; eager autocast + channels_last) against :func:`vggnet.evaluation.metrics.predict_logits`
    with the same weights on the same uint8 batch, already on ``device`` (the references get it preprocessed, so
    vggnet alone pays for preprocessing and for copying its logits to the host); logit errors against fp32."""
    precision = precision or amp_precision(device)
    torch.manual_seed(0)
    reference = ReferenceVGG(name, num_classes=classes, width=width, head=head, input_size=size).eval()
    model = create_model(name, num_classes=classes, width=width, head=head, input_size=size)
    model.load_state_dict(reference.state_dict())
    model.to(device).eval()
    reference.to(device)
    amp_reference = copy.deepcopy(reference).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1)).to(device)
    preprocess = Preprocess(size, IMAGENET_MEAN, IMAGENET_STD)
    x = preprocess(images)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def fp32() -> torch.Tensor:
        with torch.no_grad():
            return reference(x)

    def amp() -> torch.Tensor:
        with torch.no_grad(), autocast_to(device, precision):
            return amp_reference(x_cl)

    def fast() -> torch.Tensor:
        return predict_logits(model, images, preprocess, torch.device(device), precision, batch_size=batch,
                              channels_last=True)

    fns = {"reference_fp32": fp32, "reference_amp": amp, "vggnet": fast}
    expected = fp32().float().cpu()
    errors = {key: logit_errors(expected, fn().float().cpu()) for key, fn in fns.items() if key != "reference_fp32"}
    times = interleaved(fns, rounds, warmup, device=device)
    flops = 2 * forward_macs(model.config, size) * batch
    names = {"reference_fp32": "reference: eager fp32 NCHW, torch.no_grad",
             "reference_amp": f"reference: eager {amp_label(precision)}, channels_last, torch.no_grad",
             "vggnet": f"vggnet: predict_logits ({precision}, channels_last input)"}
    precisions = {"reference_fp32": "fp32", "reference_amp": precision, "vggnet": precision}
    rows = {key: dict(Timing(names[key], precisions[key], batch, times[key], flops).to_dict(), **errors.get(key, {}))
            for key in fns}
    ips = {key: row["images_per_second"] for key, row in rows.items()}
    return {**rows, "ratio_vs_fp32": ips["vggnet"] / ips["reference_fp32"],
            "ratio_vs_amp": ips["vggnet"] / ips["reference_amp"], "model": name, "head": head, "width": width,
            "input_size": size, "batch": batch, "classes": classes, "flops_per_batch": flops}


def logit_errors(expected: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """The largest absolute logit error against ``expected`` (fp32), with :func:`.infer.logit_error`'s measures."""
    return {"max_abs_error": float((got - expected).abs().max()), **logit_error(expected, got)}


def bench_gpu_infer(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    cfg.log("gpu_infer: VGG-16 224x224 inference (reference fp32 and autocast, vggnet predict_logits)")
    return infer_comparison(cfg.device, batch=cfg.pick(64, 16), rounds=cfg.n_rounds, warmup=cfg.pick(3, 1))
