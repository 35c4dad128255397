"""The command line end to end on the bundled data: results, and one-line errors for bad input."""
import json
import subprocess
import sys

import pytest

from gradsign.cli import main
from gradsign.spaces import get_space

SPACE = get_space("nb201")
ARCH_6111 = SPACE.arch(6111)


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_score_prints_the_benchmark_accuracy_and_scores(capsys, tmp_path):
    status, out, err = run(capsys, "score", "--arch", 6111, "--proxies", "gradsign,params",
                           "--cache", tmp_path / "s.sqlite")
    assert status == 0, err
    assert "94.37" in out and ARCH_6111 in out
    assert "params: 1.073466  (bundled with the package)" in out  # 6111 is in the bundled 1,000-arch sample
    assert "gradsign: 6818266.0  (bundled with the package)" in out  # PROVENANCE.md's file, arch 6111
    # 6114 is outside the sample: computed (the benchmark's own count, 344,346), then read from the store
    status, out, err = run(capsys, "score", "--arch", 6114, "--proxies", "params", "--cache", tmp_path / "s.sqlite")
    assert status == 0 and "params: 0.344346  (computed)" in out
    status, out, err = run(capsys, "score", "--arch", 6114, "--proxies", "params", "--cache", tmp_path / "s.sqlite")
    assert "params: 0.344346  (from the score store)" in out


def test_correlate_writes_csv_plot_json_and_reuses_the_store(capsys, tmp_path):
    archs = tmp_path / "archs.txt"
    archs.write_text("# four archs, none in the bundled 1,000-arch baseline sample\n6114\n0\n" + SPACE.arch(100) + "\n\n3\n")
    common = ["correlate", "--archs", archs, "--proxies", "params,gradsign", "--cache", tmp_path / "s.sqlite",
              "--out", tmp_path / "out", "--bootstrap", 20]
    status, out, err = run(capsys, *common, "--json", tmp_path / "r.json")
    assert status == 0, err
    assert "scores: 4 bundled with the package, 0 from the score store, 4 computed" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 4 and report["sources"] == {"bundled": 4, "store": 0, "computed": 4}
    assert {a["sources"]["gradsign"] for a in report["archs"]} == {"bundled"}
    assert report["accuracy_field"] == "cifar10 test accuracy, 200 epochs, seed mean"
    assert set(report["proxies"]) == {"params", "gradsign"}
    by_index = {a["index"]: a for a in report["archs"]}
    assert by_index[6114]["accuracy"] == SPACE.query(SPACE.arch(6114), "cifar10", "test", 200)
    assert by_index[6114]["scores"]["params"] == pytest.approx(0.344346)
    assert (tmp_path / "out" / "correlate_nb201_cifar10.csv").read_text().count("\n") == 5
    assert (tmp_path / "out" / "correlate_nb201_cifar10.png").stat().st_size > 0
    # the same --out again: refused before any work, the earlier files kept; --force replaces them
    before = (tmp_path / "out" / "correlate_nb201_cifar10.csv").read_bytes()
    status, out, err = run(capsys, *common, "--json", tmp_path / "again.json")
    assert status == 2 and "exists" in err and "--force" in err and err.count("\n") == 1
    assert not (tmp_path / "again.json").exists()
    assert (tmp_path / "out" / "correlate_nb201_cifar10.csv").read_bytes() == before
    status, out, err = run(capsys, *common, "--json", tmp_path / "again.json", "--force")
    assert status == 0, err
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["sources"] == {"bundled": 4, "store": 4, "computed": 0}
    strip = [{k: v for k, v in a.items() if k != "sources"} for a in again["archs"]]
    assert strip == [{k: v for k, v in a.items() if k != "sources"} for a in report["archs"]]
    # --recompute: every score computed again, the same values
    status, out, err = run(capsys, *common, "--json", tmp_path / "fresh.json", "--force", "--recompute",
                           "--proxies", "params")
    fresh = json.loads((tmp_path / "fresh.json").read_text())
    assert fresh["sources"] == {"bundled": 0, "store": 0, "computed": 4}
    assert [a["scores"]["params"] for a in fresh["archs"]] == [a["scores"]["params"] for a in report["archs"]]


