"""The ``gradsign`` command line: a thin layer over the library, one subcommand per public function."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

import gradsign
from gradsign.ensemble import correlation_note, is_ensemble_name, parse_ensemble, split_proxy_names

EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A user-facing error: printed on one line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from gradsign.store import StoreError
    return (CliError, ValueError, LookupError, OSError, StoreError)


def _fail(error: BaseException, status: int, prefix: str = "") -> int:
    if os.environ.get("GRADSIGN_DEBUG"):
        raise error
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, KeyError):  # str(KeyError) quotes its argument
        message = str(error.args[0]) if error.args else message
    print(f"gradsign: error: {prefix}{message}", file=sys.stderr)
    return status


def progress_bar(description: str):
    """A function wrapping an iterable of ``total`` items in a tqdm progress bar on stderr."""
    from tqdm import tqdm

    def wrap(items: Iterable, total: int) -> Iterable:
        return tqdm(items, desc=description, total=total, mininterval=1.0, file=sys.stderr,
                    disable=total < 2)
    return wrap


# ---------------------------------------------------------------- shared argument groups and helpers
def add_scoring_args(p: argparse.ArgumentParser, *, proxies_default: str) -> None:
    p.add_argument("--space", default="nb201", help="search space (default nb201)")
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100 or imagenet16-120")
    p.add_argument("--proxies", "--proxy", dest="proxies", default=proxies_default,
                   help=f"comma-separated proxy names, or 'all' (default {proxies_default})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the batch, the init and the sample")
    p.add_argument("--data-dir", default=None, help="folder with the official dataset files "
                   "(default: the images bundled with the package)")
    p.add_argument("--nds-dir", default=None, help="folder with the NDS result files (DARTS.json, ENAS.json, "
                   "...) for the nds-* spaces (default: $GRADSIGN_NDS_DIR)")
    p.add_argument("--aggregation", choices=("sum", "mean"), default=None, help="GradSign aggregation")
    p.add_argument("--n-inits", type=int, default=None, help="average over this many initialisations")
    p.add_argument("--engine", choices=("auto", "batched", "vmap", "loop"), default=None,
                   help="per-sample gradient engine (same scores up to float noise)")
    p.add_argument("--cache", default=None, help="score store file (default: "
                   f"{_display_path(_default_store())})")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the score store (the scores bundled with the package are "
                   "still used, and counted as bundled in the output; add --recompute to compute them)")
    p.add_argument("--recompute", action="store_true",
                   help="compute every score, using neither the bundled nor the stored ones (the new scores "
                   "still go to the score store unless --no-cache)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per scoring process (default: 1 in worker processes, torch's "
                   "choice in this one); scores are bit-identical for equal thread counts")
    p.add_argument("--workers", type=int, default=1, help="scoring processes, >= 1 (default 1: this one)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local process pool or a Ray cluster (pip install gradsign[ray])")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")


def _default_store() -> Path:
    from gradsign.store import default_store_path
    return default_store_path()


def _display_path(path: Path) -> str:
    home = str(Path.home())
    return str(path).replace(home, "~", 1) if str(path).startswith(home) else str(path)


def parse_proxies(text: str) -> tuple[str, ...]:
    names = gradsign.available_proxies() if text == "all" else [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise CliError("no proxy given")
    for name in names:
        if is_ensemble_name(name):
            parse_ensemble(name)
        else:
            gradsign.proxy_info(name)
    return tuple(names)


def _first_ensemble(text: str):
    """The ensemble named first in ``--proxies`` (what ``select`` ranks by), else None."""
    first = parse_proxies(text)[0]
    return parse_ensemble(first) if is_ensemble_name(first) else None


def scoring_setup(args: argparse.Namespace):
    from gradsign.evaluate import ScoringSetup
    from gradsign.spaces import get_space

    for flag, value in (("--batch-size", args.batch_size), ("--workers", args.workers),
                        ("--threads", args.threads), ("--n-inits", args.n_inits)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be >= 1, got {value}")
    options = {k: v for k, v in (("aggregation", args.aggregation), ("n_inits", args.n_inits),
                                 ("engine", args.engine)) if v is not None}
    proxies, _ = split_proxy_names(parse_proxies(args.proxies))  # an ensemble's components are scored
    if "gradsign" not in proxies:
        options = {k: v for k, v in options.items() if k == "n_inits"}
    return ScoringSetup(get_space(args.space, nds_dir=args.nds_dir), args.dataset, proxies, args.batch_size,
                        args.seed, options, args.data_dir)


def executor_for(args: argparse.Namespace):
    from gradsign.executors import make_executor

    if args.workers < 1:
        raise CliError(f"--workers must be >= 1, got {args.workers}")
    return make_executor(args.executor, args.workers, address=args.address, threads=args.threads)


def parse_arch(space, text: str) -> str:
    """The arch string of ``text``: an arch string, or a benchmark index (negative ones are out of range,
    not counted from the end)."""
    text = text.strip()
    return space.resolve(int(text) if re.fullmatch(r"[+-]?\d+", text) else text)


def open_store(args: argparse.Namespace):
    from gradsign.store import ScoreStore

    if args.no_cache:
        return None
    return ScoreStore(Path(args.cache) if args.cache else _default_store())


def read_arch_file(path: str) -> list[str]:
    """One arch string or index per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise CliError(f"cannot read arch file {path}: {error.strerror or error}") from None
    archs = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not archs:
        raise CliError(f"arch file {path} lists no architecture")
    return archs


