"""The bench's ``data`` section (issue 21): its quickest run, its records and its rendering. No timing is asserted:
timings depend on the machine and its load."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vggnet.bench import data as bench_data
from vggnet.bench import summarize_targets
from vggnet.bench.config import SECTIONS, TARGETS
from vggnet.bench.render import render_data
from vggnet.cli import main


def _positive(value):
    return isinstance(value, (int, float)) and value > 0


def test_quickest_data_section_measures_both_pipelines_on_the_same_images(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--only", "data", "--quick", "--rounds", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())["data"]
    assert (r["images"], r["batch"], r["rounds"], r["scale"], r["crop"]) == (12, 3, 1, 256, 224)
    assert [(row["name"], row["workers"]) for row in r["rows"]] == [("reference", 1), ("vggnet", 1),
                                                                    ("reference", 2), ("vggnet", 2)]
    for row in r["rows"]:
        assert row["images_per_epoch"] == [12] and row["images_per_call"] == 12  # every image, both pipelines
        assert row["output_shape"] == [3, 224, 224]
        assert row["precision"] == ("uint8" if row["name"] == "vggnet" else "float32")
        assert _positive(row["images_per_second"]) and _positive(row["ratio"])
        assert row["images_per_second_per_core"] == pytest.approx(row["images_per_second"] / row["workers"])
    per_core = {(row["name"], row["workers"]): row["images_per_second_per_core"] for row in r["rows"]}
    assert r["ratio"] == pytest.approx(per_core[("vggnet", 1)] / per_core[("reference", 1)])
    assert r["cores_to_feed"] == pytest.approx({name: 2200 / per_core[(name, 2)] for name in ("reference", "vggnet")})
    assert r["target_ratio"] == TARGETS["data_per_core_ratio"] == 1.5
    assert 60_000 < r["mean_file_bytes"] < 110_000  # photo-like JPEGs of 500x375 (about 80 KB), not noise
    assert "decode + augment: 12 JPEGs of 500x375" in text and "cores to feed 2200 images/s" in text
    assert "decode + augment, images/s per core vs ImageFolder + DataLoader" in text


def test_data_is_a_cpu_section_and_its_target_is_summarized():
    assert "data" in SECTIONS
    measured = (("reference", "float32", 1, 200.0, 1.5), ("vggnet", "uint8", 1, 300.0, 1.5),
                ("reference", "float32", 2, 400.0, 1.25), ("vggnet", "uint8", 2, 500.0, 1.25))
    r = {"rows": [{"name": name, "workers": w, "precision": p, "output_shape": [3, 224, 224],
                   "images_per_second": ips, "images_per_second_per_core": ips / w, "ratio": ratio}
                  for name, p, w, ips, ratio in measured],
         "ratio": 1.5, "cores_to_feed": {"reference": 11.0, "vggnet": 8.8}, "feed_rate": 2200.0, "images": 200,
         "image_size": [500, 375], "mean_file_bytes": 78000.0, "scale": 256, "crop": 224, "batch": 20,
         "reference_pipeline": "ref", "vggnet_pipeline": "vgg"}
    (row,) = [s for s in summarize_targets({"data": r}) if "per core" in s["target"]]
    assert row == {"target": "decode + augment, images/s per core vs ImageFolder + DataLoader", "measured": 1.5,
                   "goal": 1.5, "met": True}
    text = "\n".join(render_data(r))
    assert "1.50x" in text and "1.25x" in text and "250" in text and "reference 11.0, vggnet 8.8" in text


def test_synthetic_photos_are_deterministic_jpegs():
    first = bench_data.photo_jpeg(3)
    assert first == bench_data.photo_jpeg(3) and first != bench_data.photo_jpeg(4)
    with Image.open(io.BytesIO(first)) as image:
        assert (image.format, image.size, image.mode) == ("JPEG", (500, 375), "RGB")


def test_reference_pipeline_is_torchvisions_steps(tmp_path):
    """The reference written out: Resize(256) keeps the aspect ratio with torchvision's rounding, the crop and flip
    cut the resized image, ToTensor scales to [0, 1], and Lighting adds one RGB vector to every pixel."""
    pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    resized = np.asarray(image.resize((341, 256), Image.Resampling.BILINEAR)).astype(np.float32) / 255
    torch.manual_seed(5)
    plain = bench_data.ReferenceTrain(colour=0.0)(image)
    assert plain.shape == (3, 224, 224) and plain.dtype == torch.float32
    got = plain.permute(1, 2, 0).numpy()
    windows = [resized[top:top + 224, left:left + 224][:, ::-1 if flip else 1]
               for top in range(256 - 224 + 1) for left in range(341 - 224 + 1) for flip in (0, 1)]
    found = [w for w in windows if np.array_equal(got[0], w[0]) and np.array_equal(got, w)]  # first row first
    assert len(found) == 1  # one crop of the resized image, mirrored or not
    torch.manual_seed(5)
    shifted = bench_data.ReferenceTrain(colour=0.1)(image)
    delta = (shifted - plain).flatten(1)
    assert torch.allclose(delta, delta[:, :1].expand_as(delta)) and delta.abs().max() > 0


def test_both_datasets_list_the_folder_in_imagefolder_order(tmp_path):
    bench_data.write_folder(tmp_path, 5)
    assert [(p.split("/")[-2:], label) for p, label in bench_data.folder_samples(tmp_path)] == [
        (["class0", "000000.jpg"], 0), (["class0", "000002.jpg"], 0), (["class0", "000004.jpg"], 0),
        (["class1", "000001.jpg"], 1), (["class1", "000003.jpg"], 1)]
    ours = bench_data.VggnetFolder(tmp_path, bench_data.TrainTransform(256, 224))
    theirs = bench_data.ReferenceFolder(tmp_path, bench_data.ReferenceTrain())
    assert len(ours) == len(theirs) == 5 and ours[3][1] == theirs[3][1] == 1
    assert ours[0][0].shape == theirs[0][0].shape == (3, 224, 224)
