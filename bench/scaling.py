"""Scoring throughput with 1 and 2 local workers and on Ray, and peak memory per scoring process.

All numbers come from one run of this script, so they are comparable as ratios:
- archs per second scoring the same NAS-Bench-201 archs with GradSign (no store), one torch thread
  per process: in this process, with a pool of 2 workers, and on a local 2-CPU Ray instance; the rate
  is taken from the first finished arch to the last, so pool start-up is reported separately;
- peak resident memory of a fresh process that scores the largest NAS-Bench-201 network at batch 64
  and 128 (fast and loop engines), minus the same process's peak before scoring; and its resident
  memory after that first score and after ``REPEATED_SCORES`` more of the same model (which must not
  grow: a process scores thousands of archs).

    python bench/scaling.py [--archs 24] [--dataset cifar10]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

LARGEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
REPEATED_SCORES = 10


def resident_mib() -> float:
    """This process's resident memory now (Linux), in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def throughput(executor, setup, archs) -> dict:
    inputs, targets = setup.batch()
    start = time.perf_counter()
    finished = []
    for _ in executor.imap(setup, inputs, targets, archs):
        finished.append(time.perf_counter())
    steady = (len(finished) - 1) / (finished[-1] - finished[0])
    return {"total_s": finished[-1] - start, "startup_s": finished[0] - start, "archs_per_s": steady}


def memory_child(engine: str, batch_size: int, dataset: str) -> None:
    import torch

    import gradsign
    from gradsign.datasets import canonical_batch
    from gradsign.spaces import get_space

    torch.set_num_threads(1)
    space = get_space("nb201")
    x, y = canonical_batch(dataset, batch_size, 0)
    torch.manual_seed(0)
    model = space.build(LARGEST, num_classes=space.num_classes(dataset))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gradsign.score(model, x, y, engine=engine)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    resident_first = resident_mib()
    for _ in range(REPEATED_SCORES):
        gradsign.score(model, x, y, engine=engine)
    print(json.dumps({"before_mib": before / 1024, "after_mib": after / 1024, "resident_first_mib": resident_first,
                      "resident_last_mib": resident_mib()}))


def memory(engine: str, batch_size: int, dataset: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--memory-child", engine, str(batch_size), dataset],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, default=24)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        engine, batch_size, dataset = args.memory_child
        memory_child(engine, int(batch_size), dataset)
        return

    from gradsign.evaluate import ScoringSetup
    from gradsign.executors import LocalExecutor, SerialExecutor
    from gradsign.spaces import get_space

    space = get_space("nb201")
    rng = np.random.default_rng(0)
    archs = [space.arch(int(i)) for i in rng.choice(len(space), args.archs, replace=False)]
    setup = ScoringSetup(space, args.dataset, ("gradsign",))
    print(f"GradSign on {args.archs} random NAS-Bench-201 archs, {args.dataset}, batch 64, one torch thread "
          "per process; rate from the first finished arch to the last")
    print("| executor | archs/s | vs 1 process | start-up s | total s |\n|---|---|---|---|---|")
    rows = {"1 process": throughput(SerialExecutor(threads=1), setup, archs),
            "local, 2 workers": throughput(LocalExecutor(2, threads=1), setup, archs)}
    if not args.no_ray:
        try:
            from gradsign.ray_executor import RayExecutor
            rows["Ray, 2 CPUs"] = throughput(RayExecutor(2, threads=1), setup, archs)
        except ValueError as error:
            print(f"(Ray skipped: {error})")
    base = rows["1 process"]["archs_per_s"]
    for name, r in rows.items():
        print(f"| {name} | {r['archs_per_s']:.2f} | {r['archs_per_s'] / base:.2f}x | {r['startup_s']:.1f} | "
              f"{r['total_s']:.1f} |")
    print(f"\nPeak resident memory of one scoring process, largest NB201 network ({LARGEST}), {args.dataset}")
    print(f"| engine | batch | before scoring MiB | peak MiB | scoring adds MiB | resident after 1 score MiB | "
          f"after {1 + REPEATED_SCORES} MiB |\n|---|---|---|---|---|---|---|")
    for engine in ("auto", "loop"):
        for batch_size in (64, 128):
            m = memory(engine, batch_size, args.dataset)
            print(f"| {engine} | {batch_size} | {m['before_mib']:.0f} | {m['after_mib']:.0f} | "
                  f"{m['after_mib'] - m['before_mib']:.0f} | {m['resident_first_mib']:.0f} | "
                  f"{m['resident_last_mib']:.0f} |")


if __name__ == "__main__":
    main()