def choose_archs(args: argparse.Namespace, space) -> list[str]:
    if args.all:
        return list(space)
    if args.archs:
        return [parse_arch(space, a) for a in read_arch_file(args.archs)]
    if not 1 <= args.sample <= len(space):
        raise CliError(f"--sample must be between 1 and {len(space)}, got {args.sample}")
    rng = np.random.default_rng(args.seed)
    return [space.arch(int(i)) for i in rng.choice(len(space), args.sample, replace=False)]


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as JSON; NaN and infinite numbers (which JSON lacks) become null."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite_or_null(payload), f, indent=1, default=_json_default, allow_nan=False)
        f.write("\n")


def _finite_or_null(value):
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _json_default(value):
    if isinstance(value, np.integer):
        return value.item()
    if isinstance(value, np.ndarray):
        return _finite_or_null(value.tolist())
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def check_new_files(paths: Iterable[Path], force: bool) -> None:
    """Refuse (CliError) to replace an existing file without ``force``, or to write over a folder; called
    before any work, so that nothing the user had is overwritten by surprise."""
    for path in paths:
        if path.is_dir():
            raise CliError(f"{path} is a folder; name a file")
        if path.exists() and not force:
            raise CliError(f"{path} exists (an earlier run's output?); pass --force to replace it, "
                           "or choose another path")


