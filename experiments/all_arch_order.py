"""Write the order in which the all-architecture GradSign job scores NAS-Bench-201 (runs/all_order.txt).

The 1,000 archs of `gradsign correlate --sample 1000 --seed 0` come first, then the rest shuffled with
seed 1, so every prefix of the finished work is a uniform random sample of the space.

    python experiments/all_arch_order.py [--out runs/all_order.txt]
"""
import argparse
from pathlib import Path

import numpy as np

from gradsign.spaces import get_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/all_order.txt")
    args = parser.parse_args()
    size = len(get_space("nb201"))
    first = np.random.default_rng(0).choice(size, 1000, replace=False)
    rest = np.random.default_rng(1).permutation(np.setdiff1d(np.arange(size), first))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("# sample-1000 (seed 0) first, then the rest shuffled (seed 1)\n"
                              + "\n".join(map(str, np.concatenate([first, rest]))) + "\n")


if __name__ == "__main__":
    main()
