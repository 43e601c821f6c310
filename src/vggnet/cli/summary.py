"""``vggnet summary NAME``: the per-layer table, totals, training memory and the largest batch for a budget."""

from __future__ import annotations

import argparse

import torch

from ..analysis import OPTIMIZER_STATE, parse_bytes, summarize
from ..models import create_model
from ..report import render_summary
from .common import add_model_options, model_kwargs, positive_int, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="per-layer shapes, activation memory, parameters, MACs; training memory")
    p.add_argument("name", help="model name (see `vggnet models`) or 'custom' with --arch")
    add_model_options(p)
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="batch size for the training-memory estimate (default 1)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATE), default="sgd",
                   help="optimizer for the estimate: sgd (momentum), adam, adamw, sgd-nomomentum")
    p.add_argument("--memory-budget", metavar="SIZE", help="report the largest batch within SIZE, e.g. 11GiB")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    with torch.device("meta"):
        model = create_model(args.name, **model_kwargs(args))
    summary = summarize(model)
    batch = args.batch_size or 1
    max_batch = summary.max_batch_size(budget, args.optimizer) if budget is not None else None
    if args.json:
        print_json(summary.to_dict(batch, args.optimizer, budget))
    else:
        print(render_summary(summary, summary.training_memory(batch, args.optimizer), budget, max_batch))
    return 0