def output_folder(path: str) -> Path:
    """``path`` as a folder to write into; CliError when it exists as something else."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CliError(f"--out {folder} is an existing file, not a folder")
    return folder


# ---------------------------------------------------------------- subcommands
def cmd_proxies(args: argparse.Namespace) -> None:
    for name in gradsign.available_proxies():
        info = gradsign.proxy_info(name)
        direction = "higher is better" if info.higher_is_better else "lower is better"
        print(f"{name}: {info.formula} [{direction}; {info.source}]")
    print(f"{parse_ensemble('ensemble').describe()} [higher is better; scores depend on the candidate set; "
          "other compositions: ensemble:P+Q, ensemble:log_rank_product:P+Q; see gradsign.ensemble]")


def cmd_score(args: argparse.Namespace) -> None:
    from gradsign.evaluate import score_archs

    setup = scoring_setup(args)
    arch = parse_arch(setup.space, args.arch)
    store = open_store(args)
    try:
        found, _ = score_archs(setup, [arch], store, recompute=args.recompute)
    finally:
        if store:
            store.close()
    space, (metric, epochs) = setup.space, setup.space.default_field
    if space.has_table(arch):
        print(f"{space.name} arch {space.index(arch)} {arch}")
        print(f"{space.accuracy_field(setup.dataset, metric, epochs)}: "
              f"{space.query(arch, setup.dataset, metric, epochs):.2f}")
    else:
        print(f"{space.name} arch {arch} (no benchmark results: not among the tabulated archs)")
    for proxy in setup.proxies:
        result = found[arch][proxy]
        where = {"bundled": "bundled with the package", "store": "from the score store"}.get(result.source,
                                                                                            "computed")
        print(f"{proxy}: {result.value!r}  ({where}" + (f"; error: {result.error})" if result.error else ")"))


def cmd_correlate(args: argparse.Namespace) -> None:
    from gradsign.correlate import correlate, format_sources, format_table, plot_scatter, write_csv

    setup = scoring_setup(args)
    if args.bootstrap < 0:
        raise CliError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    archs = choose_archs(args, setup.space)
    stem = f"correlate_{setup.space.name}_{setup.dataset}"
    out = output_folder(args.out) if args.out else None
    files = [out / f"{stem}.csv", out / f"{stem}.png"] if out else []
    check_new_files(files + ([Path(args.json)] if args.json else []), args.force)
    executor = executor_for(args)
    store = open_store(args)
    try:
        metric, epochs = setup.space.default_field
        result = correlate(setup, archs, metric=args.metric or metric,
                           epochs=epochs if args.epochs is None else args.epochs, store=store,
                           recompute=args.recompute, n_boot=args.bootstrap, executor=executor,
                           progress=progress_bar(f"scoring {setup.dataset}"),
                           ensembles=split_proxy_names(parse_proxies(args.proxies))[1])
    finally:
        if store:
            store.close()
    print(format_table(result))
    print(format_sources(result.sources))
    if note := correlation_note(result.proxies):
        print(note)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(result, files[0])
        plot_scatter(result, files[1])
        print(f"per-arch scores: {files[0]}\nscatter plot: {files[1]}")
    else:
        print("no files written: --out DIR writes the per-arch CSV and the scatter plot")
    if args.json:
        write_json(args.json, result.to_json())


def cmd_select(args: argparse.Namespace) -> None:
    from gradsign.correlate import format_sources
    from gradsign.select import format_selection, select

    setup = scoring_setup(args)
    if args.json:
        check_new_files([Path(args.json)], args.force)
    executor = executor_for(args)
    store = open_store(args)
    try:
        result = select(setup, args.candidates, args.runs, store=store, recompute=args.recompute,
                        executor=executor, progress=progress_bar(f"scoring {setup.dataset}"),
                        scored_only=args.scored_only, ensemble=_first_ensemble(args.proxies))
    finally:
        if store:
            store.close()
    print(format_selection(result))
    print(format_sources(result["sources"]))
    if ensemble := _first_ensemble(args.proxies):
        print(f"{ensemble.describe()}: each run's {args.candidates} candidates")
    if args.json:
        write_json(args.json, result)


def cmd_rank(args: argparse.Namespace) -> None:
    from gradsign.rank import parse_image_size, rank

    out = output_folder(args.out) if args.out else None
    files = ([out / "rank.csv", out / "rank.png"] if out else []) + ([Path(args.json)] if args.json else [])
    check_new_files(files, args.force)
    for flag, value in (("--batch-size", args.batch_size), ("--n-inits", args.n_inits),
                        ("--workers", args.workers), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be >= 1, got {value}")
    options = {k: v for k, v in (("aggregation", args.aggregation), ("engine", args.engine)) if v is not None}
    result = rank(args.candidates, args.data, target=args.target, loss=args.loss, target_kind=args.targets,
                  proxies=parse_proxies(args.proxies), batch_size=args.batch_size, seed=args.seed,
                  n_inits=args.n_inits, normalize=args.normalize, image_size=parse_image_size(args.image_size),
                  device=args.device, workers=args.workers, threads=args.threads,
                  progress=progress_bar("scoring candidates"), **options)
    print(result.format_table())
    if out:
        out.mkdir(parents=True, exist_ok=True)
        result.write_csv(files[0])
        result.plot(files[1])
        print(f"table: {files[0]}\nplot: {files[1]}")
    if args.json:
        write_json(args.json, result.to_json())


def cmd_cache(args: argparse.Namespace) -> None:
    from gradsign.store import ScoreStore

    path = Path(args.cache) if args.cache else _default_store()
    if not path.is_file():
        raise CliError(f"no score store at {path}")
    with ScoreStore(path) as store:
        if args.action == "info":
            print(f"score store {path}")
            print("| space | dataset | proxy | batch | seed | options | version | rows | errors |")
            print("|---|---|---|---|---|---|---|---|---|")
            for row in store.summary():
                print("| " + " | ".join(str(v) for v in row) + " |")
        elif args.action == "prune":
            from gradsign.evaluate import SCORING_VERSION

            removed = store.prune(errors=args.errors, other_versions=args.other_versions,
                                  version=SCORING_VERSION)
            print(f"removed {removed} rows from {path}")
        else:
            export_scores(store, args)


def export_scores(store, args: argparse.Namespace) -> None:
    """Write one proxy's stored scores for every arch of a space to a .npz (bundle format) or .csv."""
    from gradsign.bundled import save_scores
    from gradsign.evaluate import ScoringSetup, score_arrays

    out = Path(args.out)
    if out.suffix not in (".npz", ".csv"):
        raise CliError(f"--out must end in .npz or .csv, got {out.name}")
    check_new_files([out], args.force)
    setup = ScoringSetup(_space(args.space), args.dataset, parse_proxies(args.proxy), args.batch_size,
                         args.seed)
    space, proxy = setup.space, setup.proxies[0]
    values, seconds, known = score_arrays(space, store.get(setup.key, list(space), [proxy]))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        save_scores(out, setup.key, proxy, values, seconds, known)
    else:
        with open(out, "w") as f:
            f.write(f"index,arch,{proxy},seconds\n")
            for i in np.flatnonzero(known):
                f.write(f"{i},{space.arch(int(i))},{float(values[i])!r},{float(seconds[i])!r}\n")
    print(f"wrote {int(known.sum())} of {len(space)} {proxy} scores to {out}")


