"""Render analysis records as text tables. Computing lives in :mod:`vggnet.net.analysis` and
:mod:`vggnet.net.memory`; this only formats."""

from __future__ import annotations

from typing import Sequence

from vggnet.net.analysis import Summary
from vggnet.net.memory import TrainingMemory


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A plain-text table; ``align`` has one 'l' or 'r' per column."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def render_summary(summary: Summary, memory: TrainingMemory | None = None, budget: int | None = None,
                   max_batch: int | None = None) -> str:
    rows = [
        [r.name, r.type, "x".join(map(str, r.output_shape)), f"{r.activations:,}", human_bytes(r.activation_bytes),
         f"{r.params:,}", f"{r.macs:,}"]
        for r in summary.layers
    ]
    t = summary.totals
    rows.append(["total", "", "", f"{t['activations']:,}", human_bytes(t["activation_bytes"]), f"{t['params']:,}",
                 f"{t['macs']:,}"])
    headers = ["layer", "type", "output", "activations", f"act. memory ({summary.dtype})", "params", "MACs"]
    lines = [
        f"{summary.model_name}, input {'x'.join(map(str, summary.input_shape))} (per image)",
        table(headers, rows, "lllrrrr"),
        "",
        f"parameters: {t['params']:,} ({t['trainable_params']:,} trainable, {t['frozen_params']:,} frozen), "
        f"{human_bytes(4 * t['params'])} in fp32",
        f"multiply-adds: {t['macs'] / 1e9:.3f} GMACs per image (1 MAC = one multiply-add; conv and linear layers "
        "only, BN/ReLU/pool/LRN/dropout count 0)",
        f"activations: {t['activations']:,} values, {human_bytes(t['activation_bytes'])} per image "
        "(in-place layers count 0)",
    ]
    if summary.unsupported:
        lines.append(f"not counted (unknown layer types): {', '.join(summary.unsupported)}")
    if summary.uncalled:
        lines.append(f"layers with parameters never called: {', '.join(summary.uncalled)}")
    if memory is not None:
        lines += [
            "",
            f"training memory on {memory.device} ({memory.precision}), batch {memory.batch_size}, {memory.optimizer}: "
            f"{human_bytes(memory.total)}",
            f"  weights {human_bytes(memory.weights)} + gradients {human_bytes(memory.gradients)} + optimizer state "
            f"{human_bytes(memory.optimizer_state)} + activations kept for backward {human_bytes(memory.activations)}"
            f" + backward buffers {human_bytes(memory.backward_workspace)}",
        ]
    if budget is not None and max_batch is not None:
        lines.append(f"largest batch within {human_bytes(budget)}: {max_batch}")
    return "\n".join(lines)
