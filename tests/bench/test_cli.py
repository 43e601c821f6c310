"""``vggnet bench``: the quick run's keys, and its command line.

Nothing here asserts a time or a speed-up: timings depend on the machine and its load.
"""

import json

import numpy as np
import pytest

from vggnet.bench import render
from vggnet.bench.conditions import BF16_UNSUPPORTED
from vggnet.cli import main
from vggnet.runtime import cpu_runs_bf16

GRAY_VGG11_32_MACS = 151_589_888  # VGG-11 at 32x32, one input channel, GAP head: counted by hand in test_timing.py


@pytest.fixture
def fake_fashion_mnist(tmp_path, data_write_idx):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 64)):
        data_write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), gz=True)
        data_write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), gz=True)
    return tmp_path


def _positive(value):
    return isinstance(value, (int, float)) and value > 0


def test_quick_bench_json_has_the_documented_keys(fake_fashion_mnist, tmp_path, capsys):
    out = tmp_path / "bench.json"
    # One thread: two OpenMP threads collapse when another process is busy, and this is only a smoke run.
    assert main(["bench", "--quick", "--json", "--threads", "1", "--data-dir", str(fake_fashion_mnist),
                 "--out", str(out), "--only", "peak,train,infer,e2e,memory,ablation"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    r = printed
    assert r["schema"] == 1 and r["quick"] is True
    assert {"cpu", "cores", "threads", "torch", "bf16_native", "other_load_cores"} <= set(r["conditions"])
    assert {"bf16_convolutions", "cpu_capability", "onednn_max_cpu_isa"} <= set(r["conditions"])
    bf16_runs = cpu_runs_bf16()
    assert r["conditions"]["bf16_convolutions"] is bf16_runs
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and not bf16_runs:  # recorded as not measurable here, not a crash
            assert r["peak"]["bf16"] == {"skipped": BF16_UNSUPPORTED}
            continue
        assert _positive(r["peak"][precision]["flop_per_second"])
    assert r["peak"]["flops_per_call"] == 2 * 4 * 64 * 64 * 9 * 28 * 28
    for section in ("train", "infer"):
        for side in ("reference", "vggnet"):
            for key in ("images_per_second", "flop_per_second", "peak_share", "seconds_median"):
                assert _positive(r[section][side][key]), (section, side, key)
        assert _positive(r[section]["ratio"])
    t = r["train"]
    assert t["model"] == "vgg11_bn" and t["head"] == "gap" and t["in_channels"] == 1 and t["batch"] == 16
    assert t["flops_per_step"] == 3 * 2 * GRAY_VGG11_32_MACS * 16
    assert r["infer"]["rel_l2_error"] < r["infer"]["tolerance"]["rel_l2_error_max"]
    e = r["e2e"]
    for side in ("reference", "vggnet"):
        for key in ("seconds", "train_seconds", "images_per_second", "train_images_per_second"):
            assert _positive(e[side][key]), (side, key)
        assert 0 <= e[side]["test_acc"] <= 1
    assert _positive(e["ratio"]) and _positive(e["vggnet"]["recorded_train_images_per_second"])
    assert e["vggnet"]["train_images"] == 256 and e["reference"]["train_images"] == 256
    assert e["vggnet"]["test_images"] == e["reference"]["test_images"] == 64
    (row,) = r["memory"]["rows"]
    assert row["estimate_bytes"] == row["estimate"]["total"] > 0
    assert _positive(row["rss_peak_bytes"])
    for key in ("train", "infer"):
        rows = r["ablation"][key]
        skipped = [v for v in rows if "skipped" in v]
        assert all(v["precision"] == "bf16" and v["skipped"] == BF16_UNSUPPORTED for v in skipped)
        assert bool(skipped) is not bf16_runs  # exactly the bf16 variants, where bf16 cannot run
        assert all(_positive(v["images_per_second"]) and _positive(v["ratio"]) for v in rows if v not in skipped)
    assert {s["target"] for s in r["summary"]} >= {"training step, images/s vs reference",
                                                   "inference, images/s vs reference",
                                                   "end-to-end epoch, wall time vs reference"}
    text = render(r)
    assert "training step" in text and "end to end" in text and "training memory" in text


def test_bench_rejects_unknown_sections(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--only", "peak,nonsense"])
    assert exc.value.code == 2
    assert "nonsense" in capsys.readouterr().err


def test_an_unwritable_out_is_refused_before_any_section_runs(tmp_path, capsys, monkeypatch):
    import vggnet.cli.bench as cli_bench

    monkeypatch.setattr(cli_bench, "run", lambda cfg: pytest.fail("the bench ran before --out was checked"))
    (tmp_path / "folder").mkdir()
    assert main(["bench", "--only", "peak", "--out", str(tmp_path / "folder")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "it is a folder" in err
