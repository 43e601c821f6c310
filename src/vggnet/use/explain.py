"""Grad-CAM (Selvaraju et al., 2017): where in an image a VGG found its evidence for a class.

For a layer with feature maps ``A^k`` (k = channel) and the class score ``y^c`` (the logit, before the softmax):

    alpha_k = mean over (i, j) of  d y^c / d A^k_ij          (one weight per channel)
    cam     = ReLU( sum_k alpha_k A^k )                      (at the layer's resolution, h x w)

then ``cam`` is upsampled bilinearly to the input size and divided by its maximum, per image, so the map lies in
[0, 1] with 0 meaning "no positive evidence". A map with no positive value at all stays all zero (nothing to divide
by); :func:`grad_cam`'s callers see that as ``maps[i].max() == 0`` and say so.

How it runs: the layers up to the chosen one run without autograd; their output ``A`` becomes a fresh leaf that
requires grad, and only the rest of the network (the later layers and the head) runs with autograd, in fp32, in
eval mode (BatchNorm on its running statistics, no dropout). The gradient is taken with
:func:`torch.autograd.grad` with respect to ``A`` alone, so no parameter's ``.grad`` or ``requires_grad`` is
touched, and every module's train/eval flag is put back afterwards. The rest of the network starts from a copy of
``A``: the in-place ReLU that follows every conv (and BN) would otherwise overwrite the very map being explained.

Layer names are the model's ``layer_names`` (``conv5_3``, ``bn5_3``, ``relu5_3``, ``pool4`` ...). The default is
the last ReLU, i.e. the rectified output of the last conv: the most class-specific maps that still have a spatial
layout (the pool after it halves the resolution again, and the head then discards it). Earlier layers give finer but
less class-specific maps; a conv output (before BN and ReLU) also carries the negative responses that the network
itself cuts away.

Image files (:func:`explain_files`, ``vggnet explain``) are decoded and preprocessed as ``vggnet predict`` does;
each gets a PNG of the model's input (what it actually saw: padded, cropped or resized) with the heat map blended
on top (:func:`overlay`), and ``explain.json`` records class, probability, layer and peak per image.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vggnet.base.errors import ConfigError
from vggnet.base.files import atomic_write_bytes, atomic_write_json
from vggnet.base.guard import json_of, output_folder
from vggnet.evaluation.metrics import auto_batch_size
from vggnet.runtime import resolve_runtime

#: Name and version of explain.json.
FORMAT_NAME, FORMAT_VERSION = "vggnet-explain", 1
#: The listing explain writes into its folder.
JSON_NAME = "explain.json"
#: The ``Software`` text chunk of every PNG explain writes: how a later run knows the file is its own.
PNG_SOFTWARE = "vggnet explain"
#: The smaller side of a written PNG is upscaled (by a whole factor, nearest neighbour) to at least this many pixels.
MIN_DISPLAY = 224
#: The colour map of the heat (perceptually uniform: brightness grows with the map's value; 0 is black).
CMAP = "inferno"
#: More images than this get a progress bar (on terminals).
PROGRESS_MIN = 8


# ----------------------------------------------------------------------------------------------- layers, classes
def default_layer(model) -> str:
    """The last ReLU of ``model.features`` (the last conv's rectified output); see the module docstring."""
    relus = [name for name in model.layer_names if name.startswith("relu")]
    return relus[-1] if relus else list(model.layer_names)[-1]


def check_layer(model, layer: str | None) -> str:
    """``layer``, or the default for ``None``; an unknown name is one line listing the model's names."""
    if layer is None:
        return default_layer(model)
    if layer not in model.layer_names:
        raise ConfigError(f"unknown layer {layer!r}: {model.name} has {', '.join(model.layer_names)}")
    return layer


def resolve_class(value: int | str, classes: Sequence[str], num_classes: int) -> int:
    """A class index from an index (``3``, ``"3"``) or a class name of the model (exact, else ignoring case)."""
    if isinstance(value, str):
        text = value.strip()
        if text in classes:
            return list(classes).index(text)
        folded = [i for i, name in enumerate(classes) if name.casefold() == text.casefold()]
        if len(folded) == 1:
            return folded[0]
        try:
            value = int(text)
        except ValueError:
            shown = ", ".join(classes[:12]) + (f", ... ({len(classes)} classes)" if len(classes) > 12 else "")
            names = f"or a class name ({shown})" if classes else "(this model has no class names)"
            raise ConfigError(f"--class {value!r} is neither a class index 0..{num_classes - 1} {names}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_classes:
        raise ConfigError(f"class index must be an integer in 0..{num_classes - 1}, got {value!r}")
    return value


def _targets(target, logits: torch.Tensor) -> torch.Tensor:
    """Per-image class indices (N,): the top-1 class for ``None``, else one index for all or one per image."""
    n, num_classes = logits.shape
    if target is None:
        return logits.argmax(1)
    values = torch.as_tensor(target).reshape(-1).tolist()
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise ConfigError(f"target must be one class index or one per image ({n}), got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < num_classes:
            raise ConfigError(f"target class must be an integer in 0..{num_classes - 1}, got {v!r}")
    return torch.tensor(values, dtype=torch.long, device=logits.device)


# ------------------------------------------------------------------------------------------------------ Grad-CAM
def raw_grad_cam(model, x: torch.Tensor, layer: str | None = None, target=None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM at the layer's own resolution, before upsampling and normalisation.

    ``x``: a preprocessed float batch (N, C, H, W). ``target``: ``None`` (each image's top-1 class), a class index,
    or one index per image. Returns ``(cams, logits, classes)``: ``cams`` float32 (N, h, w) = ReLU(sum_k alpha_k
    A^k), the logits (N, classes) and the explained class of each image (N,)."""
    if torch.is_inference_mode_enabled():
        raise ConfigError("Grad-CAM needs gradients: call it outside torch.inference_mode()")
    layer = check_layer(model, layer)
    param = next(model.parameters())
    if param.dtype != torch.float32:
        raise ConfigError(f"Grad-CAM computes in float32, but the model's weights are {param.dtype}: pass a float32 "
                          "model (model.float() on a copy)")
    x = x.to(param.device, torch.float32)
    model.check_input(x)
    index = model.layer_names[layer]
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            activations = model.features[:index + 1](x)
        activations = activations.detach().requires_grad_(True)
        with torch.enable_grad():
            h = activations.clone()  # the in-place ReLU after a conv or BN must not overwrite A
            for module in model.features[index + 1:]:
                h = module(h)
            logits = model.forward_head(h)
            classes = _targets(target, logits.detach())
            score = logits.gather(1, classes[:, None]).sum()  # images are independent in eval mode
            (grads,) = torch.autograd.grad(score, activations)
    finally:
        for module, mode in modes:
            module.training = mode
    alpha = grads.mean((2, 3), keepdim=True)
    cams = (alpha * activations.detach()).sum(1).clamp_min(0)
    return cams, logits.detach(), classes


def normalise(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) maps -> (N, H, W) upsampled bilinearly and divided by their maximum; an all-zero map stays zero."""
    maps = F.interpolate(cams[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].clamp_min(0)
    top = maps.amax((1, 2), keepdim=True)
    return torch.where(top > 0, maps / top.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def grad_cam(model, x: torch.Tensor, layer: str | None = None, target=None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM maps of a preprocessed batch ``x`` (N, C, H, W) for ``layer`` (default :func:`default_layer`).

    Returns ``(maps, classes, probs)``: float32 (N, H, W) in [0, 1] (all zero where the class has no positive
    evidence at that layer), the explained class per image (``target``, else the top-1), and its softmax
    probability. The model's parameters and train/eval modes are left as they were."""
    cams, logits, classes = raw_grad_cam(model, x, layer, target)
    maps = normalise(cams, tuple(x.shape[-2:]))
    probs = logits.softmax(1).gather(1, classes[:, None])[:, 0]
    return maps.cpu(), classes.cpu(), probs.cpu()


def peak(cam: torch.Tensor, size: tuple[int, int]) -> tuple[int, int] | None:
    """Where the evidence is strongest: the centre of the largest cell of a raw (h, w) map (:func:`raw_grad_cam`),
    as (row, col) in an input of ``size`` (H, W); ``None`` for an all-zero map. At the layer's own resolution, so a
    2 x 2 map of a 32 x 32 input peaks at row/col 8 or 24, not at whichever pixel of a plateau comes first."""
    if not cam.max() > 0:
        return None
    h, w = cam.shape
    flat = int(cam.argmax())
    return int((flat // w + 0.5) * size[0] / h), int((flat % w + 0.5) * size[1] / w)


# ------------------------------------------------------------------------------------------------------ pictures
def overlay(image: np.ndarray, heatmap, alpha: float = 0.5, cmap: str = CMAP) -> np.ndarray:
    """``image`` uint8 (H, W, C) with C = 1 or 3, blended with the colour-mapped ``heatmap`` (values in [0, 1]; of
    another size it is resized bilinearly to H x W): ``(1 - alpha) * image + alpha * colour``; uint8 (H, W, 3)."""
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1] (0: the image only, 1: the heat map only), got {alpha}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ConfigError(f"overlay expects a uint8 (H, W, 1 or 3) image, got {image.dtype} {image.shape}")
    heat = torch.as_tensor(np.asarray(heatmap), dtype=torch.float32)
    if heat.dim() != 2:
        raise ConfigError(f"overlay expects an (H, W) heat map, got shape {tuple(heat.shape)}")
    h, w = image.shape[:2]
    if tuple(heat.shape) != (h, w):
        heat = F.interpolate(heat[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    colour = colormaps[cmap](heat.clamp(0, 1).numpy())[..., :3]  # float (H, W, 3) in [0, 1]
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    blended = (1.0 - alpha) * rgb.astype(np.float64) + alpha * 255.0 * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def model_input_images(x: torch.Tensor, prep) -> np.ndarray:
    """The preprocessed batch ``x`` (N, C, S, S) back in uint8 (N, S, S, C), RGB: what the model saw."""
    mean = torch.tensor(prep.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    pixels = (x * std + mean).mul(255.0).round().clamp(0, 255).to(torch.uint8)
    if prep.channel_order == "bgr":
        pixels = pixels.flip(1)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def write_overlay(path: str | os.PathLike, image: np.ndarray, heatmap, alpha: float = 0.5,
                  min_side: int = MIN_DISPLAY) -> tuple[int, int]:
    """The :func:`overlay` of ``image`` and ``heatmap`` as a PNG at ``path``, written atomically; the image is first
    enlarged by a whole factor (nearest neighbour, so pixels stay sharp) until its smaller side is at least
    ``min_side`` and the heat map is resampled smoothly to that size. Returns the PNG's (height, width)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    scale = max(1, math.ceil(min_side / min(image.shape[:2])))
    big = np.repeat(np.repeat(np.asarray(image), scale, axis=0), scale, axis=1)
    picture = overlay(big, heatmap, alpha)
    buffer = io.BytesIO()
    mark = PngInfo()
    mark.add_text("Software", PNG_SOFTWARE)
    Image.fromarray(picture, "RGB").save(buffer, format="PNG", pnginfo=mark)
    atomic_write_bytes(path, buffer.getvalue())
    return picture.shape[0], picture.shape[1]


def png_names(files: Sequence[str]) -> list[str]:
    """``<stem>.png`` per file; a stem already taken (ignoring case, for case-insensitive file systems) gets
    ``-2``, ``-3`` ... so that no output overwrites another."""
    taken: set[str] = set()
    names = []
    for file in files:
        stem = Path(file).stem or "image"
        name, n = f"{stem}.png", 1
        while name.casefold() in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name.casefold())
        names.append(name)
    return names


def written_by_explain(out_dir: str | os.PathLike):
    """``owned(path)`` for the files of ``out_dir``: explain.json when it is explain's listing, a PNG it lists, or a
    PNG with explain's ``Software`` chunk (an earlier run's, since dropped from the listing). A file PIL cannot
    open is not explain's (:func:`vggnet.base.guard.output_folder` takes any failure of the test as a no)."""
    from PIL import Image

    report = json_of(Path(out_dir) / JSON_NAME)
    entries = report.get("images") if isinstance(report, dict) and report.get("format") == FORMAT_NAME else None
    listed = {Path(e["png"]).name for e in (entries if isinstance(entries, list) else [])
              if isinstance(e, dict) and isinstance(e.get("png"), str)}

    def owned(path: Path) -> bool:
        if path.name == JSON_NAME:
            return isinstance(entries, list)
        with Image.open(path) as picture:
            return path.name in listed or (picture.format == "PNG" and picture.info.get("Software") == PNG_SOFTWARE)

    return owned


def check_out_dir(out_dir: str | os.PathLike, files: Sequence[str | os.PathLike] = (), create: bool = True) -> Path:
    """The output folder ``out_dir`` for explaining ``files`` (:func:`vggnet.base.guard.output_folder`): not a file,
    writable, and each PNG of :func:`png_names` and explain.json new or explain's own, never one of ``files``;
    created unless ``create`` is false. Call it before the work."""
    files = [str(f) for f in files]
    return output_folder(out_dir, names=[*png_names(files), JSON_NAME], inputs=files,
                         owned=written_by_explain(out_dir), create=create, writer="vggnet explain")


# ------------------------------------------------------------------------------------------------- image files
@dataclass
class Explanation:
    """One image's result: the explained class, its probability, the map's peak, and the PNG; or an error."""

    file: str
    png: str | None = None  # the path written
    index: int | None = None  # the explained class
    name: str | None = None
    prob: float | None = None
    predicted: dict | None = None  # {"index", "class", "prob"}: the top-1 class
    peak: tuple[int, int] | None = None  # (row, col) in the model's input (:func:`peak`); None: an all-zero map
    error: str | None = None

    @property
    def zero_map(self) -> bool:
        return self.error is None and self.peak is None

    def to_dict(self, layer: str) -> dict:
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        return {"file": self.file, "index": self.index, "class": self.name, "prob": self.prob,
                "predicted": self.predicted, "layer": layer, "png": self.png,
                "peak": None if self.peak is None else {"row": self.peak[0], "col": self.peak[1]},
                "zero_map": self.zero_map}


@dataclass
class ExplainResult:
    layer: str
    map_size: tuple[int, int] | None  # the layer's resolution (the heat map is upsampled from it); None: no image
    input_size: tuple[int, int]  # the model's input (the maps' and peaks' coordinates)
    images: list[Explanation]
    json_path: str | None = None

    @property
    def failed(self) -> list[Explanation]:
        return [e for e in self.images if e.error is not None]

    def to_dict(self, source: str | None = None, alpha: float = 0.5) -> dict:
        map_size = None if self.map_size is None else list(self.map_size)
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "source": source, "method": "grad-cam",
                "layer": self.layer, "map_size": map_size, "input_size": list(self.input_size), "alpha": alpha,
                "images": [e.to_dict(self.layer) for e in self.images]}


def _explain_batch(model, x: torch.Tensor, layer: str, target, prep, rows: list[tuple[Explanation, str]],
                   alpha: float, name_of) -> tuple[int, int]:
    """Grad-CAM of the preprocessed batch ``x``: row ``i`` fills in ``rows[i]``'s :class:`Explanation` and writes
    its PNG to ``rows[i]``'s path. Returns the layer's map size."""
    cams, logits, chosen = raw_grad_cam(model, x, layer, target)
    maps = normalise(cams, tuple(x.shape[-2:])).cpu()
    probs = logits.softmax(1).cpu()
    pictures = model_input_images(x, prep)
    for row, (r, png) in enumerate(rows):
        c, top = int(chosen[row]), int(probs[row].argmax())
        r.index, r.name, r.prob = c, name_of(c), float(probs[row, c])
        r.predicted = {"index": top, "class": name_of(top), "prob": float(probs[row, top])}
        r.peak = peak(cams[row].cpu(), tuple(x.shape[-2:]))
        r.png = png
        write_overlay(png, pictures[row], maps[row], alpha)
    return tuple(cams.shape[-2:])


def explain_files(loaded, files: Sequence[str | os.PathLike], out_dir: str | os.PathLike, layer: str | None = None,
                  target: int | str | None = None, alpha: float = 0.5, runtime=None, batch_size: int | None = None,
                  progress: bool = False, source: str | None = None) -> ExplainResult:
    """Grad-CAM of image files with a loaded model (:class:`~vggnet.store.card.LoadedModel`): one PNG per readable
    file in ``out_dir`` (:func:`png_names`), and ``out_dir/explain.json``. Files are decoded and preprocessed as
    ``vggnet predict`` does; an unreadable file gets its error and does not stop the others. ``target``: a class
    index or name for every image (default: each image's top-1). ``runtime``: where to run (fp32 regardless)."""
    from tqdm.auto import tqdm

    model = loaded.model
    layer = check_layer(model, layer)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1] (0: the image only, 1: the heat map only), got {alpha}")
    classes = list(loaded.classes)
    num_classes = model.num_classes
    if target is not None:
        target = resolve_class(target, classes, num_classes)
    files = [str(f) for f in files]
    out_dir = check_out_dir(out_dir, files)
    runtime = runtime or resolve_runtime("cpu", "fp32", threads=torch.get_num_threads())
    model.to(runtime.device)
    prep = loaded.preprocess
    batch_size = batch_size or min(64, auto_batch_size(prep.image_size, prep.image_size))
    results = [Explanation(f) for f in files]

    def name_of(i: int) -> str:
        return classes[i] if i < len(classes) else str(i)

    names = png_names(files)  # by input position, so a name never depends on which files were readable
    map_size = None
    bar = tqdm(total=len(files), unit="img", desc="explain", leave=False,
               disable=None if progress and len(files) > PROGRESS_MIN else True)
    try:
        for start in range(0, len(files), batch_size):
            batch = files[start:start + batch_size]
            images, where, errors = loaded.decode_files(batch)
            for position, message in errors:
                results[start + position].error = message
            if images is not None:
                rows = [(results[start + p], str(out_dir / names[start + p])) for p in where]
                map_size = _explain_batch(model, prep(images.to(runtime.device)), layer, target, prep, rows, alpha,
                                          name_of)
            bar.update(len(batch))
    finally:
        bar.close()
    size = prep.image_size
    result = ExplainResult(layer, map_size, (size, size), results)
    if any(r.error is None for r in results):  # nothing explained, nothing written
        result.json_path = str(out_dir / JSON_NAME)
        atomic_write_json(result.json_path, result.to_dict(source, alpha))
    return result
