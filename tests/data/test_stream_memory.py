"""Memory bounded by design (issue 21): a process whose data memory is capped below the size of its decoded
training set still trains an epoch on it from a prepared directory (the in-memory path would hold it whole)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from vggnet.data.shards import prepare

IMAGES, SIZE = 2600, 224  # 2,080 training and 520 test images: 391 MB decoded at 224 x 224 x 3
HEADROOM_MB = 300  # what the process may allocate beyond what it holds after importing vggnet

CHILD = textwrap.dedent("""
    import json, resource, sys
    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    import vggnet.training as training
    limit = vm("VmData:") + int(sys.argv[2]) * 2**20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    result = training.train(dataset=sys.argv[1], model="custom", arch=[4, "M", 8, "M"], head="gap",
                            image_size=int(sys.argv[3]), scale=[int(sys.argv[3]) + 16], batch_size=8, epochs=1,
                            lr=0.01, schedule="constant", workers=0, threads=1, device="cpu", precision="fp32",
                            progress=False, out=sys.argv[4], eval_batch_size=8)
    print(json.dumps({"seen": result["history"][-1]["epoch"], "limit": limit}))
""")


def test_an_epoch_on_a_prepared_set_larger_than_the_memory_the_process_may_use(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(2):
        folder = tmp_path / "images" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(IMAGES // 2):  # small files (64 x 48), decoded large (224 x 224)
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    manifest = prepare(tmp_path / "images", tmp_path / "prepared", max_side=64, progress=False)
    decoded = (manifest["splits"]["train"]["samples"] + manifest["splits"]["test"]["samples"]) * SIZE * SIZE * 3
    assert decoded > HEADROOM_MB * 2**20  # held in memory, the decoded set alone would not fit under the cap
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "prepared"), str(HEADROOM_MB), str(SIZE),
                            str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    assert json.loads(child.stdout.strip().splitlines()[-1])["seen"] == 1
    assert (tmp_path / "run" / "model.safetensors").is_file()
