"""How much training throughput survives one competing CPU-bound process, per intra-op thread count (issue 13).

Times the default model's training step (quarter-width VGG-11-BN, batch 256, fp32, channels_last, foreach SGD) for
``--seconds`` per case, first on an idle machine, then beside one busy-looping process it starts itself, for each
thread count; prints img/s and the share of the best idle rate. Run it on a quiet machine:

    .venv/bin/python scripts/contention_probe.py [--threads 2,1] [--seconds 12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

STEP = r"""
import sys, time, torch
import torch.nn.functional as F
from vggnet.net.models import create_model
torch.set_num_threads(int(sys.argv[1]))
model = create_model("vgg11_bn", num_classes=10, in_channels=1, input_size=32, width=0.25, head="gap", dropout=0.0)
model = model.to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
x = torch.randn(256, 1, 32, 32).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (256,))
def step():
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
for _ in range(3):
    step()
start, n = time.perf_counter(), 0
while time.perf_counter() - start < float(sys.argv[2]):
    step()
    n += 1
print(n * 256 / (time.perf_counter() - start))
"""


def images_per_second(threads: int, seconds: float) -> float:
    out = subprocess.run([sys.executable, "-c", STEP, str(threads), str(seconds)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="2,1", help="comma-separated intra-op thread counts")
    parser.add_argument("--seconds", type=float, default=12.0, help="timed seconds per case")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    idle = {t: images_per_second(t, args.seconds) for t in counts}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        busy = {t: images_per_second(t, args.seconds) for t in counts}
    finally:
        hog.kill()
    best = max(idle.values())
    print("threads  idle img/s  busy img/s  busy / best idle")
    for t in counts:
        print(f"{t:7d}  {idle[t]:10.0f}  {busy[t]:10.0f}  {busy[t] / best:15.0%}")


if __name__ == "__main__":
    main()
