"""Write bundled CIFAR-10 training images as an image folder (ImageFolder layout: OUT/CLASS/NNNN.png).

    python examples/rank_cifar10/make_folder.py OUT [--per-class 50]

The images are the first ``--per-class`` images of each class in the package's bundled CIFAR-10 subset
(``gradsign/data/cifar10_1024.npz``, see its PROVENANCE.md); nothing is downloaded. Refuses to write into
a folder that already holds files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from gradsign.datasets import load_images

#: CIFAR-10 class names in label order (the dataset's batches.meta); sorted, they keep this order
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_folder(out: Path, per_class: int) -> int:
    """Write ``per_class`` PNGs per class under ``out``; returns the number written."""
    images, labels = load_images("cifar10")
    written = 0
    for label, name in enumerate(CLASSES):
        picked = np.flatnonzero(labels == label)[:per_class]
        if len(picked) < per_class:
            raise ValueError(f"only {len(picked)} bundled {name} images, asked for {per_class}")
        (out / name).mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(picked):
            Image.fromarray(images[i]).save(out / name / f"{k:04d}.png")
            written += 1
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=50,
                        help="images per class (at most 88: the rarest bundled class)")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        print(f"make_folder: error: {args.out} is not empty; choose a new folder", file=sys.stderr)
        return 2
    try:
        n = write_folder(args.out, args.per_class)
    except ValueError as error:
        print(f"make_folder: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {n} CIFAR-10 images ({args.per_class} per class) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
