"""``gradsign search``: simulated NAS on a benchmark, plain or assisted by a proxy (GradSign paper, Table 6).

``add_search_command(subparsers)`` registers the subcommand on the main parser; ``cmd_search(args)`` runs it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gradsign.search.hyperband import PROTOCOLS
from gradsign.search.run import ALGORITHMS


def _parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (numbers, true/false), else as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_search_command(subparsers) -> argparse.ArgumentParser:
    """Add the ``search`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "search", help="simulated NAS on a benchmark, optionally assisted by a proxy (GradSign paper, Table 6)",
        description="Repeat a simulated search: each evaluation returns the 12-epoch validation accuracy and "
                    "is charged its benchmark training time plus one validation pass; reports the 200-epoch "
                    "accuracies of the best arch found. Hyperband/BOHB follow the benchmark's scripts "
                    "(HpBandSter, eta 3, rungs 22.2/66.7/200, every rung a 12-epoch look-up) unless "
                    "--protocol two-fidelity asks for real 200-epoch evaluations.")
    p.add_argument("--space", default="nb201", help="search space (default nb201)")
    p.add_argument("--algo", required=True, choices=sorted(ALGORITHMS), help="search algorithm")
    p.add_argument("--protocol", default=None, choices=PROTOCOLS,
                   help="hb/bohb only: 'benchmark' (default; HpBandSter as the NAS-Bench-201 and GradSign scripts "
                   "ran it, budget ignored: every rung is the 12-epoch result, charged again when promoted) or "
                   "'two-fidelity' (this project's variant: 12- and 200-epoch evaluations)")
    p.add_argument("--assist", default=None, metavar="PROXY",
                   help="replace each random proposal by the best-scoring of --pool candidates by this proxy")
    p.add_argument("--pool", type=int, default=10, help="candidates per assisted proposal (default 10)")
    p.add_argument("--runs", type=int, default=500, help="independent runs (default 500)")
    p.add_argument("--budget", type=float, default=12_000.0, help="simulated seconds per run (default 12000)")
    p.add_argument("--seed", type=int, default=0, help="run r draws from numpy default_rng([seed, r])")
    p.add_argument("--charge-proxy-time", action="store_true",
                   help="also charge each arch's measured proxy time (once per run) to the budget")
    p.add_argument("--search-dataset", default="cifar10",
                   help="dataset searched on and scored on (cifar10 = cifar10-valid; cifar100: paper Table 9)")
    p.add_argument("--set", dest="options", action="append", default=[], type=_parse_option,
                   metavar="KEY=VALUE", help="algorithm option, e.g. learning_rate=0.001, population_size=20, "
                   "eta=3, random_fraction=0.33, n_samples=64, min_bandwidth=0.001 (repeatable)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the proxy scores (default 64)")
    p.add_argument("--score-seed", type=int, default=0, help="seed of the proxy scores' batch and init (default 0)")
    p.add_argument("--cache", default=None, help="score store file (default: the gradsign score store)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the score store")
    p.add_argument("--recompute", action="store_true", help="compute every --assist score the searches use, "
                   "reading neither the bundled nor the stored scores (written to the store unless --no-cache)")
    p.add_argument("--out", default=None, help="folder for the best-so-far plot")
    p.add_argument("--json", default=None, help="write the full result (with per-run records) as JSON here")
    p.add_argument("--force", action="store_true", help="replace existing --json and plot files (default: refuse)")
    p.set_defaults(run=cmd_search)
    return p


def _proxy_scores(args: argparse.Namespace, space, store):
    """The scores of ``args.assist`` on the search dataset (``ProxyScores``, or ``EnsembleScores`` over
    one per component), computing missing ones when a search first proposes them; CliError when scores
    are missing and cannot be computed here."""
    from gradsign.cli import CliError
    from gradsign.ensemble import ensemble_assist, is_ensemble_name
    from gradsign.evaluate import ProxyScores, ScoringSetup

    def setup_for(proxy: str) -> ScoringSetup:
        return ScoringSetup(space, args.search_dataset, (proxy,), args.batch_size, args.score_seed, {})

    if is_ensemble_name(args.assist):  # ranks within each pool, every component computed where missing
        if args.recompute:
            raise CliError("--recompute does not apply to an ensemble: recompute its components with "
                           "gradsign correlate --all --recompute")
        scores, what = ensemble_assist(args.assist, setup_for, store, compute_missing=True), "every component of "
        first = scores.ensemble.components[0]
    else:
        scores, what = ProxyScores(setup_for(args.assist), store, recompute=args.recompute), ""
        first = args.assist
    known = int(scores.known.sum())
    if known < len(space) and not args.recompute:
        where = "the bundled scores" + ("" if store is None else f" and the score store {store.path}")
        try:
            setup_for(first).batch()
        except Exception as error:  # the batch cannot be built: missing scores cannot be computed
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CliError(f"{known} of {len(space)} archs have {what}{args.assist} scores on "
                           f"{args.search_dataset} (batch {args.batch_size}, seed {args.score_seed}) in {where}, "
                           f"and the others cannot be computed: {reason}") from None
        print(f"gradsign: {known} of {len(space)} archs have {what}{args.assist} scores on {args.search_dataset} "
              f"in {where}; the others are computed when a search first proposes them", file=sys.stderr)
    return scores


def cmd_search(args: argparse.Namespace) -> None:
    """Run ``gradsign search``: print the result table, write the plot and JSON when asked."""
    from gradsign.cli import CliError, check_new_files, open_store, progress_bar, write_json
    from gradsign.search.run import display_name, format_results, plot_best_so_far, run_search
    from gradsign.spaces import get_space

    for name, value, low in (("--runs", args.runs, 1), ("--pool", args.pool, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise CliError(f"{name} must be >= {low}, got {value}")
    if not args.budget > 0:
        raise CliError(f"--budget must be > 0 seconds, got {args.budget}")
    if args.charge_proxy_time and not args.assist:
        raise CliError("--charge-proxy-time needs --assist")
    if args.recompute and not args.assist:
        raise CliError("--recompute needs --assist (plain searches use no proxy scores)")
    if args.protocol is not None and args.algo not in ("hb", "bohb"):
        raise CliError(f"--protocol applies to hb and bohb only, not {args.algo}")
    space = get_space(args.space)
    name = display_name(args.algo, bool(args.assist))
    check_new_files(([Path(args.json)] if args.json else [])
                    + ([Path(args.out) / f"search_{space.name}_{args.search_dataset}_{name}.png"] if args.out else []),
                    args.force)
    if args.search_dataset not in space.datasets:
        raise CliError(f"--search-dataset must be one of {', '.join(space.datasets)}, got {args.search_dataset!r}")
    options = dict(args.options)
    store = open_store(args) if args.assist else None
    try:
        assist = _proxy_scores(args, space, store) if args.assist else None
        result = run_search(space, args.algo, assist, pool=args.pool, runs=args.runs, budget=args.budget,
                            seed=args.seed, search_dataset=args.search_dataset,
                            charge_proxy_time=args.charge_proxy_time, progress=progress_bar(f"{name} runs"),
                            protocol=args.protocol, **options)
    finally:
        if store is not None:
            store.close()
    result["scores"] = None if assist is None else {
        "proxy": args.assist, "dataset": args.search_dataset, "batch_size": args.batch_size,
        "seed": args.score_seed, "archs_with_scores": int(assist.known.sum())}
    if assist is not None and hasattr(assist, "source_counts"):
        result["scores"]["sources"] = assist.source_counts()
    proxy_note = f", proxy {args.assist} (pool {args.pool})" if assist is not None else ""
    protocol_note = f", {result['protocol_name']} protocol" if args.algo in ("hb", "bohb") else ""
    print(f"{name} on {space.name}, search on {args.search_dataset}{protocol_note}{proxy_note}, {args.runs} runs, "
          f"budget {args.budget:g} s{', proxy time charged' if args.charge_proxy_time else ''}, seed {args.seed}; "
          "200-epoch accuracy of the best arch found, mean +- std over runs")
    print(format_results([result]))
    if result["scores"] and "sources" in result["scores"]:
        from gradsign.correlate import format_sources
        print(format_sources(result["scores"]["sources"]))
    print(f"evaluations per run {result['evaluations_mean']:.1f}, simulated seconds per run "
          f"{result['simulated_seconds_mean']:.0f}, wall time {result['wall_seconds']:.1f} s")
    if result["incumbents_below_top_rung"]:
        print(f"gradsign: {result['incumbents_below_top_rung']} of {args.runs} runs ended before any evaluation at "
              "the top rung; their incumbent is the best at the highest rung they reached", file=sys.stderr)
    if args.out:
        path = Path(args.out) / f"search_{space.name}_{args.search_dataset}_{name}.png"
        plot_best_so_far([result], space, path, dataset=args.search_dataset)
        print(f"best-so-far plot: {path}")
    if args.json:
        write_json(args.json, result)
