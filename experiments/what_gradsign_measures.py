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


def _excess_row(job: tuple) -> dict:
    """One arch's GradSign-vs-chance row (run in this process or a worker)."""
    from gradsign.chance import chance_report, per_sample_sign_stats
    from gradsign.spaces import get_space

    space_name, dataset, arch, seed, inputs, targets, threads = job
    torch.set_num_threads(threads)
    space = get_space(space_name)
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = space.build(arch, num_classes=space.num_classes(dataset))
    stats = per_sample_sign_stats(model, inputs, targets, torch.nn.functional.cross_entropy)
    report = chance_report(stats, len(inputs)).to_dict()
    report.update(index=space.index(arch), arch=arch, seconds=time.perf_counter() - start)
    return report


def run_excess(args: argparse.Namespace) -> None:
    """Append GradSign-vs-chance rows for the first ``--limit`` archs of ``--archs`` not yet in the CSV
    (``--workers`` processes, one torch thread each; rows are appended as archs finish)."""
    from multiprocessing import get_context

    from gradsign.cli import read_arch_file
    from gradsign.evaluate import ScoringSetup
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
    jobs = [(space.name, args.dataset, a, args.seed, inputs, targets, args.threads) for a in todo]
    pool = get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    try:
        rows = pool.imap_unordered(_excess_row, jobs) if pool else map(_excess_row, jobs)
        for n, report in enumerate(rows):
            with open(path, "a") as f:
                f.write(",".join(repr(report[k]) if isinstance(report[k], float) else str(report[k])
                                 for k in EXCESS_FIELDS) + "\n")
            if n % 25 == 0:
                print(f"{args.dataset}: {len(done) + n + 1}/{len(archs)}", file=sys.stderr)
    finally:
        if pool:
            pool.terminate()


DATASETS = ("cifar10", "cifar100", "imagenet16-120")
PAGE = Path("docs/what_gradsign_measures.md")
REPORT_COMMAND = "python experiments/what_gradsign_measures.py report --cache runs/nb201-scores.sqlite"


def _sample(space, size: int, seed: int) -> list[str]:
    """The archs of ``gradsign correlate --sample size --seed seed``."""
    import numpy as np

    return [space.arch(int(i)) for i in np.random.default_rng(seed).choice(len(space), size, replace=False)]


def _scores(space, dataset: str, proxy: str, batch_size: int, archs: list[str], store):
    """Known scores (bundled or stored) of ``proxy`` for ``archs``, NaN where unknown or failed."""
    import numpy as np

    from gradsign.evaluate import ScoringSetup, known_scores

    setup = ScoringSetup(space, dataset, (proxy,), batch_size, 0)
    found = known_scores(setup, archs, store)
    values = np.array([found[(a, proxy)].value if (a, proxy) in found else np.nan for a in archs], float)
    seconds = np.array([found[(a, proxy)].seconds if (a, proxy) in found and found[(a, proxy)].seconds
                        is not None else np.nan for a in archs], float)
    return values, seconds


def _read_excess(space, dataset: str) -> dict[str, dict]:
    path = excess_path(space.name, dataset)
    if not path.is_file():
        return {}
    rows = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            try:
                rows[row["arch"]] = {k: float(row[k]) for k in EXCESS_FIELDS if k != "arch"}
            except (TypeError, ValueError):  # a line cut short by an interrupted run
                continue
    return rows


def _fmt(c: dict, key: str = "spearman") -> str:
    lo, hi = c[f"{key}_ci95"]
    return f"{c[key]:+.3f} [{lo:+.2f}, {hi:+.2f}]"


def _fmt_partial(c: dict) -> str:
    return f"{c['partial']:+.3f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"


def _timing(space, n_archs: int, seed: int) -> list[dict]:
    """CPU seconds (one torch thread, this process) per arch for each way of scoring, on the first
    ``n_archs`` archs of the CIFAR-10 sample, each arch scored by every method back to back."""
    import gradsign
    from gradsign.chance import per_sample_sign_stats
    from gradsign.datasets import canonical_batch

    torch.set_num_threads(1)
    x64, y64 = canonical_batch("cifar10", 64, seed)
    x8, y8 = canonical_batch("cifar10", 8, seed)
    rows = []
    for arch in _sample(space, 1000, seed)[:n_archs]:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = space.build(arch, num_classes=10)
        row = {"arch": arch}
        for name, call in (
                ("forward+backward, batch 64", lambda: torch.nn.functional.cross_entropy(
                    __import__("copy").deepcopy(model).train()(x64), y64).backward()),
                ("gradsign, batch 64 (default engine)", lambda: gradsign.score(model, x64, y64, "gradsign")),
                ("effective_params, batch 64", lambda: gradsign.score(model, x64, y64, "effective_params")),
                ("effective_params, batch 8", lambda: gradsign.score(model, x8, y8, "effective_params")),
                ("per-sample loop with chance level, batch 64", lambda: per_sample_sign_stats(
                    __import__("copy").deepcopy(model), x64, y64, torch.nn.functional.cross_entropy)),
                ("params", lambda: gradsign.score(model, x8, y8, "params"))):
            start = time.process_time()
            call()
            row[name] = time.process_time() - start
        rows.append(row)
    return rows


