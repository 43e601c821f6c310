"""Write Fashion-MNIST (the Debian package's IDX files) as a folder of PNG files, train/ and test/ subfolders of
one folder per class: the input of issue 21's real-data equivalence check (vggnet data prepare, then a streamed
run against the in-memory one).

    python scripts/fashion_mnist_pngs.py OUT_DIR
"""

import sys
from pathlib import Path

from PIL import Image

from vggnet.data import load_dataset


def main() -> None:
    out = Path(sys.argv[1])
    train, test = load_dataset("fashion-mnist")
    for split, ds in (("train", train), ("test", test)):
        for c, name in enumerate(ds.classes):
            (out / split / f"{c}-{name.replace('/', '-')}").mkdir(parents=True, exist_ok=True)
        folders = sorted(p for p in (out / split).iterdir())
        for i in range(len(ds)):
            image = ds.images[i, 0].numpy()
            Image.fromarray(image).save(folders[int(ds.labels[i])] / f"{i:05d}.png")
    print(f"{len(train)} + {len(test)} PNG files in {out}")


if __name__ == "__main__":
    main()
