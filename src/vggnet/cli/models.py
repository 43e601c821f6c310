"""``vggnet models``: the registry with parameter counts and GMACs at 224x224."""

from __future__ import annotations

import argparse

import torch

from vggnet.net.analysis import summarize
from vggnet.net.configs import CFGS
from vggnet.net.models import MODELS, create_model, list_models
from vggnet.net.report import table
from vggnet.cli.common import print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the VGG configurations with parameters and GMACs")
    p.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'vgg16*'")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    records = []
    for name in list_models(args.pattern):
        with torch.device("meta"):
            totals = summarize(create_model(name)).totals
        letter, bn = MODELS[name]
        convs = sum(not isinstance(t, str) for t in CFGS[letter])
        records.append({"name": name, "config": letter, "batch_norm": bn, "weight_layers": convs + 3,
                        "params": totals["params"], "gmacs_224": totals["macs"] / 1e9})
    if args.json:
        print_json(records)
        return 0
    rows = [[r["name"], r["config"], "yes" if r["batch_norm"] else "no", str(r["weight_layers"]), f"{r['params']:,}",
             f"{r['gmacs_224']:.3f}"] for r in records]
    print(table(["model", "config", "BN", "weight layers", "params", "GMACs@224"], rows, "lllrrr"))
    print("GMACs: 1 MAC = one multiply-add, conv and linear layers, 1000 classes, 224x224x3 input.")
    return 0