def _space(name: str):
    from gradsign.spaces import get_space
    return get_space(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradsign", description=" ".join(gradsign.__doc__.split()))
    parser.add_argument("--version", action="version", version=f"gradsign {gradsign.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine fallbacks and details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("proxies", help="list the proxies with their formulas and sources")
    p.set_defaults(run=cmd_proxies)

    p = sub.add_parser("score", help="score one architecture of a search space")
    add_scoring_args(p, proxies_default="gradsign")
    p.add_argument("--arch", required=True, help="arch string or benchmark index")
    p.set_defaults(run=cmd_score)

    p = sub.add_parser("correlate", help="correlate proxy scores with benchmark accuracy")
    add_scoring_args(p, proxies_default="gradsign")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sample", type=int, help="this many random archs (drawn with --seed)")
    which.add_argument("--archs", help="file with one arch string or index per line")
    which.add_argument("--all", action="store_true", help="every arch of the space")
    p.add_argument("--metric", choices=("test", "valid"), default=None,
                   help="accuracy field (default: the space's, test for nb201, valid for nb101)")
    p.add_argument("--epochs", type=int, default=None,
                   help="accuracy after epochs (nb201: 12 or 200, default 200; nb101: 4, 12, 36 or 108, default 108)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the 95%% CIs (default 1000; 0: no intervals)")
    p.add_argument("--out", default=None, help="write the per-arch CSV and the scatter plot into this folder "
                   "(default: none written)")
    p.add_argument("--json", help="write the full result as JSON here (NaN and infinite scores as null)")
    p.add_argument("--force", action="store_true",
                   help="replace --out and --json files of an earlier run (default: refuse)")
    p.set_defaults(run=cmd_correlate)

    p = sub.add_parser("select", help="best of N random archs by proxy score (GradSign paper, Table 5)",
                       description="In each run draw --candidates distinct archs uniformly (numpy default_rng"
                       "(--seed)), pick the one the proxy (the first of --proxies) scores best, and report "
                       "its 200-epoch accuracies, beside a random and the best candidate of the same draw: "
                       "mean +- std over runs (std with ddof=1).")
    add_scoring_args(p, proxies_default="gradsign")
    p.add_argument("--candidates", type=int, default=100, help="archs drawn per run (default 100)")
    p.add_argument("--runs", type=int, default=500, help="independent runs (default 500)")
    p.add_argument("--scored-only", action="store_true",
                   help="draw candidates only from archs whose scores are already known (computes nothing)")
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--force", action="store_true", help="replace an existing --json file (default: refuse)")
    p.set_defaults(run=cmd_select)

    p = sub.add_parser("rank", help="rank your own candidate models on your own data",
                       description="Score every candidate on one canonical batch of --data (seeded, classes "
                       "balanced, built under torch.manual_seed(--seed)) and rank them; a candidate that fails "
                       "gets its error in its row. Formats and rules: gradsign.rank, gradsign.userdata, "
                       "gradsign.candidates.")
    p.add_argument("--candidates", action="append", required=True,
                   help="FILE.py[:NAME], module[:NAME] (candidates(num_classes) -> {name: model}) or "
                   "[LABEL=]module:Callable(literals), e.g. transformers:ResNetConfig(depths=[1,1]); repeatable")
    p.add_argument("--data", required=True, help="image folder (PATH/CLASS/IMAGE), .npz with x and y (signed integer x: token "
                   "ids, never normalised), or .csv")
    p.add_argument("--target", help="CSV: the target column")
    p.add_argument("--loss", default="cross-entropy",
                   help="cross-entropy, mse, bce (on logits) or module:function (default cross-entropy)")
    p.add_argument("--targets", choices=("classes", "binary", "values"), default=None,
                   help="targets a module:function loss takes (default classes)")
    p.add_argument("--proxies", "--proxy", dest="proxies", default="gradsign",
                   help="comma-separated proxy names, or 'all'; ranked by the first (default gradsign)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the batch and of every candidate's init")
    p.add_argument("--n-inits", type=int, default=1, help="average over this many initialisations")
    p.add_argument("--normalize", default="batch", help="batch (per-channel batch statistics, default), none, "
                   "a dataset name such as cifar10, or MEANS/STDS e.g. 0.5,0.5,0.5/0.25,0.25,0.25")
    p.add_argument("--image-size", default=None, help="image folder: resize every image to N or H,W")
    p.add_argument("--aggregation", choices=("sum", "mean"), default=None, help="GradSign aggregation")
    p.add_argument("--engine", choices=("auto", "batched", "vmap", "loop"), default=None,
                   help="per-sample gradient engine")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--workers", type=int, default=1, help="scoring processes (default 1: this one)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per scoring process")
    p.add_argument("--out", default=None, help="write rank.csv and rank.png (score vs #params) into this folder")
    p.add_argument("--json", help="write the result as JSON here (NaN scores as null)")
    p.add_argument("--force", action="store_true", help="replace --out and --json files of an earlier run")
    p.set_defaults(run=cmd_rank)

    from gradsign.search.cli import add_search_command
    add_search_command(sub)

    p = sub.add_parser("cache", help="inspect, export or prune the score store")
    p.add_argument("action", choices=("info", "export", "prune"))
    p.add_argument("--cache", default=None, help="score store file (default: the user cache)")
    p.add_argument("--space", default="nb201")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--proxy", default="gradsign", help="export: the proxy to export")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="export: a .npz (the bundle format) or .csv file")
    p.add_argument("--force", action="store_true", help="export: replace an existing --out file")
    p.add_argument("--errors", action="store_true", help="prune: rows whose scoring raised")
    p.add_argument("--other-versions", action="store_true",
                   help="prune: rows written by another gradsign version")
    p.set_defaults(run=cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    user_errors = _user_errors()
    # Ctrl-C stops a run cleanly even when started with SIGINT ignored (e.g. from a background shell). The
    # interrupt is also remembered: Python drops an exception raised inside a finaliser or callback, and a
    # Ctrl-C landing there must still end the command as interrupted
    interrupted = []

    def on_interrupt(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(message)s")
    try:
        from gradsign.proxies.registry import load_plugins

        load_plugins()
        from gradsign.executors import show_warning_line

        with warnings.catch_warnings():
            warnings.showwarning = show_warning_line
            args.run(args)
        if interrupted:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        print("gradsign: interrupted; every finished architecture is kept in the score store",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors as error:
        return _fail(error, EXIT_BAD_INPUT)
    except Exception as error:  # not the user's fault, but still one line; GRADSIGN_DEBUG=1 shows more
        return _fail(error, EXIT_INTERNAL, prefix="internal error: ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
