"""What GradSign measures: sign agreement, or the number of weights a gradient reaches?

Two stages:

    # per-arch GradSign beside its chance level (one forward/backward per sample; resumable: rows
    # already in the CSV are skipped, each finished arch is appended at once)
    python experiments/what_gradsign_measures.py excess --dataset cifar10 --archs runs/sample1000.txt \
        --limit 400 [--space nb201]

    # the page docs/what_gradsign_measures.md from the score store, the bundled GradSign scores and the
    # excess CSVs (computes nothing but a small timing sample)
    python experiments/what_gradsign_measures.py report --cache runs/nb201-scores.sqlite

The effective_params scores come from the score store, filled by
``gradsign correlate --archs runs/sample1000.txt --dataset DS --proxies effective_params
--cache runs/nb201-scores.sqlite`` (``runs/sample1000.txt``: the archs of ``--sample 1000 --seed 0``,
lines 2-1001 of the file ``experiments/all_arch_order.py`` writes).
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

OUT = Path("docs/what_gradsign_measures")
EXCESS_FIELDS = ("index", "arch", "samples", "weights", "reached", "full", "gradsign", "chance", "excess",
                 "ratio", "seconds")


def excess_path(space: str, dataset: str) -> Path:
    return OUT / f"excess_{space}_{dataset}.csv"


def run_excess(args: argparse.Namespace) -> None:
    """Append GradSign-vs-chance rows for the first ``--limit`` archs of ``--archs`` not yet in the CSV."""
    from gradsign.chance import chance_report, per_sample_sign_stats
    from gradsign.cli import read_arch_file
    from gradsign.evaluate import ScoringSetup

    torch.set_num_threads(args.threads)
    from gradsign.spaces import get_space

    space = get_space(args.space)
    setup = ScoringSetup(space, args.dataset, ("gradsign",), args.batch_size, args.seed)
    archs = [space.arch(space.index(a)) for a in read_arch_file(args.archs)][:args.limit]
    path = excess_path(space.name, args.dataset)
    done = set()
    if path.is_file():
        with open(path) as f:
            done = {row["arch"] for row in csv.DictReader(f)}
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(",".join(EXCESS_FIELDS) + "\n")
    inputs, targets = setup.batch()
    todo = [a for a in archs if a not in done]
    print(f"{args.dataset}: {len(done)} archs done, {len(todo)} to go", file=sys.stderr)
    for n, arch in enumerate(todo):
        start = time.perf_counter()
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            model = space.build(arch, num_classes=space.num_classes(args.dataset))
        stats = per_sample_sign_stats(model, inputs, targets, torch.nn.functional.cross_entropy)
        report = chance_report(stats, len(inputs)).to_dict()
        report.update(index=space.index(arch), arch=arch, seconds=time.perf_counter() - start)
        with open(path, "a") as f:
            f.write(",".join(repr(report[k]) if isinstance(report[k], float) else str(report[k])
                             for k in EXCESS_FIELDS) + "\n")
        if n % 25 == 0:
            print(f"{args.dataset}: {len(done) + n + 1}/{len(archs)}", file=sys.stderr)


def run_scores(args: argparse.Namespace) -> None:
    """Score ``--archs`` with ``--proxies`` through the score store (what ``gradsign correlate`` does,
    without the correlation): resumable, each finished arch is stored at once."""
    from gradsign.cli import read_arch_file
    from gradsign.evaluate import ScoringSetup, score_archs
    from gradsign.executors import make_executor
    from gradsign.spaces import get_space
    from gradsign.store import ScoreStore

    space = get_space(args.space)
    setup = ScoringSetup(space, args.dataset, tuple(args.proxies.split(",")), args.batch_size, args.seed)
    archs = [space.arch(space.index(a)) for a in read_arch_file(args.archs)][:args.limit]
    with ScoreStore(Path(args.cache)) as store:
        _, computed = score_archs(setup, archs, store, executor=make_executor("local", args.workers))
    print(f"{args.dataset}: {len(archs)} archs, {computed} computed", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("excess", help="GradSign beside its chance level, per arch (resumable)")
    p.add_argument("--space", default="nb201")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--archs", default="runs/sample1000.txt", help="arch file, one per line")
    p.add_argument("--limit", type=int, default=400, help="the first this many archs of the file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(run=run_excess)
    p = sub.add_parser("scores", help="proxy scores through the score store (resumable)")
    p.add_argument("--space", default="nb201")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--proxies", default="effective_params")
    p.add_argument("--archs", default="runs/sample1000.txt", help="arch file, one per line")
    p.add_argument("--limit", type=int, default=None, help="only the first this many archs of the file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", default="runs/nb201-scores.sqlite")
    p.set_defaults(run=run_scores)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
