"""Text tables of :func:`vggnet.bench.run`'s results, and the targets of issues #4, #13 and #21 (CPU) and #12 (GPU)
against the measured values."""

from __future__ import annotations

from typing import Any

from vggnet.bench.config import TARGETS
from vggnet.net.report import human_bytes, table
from vggnet.base.probecache import label, timings


def summarize_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issues #4 and #12 with the measured value and whether it is met."""
    rows = []

    def add(target: str, measured: float | None, goal: float, higher_is_better: bool = True) -> None:
        if measured is None:
            return
        met = measured >= goal if higher_is_better else measured <= goal
        rows.append({"target": target, "measured": measured, "goal": goal, "met": bool(met)})

    if "train" in results:
        add("training step, images/s vs reference", results["train"]["ratio"], TARGETS["train_ratio"])
        add("training step, share of same-precision peak", results["train"]["vggnet"]["peak_share"],
            TARGETS["train_peak_share"])
    if "infer" in results:
        add("inference, images/s vs reference", results["infer"]["ratio"], TARGETS["infer_ratio"])
    if "e2e" in results:
        add("end-to-end epoch, wall time vs reference", results["e2e"]["ratio"], TARGETS["e2e_ratio"])
    if "contention" in results:
        add("training beside one busy process, share of quiet images/s", results["contention"]["share_default"],
            TARGETS["contention_share"])
        if "infer" in results["contention"]:
            add("inference beside one busy process, share of quiet images/s",
                results["contention"]["infer"]["share_default"], TARGETS["contention_share"])
    if "data" in results:
        add("decode + augment, images/s per core vs ImageFolder + DataLoader", results["data"]["ratio"],
            TARGETS["data_per_core_ratio"])
    if "gpu_epoch" in results:
        add("GPU epoch, wall time vs the typical GPU pipeline", results["gpu_epoch"]["ratio"],
            TARGETS["gpu_epoch_ratio"])
    if "gpu_step" in results:
        step = results["gpu_step"]["train_224"]
        add("GPU 224x224 training step, images/s vs eager autocast + channels_last", step["ratio_vs_amp"],
            TARGETS["gpu_step_vs_amp"])
        add("GPU 224x224 training step, images/s vs eager fp32", step["ratio_vs_fp32"], TARGETS["gpu_step_vs_fp32"])
        add("GPU 32x32 step, vggnet's module vs the reference's, images/s", results["gpu_step"]["module_32"]["ratio"],
            TARGETS["gpu_module_ratio"])
    if "memory" in results:
        for key, label in (("tensor_error", "profiler tensor peak"), ("rss_error", "peak RSS growth")):
            errors = [abs(r[key]) for r in results["memory"]["rows"] if key in r]
            if errors:
                add(f"memory estimate, largest error vs {label}", max(errors), TARGETS["memory_error"], False)
    return rows


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _gflops(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.0f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _peak(p: dict[str, Any]) -> str:
    return f"not measured ({p['skipped']})" if "skipped" in p else f"{_gflops(p['flop_per_second'])} GFLOP/s"


def render_header(results: dict[str, Any]) -> list[str]:
    c = results["conditions"]
    lines = [f"vggnet bench on {c['cpu']}, {c['threads']} threads of {c['cores']} cores, torch {c['torch']}, "
             f"bf16 native: {c['bf16_native']}{' (quick)' if results.get('quick') else ''}"]
    dispatch = [f"{p} {d['convolution']} ({d['isa']})" for p, d in (("fp32", c.get("onednn_fp32")),
                ("bf16", c.get("onednn_bf16"))) if d]
    if dispatch:
        cap = f", ONEDNN_MAX_CPU_ISA={c['onednn_max_cpu_isa']}" if c.get("onednn_max_cpu_isa") else ""
        lines.append(f"oneDNN convolutions: {', '.join(dispatch)}{cap}")
    if "gpu" in c:
        lines += render_gpu_header(c)
    loads = {k: v for k, v in c.get("other_load_cores", {}).items() if v is not None}
    if loads:
        lines.append("other processes' CPU use during each section (cores): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in loads.items()))
    if "peak" in results:
        p = results["peak"]
        lines += ["", f"peak: 3x3 conv {'x'.join(map(str, p['shape']))}, channels_last: "
                  f"fp32 {_peak(p['fp32'])}, bf16 {_peak(p['bf16'])}"]
    return lines


def render_gpu_header(c: dict[str, Any]) -> list[str]:
    """The GPU and its software (``--device cuda``)."""
    return [f"GPU {c['device']}: {c['gpu']} (compute capability {c['gpu_capability']}, "
            f"{c['gpu_memory_bytes'] / 2 ** 30:.0f} GiB), CUDA {c['cuda']}, cuDNN {c['cudnn']}, torch {c['torch']}, "
            f"bf16: {c['bf16_supported']}, TF32 matmul/cuDNN: {c['tf32_matmul']}/{c['tf32_cudnn']}"]


def render_comparisons(results: dict[str, Any]) -> list[str]:
    """The training step and inference against their references."""
    lines: list[str] = []
    rows = []
    for key, label in (("train", "training step"), ("infer", "inference")):
        if key not in results:
            continue
        r = results[key]
        for side in ("reference", "vggnet"):
            t = r[side]
            rows.append([label if side == "reference" else "", t["name"], t["precision"],
                         _fmt(t["images_per_second"]), _gflops(t["flop_per_second"]), _share(t["peak_share"]),
                         f"{r['ratio']:.2f}x" if side == "vggnet" else ""])
    if rows:
        lines += ["", table(["benchmark", "implementation", "prec", "images/s", "GFLOP/s", "of peak", "ratio"],
                            rows, "lllrrrr")]
    if "train" in results:
        r = results["train"]
        lines.append(f"training: {r['model']} ({r['head']} head, width {r['width']}), "
                     f"{r['input_size'][0]}x{r['input_size'][1]}x{r['in_channels']}, batch {r['batch']}, "
                     f"{r['flops_per_step'] / 1e9:.1f} GFLOP per step ({r['flop_convention']})")
    if "infer" in results:
        r = results["infer"]
        lines.append(f"inference: {r['model']} ({r['head']} head), {r['input_size']}x{r['input_size']}, batch "
                     f"{r['batch']}; logits vs reference: relative L2 error {r['rel_l2_error']:.2e} (tolerance "
                     f"{r['tolerance']['rel_l2_error_max']:g}), top-1 agreement {100 * r['top1_agreement']:.0f}%")
    lines += [_probe_line(results[key]["precision_probe"], key) for key in ("train", "infer")
              if "precision_probe" in results.get(key, {})]
    return lines


def _probe_line(p: dict[str, Any], key: str) -> str:
    """precision auto's probe (issue 22): each candidate's time and its choice, beside the vggnet row's precision."""
    what = {"train": "training probe", "infer": "inference probe"}[key]
    if "skipped" in p:
        return f"precision auto ({what}): not measured ({p['skipped']})"
    row = "trains" if key == "train" else "runs"
    times = timings(p, " ms")
    chosen, runs_in = (label(p[k]) for k in ("chosen", "runs_in"))
    return (f"precision auto ({what}): {times} per {p['unit']} of {p['batch']} -> {chosen}; the vggnet row {row} in "
            f"{runs_in}")


def render_e2e(r: dict[str, Any]) -> list[str]:
    rows = []
    for side in ("reference", "vggnet"):
        t = r[side]
        rows.append([side, f"{t['seconds']:.1f}", f"{t['train_seconds']:.1f}", _fmt(t["images_per_second"]),
                     _fmt(t["train_images_per_second"]), f"{100 * t['test_acc']:.2f}%",
                     f"{r['ratio']:.2f}x" if side == "vggnet" else ""])
    m = r["model"]
    return ["", f"end to end: one Fashion-MNIST epoch ({r['subset'] or 'all'} training images, batch "
            f"{r['batch_size']}) + test set, {m['name']} width {m['width']} {m['head']} head",
            table(["pipeline", "wall s", "train s", "images/s", "train img/s", "test acc", "ratio"], rows,
                  "lrrrrrr"),
            f"vggnet train recorded train_images_per_second = "
            f"{r['vggnet']['recorded_train_images_per_second']:.0f} "
            f"(train phase {r['train_phase_ratio']:.2f}x the reference's)"]


def render_gpu_epoch(r: dict[str, Any]) -> list[str]:
    rows = []
    for side in ("reference", "vggnet"):
        t = r[side]
        rows.append([side, t["precision"], f"{t['seconds']:.1f}", f"{t['train_seconds']:.1f}",
                     _fmt(t["images_per_second"]), _fmt(t["train_images_per_second"]), f"{100 * t['test_acc']:.2f}%",
                     f"{r['ratio']:.2f}x" if side == "vggnet" else ""])
    m, precision = r["model"], r["reference"]["precision"]
    return ["", f"GPU epoch: one Fashion-MNIST epoch ({r['subset'] or 'all'} training images, batch "
            f"{r['batch_size']}) + test set on {r['device']}, {m['name']} width {m['width']} {m['head']} head; "
            f"reference: the typical GPU pipeline (DataLoader, {r['workers']} workers"
            f"{', pinned memory' if r['pin_memory'] else ''}, {precision}{'' if precision == 'fp32' else ' autocast'}, "
            "channels_last)",
            table(["pipeline", "prec", "wall s", "train s", "images/s", "train img/s", "test acc", "ratio"], rows,
                  "llrrrrrr")]


def _tflops(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e12:.1f}"


def render_gpu_step(step: dict[str, Any]) -> list[str]:
    r, m = step["train_224"], step["module_32"]
    rows = []
    for key in ("reference_fp32", "reference_amp", "vggnet"):
        t = r[key]
        ratios = f"{r['ratio_vs_fp32']:.2f}x / {r['ratio_vs_amp']:.2f}x" if key == "vggnet" else ""
        rows.append([t["name"], t["precision"], _fmt(t["images_per_second"]), _tflops(t["flop_per_second"]), ratios])
    module_rows = [[m[side]["name"], m[side]["precision"], _fmt(m[side]["images_per_second"]),
                    _tflops(m[side]["flop_per_second"]), f"{m['ratio']:.2f}x" if side == "vggnet" else ""]
                   for side in ("reference", "vggnet")]
    return ["", f"GPU training step: {r['model']} ({r['head']} head), {r['input_size']}x{r['input_size']}, "
            f"{r['classes']} classes, batch {r['batch']}, {r['data']}",
            table(["implementation", "prec", "images/s", "TFLOP/s", "vs fp32 / vs autocast"], rows, "llrrr"),
            "", f"GPU module overhead: {m['model']} ({m['head']} head), {m['input_size']}x{m['input_size']}, batch "
            f"{m['batch']}, the same SGD step ({m['layout']}) on both modules",
            table(["module", "prec", "images/s", "TFLOP/s", "ratio"], module_rows, "llrrr")]


def render_gpu_infer(r: dict[str, Any]) -> list[str]:
    rows = []
    for key in ("reference_fp32", "reference_amp", "vggnet"):
        t = r[key]
        rows.append([t["name"], t["precision"], _fmt(t["images_per_second"]), _tflops(t["flop_per_second"]),
                     _fmt(t.get("max_abs_error"), ".2e"),
                     f"{100 * t['top1_agreement']:.0f}%" if "top1_agreement" in t else "-",
                     f"{r['ratio_vs_fp32']:.2f}x / {r['ratio_vs_amp']:.2f}x" if key == "vggnet" else ""])
    return ["", f"GPU inference: {r['model']} ({r['head']} head), {r['input_size']}x{r['input_size']}, batch "
            f"{r['batch']}; logit errors against the fp32 reference",
            table(["implementation", "prec", "images/s", "TFLOP/s", "max |logit error|", "top-1 agree",
                   "vs fp32 / vs autocast"], rows, "llrrrrr")]


def render_memory(memory: dict[str, Any]) -> list[str]:
    rows = []
    for row in memory["rows"]:
        rows.append([row["model"], row["head"], str(row["input_size"]), str(row["batch"]),
                     human_bytes(row["estimate_bytes"]),
                     human_bytes(row["tensor_peak_bytes"]) if row.get("tensor_peak_bytes") else "-",
                     _fmt(100 * row["tensor_error"], "+.1f") + "%" if "tensor_error" in row else "-",
                     human_bytes(row["rss_peak_bytes"]),
                     _fmt(100 * row["rss_error"], "+.1f") + "%" if "rss_error" in row else "-"])
    return ["", "training memory, fp32 eager NCHW, SGD with momentum: estimate vs measured peak",
            table(["model", "head", "size", "batch", "estimate", "tensors (profiler)", "error", "RSS growth",
                   "error"], rows, "lllrrrrrr")]


def render_ablation(a: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key, title in (("train", "ablation, training step"), ("infer", "ablation, inference")):
        if key not in a:
            continue
        rows = [[r["name"], r["precision"], "-", "-", "-", "skipped"] if "skipped" in r else
                [r["name"], r["precision"], _fmt(r["images_per_second"]), _gflops(r["flop_per_second"]),
                 _share(r["peak_share"]), f"{r['ratio']:.2f}x"] for r in a[key]]
        if key == "infer":
            extra = f" ({a['infer_model']['model']}, {a['infer_model']['input_size']}px, batch " \
                    f"{a['infer_model']['batch']})"
        else:
            extra = ""
        lines += ["", title + extra, table(["variant", "prec", "images/s", "GFLOP/s", "of peak", "vs ref"],
                                           rows, "llrrrr")]
        lines += sorted({f"skipped: {r['skipped']}" for r in a[key] if "skipped" in r})
    return lines


def render_profile(profile: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    sweep = profile.get("small_map_sweep", [])
    title = "3x3 conv forward + backward, bf16 channels_last{}: oneDNN vs im2col + GEMM"
    if isinstance(sweep, dict) and "skipped" in sweep:
        lines += ["", f"{title.format('')}: not measured ({sweep['skipped']})"]
    elif sweep:
        rows = [[f"{r['in_channels']}->{r['out_channels']}", f"{r['size']}x{r['size']}", f"{r['onednn_ms']:.1f}",
                 f"{r['gemm_ms']:.1f}", _gflops(r["onednn_flop_per_second"]), _gflops(r["gemm_flop_per_second"]),
                 f"{r['gemm_speedup']:.2f}x"] for r in sweep]
        lines += ["", title.format(f", batch {sweep[0]['batch']}"),
                  table(["channels", "map", "oneDNN ms", "GEMM ms", "oneDNN GF/s", "GEMM GF/s", "GEMM speed-up"],
                        rows, "llrrrrr")]
    for key, rows_ in profile.items():
        if not isinstance(rows_, list) or key == "small_map_sweep":
            continue
        rows = [[r["op"][:48], f"{r['self_ms_per_call']:.1f}", _share(r["share"])] for r in rows_]
        lines += ["", f"profile: {key} (self CPU time per call)", table(["op", "ms", "share"], rows, "lrr")]
    return lines


def render_data(r: dict[str, Any]) -> list[str]:
    """Decode + augment per core: the reference pipeline and vggnet's, with each worker count."""
    rows = [[row["name"], str(row["workers"]), f"{row['precision']} {'x'.join(map(str, row['output_shape']))}",
             _fmt(row["images_per_second"]), _fmt(row["images_per_second_per_core"]),
             f"{row['ratio']:.2f}x" if row["name"] == "vggnet" else ""] for row in r["rows"]]
    cores = ", ".join(f"{name} {value:.1f}" for name, value in r["cores_to_feed"].items())
    return ["", f"decode + augment: {r['images']} JPEGs of {r['image_size'][0]}x{r['image_size'][1]} "
                f"({r['mean_file_bytes'] / 1000:.0f} KB each), rescaled to S = {r['scale']}, {r['crop']} crops, "
                f"flip, colour shift; batch {r['batch']}",
            f"reference: {r['reference_pipeline']}", f"vggnet: {r['vggnet_pipeline']}",
            table(["pipeline", "workers", "output", "images/s", "per core", "ratio"], rows, "lrlrrr"),
            f"cores to feed {r['feed_rate']:.0f} images/s (a VGG-16 step at 224 on an H100, bf16): {cores}"]


def render_contention(r: dict[str, Any]) -> list[str]:
    """The three contention runs: quiet, beside a busy process on every core, beside it with default threads."""
    rows = []
    for key, label in (("idle", "quiet machine, default threads"), ("busy_all_cores", f"beside {r['competitor']}, "
                       f"--threads {r['cores']}"), ("busy_default", f"beside {r['competitor']}, default threads")):
        t = r[key]
        rows.append([label, _fmt(t["train_images_per_second"]), str(t["threads_at_end"]),
                     _share(t["train_images_per_second"] / r["idle"]["train_images_per_second"])])
    lines = ["", f"contention: vggnet train --epochs 1 --subset {r['subset']} --batch-size {r['batch_size']} on "
                 f"{r['cores']} cores", table(["run", "train images/s", "threads at end", "of quiet"], rows, "lrrr")]
    if "infer" in r:  # issue 22: vggnet eval's forward passes, the same three conditions
        i = r["infer"]
        rows = [[row[0], _fmt(i[key]["images_per_second"]), str(i[key]["threads_at_end"]),
                 _share(i[key]["images_per_second"] / i["idle"]["images_per_second"])]
                for row, key in zip(rows, ("idle", "busy_all_cores", "busy_default"))]
        lines += [f"inference: vggnet eval's forward passes over {i['images']} test images, batch {i['batch_size']}, "
                  f"{i['precision']}", table(["run", "eval images/s", "threads at end", "of quiet"], rows, "lrrr")]
    return lines


def render(results: dict[str, Any]) -> str:
    """Text tables of :func:`vggnet.bench.run`'s results."""
    lines = render_header(results) + render_comparisons(results)
    if "e2e" in results:
        lines += render_e2e(results["e2e"])
    for key, render_gpu in (("gpu_epoch", render_gpu_epoch), ("gpu_step", render_gpu_step),
                            ("gpu_infer", render_gpu_infer)):
        if key in results:
            lines += render_gpu(results[key])
    if "data" in results:
        lines += render_data(results["data"])
    if "memory" in results:
        lines += render_memory(results["memory"])
    if "contention" in results:
        lines += render_contention(results["contention"])
    if "ablation" in results:
        lines += render_ablation(results["ablation"])
    if "profile" in results:
        lines += render_profile(results["profile"])
    if results.get("summary"):
        rows = [[s["target"], f"{s['measured']:.3g}", f"{s['goal']:g}", "met" if s["met"] else "NOT met"]
                for s in results["summary"]]
        lines += ["", table(["target", "measured", "goal", ""], rows, "lrrl")]
    return "\n".join(lines)
