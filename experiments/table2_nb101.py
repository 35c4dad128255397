"""The GradSign paper's Table 2 on NAS-Bench-101 (CIFAR-10), from the package's own scores: docs/nb101.md.

Protocol. The models are ``gradsign correlate --space nb101 --sample N --seed S``'s draw (``default_rng(S)``
over the 30,001 bundled models, a uniform sample of the space's 423,624 unique models); each network is built
for 10 classes under ``torch.manual_seed(S)`` and scored on the canonical CIFAR-10 batch (64 images, seed S)
by a resumable run that writes every finished model to a score store:

    nice -n 10 gradsign -v correlate --space nb101 --dataset cifar10 --sample 3000 --seed 0 \\
        --proxies gradsign,params,synflow --cache runs/nb101-scores.sqlite --workers 1 --threads 1 \\
        --bootstrap 0 --out runs/nb101-out > runs/nb101-scores.log 2>&1

This script reads the store for the models of that draw, in draw order: a model counts once the three
proxies have a stored score, so the scored models are a prefix of the draw and themselves a uniform sample
(NASWOT, which costs a forward pass at batch 64, is reported for the models that have it). It reports signed
Spearman and Kendall with 95% percentile bootstrap intervals (1,000 resamples, ``gradsign.correlate``)
against "cifar10 validation accuracy, 108 epochs, one run" and Spearman against the 4/12/36-epoch fields,
beside the paper's numbers; GradSign beside #params (rank partial correlation; GradSign per counted weight
against the chance level of 64 random signs); the builder's parameter check (``experiments/nb101_params.py``)
and the agreement of our baselines with NAS-Bench-Suite-Zero's published values on the NASLib subset
(``python experiments/table2_nb101.py published``).

Usage:
    python experiments/table2_nb101.py [table] [--cache runs/nb101-scores.sqlite] [--sample 3000] [--seed 0]
    python experiments/table2_nb101.py published [--n-archs 40] [--proxies params,synflow]
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn

import gradsign
from gradsign.correlate import signed_correlations
from gradsign.evaluate import ScoringSetup
from gradsign.spaces import get_space
from gradsign.spaces.nb101 import parse_spec
from gradsign.store import ScoreStore

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DOCS = ROOT / "docs"
#: GradSign paper, Table 2 (NAS-Bench-101, CIFAR-10)
PAPER = {"gradsign": 0.449, "synflow": 0.363, "naswot": 0.324, "grasp": 0.315}
TABLE_PROXIES = ("gradsign", "synflow", "naswot", "params")
#: the proxies of the main scoring run (NASWOT, a forward pass at batch 64, was run on the first models only)
MAIN_PROXIES = ("gradsign", "params", "synflow")
EPOCHS = (4, 12, 36, 108)
#: NASLib subset: op code order of its 56-tuples (49 matrix entries, row-major, then 7 op codes)
NASLIB_OPS = ["input", "output", "maxpool3x3", "conv1x1-bn-relu", "conv3x3-bn-relu"]
#: our proxy -> published column of the NASLib file
PUBLISHED_COLUMN = {"params": "params", "synflow": "synflow", "flops": "flops", "snip": "snip",
                    "grad_norm": "grad_norm", "fisher": "fisher", "grasp": "grasp", "jacob_cov": "jacov"}
CORRELATE_COMMAND = ("nice -n 10 gradsign -v correlate --space nb101 --dataset cifar10 --sample {sample} "
                     "--seed {seed} --proxies gradsign,params,synflow --cache runs/nb101-scores.sqlite "
                     "--workers 1 --threads 1 --bootstrap 0 --out runs/nb101-out")


def chance_level(batch_size: int) -> float:
    """E|sum of ``batch_size`` independent fair +-1 signs| (exact): GradSign per weight of random gradients."""
    return sum(abs(2 * k - batch_size) * math.comb(batch_size, k) for k in range(batch_size + 1)) / 2 ** batch_size


def counted_weights(space, arch: str) -> int:
    """Weights GradSign counts (Conv2d and Linear weights), from the network built on the meta device."""
    with torch.device("meta"):
        model = space.build(arch, num_classes=10)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman of x and y with z partialled out: the partial Pearson correlation of the ranks."""
    rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef([rx, ry, rz])
        denominator = (1 - r[0, 2] ** 2) * (1 - r[1, 2] ** 2)
    return float((r[0, 1] - r[0, 2] * r[1, 2]) / math.sqrt(denominator)) if denominator > 0 else math.nan


