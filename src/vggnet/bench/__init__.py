"""``vggnet bench``: vggnet against what a user would otherwise write, in one process, on one machine.

Sections (``--only`` picks some), one module each:

- ``peak`` (:mod:`.peak`): FLOP/s of one large 3x3 convolution in fp32 and in bf16, the denominator of every
  "share of peak".
- ``train`` (:mod:`.train`): one training step of VGG-11-BN at 32x32, batch 128: an eager fp32 ``nn.Sequential``
  against :func:`vggnet.training.train_step`.
- ``infer`` (:mod:`.infer`): VGG-16 at 224x224, batch 8: eager fp32 against
  :func:`vggnet.evaluation.inference.optimize_for_inference`, with the logits' error.
- ``e2e`` (:mod:`.e2e`): one Fashion-MNIST epoch plus the test set, files to test accuracy: a user's Dataset +
  DataLoader pipeline against ``vggnet train --epochs 1``.
- ``memory`` (:mod:`.memory`): the analysis' training-memory estimate against measured peaks.
- ``ablation`` (:mod:`.ablation`): what each optimisation contributes (training step and inference, one change at
  a time).
- ``profile`` (:mod:`.ablation`): ``torch.profiler`` tables of vggnet's training step and inference.

With ``--device cuda`` (:mod:`.gpu`, docs/GPU.md) the sections are ``gpu_epoch`` (vggnet's epoch against the typical
GPU pipeline), ``gpu_step`` (VGG-16-BN at 224 against eager fp32 and bf16 + channels_last; the module check at
32x32), ``gpu_infer`` and ``memory`` (the estimate against ``torch.cuda.max_memory_allocated``).

The references (:mod:`.reference`) share no vggnet code on purpose; the vggnet side of the training sections uses
the public functions ``vggnet train`` itself runs (:mod:`.runs`). Counting and timing: :mod:`.timing`; machine,
load and bf16 support: :mod:`.conditions`. A measurement that needs bf16 convolutions on a CPU that cannot run them
is recorded as ``{"skipped": reason}`` and the rest of the bench runs.

Compute (:func:`run`) returns plain records (dicts); :func:`render` formats them.
"""

from vggnet.bench.config import DEFAULT_SECTIONS, SCHEMA, SECTIONS, TARGETS, BenchConfig
from vggnet.bench.reference import ReferenceVGG, forward_macs, read_idx_file
from vggnet.bench.render import render, summarize_targets
from vggnet.bench.runner import run
from vggnet.base.timing import Timing, comparison

__all__ = ["BenchConfig", "DEFAULT_SECTIONS", "ReferenceVGG", "SCHEMA", "SECTIONS", "TARGETS", "Timing", "comparison",
           "forward_macs", "read_idx_file", "render", "run", "summarize_targets"]
