"""Write real MNIST digits as PNG files in torchvision's ImageFolder layout (digits/train/<class>/, digits/val/<class>/).

    python make_digits.py [--data DIR] [--out digits] [--train 1500] [--val 500]

DIR is the data folder holding mnist/ (default: prunekit's own rule — $PRUNEKIT_DATA, else ../shared/data).
"""
from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from prunekit.data.paths import resolve_data_root


def read_idx(path: Path) -> np.ndarray:
    data = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="digits")
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--val", type=int, default=500)
    a = ap.parse_args()
    mnist = resolve_data_root(a.data) / "mnist"
    for split, prefix, n in (("train", "train", a.train), ("val", "t10k", a.val)):
        x = read_idx(mnist / f"{prefix}-images-idx3-ubyte.gz")
        y = read_idx(mnist / f"{prefix}-labels-idx1-ubyte.gz")
        for i in range(n):
            d = Path(a.out) / split / f"digit{y[i]}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(d / f"{i}.png")
    print(f"wrote {a.train} + {a.val} PNGs under {a.out}/")


if __name__ == "__main__":
    main()