def bootstrap_ci(fn, arrays: list[np.ndarray], n_boot: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(arrays[0]), len(arrays[0]))
        values.append(fn(*(a[pick] for a in arrays)))
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def read_scores(args) -> tuple[list[str], dict[str, dict], dict]:
    """Models of the draw, in draw order, whose GradSign, #params and synflow scores are stored (the main
    set), and per proxy of TABLE_PROXIES its stored (arch, value, seconds) within the draw."""
    space = get_space("nb101")
    setup = ScoringSetup(space, "cifar10", TABLE_PROXIES, 64, args.seed)
    draw = [space.arch(int(i)) for i in np.random.default_rng(args.seed).choice(len(space), args.sample,
                                                                                replace=False)]
    store = ScoreStore(Path(args.cache))
    try:
        found = store.get(setup.key, draw, TABLE_PROXIES)
    finally:
        store.close()
    main_set = [a for a in draw if all((a, p) in found for p in MAIN_PROXIES)]
    per_proxy = {}
    for p in TABLE_PROXIES:
        archs = [a for a in draw if (a, p) in found]
        per_proxy[p] = {"archs": archs, "values": np.array([found[a, p].value for a in archs]),
                        "seconds": np.array([np.nan if found[a, p].seconds is None else found[a, p].seconds
                                             for a in archs]),
                        "errors": sum(1 for a in archs if found[a, p].error)}
    info = {"drawn": len(draw), "scored": len(main_set), "version": setup.key.version}
    return main_set, per_proxy, info


def cmd_table(args) -> None:
    space = get_space("nb101")
    archs, per_proxy, info = read_scores(args)
    if len(archs) < 3:
        raise SystemExit(f"only {len(archs)} models of the draw are scored so far; run the scoring command first")
    rows = {}
    for p in TABLE_PROXIES:
        own = per_proxy[p]
        if len(own["archs"]) < 3:
            continue
        acc = {e: np.array([space.query(a, "cifar10", "valid", e) for a in own["archs"]]) for e in EPOCHS}
        main = signed_correlations(own["values"], acc[108], n_boot=1000, seed=args.seed)
        extra = {e: signed_correlations(own["values"], acc[e], n_boot=0)["spearman"] for e in (4, 12, 36)}
        rows[p] = {**main, "spearman_by_epochs": extra, "errors": own["errors"],
                   "median_seconds": float(np.nanmedian(own["seconds"]))}
    index = {p: dict(zip(per_proxy[p]["archs"], per_proxy[p]["values"])) for p in MAIN_PROXIES}
    g = np.array([index["gradsign"][a] for a in archs])
    n_params = np.array([index["params"][a] for a in archs])
    a108 = np.array([space.query(a, "cifar10", "valid", 108) for a in archs])
    finite = np.isfinite(g)
    weights = np.array([counted_weights(space, a) for a in archs], dtype=float)
    per_weight = g / weights
    chance = chance_level(64)
    versus = {
        "n": int(finite.sum()),
        "spearman_gradsign_params": float(stats.spearmanr(g[finite], n_params[finite]).statistic),
        "partial_spearman": partial_spearman(g[finite], a108[finite], n_params[finite]),
        "partial_spearman_ci95": bootstrap_ci(partial_spearman, [g[finite], a108[finite], n_params[finite]],
                                              1000, args.seed),
        "per_weight_min": float(np.nanmin(per_weight)), "per_weight_max": float(np.nanmax(per_weight)),
        "chance_level": chance,
        "excess_vs_acc": signed_correlations(per_weight - chance, a108, n_boot=1000, seed=args.seed),
    }
    fallbacks = None
    if args.log and Path(args.log).is_file():
        text = Path(args.log).read_text(errors="replace")
        fallbacks = len(re.findall(r"using the loop engine", text))
    params_check = json.loads((DOCS / "nb101" / "params.json").read_text()) \
        if (DOCS / "nb101" / "params.json").is_file() else None
    published = json.loads((DOCS / "nb101" / "baselines_vs_published.json").read_text()) \
        if (DOCS / "nb101" / "baselines_vs_published.json").is_file() else None
    result = {"command": "python experiments/table2_nb101.py " + f"--sample {args.sample} --seed {args.seed}",
              "scoring_command": CORRELATE_COMMAND.format(sample=args.sample, seed=args.seed),
              "accuracy_field": space.accuracy_field("cifar10", "valid", 108), **info,
              "gradsign_stored": len(per_proxy["gradsign"]["archs"]),
              "naswot_stored": len(per_proxy["naswot"]["archs"]), "proxies": rows,
              "gradsign_vs_params": versus, "engine_fallbacks_in_log": fallbacks, "archs": archs}
    (DOCS / "nb101").mkdir(parents=True, exist_ok=True)
    (DOCS / "nb101" / "table2.json").write_text(json.dumps(result, indent=1) + "\n")
    (DOCS / "nb101.md").write_text(render(result, params_check, published))
    print(f"wrote docs/nb101.md: {len(archs)} models; GradSign Spearman {rows['gradsign']['spearman']:+.3f}")