def _selection(space, universe: list[int], scores: dict[str, "np.ndarray"], candidates: int, runs: int,
               seed: int) -> dict[str, tuple[float, float]]:
    """Table 5 protocol on ``universe`` (sorted benchmark indices), the same draws for every selector:
    best of ``candidates`` by each score (first of equal scores), CIFAR-10 200-epoch test accuracy,
    mean and std (ddof=1) over ``runs``. The draws are those of ``gradsign select --scored-only`` on the same
    universe and seed."""
    import numpy as np

    universe = np.asarray(universe, dtype=np.int64)
    rng = np.random.default_rng(seed)
    draws = np.array([universe[rng.choice(len(universe), candidates, replace=False)] for _ in range(runs)])
    random_pick = rng.integers(0, candidates, runs)
    table = space.benchmark_table("cifar10", "test", 200)
    result = {}
    for name, values in scores.items():
        ranked = np.where(np.isfinite(values[draws]), values[draws], -np.inf)
        picked = table[draws[np.arange(runs), np.argmax(ranked, axis=1)]]
        result[name] = (float(picked.mean()), float(picked.std(ddof=1)))
    picked = table[draws[np.arange(runs), random_pick]]
    result["random"] = (float(picked.mean()), float(picked.std(ddof=1)))
    best = table[draws].max(axis=1)
    result["optimal"] = (float(best.mean()), float(best.std(ddof=1)))
    return result


