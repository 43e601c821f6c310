"""``vggnet summary NAME``: the per-layer table, totals, training memory and the largest batch for a budget."""

from __future__ import annotations

import argparse

import torch

from vggnet.net.analysis import OPTIMIZER_STATE, parse_bytes, summarize
from vggnet.base.errors import ConfigError
from vggnet.net.models import create_model
from vggnet.net.report import render_summary
from vggnet.cli.common import add_model_options, batch_size_type, model_kwargs, print_json, shown

#: The largest --memory-budget: an exbibyte (a larger one would overflow the estimate's float arithmetic).
MAX_BUDGET = 2**60


def memory_size(text: str) -> int:
    """``--memory-budget``: a size :func:`vggnet.net.analysis.parse_bytes` reads, up to :data:`MAX_BUDGET`."""
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
                   help="optimizer for the estimate: sgd (momentum), adam, adamw, sgd-nomomentum")
    p.add_argument("--memory-budget", type=memory_size, metavar="SIZE",
                   help="report the largest batch within SIZE, e.g. 11GiB")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with torch.device("meta"):
        model = create_model(args.name, **model_kwargs(args))
    summary = summarize(model)
    batch = args.batch_size or 1
    budget = args.memory_budget
    max_batch = summary.max_batch_size(budget, args.optimizer) if budget is not None else None
    if args.json:
        print_json(summary.to_dict(batch, args.optimizer, budget))
    else:
        print(render_summary(summary, summary.training_memory(batch, args.optimizer), budget, max_batch))
    return 0
