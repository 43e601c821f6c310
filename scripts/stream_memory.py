"""Peak resident memory of one streamed training epoch on a prepared set and on one 4x larger (issue 21's target:
growth < 10%). Writes two folders of small PNGs, prepares them, and trains each in a fresh process.

    python scripts/stream_memory.py [IMAGES] [WORKDIR]     # IMAGES for the small set (default 1600)
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vggnet.data.shards import prepare

CHILD = """
import json, sys
import vggnet.training as training
training.train(dataset=sys.argv[1], model="custom", arch=[4, "M", 8, "M"], head="gap", image_size=224, scale=[240],
               batch_size=8, epochs=1, lr=0.01, schedule="constant", workers=0, threads=1, device="cpu",
               precision="fp32", progress=False, out=sys.argv[2], eval_batch_size=8)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024}))
"""


def prepared_set(root: Path, images: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        folder = root / "images" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(images // 2):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    prepare(root / "images", root / "prepared", max_side=64, progress=False)
    return root / "prepared"


def main() -> None:
    images = int(sys.argv[1]) if len(sys.argv) > 1 else 1600
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="stream-memory-"))
    rows = {}
    for factor in (1, 4):
        data = prepared_set(work / f"x{factor}", images * factor)
        peaks = []
        for attempt in range(2):
            out = subprocess.run([sys.executable, "-c", CHILD, str(data), str(work / f"run{factor}-{attempt}")],
                                 capture_output=True, text=True, check=True).stdout
            peaks.append(json.loads(out.strip().splitlines()[-1])["peak_rss_mb"])
        rows[factor] = peaks
        print(f"{images * factor} images ({images * factor * 224 * 224 * 3 / 2**20:.0f} MB decoded at 224): "
              f"peak RSS {', '.join(f'{p:.0f}' for p in peaks)} MB")
    growth = min(rows[4]) / min(rows[1]) - 1
    print(f"growth of the peak for 4x the images: {100 * growth:+.1f}%")


if __name__ == "__main__":
    main()