def run_report(args: argparse.Namespace) -> None:
    """Write docs/what_gradsign_measures.md and its figures from the stored and bundled scores."""
    import json

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import gradsign
    from gradsign.chance import expected_abs_walk, partial_spearman
    from gradsign.correlate import accuracy_field, signed_correlations
    from gradsign.spaces import get_space
    from gradsign.store import ScoreStore

    space = get_space("nb201")
    walk = expected_abs_walk(64)
    archs = _sample(space, 1000, 0)
    index = np.array([space.index(a) for a in archs])
    data: dict[str, dict] = {}
    with ScoreStore(Path(args.cache)) as store:
        for ds in DATASETS:
            grad, grad_s = _scores(space, ds, "gradsign", 64, archs, store)
            eff, eff_s = _scores(space, ds, "effective_params", args.effective_batch, archs, store)
            params = np.array([space.param_count(a, ds) for a in archs], float)
            acc = space.benchmark_table(ds, "test", 200)[index]
            excess = _read_excess(space, ds)
            data[ds] = dict(grad=grad, grad_s=grad_s, eff=eff, eff_s=eff_s, params=params, acc=acc,
                            excess=excess)
    OUT.mkdir(parents=True, exist_ok=True)
    summary: dict = {"datasets": {}}
    lines = [
        "# What GradSign measures: sign agreement, or the weights a gradient reaches?",
        "",
        "<!-- generated by experiments/what_gradsign_measures.py; do not edit by hand -->",
        f"Command: `{REPORT_COMMAND}` (gradsign {gradsign.__version__}), after the scoring stages listed in "
        "[How the numbers were made](#how-the-numbers-were-made).",
        "",
    ]
    body: list[str] = []
    # ------------------------------------------------------------ correlations
    body += ["## Correlation with accuracy, NAS-Bench-201", "",
             "Signed Spearman rho [95% bootstrap CI] (1,000 resamples) and Kendall tau against the "
             "200-epoch **test** accuracy, mean over the benchmark's seeds (CIFAR-10 ori-test, CIFAR-100 and "
             "ImageNet16-120 x-test), over the 1,000 archs of `gradsign correlate --sample 1000 --seed 0` "
             "(the sample of docs/results.md). GradSign: the bundled scores (batch 64, seed 0). "
             f"effective_params: batch {args.effective_batch}, seed 0, from the score store. #params: the "
             "benchmark's exact parameter count (BatchNorm affine parameters included). "
             "`excess (formula)` = GradSign - E|S_64| x effective_params, the excess over chance on the "
             "assumption, checked below, that every reached weight gets a non-zero gradient from all 64 "
             "samples.", ""]
    body += ["| dataset | proxy | archs | Spearman rho [95% CI] | Kendall tau |", "|---|---|---|---|---|"]
    for ds in DATASETS:
        d = data[ds]
        formula_excess = d["grad"] - walk * d["eff"]
        per = {}
        for name, values in (("gradsign", d["grad"]), ("effective_params", d["eff"]), ("#params", d["params"]),
                             ("excess (formula)", formula_excess)):
            c = signed_correlations(values, d["acc"], n_boot=args.bootstrap, seed=0)
            per[name] = c
            body.append(f"| {ds} | {name} | {c['n']} | {_fmt(c)} | {c['kendall']:+.3f} |")
        summary["datasets"][ds] = {"correlations": per, "accuracy_field": accuracy_field(ds, "test", 200)}
    body.append("")
    # ------------------------------------------------------------ gradsign vs effective params
    body += ["## GradSign against effective_params", "",
             "Spearman between the scores over the same archs, and GradSign / effective_params (for a "
             f"sum of fair coins it would be E|S_64| = {walk:.4f}):", "",
             "| dataset | archs with both | Spearman(GradSign, effective_params) | Spearman(GradSign, #params) | "
             "distinct effective_params values | GradSign / effective_params: median [min, max] |",
             "|---|---|---|---|---|---|"]
    from scipy.stats import spearmanr
    for ds in DATASETS:
        d = data[ds]
        both = np.isfinite(d["grad"]) & np.isfinite(d["eff"])
        if both.sum() < 3:
            body.append(f"| {ds} | {int(both.sum())} | – | – | – | – |")
            continue
        r_eff = spearmanr(d["grad"][both], d["eff"][both]).statistic
        r_par = spearmanr(d["grad"][both], d["params"][both]).statistic
        alive = both & (d["eff"] > 0)
        ratio = d["grad"][alive] / d["eff"][alive]
        body.append(f"| {ds} | {int(both.sum())} | {r_eff:+.4f} | {r_par:+.4f} | "
                    f"{len(np.unique(d['eff'][both]))} | {np.median(ratio):.3f} [{ratio.min():.3f}, "
                    f"{ratio.max():.3f}] |")
        summary["datasets"][ds].update(spearman_gradsign_effective=float(r_eff),
                                       spearman_gradsign_params=float(r_par))
    body += ["", "![GradSign against effective_params](what_gradsign_measures/gradsign_vs_effective_params.png)",
             ""]
    # ------------------------------------------------------------ partial correlations
    body += ["## Partial correlations", "",
             "Signed partial Spearman of GradSign with the test accuracy, given another score (rank "
             "partial correlation, 95% bootstrap CI from 1,000 resamples), and the reverse: what "
             "effective_params or #params add once GradSign is known. All four over the archs with both "
             "GradSign and effective_params.", "",
             "| dataset | archs | GradSign given effective_params | GradSign given #params | effective_params "
             "given GradSign | #params given GradSign |", "|---|---|---|---|---|---|"]
    for ds in DATASETS:
        d = data[ds]
        cells = []
        mask = np.where(np.isfinite(d["eff"]), 1.0, np.nan)  # the same archs in all four
        for x, z in (("grad", "eff"), ("grad", "params"), ("eff", "grad"), ("params", "grad")):
            c = partial_spearman(d[x] * mask, d["acc"], d[z] * mask, n_boot=args.bootstrap, seed=0)
            cells.append(c)
        summary["datasets"][ds]["partial"] = {
            "gradsign|effective_params": cells[0], "gradsign|params": cells[1],
            "effective_params|gradsign": cells[2], "params|gradsign": cells[3]}
        body.append(f"| {ds} | {cells[0]['n']} | " + " | ".join(_fmt_partial(c) for c in cells) + " |")
    body.append("")
    # ------------------------------------------------------------ exact excess on the per-sample subset
    body += ["## GradSign against its exact chance level", "",
             "On a prefix of the same sample (the first archs of the 1,000, so a uniform random sample), "
             "GradSign recomputed with one forward/backward per sample (batch 64, seed 0) together with, for "
             "every weight k, n_k = the number of samples whose gradient of w_k is non-zero; chance = "
             "sum_k E|S_{n_k}|, excess = GradSign - chance, ratio = GradSign / chance (`gradsign.chance`).",
             "", "| dataset | archs | reached weights with n_k = 64 | ratio: median [min, max] | "
             "Spearman with accuracy: GradSign | chance | excess | ratio | loop effective count | "
             f"effective_params (batch {args.effective_batch}) = loop count |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fig2, axes2 = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, ds in zip(axes2, DATASETS):
        d = data[ds]
        rows = [(a, d["excess"][a]) for a in archs if a in d["excess"]]
        if len(rows) < 3:
            body.append(f"| {ds} | {len(rows)} | – | – | – | – | – | – | – | – |")
            continue
        pos = {a: i for i, a in enumerate(archs)}
        acc = np.array([d["acc"][pos[a]] for a, _ in rows])
        eff = np.array([d["eff"][pos[a]] for a, _ in rows])
        col = {k: np.array([r[k] for _, r in rows]) for k in ("reached", "full", "gradsign", "chance",
                                                              "excess", "ratio")}
        full_share = col["full"].sum() / max(1.0, col["reached"].sum())
        ratio = col["ratio"][np.isfinite(col["ratio"])]
        cs = {k: signed_correlations(col[k], acc, n_boot=args.bootstrap, seed=0)
              for k in ("gradsign", "chance", "excess", "ratio", "reached")}
        known = np.isfinite(eff)
        same = int((eff[known] == col["reached"][known]).sum())
        body.append(f"| {ds} | {len(rows)} | {100 * full_share:.4f}% | {np.median(ratio):.4f} "
                    f"[{ratio.min():.4f}, {ratio.max():.4f}] | {_fmt(cs['gradsign'])} | {_fmt(cs['chance'])} | "
                    f"{_fmt(cs['excess'])} | {_fmt(cs['ratio'])} | {_fmt(cs['reached'])} | "
                    f"{same} of {int(known.sum())} |")
        summary["datasets"][ds]["exact_chance"] = {
            "archs": len(rows), "share_full": float(full_share), "correlations": cs,
            "effective_params_equal_loop": [same, int(known.sum())],
            "ratio_median": float(np.median(ratio))}
        alive = col["reached"] > 0
        ax.scatter(col["ratio"][alive], acc[alive], s=6, alpha=0.6)
        ax.set_xlabel("GradSign / chance level")
        ax.set_ylabel(f"{ds} test acc. (200 ep.)")
        ax.set_title(f"{ds}: {int(alive.sum())} archs")
    fig2.tight_layout()
    fig2.savefig(OUT / "ratio_vs_accuracy.png", dpi=110)
    plt.close(fig2)
    body += ["", "Archs where no weight is reached have GradSign = chance = 0 (ratio undefined, left out of "
             "the ratio column).", "", "![GradSign / chance against accuracy](what_gradsign_measures/ratio_vs_accuracy.png)",
             ""]
    # ------------------------------------------------------------ figure 1
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, ds in zip(axes, DATASETS):
        d = data[ds]
        ok = np.isfinite(d["grad"]) & np.isfinite(d["eff"]) & (d["eff"] > 0)
        points = ax.scatter(d["eff"][ok], d["grad"][ok], c=d["acc"][ok], s=6, cmap="viridis")
        xs = np.array([d["eff"][ok].min(), d["eff"][ok].max()]) if ok.any() else np.array([1, 2])
        ax.plot(xs, walk * xs, "r-", lw=0.8, label=f"E|S_64| x effective_params")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"effective_params (batch {args.effective_batch})")
        ax.set_ylabel("GradSign (batch 64)")
        zero = int((np.isfinite(d["grad"]) & (d["eff"] == 0)).sum())
        ax.set_title(f"{ds}: {int(ok.sum())} archs (+{zero} with 0 reached, not shown)", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
        fig.colorbar(points, ax=ax, label="test acc. (200 ep.)")
    fig.tight_layout()
    fig.savefig(OUT / "gradsign_vs_effective_params.png", dpi=110)
    plt.close(fig)
    # ------------------------------------------------------------ cost
    timing = _timing(space, args.timing_archs, 0)
    methods = [k for k in timing[0] if k != "arch"]
    base = np.median([t["forward+backward, batch 64"] for t in timing])
    body += ["## Cost per arch", "",
             f"CPU seconds (one torch thread) per arch on the first {len(timing)} archs of the CIFAR-10 "
             "sample, every method run on each arch back to back in the report's process (on a machine "
             "shared with other jobs: CPU time, not wall time). The model is built once per arch and not "
             "counted.", "", "| method | median CPU s | / one forward+backward at batch 64 |", "|---|---|---|"]
    for m in methods:
        med = float(np.median([t[m] for t in timing]))
        body.append(f"| {m} | {med:.3f} | {med / base:.2f} |")
    summary["timing"] = timing
    body.append("")
    # ------------------------------------------------------------ selection
    d = data["cifar10"]
    known = np.isfinite(d["eff"]) & np.isfinite(d["grad"])
    universe = np.sort(index[known])
    body += ["## Table 5: best of 100 by score", ""]
    if len(universe) >= args.candidates:
        full = {name: np.full(len(space), np.nan) for name in ("gradsign", "effective_params", "#params",
                                                               "excess (formula)")}
        for name, values in (("gradsign", d["grad"]), ("effective_params", d["eff"]), ("#params", d["params"]),
                             ("excess (formula)", d["grad"] - walk * d["eff"])):
            full[name][index] = values
        sel = _selection(space, list(universe), full, args.candidates, args.runs, 0)
        summary["selection"] = {"universe": int(len(universe)), "results": sel}
        body += [f"The paper's protocol (best of {args.candidates} random archs by score, {args.runs} runs, "
                 "CIFAR-10 200-epoch test accuracy, mean +- std), with candidates drawn from the "
                 f"{len(universe)} archs of the CIFAR-10 sample that have both scores, the same draws for "
                 "every selector (ties: the first drawn of equal scores). The draws are those of "
                 f"`gradsign select --proxy effective_params --batch-size {args.effective_batch} --scored-only "
                 f"--runs {args.runs} --candidates {args.candidates} --cache runs/nb201-scores.sqlite`, "
                 "whose effective_params row this reproduces. Over the whole space GradSign gives 93.31 +- 0.47 "
                 "in the paper and the value in docs/results.md here.", "",
                 "| selector | CIFAR-10 test |", "|---|---|"]
        body += [f"| {name} | {m:.2f} +- {sd:.2f} |" for name, (m, sd) in sel.items()]
        from gradsign.evaluate import ScoringSetup
        from gradsign.select import format_selection, select

        with ScoreStore(Path(args.cache)) as store:
            lib = select(ScoringSetup(space, "cifar10", ("effective_params",), args.effective_batch, 0),
                         args.candidates, args.runs, store=store, scored_only=True)
        lib_row = lib["results"]["effective_params"]["cifar10"]["test"]
        agree = abs(lib_row["mean"] - sel["effective_params"][0]) < 1e-9 and lib["drawn_from"] == len(universe)
        body += ["", "`gradsign select` itself (the command above), all datasets"
                 + ("" if agree else " (**its draws differ from the table above**)") + ":", "", "```",
                 format_selection(lib), "```"]
    else:
        body.append(f"Not run: only {len(universe)} archs have both scores.")
    body.append("")
    body += _layer_split(args, summary)
    body += _nb101_section(args, summary)
    body += _zoo_section(args, summary)
    lines += _conclusion(summary, args) + [""] + body + _limits(args)
    PAGE.write_text("\n".join(lines) + "\n")
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    print(f"wrote {PAGE}", file=sys.stderr)


def _nb101_section(args: argparse.Namespace, summary: dict) -> list[str]:
    """GradSign, effective_params and #params on the NB101 models that have both scores."""
    import numpy as np

    from gradsign.chance import expected_abs_walk, partial_spearman
    from gradsign.correlate import signed_correlations
    from gradsign.spaces import get_space
    from gradsign.store import ScoreStore

    out = ["## NAS-Bench-101", ""]
    path = Path(args.nb101_cache)
    try:
        space = get_space("nb101")
    except ValueError as error:
        return out + [f"Not measured: {error}.", ""]
    if not path.is_file():
        return out + [f"Not measured: no NB101 score store at {path}.", ""]
    archs = _sample(space, 3000, 0)
    with ScoreStore(path) as store:
        grad, _ = _scores(space, "cifar10", "gradsign", 64, archs, store)
        eff, _ = _scores(space, "cifar10", "effective_params", args.effective_batch, archs, store)
    ok = np.isfinite(grad) & np.isfinite(eff)
    n = int(ok.sum())
    if n < 10:
        return out + [f"Not measured: only {n} NB101 models have both scores so far.", ""]
    keep = [a for a, k in zip(archs, ok) if k]
    grad, eff = grad[ok], eff[ok]
    params = np.array([space.param_count(a) for a in keep], float)
    acc = np.array([space.query(a, "cifar10", "valid", 108) for a in keep])
    from scipy.stats import spearmanr
    rows = {name: signed_correlations(v, acc, n_boot=args.bootstrap, seed=0)
            for name, v in (("gradsign", grad), ("effective_params", eff), ("#params", params),
                            ("excess (formula)", grad - expected_abs_walk(64) * eff))}
    alive = eff > 0
    ratio = grad[alive] / eff[alive]
    part = {"gradsign|effective_params": partial_spearman(grad, acc, eff, n_boot=args.bootstrap, seed=0),
            "gradsign|params": partial_spearman(grad, acc, params, n_boot=args.bootstrap, seed=0)}
    summary["nb101"] = {"models": n, "correlations": rows, "partial": part,
                        "spearman_gradsign_effective": float(spearmanr(grad, eff).statistic),
                        "spearman_gradsign_params": float(spearmanr(grad, params).statistic)}
    out += [f"The first {n} models of the draw of `gradsign correlate --space nb101 --sample 3000 --seed 0` "
            "(a uniform sample of the space) that have both a GradSign score (batch 64, seed 0, from the NB101 "
            f"run's store `{path}`, see experiments/table2_nb101.py) and an effective_params score (batch "
            f"{args.effective_batch}, seed 0). Accuracy field: cifar10 validation accuracy, 108 epochs. "
            "Signed Spearman [95% bootstrap CI]:", "",
            "| proxy | models | Spearman rho [95% CI] | Kendall tau |", "|---|---|---|---|"]
    out += [f"| {name} | {c['n']} | {_fmt(c)} | {c['kendall']:+.3f} |" for name, c in rows.items()]
    out += ["", f"Spearman(GradSign, effective_params) {summary['nb101']['spearman_gradsign_effective']:+.4f}, "
            f"Spearman(GradSign, #params) {summary['nb101']['spearman_gradsign_params']:+.4f}; GradSign / "
            f"effective_params: median {np.median(ratio):.3f}, range [{ratio.min():.3f}, {ratio.max():.3f}] "
            f"(E|S_64| = {expected_abs_walk(64):.3f}). Partial Spearman of GradSign with accuracy given "
            f"effective_params {_fmt_partial(part['gradsign|effective_params'])}, given #params "
            f"{_fmt_partial(part['gradsign|params'])}. The exact per-sample chance level was not computed on "
            "NB101 (one forward/backward per sample of a network with up to tens of millions of weights).", ""]
    return out


class _Prediction(torch.nn.Module):
    """A zoo model's prediction tensor (``gradsign.api.default_output``: logits of a ModelOutput)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gradsign.api import default_output

        return default_output(self.model(x))


def _zoo_section(args: argparse.Namespace, summary: dict) -> list[str]:
    """GradSign beside its exact chance level and effective_params on the zoo's tiny models."""
    import gradsign
    from gradsign import zoo
    from gradsign.chance import gradsign_vs_chance

    torch.set_num_threads(1)
    batch = args.zoo_batch
    out = ["## Model zoo", "",
           f"The tiny models of `gradsign.zoo` (random weights, seed 0), each on its random example batch of "
           f"{batch} (`zoo.example_batch(name, {batch})`: standard-normal images or uniform token ids, uniform "
           "labels; no trained accuracy exists for them, so this shows only where GradSign sits against its "
           f"chance level). Per-sample loop with the chance level as above (N = {batch}, E|S_N| = "
           f"{gradsign.chance.expected_abs_walk(batch):.4f}); effective_params from its batched backward.", "",
           "| model | Conv2d/Linear weights | reached | reached with n_k = N | GradSign | chance | GradSign / "
           "chance | effective_params (batched) |", "|---|---|---|---|---|---|---|---|"]
    rows = {}
    for name in zoo.names():
        try:
            model = zoo.build(name, "tiny", 0)
            x, y = zoo.example_batch(name, batch, "tiny", 0)
            report = gradsign_vs_chance(_Prediction(model), x, y)
            eff = gradsign.score(model, x, y, "effective_params")
        except Exception as error:  # a model this analysis cannot run is reported, not hidden
            out.append(f"| {name} | failed: {type(error).__name__}: {str(error).splitlines()[0][:80]} |"
                       " | | | | | |")
            rows[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        rows[name] = {**report.to_dict(), "effective_params": eff}
        out.append(f"| {name} | {report.weights:,} | {report.reached:,} | {report.full:,} | {report.gradsign:,.0f} | "
                   f"{report.chance:,.1f} | {report.ratio:.4f} | {eff:,.0f} |")
    summary["zoo"] = rows
    return out + [""]


def _layer_split(args: argparse.Namespace, summary: dict) -> list[str]:
    """Excess over chance split into the classifier (the last Linear layer) and all other layers, on the
    first ``--split-archs`` archs of each dataset's sample (per-sample loop, batch 64)."""
    import numpy as np

    from gradsign.chance import chance_report, per_sample_sign_stats
    from gradsign.datasets import canonical_batch
    from gradsign.spaces import get_space

    torch.set_num_threads(1)
    space = get_space("nb201")
    out = ["## Where the excess over chance sits", "",
           f"The first {args.split_archs} archs of each dataset's sample (those with a reached weight), "
           "per-sample loop at batch 64: the excess over chance of the classifier (the last Linear layer) "
           "and of all other Conv2d/Linear layers together. In the classifier, dL_i/dW[c, j] = "
           "(p_ic - [c = y_i]) h_ij with non-negative features h_ij (after ReLU and average pooling): for "
           "every class c but its own, a sample pushes the same sign, so those weights agree far beyond "
           "chance whatever the architecture.", "",
           "| dataset | archs | classifier weights | classifier excess: median share of the total excess | "
           "excess / chance outside the classifier: median [min, max] |", "|---|---|---|---|---|"]
    split = {}
    for ds in DATASETS:
        inputs, targets = canonical_batch(ds, 64, 0)
        shares, rest_ratio, head_weights = [], [], 0
        for arch in _sample(space, 1000, 0)[:args.split_archs]:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = space.build(arch, num_classes=space.num_classes(ds))
            stats = per_sample_sign_stats(model, inputs, targets, torch.nn.functional.cross_entropy)
            head = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
            whole = chance_report(stats, 64)
            if whole.reached == 0:
                continue
            head_report = chance_report({head: stats[head]}, 64)
            rest = chance_report({k: v for k, v in stats.items() if k != head}, 64)
            head_weights = head_report.weights
            shares.append(head_report.excess / whole.excess if whole.excess else float("nan"))
            rest_ratio.append(rest.excess / rest.chance if rest.chance else float("nan"))
        if not shares:
            continue
        rr = np.array(rest_ratio)
        split[ds] = {"archs": len(shares), "head_share_median": float(np.nanmedian(shares)),
                     "rest_excess_over_chance": [float(np.nanmedian(rr)), float(np.nanmin(rr)), float(np.nanmax(rr))]}
        out.append(f"| {ds} | {len(shares)} | {head_weights:,} | {100 * np.nanmedian(shares):.0f}% | "
                   f"{100 * np.nanmedian(rr):+.2f}% [{100 * np.nanmin(rr):+.2f}%, {100 * np.nanmax(rr):+.2f}%] |")
    summary["layer_split"] = split
    return out + [""]


def _conclusion(summary: dict, args: argparse.Namespace) -> list[str]:
    """The page's opening: the answer, with the numbers it rests on (the verdict follows the numbers:
    it is chosen by the thresholds written here, not by hand)."""
    import numpy as np

    out = ["## Conclusion", ""]
    partials = []
    verdicts = []
    for ds, d in summary["datasets"].items():
        c = d["correlations"]
        part = d.get("partial", {})
        exact = d.get("exact_chance")
        if not np.isfinite(c["effective_params"]["spearman"]):
            out.append(f"- **{ds}**: effective_params not scored yet.")
            continue
        text = (f"- **{ds}** ({c['effective_params']['n']} archs with both scores): Spearman with test accuracy "
                f"GradSign {c['gradsign']['spearman']:+.3f}, effective_params {c['effective_params']['spearman']:+.3f}, "
                f"#params {c['#params']['spearman']:+.3f}; Spearman(GradSign, effective_params) "
                f"{d.get('spearman_gradsign_effective', float('nan')):+.4f}; partial Spearman of GradSign given "
                f"effective_params {_fmt_partial(part['gradsign|effective_params'])}, given #params "
                f"{_fmt_partial(part['gradsign|params'])}")
        if exact:
            text += (f"; on {exact['archs']} archs with per-sample counts, "
                     f"{100 * exact['share_full']:.3f}% of the reached weights get a non-zero gradient from "
                     f"all 64 samples, GradSign / chance has median {exact['ratio_median']:.4f} and the excess "
                     f"over chance correlates {_fmt(exact['correlations']['excess'])} with accuracy")
        out.append(text + ".")
        partials.append(part["gradsign|effective_params"])
        verdicts.append((part["gradsign|effective_params"]["ci95"][1],
                         d.get("spearman_gradsign_effective", 0.0),
                         exact["ratio_median"] if exact else float("nan")))
    out.append("")
    timing = summary.get("timing") or []
    cost = ""
    if timing:
        med = {k: float(np.median([t[k] for t in timing])) for k in timing[0] if k != "arch"}
        cost = (f" It costs one forward/backward: median {med['effective_params, batch 8']:.2f} CPU s per arch at "
                f"batch 8 and {med['effective_params, batch 64']:.2f} s at batch 64, against "
                f"{med['gradsign, batch 64 (default engine)']:.2f} s for GradSign.")
    same = [d.get("spearman_gradsign_effective", float("nan")) for d in summary["datasets"].values()]
    split = summary.get("layer_split", {})
    names = list(summary["datasets"])
    if all(np.isfinite(same)) and min(same) > 0.98:
        out.append(f"**GradSign and effective_params rank NAS-Bench-201 archs almost identically** (Spearman "
                   f"between them {min(same):+.4f} to {max(same):+.4f}), and effective_params predicts the test "
                   "accuracy as well as GradSign on every dataset (the intervals overlap)." + cost)
    ups = [(ds, p) for ds, p in zip(names, partials)]
    none_pos = [ds for ds, p in ups if p["ci95"][0] <= 0]
    some_pos = [ds for ds, p in ups if p["ci95"][0] > 0]
    text = ("Once effective_params is known, GradSign adds no significantly positive information on "
            + " and ".join(none_pos)
            if none_pos else "")
    if some_pos:
        text += ("; " if text else "Given effective_params, GradSign ") + "keeps a small positive partial correlation on " + \
            ", ".join(f"{ds} ({_fmt_partial(p)})" for ds, p in ups if ds in some_pos)
    if text:
        out.append("")
        out.append(text + " (partial Spearman, table below; a negative value means that among archs a "
                   "gradient reaches equally, higher GradSign goes with slightly lower accuracy).")
    if split:
        rest = [v["rest_excess_over_chance"][0] for v in split.values()]
        share = [v["head_share_median"] for v in split.values()]
        out += ["", "**The per-weight sign agreement GradSign is named for is at chance level in every layer "
                "but the classifier.** Outside the last Linear layer GradSign exceeds its exact chance level "
                f"by a median {100 * min(rest):+.2f}% to {100 * max(rest):+.2f}% per dataset; the classifier "
                f"accounts for a median {100 * min(share):.0f}% to {100 * max(share):.0f}% of the excess, an "
                "effect of softmax cross-entropy with non-negative features that is the same for every "
                "architecture of a space up to the size of the last stage. So on NAS-Bench-201 at "
                "initialisation, GradSign is in effect E|S_64| times the number of weights a gradient reaches, "
                "plus a classifier term: what it measures is gradient reach, which differs from #params by the "
                "weights on cut-off paths (conv edges behind `none` edges, cells with no path from input to "
                "output)."]
    return out


def _limits(args: argparse.Namespace) -> list[str]:
    return [
        "## Limits", "",
        "- One batch size (64 for GradSign and the chance level, 8 for effective_params; on every NB201 arch "
        "with per-sample rows the batch-8 count equals the batch-64 per-sample count), one initialisation (PyTorch's default under `torch.manual_seed(0)`), one "
        "canonical batch per dataset (the bundled images; ImageNet16-120 uses the 120 bundled 16x16 "
        "ImageNet-style images, not the official pixels).",
        "- Spaces: NAS-Bench-201 (1,000-arch sample, exact chance level on a prefix of it), NAS-Bench-101 "
        "(the models scored so far, no exact chance level), and the zoo's tiny random-weight models without "
        "accuracies. Other spaces, other initialisations (e.g. Kaiming-normal with zeroed BN) or trained "
        "weights may behave differently.",
        "- The chance level treats the signs of one weight's per-sample gradients as independent fair coins. "
        "The weights of one layer share their inputs and output gradients, so the scores of different weights "
        "are not independent; the chance level is a mean, and no test of significance is made per arch.",
        "- Zoo: `efficientnet` has stochastic depth that stays random in train mode, so the per-sample loop "
        "and the batched backward see different random masks there and their reached counts can differ.",
        "",
        "## How the numbers were made", "",
        "```",
        "python experiments/all_arch_order.py            # runs/all_order.txt; lines 2-1001: the 1,000-arch sample",
        "sed -n 2,1001p runs/all_order.txt > runs/sample1000.txt",
        "for ds in cifar10 cifar100 imagenet16-120; do",
        f"  nice -n 10 python experiments/what_gradsign_measures.py scores --dataset $ds --batch-size "
        f"{args.effective_batch} --archs runs/sample1000.txt --cache runs/nb201-scores.sqlite",
        "  nice -n 10 python experiments/what_gradsign_measures.py excess --dataset $ds --archs runs/sample1000.txt "
        "--limit N --workers 2",
        "done",
        "python -c \"import numpy as np; from gradsign.spaces import get_space; "
        "print(*np.random.default_rng(0).choice(len(get_space('nb101')), 3000, replace=False), sep='\\n')\" "
        "> runs/nb101_sample.txt",
        f"nice -n 10 python experiments/what_gradsign_measures.py scores --space nb101 --dataset cifar10 "
        f"--batch-size {args.effective_batch} --archs runs/nb101_sample.txt --limit M --cache runs/nb101-scores.sqlite",
        REPORT_COMMAND,
        "```", "",
        "`scores` is `gradsign correlate --proxies effective_params` without the correlation (same score "
        "store rows; `gradsign correlate --proxies gradsign,effective_params ...` gives the same numbers). "
        "`excess` appends one row per arch to `docs/what_gradsign_measures/excess_nb201_<dataset>.csv` "
        "(resumable); `docs/what_gradsign_measures/summary.json` holds the numbers of every table. "
        "The NB101 GradSign scores come from the NB101 run of experiments/table2_nb101.py.", "",
    ]


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
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(run=run_excess)
    p = sub.add_parser("report", help="write docs/what_gradsign_measures.md")
    p.add_argument("--cache", default="runs/nb201-scores.sqlite")
    p.add_argument("--effective-batch", type=int, default=8, help="batch size of the stored effective_params")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--timing-archs", type=int, default=10)
    p.add_argument("--zoo-batch", type=int, default=16)
    p.add_argument("--split-archs", type=int, default=8)
    p.add_argument("--nb101-cache", default="runs/nb101-scores.sqlite",
                   help="score store with NB101 GradSign and effective_params scores")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--runs", type=int, default=500)
    p.set_defaults(run=run_report)
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
