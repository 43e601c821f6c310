"""The ``infer`` section: VGG-16 (classic head) at 224x224, batch 8.

Reference: the same network in eager fp32 NCHW under ``torch.no_grad``. vggnet:
:func:`vggnet.evaluation.inference.optimize_for_inference`, same weights, in the precision and bf16 variant that
precision ``auto``'s inference probe chooses on this machine (as ``vggnet eval --precision auto`` and ``vggnet
predict`` run; its defaults where the CPU has no native bf16); the relative error of its logits against the
reference is reported with the tolerance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vggnet.bench.config import TARGETS, BenchConfig
from vggnet.bench.reference import ReferenceVGG, forward_macs
from vggnet.base.probecache import candidate_of, variant_of, winner
from vggnet.base.timing import Timing, comparison, interleaved
from vggnet.evaluation import probe
from vggnet.evaluation.inference import BF16_RTOL, optimize_for_inference
from vggnet.net.models import create_model


def infer_models(name: str, input_size: int, head: str = "classic", seed: int = 0):
    """The reference network and the same weights in a vggnet model (torchvision state-dict layout), both eval."""
    torch.manual_seed(seed)
    reference = ReferenceVGG(name, head=head, input_size=input_size).eval()
    model = create_model(name, head=head, input_size=input_size)
    model.load_state_dict(reference.state_dict())
    if name.endswith("_bn"):  # give BN non-trivial running statistics, so folding has something to fold
        with torch.no_grad():
            for ref_bn, bn in zip((m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)),
                                  (m for m in model.modules() if isinstance(m, nn.BatchNorm2d))):
                for module in (ref_bn, bn):
                    gen = torch.Generator().manual_seed(bn.num_features)
                    module.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
                    module.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
                    module.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    return reference, model.eval()


def logit_error(reference_out: torch.Tensor, fast_out: torch.Tensor) -> dict[str, float]:
    """Relative L2 error of ``fast_out`` against ``reference_out`` and the share of equal top-1 predictions."""
    diff = (fast_out.float() - reference_out.float()).norm() / reference_out.float().norm()
    agree = (fast_out.argmax(1) == reference_out.argmax(1)).float().mean()
    return {"rel_l2_error": float(diff), "top1_agreement": float(agree)}


def inference_call(module: nn.Module, x: torch.Tensor, grad_mode=torch.inference_mode):
    """A no-argument function that runs ``module`` on ``x`` under ``grad_mode`` (inference mode by default)."""

    def call() -> None:
        with grad_mode():
            module(x)

    return call


def bench_infer(cfg: BenchConfig, results: dict[str, Any]) -> dict[str, Any]:
    name, size, batch, head = cfg.pick(("vgg16", 224, 8, "classic"), ("vgg11", 32, 2, "gap"))
    reference, model = infer_models(name, size, head)
    probed = inference_probe(model, size, batch)
    precision, small_maps, channels_last = variant_of(probed["chosen"]) if "chosen" in probed else ("auto", True, True)
    fast = optimize_for_inference(model, precision, channels_last, small_maps=small_maps)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_out = reference(x)
    with torch.inference_mode():
        fast_out = fast(x)
    flops = 2 * forward_macs(model.config, size) * batch
    times = interleaved({"reference": inference_call(reference, x, torch.no_grad), "vggnet": inference_call(fast, x)},
                        rounds=cfg.pick(6, 2), warmup=cfg.pick(2, 1))
    ref_t = Timing("reference: eager fp32 NCHW, torch.no_grad", "fp32", batch, times["reference"], flops)
    fast_t = Timing(f"vggnet: optimize_for_inference ({', '.join(fast.steps)})", fast.precision, batch,
                    times["vggnet"], flops)
    return comparison(ref_t, fast_t, model=name, head=head, input_size=size, batch=batch, flops_per_batch=flops,
                      steps=fast.steps, tolerance={"rel_l2_error_max": BF16_RTOL if fast.precision == "bf16" else 1e-5},
                      **logit_error(ref_out, fast_out), target_ratio=TARGETS["infer_ratio"],
                      precision_probe=dict(probed, runs_in=candidate_of(
                          {**probed, "precision": fast.precision, "small_map_convs": small_maps,
                           "channels_last": channels_last})))


def inference_probe(model: nn.Module, size: int, batch: int) -> dict[str, Any]:
    """What precision ``auto``'s inference probe (:mod:`vggnet.evaluation.probe`, as ``vggnet eval`` runs it) measures
    on this section's model and chooses (``chosen``, a :func:`~vggnet.base.probecache.candidate_names` name): its
    own functions, called once (never the cache); on a CPU without native bf16, fp32 in both layouts."""
    shape = (probe.probe_batch(batch, size), 3, size, size)
    seconds = probe.measure_candidates(model, shape, bf16=probe.bf16_candidate(torch.device("cpu")))
    return {"batch": shape[0], **{f"{name}_ms": 1000 * s for name, s in seconds.items()}, "chosen": winner(seconds),
            "unit": "batch"}