def fmt_ci(ci: list[float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if all(map(math.isfinite, ci)) else "n/a"


def render(r: dict, params_check: dict | None, published: dict | None) -> str:
    n = r["scored"]
    lines = [
        "# NAS-Bench-101: the GradSign paper's Table 2", "",
        "Written by `python experiments/table2_nb101.py` from the package's own scores; every number below comes",
        "from that script or from the commands it names.", "",
        "## The space and its data", "",
        "`get_space(\"nb101\")`: arch strings are the benchmark's module hashes (a spec can also be given as JSON",
        "`{\"matrix\": ..., \"ops\": [...]}`, pruned first). The package bundles 30,001 of the 423,624 unique models",
        "(`src/gradsign/data/nb101.npz`; contiguous slices of the sorted hashes, so a uniform sample) with their",
        "specs, the validation accuracy of **one** training run after 4, 12, 36 and 108 epochs, the 108-epoch",
        "training time and the parameter count. No test accuracy is bundled; asking for it is refused.",
        "",
        "- `python scripts/make_nb101_data.py` enumerates the whole space in the benchmark's generation order",
        "  and finds 423,624 unique models; every `data-1k.json` spec hashes to its key and is the first spec of",
        "  its hash; every bundled hash is found.",
    ]
    if params_check:
        lines.append(f"- `{params_check['command']}`: the parameter count from the builder's channel rule "
                     f"(`nb101_param_count`) equals the benchmark's `trainable_parameters` for "
                     f"**{params_check['formula_equal']:,} of {params_check['models']:,}** bundled models; the "
                     f"network itself, built on the meta device, for **{params_check['built_equal']:,} of "
                     f"{params_check['built']:,}** (every {params_check['stride']}th model; a meta build costs "
                     "about 20 ms of CPU, too much for all of them on the shared machine; "
                     "`tests/test_nb101.py` compares both on random samples).")
    lines += [
        "",
        "## Table 2", "",
        f"Scoring run (resumable; the store keeps every finished model):", "", "```",
        r["scoring_command"], "```", "",
        f"Models: the first **{n:,}** of the {r['drawn']:,} drawn (GradSign, #params and synflow stored; a prefix",
        "of the draw is a uniform sample; NASWOT only where an earlier run of the same command with",
        "`--proxies gradsign,params,synflow,naswot` stored it). The issue asked for 3,000 GradSign models; on the",
        "shared 2-core CPU an NB101",
        "network at batch 64 costs tens of seconds (see the seconds column and `docs/performance.md`), so this",
        "is what the compute allowed. Batch 64, seed 0, 10 classes, no augmentation.", "",
        f"Accuracy field: **{r['accuracy_field']}** (columns 4/12/36: the same run's validation accuracy",
        "after those training budgets). Signed Spearman rho and Kendall tau, 95% percentile bootstrap CIs",
        "(1,000 resamples).", "",
        "| proxy | n | Spearman rho (108) | 95% CI | Kendall tau (108) | 95% CI | rho 4 | rho 12 | rho 36 |"
        " paper (Table 2) | median s/model |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, row in r["proxies"].items():
        e = row["spearman_by_epochs"]
        lines.append(f"| {p} | {row['n']} | {row['spearman']:+.3f} | {fmt_ci(row['spearman_ci95'])} | "
                     f"{row['kendall']:+.3f} | {fmt_ci(row['kendall_ci95'])} | {e[4]:+.3f} | {e[12]:+.3f} | "
                     f"{e[36]:+.3f} | {PAPER.get(p, float('nan')):.3f} | {row['median_seconds']:.1f} |"
                     .replace("| nan |", "| - |"))
    lines += [
        *(["", f"NASWOT: only {r['naswot_stored']} model(s) scored (in the first run, before NASWOT was dropped "
              "from it to save time); a row needs at least 3."] if "naswot" not in r["proxies"] else []),
        "", "The paper's values are for about 4,500 models with the official code, which reports |Spearman|;",
        "grasp is not run here (about three forward+backward passes per model). NAS-Bench-Suite-Zero reports",
        "grad_norm, snip, fisher and jacob_cov negative on NB101.", "",
    ]
    v = r["gradsign_vs_params"]
    ex = v["excess_vs_acc"]
    lines += [
        "## GradSign beside #params", "",
        f"- Spearman(GradSign, #params) = {v['spearman_gradsign_params']:+.4f} over these {v['n']} models.",
        f"- Spearman of GradSign with the 108-epoch accuracy, #params partialled out (partial Pearson of ranks):",
        f"  {v['partial_spearman']:+.3f} {fmt_ci(v['partial_spearman_ci95'])}.",
        f"- GradSign per counted weight (Conv2d and Linear weights) lies in {v['per_weight_min']:.3f} to "
        f"{v['per_weight_max']:.3f}; the chance level, E|sum of 64 random signs|, is {v['chance_level']:.4f}.",
        f"  The excess over chance (GradSign / weights - {v['chance_level']:.4f}) correlates with the accuracy at",
        f"  Spearman {ex['spearman']:+.3f} {fmt_ci(ex['spearman_ci95'])}.",
        "",
        f"GradSign's Spearman with the 108-epoch accuracy is {r['proxies']['gradsign']['spearman']:+.3f}, #params's "
        f"{r['proxies']['params']['spearman']:+.3f} on the same models: with a rank correlation of "
        f"{v['spearman_gradsign_params']:+.4f} between the two, what GradSign adds beyond a parameter count is",
        "the partial correlation above.",
        "",
    ]
    if r["engine_fallbacks_in_log"] is not None:
        lines += [f"Engine: the scoring run's `-v` log shows {r['engine_fallbacks_in_log']} fallback(s) of the "
                  "default engine to the per-sample loop (the loop gives the same exact score, only slower).", ""]
    if published:
        lines += ["## Our baselines against NAS-Bench-Suite-Zero's published values", "",
                  f"`{published['command']}`: {published['n_archs']} distinct pruned specs of "
                  "`naslib_zc_nasbench101_subset500.json` (NASLib, 500 rows, 301 distinct specs), each built for "
                  "10 classes and scored on our canonical batch; signed Spearman between our score and the "
                  "published column (other initialisations and batches, so noisy proxies cannot reach 1).", "",
                  "| proxy | published column | n | Spearman | our s/model |", "|---|---|---|---|---|"]
        for p, row in published["correlations"].items():
            lines.append(f"| {p} | {PUBLISHED_COLUMN[p]} | {row['n']} | {row['spearman']:+.3f} | "
                         f"{row['seconds_per_arch']:.2f} |")
        if "params_equal" in published:
            lines.append("")
            lines.append(f"Our parameter count equals the published `params` (millions, 6 decimals) for "
                         f"{published['params_equal']} of {published['n_archs']} specs.")
        lines.append("")
    lines += ["## Bundled scores", "",
              f"The GradSign scores computed here ({r['gradsign_stored']:,} models of the draw) are bundled as",
              "`src/gradsign/data/scores_nb101_cifar10_gradsign_b64_s0.npz` (`gradsign cache export --space nb101 "
              "--proxy gradsign --cache runs/nb101-scores.sqlite --out ...`), so look-ups of those models are "
              "instant.", ""]
    return "\n".join(lines)


def cmd_published(args) -> None:
    """Score distinct pruned specs of the NASLib subset and correlate with the published columns."""
    data = json.loads((SHARED / "nb101" / "naslib_zc_nasbench101_subset500.json").read_text())["nasbench101"]
    rows = data["cifar10"]
    distinct: dict[str, dict] = {}
    for key, row in rows.items():
        code = [int(t) for t in key.strip("()").split(",")]
        matrix = np.array(code[:49]).reshape(7, 7)
        spec = parse_spec({"matrix": matrix.tolist(), "ops": [NASLIB_OPS[c] for c in code[49:]]})
        distinct.setdefault(spec.to_json(), row)
    specs = sorted(distinct)
    picked = [specs[i] for i in np.sort(np.random.default_rng(args.seed).choice(len(specs), min(args.n_archs, len(specs)),
                                                                                replace=False))]
    proxies = [p.strip() for p in args.proxies.split(",") if p.strip()]
    space = get_space("nb101")
    from gradsign.datasets import canonical_batch
    x, y = canonical_batch("cifar10", 64, args.seed)
    ours = {p: [] for p in proxies}
    seconds = {p: 0.0 for p in proxies}
    params_equal = 0
    for k, spec in enumerate(picked):
        torch.manual_seed(args.seed)
        model = space.build(spec, num_classes=10)
        count = sum(p.numel() for p in model.parameters())
        params_equal += round(count / 1e6, 6) == round(distinct[spec]["params"], 6)
        for p in proxies:
            start = time.perf_counter()
            ours[p].append(gradsign.score(model, x, y, proxy=p, seed=args.seed))
            seconds[p] += time.perf_counter() - start
        print(f"[{k + 1}/{len(picked)}]", flush=True)
    report = {}
    for p in proxies:
        published = [float(distinct[s][PUBLISHED_COLUMN[p]]) for s in picked]
        report[p] = {"n": len(picked), "spearman": float(stats.spearmanr(ours[p], published).statistic),
                     "seconds_per_arch": seconds[p] / len(picked)}
        print(f"{p}: Spearman with published {report[p]['spearman']:+.3f}")
    out = DOCS / "nb101" / "baselines_vs_published.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": f"python experiments/table2_nb101.py published --n-archs {args.n_archs} "
                                          f"--proxies {args.proxies} --seed {args.seed}",
                               "n_archs": len(picked), "params_equal": int(params_equal), "correlations": report,
                               "specs": picked, "scores": ours}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", nargs="?", default="table", choices=("table", "published"))
    parser.add_argument("--cache", default=str(ROOT / "runs" / "nb101-scores.sqlite"))
    parser.add_argument("--sample", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", default=str(ROOT / "runs" / "nb101-scores.log"),
                        help="the scoring run's -v log, to count engine fallbacks")
    parser.add_argument("--n-archs", type=int, default=40)
    parser.add_argument("--proxies", default="params,synflow")
    args = parser.parse_args()
    cmd_published(args) if args.action == "published" else cmd_table(args)


if __name__ == "__main__":
    main()
