"""``vggnet summary NAME``: the per-layer table, totals, training memory and the largest batch for a budget."""

from __future__ import annotations

import argparse

import torch

import vggnet.runtime as runtime  # runtime.pick_device looked up at call time (tests replace it)
from vggnet.base.errors import ConfigError
from vggnet.net.analysis import summarize
from vggnet.net.memory import DEVICES, OPTIMIZER_STATE, max_batch_size, parse_bytes, summary_dict, training_memory
from vggnet.net.models import create_model
from vggnet.net.report import render_summary
from vggnet.cli.common import add_model_options, batch_size_type, model_kwargs, print_json, shown

#: The largest --memory-budget: an exbibyte (a larger one would overflow the estimate's float arithmetic).
MAX_BUDGET = 2**60


def memory_size(text: str) -> int:
    """``--memory-budget``: a size :func:`vggnet.net.memory.parse_bytes` reads, up to :data:`MAX_BUDGET`."""
    try:
        size = parse_bytes(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if size > MAX_BUDGET:
        raise argparse.ArgumentTypeError(f"memory size {shown(text)} is more than {MAX_BUDGET} bytes (1 EiB)")
    return size


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="per-layer shapes, activation memory, parameters, MACs; training memory")
    p.add_argument("name", help="model name (see `vggnet models`) or 'custom' with --arch")
    add_model_options(p)
    p.add_argument("--batch-size", type=batch_size_type, default=None, metavar="N",
                   help="batch size for the training-memory estimate (default 1)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATE), default="sgd",
                   help="optimizer for the estimate: sgd (momentum; the default), adam, adamw, sgd-nomomentum")
    p.add_argument("--device", choices=sorted(DEVICES), default=None,
                   help="device the estimate is for (dropout masks and Adam's temporaries differ); default: the one "
                        "training would use here, cuda when available, else cpu")
    p.add_argument("--memory-budget", type=memory_size, metavar="SIZE",
                   help="report the largest batch within SIZE, e.g. 11GiB")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with torch.device("meta"):
        model = create_model(args.name, **model_kwargs(args))
    summary = summarize(model)
    batch, budget = args.batch_size or 1, args.memory_budget
    device = args.device or runtime.pick_device("auto").type  # the device `vggnet train` would train on here
    if args.json:
        print_json(summary_dict(summary, batch, args.optimizer, budget, device=device))
        return 0
    max_batch = max_batch_size(summary, budget, args.optimizer, device=device) if budget is not None else None
    print(render_summary(summary, training_memory(summary, batch, args.optimizer, device=device), budget, max_batch))
    return 0