def test_correlate_writes_files_only_where_asked(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, "correlate", "--archs", _archs_file(tmp_path, 6111, 0, 3),
                           "--proxies", "params", "--no-cache", "--bootstrap", 0)
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archs.txt"]
    assert "no files written: --out DIR writes the per-arch CSV and the scatter plot" in out
    (tmp_path / "taken").write_text("mine")
    status, out, err = run(capsys, "correlate", "--archs", tmp_path / "archs.txt", "--proxies", "params",
                           "--no-cache", "--out", tmp_path / "taken")
    assert status == 2 and err == f"gradsign: error: --out {tmp_path / 'taken'} is an existing file, not a folder\n"
    assert (tmp_path / "taken").read_text() == "mine"


def _archs_file(tmp_path, *indices):
    path = tmp_path / "archs.txt"
    path.write_text("".join(f"{i}\n" for i in indices))
    return path


def test_json_has_null_for_nan_and_no_warning_leaks(capsys, tmp_path):
    # three archs: many bootstrap resamples repeat one arch (constant input); the two cut-off cells tie at 0
    archs = _archs_file(tmp_path, 0, 1, 6111)
    status, out, err = run(capsys, "correlate", "--archs", archs, "--proxies", "gradsign,params", "--bootstrap", 50,
                           "--cache", tmp_path / "s.sqlite", "--json", tmp_path / "r.json")
    assert status == 0, err
    assert "warning" not in err.lower()
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"JSON holds {name}"))
    assert report["proxies"]["gradsign"]["n"] == 3
    with_nan = tmp_path / "nan.json"
    from gradsign.cli import write_json
    write_json(with_nan, {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(with_nan.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": None}}


BAD_INPUTS = {
    "unknown arch": (["score", "--arch", "|conv_9x9~0|+|none~0|none~1|+|none~0|none~1|none~2|"], "arch"),
    "index out of range": (["score", "--arch", "15625"], "15625"),
    "negative index": (["score", "--arch", "-1"], "index -1 out of range"),
    "no workers": (["score", "--arch", "0", "--workers", "0"], "--workers must be >= 1, got 0"),
    "no workers for correlate": (["correlate", "--sample", "3", "--workers", "0"], "--workers must be >= 1"),
    "no threads": (["score", "--arch", "0", "--threads", "0"], "--threads must be >= 1"),
    "scored-only recompute": (["select", "--scored-only", "--recompute", "--runs", "2", "--candidates", "2"],
                              "recompute"),
    "unknown proxy": (["score", "--arch", "0", "--proxies", "magic"], "unknown proxy"),
    "unknown dataset": (["score", "--arch", "0", "--dataset", "mnist"], "mnist"),
    "unknown space": (["score", "--arch", "0", "--space", "nb999"], "unknown search space"),
    "missing arch file": (["correlate", "--archs", "/nonexistent/archs.txt"], "archs.txt"),
    "missing data dir": (["score", "--arch", "0", "--data-dir", "/nonexistent/cifar"], "cifar"),
    "bad sample size": (["correlate", "--sample", "0"], "--sample"),
    "batch larger than the bundled images": (["score", "--arch", "0", "--dataset", "imagenet16-120",
                                               "--batch-size", "500"], "500"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_line_and_exit_2(capsys, tmp_path, case):
    argv, expected = BAD_INPUTS[case]
    status, out, err = run(capsys, *argv, "--cache", tmp_path / "s.sqlite")
    assert status == 2
    assert err.startswith("gradsign: error: ") and err.count("\n") == 1
    assert expected in err


def test_corrupt_cache_is_reported_and_kept(capsys, tmp_path):
    cache = tmp_path / "scores.sqlite"
    cache.write_bytes(b"definitely not sqlite" * 50)
    status, out, err = run(capsys, "score", "--arch", "0", "--cache", cache)
    assert status == 2 and "left untouched" in err and err.count("\n") == 1
    assert cache.read_bytes() == b"definitely not sqlite" * 50


def test_bad_arch_in_file_is_reported(capsys, tmp_path):
    archs = tmp_path / "archs.txt"
    archs.write_text("0\nnot-an-arch\n")
    status, out, err = run(capsys, "correlate", "--archs", archs, "--no-cache", "--out", tmp_path / "o")
    assert status == 2 and "not-an-arch" in err


def test_module_entry_point_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gradsign", "score", "--arch", "nonsense", "--no-cache"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_help_is_whole_and_names_defaults(capsys):
    import gradsign
    from gradsign.cli import build_parser

    parser = build_parser()
    assert parser.description == " ".join(gradsign.__doc__.split()) and parser.description.endswith(".")
    with pytest.raises(SystemExit):
        parser.parse_args(["select", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("archs drawn per run (default 100)", "independent runs (default 500)", "ddof=1",
                     "--recompute", "--force"):
        assert expected in text


def test_cache_info_export_prune(capsys, tmp_path, monkeypatch):
    import numpy as np

    from gradsign import bundled
    from gradsign.evaluate import SCORING_VERSION
    from gradsign.store import ScoreKey, ScoreStore, StoredScore
    cache = tmp_path / "s.sqlite"
    assert run(capsys, "score", "--arch", "0", "--proxies", "params", "--cache", cache)[0] == 0
    assert run(capsys, "score", "--arch", "7", "--proxies", "params", "--cache", cache)[0] == 0
    status, out, _ = run(capsys, "cache", "info", "--cache", cache)
    assert status == 0 and "| nb201 | cifar10 | params | 64 | 0 | {} |" in out
    bundle = tmp_path / "data" / "scores_nb201_cifar10_params_b64_s0.npz"
    status, out, _ = run(capsys, "cache", "export", "--proxy", "params", "--cache", cache, "--out", bundle)
    assert status == 0 and "wrote 2 of 15625" in out
    before = bundle.read_bytes()
    status, _, err = run(capsys, "cache", "export", "--proxy", "params", "--cache", cache, "--out", bundle)
    assert status == 2 and "--force" in err and bundle.read_bytes() == before
    csv_path = tmp_path / "params.csv"
    assert run(capsys, "cache", "export", "--proxy", "params", "--cache", cache, "--out", csv_path)[0] == 0
    assert csv_path.read_text().splitlines()[1].startswith(f"0,{SPACE.arch(0)},")
    # the exported file answers look-ups as a bundled file, with no store at all
    monkeypatch.setattr(bundled, "DATA_DIR", bundle.parent)
    archs_file = tmp_path / "two.txt"
    archs_file.write_text("0\n7\n")
    run(capsys, "correlate", "--archs", archs_file, "--proxies", "params", "--no-cache",
        "--out", tmp_path / "o", "--json", tmp_path / "r2.json", "--bootstrap", 0)
    assert json.loads((tmp_path / "r2.json").read_text())["sources"] == {"bundled": 2, "store": 0, "computed": 0}
    with np.load(bundle) as f:
        assert int(f["known"].sum()) == 2
    # prune: rows of another scoring version, and rows whose scoring raised
    current = ScoreKey("nb201", "cifar10", 64, 0, "{}", SCORING_VERSION)
    with ScoreStore(cache) as store:
        store.put(ScoreKey("nb201", "cifar10", 64, 0, "{}", "0.0.1"),
                  [StoredScore(SPACE.arch(i), "params", 1.0, None, 0.1) for i in (0, 7, 9)])
        store.put(current, [StoredScore(SPACE.arch(9), "params", float("nan"), "RuntimeError: boom", 0.1)])
    status, out, _ = run(capsys, "cache", "prune", "--other-versions", "--cache", cache)
    assert status == 0 and "removed 3 rows" in out
    status, out, _ = run(capsys, "cache", "prune", "--errors", "--cache", cache)
    assert status == 0 and "removed 1 rows" in out
    with ScoreStore(cache) as store:
        kept = store.get(current, [SPACE.arch(i) for i in (0, 7, 9)], ["params"])
    assert sorted(a for a, _ in kept) == sorted([SPACE.arch(0), SPACE.arch(7)])
